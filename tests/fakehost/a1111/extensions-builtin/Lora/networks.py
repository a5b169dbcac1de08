# Follows extensions-builtin/Lora/networks.py of AUTOMATIC1111 v1.10.1 (82a973c0): module-global state
# (loaded_networks mutated in place, networks_in_memory looked up by global name), assign_network_names_to_compvis_modules,
# load_network (key conversion, NetworkWeights grouping, module types in order, unmatched keys logged at debug
# level), load_networks (reuse from loaded_networks, then networks_in_memory with an mtime check, multipliers
# overwritten, "Lora not found" comment, purge to lora_in_memory_limit), the weight-merge path
# network_apply_weights with CPU backups, the (name, te, unet, dyn) cache-key tuple and the inpainting-conv
# padding, the functional path
# network_forward, and the patched Linear/Conv2d/GroupNorm/LayerNorm forwards installed by lora_patches.
# Simplified: the kohya -> compvis key conversion uses tests/data/sd15-unet-lora-layers-trimmed.tsv instead of the
# regexes (same results for those keys); module types lora, hada, full and norm only; no MultiheadAttention
# patches, bundled embeddings, fp8 or SD3 paths.
from __future__ import annotations

import csv
import logging
import os
import re

import lora_patches  # noqa: F401 - imported first by the real file too
import network
import network_full
import network_hada
import network_lora
import network_norm
import torch

from modules import devices, sd_hijack, sd_models, shared

module_types = [network_lora.ModuleTypeLora(), network_hada.ModuleTypeHada(), network_full.ModuleTypeFull(),
                network_norm.ModuleTypeNorm()]

_TABLE = os.path.join(os.path.dirname(__file__), *[".."] * 4, "data", "sd15-unet-lora-layers-trimmed.tsv")
re_te = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_(.+)$")


def _kohya_to_compvis():
    with open(os.path.realpath(_TABLE), encoding="utf8") as f:
        return {row["kohya_key"]: row["a1111_layer_name"] for row in csv.DictReader(f, delimiter="\t")}


kohya_to_compvis = _kohya_to_compvis()


def convert_diffusers_name_to_compvis(key, is_sd2):
    if key in kohya_to_compvis:
        return kohya_to_compvis[key]
    m = re_te.match(key)
    if m:
        return f"transformer_text_model_encoder_layers_{m.group(1)}_{m.group(2)}"
    return key


def assign_network_names_to_compvis_modules(sd_model):
    network_layer_mapping = {}
    cond_stage_model = getattr(shared.sd_model.cond_stage_model, "wrapped", shared.sd_model.cond_stage_model)
    for name, module in cond_stage_model.named_modules():
        network_name = name.replace(".", "_")
        network_layer_mapping[network_name] = module
        module.network_layer_name = network_name
    for name, module in shared.sd_model.model.named_modules():
        network_name = name.replace(".", "_")
        network_layer_mapping[network_name] = module
        module.network_layer_name = network_name
    sd_model.network_layer_mapping = network_layer_mapping


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = sd_models.read_state_dict(network_on_disk.filename)
    if not hasattr(shared.sd_model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(shared.sd_model)

    keys_failed_to_match = {}
    matched_networks = {}
    for key_network, weight in sd.items():
        key_network_without_network_parts, _, network_part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(key_network_without_network_parts, False)
        sd_module = shared.sd_model.network_layer_mapping.get(key, None)
        if sd_module is None and "lora_unet" in key_network_without_network_parts:
            key = key_network_without_network_parts.replace("lora_unet", "diffusion_model")
            sd_module = shared.sd_model.network_layer_mapping.get(key, None)
        if sd_module is None:
            keys_failed_to_match[key_network] = key
            continue
        if key not in matched_networks:
            matched_networks[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)
        matched_networks[key].w[network_part] = weight

    for key, weights in matched_networks.items():
        net_module = None
        for nettype in module_types:
            net_module = nettype.create_module(net, weights)
            if net_module is not None:
                break
        if net_module is None:
            raise AssertionError(f"Could not find a module type (out of {', '.join(x.__class__.__name__ for x in module_types)}) "
                                 f"that would accept those keys: {', '.join(weights.w)}")
        net.modules[key] = net_module

    if keys_failed_to_match:
        logging.debug(f"Network {network_on_disk.filename} didn't match keys: {keys_failed_to_match}")
    return net


def purge_networks_from_memory():
    while len(networks_in_memory) > shared.opts.lora_in_memory_limit and len(networks_in_memory) > 0:
        networks_in_memory.pop(next(iter(networks_in_memory)), None)
    devices.torch_gc()


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {}
    for net in loaded_networks:
        if net.name in names:
            already_loaded[net.name] = net
    loaded_networks.clear()

    networks_on_disk = [available_network_aliases.get(name, None) for name in names]
    if any(x is None for x in networks_on_disk):
        list_available_networks()
        networks_on_disk = [available_network_aliases.get(name, None) for name in names]

    failed_to_load_networks = []
    for i, (network_on_disk, name) in enumerate(zip(networks_on_disk, names)):
        net = already_loaded.get(name, None)
        if network_on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)
            if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                try:
                    net = load_network(name, network_on_disk)
                    networks_in_memory.pop(name, None)
                    networks_in_memory[name] = net
                except Exception as e:
                    from modules import errors

                    errors.display(e, f"loading network {network_on_disk.filename}")
                    continue
            net.mentioned_name = name
            network_on_disk.read_hash()
        if net is None:
            failed_to_load_networks.append(name)
            logging.info(f"Couldn't find network with name {name}")
            continue
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)

    if failed_to_load_networks:
        message = f'Lora not found: {", ".join(failed_to_load_networks)}'
        sd_hijack.model_hijack.comments.append(message)
        if shared.opts.lora_not_found_warning_console:
            print(f"\n{message}\n")
    purge_networks_from_memory()


def allowed_layer_without_weight(layer):
    return isinstance(layer, torch.nn.LayerNorm) and not layer.elementwise_affine


def store_weights_backup(weight):
    if weight is None:
        return None
    return weight.to(devices.cpu, copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        restore_weights_backup(self, "weight", weights_backup)
    restore_weights_backup(self, "bias", bias_backup)


def network_apply_weights(self):
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)

    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != () and not allowed_layer_without_weight(self):
            raise RuntimeError(f"{network_layer_name} - no backup weights found and current weights are not unchanged")
        weights_backup = store_weights_backup(self.weight)
        self.network_weights_backup = weights_backup

    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        bias_backup = store_weights_backup(self.bias) if getattr(self, "bias", None) is not None else None
        if bias_backup is not None and current_names != ():
            raise RuntimeError("no backup bias found and current bias are not unchanged")
        self.network_bias_backup = bias_backup

    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(network_layer_name, None)
            if module is not None and hasattr(self, "weight"):
                try:
                    with torch.no_grad():
                        weight, bias = self.weight, self.bias
                        updown, ex_bias = module.calc_updown(weight)
                        if len(weight.shape) == 4 and weight.shape[1] == 9:
                            # an inpainting model's first conv: the update gets zero channels 4 -> 9
                            updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))
                        self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
                        if ex_bias is not None and hasattr(self, "bias"):
                            if self.bias is None:
                                self.bias = torch.nn.Parameter(ex_bias).to(self.weight.dtype)
                            else:
                                self.bias.copy_((bias + ex_bias).to(dtype=self.bias.dtype))
                except RuntimeError as e:
                    logging.debug(f"Network {net.name} layer {network_layer_name}: {e}")
                    extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
        self.network_current_names = wanted_names


def network_forward(org_module, input, original_forward):
    if len(loaded_networks) == 0:
        return original_forward(org_module, input)
    input = devices.cond_cast_unet(input)
    network_restore_weights_from_backup(org_module)
    network_reset_cached_weight(org_module)
    y = original_forward(org_module, input)
    network_layer_name = getattr(org_module, "network_layer_name", None)
    for lora in loaded_networks:
        module = lora.modules.get(network_layer_name, None)
        if module is None:
            continue
        y = module.forward(input, y)
    return y


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def network_Linear_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.Linear_forward)
    network_apply_weights(self)
    return originals.Linear_forward(self, input)


def network_Linear_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.Linear_load_state_dict(self, *args, **kwargs)


def network_Conv2d_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.Conv2d_forward)
    network_apply_weights(self)
    return originals.Conv2d_forward(self, input)


def network_Conv2d_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.Conv2d_load_state_dict(self, *args, **kwargs)


def network_GroupNorm_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.GroupNorm_forward)
    network_apply_weights(self)
    return originals.GroupNorm_forward(self, input)


def network_GroupNorm_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.GroupNorm_load_state_dict(self, *args, **kwargs)


def network_LayerNorm_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.LayerNorm_forward)
    network_apply_weights(self)
    return originals.LayerNorm_forward(self, input)


def network_LayerNorm_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.LayerNorm_load_state_dict(self, *args, **kwargs)


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    lora_dir = shared.cmd_opts.lora_dir
    if not lora_dir or not os.path.isdir(lora_dir):
        return
    for filename in sorted(os.listdir(lora_dir)):
        if os.path.splitext(filename)[1].lower() not in (".safetensors", ".pt", ".ckpt"):
            continue
        name = os.path.splitext(filename)[0]
        entry = network.NetworkOnDisk(name, os.path.join(lora_dir, filename))
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


originals = None
extra_network_lora = None
available_networks = {}
available_network_aliases = {}
loaded_networks = []
loaded_bundle_embeddings = {}
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}
