# Fake of backend/patcher/vae.py and backend/nn/vae.py (stable-diffusion-webui-forge dfdcbab6): VAE with
# .first_stage_model (process_in, process_out, encode, decode, scaling_factor, shift_factor), .patcher,
# latent_channels; VAE.decode / VAE.encode load the VAE through the memory manager first (decode_inner /
# encode_inner), take and give pixels channels-last in [0, 1], and scale to [-1, 1] for the model.
# Simplified: the decoder is a fixed 1x1 conv plus 8x nearest upsampling, the encoder 8x average pooling plus a
# 1x1 conv; no tiling, no batching by free memory.
import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher


class TinyAutoencoderKL(torch.nn.Module):
    def __init__(self, latent_channels=4, scaling_factor=0.18215, shift_factor=0.0):
        super().__init__()
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.post_quant = torch.nn.Conv2d(latent_channels, 3, 1)
        self.quant = torch.nn.Conv2d(3, latent_channels, 1)

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return (latent / self.scaling_factor) + self.shift_factor

    def encode(self, x, regulation=None):
        return self.quant(torch.nn.functional.avg_pool2d(x, 8))

    def decode(self, z):
        return torch.nn.functional.interpolate(self.post_quant(z), scale_factor=8, mode="nearest")


class VAE:
    def __init__(self, model):
        self.first_stage_model = model
        self.latent_channels = model.latent_channels
        self.patcher = ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    def decode(self, samples_in):
        memory_management.load_models_gpu([self.patcher])
        pixel_samples = torch.clamp((self.first_stage_model.decode(samples_in).float() + 1.0) / 2.0, min=0.0, max=1.0)
        return pixel_samples.movedim(1, -1)

    def encode(self, pixel_samples):
        memory_management.load_models_gpu([self.patcher])
        pixel_samples = pixel_samples.movedim(-1, 1)
        return self.first_stage_model.encode(2.0 * pixel_samples - 1.0).float()
