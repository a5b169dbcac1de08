# Fake of backend/patcher/base.py (Forge Neo 2.26: a port of ComfyUI v0.27.1's model_patcher.py, l.110-851).
# Kept: the store patches = {model_key: [(strength_patch, patch, strength_model, offset, function, online_mode), ...]}
# filled by add_patches(patches, strength_patch, strength_model, *, filename, online_mode) -- which accepts the file
# name and DROPS it, and gives the patcher a new patches_uuid; clone() copies each per-key list (the entries are
# shared), copies patches_uuid, copies model_options with utils.deepcopy_, sets parent and SHARES backup and
# object_patches_backup with the source; backup[key] = (weight, inplace_update), filled when a key is merged;
# patch_weight_to_device (merge on a copy in lora_compute_dtype, set back as a new Parameter); has_online_lora /
# use_online_lora read each entry's last field; LowVramPatch (the per-forward merge of online entries, reading the
# patcher's store when called); load() (modules already patched are skipped; every other module's weight functions
# are wiped, then online keys get a LowVramPatch -- and parameters_manual_cast, so the layer hands it a copy -- and
# the others are merged; records current_weight_patches_uuid);
# unpatch_model (backups written back and cleared, the uuid forgotten); partially_load (unpatch + load only when
# the model's current_weight_patches_uuid differs from the patcher's, else nothing when already loaded); detach.
# The model_options setters are the fake Forge's (the same in Neo).
# Simplified: full loads only (no low-VRAM offload, pinning or streams), no weight wrappers.
# Fake-only: model.merge_count counts the loads that merged patches (tests check for re-merge churn).
import collections
import uuid

import torch
from neo_overlay import forge_module

from backend import memory_management, utils
from backend.patcher.lora import merge_lora_to_weight

Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])
_Forge = forge_module("backend.patcher.base").ModelPatcher


class LowVramPatch:
    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key = key
        self.patches = patches
        self.convert_func = convert_func
        self.set_func = set_func

    def __call__(self, weight):
        return merge_lora_to_weight(self.patches[self.key], weight, self.key, computation_dtype=weight.dtype)


def wipe_lowvram_weight(m):
    if hasattr(m, "prev_parameters_manual_cast"):
        m.parameters_manual_cast = m.prev_parameters_manual_cast
        del m.prev_parameters_manual_cast
    if hasattr(m, "weight_function"):
        m.weight_function = []
    if hasattr(m, "bias_function"):
        m.bias_function = []


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, *, current_device=None,
                 weight_inplace_update=False):
        self.size = size
        self.model = model
        self.model.device = current_device
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        for name, value in (("model_loaded_weight_memory", 0), ("model_lowvram", False),
                            ("current_weight_patches_uuid", None), ("merge_count", 0)):
            if not hasattr(self.model, name):
                setattr(self.model, name, value)

    @property
    def current_device(self):
        return self.model.device

    def has_online_lora(self):
        return any(any(patch[-1] for patch in patches) for patches in self.patches.values())

    def use_online_lora(self, key):
        return any(patch[-1] for patch in self.patches.get(key, []))

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = memory_management.module_size(self.model)
        return self.size

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.model_size(),
                           current_device=self.current_device, weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: self.patches[k][:] for k in self.patches}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = utils.deepcopy_(self.model_options)
        n.parent = self
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        return n

    is_clone = _Forge.is_clone
    memory_required = _Forge.memory_required
    set_model_sampler_cfg_function = _Forge.set_model_sampler_cfg_function
    set_model_sampler_post_cfg_function = _Forge.set_model_sampler_post_cfg_function
    set_model_unet_function_wrapper = _Forge.set_model_unet_function_wrapper
    set_model_patch = _Forge.set_model_patch
    set_model_output_block_patch = _Forge.set_model_output_block_patch
    add_object_patch = _Forge.add_object_patch
    get_model_object = _Forge.get_model_object
    model_dtype = _Forge.model_dtype

    def model_patches_to(self, device):
        return

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset, function = None, None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                function = k[2] if len(k) > 2 else None
            if key in model_sd:
                p.add(k)
                current_patches = self.patches.get(key, [])
                current_patches.append((strength_patch, patches[k], strength_model, offset, function, online_mode))
                self.patches[key] = current_patches
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def patch_weight_to_device(self, key, device_to=None):
        weight = utils.get_attr(self.model, key)
        if key not in self.patches:
            return weight
        if key not in self.backup:
            self.backup[key] = Backup(weight.to(device=self.offload_device), False)
        temp_weight = weight.to(memory_management.lora_compute_dtype(device_to), copy=True)
        out_weight = merge_lora_to_weight(self.patches[key], temp_weight, key).to(weight.dtype)
        utils.set_attr(self.model, key, out_weight)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        merged = False
        for n, m in self.model.named_modules():
            params = dict(m.named_parameters(recurse=False))
            if not params or getattr(m, "forge_patched_weights", False):
                continue
            if hasattr(m, "parameters_manual_cast"):
                wipe_lowvram_weight(m)
            for param in params:
                key = f"{n}.{param}" if n else param
                if self.use_online_lora(key):
                    function = [LowVramPatch(key, self.patches)]
                    setattr(m, "weight_function" if param == "weight" else "bias_function", function)
                    if hasattr(m, "parameters_manual_cast"):
                        m.prev_parameters_manual_cast = m.parameters_manual_cast
                        m.parameters_manual_cast = True
                elif key in self.patches:
                    self.patch_weight_to_device(key, device_to=device_to)
                    merged = True
            m.forge_patched_weights = True
        self.model.model_lowvram = False
        self.model.model_loaded_weight_memory = self.model_size()
        self.model.current_weight_patches_uuid = self.patches_uuid
        self.model.merge_count += int(merged)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k in self.object_patches:
            old = utils.get_attr(self.model, k)
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
            utils.set_attr_raw(self.model, k, self.object_patches[k])
        if load_weights:
            self.load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights,
                      full_load=True)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for k, saved in self.backup.items():
                utils.set_attr(self.model, k, saved.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()
            self.model.model_loaded_weight_memory = 0
            for m in self.model.modules():
                if hasattr(m, "forge_patched_weights"):
                    del m.forge_patched_weights
        for k in list(self.object_patches_backup):
            utils.set_attr_raw(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup.clear()

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        current = self.model.current_weight_patches_uuid
        unpatch_weights = current is not None and (current != self.patches_uuid or force_patch_weights)
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch_weights)
        self.patch_model(load_weights=False)
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        self.load(device_to, lowvram_model_memory=extra_memory, force_patch_weights=force_patch_weights,
                  full_load=True)
        return self.model.model_loaded_weight_memory

    def detach(self, unpatch_all=True):
        self.model_patches_to(self.offload_device)
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model
