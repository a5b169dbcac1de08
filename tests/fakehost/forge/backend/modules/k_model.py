# Fake of backend/modules/k_model.py and backend/modules/k_prediction.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: KModel.apply_model's signature and order (calculate_input, timestep, diffusion_model(...,
# transformer_options=..., **extra conds such as SDXL's y, Flux's y and guidance), calculate_denoised); the EPS
# predictor of SD 1.5 and SDXL (scaled-linear betas, k-diffusion sigma space: x = x0 + sigma * eps) and Flux's
# flow predictor PredictionFlux ('const': the input goes in as it is, x = (1 - sigma) * x0 + sigma * noise, the
# timestep is sigma, 10000 sigmas time-shifted by mu from diffusers' calculate_shift; schnell: mu = 1).
# Simplified: no v-prediction or EDM.
import math

import torch


class Prediction(torch.nn.Module):
    def __init__(self, linear_start=0.00085, linear_end=0.012, timesteps=1000):
        super().__init__()
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.set_sigmas(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    def set_sigmas(self, sigmas):
        self.register_buffer('sigmas', sigmas.float(), persistent=False)
        self.register_buffer('log_sigmas', sigmas.log().float(), persistent=False)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        return self.sigmas[timestep.long().clamp(0, len(self.sigmas) - 1)].to(timestep.device)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor(int((1.0 - percent) * 999))).item()

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma ** 2.0)
        else:
            noise = noise * sigma
        return noise + latent_image


class PredictionFlux(Prediction):
    def __init__(self, seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15,
                 pseudo_timestep_range=10000, mu=None):
        torch.nn.Module.__init__(self)
        if mu is None:
            slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
            mu = seq_len * slope + base_shift - slope * base_seq_len
        self.mu = mu
        t = torch.arange(1, pseudo_timestep_range + 1, 1, dtype=torch.float64) / pseudo_timestep_range
        self.set_sigmas(math.exp(mu) / (math.exp(mu) + (1 / t - 1)))

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return timestep

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent

    def calculate_input(self, sigma, noise):
        return noise

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image


class KModel(torch.nn.Module):
    def __init__(self, model, diffusers_scheduler=None, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = k_predictor if k_predictor is not None else Prediction()

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc] + [c_concat], dim=1)
        context = c_crossattn
        dtype = self.computation_dtype
        xc = xc.to(dtype)
        t = self.predictor.timestep(t).float()
        context = context.to(dtype)
        extra_conds = {}
        for o in kwargs:
            extra = kwargs[o]
            if hasattr(extra, "dtype") and extra.dtype not in (torch.int, torch.long):
                extra = extra.to(dtype)
            extra_conds[o] = extra
        model_output = self.diffusion_model(xc, t, context=context, control=control,
                                            transformer_options=transformer_options, **extra_conds).float()
        return self.predictor.calculate_denoised(sigma, model_output, x)

    def memory_required(self, input_shape):
        # Same formula as the real one (attention_pytorch scaler 1.28, fp32).
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return 1.28 * area * 4 * 16384

    def get_dtype(self):
        return self.storage_dtype
