# Fake of backend/nn/krea.py (Forge Neo 2.26): SingleStreamDiT, the Krea 2 transformer. Kept: the names, all
# separate Linear layers -- first, tmlp.0 / .2, tproj.1 (6 features), txtmlp.1 / .3 after an RMSNorm, txtfusion
# (layerwise_blocks.0-1 over each text-encoder layer, projector = Linear(layers, 1) mixing them, refiner_blocks.0-1),
# blocks.N (mod.lin: a 6 x features parameter added to the projected time, prenorm / postnorm RMSNorms holding
# `scale`, attn.wq / wk / wv with fewer key and value heads, attn.gate (sigmoid gate on the attention output),
# qknorm, attn.wo, mlp.gate / up / down: SwiGLU), last (norm, linear, modulation.lin); `config` with `layers`
# (what krea2_to_diffusers reads); the context as [B, text-encoder layers, tokens, width]. Simplified: tiny widths
# and depth, the fake text encoder's one layer given twice (once halved) as the encoder layers, torch's attention.
import torch
from torch import nn

from backend.nn.common import EmbedND, attend, heads, patchify, positions, timestep_embedding, unpatchify
from backend.operations import ForgeOperations as ops


class RMSNorm(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return torch.rms_norm(x, [x.shape[-1]], self.scale.to(x.dtype), 1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qnorm, self.knorm = RMSNorm(dim), RMSNorm(dim)


class SwiGLU(nn.Module):
    def __init__(self, features, multiplier):
        super().__init__()
        hidden = features * multiplier
        self.gate = ops.Linear(features, hidden, bias=False)
        self.up = ops.Linear(features, hidden, bias=False)
        self.down = ops.Linear(hidden, features, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    def __init__(self, dim, heads_count, kvheads):
        super().__init__()
        self.heads, self.kvheads = heads_count, kvheads
        headdim = dim // heads_count
        self.wq = ops.Linear(dim, headdim * heads_count, bias=False)
        self.wk = ops.Linear(dim, headdim * kvheads, bias=False)
        self.wv = ops.Linear(dim, headdim * kvheads, bias=False)
        self.gate = ops.Linear(dim, dim, bias=False)
        self.qknorm = QKNorm(headdim)
        self.wo = ops.Linear(dim, dim, bias=False)

    def forward(self, x, freqs=None):
        q = self.qknorm.qnorm(heads(self.wq(x), self.heads))
        k = self.qknorm.knorm(heads(self.wk(x), self.kvheads))
        out = attend(q, k, heads(self.wv(x), self.kvheads), freqs)
        return self.wo(out * torch.sigmoid(self.gate(x)))


class TextFusionBlock(nn.Module):
    def __init__(self, features, heads_count, multiplier, kvheads):
        super().__init__()
        self.prenorm, self.postnorm = RMSNorm(features), RMSNorm(features)
        self.attn = Attention(features, heads_count, kvheads)
        self.mlp = SwiGLU(features, multiplier)

    def forward(self, x):
        x = x + self.attn(self.prenorm(x))
        return x + self.mlp(self.postnorm(x))


class TextFusionTransformer(nn.Module):
    def __init__(self, num_txt_layers, txt_dim, heads_count, multiplier, kvheads):
        super().__init__()
        self.layerwise_blocks = nn.ModuleList([TextFusionBlock(txt_dim, heads_count, multiplier, kvheads)
                                               for _ in range(2)])
        self.projector = ops.Linear(num_txt_layers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList([TextFusionBlock(txt_dim, heads_count, multiplier, kvheads)
                                             for _ in range(2)])

    def forward(self, x):
        b, layers, n, d = x.shape
        x = x.reshape(b * layers, n, d)
        for block in self.layerwise_blocks:
            x = block(x)
        x = self.projector(x.reshape(b, layers, n, d).permute(0, 2, 3, 1)).squeeze(-1)
        for block in self.refiner_blocks:
            x = block(x)
        return x


class SingleStreamBlock(nn.Module):
    def __init__(self, features, heads_count, multiplier, kvheads):
        super().__init__()
        self.mod = nn.Module()
        self.mod.lin = nn.Parameter(torch.zeros(6 * features))
        self.prenorm, self.postnorm = RMSNorm(features), RMSNorm(features)
        self.attn = Attention(features, heads_count, kvheads)
        self.mlp = SwiGLU(features, multiplier)

    def forward(self, x, vec, freqs):
        prescale, preshift, pregate, postscale, postshift, postgate = (vec + self.mod.lin.to(vec)).chunk(6, dim=-1)
        x = x + pregate * self.attn((1 + prescale) * self.prenorm(x) + preshift, freqs)
        return x + postgate * self.mlp((1 + postscale) * self.postnorm(x) + postshift)


class LastLayer(nn.Module):
    def __init__(self, features, patch, channels):
        super().__init__()
        self.norm = RMSNorm(features)
        self.linear = ops.Linear(features, patch * patch * channels, bias=True)
        self.modulation = nn.Module()
        self.modulation.lin = nn.Parameter(torch.zeros(2, features))

    def forward(self, x, tvec):
        scale, shift = (tvec[:, None] + self.modulation.lin.to(tvec)[None]).unbind(1)
        return self.linear((1 + scale[:, None]) * self.norm(x) + shift[:, None])


class SingleStreamDiT(nn.Module):
    def __init__(self, channels=16, patch=2, features=16, heads_count=2, kvheads=1, multiplier=2, layers=2,
                 tdim=16, txtdim=16, txtlayers=2, axes=(2, 2, 4)):
        super().__init__()
        self.config = dict(layers=layers, features=features)
        self.patch, self.tdim, self.txtlayers = patch, tdim, txtlayers
        self.pe_embedder = EmbedND(dim=features // heads_count, theta=10000, axes_dim=list(axes))
        self.first = ops.Linear(channels * patch ** 2, features, bias=True)
        self.blocks = nn.ModuleList([SingleStreamBlock(features, heads_count, multiplier, kvheads)
                                     for _ in range(layers)])
        self.tmlp = nn.Sequential(ops.Linear(tdim, features), nn.SiLU(), ops.Linear(features, features))
        self.txtfusion = TextFusionTransformer(txtlayers, txtdim, heads_count, multiplier, kvheads)
        self.txtmlp = nn.Sequential(RMSNorm(txtdim), ops.Linear(txtdim, features), nn.SiLU(),
                                    ops.Linear(features, features))
        self.last = LastLayer(features, patch, channels)
        self.tproj = nn.Sequential(nn.SiLU(), ops.Linear(features, features * 6))

    def forward(self, x, timestep, context, **kwargs):
        b, _, h, w = x.shape
        layers = torch.stack([context * (0.5 ** i) for i in range(self.txtlayers)], dim=1)
        txt = self.txtmlp(self.txtfusion(layers))
        img = self.first(patchify(x, self.patch))
        tvec = self.tmlp(timestep_embedding(timestep, self.tdim).to(img.dtype))
        vec = self.tproj(tvec)[:, None]
        freqs = self.pe_embedder(positions(b, txt.shape[1], h // self.patch, w // self.patch, x.device))
        joint = torch.cat((txt, img), dim=1)
        for block in self.blocks:
            joint = block(joint, vec, freqs)
        return unpatchify(self.last(joint[:, txt.shape[1]:], tvec), x.shape, self.patch)
