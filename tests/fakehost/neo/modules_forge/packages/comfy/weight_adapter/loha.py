# Fake of modules_forge/packages/comfy/weight_adapter/loha.py (Forge Neo 2.26): LoHaAdapter.
# Kept: name "loha", weights = (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale) from hada_w1_a / hada_w1_b /
# hada_w2_a / hada_w2_b, alpha / rank with rank = w1b's rows, the Hadamard product (w1a @ w1b) * (w2a @ w2b) added
# IN PLACE (DoRA through weight_decompose). Simplified: no Tucker t1/t2.
import torch

from backend import memory_management

from .base import WeightAdapterBase, weight_decompose

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        loaded_keys = set() if loaded_keys is None else loaded_keys
        if f"{x}.hada_w1_a" not in lora:
            return None
        w1a, w1b, w2a, w2b = (lora[f"{x}.{name}"] for name in NAMES)
        loaded_keys.update(f"{x}.{name}" for name in NAMES)
        return cls(loaded_keys, (w1a, w1b, alpha, w2a, w2b, None, None, dora_scale))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        w1a, w1b, alpha, w2a, w2b, _t1, _t2, dora_scale = self.weights
        alpha = alpha / w1b.shape[0] if alpha is not None else 1.0

        def cast(t):
            return memory_management.cast_to_device(t, weight.device, intermediate_dtype)

        diff = (torch.mm(cast(w1a), cast(w1b)) * torch.mm(cast(w2a), cast(w2b))).reshape(weight.shape)
        if dora_scale is not None:
            return weight_decompose(dora_scale, weight, diff, alpha, strength, intermediate_dtype, function)
        weight += function(((strength * alpha) * diff).type(weight.dtype))
        return weight
