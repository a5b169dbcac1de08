# Fake of backend/patcher/vae.py and backend/nn/vae.py (stable-diffusion-webui-forge dfdcbab6): VAE with
# .first_stage_model (process_in, process_out, decode, scaling_factor, shift_factor), .patcher, latent_channels.
# Simplified: the decoder is a fixed 1x1 conv plus 8x nearest upsampling.
import torch

from backend.patcher.base import ModelPatcher


class TinyAutoencoderKL(torch.nn.Module):
    def __init__(self, latent_channels=4):
        super().__init__()
        self.scaling_factor = 0.18215
        self.shift_factor = 0.0
        self.post_quant = torch.nn.Conv2d(latent_channels, 3, 1)

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return (latent / self.scaling_factor) + self.shift_factor

    def decode(self, z):
        return torch.nn.functional.interpolate(self.post_quant(z), scale_factor=8, mode="nearest")


class VAE:
    def __init__(self, model):
        self.first_stage_model = model
        self.latent_channels = 4
        self.patcher = ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    @torch.inference_mode()
    def decode(self, samples_in):
        return self.first_stage_model.decode(samples_in).movedim(1, -1).clamp(-1, 1) * 0.5 + 0.5
