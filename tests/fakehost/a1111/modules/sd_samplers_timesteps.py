# Follows modules/sd_samplers_timesteps.py and sd_samplers_timesteps_impl.py (ddim, plms, unipc) of AUTOMATIC1111
# v1.10.1 (82a973c0): VP-space x_t, integer timesteps as "sigma", epsilon outputs, get_pred_x0 from alphas_cumprod,
# and each sampler's pattern of model calls: DDIM one per step; PLMS a second one in its first step, at the next
# step's timestep; UniPC one per step on its own continuous time grid (float timesteps), none for its last step.
# Simplified: UniPC runs at order 1 (the host's default is 3; the calls are the same), time_uniform grid only.
import inspect

import torch

from modules import devices, sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model, *args, **kwargs):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.alphas = shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True

    def get_pred_x0(self, x_in, x_out, sigma):
        ts = sigma.to(dtype=int)
        a_t = self.alphas[ts][:, None, None, None]
        return (x_in - (1 - a_t).sqrt() * x_out) / a_t.sqrt()

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones(x.shape[0])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x


# Adams-Bashforth weights of the current and the earlier noise estimates, by how many earlier ones there are.
_ADAMS_BASHFORTH = {1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    def ddim_step(x, e_t, index):
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        return a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * e_t, pred_x0

    earlier = []  # the last noise estimates, newest last
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        if not earlier:
            # pseudo improved Euler: the model again at the next step's timestep, from a plain DDIM step
            x_next, _ = ddim_step(x, e_t, index)
            e_next = model(x_next, timesteps[max(index - 1, 0)].item() * s_in, **extra_args)
            e_prime = (e_t + e_next) / 2
        else:
            estimates = [e_t, *reversed(earlier)]
            e_prime = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(earlier)], estimates))
        x, pred_x0 = ddim_step(x, e_prime, index)
        earlier = [*earlier, e_t][-3:]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x


class _DiscreteVPSchedule:
    """uni_pc.NoiseScheduleVP('discrete'): continuous time t in (0, 1], log alpha interpolated linearly between the
    model's discrete steps (step k at t = (k + 1) / N)."""

    def __init__(self, alphas_cumprod):
        self.log_alphas = 0.5 * alphas_cumprod.double().log()
        self.total_n = len(self.log_alphas)

    def log_alpha(self, t):
        pos = (t * self.total_n - 1).clamp(0, self.total_n - 1)
        low = pos.floor().long()
        high = (low + 1).clamp(max=self.total_n - 1)
        return torch.lerp(self.log_alphas[low], self.log_alphas[high], pos - low)

    def alpha(self, t):
        return self.log_alpha(t).exp()

    def std(self, t):
        return (1 - (2 * self.log_alpha(t)).exp()).sqrt()

    def lambda_(self, t):
        return self.log_alpha(t) - self.std(t).log()


def unipc(model, x, timesteps, extra_args=None, callback=None, disable=None, is_img2img=False):
    ns = _DiscreteVPSchedule(model.inner_model.inner_model.alphas_cumprod)
    extra_args = {} if extra_args is None else extra_args
    steps = len(timesteps)
    t_start = timesteps[-1].item() / 1000 + 1 / 1000 if is_img2img else 1.0
    grid = torch.linspace(t_start, 1.0 / ns.total_n, steps + 1, dtype=torch.float64)

    def data_prediction(x, t):
        t_input = (t - 1.0 / ns.total_n) * 1000.0  # UniPCCFG.get_model_input_time
        eps = model(x, float(t_input) * x.new_ones(x.shape[0]), **extra_args)
        return ((x - ns.std(t) * eps) / ns.alpha(t)).to(x.dtype)

    model_prev = data_prediction(x, grid[0])
    for step in range(1, steps + 1):
        t_prev, t = grid[step - 1], grid[step]
        h_phi = torch.expm1(-(ns.lambda_(t) - ns.lambda_(t_prev)))
        x_pred = ((ns.std(t) / ns.std(t_prev)) * x - ns.alpha(t) * h_phi * model_prev).to(x.dtype)
        model_x = None
        if step < steps:  # the corrector evaluates the model at the predicted point; the last step has none
            model_x = data_prediction(x_pred, t)
            x = (x_pred - ns.alpha(t) * h_phi * 0.5 * (model_x - model_prev)).to(x.dtype)
            model_prev = model_x
        else:
            x = x_pred
        if callback is not None:
            callback({"x": x, "i": step - 1, "sigma": 0, "sigma_hat": 0, "denoised": model_x})
    return x


samplers_timesteps = [("DDIM", "ddim", ["ddim"], {}), ("PLMS", "plms", ["plms"], {}), ("UniPC", "unipc", ["unipc"], {})]
_functions = {"ddim": ddim, "plms": plms, "unipc": unipc}


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.func = _functions[funcname]
        self.eta_option_field = "eta_ddim"
        self.eta_default = 0.0
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_timesteps(self, p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps)), device=devices.device) + 1, 0, 999)

    def _run(self, p, x, conditioning, unconditional_conditioning, image_conditioning, timesteps, steps,
             is_img2img=False):
        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "timesteps" in parameters:
            extra_params_kwargs["timesteps"] = timesteps
        if is_img2img and "is_img2img" in parameters:
            extra_params_kwargs["is_img2img"] = True
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": self.s_min_uncond,
        }
        return self.launch_sampling(steps, lambda: self.func(
            self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state,
            **extra_params_kwargs))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        timesteps_sched = timesteps[:t_enc]
        ac = shared.sd_model.alphas_cumprod
        xi = x * torch.sqrt(ac[timesteps[t_enc]]) + noise * torch.sqrt(1 - ac[timesteps[t_enc]])
        self.model_wrap_cfg.init_latent = x
        return self._run(p, xi, conditioning, unconditional_conditioning, image_conditioning, timesteps_sched, t_enc + 1,
                         is_img2img=True)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)
        return self._run(p, x, conditioning, unconditional_conditioning, image_conditioning, timesteps, steps)
