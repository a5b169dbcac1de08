# Follows modules/sd_models.py of AUTOMATIC1111 v1.10.1 (82a973c0) (load_model, read_state_dict,
# reload_model_weights) and the module layout of ldm's LatentDiffusion / DiffusionWrapper / openaimodel.UNetModel
# and FrozenCLIPEmbedder, so that every module path is a real SD1.5 one
# (model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q, ...). Channel counts are tiny and the
# UNet keeps only the blocks listed in tests/data/sd15-unet-lora-layers-trimmed.tsv.
from __future__ import annotations

import contextlib
import math
import types
import zlib

import safetensors.torch
import torch
from torch import nn

from modules import devices, script_callbacks, shared

CH = 8            # model channels (320 in SD1.5)
CONTEXT = 12      # text-encoder width (768 in SD1.5)
TOKENS = 8        # tokens per prompt chunk (77 in SD1.5)
VOCAB = 64
HEADS = 2


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(2, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, ch))

    def forward(self, x, emb):
        return x + self.in_layers(x) + self.emb_layers(emb)[..., None, None]


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, c = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, -1, HEADS, c // HEADS).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * torch.nn.functional.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(2, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x)).reshape(b, c, h * w).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out(x) + x_in


class UNetModel(nn.Module):
    def __init__(self):
        super().__init__()
        emb = CH * 4
        self.time_embed = nn.Sequential(nn.Linear(CH, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Conv2d(4, CH, 3, padding=1)),
            TimestepEmbedSequential(ResBlock(CH, emb), SpatialTransformer(CH, CONTEXT)),
        ])
        self.middle_block = TimestepEmbedSequential(nn.Identity(), SpatialTransformer(CH, CONTEXT))
        self.out = nn.Sequential(nn.GroupNorm(2, CH), nn.SiLU(), nn.Conv2d(CH, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, CH))
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
        h = self.middle_block(h, emb, context)
        return self.out(h)


class DiffusionWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = UNetModel()
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class CLIPAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)
        return self.out_proj(a @ self.v_proj(x))


class CLIPMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim * 2), nn.Linear(dim * 2, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.self_attn, self.mlp = CLIPAttention(dim), CLIPMLP(dim)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(VOCAB, CONTEXT)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([CLIPEncoderLayer(CONTEXT)])
        self.text_model.final_layer_norm = nn.LayerNorm(CONTEXT)

    def forward(self, tokens):
        x = self.text_model.embeddings.token_embedding(tokens)
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x)


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = CLIPTextModel()

    @staticmethod
    def tokenize(text):
        words = text.replace(",", " ").split()
        return [zlib.crc32(w.lower().encode()) % (VOCAB - 1) + 1 for w in words]


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    """modules.sd_hijack_clip's wrapper: `.wrapped` is the original embedder. A prompt longer than one chunk is
    encoded chunk by chunk and the chunks are joined along the tokens; every text of a call gets as many chunks as
    the longest (empty chunks pad the others), so a long prompt and a short negative prompt give conds of
    different token lengths, as in the host."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts):
        token_lists = [self.wrapped.tokenize(t) for t in texts]
        chunk_count = max([1] + [-(-len(ids) // TOKENS) for ids in token_lists])
        zs = []
        for i in range(chunk_count):
            chunk = [ids[i * TOKENS:(i + 1) * TOKENS] for ids in token_lists]
            tokens = torch.tensor([ids + [0] * (TOKENS - len(ids)) for ids in chunk], dtype=torch.long)
            zs.append(self.wrapped.transformer(tokens))
        return torch.hstack(zs)


class TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 8, stride=8)
        self.decoder = nn.Conv2d(4, 3 * 64, 1)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return torch.tanh(torch.nn.functional.pixel_shuffle(self.decoder(z), 8))


class LatentDiffusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = DiffusionWrapper()
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedder())
        self.first_stage_model = TinyVAE()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).float())
        self.scale_factor = 0.18215
        self.parameterization = "eps"
        self.cond_stage_key = "txt"
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_ssd, self.is_sd3 = True, False, False, False, False
        self.latent_channels = 4
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra="tiny-sd15", filename="tiny-sd15.safetensors")
        self.sd_model_hash = "0123456789"

    @contextlib.contextmanager
    def ema_scope(self):
        yield

    def apply_model(self, x_noisy, t, cond):
        return self.model(x_noisy, t, **cond)

    def get_learned_conditioning(self, texts):
        return self.cond_stage_model(list(texts))

    @property
    def cond_stage_model_empty_prompt(self):
        return self.get_learned_conditioning([""])

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoded):
        return encoded * self.scale_factor


def build_model(seed: int = 1234) -> LatentDiffusion:
    """The same weights on every call: drawn from a private generator (the global RNG may be in use elsewhere)."""
    model = LatentDiffusion()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                # Twice the default init's range, so that every layer (and every LoRA) visibly matters.
                bound = 2.0 / math.sqrt(module.weight[0].numel())
                module.weight.copy_((torch.rand(module.weight.shape, generator=g) * 2 - 1) * bound)
                if module.bias is not None:
                    module.bias.copy_((torch.rand(module.bias.shape, generator=g) * 2 - 1) * bound)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g))
    return model.eval()


def load_model(seed: int = 1234) -> LatentDiffusion:
    model = build_model(seed)
    model.to(devices.device)
    shared.sd_model = model
    script_callbacks.model_loaded_callback(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    return shared.sd_model


def apply_token_merging(sd_model, token_merging_ratio):
    pass


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    return safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")


def read_metadata_from_safetensors(filename):
    with safetensors.safe_open(filename, framework="pt") as f:
        return dict(f.metadata() or {})


class SkipWritingToConfig(contextlib.nullcontext):
    pass
