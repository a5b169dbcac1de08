# Fake of modules_forge/packages/comfy/lora.py (Forge Neo 2.26): load_lora and the LoRA key maps.
# Kept: load_lora reads a prefix's alpha (a float) and dora_scale, hands them to every weight adapter class in turn
# and stores the adapter OBJECT it gets; what stays a tuple: ("diff", (w,)) for w_norm / diff (b_norm / diff_b on the
# bias key) and ("set", (w,)) for set_weight. The key maps are the fake Forge's (both WebUIs port the same ComfyUI
# functions, and their mutable default key_map={}), with what Neo's model_lora_keys_unet adds for Flux and Chroma:
# the diffusers names without a prefix (DiffSynth) and single_blocks.N.linear1_qkv for the q, k, v slice of
# linear1 (0, 0, 3 * hidden). Simplified: no BFL control LoRAs, no Qwen, Lumina, Ernie or Krea names.
from neo_overlay import forge_module

from modules_forge.packages.comfy import weight_adapter

_forge = forge_module("backend.patcher.lora")
model_lora_keys_clip = _forge.model_lora_keys_clip


def model_lora_keys_unet(model, key_map={}):
    key_map = _forge.model_lora_keys_unet(model, key_map)
    name = model.config.huggingface_repo.lower()
    if "flux" in name or "chroma" in name:
        config = model.diffusion_model.config
        for k, to in _forge.flux_to_diffusers(config, output_prefix="diffusion_model.").items():
            if k.endswith(".weight"):
                key_map[k[: -len(".weight")]] = to
        for k in model.state_dict():
            if k.endswith(".weight") and ".linear1." in k:
                key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, config["hidden_size"] * 3))
    return key_map


def load_lora(lora, to_load):
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded_keys.add(f"{x}.alpha")
        dora_scale = lora.get(f"{x}.dora_scale")
        if dora_scale is not None:
            loaded_keys.add(f"{x}.dora_scale")

        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, dora_scale, loaded_keys)
            if adapter is not None:
                patch_dict[to_load[x]] = adapter
                loaded_keys.update(adapter.loaded_keys)

        bias_key = "{}.bias".format(to_load[x][: -len(".weight")])
        for name, target, kind in ((f"{x}.w_norm", to_load[x], "diff"), (f"{x}.b_norm", bias_key, "diff"),
                                   (f"{x}.diff", to_load[x], "diff"), (f"{x}.diff_b", bias_key, "diff"),
                                   (f"{x}.set_weight", to_load[x], "set")):
            if name in lora and (name != f"{x}.b_norm" or f"{x}.w_norm" in lora):
                patch_dict[target] = (kind, (lora[name],))
                loaded_keys.add(name)

    remaining_dict = {x: y for x, y in lora.items() if x not in loaded_keys}
    return patch_dict, remaining_dict
