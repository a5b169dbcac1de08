# Fake of backend/loader.py forge_loader + the diffusion engines Forge Neo 2.26 adds (backend/diffusion_engine/
# zimage.py, lumina.py, qwen.py, chroma.py, flux2.py, wan.py, krea.py). SD 1.5, SDXL and FLUX.1 load as in the fake
# Forge's loader (Neo's engines for them are Forge's). Kept for the new families: the transformer of backend/nn/
# (tiny), the flow predictor, the conditioning a plain tensor of text features (crossattn), all is_* flags False but
# Wan's is_wan, `model_config.latent_format` (huggingface_guess's latent formats: Flux -- 16 channels, scale 0.3611,
# shift 0.1159 -- for Z-Image, Lumina 2 and Chroma; Wan21 for Qwen-Image, Wan and Krea 2; Flux2 for Flux.2) and the
# model config's huggingface_repo (model_list.py), which Neo's LoRA key maps read to pick a family's names; the
# model built and its weights loaded under inference mode. Simplified: random weights from a seed, one tiny text
# encoder for every family's (T5, Qwen, Gemma, UMT5), a 16-channel latent for every family, no GGUF.
from types import SimpleNamespace

import torch

from neo_overlay import forge_module

from backend.modules.k_model import PredictionFlux
from backend.patcher.clip import CLIP, TinyTextEncoder
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE, TinyAutoencoderKL

_forge = forge_module("backend.loader")
StableDiffusion = _forge.StableDiffusion


class LatentFormat:
    latent_channels = 16
    scale_factor = 1.0
    shift_factor = 0.0


class Flux(LatentFormat):
    scale_factor, shift_factor = 0.3611, 0.1159


class Wan21(LatentFormat):
    pass


class Flux2(LatentFormat):
    pass


def _family(module, cls, repo, latent, **config):
    return SimpleNamespace(module=module, cls=cls, repo=repo, latent=latent, config=config)


# Each family's transformer at width 16 (Lumina 2: 32, for four query heads over two key/value heads).
FAMILIES = {
    "zimage": _family("lumina", "NextDiT", "Tongyi-MAI/Z-Image-Turbo", Flux, z_image_modulation=True,
                      time_scale=1000.0),
    "lumina2": _family("lumina", "NextDiT", "neta-art/Neta-Lumina", Flux, dim=32, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64),
    "qwen": _family("qwen", "QwenImageTransformer2DModel", "Qwen/Qwen-Image", Wan21),
    "chroma": _family("chroma", "IntegratedChromaTransformer2DModel", "Chroma", Flux),
    "flux2": _family("flux2", "Flux2Transformer", "black-forest-labs/FLUX.2-klein-4B", Flux2),
    "wan": _family("wan", "WanModel", "Wan-AI/Wan2.1-T2V-14B", Wan21),
    "krea2": _family("krea", "SingleStreamDiT", "krea/Krea-2-Raw", Wan21),
}


class NeoFamilyEngine(StableDiffusion):
    def __init__(self, unet, clip, vae, family, latent_format):
        super().__init__(unet, clip, vae)
        self.is_sd1 = False
        self.is_wan = family == "wan"
        self.model_config = SimpleNamespace(latent_format=latent_format)


def _random_weights(model, generator):
    """Every parameter from the seed: matrices and kernels scaled by their fan-in, biases and modulation tables
    small, norm scales around one."""
    sd = {}
    for name, param in model.state_dict().items():
        if param.ndim >= 2 and not name.endswith("modulation") and "pad_token" not in name:
            fan_in = param[0].numel()
            sd[name] = torch.randn(param.shape, generator=generator) / fan_in ** 0.5
        elif name.endswith(("norm.scale", "norm.weight")) or ".scale" in name or "norm" in name.rsplit(".", 1)[0]:
            sd[name] = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            sd[name] = 0.1 * torch.randn(param.shape, generator=generator)
    return sd


@torch.inference_mode()
def forge_loader(seed=0, family="sd15", storage_dtype=torch.float32, computation_dtype=None):
    if family not in FAMILIES:
        return _forge.forge_loader(seed, family, storage_dtype=storage_dtype, computation_dtype=computation_dtype)
    import importlib

    spec = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    model = getattr(importlib.import_module(f"backend.nn.{spec.module}"), spec.cls)(**spec.config)
    model.load_device = model.offload_device = model.initial_device = torch.device("cpu")
    model.load_state_dict(_random_weights(model, generator))
    _forge._stored(model, storage_dtype, computation_dtype or storage_dtype)
    latent = spec.latent()
    vae_model = TinyAutoencoderKL(latent_channels=latent.latent_channels, scaling_factor=latent.scale_factor,
                                  shift_factor=latent.shift_factor)
    clip_model = TinyTextEncoder()
    for module in (clip_model, vae_model):
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(param.shape[-1], 1) ** 0.5)
    config = SimpleNamespace(huggingface_repo=spec.repo)
    unet = UnetPatcher.from_model(model, diffusers_scheduler=None, config=config, k_predictor=PredictionFlux())
    return NeoFamilyEngine(unet, CLIP(clip_model), VAE(vae_model), family, latent)
