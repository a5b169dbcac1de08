# Fake of backend/nn/qwen.py (Forge Neo 2.26): QwenImageTransformer2DModel. Kept: the names, all separate Linear
# layers (no fused projection) -- time_text_embed.timestep_embedder.linear_1 / linear_2, txt_norm, img_in, txt_in,
# transformer_blocks.N (img_mod.1 / txt_mod.1 = Linear(dim, 6 dim) after a SiLU, attn.to_q / to_k / to_v and
# add_q_proj / add_k_proj / add_v_proj, to_out.0, to_add_out, norm_q / norm_k / norm_added_q / norm_added_k,
# img_mlp.net.0.proj / img_mlp.net.2 and the txt_mlp twins), norm_out.linear, proj_out; the forward: 2x2 patches,
# joint attention of text then image, shift / scale / gate from each stream's modulation. Simplified: tiny widths
# and depth, torch's attention, rope on 3 axes as FLUX's.
import torch
from torch import nn

from backend.nn.common import EmbedND, attend, heads, patchify, positions, timestep_embedding, unpatchify
from backend.operations import ForgeOperations as ops


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = ops.Linear(in_channels, time_embed_dim, bias=True)
        self.act = nn.SiLU()
        self.linear_2 = ops.Linear(time_embed_dim, time_embed_dim, bias=True)

    def forward(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


class QwenTimestepProjEmbeddings(nn.Module):
    def __init__(self, embedding_dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)

    def forward(self, timestep, dtype):
        return self.timestep_embedder(timestep_embedding(timestep, 256).to(dtype))


class GELU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out, bias=True)

    def forward(self, x):
        return nn.functional.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(0.0), ops.Linear(dim * mult, dim, bias=True)])

    def forward(self, x):
        for module in self.net:
            x = module(x)
        return x


class Attention(nn.Module):
    def __init__(self, dim, heads_count, head_dim):
        super().__init__()
        self.heads = heads_count
        inner = heads_count * head_dim
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(self, name, nn.RMSNorm(head_dim, eps=1e-6))
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, name, ops.Linear(dim, inner, bias=True))
        self.to_out = nn.ModuleList([ops.Linear(inner, dim, bias=True), nn.Dropout(0.0)])
        self.to_add_out = ops.Linear(inner, dim, bias=True)

    def forward(self, img, txt, pe):
        q = torch.cat((self.norm_added_q(heads(self.add_q_proj(txt), self.heads)),
                       self.norm_q(heads(self.to_q(img), self.heads))), dim=2)
        k = torch.cat((self.norm_added_k(heads(self.add_k_proj(txt), self.heads)),
                       self.norm_k(heads(self.to_k(img), self.heads))), dim=2)
        v = torch.cat((heads(self.add_v_proj(txt), self.heads), heads(self.to_v(img), self.heads)), dim=2)
        out = attend(q, k, v, pe)
        return self.to_out[0](out[:, txt.shape[1]:]), self.to_add_out(out[:, :txt.shape[1]])


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim, num_attention_heads, attention_head_dim):
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim, bias=True)))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", FeedForward(dim))
        self.attn = Attention(dim, num_attention_heads, attention_head_dim)

    def forward(self, img, txt, temb, pe):
        img_mod = self.img_mod(temb)[:, None].chunk(6, dim=-1)
        txt_mod = self.txt_mod(temb)[:, None].chunk(6, dim=-1)
        img_attn, txt_attn = self.attn((1 + img_mod[1]) * self.img_norm1(img) + img_mod[0],
                                       (1 + txt_mod[1]) * self.txt_norm1(txt) + txt_mod[0], pe)
        img = img + img_mod[2] * img_attn
        txt = txt + txt_mod[2] * txt_attn
        img = img + img_mod[5] * self.img_mlp((1 + img_mod[4]) * self.img_norm2(img) + img_mod[3])
        txt = txt + txt_mod[5] * self.txt_mlp((1 + txt_mod[4]) * self.txt_norm2(txt) + txt_mod[3])
        return img, txt


class LastLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = ops.Linear(dim, dim * 2, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x, temb):
        scale, shift = self.linear(nn.functional.silu(temb))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class QwenImageTransformer2DModel(nn.Module):
    def __init__(self, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, axes_dims_rope=(2, 2, 4)):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.config = dict(num_layers=num_layers, dim=dim)
        self.patch_size = patch_size
        self.pe_embedder = EmbedND(dim=attention_head_dim, theta=10000, axes_dim=list(axes_dims_rope))
        self.time_text_embed = QwenTimestepProjEmbeddings(dim)
        self.txt_norm = nn.RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = ops.Linear(in_channels * patch_size * patch_size, dim)
        self.txt_in = ops.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([QwenImageTransformerBlock(dim, num_attention_heads,
                                                                           attention_head_dim)
                                                 for _ in range(num_layers)])
        self.norm_out = LastLayer(dim)
        self.proj_out = ops.Linear(dim, patch_size * patch_size * in_channels, bias=True)

    def forward(self, x, timestep, context, **kwargs):
        b, _, h, w = x.shape
        img = self.img_in(patchify(x, self.patch_size))
        txt = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timestep, img.dtype)
        pe = self.pe_embedder(positions(b, txt.shape[1], h // self.patch_size, w // self.patch_size, x.device))
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, pe)
        return unpatchify(self.proj_out(self.norm_out(img, temb)), x.shape, self.patch_size)
