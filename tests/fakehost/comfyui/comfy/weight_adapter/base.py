# Fake of comfy/weight_adapter/base.py (ComfyUI 0.30.0): the adapter base class (name, loaded_keys, weights).
class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: list

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype,
                         original_weight=None):
        raise NotImplementedError
