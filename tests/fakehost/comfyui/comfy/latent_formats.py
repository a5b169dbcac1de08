# Fake of comfy/latent_formats.py (ComfyUI 0.30.0): the latent formats' classes and scale factors.
class LatentFormat:
    scale_factor = 1.0
    latent_channels = 4

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class SD15(LatentFormat):
    def __init__(self, scale_factor=0.18215):
        self.scale_factor = scale_factor


class SDXL(LatentFormat):
    scale_factor = 0.13025


class Flux(LatentFormat):
    latent_channels = 16
    scale_factor = 0.3611
