# Follows extensions-builtin/Lora/lora.py of AUTOMATIC1111 v1.10.1 (82a973c0): compatibility aliases; loaded_loras
# is the same list object as networks.loaded_networks.
import networks

list_available_loras = networks.list_available_networks
available_loras = networks.available_networks
available_lora_aliases = networks.available_network_aliases
loaded_loras = networks.loaded_networks
