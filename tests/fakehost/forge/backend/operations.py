# Fake of backend/operations.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: ForgeOperations.Linear is a plain nn.Module (NOT an nn.Linear subclass) whose .weight is None until a
# state dict is loaded; ForgeOperations.Conv2d subclasses nn.Conv2d; both read their weight through
# get_weight_and_bias, which (with parameters_manual_cast, e.g. fp8 weights) first casts the weight to the input's
# dtype, then merges online LoRAs (forge_online_loras) per forward in that dtype.
# Simplified: no streams, bnb or gguf; the manual cast is a dtype cast only (one device).
import torch

from backend.patcher.lora import merge_lora_to_weight


def get_weight_and_bias(layer, weight_args=None, bias_args=None):
    patches = getattr(layer, 'forge_online_loras', None)
    weight_patches = patches.get('weight', None) if patches is not None else None
    bias_patches = patches.get('bias', None) if patches is not None else None
    weight = layer.weight
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


def weights_manual_cast(layer, x):
    return get_weight_and_bias(layer, dict(dtype=x.dtype), dict(dtype=x.dtype))


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
