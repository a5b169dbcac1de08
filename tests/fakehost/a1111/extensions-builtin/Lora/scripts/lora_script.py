# Follows extensions-builtin/Lora/scripts/lora_script.py of AUTOMATIC1111 v1.10.1 (82a973c0): installs the torch
# patches at import, names the model's modules on model load, registers ExtraNetworkLora under "lora" and "lyco"
# in before_ui, undoes the patches on script unload. UI pages, API routes and infotext handlers are left out.
import extra_networks_lora
import lora  # noqa: F401
import lora_patches
import networks

from modules import extra_networks, script_callbacks


def unload():
    networks.originals.undo()


def before_ui():
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")


networks.originals = lora_patches.LoraPatches()

script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
script_callbacks.on_script_unloaded(unload)
script_callbacks.on_before_ui(before_ui)
