# Fake of modules/sd_samplers_kdiffusion.py (stable-diffusion-webui-forge dfdcbab6) with k-diffusion's
# sample_euler. Kept: sample/sample_img2img call sampling_prepare (the LoRA merge happens there) on the
# CURRENT forge_objects.unet, img2img steps from setup_img2img_steps and sigma_sched = sigmas[steps - t_enc - 1:],
# the init latent noised to the first sigma and kept as the denoiser's init_latent, launch_sampling,
# sampling_cleanup only after a normal return. Simplified: Euler only, "Automatic" = evenly spaced timesteps.
import torch

from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = ForgeScheduleLinker(shared.sd_model.forge_objects.unet.model.predictor)
            self.model_wrap.inner_model = shared.sd_model
        return self.model_wrap


class ForgeScheduleLinker:
    def __init__(self, predictor):
        self.predictor = predictor
        self.sigmas = predictor.sigmas
        self.inner_model = None

    def get_sigmas(self, n):
        t = torch.linspace(len(self.sigmas) - 1, 0, n).round().long()
        return torch.cat([self.sigmas[t], self.sigmas.new_zeros([1])])


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.func = sample_euler
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        return self.model_wrap.get_sigmas(steps).cpu()

    def _extra_args(self, p, cond, uncond, image_cond):
        self.sampler_extra_args = {'cond': cond, 'image_cond': image_cond, 'uncond': uncond,
                                   'cond_scale': p.cfg_scale, 's_min_uncond': self.s_min_uncond}
        return self.sampler_extra_args

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        unet_patcher = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(self.model_wrap.inner_model.forge_objects.unet, x=x)
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps).to(x.device)
        sigma_sched = sigmas[steps - t_enc - 1:]
        x = x.to(noise)
        xi = self.model_wrap.predictor.noise_scaling(sigma_sched[0], noise, x, max_denoise=False)
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        samples = self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, sigma_sched,
                                                                    extra_args=extra_args, callback=self.callback_state))
        sampling_cleanup(unet_patcher)
        return samples

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        unet_patcher = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(self.model_wrap.inner_model.forge_objects.unet, x=x)
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps).to(x.device)
        x = self.model_wrap.predictor.noise_scaling(sigmas[0], x, torch.zeros_like(x), max_denoise=False)
        self.initialize(p)
        self.last_latent = x
        extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        samples = self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, sigmas,
                                                                extra_args=extra_args, callback=self.callback_state))
        sampling_cleanup(unet_patcher)
        return samples
