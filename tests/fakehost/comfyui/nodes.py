# Fake of nodes.py (ComfyUI 0.30.0): LoraLoader and LoraLoaderModelOnly as the real ones (a file read once per
# node, comfy.sd.load_lora_for_models at the two strengths; both strengths 0 returns the inputs), and
# common_ksampler (KSampler): noise from the seed, the simple schedule, comfy.samplers.sample.
import torch

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths


class LoraLoader:
    def __init__(self):
        self.loaded_lora = None

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        lora_path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = None
        if self.loaded_lora is not None:
            if self.loaded_lora[0] == lora_path:
                lora = self.loaded_lora[1]
            else:
                self.loaded_lora = None
        if lora is None:
            lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
            self.loaded_lora = (lora_path, lora)
        model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
        return (model_lora, clip_lora)


class LoraLoaderModelOnly(LoraLoader):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"

    def load_lora_model_only(self, model, lora_name, strength_model):
        return (self.load_lora(model, None, lora_name, strength_model, 0)[0],)


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0):
    latent_image = latent["samples"]
    generator = torch.manual_seed(seed)
    noise = torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                        generator=generator, device="cpu")
    sigmas = comfy.samplers.simple_scheduler(model.model.model_sampling, steps)
    samples = comfy.samplers.sample(model, noise, positive, negative, cfg, comfy.model_management.get_torch_device(),
                                    comfy.samplers.KSAMPLER(), sigmas, latent_image=latent_image, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return (out,)
