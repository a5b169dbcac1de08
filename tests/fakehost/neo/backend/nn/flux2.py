# Fake of the Flux.2 (klein) form of backend/nn/flux.py (Forge Neo 2.26): IntegratedFluxTransformer2DModel with
# global_modulation=True, mlp_silu_act=True, ops_bias=False and no guidance or vector input, and Neo's
# DoubleStreamBlock / SingleStreamBlock with their modulation, mlp_silu_act and bias switches (Chroma builds them
# with modulation=False). Kept apart from the fake FLUX.1 (the fake Forge's backend/nn/flux.py) so that it stays as
# it is. Kept: the names -- img_in, time_in.in_layer / out_layer, txt_in, double_blocks.N.img_attn.qkv / proj,
# img_mlp.0 = Linear(hidden, 2 * mlp_hidden) (SiLU-gated) / img_mlp.2, the txt_ twins, single_blocks.N.linear1 =
# Linear(hidden, 3 * hidden + 2 * mlp_hidden): q, k, v and the gated MLP input side by side, linear2, the three
# shared modulations double_stream_modulation_img.lin / _txt.lin (6 chunks) and single_stream_modulation.lin (3),
# final_layer.linear / adaLN_modulation.1 -- and `config` with depth, depth_single_blocks, hidden_size.
# Simplified: tiny widths (backend/loader.py), a 16-channel latent in 2x2 patches (Flux.2's VAE gives 128 channels at
# 1x1), torch's attention, no reference latents.
import torch
from torch import nn

from backend.nn.common import EmbedND, attend, heads, patchify, positions, timestep_embedding, unpatchify
from backend.nn.flux import MLPEmbedder, QKNorm
from backend.operations import ForgeOperations as ops


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, proj_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = ops.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = ops.Linear(dim, dim, bias=proj_bias)

    def qkv_heads(self, x):
        q, k, v = (heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1))
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    def __init__(self, dim, double, bias=True):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = ops.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec):
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def silu_gated(x):
    gate, up = x.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def build_mlp(hidden, mlp_hidden, silu, bias):
    if silu:
        return nn.Sequential(ops.Linear(hidden, 2 * mlp_hidden, bias=False), nn.Identity(),
                             ops.Linear(mlp_hidden, hidden, bias=False))
    return nn.Sequential(ops.Linear(hidden, mlp_hidden, bias=bias), nn.GELU(approximate="tanh"),
                         ops.Linear(mlp_hidden, hidden, bias=bias))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False, modulation=True, mlp_silu_act=False,
                 proj_bias=True):
        super().__init__()
        self.silu = mlp_silu_act
        for stream in ("img", "txt"):
            if modulation:
                setattr(self, f"{stream}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden_size, num_heads, qkv_bias, proj_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", build_mlp(hidden_size, int(hidden_size * mlp_ratio), mlp_silu_act,
                                                     proj_bias))

    def _mlp(self, stream, x):
        mlp = getattr(self, f"{stream}_mlp")
        hidden = mlp[0](x)
        return mlp[2](silu_gated(hidden) if self.silu else mlp[1](hidden))

    def forward(self, img, txt, mods, pe):
        """mods: {"img": 6 chunks, "txt": 6 chunks} (shift, scale, gate for attention, then for the MLP)."""
        qkv = {}
        for stream, x in (("img", img), ("txt", txt)):
            m = mods[stream]
            qkv[stream] = getattr(self, f"{stream}_attn").qkv_heads((1 + m[1]) * getattr(self, f"{stream}_norm1")(x)
                                                                    + m[0])
        attn = attend(*(torch.cat((qkv["txt"][i], qkv["img"][i]), dim=2) for i in range(3)), pe)
        out = {"txt": attn[:, :txt.shape[1]], "img": attn[:, txt.shape[1]:]}
        results = []
        for stream, x in (("img", img), ("txt", txt)):
            m = mods[stream]
            x = x + m[2] * getattr(self, f"{stream}_attn").proj(out[stream])
            results.append(x + m[5] * self._mlp(stream, (1 + m[4]) * getattr(self, f"{stream}_norm2")(x) + m[3]))
        return results


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, modulation=True, mlp_silu_act=False, bias=True):
        super().__init__()
        self.hidden_size, self.num_heads, self.silu = hidden_size, num_heads, mlp_silu_act
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        first = 2 * self.mlp_hidden_dim if mlp_silu_act else self.mlp_hidden_dim
        self.linear1 = ops.Linear(hidden_size, hidden_size * 3 + first, bias=bias)
        self.linear2 = ops.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=bias)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if modulation:
            self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, mod, pe):
        """mod: 3 chunks (shift, scale, gate)."""
        shift, scale, gate = mod
        out = self.linear1((1 + scale) * self.pre_norm(x) + shift)
        qkv, mlp = out[..., :3 * self.hidden_size], out[..., 3 * self.hidden_size:]
        q, k, v = (heads(part, self.num_heads) for part in qkv.chunk(3, dim=-1))
        q, k = self.norm(q, k, v)
        mlp = silu_gated(mlp) if self.silu else nn.functional.gelu(mlp, approximate="tanh")
        return x + gate * self.linear2(torch.cat((attend(q, k, v, pe), mlp), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size, out_channels, bias=True, modulation=True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(hidden_size, out_channels, bias=bias)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x, shift, scale):
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux2Transformer(nn.Module):
    """IntegratedFluxTransformer2DModel as Flux.2 klein configures it."""

    def __init__(self, in_channels=16, context_in_dim=16, hidden_size=16, mlp_ratio=3.0, num_heads=2, depth=2,
                 depth_single_blocks=2, axes_dim=(2, 2, 4), theta=2000):
        super().__init__()
        self.config = dict(depth=depth, depth_single_blocks=depth_single_blocks, hidden_size=hidden_size)
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=list(axes_dim))
        self.img_in = ops.Linear(in_channels * 4, hidden_size, bias=False)
        self.time_in = MLPEmbedder(256, hidden_size)
        for layer in (self.time_in.in_layer, self.time_in.out_layer):
            layer.bias = None
        self.txt_in = ops.Linear(context_in_dim, hidden_size, bias=False)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, modulation=False,
                                                              mlp_silu_act=True, proj_bias=False)
                                            for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio, modulation=False,
                                                              mlp_silu_act=True, bias=False)
                                            for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, in_channels * 4, bias=False)
        self.double_stream_modulation_img = Modulation(hidden_size, double=True, bias=False)
        self.double_stream_modulation_txt = Modulation(hidden_size, double=True, bias=False)
        self.single_stream_modulation = Modulation(hidden_size, double=False, bias=False)

    def forward(self, x, timestep, context, **kwargs):
        b, _, h, w = x.shape
        img = self.img_in(patchify(x))
        vec = self.time_in(timestep_embedding(timestep, 256).to(img.dtype))
        txt = self.txt_in(context)
        pe = self.pe_embedder(positions(b, txt.shape[1], h // 2, w // 2, x.device))
        mods = {"img": self.double_stream_modulation_img(vec), "txt": self.double_stream_modulation_txt(vec)}
        for block in self.double_blocks:
            img, txt = block(img, txt, mods, pe)
        joint = torch.cat((txt, img), dim=1)
        single = self.single_stream_modulation(vec)
        for block in self.single_blocks:
            joint = block(joint, single, pe)
        shift, scale = self.final_layer.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return unpatchify(self.final_layer(joint[:, txt.shape[1]:], shift, scale), x.shape)
