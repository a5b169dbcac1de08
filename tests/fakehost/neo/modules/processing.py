# Fake of modules/processing.py (Forge Neo 2.26, webui/modules/processing.py): the fake Forge's generation loop
# (process_images_inner l.936-1130, img2img, create_infotext: the same order, resets of forge_objects and inference
# mode in Neo), with Neo's hires pass (sample_hr_pass l.1512-1643): hires networks activated, hires conds,
# before_hr, forge_objects reset from forge_objects_after_applying_lora, then process_before_every_sampling ONCE
# (Forge calls it a second time before that reset) and sample_img2img with a new sampler.
# Simplified as the fake Forge's: latent upscale (nearest), the hires result stays a latent.
import torch.nn.functional as F
from neo_overlay import forge_module, public

from modules import extra_networks, sd_samplers_kdiffusion, shared

_forge = forge_module("modules.processing")
globals().update(public(_forge))


class StableDiffusionProcessingTxt2Img(_forge.StableDiffusionProcessingTxt2Img):
    def sample_hr_pass(self, samples):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers_kdiffusion.KDiffusionSampler("sample_euler", self.sd_model)
        samples = F.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        noise = self.noise(tuple(samples.shape[2:]))

        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)

        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps)
        self.sampler = None
        self.is_hr_pass = False
        return samples
