# Fake of modules/sd_samplers_common.py (stable-diffusion-webui-forge dfdcbab6): InterruptedException,
# Sampler.initialize / callback_state / launch_sampling. Kept: state.sampling_step is updated AFTER each model
# call (so CFG callbacks see it lag by one), an interrupt returns the last latent.
from modules import shared


class InterruptedException(BaseException):
    pass


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
