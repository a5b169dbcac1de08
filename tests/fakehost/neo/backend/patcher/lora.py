# Fake of backend/patcher/lora.py (Forge Neo 2.26). No LoraLoader (Neo merges in ModelPatcher.load).
# Kept: load_lora and the key maps re-exported from Neo's vendored ComfyUI code; merge_lora_to_weight(patches,
# weight, key, computation_dtype) with a REQUIRED key, working IN PLACE on the weight it is given (no copy): per
# entry (strength, v, strength_model, offset, function, ...) narrow to the offset, scale by strength_model, then a
# weight adapter computes its own patch, ("diff", (t,)) adds strength * t, ("set", (t,)) copies t, and any other
# tuple -- Forge's ("lora", (...)) included -- raises ValueError. Simplified: no nested patch lists, no padding diffs.
import torch

from backend import memory_management
from modules_forge.packages.comfy.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet  # noqa: F401
from modules_forge.packages.comfy import weight_adapter


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32):
    for strength, v, strength_model, offset, function, *_ in patches:
        function = function if function is not None else (lambda a: a)
        whole = None
        if offset is not None:
            whole, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            weight = v.calculate_weight(weight, key, strength, strength_model, offset, function, computation_dtype)
        else:
            kind, values = ("diff", v) if len(v) == 1 else v
            if kind == "diff":
                if strength != 0.0:
                    weight += function(strength * memory_management.cast_to_device(values[0], weight.device,
                                                                                   weight.dtype))
            elif kind == "set":
                weight.copy_(values[0])
            else:
                raise ValueError(f'"{key}" of type "{kind}" is not recognized...')
        if whole is not None:
            weight = whole
    return weight
