"""LoRAs for the world model, trained the way users train theirs and saved as kohya ``.safetensors`` files.

A handful of renders with their captions, a frozen base model and text encoder, rank-r factors on every attention
projection and feed-forward linear of the UNet's transformer blocks. The trainable factors are evaluated with
``LowRankDelta.output``, the same code that applies them when DynFuse fuses them.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lib_dynfuse.engine.deltas import LayerGeometry, LowRankDelta
from lib_dynfuse.quality.diffusion import v_loss
from lib_dynfuse.quality.optim import Log, fit

# The layers both LoRAs train: every attention projection and both feed-forward linears of every transformer
# block (kohya's default "attn + ff" preset for UNet LoRAs).
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
KOHYA_PREFIX = "lora_unet_"


def lora_layers(unet: nn.Module, targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, nn.Linear]:
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, nn.Linear) and ".transformer_blocks." in name and name.endswith(targets)}


def kohya_key(module_name: str) -> str:
    return KOHYA_PREFIX + module_name.replace(".", "_")


class TrainableLora:
    """Rank-r factors on ``layers``, added to their outputs by forward hooks while installed."""

    def __init__(self, layers: dict[str, nn.Linear], rank: int, alpha: float, generator: torch.Generator) -> None:
        self.layers = layers
        self.rank, self.alpha = rank, alpha
        self.down: dict[str, nn.Parameter] = {}
        self.up: dict[str, nn.Parameter] = {}
        for name, module in layers.items():
            out_f, in_f = module.weight.shape
            bound = 1 / math.sqrt(in_f)  # kohya: kaiming-uniform down, zero up, so training starts at the base
            self.down[name] = nn.Parameter((torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound)
            self.up[name] = nn.Parameter(torch.zeros(out_f, rank))
        self._handles: list = []

    def parameters(self) -> list[nn.Parameter]:
        return list(self.down.values()) + list(self.up.values())

    def __enter__(self) -> TrainableLora:
        for name, module in self.layers.items():
            delta = LowRankDelta(self.down[name], self.up[name], alpha=self.alpha)
            geometry = LayerGeometry.of(module)
            self._handles.append(module.register_forward_hook(
                lambda mod, inputs, output, d=delta, g=geometry: output + d.output(inputs[0], g)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def state_dict(self) -> dict[str, Tensor]:
        tensors = {}
        for name in self.layers:
            key = kohya_key(name)
            tensors[f"{key}.lora_down.weight"] = self.down[name].detach().clone().contiguous()
            tensors[f"{key}.lora_up.weight"] = self.up[name].detach().clone().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(self.alpha))
        return tensors


def train_lora(unet: nn.Module, context: Tensor, images: Tensor, *, rank: int, alpha: float, steps: int,
               lr: float, batch: int = 16, seed: int = 0, label: str = "lora", log: Log = print,
               targets: tuple[str, ...] = LORA_TARGETS) -> TrainableLora:
    """Train a LoRA on ``images`` (model space, ``[N, 12, 16, 16]``) with their text states ``context``
    (``[N, 8, W]``, from the frozen text encoder) on the linears whose names end with one of ``targets``; the base
    ``unet`` stays frozen."""
    g = torch.Generator().manual_seed(seed)
    unet.requires_grad_(False)
    lora = TrainableLora(lora_layers(unet, targets), rank, alpha, g)

    def loss_at(step: int) -> Tensor:
        index = torch.randint(images.shape[0], (batch,), generator=g)
        return v_loss(unet, images[index], context[index], g).mean()

    with lora:
        fit(lora.parameters(), loss_at, steps=steps, lr=lr, label=label, log=log)
    return lora


def save_kohya(lora: TrainableLora, path: str | os.PathLike, *, captions: Sequence[str], dtype=torch.float16) -> None:
    """Write the factors as a kohya LoRA file, with the trainer metadata kohya writes (rank, alpha, and the
    caption counts per dataset folder)."""
    from safetensors.torch import save_file

    tensors = {k: v.to(dtype) for k, v in lora.state_dict().items()}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
                "ss_network_alpha": f"{lora.alpha:g}", "ss_base_model_version": "dynfuse_world",
                "ss_tag_frequency": json.dumps({"renders": dict(Counter(captions))})}
    save_file(tensors, os.fspath(path), metadata=metadata)
