# Fake of backend/memory_management.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: the loaded-model list, clone unloading and LoadedModel.model_load -> forge_patch_model -> refresh_loras
# (the moment LoRA weights are merged). Simplified: one CPU device, no VRAM states, no CPU swap.
# `free_memory_bytes` stands for the GPU's free memory; a test lowers it to make Forge split cond and uncond
# into separate UNet calls.
import torch

signal_empty_cache = False
free_memory_bytes = float(1 << 40)
current_loaded_models = []


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def soft_empty_cache(force=False):
    global signal_empty_cache
    signal_empty_cache = False


def get_free_memory(dev=None, torch_free_too=False):
    return (free_memory_bytes, free_memory_bytes) if torch_free_too else free_memory_bytes


def module_size(module, exclude_device=None, include_device=None, return_split=False):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def dtype_size(dtype):
    return torch.tensor([], dtype=dtype).element_size()


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device
        self.real_model = None

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):
        self.model.model_patches_to(self.device)
        self.real_model = self.model.forge_patch_model(self.device)
        self.model.current_device = self.model.load_device
        self.model.refresh_loras()
        return self.real_model

    def model_unload(self, avoid_model_moving=False):
        self.model.forge_unpatch_model(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    for i in reversed(range(len(current_loaded_models))):
        if model.is_clone(current_loaded_models[i].model):
            current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for x in models:
        loaded_model = LoadedModel(x)
        if loaded_model in current_loaded_models:
            index = current_loaded_models.index(loaded_model)
            current_loaded_models.insert(0, current_loaded_models.pop(index))
            continue
        unload_model_clones(loaded_model.model)
        loaded_model.model_load()
        current_loaded_models.insert(0, loaded_model)


def load_model_gpu(model):
    return load_models_gpu([model])
