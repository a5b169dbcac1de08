# Fake of backend/diffusion_engine/base.py (stable-diffusion-webui-forge dfdcbab6).
class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    def __init__(self):
        self.forge_objects = None
        self.forge_objects_original = None
        self.forge_objects_after_applying_lora = None
        self.current_lora_hash = str([])
        self.first_stage_model = None
        self.cond_stage_model = None
        self.use_distilled_cfg_scale = False
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False

    def get_first_stage_encoding(self, x):
        return x  # legacy code, do not change
