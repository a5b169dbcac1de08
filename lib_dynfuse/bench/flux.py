"""A FLUX-shaped transformer for the benchmark (``python -m lib_dynfuse.bench --model flux``): FLUX.1's module names,
depths and fused layer shapes at a width of choice, no diffusers needed.

19 double blocks (image and text streams, each with a fused ``qkv`` of 3 x width, ``proj``, a two-layer MLP of 4 x
width and a ``mod.lin`` of 6 x width) and 38 single blocks (``linear1`` = q, k, v and the 4 x width MLP input side
by side, ``linear2``, ``modulation.lin``), run in FLUX's order on image and text tokens with joint attention. Only
the arithmetic that keeps activations in range is kept (no position embedding or QK norms): what the hooks see is
FLUX's layers, shapes and call counts. A FLUX LoRA in diffusers names patches q, k, v and the MLP input apart, so
the fused layers are hooked part by part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DOUBLE, SINGLE = 19, 38
HEAD = 64  # channels per attention head (FLUX: 128 at width 3072)
LATENT_CHANNELS = 64  # 16 latent channels in 2x2 patches
TEXT_TOKENS = 64
PARTS = {"qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "mlp")}


class _Stream(nn.Module):
    """One stream of a double block: modulation, fused qkv, output projection and MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mod = nn.Module()
        self.mod.lin = nn.Linear(width, 6 * width)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))


class DoubleBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        streams = {name: _Stream(width) for name in ("img", "txt")}
        for name, stream in streams.items():
            for part in ("mod", "attn", "mlp"):
                self.add_module(f"{name}_{part}", getattr(stream, part))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mods = {s: getattr(self, f"{s}_mod").lin(F.silu(vec))[:, None].chunk(6, -1) for s in ("img", "txt")}
        qkv = torch.cat([getattr(self, f"{s}_attn").qkv(_norm(x) * (1 + mods[s][1]) + mods[s][0])
                         for s, x in (("txt", txt), ("img", img))], dim=1)
        joint = _attention(qkv)
        out = []
        for s, x, attn in (("img", img, joint[:, txt.shape[1]:]), ("txt", txt, joint[:, :txt.shape[1]])):
            shift, scale, gate, shift2, scale2, gate2 = mods[s]
            x = x + gate * getattr(self, f"{s}_attn").proj(attn)
            out.append(x + gate2 * getattr(self, f"{s}_mlp")(_norm(x) * (1 + scale2) + shift2))
        return out[0], out[1]


class SingleBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.linear1 = nn.Linear(width, 7 * width)
        self.linear2 = nn.Linear(5 * width, width)
        self.modulation = nn.Module()
        self.modulation.lin = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation.lin(F.silu(vec))[:, None].chunk(3, -1)
        qkv, mlp = self.linear1(_norm(x) * (1 + scale) + shift).split([3 * self.width, 4 * self.width], -1)
        return x + gate * self.linear2(torch.cat([_attention(qkv), F.gelu(mlp, approximate="tanh")], -1))


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def _attention(qkv: torch.Tensor) -> torch.Tensor:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, -1, HEAD).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


class FluxShaped(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        if width % HEAD:
            raise ValueError(f"the width must be a multiple of {HEAD} (the channels of one attention head)")
        self.img_in = nn.Linear(LATENT_CHANNELS, width)
        self.txt_in = nn.Linear(width, width)
        self.double_blocks = nn.ModuleList(DoubleBlock(width) for _ in range(DOUBLE))
        self.single_blocks = nn.ModuleList(SingleBlock(width) for _ in range(SINGLE))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(width, LATENT_CHANNELS)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer.linear(x[:, txt.shape[1]:])


def build(width: int, device: str, dtype: torch.dtype) -> FluxShaped:
    torch.manual_seed(0)
    return FluxShaped(width).to(device=device, dtype=dtype).eval().requires_grad_(False)


def inputs(model: nn.Module, size: int, batch: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An image of ``size`` pixels (8x latents in 2x2 patches), 64 text tokens and the pooled vector, for FLUX and
    the other families of FLUX's input shapes (lib_dynfuse.bench.families)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    width = model.img_in.out_features
    tokens = (size // 16) ** 2
    values = dict(img=torch.randn(batch, tokens, LATENT_CHANNELS, generator=g),
                  txt=torch.randn(batch, TEXT_TOKENS, width, generator=g), vec=torch.randn(batch, width, generator=g))
    return {k: v.to(device=device, dtype=dtype) for k, v in values.items()}


def lora_sites(model: FluxShaped, which: str = "all") -> dict[str, tuple[nn.Module, tuple[int, int] | None]]:
    """What two diffusers-named FLUX LoRAs patch: ``all`` every Linear of the blocks, ``attention`` the q, k, v and
    output projections; the fused layers part by part (name ``…qkv:q``, channels (start, length))."""
    sites = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "blocks." not in name:
            continue
        kind = name.rsplit(".", 1)[-1]
        if which == "attention" and kind not in ("qkv", "proj", "linear1"):
            continue
        if kind not in PARTS:
            sites[name] = (module, None)
            continue
        width = module.in_features
        for i, part in enumerate(PARTS[kind]):
            if which == "attention" and part == "mlp":
                continue
            sites[f"{name}:{part}"] = (module, (i * width, 4 * width if part == "mlp" else width))
    return sites
