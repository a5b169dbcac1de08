# Fake of backend/nn/chroma.py (Forge Neo 2.26): IntegratedChromaTransformer2DModel, FLUX.1 schnell without its
# per-block modulation layers. Kept: the names -- img_in, txt_in, distilled_guidance_layer (Approximator: in_proj,
# layers.N.in_layer / out_layer, norms.N, out_proj), double_blocks.N and single_blocks.N as FLUX's (img_attn.qkv,
# img_mlp.0 / .2, linear1 = q, k, v and the MLP input, linear2) but with no img_mod / txt_mod / modulation, and
# final_layer.linear without adaLN_modulation -- and `config` with depth, depth_single_blocks, hidden_size (what
# flux_to_diffusers reads); the forward: the approximator turns the timestep (and a guidance of 0) with each
# modulation index into one vector per shift / scale / gate, handed to the blocks in order (single blocks 3 each,
# double blocks 6 per stream, the final layer 2). Simplified: tiny widths, indices embedded like timesteps.
import torch
from torch import nn

from backend.nn.common import EmbedND, patchify, positions, timestep_embedding, unpatchify
from backend.nn.flux import MLPEmbedder
from backend.nn.flux2 import DoubleStreamBlock, LastLayer, SingleStreamBlock
from backend.operations import ForgeOperations as ops


class Approximator(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, n_layers):
        super().__init__()
        self.in_proj = ops.Linear(in_dim, hidden_dim, bias=True)
        self.layers = nn.ModuleList([MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers)])
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_dim) for _ in range(n_layers)])
        self.out_proj = ops.Linear(hidden_dim, out_dim)

    def forward(self, x):
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class IntegratedChromaTransformer2DModel(nn.Module):
    def __init__(self, in_channels=16, context_in_dim=16, hidden_size=16, mlp_ratio=4.0, num_heads=2, depth=2,
                 depth_single_blocks=2, axes_dim=(2, 2, 4), theta=10000, approximator_in_dim=16,
                 approximator_hidden_dim=16, approximator_layers=2):
        super().__init__()
        self.config = dict(depth=depth, depth_single_blocks=depth_single_blocks, hidden_size=hidden_size)
        self.approximator_in_dim = approximator_in_dim
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=list(axes_dim))
        self.img_in = ops.Linear(in_channels * 4, hidden_size, bias=True)
        self.txt_in = ops.Linear(context_in_dim, hidden_size)
        self.distilled_guidance_layer = Approximator(approximator_in_dim, hidden_size, approximator_hidden_dim,
                                                     approximator_layers)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias=True,
                                                              modulation=False) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio, modulation=False)
                                            for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, in_channels * 4, modulation=False)
        self.mod_index_length = 3 * depth_single_blocks + 12 * depth + 2

    def modulations(self, timestep, dtype):
        """[B, mod_index_length, hidden]: one vector per shift, scale or gate of every block."""
        half = self.approximator_in_dim // 2
        time = timestep_embedding(timestep, half // 2).to(dtype)
        guidance = timestep_embedding(torch.zeros_like(timestep), half // 2).to(dtype)
        index = timestep_embedding(torch.arange(self.mod_index_length, device=timestep.device, dtype=torch.float32),
                                   half, time_factor=1.0).to(dtype)
        own = torch.cat((time, guidance), dim=1)[:, None].expand(-1, self.mod_index_length, -1)
        return self.distilled_guidance_layer(torch.cat((own, index[None].expand(own.shape[0], -1, -1)), dim=2))

    def forward(self, x, timestep, context, **kwargs):
        b, _, h, w = x.shape
        img = self.img_in(patchify(x))
        txt = self.txt_in(context)
        mods = self.modulations(timestep, img.dtype)
        pe = self.pe_embedder(positions(b, txt.shape[1], h // 2, w // 2, x.device))
        vectors = iter(mods[:, i:i + 1] for i in range(self.mod_index_length))
        single = [[next(vectors) for _ in range(3)] for _ in self.single_blocks]
        double = [{"img": [next(vectors) for _ in range(6)], "txt": [next(vectors) for _ in range(6)]}
                  for _ in self.double_blocks]
        shift, scale = next(vectors), next(vectors)
        for block, mod in zip(self.double_blocks, double):
            img, txt = block(img, txt, mod, pe)
        joint = torch.cat((txt, img), dim=1)
        for block, mod in zip(self.single_blocks, single):
            joint = block(joint, mod, pe)
        return unpatchify(self.final_layer(joint[:, txt.shape[1]:], shift, scale), x.shape)
