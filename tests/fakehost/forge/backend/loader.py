# Fake of backend/loader.py forge_loader + backend/diffusion_engine/sd15.py (stable-diffusion-webui-forge
# dfdcbab6). Kept: the model is built and its state dict loaded under torch.inference_mode(), so every
# parameter is an inference tensor; forge_objects / forge_objects_original / forge_objects_after_applying_lora;
# get_learned_conditioning, encode_first_stage and decode_first_stage under inference mode. Simplified: random
# weights from a seed.
import torch

from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.nn.unet import IntegratedUNet2DConditionModel
from backend.patcher.clip import CLIP, TinyTextEncoder
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE, TinyAutoencoderKL


def _random_state_dict(model, generator):
    sd = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if hasattr(module, "in_features") and hasattr(module, "dummy"):
            sd[prefix + "weight"] = torch.randn(module.out_features, module.in_features, generator=generator) \
                / module.in_features ** 0.5
            sd[prefix + "bias"] = torch.randn(module.out_features, generator=generator) * 0.1
        elif isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            sd[prefix + "weight"] = torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5
            sd[prefix + "bias"] = torch.randn(module.weight.shape[0], generator=generator) * 0.1
        else:
            for key, value in module.named_parameters(recurse=False):
                sd[prefix + key] = value.detach().clone()
    return sd


class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, unet, clip, vae):
        super().__init__()
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sd1 = True
        self.cond_stage_model_empty_prompt = None

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        return self.forge_objects.clip.cond_stage_model(list(prompt))

    @torch.inference_mode()
    def encode_first_stage(self, x):
        sample = self.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        sample = self.forge_objects.vae.first_stage_model.process_in(sample)
        return sample.to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        vae = self.forge_objects.vae
        sample = vae.first_stage_model.process_out(x)
        return vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0


@torch.inference_mode()
def forge_loader(seed=0):
    generator = torch.Generator().manual_seed(seed)
    unet_model = IntegratedUNet2DConditionModel()
    unet_model.load_state_dict(_random_state_dict(unet_model, generator))
    clip_model = TinyTextEncoder()
    vae_model = TinyAutoencoderKL()
    for module in (clip_model, vae_model):
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(param.shape[-1], 1) ** 0.5)
    return StableDiffusion(UnetPatcher.from_model(unet_model), CLIP(clip_model), VAE(vae_model))
