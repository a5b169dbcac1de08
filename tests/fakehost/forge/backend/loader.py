# Fake of backend/loader.py forge_loader + backend/diffusion_engine/sd15.py and sdxl.py (stable-diffusion-webui-
# forge dfdcbab6). Kept: the model is built and its state dict loaded under torch.inference_mode(), so every
# parameter is an inference tensor; forge_objects / forge_objects_original / forge_objects_after_applying_lora;
# get_learned_conditioning, encode_first_stage and decode_first_stage under inference mode; SDXL: is_sdxl, the
# UNet layout of SDXL (three levels, Linear proj_in/proj_out, two-block transformers, label_emb fed by the
# 'vector' cond: pooled text embedding + embedded image sizes), VAE scaling factor 0.13025. Simplified: random
# weights from a seed; tiny widths and depths (SDXL's transformer depths 2/10 become 2/2); one text encoder.
# The fake Forge Neo builds its model here too, with its own operation and patcher classes.
import torch

from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.nn.unet import IntegratedUNet2DConditionModel, timestep_embedding
from backend.patcher.clip import CLIP, TinyTextEncoder
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE, TinyAutoencoderKL


def _random_state_dict(model, generator):
    sd = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if hasattr(module, "in_features"):  # Forge's Linear (no weight before loading) or Neo's, an nn.Linear
            sd[prefix + "weight"] = torch.randn(module.out_features, module.in_features, generator=generator) \
                / module.in_features ** 0.5
            if hasattr(module, "dummy") or module.bias is not None:
                sd[prefix + "bias"] = torch.randn(module.out_features, generator=generator) * 0.1
        elif isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            sd[prefix + "weight"] = torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5
            sd[prefix + "bias"] = torch.randn(module.weight.shape[0], generator=generator) * 0.1
        else:
            for key, value in module.named_parameters(recurse=False):
                sd[prefix + key] = value.detach().clone()
    return sd


# backend/diffusion_engine/sdxl.py's estimated config, shrunk: channel_mult, num_res_blocks, the head width rule,
# Linear projections and where transformers sit are SDXL's.
SDXL_UNET = {"model_channels": 8, "num_res_blocks": 2, "channel_mult": (1, 2, 4), "num_classes": "sequential",
             "num_head_channels": 4, "transformer_depth": (0, 0, 2, 2, 2, 2), "context_dim": 16,
             "use_linear_in_transformer": True, "adm_in_channels": 16 + 6 * 2, "transformer_depth_middle": 2,
             "transformer_depth_output": (0, 0, 0, 2, 2, 2, 2, 2, 2)}


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


class StableDiffusionXL(StableDiffusion):
    def __init__(self, unet, clip, vae):
        super().__init__(unet, clip, vae)
        self.is_sd1 = False
        self.is_sdxl = True

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        cond = self.forge_objects.clip.cond_stage_model(list(prompt))
        clip_pooled = cond[:, -1]
        width = getattr(prompt, 'width', 1024) or 1024
        height = getattr(prompt, 'height', 1024) or 1024
        sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)  # size, crop, target
        flat = timestep_embedding(sizes, 2).flatten().unsqueeze(0).repeat(clip_pooled.shape[0], 1).to(clip_pooled)
        return {"crossattn": cond, "vector": torch.cat([clip_pooled, flat], dim=1)}


@torch.inference_mode()
def forge_loader(seed=0, family="sd15"):
    generator = torch.Generator().manual_seed(seed)
    unet_model = IntegratedUNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else {}))
    unet_model.load_state_dict(_random_state_dict(unet_model, generator))
    clip_model = TinyTextEncoder()
    vae_model = TinyAutoencoderKL(scaling_factor=0.13025 if family == "sdxl" else 0.18215)
    for module in (clip_model, vae_model):
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(param.shape[-1], 1) ** 0.5)
    engine = StableDiffusionXL if family == "sdxl" else StableDiffusion
    return engine(UnetPatcher.from_model(unet_model, diffusers_scheduler=None, config=None), CLIP(clip_model),
                  VAE(vae_model))
