# Fake of extensions-builtin/sd_forge_lora/networks.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: load_networks (empty Network shells in loaded_networks, online mode forced off for fp32/fp16/bf16 UNets,
# the compiled_lora_targets hash and its early return, starting again from forge_objects_original,
# forge_objects_after_applying_lora = forge_objects.shallow_copy()), load_lora_for_models (key maps, >12
# unmatched keys skip the LoRA, clone + add_patches with strength_patch = unet multiplier), the lru_cache(5)
# around load_lora_state_dict (tensors shared between loads). Simplified: no hash lookup tables, no bundled
# embeddings, no forbidden aliases.
import functools
import os

import network
import torch

from backend.args import dynamic_args
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.utils import load_torch_file
from modules import sd_models, shared


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename='default', online_mode=False):
    unet_keys = model_lora_keys_unet(model.model) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}

    lora_unet, lora_unmatch = load_lora(lora, unet_keys)
    lora_clip, lora_unmatch = load_lora(lora_unmatch, clip_keys)

    if len(lora_unmatch) > 12:
        print(f'[LORA] LoRA version mismatch for {type(model.model).__name__}: {filename}')
        return model, clip

    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None

    if new_model is not None and len(lora_unet) > 0:
        loaded_keys = new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model,
                                            online_mode=online_mode)
        skipped_keys = [item for item in lora_unet if item not in loaded_keys]
        if len(skipped_keys) <= 12:
            model = new_model

    if new_clip is not None and len(lora_clip) > 0:
        new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode)
        clip = new_clip

    return model, clip


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    return load_torch_file(filename, safe_load=True)


def load_network(name, network_on_disk):
    return network.Network(name, network_on_disk)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return

    loaded_networks.clear()

    if any(available_network_aliases.get(name) is None for name in names):
        list_available_networks()
    networks_on_disk = [available_network_aliases.get(name, None) for name in names]

    for network_on_disk, name in zip(networks_on_disk, names):
        if network_on_disk is None:
            print(f"Network {name} not found")
            continue
        net = load_network(name, network_on_disk)
        net.mentioned_name = name
        network_on_disk.read_hash()
        loaded_networks.append(net)

    online_mode = dynamic_args.get('online_lora', False)
    if current_sd.forge_objects.unet.model.storage_dtype in [torch.float32, torch.float16, torch.bfloat16]:
        online_mode = False

    compiled_lora_targets = []
    for a, b, c in zip(networks_on_disk, unet_multipliers, te_multipliers):
        if a is not None:
            compiled_lora_targets.append([a.filename, b, c, online_mode])

    compiled_lora_targets_hash = str(compiled_lora_targets)
    if current_sd.current_lora_hash == compiled_lora_targets_hash:
        return

    current_sd.current_lora_hash = compiled_lora_targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip

    for filename, strength_model, strength_clip, online_mode in compiled_lora_targets:
        lora_sd = load_lora_state_dict(filename)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename=filename, online_mode=online_mode)

    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    if not shared.cmd_opts.lora_dir or not os.path.isdir(shared.cmd_opts.lora_dir):
        return
    for fn in sorted(os.listdir(shared.cmd_opts.lora_dir)):
        if not fn.endswith((".safetensors", ".pt", ".ckpt")):
            continue
        name = os.path.splitext(fn)[0]
        entry = network.NetworkOnDisk(name, os.path.join(shared.cmd_opts.lora_dir, fn))
        available_networks[name] = entry
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


available_networks = {}
available_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
