# Fake of backend/nn/flux.py (stable-diffusion-webui-forge dfdcbab6): IntegratedFluxTransformer2DModel.
# Kept: the module tree and its names -- img_in, time_in / vector_in / guidance_in (MLPEmbedder in_layer, out_layer),
# txt_in, double_blocks.N (img_mod.lin / txt_mod.lin: Modulation with 6 chunks; img_attn / txt_attn: SelfAttention
# with the fused qkv Linear(hidden, 3 * hidden), QKNorm query_norm / key_norm RMSNorms holding `scale`, proj;
# img_mlp / txt_mlp: Sequential(Linear, GELU(tanh), Linear)), single_blocks.N (linear1 = Linear(hidden, 3 * hidden +
# mlp_hidden): q, k, v and the MLP input side by side; linear2; norm; modulation.lin with 3 chunks), final_layer
# (linear, adaLN_modulation.1) -- and the fused shapes; the forward: 2x2 patches, rope position embedding of txt and
# img ids, the double blocks on img and txt apart with joint attention (txt first), the single blocks on txt + img,
# the guidance embedding for guidance-distilled models, `config` with depth, depth_single_blocks and hidden_size
# (what the LoRA key maps read). Forge operation classes for every Linear.
# Simplified: tiny widths and depths (loader.py), torch's scaled_dot_product_attention, no fp16 clamping.
import math

import torch
from torch import nn

from backend.operations import ForgeOperations as ops


def rope(pos, dim, theta):
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = pos.unsqueeze(-1).double() * omega.unsqueeze(0)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    b, n, d, _ = out.shape
    return out.view(b, n, d, 2, 2).float()


def apply_rope(xq, xk, freqs_cis):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids):
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = ops.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = ops.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = None
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = 1e-6

    def forward(self, x):
        return torch.rms_norm(x, [x.shape[-1]], self.scale.to(x.dtype), self.eps)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        q, k = self.query_norm(q), self.key_norm(k)
        return q.to(k), k.to(q)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = ops.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = ops.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = ops.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _mlp(hidden_size, mlp_hidden_dim):
    return nn.Sequential(ops.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                         ops.Linear(mlp_hidden_dim, hidden_size, bias=True))


def _heads(qkv, heads):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", _mlp(hidden_size, mlp_hidden_dim))

    def _qkv(self, stream, x, mod):
        shift, scale = mod[0], mod[1]
        q, k, v = _heads(getattr(self, f"{stream}_attn").qkv((1 + scale) * getattr(self, f"{stream}_norm1")(x) + shift),
                         self.num_heads)
        q, k = getattr(self, f"{stream}_attn").norm(q, k, v)
        return q, k, v

    def _out(self, stream, x, attn, mod):
        x = x + mod[2] * getattr(self, f"{stream}_attn").proj(attn)
        return x + mod[5] * getattr(self, f"{stream}_mlp")((1 + mod[4]) * getattr(self, f"{stream}_norm2")(x) + mod[3])

    def forward(self, img, txt, vec, pe):
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv("img", img, img_mod)
        txt_q, txt_k, txt_v = self._qkv("txt", txt, txt_mod)
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe=pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        return self._out("img", img, img_attn, img_mod), self._out("txt", txt, txt_attn, txt_mod)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = ops.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = ops.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        return x + gate * self.linear2(torch.cat((attention(q, k, v, pe=pe), self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(self, in_channels, vec_in_dim, context_in_dim, hidden_size, mlp_ratio, num_heads, depth,
                 depth_single_blocks, axes_dim, theta, qkv_bias, guidance_embed):
        super().__init__()
        self.config = dict(depth=depth, depth_single_blocks=depth_single_blocks, hidden_size=hidden_size)
        self.guidance_embed = guidance_embed
        self.in_channels = in_channels * 4
        self.out_channels = self.in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=axes_dim)
        self.img_in = ops.Linear(self.in_channels, hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = ops.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias)
                                            for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio)
                                            for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)
        self.load_device = self.offload_device = self.initial_device = torch.device("cpu")
        self.storage_dtype = self.computation_dtype = torch.float32

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        return self.final_layer(img[:, txt.shape[1]:, ...], vec)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        bs, c, h, w = x.shape
        x = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")
        h_len, w_len = (h + 1) // 2, (w + 1) // 2
        img = x.reshape(bs, c, h_len, 2, w_len, 2).permute(0, 2, 4, 1, 3, 5).reshape(bs, h_len * w_len, c * 4)
        img_ids = torch.zeros((h_len, w_len, 3), device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.linspace(0, h_len - 1, steps=h_len, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.linspace(0, w_len - 1, steps=w_len, device=x.device, dtype=x.dtype)[None, :]
        img_ids = img_ids.reshape(1, h_len * w_len, 3).repeat(bs, 1, 1)
        txt_ids = torch.zeros((bs, context.shape[1], 3), device=x.device, dtype=x.dtype)
        out = self.inner_forward(img, img_ids, context, txt_ids, timestep, y, guidance)
        out = out.reshape(bs, h_len, w_len, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bs, c, h_len * 2, w_len * 2)
        return out[:, :, :h, :w]
