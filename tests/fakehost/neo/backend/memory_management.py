# Fake of backend/memory_management.py (Forge Neo 2.26, l.436-700: LoadedModel, load_models_gpu).
# Kept: a LoadedModel is found again only for the very same patcher object; every other loaded clone of the same
# model is taken off the list with detach(unpatch_all=False), which leaves its merged weights in the model; then
# LoadedModel.model_load -> ModelPatcher.partially_load, which unpatches and merges anew only when the model's
# current_weight_patches_uuid differs from the patcher's patches_uuid; lora_compute_dtype (float32 off CUDA).
# A LoadedModel holds its patcher by a weak reference (l.446): a patcher nothing else holds dies, and the
# LoadedModel then stands for the patcher's parent (_switch_parent, through a weakref.finalize on the patcher).
# The cast, size and free-memory helpers are the fake Forge's (the same functions in Neo).
# Simplified: one CPU device, every model loads completely, no memory accounting, no finalizer on the nn model.
import weakref

import torch
from neo_overlay import forge_module

_forge = forge_module("backend.memory_management")
cast_to_device = _forge.cast_to_device
module_size = _forge.module_size
dtype_size = _forge.dtype_size
get_free_memory = _forge.get_free_memory
soft_empty_cache = _forge.soft_empty_cache
signal_empty_cache = False

current_loaded_models = []


def lora_compute_dtype(device):
    return torch.float32


class LoadedModel:
    def __init__(self, model):
        self._patcher_finalizer = None
        self._set_model(model)
        self.device = model.load_device

    def _set_model(self, model):
        self._model = weakref.ref(model)
        if model.parent is not None:
            self._parent_model = weakref.ref(model.parent)
            self._patcher_finalizer = weakref.finalize(model, self._switch_parent)
            self._patcher_finalizer.atexit = False

    def _switch_parent(self):
        model = self._parent_model()
        if model is not None:
            self._set_model(model)

    @property
    def model(self):
        return self._model()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        self.model.model_patches_to(self.device)
        self.model.partially_load(self.device, 1e32, force_patch_weights=force_patch_weights)
        return self.model.model

    def __eq__(self, other):
        return self.model is other.model

    def __del__(self):
        if self._patcher_finalizer is not None:
            self._patcher_finalizer.detach()


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    models_to_load = []
    for x in models:
        loaded = LoadedModel(x)
        found = [m for m in current_loaded_models if m == loaded]
        models_to_load.append(found[0] if found else loaded)

    for loaded in models_to_load:
        for i in reversed(range(len(current_loaded_models))):
            if loaded.model.is_clone(current_loaded_models[i].model):
                current_loaded_models.pop(i).model.detach(unpatch_all=False)

    for loaded in models_to_load:
        loaded.model_load(force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])
