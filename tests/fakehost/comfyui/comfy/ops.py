# Fake of comfy/ops.py (ComfyUI 0.30.0): the layer classes ComfyUI builds its models with. Each carries the lists
# `weight_function` / `bias_function` (ModelPatcher.add_weight_wrapper, lowvram patches) and casts its weight at
# every call when `comfy_cast_weights` is set or a function is in a list; otherwise torch's own forward runs.
# Simplified: no device/dtype casting, no quantised weights.
import torch


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


def cast_bias_weight(s, input=None):
    weight = s.weight
    for f in s.weight_function:
        weight = f(weight)
    bias = s.bias
    if bias is not None:
        for f in s.bias_function:
            bias = f(bias)
    return weight, bias


class disable_weight_init:
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.linear(input, weight, bias)

        def forward(self, *args, **kwargs):
            if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)

    class Conv2d(torch.nn.Conv2d, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return self._conv_forward(input, weight, bias)

        def forward(self, *args, **kwargs):
            if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class Conv2d(disable_weight_init.Conv2d):
        comfy_cast_weights = True
