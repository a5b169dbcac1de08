# Fake of backend/operations.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: ForgeOperations.Linear is a plain nn.Module (NOT an nn.Linear subclass) whose .weight is None until a
# state dict is loaded; ForgeOperations.Conv2d subclasses nn.Conv2d; both read their weight through
# get_weight_and_bias, which first applies the layer's weight function (GGUF: dequantize), casts the weight to the
# input's dtype (parameters_manual_cast, e.g. fp8 weights), then merges online LoRAs (forge_online_loras) per forward
# in that dtype; ForgeOperationsGGUF.Linear holds a ParameterGGUF and dequantizes it at every forward;
# using_forge_operations(operations=...) makes the model's Linear layers that class while it is built.
# Simplified: no streams or bnb; the manual cast is a dtype cast only (one device); the operation classes are swapped
# on ForgeOperations (the real one swaps torch.nn's).
import contextlib

import torch

from backend.operations_gguf import dequantize_tensor
from backend.patcher.lora import merge_lora_to_weight


def get_weight_and_bias(layer, weight_args=None, bias_args=None, weight_fn=None):
    patches = getattr(layer, 'forge_online_loras', None)
    weight_patches = patches.get('weight', None) if patches is not None else None
    bias_patches = patches.get('bias', None) if patches is not None else None
    weight = layer.weight
    if weight is not None and weight_fn is not None:
        weight = weight_fn(weight)
    if weight is not None and weight_args is not None:
        weight = weight.to(**weight_args)
    if weight is not None and weight_patches is not None:
        weight = merge_lora_to_weight(patches=weight_patches, weight=weight, key="online weight lora",
                                      computation_dtype=weight.dtype)
    bias = layer.bias
    if bias is not None and bias_args is not None:
        bias = bias.to(**bias_args)
    if bias is not None and bias_patches is not None:
        bias = merge_lora_to_weight(patches=bias_patches, weight=bias, key="online bias lora",
                                    computation_dtype=bias.dtype)
    return weight, bias


def weights_manual_cast(layer, x, weight_fn=None):
    return get_weight_and_bias(layer, dict(dtype=x.dtype), dict(dtype=x.dtype), weight_fn=weight_fn)


def cleanup_cache():
    return


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.dummy = torch.nn.Parameter(torch.empty(1))
            self.weight = None
            self.scale_weight = None
            self.bias = None
            self.parameters_manual_cast = False

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            if hasattr(self, 'dummy'):
                if prefix + 'weight' in state_dict:
                    self.weight = torch.nn.Parameter(state_dict[prefix + 'weight'].to(self.dummy))
                if prefix + 'bias' in state_dict:
                    self.bias = torch.nn.Parameter(state_dict[prefix + 'bias'].to(self.dummy))
                del self.dummy
            else:
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)

        def forward(self, x):
            weight, bias = weights_manual_cast(self, x) if self.parameters_manual_cast else get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight, bias)

    class Conv2d(torch.nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = False

        def reset_parameters(self):
            return None

        def forward(self, x):
            weight, bias = weights_manual_cast(self, x) if self.parameters_manual_cast else get_weight_and_bias(self)
            return super()._conv_forward(x, weight, bias)


class ForgeOperationsGGUF(ForgeOperations):
    class Linear(ForgeOperations.Linear):
        def forward(self, x):
            weight, bias = weights_manual_cast(self, x, weight_fn=dequantize_tensor)
            return torch.nn.functional.linear(x, weight, bias)


@contextlib.contextmanager
def using_forge_operations(operations=None):
    original = ForgeOperations.Linear
    ForgeOperations.Linear = (operations or ForgeOperations).Linear
    try:
        yield
    finally:
        ForgeOperations.Linear = original
