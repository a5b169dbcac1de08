# Fake of modules/sd_samplers_common.py (stable-diffusion-webui-forge dfdcbab6): InterruptedException,
# setup_img2img_steps, images_tensor_to_samples, Sampler.initialize / callback_state / launch_sampling. Kept:
# state.sampling_step is updated AFTER each model call (so CFG callbacks see it lag by one), an interrupt returns
# the last latent, img2img steps as the real rule (fixed steps for hires), init images encoded one by one by the
# full VAE through sd_model.encode_first_stage. Simplified: no TAESD or approximate encoders.
import torch

from modules import shared
from modules.shared import opts


class InterruptedException(BaseException):
    pass


def setup_img2img_steps(p, steps=None):
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = (steps or p.steps)
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


def images_tensor_to_samples(image, approximation=None, model=None):
    '''image[0, 1] -> latent'''
    if model is None:
        model = shared.sd_model
    image = image.to(shared.device, dtype=torch.float32)
    image = image * 2 - 1
    if len(image) > 1:
        return torch.stack([model.get_first_stage_encoding(model.encode_first_stage(torch.unsqueeze(img, 0)))[0]
                            for img in image])
    return model.get_first_stage_encoding(model.encode_first_stage(image))


def apply_refiner(cfg_denoiser, x):
    return False


def store_latent(decoded):
    shared.state.current_latent = decoded


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.stop_at = None
        self.last_latent = None
        self.s_min_uncond = 0.0
        self.p = None

    def callback_state(self, d):
        shared.state.sampling_step = d['i']

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = None
        self.model_wrap_cfg.nmask = None
        self.model_wrap_cfg.step = 0
        self.s_min_uncond = getattr(p, 's_min_uncond', 0.0)
        return {}
