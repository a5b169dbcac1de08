# Fake of backend/nn/unet.py (stable-diffusion-webui-forge dfdcbab6): IntegratedUNet2DConditionModel.
# Kept: the constructor's layout rules (input blocks per level and res block, Downsample between levels, a
# SpatialTransformer of the given depth wherever transformer_depth says, middle block, output blocks with
# Upsample, label_emb for "sequential" ADM models such as SDXL, proj_in/proj_out Linear with
# use_linear_in_transformer), hence the real ldm module names (time_embed, label_emb.0.N, input_blocks.N.M,
# ResBlock in_layers/emb_layers/out_layers/skip_connection, Downsample op, Upsample conv, SpatialTransformer
# proj_in/transformer_blocks.K/proj_out with attn1/attn2 to_q/k/v/to_out.0 and ff.net.0.proj/ff.net.2,
# middle_block, output_blocks, out); Forge operation classes for every Linear and Conv2d; transformer_options
# passed down and block_modifiers fired around every block. Simplified: tiny channel counts and depths (the
# defaults build a one-level SD 1.5-style UNet; tests/fakehost/forge/backend/loader.py holds the SDXL-style
# configuration), GroupNorm with 4 groups, no attention patches, controls or checkpointing.
import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.operations import ForgeOperations as ops

GROUPS = 4  # GroupNorm groups (32 in the real UNet, whose channel counts are larger)


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
                if "transformer_index" in transformer_options:
                    transformer_options["transformer_index"] += 1
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.channels = channels
        self.conv = ops.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x, output_shape=None):
        shape = [x.shape[2] * 2, x.shape[3] * 2] if output_shape is None else list(output_shape[2:4])
        return self.conv(F.interpolate(x, size=shape, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.op = ops.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


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
    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, use_linear=False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(GROUPS, in_channels, eps=1e-6)
        self.proj_in = ops.Linear(in_channels, inner_dim) if use_linear else ops.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim)
                                                 for _ in range(depth)])
        self.proj_out = ops.Linear(in_channels, inner_dim) if use_linear else ops.Conv2d(inner_dim, in_channels, 1)
        self.use_linear = use_linear

    def forward(self, x, context=None, transformer_options={}):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context, transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(nn.GroupNorm(GROUPS, channels), nn.SiLU(),
                                       ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(GROUPS, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else ops.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb, transformer_options={}):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class IntegratedUNet2DConditionModel(nn.Module):
    def __init__(self, in_channels=4, model_channels=8, out_channels=4, num_res_blocks=1, channel_mult=(1,),
                 num_classes=None, num_heads=2, num_head_channels=-1, transformer_depth=(1,), context_dim=16,
                 use_linear_in_transformer=False, adm_in_channels=None, transformer_depth_middle=1,
                 transformer_depth_output=(0, 0)):
        super().__init__()
        num_res_blocks = [num_res_blocks] * len(channel_mult) if isinstance(num_res_blocks, int) else num_res_blocks
        transformer_depth, transformer_depth_output = list(transformer_depth), list(transformer_depth_output)
        self.config = dict(model_channels=model_channels, in_channels=in_channels, context_dim=context_dim,
                           adm_in_channels=adm_in_channels)
        self.model_channels = model_channels
        self.num_classes = num_classes
        emb = model_channels * 4

        def heads(ch):
            return (num_heads, ch // num_heads) if num_head_channels == -1 else (ch // num_head_channels,
                                                                                num_head_channels)

        def transformer(ch, depth):
            n_heads, d_head = heads(ch)
            return SpatialTransformer(ch, n_heads, d_head, depth=depth, context_dim=context_dim,
                                      use_linear=use_linear_in_transformer)

        self.time_embed = nn.Sequential(ops.Linear(model_channels, emb), nn.SiLU(), ops.Linear(emb, emb))
        if num_classes == "sequential":
            self.label_emb = nn.Sequential(nn.Sequential(ops.Linear(adm_in_channels, emb), nn.SiLU(),
                                                         ops.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(ops.Conv2d(in_channels, model_channels, 3,
                                                                              padding=1))])
        input_block_chans = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                depth = transformer_depth.pop(0)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, ch)))
                input_block_chans.append(ch)
        middle = [ResBlock(ch, emb)]
        if transformer_depth_middle >= 0:
            middle += [transformer(ch, transformer_depth_middle), ResBlock(ch, emb)]
        self.middle_block = TimestepEmbedSequential(*middle)
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                layers = [ResBlock(ch + input_block_chans.pop(), emb, model_channels * mult)]
                ch = model_channels * mult
                depth = transformer_depth_output.pop()
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch, ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch), nn.SiLU(), ops.Conv2d(model_channels, out_channels, 3,
                                                                                 padding=1))
        self.load_device = self.offload_device = self.initial_device = torch.device("cpu")
        self.storage_dtype = self.computation_dtype = torch.float32

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        block_modifiers = transformer_options.get("block_modifiers", [])
        assert (y is not None) == (self.num_classes is not None)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x

        def run(block_id, module, h, output_shape=None):
            transformer_options["block"] = block_id
            for modifier in block_modifiers:
                h = modifier(h, 'before', transformer_options)
            h = module(h, emb, context, transformer_options, output_shape)
            for modifier in block_modifiers:
                h = modifier(h, 'after', transformer_options)
            return h

        for i, module in enumerate(self.input_blocks):
            h = run(("input", i), module, h)
            hs.append(h)
        h = run(("middle", 0), self.middle_block, h)
        for i, module in enumerate(self.output_blocks):
            h = torch.cat([h, hs.pop()], dim=1)
            h = run(("output", i), module, h, hs[-1].shape if hs else None)
        return self.out(h)
