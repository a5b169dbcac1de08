# Fake of comfy/lora.py (ComfyUI 0.30.0): load_lora, the key maps, calculate_weight.
# Kept as the real one: load_lora returns {model key or (model key, (dim, start, length)): adapter or ("diff",
# (tensor,))}, trying every weight adapter class per LoRA prefix, then w_norm/b_norm/diff/diff_b; the UNet key map
# gives kohya names (lora_unet_<path with _>) and the generic names (<model key without .weight>) for every
# diffusion_model weight, and for Flux the diffusers names of q, k, v and the MLP input as slices (offsets) of the
# fused qkv and linear1 weights (comfy.utils.flux_to_diffusers); calculate_weight narrows the weight to an entry's
# offset, scales it by strength_model, and lets the adapter or the diff add itself.
# Simplified: the CLIP map knows one text encoder (lora_te_ names), no SDXL/SD3/Lumina/Qwen/WAN maps.
import torch

import comfy.model_base
from comfy import weight_adapter


def load_lora(lora, to_load, log_missing=True):
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
        target = to_load[x]
        weight_key = target[0] if isinstance(target, tuple) else target
        bias_key = weight_key[: -len(".weight")] + ".bias"
        for name, key in ((f"{x}.w_norm", target), (f"{x}.b_norm", bias_key), (f"{x}.diff", target),
                          (f"{x}.diff_b", bias_key)):
            if name in lora:
                patch_dict[key] = ("diff", (lora[name],))
                loaded_keys.add(name)
    return patch_dict


def model_lora_keys_clip(model, key_map={}):
    for k in model.state_dict():
        if k.startswith("transformer.") and k.endswith(".weight"):
            key_map["lora_te_" + k[len("transformer."):-len(".weight")].replace(".", "_")] = k
    return key_map


def model_lora_keys_unet(model, key_map={}):
    sd = model.state_dict()
    for k in sd:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
                key_map[k[: -len(".weight")]] = k
            else:
                key_map[k] = k
    if isinstance(model, comfy.model_base.Flux):
        hidden = model.diffusion_model.hidden_size
        for k, to in flux_to_diffusers(model.diffusion_model, hidden).items():
            key_map["transformer." + k] = to
            key_map["lora_transformer_" + k.replace(".", "_")] = to
    return key_map


def flux_to_diffusers(diffusion_model, hidden):
    """comfy.utils.flux_to_diffusers for the blocks the tiny Flux has: diffusers name -> (model key, offset)."""
    found = {}
    for i in range(len(diffusion_model.double_blocks)):
        qkv = f"diffusion_model.double_blocks.{i}.img_attn.qkv.weight"
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            found[f"transformer_blocks.{i}.attn.{name}"] = (qkv, (0, j * hidden, hidden))
        found[f"transformer_blocks.{i}.attn.to_out.0"] = f"diffusion_model.double_blocks.{i}.img_attn.proj.weight"
    for i in range(len(diffusion_model.single_blocks)):
        linear1 = f"diffusion_model.single_blocks.{i}.linear1.weight"
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            found[f"single_transformer_blocks.{i}.attn.{name}"] = (linear1, (0, j * hidden, hidden))
        mlp = diffusion_model.single_blocks[i].linear1.out_features - 3 * hidden
        found[f"single_transformer_blocks.{i}.proj_mlp"] = (linear1, (0, 3 * hidden, mlp))
        found[f"single_transformer_blocks.{i}.proj_out"] = f"diffusion_model.single_blocks.{i}.linear2.weight"
    return found


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for p in patches:
        strength, v, strength_model, offset, function = p[0], p[1], p[2], p[3], p[4]
        if function is None:
            function = lambda a: a  # noqa: E731
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            output = v.calculate_weight(weight, key, strength, strength_model, offset, function, intermediate_dtype,
                                        original_weights)
            if output is not None:
                weight = output
                if old_weight is not None:
                    weight = old_weight
            continue
        patch_type, v = (v[0], v[1]) if len(v) == 2 else ("diff", v)
        if patch_type == "diff":
            diff = v[0]
            if strength != 0.0 and diff.shape == weight.shape:
                weight += function(strength * diff.to(weight.device, weight.dtype))
        elif patch_type == "set":
            weight.copy_(v[0])
        if old_weight is not None:
            weight = old_weight
    return weight
