# Fake of backend/nn/lumina.py (Forge Neo 2.26): NextDiT, the transformer of Lumina-Image 2.0 and of Z-Image
# (z_image_modulation). Kept: the module tree and its names -- x_embedder, t_embedder.mlp.0 / .2, cap_embedder.0
# (RMSNorm) / .1, noise_refiner.N and layers.N (JointTransformerBlock with adaLN_modulation: Z-Image's
# Sequential(Linear), Lumina's Sequential(SiLU, Linear) -> adaLN_modulation.0 / .1 -- 4 chunks: scale and tanh gate
# for attention and MLP), context_refiner.N (no modulation), attention.qkv = Linear(dim, (heads + 2 kv_heads) *
# head_dim, no bias): q, k and v side by side, k and v narrower with grouped-query attention (Lumina 2: 24 heads,
# 8 kv heads; Z-Image: 30 and 30), attention.out, q_norm / k_norm, feed_forward.w1 / w2 / w3 (SwiGLU), the four
# RMSNorms per block, final_layer.linear / adaLN_modulation.1 (a scale only), x_pad_token / cap_pad_token for
# Z-Image; `config` with dim, n_layers and n_refiner_layers (what z_image_to_diffusers reads); the forward: t = 1 -
# sigma, the caption refined, the image tokens refined with the time embedding, both through the layers with joint
# attention (caption first), the image tokens unpatchified, the output negated.
# Simplified: tiny widths and depths (backend/loader.py), torch's attention, no padding to a token multiple, no
# masks, the time embedding of Z-Image as wide as its modulation input (min(dim, 256), not 256).
import torch
from torch import nn

from backend.nn.common import EmbedND, attend, heads, patchify, positions, timestep_embedding, unpatchify
from backend.operations import ForgeOperations as ops


class JointAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads or n_heads, dim // n_heads
        self.qkv = ops.Linear(dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = ops.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, elementwise_affine=True)
        self.k_norm = nn.RMSNorm(self.head_dim, elementwise_affine=True)

    def forward(self, x, pe):
        q, k, v = torch.split(self.qkv(x), [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                            self.n_kv_heads * self.head_dim], dim=-1)
        q, k, v = heads(q, self.n_heads), heads(k, self.n_kv_heads), heads(v, self.n_kv_heads)
        return self.out(attend(self.q_norm(q), self.k_norm(k), v, pe))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = ops.Linear(dim, hidden, bias=False)
        self.w2 = ops.Linear(hidden, dim, bias=False)
        self.w3 = ops.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn_hidden, modulation=True, z_image_modulation=False):
        super().__init__()
        self.attention = JointAttention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, ffn_hidden)
        for name in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            setattr(self, name, nn.RMSNorm(dim, eps=1e-5, elementwise_affine=True))
        self.modulation = modulation
        if modulation:
            width = min(dim, 256 if z_image_modulation else 1024)
            layers = [ops.Linear(width, 4 * dim, bias=True)]
            self.adaLN_modulation = nn.Sequential(*layers) if z_image_modulation else nn.Sequential(nn.SiLU(), *layers)

    def forward(self, x, pe, adaln_input=None):
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), pe))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
        x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(
            self.attention(self.attention_norm1(x) * (1 + scale_msa.unsqueeze(1)), pe))
        return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(
            self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1))))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels, z_image_modulation):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(min(dim, 256 if z_image_modulation else 1024),
                                                                    dim, bias=True))

    def forward(self, x, c):
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c).unsqueeze(1)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, output_size=None, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(ops.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 ops.Linear(hidden_size, output_size or hidden_size, bias=True))

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size, time_factor=1.0).to(dtype))


class NextDiT(nn.Module):
    def __init__(self, patch_size=2, in_channels=16, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2,
                 n_kv_heads=None, ffn_hidden=32, cap_feat_dim=16, axes_dims=(2, 2, 4), rope_theta=10000.0,
                 z_image_modulation=False, time_scale=1.0):
        super().__init__()
        self.config = dict(dim=dim, n_layers=n_layers, n_refiner_layers=n_refiner_layers)
        self.patch_size, self.in_channels, self.out_channels, self.time_scale = patch_size, in_channels, in_channels, \
            time_scale
        block = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_hidden=ffn_hidden)
        self.x_embedder = ops.Linear(patch_size * patch_size * in_channels, dim, bias=True)
        self.noise_refiner = nn.ModuleList([JointTransformerBlock(**block, z_image_modulation=z_image_modulation)
                                            for _ in range(n_refiner_layers)])
        self.context_refiner = nn.ModuleList([JointTransformerBlock(**block, modulation=False)
                                              for _ in range(n_refiner_layers)])
        width = min(dim, 1024)
        self.t_embedder = TimestepEmbedder(width, output_size=min(dim, 256) if z_image_modulation else None)
        self.cap_embedder = nn.Sequential(nn.RMSNorm(cap_feat_dim, eps=1e-5, elementwise_affine=True),
                                          ops.Linear(cap_feat_dim, dim, bias=True))
        self.layers = nn.ModuleList([JointTransformerBlock(**block, z_image_modulation=z_image_modulation)
                                     for _ in range(n_layers)])
        self.final_layer = FinalLayer(dim, patch_size, in_channels, z_image_modulation)
        if z_image_modulation:
            self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
            self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.rope_embedder = EmbedND(dim=dim // n_heads, theta=rope_theta, axes_dim=list(axes_dims))

    def forward(self, x, timesteps, context, **kwargs):
        t = self.t_embedder((1.0 - timesteps) * self.time_scale, dtype=x.dtype)
        cap = self.cap_embedder(context)
        b, _, h, w = x.shape
        img = self.x_embedder(patchify(x, self.patch_size))
        pe = self.rope_embedder(positions(b, cap.shape[1], h // self.patch_size, w // self.patch_size, x.device))
        cap_pe, img_pe = pe[:, :, :cap.shape[1]], pe[:, :, cap.shape[1]:]
        for layer in self.context_refiner:
            cap = layer(cap, cap_pe)
        for layer in self.noise_refiner:
            img = layer(img, img_pe, t)
        joint = torch.cat((cap, img), dim=1)
        for layer in self.layers:
            joint = layer(joint, pe, t)
        out = self.final_layer(joint[:, cap.shape[1]:], t)
        return -unpatchify(out, x.shape, self.patch_size)
