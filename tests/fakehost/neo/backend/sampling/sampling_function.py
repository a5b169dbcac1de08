# Fake of backend/sampling/sampling_function.py (Forge Neo 2.26): the batching and CFG code is the fake Forge's
# (calc_cond_uncond_batch, sampling_function_inner and sampling_function are the same in Neo where DynFuse depends on
# them: chunks, cond_or_uncond, model_function_wrapper, post-CFG functions), with Neo's sampling_prepare (l.365-389:
# the preserved memory added to memory_required, the online-LoRA patches' size too, load_models_gpu -> the merge)
# and sampling_cleanup (nothing moves back: Neo's patches stay where they are).
from neo_overlay import forge_module, public

from backend import memory_management, utils

globals().update(public(forge_module("backend.sampling.sampling_function")))


def sampling_prepare(unet, x):
    shape = list(x.shape)
    unet_inference_memory = unet.memory_required([2 * shape[0]] + shape[1:])
    additional_inference_memory = unet.extra_preserved_memory_during_sampling
    if unet.has_online_lora():
        additional_inference_memory += utils.nested_compute_size(
            unet.patches, element_size=utils.dtype_to_element_size(unet.model.computation_dtype))
    memory_management.load_models_gpu(models=[unet] + unet.extra_model_patchers_during_sampling,
                                      memory_required=unet_inference_memory + additional_inference_memory,
                                      minimum_memory_required=unet_inference_memory // 2 + additional_inference_memory)


def sampling_cleanup(unet):
    memory_management.soft_empty_cache()
