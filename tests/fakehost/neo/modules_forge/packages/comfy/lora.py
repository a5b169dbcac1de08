# Fake of modules_forge/packages/comfy/lora.py (Forge Neo 2.26): load_lora and the LoRA key maps.
# Kept: load_lora reads a prefix's alpha (a float) and dora_scale, hands them to every weight adapter class in turn
# and stores the adapter OBJECT it gets; what stays a tuple: ("diff", (w,)) for w_norm / diff (b_norm / diff_b on the
# bias key) and ("set", (w,)) for set_weight. The key maps are the fake Forge's (both WebUIs port the same ComfyUI
# functions, and their mutable default key_map={}), with what Neo's model_lora_keys_unet adds per family, picked by
# the model config's huggingface_repo:
# * "flux" or "chroma" (FLUX.1, Chroma, Flux.2): flux_to_diffusers (modules_forge/packages/comfy/utils.py) with
#   Neo's Flux.2 names -- single blocks' attn.to_qkv_mlp_proj (all of linear1) and attn.to_out (linear2), ff.linear_in /
#   linear_out and the ff_context twins (img_mlp.0 / .2, txt_mlp.0 / .2) -- under transformer. / lycoris_ /
#   lora_transformer_ and bare (DiffSynth), and single_blocks.N.linear1_qkv for the q, k, v slice of linear1
#   (0, 0, 3 * hidden);
# * "qwen": the model's own paths bare, under transformer. and as lycoris_ names;
# * "lumina" or "z-image": z_image_to_diffusers -- diffusers names of the NextDiT layers: to_q / to_k / to_v as
#   slices (0, n * dim, dim) of attention.qkv (n = 0, 1, 2; dim also for k and v, also where grouped-query attention
#   makes them narrower, as Neo has it), to_out.0 as attention.out, the rest under their own names -- under
#   diffusion_model. / transformer. / lycoris_ and bare;
# * "krea-2": krea2_to_diffusers -- transformer_blocks.N.attn.to_q / to_k / to_v / to_gate / to_out(.0) and
#   ff.gate / up / down as blocks.N.attn.wq / wk / wv / gate / wo and mlp.gate / up / down (text_fusion's blocks
#   likewise), under diffusion_model. / transformer. / lycoris_ and bare.
# Wan has no names of its own: the generic diffusion_model.<path> and lora_unet_<path> ones. Simplified: no BFL
# control LoRAs, no Ernie names, the basic (embedder) maps of Z-Image and Krea 2 left out.
from neo_overlay import forge_module

from modules_forge.packages.comfy import weight_adapter

_forge = forge_module("backend.patcher.lora")
model_lora_keys_clip = _forge.model_lora_keys_clip


# Neo's Flux.2 additions to flux_to_diffusers' per-block names.
_FLUX2_DOUBLE = {"ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0",
                 "ff_context.linear_out": "txt_mlp.2"}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}


def flux_to_diffusers(config, output_prefix=""):
    key_map = _forge.flux_to_diffusers(config, output_prefix)
    for i in range(config.get("depth", 0)):
        for theirs, ours in _FLUX2_DOUBLE.items():
            for end in ("weight", "bias"):
                key_map[f"transformer_blocks.{i}.{theirs}.{end}"] = f"{output_prefix}double_blocks.{i}.{ours}.{end}"
    for i in range(config.get("depth_single_blocks", 0)):
        for theirs, ours in _FLUX2_SINGLE.items():
            key_map[f"single_transformer_blocks.{i}.{theirs}.weight"] = \
                f"{output_prefix}single_blocks.{i}.{ours}.weight"
    return key_map


def z_image_to_diffusers(config, output_prefix=""):
    dim = config.get("dim", 0)
    key_map = {}
    blocks = [f"layers.{i}" for i in range(config.get("n_layers", 0))]
    blocks += [f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner")
               for i in range(config.get("n_refiner_layers", 2))]
    for block in blocks:
        ours = f"{output_prefix}{block}"
        for end in ("weight", "bias"):
            for n, letter in enumerate("qkv"):
                key_map[f"{block}.attention.to_{letter}.{end}"] = (f"{ours}.attention.qkv.{end}", (0, n * dim, dim))
        key_map[f"{block}.attention.to_out.0.weight"] = f"{ours}.attention.out.weight"
        for same in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0",
                     "adaLN_modulation.1"):
            key_map[f"{block}.{same}.weight"] = f"{ours}.{same}.weight"
    return key_map


_KREA2_BLOCK = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv", "attn.to_gate": "attn.gate",
                "attn.to_out.0": "attn.wo", "attn.to_out": "attn.wo", "ff.gate": "mlp.gate", "ff.up": "mlp.up",
                "ff.down": "mlp.down"}


def krea2_to_diffusers(config, output_prefix=""):
    blocks = [(f"transformer_blocks.{i}", f"blocks.{i}") for i in range(config.get("layers", 0))]
    blocks += [(f"text_fusion.{kind}.{i}", f"txtfusion.{kind}.{i}") for kind in ("layerwise_blocks", "refiner_blocks")
               for i in range(2)]
    return {f"{theirs}.{a}.weight": f"{output_prefix}{ours}.{b}.weight"
            for theirs, ours in blocks for a, b in _KREA2_BLOCK.items()}


def _under_prefixes(key_map, names, prefixes=("diffusion_model.", "transformer.", "lycoris_", "")):
    for k, to in names.items():
        if k.endswith(".weight"):
            name = k[: -len(".weight")]
            for prefix in prefixes:
                key_map[prefix + (name.replace(".", "_") if prefix == "lycoris_" else name)] = to


def model_lora_keys_unet(model, key_map={}):
    key_map = _forge.model_lora_keys_unet(model, key_map)
    name = model.config.huggingface_repo.lower()
    config = model.diffusion_model.config
    sd_keys = list(model.state_dict())
    if "flux" in name or "chroma" in name:
        _under_prefixes(key_map, flux_to_diffusers(config, output_prefix="diffusion_model."),
                        ("transformer.", "lycoris_", "lora_transformer_", ""))
        for k in sd_keys:
            if k.endswith(".weight") and ".linear1." in k:
                key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, config["hidden_size"] * 3))
    if "qwen" in name:
        for k in sd_keys:
            if k.startswith("diffusion_model.") and k.endswith(".weight"):
                path = k[len("diffusion_model."): -len(".weight")]
                key_map[path] = key_map[f"transformer.{path}"] = key_map[f"lycoris_{path.replace('.', '_')}"] = k
    if "lumina" in name or "z-image" in name:
        _under_prefixes(key_map, z_image_to_diffusers(config, output_prefix="diffusion_model."))
    if "krea-2" in name:
        _under_prefixes(key_map, krea2_to_diffusers(config, output_prefix="diffusion_model."))
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
