"""Small LoRA files written by the tests themselves, in the layouts real trainers use."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def kohya_key(module_name: str) -> str:
    """``model.diffusion_model.input_blocks.1.1.x`` → ``lora_unet_input_blocks_1_1_x`` (the sgm/ldm convention)."""
    path = module_name.removeprefix("model.").removeprefix("diffusion_model.")
    return "lora_unet_" + path.replace(".", "_")


def lora_tensors(model: nn.Module, names: list[str], *, rank: int = 2, alpha: float | None = 1.0, seed: int = 0,
                 layout: str = "kohya", mid: bool = False, scale: float = 0.5,
                 key: callable = kohya_key) -> dict[str, torch.Tensor]:
    """Random factors for the named layers of ``model``. ``layout`` is ``kohya`` or ``peft``."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name in names:
        shape = tuple(modules[name].weight.shape)
        out_ch, in_ch = shape[0], shape[1]
        if len(shape) == 2:
            down, up, mid_t = torch.randn(rank, in_ch, generator=g), torch.randn(out_ch, rank, generator=g), None
        elif mid:
            down = torch.randn(rank, in_ch, 1, 1, generator=g)
            mid_t = torch.randn(rank, rank, *shape[2:], generator=g)
            up = torch.randn(out_ch, rank, 1, 1, generator=g)
        else:
            down, mid_t = torch.randn(rank, in_ch, *shape[2:], generator=g), None
            up = torch.randn(out_ch, rank, 1, 1, generator=g)
        down, up = down * scale, up * scale
        if layout == "kohya":
            base = key(name)
            tensors[f"{base}.lora_down.weight"] = down
            tensors[f"{base}.lora_up.weight"] = up
            if mid_t is not None:
                tensors[f"{base}.lora_mid.weight"] = mid_t * scale
            if alpha is not None:
                tensors[f"{base}.alpha"] = torch.tensor(float(alpha))
        else:
            base = "unet." + name.removeprefix("model.diffusion_model.")
            tensors[f"{base}.lora_A.weight"] = down
            tensors[f"{base}.lora_B.weight"] = up
    return tensors


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
