# Fake of modules_forge/packages/comfy/weight_adapter/lora.py (Forge Neo 2.26): LoRAAdapter.
# Kept: name "lora", weights = (up, down, alpha, mid, dora_scale, reshape) from the kohya names (lora_up / lora_down /
# lora_mid / reshape_weight) or the diffusers / peft ones (lora_B / lora_A); alpha and dora_scale handed in by
# load_lora; calculate_weight: reshape pads the weight,
# alpha / rank with rank = down's rows (1 without alpha), a Tucker mid folded into down, DoRA through
# weight_decompose, else strength * alpha * up @ down added IN PLACE to the weight it is given, row chunk by row chunk.
# No __getitem__ / __len__: the adapter is not a tuple. Simplified: only the kohya and peft namings.
import torch

from backend import memory_management

from .base import WeightAdapterBase, pad_tensor_to_shape, weight_decompose


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        loaded_keys = set() if loaded_keys is None else loaded_keys
        up_name, down_name, mid_name = f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.lora_mid.weight"
        if up_name not in lora and f"{x}.lora_B.weight" in lora:
            up_name, down_name, mid_name = f"{x}.lora_B.weight", f"{x}.lora_A.weight", None
        if up_name not in lora:
            return None
        mid = lora.get(mid_name) if mid_name is not None else None
        if mid is not None:
            loaded_keys.add(mid_name)
        reshape = None
        if f"{x}.reshape_weight" in lora:
            reshape = lora[f"{x}.reshape_weight"].tolist()
            loaded_keys.add(f"{x}.reshape_weight")
        loaded_keys.update((up_name, down_name))
        return cls(loaded_keys, (lora[up_name], lora[down_name], alpha, mid, dora_scale, reshape))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        up, down, alpha, mid, dora_scale, reshape = self.weights
        up = memory_management.cast_to_device(up, weight.device, intermediate_dtype)
        down = memory_management.cast_to_device(down, weight.device, intermediate_dtype)
        if reshape is not None:
            weight = pad_tensor_to_shape(weight, reshape)
        alpha = alpha / down.shape[0] if alpha is not None else 1.0
        if mid is not None:
            mid = memory_management.cast_to_device(mid, weight.device, intermediate_dtype)
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                            mid.transpose(0, 1).flatten(start_dim=1)).reshape(shape).transpose(0, 1)
        up, down = up.flatten(start_dim=1), down.flatten(start_dim=1)
        if dora_scale is not None:
            diff = torch.mm(up, down).reshape(weight.shape)
            return weight_decompose(dora_scale, weight, diff, alpha, strength, intermediate_dtype, function)
        for start in range(0, up.shape[0], 1024):
            rows = torch.mm(up[start:start + 1024], down)
            if strength * alpha != 1.0:
                rows.mul_(strength * alpha)
            target = weight[start:start + rows.shape[0]]  # as many rows as the patch has, even in a wider slice
            target += function(rows.reshape(target.shape)).type(weight.dtype)
        return weight
