# Fake of comfy/weight_adapter/__init__.py (ComfyUI 0.30.0): the adapter classes load_lora tries, in order.
# Only LoRA here (the real list also has LoHa, LoKr, GLoRA, OFT, BOFT).
from .base import WeightAdapterBase
from .lora import LoRAAdapter

adapters: list[type[WeightAdapterBase]] = [LoRAAdapter]

__all__ = ["LoRAAdapter", "WeightAdapterBase", "adapters"]
