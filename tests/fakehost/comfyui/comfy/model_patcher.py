# Fake of comfy/model_patcher.py (ComfyUI 0.30.0), the classic ModelPatcher (what --cpu uses).
# Kept as the real one: `patches[key]` lists of (strength_patch, adapter, strength_model, offset, function); clones
# copy the lists and share the entries, the model, `backup` and `patches_uuid` (add_patches re-rolls it); `load`
# backs each patched weight up and merges in place; `partially_load` restores and re-merges only when the model's
# `current_weight_patches_uuid` differs; injections run after patching (`inject_model`) and before unpatching
# (`eject_model`), `is_injected` is copied by clone, `use_ejected` ejects around store edits; callbacks, wrappers
# and attachments copied by clone; `pre_run` / `cleanup` run ON_PRE_RUN / ON_CLEANUP.
# Simplified: one device (no lowvram, no pinning, no hooks from conds, no ModelPatcherDynamic).
import collections
import uuid

import torch

import comfy.lora
import comfy.utils
from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP  # noqa: F401


class AutoPatcherEjector:
    def __init__(self, model, skip_and_inject_on_exit_only=False):
        self.model = model
        self.was_injected = False
        self.prev_skip_injection = False
        self.skip_and_inject_on_exit_only = skip_and_inject_on_exit_only

    def __enter__(self):
        self.was_injected = False
        self.prev_skip_injection = self.model.skip_injection
        if self.skip_and_inject_on_exit_only:
            self.model.skip_injection = True
        if self.model.is_injected:
            self.model.eject_model()
            self.was_injected = True

    def __exit__(self, *args):
        if self.skip_and_inject_on_exit_only:
            self.model.skip_injection = self.prev_skip_injection
            self.model.inject_model()
        if self.was_injected and not self.model.skip_injection:
            self.model.inject_model()
        self.model.skip_injection = self.prev_skip_injection


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    functions = model_options.get("sampler_post_cfg_function", [])
    model_options["sampler_post_cfg_function"] = functions + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def create_model_options_clone(orig_model_options: dict):
    return comfy.patcher_extension.copy_nested_dicts(orig_model_options)


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
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
        self.attachments = {}
        self.additional_models = {}
        self.callbacks = CallbacksMP.init_callbacks()
        self.wrappers = WrappersMP.init_wrappers()
        self.is_injected = False
        self.skip_injection = False
        self.injections = {}
        if not hasattr(self.model, "current_weight_patches_uuid"):
            self.model.current_weight_patches_uuid = None
        if not hasattr(self.model, "model_loaded_weight_memory"):
            self.model.model_loaded_weight_memory = 0

    def model_size(self):
        if self.size == 0:
            self.size = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.model_size(),
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {}
        for k in self.patches:
            n.patches[k] = self.patches[k][:]
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = comfy.utils.deepcopy_list_dict(self.model_options)
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        for k in self.attachments:
            n.attachments[k] = self.attachments[k]
        for k, c in self.callbacks.items():
            n.callbacks[k] = {k1: c1.copy() for k1, c1 in c.items()}
        for k, w in self.wrappers.items():
            n.wrappers[k] = {k1: w1.copy() for k1, w1 in w.items()}
        n.is_injected = self.is_injected
        n.skip_injection = self.skip_injection
        for k, i in self.injections.items():
            n.injections[k] = i.copy()
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_post_cfg_function(self.model_options, post_cfg_function,
                                                                 disable_cfg1_optimization)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def model_dtype(self):
        return self.model.get_dtype()

    def model_patches_to(self, device):
        pass

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        with self.use_ejected():
            p = set()
            model_sd = self.model.state_dict()
            for k in patches:
                offset = None
                function = None
                if isinstance(k, str):
                    key = k
                else:
                    offset = k[1]
                    key = k[0]
                    if len(k) > 2:
                        function = k[2]
                if key in model_sd:
                    p.add(k)
                    current_patches = self.patches.get(key, [])
                    current_patches.append((strength_patch, patches[k], strength_model, offset, function))
                    self.patches[key] = current_patches
            self.patches_uuid = uuid.uuid4()
            return list(p)

    def model_state_dict(self):
        with self.use_ejected():
            return self.model.state_dict()

    def patch_weight_to_device(self, key, device_to=None):
        if key not in self.patches:
            return
        weight = comfy.utils.get_attr(self.model, key)
        if key not in self.backup:
            self.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(
                weight.to(device=self.offload_device, copy=self.weight_inplace_update), self.weight_inplace_update)
        temp_weight = weight.to(torch.float32, copy=True)
        out_weight = comfy.lora.calculate_weight(self.patches[key], temp_weight, key)
        out_weight = out_weight.to(weight.dtype)  # the real one rounds stochastically, seeded by the key
        if self.weight_inplace_update:
            comfy.utils.copy_to_param(self.model, key, out_weight)
        else:
            comfy.utils.set_attr_param(self.model, key, out_weight)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        with self.use_ejected():
            for key in sorted(self.patches):
                self.patch_weight_to_device(key, device_to)
            self.model.model_loaded_weight_memory = self.model_size()
            self.model.current_weight_patches_uuid = self.patches_uuid
            for callback in self.get_all_callbacks(CallbacksMP.ON_LOAD):
                callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        with self.use_ejected():
            for k in self.object_patches:
                old = comfy.utils.set_attr(self.model, k, self.object_patches[k])
                if k not in self.object_patches_backup:
                    self.object_patches_backup[k] = old
            if load_weights:
                self.load(device_to, lowvram_model_memory=lowvram_model_memory, full_load=True)
        self.inject_model()
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        self.eject_model()
        if unpatch_weights:
            for k in list(self.backup.keys()):
                bk = self.backup[k]
                if bk.inplace_update:
                    comfy.utils.copy_to_param(self.model, k, bk.weight)
                else:
                    comfy.utils.set_attr_param(self.model, k, bk.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()
            self.model.model_loaded_weight_memory = 0
        for k in list(self.object_patches_backup.keys()):
            comfy.utils.set_attr(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup.clear()

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            unpatch_weights = self.model.current_weight_patches_uuid is not None and (
                self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights)
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_weights)
            self.patch_model(load_weights=False)
            if self.model.model_loaded_weight_memory > 0:
                return 0
            self.load(device_to, full_load=True)
            return self.model.model_loaded_weight_memory

    def detach(self, unpatch_all=True):
        self.eject_model()
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        for callback in self.get_all_callbacks(CallbacksMP.ON_DETACH):
            callback(self, unpatch_all)
        return self.model

    def current_loaded_device(self):
        return self.load_device

    def cleanup(self):
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            callback(self)

    def add_callback_with_key(self, call_type: str, key: str, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def get_all_callbacks(self, call_type: str):
        found = []
        for listed in self.callbacks.get(call_type, {}).values():
            found.extend(listed)
        return found

    def add_wrapper_with_key(self, wrapper_type: str, key: str, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def get_all_wrappers(self, wrapper_type: str):
        found = []
        for listed in self.wrappers.get(wrapper_type, {}).values():
            found.extend(listed)
        return found

    def set_attachments(self, key: str, attachment):
        self.attachments[key] = attachment

    def get_attachment(self, key: str):
        return self.attachments.get(key, None)

    def set_injections(self, key: str, injections: list):
        self.injections[key] = injections

    def get_injections(self, key: str):
        return self.injections.get(key, None)

    def get_nested_additional_models(self):
        return []

    def use_ejected(self, skip_and_inject_on_exit_only=False):
        return AutoPatcherEjector(self, skip_and_inject_on_exit_only=skip_and_inject_on_exit_only)

    def inject_model(self):
        if self.is_injected or self.skip_injection:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.inject(self)
                self.is_injected = True
        if self.is_injected:
            for callback in self.get_all_callbacks(CallbacksMP.ON_INJECT_MODEL):
                callback(self)

    def eject_model(self):
        if not self.is_injected:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.eject(self)
        self.is_injected = False
        for callback in self.get_all_callbacks(CallbacksMP.ON_EJECT_MODEL):
            callback(self)

    def pre_run(self):
        for callback in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            callback(self)
