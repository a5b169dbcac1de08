# Fake of backend/operations.py (Forge Neo 2.26, l.44-243). Unlike Forge's, Neo's ForgeOperations.Linear IS a
# torch.nn.Linear (and Conv2d a torch.nn.Conv2d), both with the ForgeWeights class defaults parameters_manual_cast =
# False and empty weight_function / bias_function lists. forward reads the weight through get_weight_and_bias, or,
# once the patcher has set parameters_manual_cast (for online LoRAs: a LowVramPatch weight function, run per forward),
# through weights_manual_cast, which hands the functions a COPY of the weight cast to the input's dtype.
# Simplified: no streams, quantised or 1-D/3-D layers.
import torch


def get_weight_and_bias(layer):
    weight = getattr(layer, "weight", None)
    for f in getattr(layer, "weight_function", []):
        weight = f(weight)
    bias = getattr(layer, "bias", None)
    for f in getattr(layer, "bias_function", []):
        bias = f(bias)
    return weight, bias


def weights_manual_cast(layer, x):
    return _cast(layer.weight, x, layer.weight_function), _cast(layer.bias, x, layer.bias_function)


def _cast(tensor, x, functions):
    if tensor is None:
        return None
    if not functions:
        return tensor.to(device=x.device, dtype=x.dtype)
    tensor = tensor.to(device=x.device, copy=True).to(dtype=x.dtype)
    for f in functions:
        tensor = f(tensor)
    return tensor


def _weight_and_bias(layer, x):
    return weights_manual_cast(layer, x) if layer.parameters_manual_cast else get_weight_and_bias(layer)


class ForgeWeights:
    parameters_manual_cast = False
    weight_function = []
    bias_function = []


class ForgeOperations:
    class Linear(torch.nn.Linear, ForgeWeights):
        def reset_parameters(self):
            return None

        def forward(self, x):
            weight, bias = _weight_and_bias(self, x)
            return torch.nn.functional.linear(x, weight, bias)

    class Conv2d(torch.nn.Conv2d, ForgeWeights):
        def reset_parameters(self):
            return None

        def forward(self, x):
            weight, bias = _weight_and_bias(self, x)
            return super()._conv_forward(x, weight, bias)
