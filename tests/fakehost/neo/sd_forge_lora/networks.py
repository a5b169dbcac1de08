# Fake of extensions-builtin/sd_forge_lora/networks.py (Forge Neo 2.26).
# Kept: load_lora_state_dict is NOT cached (a fresh state dict per load); load_lora_for_models(model, clip, lora,
# strength_model, strength_clip, filename, online_mode) -- key maps, UNet then CLIP keys, the LoRA skipped when more
# than half of its keys match nothing, clone + add_patches(filename=..., ...) (which Neo's patcher drops), the clone
# kept unless more than a quarter of the UNet keys were skipped; load_networks(names, te_multipliers,
# unet_multipliers) -- no dyn_dims --, with Network shells in loaded_networks, online_mode from
# dynamic_args.online_lora, the compiled_lora_targets hash and its early return, a fresh start from
# forge_objects_original, load_lora_for_models looked up as a module global per file, and
# forge_objects_after_applying_lora = forge_objects.shallow_copy(); with dynamic_args.nunchaku (an SVDQ model) no
# patches at all: the file name and strength are appended to the diffusion model's `loras` list (cleared before the
# files are loaded), which Nunchaku composes into its quantised weights. Simplified: no Anima special case, one LoRA
# folder, no hash lookup table.
import functools
import os

import network

from backend.args import dynamic_args
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.utils import load_torch_file
from modules import sd_models, shared

load_lora_state_dict = functools.partial(load_torch_file, safe_load=True)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
    if dynamic_args.nunchaku:
        model.model.diffusion_model.loras.append((filename, strength_model))
        return model, clip
    unet_keys = model_lora_keys_unet(model.model) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}

    lora_unet, lora_unmatch = load_lora(lora, unet_keys)
    lora_clip, lora_unmatch = load_lora(lora_unmatch, clip_keys)
    if len(lora_unmatch) / len(lora) > 0.5:
        print(f"[LORA] LoRA mismatch for {type(model.model).__name__}: {filename}")
        return model, clip

    if model is not None and len(lora_unet) > 0:
        new_model = model.clone()
        loaded_keys = new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model,
                                            online_mode=online_mode)
        skipped_keys = [item for item in lora_unet if item not in loaded_keys]
        if len(skipped_keys) / len(lora_unet) <= 0.25:
            model = new_model

    if clip is not None and len(lora_clip) > 0:
        new_clip = clip.clone()
        new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode)
        clip = new_clip

    return model, clip


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None):
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return

    loaded_networks.clear()
    networks_on_disk = [available_network_aliases.get(name) for name in names]
    if any(x is None for x in networks_on_disk):
        list_available_networks()
        networks_on_disk = [available_network_aliases.get(name) for name in names]

    for network_on_disk, name in zip(networks_on_disk, names):
        if network_on_disk is None:
            print(f'Failed to load LoRA: "{name}"')
            continue
        net = load_network(name, network_on_disk)
        net.mentioned_name = name
        network_on_disk.read_hash()
        loaded_networks.append(net)

    online_mode = dynamic_args.online_lora or False
    compiled_lora_targets = [[n.filename, u, t, online_mode]
                             for n, u, t in zip(networks_on_disk, unet_multipliers, te_multipliers) if n is not None]

    compiled_lora_targets_hash = str(compiled_lora_targets)
    if current_sd.current_lora_hash == compiled_lora_targets_hash:
        return

    current_sd.current_lora_hash = compiled_lora_targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    if dynamic_args.nunchaku:
        current_sd.forge_objects.unet.model.diffusion_model.loras.clear()

    for filename, strength_model, strength_clip, online_mode in compiled_lora_targets:
        lora_sd = load_lora_state_dict(filename)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename=filename, online_mode=online_mode)

    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    folder = shared.cmd_opts.lora_dir
    names = sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else []
    for filename in (os.path.join(folder, n) for n in names if n.endswith((".pt", ".ckpt", ".safetensors"))):
        entry = network.NetworkOnDisk(os.path.splitext(os.path.basename(filename))[0], filename)
        available_networks[entry.name] = entry
        available_network_aliases[entry.name] = entry
        available_network_aliases[entry.alias] = entry


available_networks = {}
available_network_aliases = {}
loaded_networks = []
