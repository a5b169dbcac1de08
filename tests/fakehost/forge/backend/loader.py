# Fake of backend/loader.py forge_loader + backend/diffusion_engine/sd15.py and sdxl.py (stable-diffusion-webui-
# forge dfdcbab6). Kept: the model is built and its state dict loaded under torch.inference_mode(), so every
# parameter is an inference tensor; forge_objects / forge_objects_original / forge_objects_after_applying_lora;
# get_learned_conditioning, encode_first_stage and decode_first_stage under inference mode; SDXL: is_sdxl, the
# UNet layout of SDXL (three levels, Linear proj_in/proj_out, two-block transformers, label_emb fed by the
# 'vector' cond: pooled text embedding + embedded image sizes), VAE scaling factor 0.13025; Flux (backend/
# diffusion_engine/flux.py): the Flux transformer (backend/nn/flux.py) with the flow predictor, conds crossattn
# (T5), vector (CLIP-L pooled) and guidance (the distilled CFG scale, for dev), a 16-channel VAE with Flux's
# scaling and shift factors, all is_* flags False; weights stored in the storage dtype (bf16, or fp8 with the
# layers casting them to the computation dtype, as Forge's manual cast does) or quantized ("gguf": the
# transformer built under using_forge_operations with GGUF layers, its block weights quantized, storage dtype
# 'gguf'), the LoRA key maps' model config (huggingface_repo), Flux's model_config.latent_format (channels, scale and
# shift). Simplified: random weights from a seed; tiny widths and depths (SDXL's transformer depths
# 2/10 become 2/2, Flux's 19 + 38 blocks 2 + 2 at width 16); one text encoder stands in for CLIP and T5; the
# distilled CFG scale is always Forge's default 3.5. The fake Forge Neo builds its model here too, with its own
# operation and patcher classes.
import torch

from types import SimpleNamespace

from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.modules.k_model import PredictionFlux
from backend.nn.flux import IntegratedFluxTransformer2DModel
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


# Flux.1-dev's config (huggingface_guess), shrunk: two double and two single blocks at width 16, two heads of 8
# channels (axes 2 + 2 + 4), MLP ratio 4, 16 latent channels in 2x2 patches, qkv bias, the guidance embedding.
FLUX_TRANSFORMER = {"in_channels": 16, "vec_in_dim": 16, "context_in_dim": 16, "hidden_size": 16, "mlp_ratio": 4.0,
                    "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [2, 2, 4], "theta": 10000,
                    "qkv_bias": True, "guidance_embed": True}
REPOS = {"sd15": "runwayml/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
         "flux": "black-forest-labs/FLUX.1-dev"}


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


class Flux(StableDiffusion):
    def __init__(self, unet, clip, vae):
        super().__init__(unet, clip, vae)
        self.is_sd1 = False
        self.use_distilled_cfg_scale = True
        # huggingface_guess's latent format for Flux (the estimated config's latent_format)
        self.model_config = SimpleNamespace(latent_format=SimpleNamespace(
            latent_channels=16, scale_factor=0.3611, shift_factor=0.1159))

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        cond = self.forge_objects.clip.cond_stage_model(list(prompt))
        distilled_cfg_scale = getattr(prompt, 'distilled_cfg_scale', 3.5) or 3.5
        return {"crossattn": cond, "vector": cond[:, -1],
                "guidance": torch.FloatTensor([distilled_cfg_scale] * len(prompt))}


def _stored(model, storage_dtype, computation_dtype):
    """The layers' weights in the storage dtype; layers cast them to the computation dtype when the two differ. GGUF:
    the weights of the blocks' layers quantized (a GGUF file keeps the small layers unquantized)."""
    model.storage_dtype, model.computation_dtype = storage_dtype, computation_dtype
    if storage_dtype == "gguf":
        from backend.operations_gguf import ParameterGGUF

        for name, module in model.named_modules():
            if hasattr(module, "in_features") and "blocks." in name:
                module.weight = ParameterGGUF.quantized(module.weight, computation_dtype)
        return
    for module in model.modules():
        if hasattr(module, "in_features"):
            module.to(storage_dtype)
            module.parameters_manual_cast = storage_dtype != computation_dtype


def _flux_transformer(storage_dtype):
    if storage_dtype != "gguf":
        return IntegratedFluxTransformer2DModel(**FLUX_TRANSFORMER)
    from backend.operations import ForgeOperationsGGUF, using_forge_operations  # the fake Forge's: Neo's has no GGUF

    with using_forge_operations(ForgeOperationsGGUF):
        return IntegratedFluxTransformer2DModel(**FLUX_TRANSFORMER)


@torch.inference_mode()
def forge_loader(seed=0, family="sd15", storage_dtype=torch.float32, computation_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    if family == "flux":
        unet_model = _flux_transformer(storage_dtype)
        predictor = PredictionFlux()
        vae_model = TinyAutoencoderKL(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    else:
        unet_model = IntegratedUNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else {}))
        predictor = None
        vae_model = TinyAutoencoderKL(scaling_factor=0.13025 if family == "sdxl" else 0.18215)
    unet_model.load_state_dict(_random_state_dict(unet_model, generator))
    _stored(unet_model, storage_dtype, computation_dtype or (torch.float32 if storage_dtype == "gguf" else storage_dtype))
    clip_model = TinyTextEncoder()
    for module in (clip_model, vae_model):
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(param.shape[-1], 1) ** 0.5)
    engine = {"sdxl": StableDiffusionXL, "flux": Flux}.get(family, StableDiffusion)
    config = SimpleNamespace(huggingface_repo=REPOS[family])
    return engine(UnetPatcher.from_model(unet_model, diffusers_scheduler=None, config=config, k_predictor=predictor),
                  CLIP(clip_model), VAE(vae_model))
