# Fake of modules/sd_samplers_cfg_denoiser.py (stable-diffusion-webui-forge dfdcbab6): CFGDenoiser.forward.
# Kept: interrupt check, CFGDenoiserParams with the UN-duplicated [B] batch, cfg_denoiser_callback, Forge's
# sampling_function (which reads x/sigma/conds back from the params), NO cfg_denoised callback,
# AfterCFGCallbackParams with the x0 prediction read back, step += 1. Simplified: no masks, refiner, NGMS,
# skip-early-CFG or timestep-sampler eps conversion.
import torch

from backend.sampling.sampling_function import sampling_function
from modules import prompt_parser, sd_samplers_common
from modules.script_callbacks import AfterCFGCallbackParams, CFGDenoiserParams, cfg_after_cfg_callback, cfg_denoiser_callback
from modules.shared import state


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.sampler = sampler
        self.p = None

    @property
    def inner_model(self):
        raise NotImplementedError()

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None

        denoiser_params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps,
                                            cond, uncond, self)
        cfg_denoiser_callback(denoiser_params)

        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg

        denoised, cond_pred, uncond_pred = sampling_function(self, denoiser_params=denoiser_params,
                                                             cond_scale=cond_scale, cond_composition=cond_composition)

        preview = self.sampler.last_latent = denoised
        sd_samplers_common.store_latent(preview)

        after_cfg_callback_params = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after_cfg_callback_params)
        denoised = after_cfg_callback_params.x

        self.step += 1
        return denoised
