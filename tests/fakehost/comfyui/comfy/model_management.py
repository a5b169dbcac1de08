# Fake of comfy/model_management.py (ComfyUI 0.30.0): the loaded-model list and load_models_gpu. Kept as the real
# one: a patcher already loaded is reused; every other loaded clone of the same model (`is_clone`) is taken out of
# the list and detached without unpatching (`detach(unpatch_all=False)`: eject only), then the requested patcher is
# loaded by `partially_load`; unloading detaches with unpatching. Interrupts: `interrupt_current_processing` and
# the check samplers call at every step. Simplified: one device, no memory accounting.
import torch

current_loaded_models = []
interrupt_processing = False


class InterruptProcessingException(Exception):
    pass


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def model_load(self):
        self.model.partially_load(self.device, 1e32)
        return self.model.model

    def model_unload(self, unpatch_weights=True):
        self.model.detach(unpatch_weights)

    def __eq__(self, other):
        return self.model is other.model


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    models_to_load = []
    for x in models:
        loaded_model = LoadedModel(x)
        if loaded_model in current_loaded_models:
            models_to_load.append(current_loaded_models[current_loaded_models.index(loaded_model)])
        else:
            models_to_load.append(loaded_model)
    for loaded_model in models_to_load:
        for i in reversed(range(len(current_loaded_models))):
            other = current_loaded_models[i]
            if other.model is not loaded_model.model and loaded_model.model.is_clone(other.model):
                current_loaded_models.pop(i).model.detach(unpatch_all=False)
    for loaded_model in models_to_load:
        loaded_model.model_load()
        if loaded_model not in current_loaded_models:
            current_loaded_models.insert(0, loaded_model)


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().model_unload()


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()
max_batch_rows = None  # fake only: rows one UNet call may take (None: all); real ComfyUI asks the free memory
