# Fake of modules_forge/packages/comfy/weight_adapter/__init__.py (Forge Neo 2.26): the adapter classes load_lora
# tries in turn. Simplified: LoRA and LoHa only (Neo also has LoKr, GLoRA, OFT, OFTv2, BOFT).
from .base import WeightAdapterBase
from .loha import LoHaAdapter
from .lora import LoRAAdapter

adapters = [LoHaAdapter, LoRAAdapter]

__all__ = ["WeightAdapterBase", "adapters", "LoHaAdapter", "LoRAAdapter"]
