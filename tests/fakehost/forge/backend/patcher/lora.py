# Fake of backend/patcher/lora.py + packages_3rdparty/comfyui_lora_collection/lora.py
# (stable-diffusion-webui-forge dfdcbab6).
# Kept: the patch tuples load_lora produces ("lora", (up, down, alpha, mid, dora_scale)) from kohya
# (lora_up / lora_down) and diffusers / peft (lora_B / lora_A) names, ("loha", ...), ("lokr", ...), ("diff", (w,)) for
# diff and LyCORIS w_norm (b_norm / diff_b on the bias); model_lora_keys_unet's rules: every diffusion_model weight
# under lora_unet_<path> and its own path (kohya and BFL names of Flux), and for a model whose repo names Flux the
# diffusers names of comfyui_lora_collection/utils.py flux_to_diffusers under transformer. / lycoris_ /
# lora_transformer_ prefixes -- q, k, v (to_q, add_k_proj, ...) and proj_mlp map to (fused key, (0, start, length))
# slices of img_attn.qkv, txt_attn.qkv and linear1, norm_out.linear to the final adaLN with a scale/shift swap --;
# merge_lora_to_weight's maths (fp32 on a copy, each patch narrowed to its offset, strength * alpha / rank, Tucker
# mid folded into down, DoRA through weight_decompose, the patch's function on the delta); LoraLoader.refresh
# comparing only the key list, restoring the backed-up Parameters and writing merged weights as NEW Parameters;
# the mutable default key_map={} of the key-map functions; GGUF weights dequantized for the merge and quantized
# again into the same parameter. Simplified: no glora/set patch types or BFL control LoRAs in load_lora, no bnb, SD
# 1.5 diffusers names come from tests/data/forge_sd15_unet_layers.tsv instead of
# unet_to_diffusers.
import csv
from pathlib import Path

import torch

from backend import memory_management, utils

_LAYER_TABLE = Path(__file__).resolve().parents[4] / "data" / "forge_sd15_unet_layers.tsv"


def _diffusers_names():
    with open(_LAYER_TABLE, encoding="utf-8") as f:
        rows = csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t")
        return {row["kohya_key"]: row["forge_weight_key"] for row in rows}


def model_lora_keys_clip(model, key_map={}):
    return key_map


def _swap_scale_shift(weight):
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


# Flux blocks: diffusers' name -> the model's, per weight and bias.
_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "norm1.linear": "img_mod.lin",
                "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_FLUX_BASIC = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}


def flux_to_diffusers(config, output_prefix=""):
    """diffusers' Flux names -> the model key, or (fused model key, (0, start, length)) for a slice of a fused layer,
    or (model key, None, function) for a patch the merge transforms."""
    hidden = config.get("hidden_size", 0)
    key_map = {}
    for end in ("weight", "bias"):
        for i in range(config.get("depth", 0)):
            ours, theirs = f"{output_prefix}double_blocks.{i}", f"transformer_blocks.{i}"
            for n, letter in enumerate("qkv"):
                key_map[f"{theirs}.attn.to_{letter}.{end}"] = (f"{ours}.img_attn.qkv.{end}", (0, n * hidden, hidden))
                key_map[f"{theirs}.attn.add_{letter}_proj.{end}"] = (f"{ours}.txt_attn.qkv.{end}",
                                                                       (0, n * hidden, hidden))
            key_map.update({f"{theirs}.{a}.{end}": f"{ours}.{b}.{end}" for a, b in _FLUX_DOUBLE.items()})
        for i in range(config.get("depth_single_blocks", 0)):
            ours, theirs = f"{output_prefix}single_blocks.{i}", f"single_transformer_blocks.{i}"
            for n, letter in enumerate("qkv"):
                key_map[f"{theirs}.attn.to_{letter}.{end}"] = (f"{ours}.linear1.{end}", (0, n * hidden, hidden))
            key_map[f"{theirs}.proj_mlp.{end}"] = (f"{ours}.linear1.{end}", (0, 3 * hidden, 4 * hidden))
            key_map.update({f"{theirs}.{a}.{end}": f"{ours}.{b}.{end}" for a, b in _FLUX_SINGLE.items()})
        key_map.update({f"{a}.{end}": f"{output_prefix}{b}.{end}" for a, b in _FLUX_BASIC.items()})
        key_map[f"norm_out.linear.{end}"] = (f"{output_prefix}final_layer.adaLN_modulation.1.{end}", None,
                                             _swap_scale_shift)
    return key_map


def model_lora_keys_unet(model, key_map={}):
    sd = model.state_dict()
    for k in sd.keys():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
            key_map["lora_unet_{}".format(key_lora)] = k
            key_map["{}".format(k[:-len(".weight")])] = k
        else:
            key_map[k] = k
    for kohya, k in _diffusers_names().items():
        if k in sd:
            key_map[kohya] = k
            key_map["lycoris_" + kohya[len("lora_unet_"):]] = k
    if "flux" in model.config.huggingface_repo.lower():
        for k, to in flux_to_diffusers(model.diffusion_model.config, output_prefix="diffusion_model.").items():
            if k.endswith(".weight"):
                name = k[:-len(".weight")]
                key_map["transformer.{}".format(name)] = to
                key_map["lycoris_{}".format(name.replace(".", "_"))] = to
                key_map["lora_transformer_{}".format(name.replace(".", "_"))] = to
    return key_map


def load_lora(lora, to_load):
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        alpha_name = "{}.alpha".format(x)
        alpha = None
        if alpha_name in lora.keys():
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)

        dora_scale_name = "{}.dora_scale".format(x)
        dora_scale = None
        if dora_scale_name in lora.keys():
            dora_scale = lora[dora_scale_name]
            loaded_keys.add(dora_scale_name)

        A_name = "{}.lora_up.weight".format(x)
        B_name = "{}.lora_down.weight".format(x)
        mid_name = "{}.lora_mid.weight".format(x)
        if "{}.lora_B.weight".format(x) in lora.keys():
            A_name, B_name, mid_name = "{}.lora_B.weight".format(x), "{}.lora_A.weight".format(x), None
        if A_name in lora.keys():
            mid = None
            if mid_name is not None and mid_name in lora.keys():
                mid = lora[mid_name]
                loaded_keys.add(mid_name)
            patch_dict[to_load[x]] = ("lora", (lora[A_name], lora[B_name], alpha, mid, dora_scale))
            loaded_keys.add(A_name)
            loaded_keys.add(B_name)

        hada_w1_a_name = "{}.hada_w1_a".format(x)
        if hada_w1_a_name in lora.keys():
            names = ["{}.hada_w1_a", "{}.hada_w1_b", "{}.hada_w2_a", "{}.hada_w2_b"]
            w1a, w1b, w2a, w2b = (lora[n.format(x)] for n in names)
            patch_dict[to_load[x]] = ("loha", (w1a, w1b, alpha, w2a, w2b, None, None, dora_scale))
            loaded_keys.update(n.format(x) for n in names)

        lokr_w1_name = "{}.lokr_w1".format(x)
        if lokr_w1_name in lora.keys():
            w1 = lora[lokr_w1_name]
            w2 = lora["{}.lokr_w2".format(x)]
            loaded_keys.update((lokr_w1_name, "{}.lokr_w2".format(x)))
            patch_dict[to_load[x]] = ("lokr", (w1, w2, alpha, None, None, None, None, None, dora_scale))

        w_norm_name = "{}.w_norm".format(x)
        b_norm_name = "{}.b_norm".format(x)
        w_norm = lora.get(w_norm_name, None)
        b_norm = lora.get(b_norm_name, None)
        if w_norm is not None:
            loaded_keys.add(w_norm_name)
            patch_dict[to_load[x]] = ("diff", (w_norm,))
            if b_norm is not None:
                loaded_keys.add(b_norm_name)
                patch_dict["{}.bias".format(to_load[x][:-len(".weight")])] = ("diff", (b_norm,))

        diff_name = "{}.diff".format(x)
        if diff_name in lora.keys():
            patch_dict[to_load[x]] = ("diff", (lora[diff_name],))
            loaded_keys.add(diff_name)

        diff_bias_name = "{}.diff_b".format(x)
        if diff_bias_name in lora.keys():
            patch_dict["{}.bias".format(to_load[x][:-len(".weight")])] = ("diff", (lora[diff_bias_name],))
            loaded_keys.add(diff_bias_name)

    remaining_dict = {x: y for x, y in lora.items() if x not in loaded_keys}
    return patch_dict, remaining_dict


@torch.inference_mode()
def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function):
    dora_scale = memory_management.cast_to_device(dora_scale, weight.device, computation_dtype)
    lora_diff *= alpha
    weight_calc = weight + function(lora_diff).type(weight.dtype)
    weight_norm = (
        weight_calc.transpose(0, 1)
        .reshape(weight_calc.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
        .transpose(0, 1)
    )
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


def _cast(t, weight, dtype):
    return memory_management.cast_to_device(t, weight.device, dtype)


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight_dtype_backup = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        weight_dtype_backup = weight.dtype
        weight = weight.to(dtype=computation_dtype)

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

        patch_type = "diff" if len(v) == 1 else v[0]
        if len(v) == 2:
            v = v[1]

        if patch_type == "diff":
            if strength != 0.0:
                weight += strength * _cast(v[0], weight, weight.dtype)
        elif patch_type == "lora":
            mat1 = _cast(v[0], weight, computation_dtype)
            mat2 = _cast(v[1], weight, computation_dtype)
            dora_scale = v[4]
            alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
            if v[3] is not None:
                mat3 = _cast(v[3], weight, computation_dtype)
                final_shape = [mat2.shape[1], mat2.shape[0], mat3.shape[2], mat3.shape[3]]
                mat2 = torch.mm(mat2.transpose(0, 1).flatten(start_dim=1),
                                mat3.transpose(0, 1).flatten(start_dim=1)).reshape(final_shape).transpose(0, 1)
            lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
            if dora_scale is not None:
                weight = weight_decompose(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function)
            else:
                weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
        elif patch_type == "lokr":
            w1 = _cast(v[0], weight, computation_dtype)
            w2 = _cast(v[1], weight, computation_dtype)
            if len(w2.shape) == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            lora_diff = torch.kron(w1, w2).reshape(weight.shape)
            weight += function((strength * 1.0 * lora_diff).type(weight.dtype))
        elif patch_type == "loha":
            w1a, w1b, w2a, w2b = v[0], v[1], v[3], v[4]
            alpha = v[2] / w1b.shape[0] if v[2] is not None else 1.0
            m1 = torch.mm(_cast(w1a, weight, computation_dtype), _cast(w1b, weight, computation_dtype))
            m2 = torch.mm(_cast(w2a, weight, computation_dtype), _cast(w2b, weight, computation_dtype))
            lora_diff = (m1 * m2).reshape(weight.shape)
            weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
        else:
            print("patch type not recognized {} {}".format(patch_type, key))

        if old_weight is not None:
            weight = old_weight

    if weight_dtype_backup is not None:
        weight = weight.to(dtype=weight_dtype_backup)
    return weight


def get_parameter_devices(model):
    return {key: p.device for key, p in model.named_parameters()}


def set_parameter_devices(model, parameter_devices):
    for key, device in parameter_devices.items():
        p = utils.get_attr(model, key)
        if p.device != device:
            utils.set_attr_raw(model, key, utils.tensor2parameter(p.to(device=device)))
    return model


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.merge_count = 0   # fake-only: how many full re-merges happened (tests check for churn)

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device('cpu'), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return

        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current_patches in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current_patches

        parameter_devices = get_parameter_devices(self.model)

        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []

        for k, w in self.backup.items():
            if not isinstance(w, torch.nn.Parameter):
                w = torch.nn.Parameter(w, requires_grad=False)
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}

        set_parameter_devices(self.model, parameter_devices=parameter_devices)

        for (key, online_mode), current_patches in all_patches.items():
            try:
                parent_layer, child_key, weight = utils.get_attr_with_parent(self.model, key)
                assert isinstance(weight, torch.nn.Parameter)
            except Exception:
                raise ValueError(f"Wrong LoRA Key: {key}")

            if online_mode:
                if not hasattr(parent_layer, 'forge_online_loras'):
                    parent_layer.forge_online_loras = {}
                parent_layer.forge_online_loras[child_key] = current_patches
                self.online_backup.append(parent_layer)
                continue

            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)

            gguf_cls = getattr(weight, 'gguf_cls', None)
            gguf_parameter = None
            if gguf_cls is not None:
                gguf_parameter = weight
                from backend.operations_gguf import dequantize_tensor
                weight = dequantize_tensor(weight)

            weight = merge_lora_to_weight(current_patches, weight, key, computation_dtype=torch.float32)

            if gguf_cls is not None:
                gguf_cls.quantize_pytorch(weight, gguf_parameter)
                continue

            utils.set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))

        set_parameter_devices(self.model, parameter_devices=parameter_devices)
        self.loaded_hash = hashes
        self.merge_count += 1


from backend import operations  # noqa: E402,F401 - the real module imports it here too (circular import)
