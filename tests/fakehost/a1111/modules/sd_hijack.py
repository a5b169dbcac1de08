# Follows modules/sd_hijack.py of AUTOMATIC1111 v1.10.1 (82a973c0): only model_hijack.comments, which the Lora
# loader appends "Lora not found" to.
import types

model_hijack = types.SimpleNamespace(comments=[], extra_generation_params={})
