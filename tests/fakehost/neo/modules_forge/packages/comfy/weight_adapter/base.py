# Fake of modules_forge/packages/comfy/weight_adapter/base.py (Forge Neo 2.26).
# Kept: WeightAdapterBase (name, loaded_keys, weights; calculate_weight(weight, key, strength, strength_model, offset,
# function, intermediate_dtype, original_weight)), weight_decompose (DoRA: the norm taken on the output axis when
# dora_scale has one row per output channel, else per input channel; the weight changed IN PLACE) and
# pad_tensor_to_shape. Simplified: no training classes; the base's __init__ stores loaded_keys and weights (Neo's
# adapters each have that __init__).
import torch

from backend import memory_management


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: list

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        raise NotImplementedError


def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, intermediate_dtype, function):
    dora_scale = memory_management.cast_to_device(dora_scale, weight.device, intermediate_dtype)
    lora_diff *= alpha
    weight_calc = weight + function(lora_diff).type(weight.dtype)
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        columns = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1)
        norm = columns.norm(dim=1, keepdim=True).reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
        norm = norm.transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


def pad_tensor_to_shape(tensor, new_shape):
    if any(new < old for new, old in zip(new_shape, tensor.shape)) or len(new_shape) != tensor.dim():
        raise ValueError("The new shape must be larger than the original tensor in all dimensions")
    padded = torch.zeros(new_shape, dtype=tensor.dtype, device=tensor.device)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return padded
