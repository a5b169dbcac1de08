# Fake of comfy/weight_adapter/lora.py (ComfyUI 0.30.0): LoRAAdapter. weights = (up, down, alpha, mid, dora_scale,
# reshape); load() reads kohya (lora_up/lora_down[/lora_mid]) and diffusers (lora_B/lora_A) names; the merge adds
# strength * alpha / rank * up @ down to the weight it is given (a slice of it for a patch with an offset).
# Left out: DoRA's decomposition, the reshape padding, the other trainers' names, the bypass h().
import torch

from .base import WeightAdapterBase


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if loaded_keys is None:
            loaded_keys = set()
        if f"{x}.lora_up.weight" in lora:
            a_name, b_name, mid_name = f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.lora_mid.weight"
        elif f"{x}.lora_B.weight" in lora:
            a_name, b_name, mid_name = f"{x}.lora_B.weight", f"{x}.lora_A.weight", None
        else:
            return None
        mid = None
        if mid_name is not None and mid_name in lora:
            mid = lora[mid_name]
            loaded_keys.add(mid_name)
        loaded_keys.update((a_name, b_name))
        return cls(loaded_keys, (lora[a_name], lora[b_name], alpha, mid, dora_scale, None))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        v = self.weights
        mat1 = v[0].to(weight.device, intermediate_dtype)
        mat2 = v[1].to(weight.device, intermediate_dtype)
        alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
        if v[3] is not None:
            mat3 = v[3].to(weight.device, intermediate_dtype)
            final_shape = [mat2.shape[1], mat2.shape[0], mat3.shape[2], mat3.shape[3]]
            mat2 = torch.mm(mat2.transpose(0, 1).flatten(start_dim=1),
                            mat3.transpose(0, 1).flatten(start_dim=1)).reshape(final_shape).transpose(0, 1)
        lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
        weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
        return weight
