"""A small UNet-shaped model whose layers carry real SD1.5 ldm module paths, for tests of the core.

Channels are small; the names, layer kinds and the order in which they run follow the real SD1.5 UNet
(/work/shared/data/sd15-unet-lora-layers.tsv, copied in part to tests/data/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

C = 8  # channels of the first level
CONTEXT = 12  # width of the text context (768 in SD1.5)

# (path under the UNet, kind, weight shape): a real subset of SD1.5's layers, shapes scaled down.
LAYERS = [
    ("input_blocks.0.0", "conv", (C, 4, 3, 3)),
    ("input_blocks.1.0.in_layers.2", "conv", (C, C, 3, 3)),
    ("input_blocks.1.1.proj_in", "conv", (C, C, 1, 1)),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "linear", (C, C)),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_k", "linear", (C, C)),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_v", "linear", (C, C)),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_out.0", "linear", (C, C)),
    ("input_blocks.1.1.transformer_blocks.0.ff.net.0.proj", "linear", (8 * C, C)),
    ("input_blocks.1.1.transformer_blocks.0.ff.net.2", "linear", (C, 4 * C)),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_q", "linear", (C, C)),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "linear", (C, CONTEXT)),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_v", "linear", (C, CONTEXT)),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_out.0", "linear", (C, C)),
    ("input_blocks.1.1.proj_out", "conv", (C, C, 1, 1)),
    ("input_blocks.3.0.op", "conv", (C, C, 3, 3)),
    ("out.2", "conv", (4, C, 3, 3)),
]


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def _make(kind: str, shape: tuple[int, ...], path: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(shape[1], shape[0], bias=not path.endswith(("to_q", "to_k", "to_v")))
    stride = 2 if path.endswith(".op") else 1
    padding = shape[2] // 2
    return nn.Conv2d(shape[1], shape[0], shape[2:], stride=stride, padding=padding)


class TinyUNet(nn.Module):
    """``model.diffusion_model.<ldm path>`` like the model object A1111 loads."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        unet = nn.Module()
        for path, kind, shape in LAYERS:
            _set(unet, path, _make(kind, shape, path))
        self.model = nn.Module()
        self.model.diffusion_model = unet

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    def layer(self, path: str) -> nn.Module:
        return self.unet.get_submodule(path)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = "input_blocks.1.1.transformer_blocks.0."
        h = self.layer("input_blocks.0.0")(x)
        h = h + self.layer("input_blocks.1.0.in_layers.2")(F.silu(h))
        b, c, height, width = h.shape
        tokens = self.layer("input_blocks.1.1.proj_in")(h).flatten(2).transpose(1, 2)
        tokens = tokens + self._attention(t + "attn1", tokens, tokens)
        tokens = tokens + self._attention(t + "attn2", tokens, context)
        a, gate = self.layer(t + "ff.net.0.proj")(tokens).chunk(2, dim=-1)
        tokens = tokens + self.layer(t + "ff.net.2")(a * F.gelu(gate))
        h = h + self.layer("input_blocks.1.1.proj_out")(tokens.transpose(1, 2).reshape(b, c, height, width))
        h = self.layer("input_blocks.3.0.op")(h)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.layer("out.2")(F.silu(h))

    def _attention(self, prefix: str, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.layer(prefix + ".to_q")(x)
        k = self.layer(prefix + ".to_k")(context)
        v = self.layer(prefix + ".to_v")(context)
        return self.layer(prefix + ".to_out.0")(F.scaled_dot_product_attention(q, k, v))


def make_inputs(batch: int = 2, size: int = 8, tokens: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, tokens, CONTEXT, generator=g)
