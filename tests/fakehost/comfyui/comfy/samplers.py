# Fake of comfy/samplers.py (ComfyUI 0.30.0): calc_cond_batch, cfg_function, sampling_function, CFGGuider, sample.
# Kept as the real one: the cond and uncond entries are batched uncond first (`to_batch_temp.reverse()`), in one
# call or, when memory is short, one chunk per call; each call's transformer_options hold `cond_or_uncond` (0 =
# cond, 1 = uncond), `sigmas` (the call's sigma) and, from inner_sample on, `sample_sigmas` (the whole schedule);
# at CFG 1 the uncond pass is skipped and its output stays zeros; post-CFG functions get denoised, cond_denoised,
# uncond_denoised, sigma, model_options and input; CFGGuider.sample runs OUTER_SAMPLE wrappers around outer_sample,
# which loads the model, calls pre_run, samples, and calls cleanup in its finally.
# Simplified: a cond is one text context tensor (no areas, masks, ControlNets, hooks); one sampler (Euler); the
# memory check is the fake model_management's max_batch_rows.
import math

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    to_run = [(cond, i) for i, cond in enumerate(conds) if cond is not None]
    while to_run:
        to_batch_temp = list(range(len(to_run)))
        to_batch_temp.reverse()
        limit = comfy.model_management.max_batch_rows
        chunks = len(to_batch_temp) if limit is None else max(1, min(len(to_batch_temp), limit // x_in.shape[0]))
        to_batch = to_batch_temp[:chunks]
        input_x, contexts, cond_or_uncond = [], [], []
        for x in to_batch:
            cond, index = to_run[x]
            input_x.append(x_in)
            contexts.append(cond.expand(x_in.shape[0], -1, -1))
            cond_or_uncond.append(index)
        for x in sorted(to_batch, reverse=True):
            to_run.pop(x)
        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = {"c_crossattn": torch.cat(contexts)}
        timestep_ = torch.cat([timestep] * batch_chunks)
        transformer_options = comfy.patcher_extension.copy_nested_dicts(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {
                "input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        for o in range(batch_chunks):
            out_conds[cond_or_uncond[o]] += output[o]
    return out_conds


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    out = calc_cond_batch(model, conds, x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond,
                        uncond=uncond_)


class KSAMPLER:
    """Euler over the given sigmas, checking for an interrupt at every step (the real one's callback does)."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = model_wrap.inner_model.model_sampling.noise_scaling(sigmas[0], noise, latent_image)
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            denoised = model_wrap(x, sigmas[i] * s_in, **extra_args)
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.original_conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = cfg

    def __call__(self, *args, **kwargs):
        return self.outer_predict_noise(*args, **kwargs)

    def outer_predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self.predict_noise, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                                                     self.model_options, is_model_options=True),
        ).execute(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                 self.conds.get("positive"), self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        extra_model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": extra_model_options, "seed": seed}
        samples = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        self.inner_model, self.conds, self.loaded_models = comfy.sampler_helpers.prepare_sampling(
            self.model_patcher, noise.shape, self.conds, self.model_options)
        device = self.model_patcher.load_device
        try:
            self.model_patcher.pre_run()
            output = self.inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                       disable_pbar, seed)
        finally:
            self.model_patcher.cleanup()
        comfy.sampler_helpers.cleanup_models(self.conds, self.loaded_models)
        del self.inner_model
        del self.loaded_models
        return output

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = dict(self.original_conds)
        try:
            orig_model_options = self.model_options
            self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
            comfy.sampler_helpers.prepare_model_patcher(self.model_patcher, self.conds, self.model_options)
            executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                self.outer_sample, self,
                comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
                                                         self.model_options, is_model_options=True))
            output = executor.execute(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                      seed)
        finally:
            self.model_options = orig_model_options
        del self.conds
        return output


def simple_scheduler(model_sampling, steps):
    s = model_sampling
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def sample(model, noise, positive, negative, cfg, device, sampler, sigmas, model_options={}, latent_image=None,
           denoise_mask=None, callback=None, disable_pbar=False, seed=None):
    guider = CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
