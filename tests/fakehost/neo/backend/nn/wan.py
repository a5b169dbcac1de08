# Fake of backend/nn/wan.py (Forge Neo 2.26): WanModel (Wan 2.1 / 2.2 text-to-video, one frame per image). Kept: the
# names, all separate Linear layers -- patch_embedding (Conv3d, kernel and stride (1, 2, 2)), text_embedding.0 / .2,
# time_embedding.0 / .2, time_projection.1 (6 dim), blocks.N (self_attn.q / k / v / o with norm_q / norm_k
# RMSNorms over the whole width, norm3, cross_attn.q / k / v / o, ffn.0 / ffn.2, the 1 x 6 x dim `modulation`
# parameter added to the projected time), head.head with its 1 x 2 x dim `modulation`; latents of 16 channels with a
# time axis [B, C, T, H, W]. Simplified: tiny widths and depth, torch's attention, no rope; the fake WebUI samples
# 4-D latents [B, C, H, W], which the model takes as one frame (T = 1).
import torch
from torch import nn

from backend.nn.common import attend, heads, timestep_embedding
from backend.operations import ForgeOperations as ops


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        for name in ("q", "k", "v", "o"):
            setattr(self, name, ops.Linear(dim, dim))
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, context=None):
        source = x if context is None else context
        q = heads(self.norm_q(self.q(x)), self.num_heads)
        k = heads(self.norm_k(self.k(source)), self.num_heads)
        return self.o(attend(q, k, heads(self.v(source), self.num_heads)))


class WanAttentionBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=True)
        self.cross_attn = WanSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(ops.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), ops.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e, context):
        e = (self.modulation + e).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + e[1]) + e[0]) * e[2]
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x) * (1 + e[4]) + e[3]) * e[5]


class Head(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.head = ops.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e):
        shift, scale = (self.modulation + e[:, None]).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanModel(nn.Module):
    def __init__(self, in_dim=16, dim=16, ffn_dim=32, freq_dim=16, text_dim=16, out_dim=16, num_heads=2,
                 num_layers=2, patch_size=(1, 2, 2)):
        super().__init__()
        self.config = dict(dim=dim, num_layers=num_layers)
        self.patch_size, self.freq_dim, self.out_dim = patch_size, freq_dim, out_dim
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(ops.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            ops.Linear(dim, dim))
        self.time_embedding = nn.Sequential(ops.Linear(freq_dim, dim), nn.SiLU(), ops.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(dim, ffn_dim, num_heads) for _ in range(num_layers)])
        self.head = Head(dim, out_dim * patch_size[0] * patch_size[1] * patch_size[2])

    def forward(self, x, timestep, context, **kwargs):
        frames = x.ndim == 5
        video = x if frames else x.unsqueeze(2)
        b, c, t, h, w = video.shape
        tokens = self.patch_embedding(video.to(self.patch_embedding.weight.dtype)).to(x.dtype)
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        e = self.time_embedding(timestep_embedding(timestep, self.freq_dim).to(x.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, -1))
        context = self.text_embedding(context)
        for block in self.blocks:
            tokens = block(tokens, e0, context)
        out = self.head(tokens, e)
        pt, ph, pw = self.patch_size
        out = out.view(b, *grid, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, t, h, w)
        return out if frames else out.squeeze(2)
