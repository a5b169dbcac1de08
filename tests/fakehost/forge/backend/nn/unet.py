# Fake of backend/nn/unet.py (stable-diffusion-webui-forge dfdcbab6): IntegratedUNet2DConditionModel.
# Kept: the ldm module tree and names of SD 1.5 (time_embed, input_blocks.N.M, ResBlock in_layers/emb_layers/
# out_layers/skip_connection, SpatialTransformer proj_in/transformer_blocks/proj_out with attn1/attn2 to_q/k/v/
# to_out.0 and ff.net.0.proj/ff.net.2, middle_block, output_blocks, out), Forge operation classes for every
# Linear and Conv2d, transformer_options passed down and block_modifiers fired around every block.
# Simplified: 8 model channels, one level, two input and two output blocks, no attention patches.
import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.operations import ForgeOperations as ops


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepBlock(nn.Module):
    pass


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb, transformer_options)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            else:
                x = layer(x)
        return x


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=2):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(0.0), ops.Linear(inner_dim, dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=2, dim_head=4):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = ops.Linear(query_dim, inner_dim, bias=False)
        self.to_k = ops.Linear(context_dim, inner_dim, bias=False)
        self.to_v = ops.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context if value is None else value)
        b, _, inner = q.shape
        h = self.heads
        q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, inner)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None, transformer_options={}):
        x = self.attn1(self.norm1(x), transformer_options=transformer_options) + x
        x = self.attn2(self.norm2(x), context=context, transformer_options=transformer_options) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, context_dim):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(4, in_channels, eps=1e-6)
        self.proj_in = ops.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim)])
        self.proj_out = ops.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(self, x, context=None, transformer_options={}):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context, transformer_options=transformer_options)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(x) + x_in


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(),
                                       ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else ops.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb, transformer_options={}):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class IntegratedUNet2DConditionModel(nn.Module):
    def __init__(self, in_channels=4, model_channels=8, out_channels=4, context_dim=16, num_heads=2):
        super().__init__()
        ch, emb = model_channels, model_channels * 4
        d_head = ch // num_heads
        self.config = dict(model_channels=model_channels, in_channels=in_channels, context_dim=context_dim)
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(ops.Linear(ch, emb), nn.SiLU(), ops.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(ops.Conv2d(in_channels, ch, 3, padding=1)),
            TimestepEmbedSequential(ResBlock(ch, emb, ch), SpatialTransformer(ch, num_heads, d_head, context_dim)),
        ])
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb, ch),
                                                    SpatialTransformer(ch, num_heads, d_head, context_dim),
                                                    ResBlock(ch, emb, ch))
        self.output_blocks = nn.ModuleList([
            TimestepEmbedSequential(ResBlock(2 * ch, emb, ch)),
            TimestepEmbedSequential(ResBlock(2 * ch, emb, ch)),
        ])
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), ops.Conv2d(ch, out_channels, 3, padding=1))
        self.load_device = self.offload_device = self.initial_device = torch.device("cpu")
        self.storage_dtype = self.computation_dtype = torch.float32

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        block_modifiers = transformer_options.get("block_modifiers", [])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs = []
        h = x

        def run(block_id, module, h):
            transformer_options["block"] = block_id
            for modifier in block_modifiers:
                h = modifier(h, 'before', transformer_options)
            h = module(h, emb, context, transformer_options)
            for modifier in block_modifiers:
                h = modifier(h, 'after', transformer_options)
            return h

        for i, module in enumerate(self.input_blocks):
            h = run(("input", i), module, h)
            hs.append(h)
        h = run(("middle", 0), self.middle_block, h)
        for i, module in enumerate(self.output_blocks):
            h = run(("output", i), module, torch.cat([h, hs.pop()], dim=1))
        return self.out(h)
