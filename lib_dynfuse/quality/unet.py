"""A small text-conditioned UNet laid out like diffusers' ``UNet2DConditionModel``, in plain torch.

Module paths follow diffusers (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, ``ff.net.0.proj``,
``proj_in``, ``resnets.0.conv1``, ...), so kohya LoRA keys such as
``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`` find their layers through
``lib_dynfuse.loras.files``'s name mapping, exactly as they do on a real SDXL-style UNet.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 12  # RGB folded 2×2 into channels (diffusion.to_model_space)
    out_channels: int = 12
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    attention: tuple[bool, ...] = (True, True, True)  # every level, as SD1.5 at its three finer levels
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    head_dim: int = 32
    norm_groups: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class ResnetBlock2D(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.to_out[1](self.to_out[0](h))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """SDXL-style: linear proj_in/proj_out around one transformer block."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim, head_dim)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Block(nn.Module):
    """A down or up block: resnets, each followed by its transformer when the level has attention."""

    def __init__(self, resnets: list[ResnetBlock2D], attentions: list[Transformer2DModel]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)

    def layer(self, i: int, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[i](x, temb)
        return self.attentions[i](x, context) if hasattr(self, "attentions") else x


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        chans, groups = config.block_out_channels, config.norm_groups
        ctx, hd, levels = config.cross_attention_dim, config.head_dim, len(chans)
        temb = 4 * chans[0]

        def resnet(c_in: int, c_out: int) -> ResnetBlock2D:
            return ResnetBlock2D(c_in, c_out, temb, groups)

        def transformer(c: int) -> Transformer2DModel:
            return Transformer2DModel(c, ctx, hd, groups)

        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        self.down_blocks = nn.ModuleList()
        skips = [chans[0]]
        c = chans[0]
        for level, c_out in enumerate(chans):
            n = config.layers_per_block
            block = _Block([resnet(c if i == 0 else c_out, c_out) for i in range(n)],
                           [transformer(c_out) for _ in range(n)] if config.attention[level] else [])
            skips += [c_out] * n
            if level < levels - 1:
                block.downsamplers = nn.ModuleList([Downsample2D(c_out)])
                skips.append(c_out)
            self.down_blocks.append(block)
            c = c_out
        self.mid_block = _Block([resnet(c, c), resnet(c, c)], [transformer(c)])
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            c_out = chans[level]
            n = config.layers_per_block + 1
            resnets = []
            for _ in range(n):
                resnets.append(resnet(c + skips.pop(), c_out))
                c = c_out
            block = _Block(resnets, [transformer(c_out) for _ in range(n)] if config.attention[level] else [])
            if level > 0:
                block.upsamplers = nn.ModuleList([Upsample2D(c_out)])
            self.up_blocks.append(block)
        self.conv_norm_out = nn.GroupNorm(groups, c)
        self.conv_out = nn.Conv2d(c, config.out_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        t = timestep.expand(sample.shape[0]) if timestep.dim() == 0 else timestep
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        context = encoder_hidden_states
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                h = block.layer(i, h, temb, context)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)
        h = self.mid_block.resnets[0](h, temb)
        h = self.mid_block.attentions[0](h, context)
        h = self.mid_block.resnets[1](h, temb)
        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                h = block.layer(i, torch.cat([h, skips.pop()], dim=1), temb, context)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
