# Follows modules/processing.py of AUTOMATIC1111 v1.10.1 (82a973c0): StableDiffusionProcessing(Txt2Img/Img2Img)
# fields, the class-level cond caches, process_images / process_images_inner in the real call order (process,
# per batch before_process_batch, parse_extra_network_prompts, extra_networks.activate ->
# after_extra_networks_activate, process_batch, setup_conds, sample -> process_before_every_sampling, hires pass
# with its own activation / before_hr / process_before_every_sampling, post_sample, decode, postprocess_batch,
# postprocess_batch_list, postprocess_image, infotext per image, deactivate, postprocess), create_infotext with
# list / callable values, and Processed.
# Simplified: no styles, face restoration, overlays, colour correction, saving, grids or refiner; latent upscale
# only for hires; `p.fake_latents` (test-only) keeps each batch's final latents for exact comparisons.
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from modules import (
    devices,
    extra_networks,
    infotext_utils,
    prompt_parser,
    scripts,
    sd_models,
    sd_samplers,
    shared,
)
from modules.shared import opts, state

opt_C = 4
opt_f = 8


class ImageRNG:
    """modules/rng.py ImageRNG: one generator per seed; next() gives a (B, C, H, W) noise batch."""

    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(shape)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def next(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(devices.device)


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    return [model.decode_first_stage(batch[i:i + 1])[0].to(target_device or devices.cpu) for i in range(batch.shape[0])]


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", styles=None, seed=-1, subseed=-1,
                 subseed_strength=0.0, seed_resize_from_h=-1, seed_resize_from_w=-1, sampler_name="Euler",
                 scheduler="Automatic", batch_size=1, n_iter=1, steps=4, cfg_scale=7.0, width=64, height=64,
                 restore_faces=False, tiling=False, do_not_save_samples=True, do_not_save_grid=True,
                 extra_generation_params=None, override_settings=None, override_settings_restore_afterwards=True,
                 disable_extra_networks=False, s_min_uncond=0.0, eta=None, **kwargs):
        self.prompt, self.negative_prompt, self.styles = prompt, negative_prompt, styles or []
        self.seed, self.subseed, self.subseed_strength = seed, subseed, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = seed_resize_from_h, seed_resize_from_w
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.batch_size, self.n_iter, self.steps, self.cfg_scale = batch_size, n_iter, steps, cfg_scale
        self.width, self.height = width, height
        self.restore_faces, self.tiling = restore_faces, tiling
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.extra_generation_params = dict(extra_generation_params or {})
        self.override_settings = dict(override_settings or {})
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.disable_extra_networks = disable_extra_networks
        self.s_min_uncond, self.eta = s_min_uncond, eta
        self.refiner_checkpoint = None
        self.scripts = None
        self.script_args = ()
        self.is_api = False
        self.user = None
        self.comments = {}
        self.sampler = None
        self.c = self.uc = None
        self.rng = None
        self.iteration = 0
        self.is_hr_pass = False
        self.extra_network_data = {}
        self.all_prompts = self.all_negative_prompts = self.all_seeds = self.all_subseeds = None
        self.prompts = self.negative_prompts = self.seeds = self.subseeds = None
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        self.fake_latents = []
        for k, v in kwargs.items():
            setattr(self, k, v)

    @property
    def sd_model(self):
        return shared.sd_model

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else n * [self.prompt]
        self.all_negative_prompts = (list(self.negative_prompt) if isinstance(self.negative_prompt, list)
                                     else n * [self.negative_prompt])
        self.main_prompt, self.main_negative_prompt = self.all_prompts[0], self.all_negative_prompts[0]

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        return (required_prompts, steps, hires_steps, use_old_scheduling, opts.CLIP_stop_at_last_layers,
                shared.sd_model.sd_checkpoint_info, extra_network_data)

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        cached_params = self.cached_params(required_prompts, steps, extra_network_data, hires_steps)
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, False)
        cache[0] = cached_params
        return cache[1]

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(self.negative_prompts, is_negative_prompt=True)
        config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = config.total_steps(self.steps) if config else self.steps
        self.firstpass_steps = total_steps
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negative_prompts, total_steps,
                                              [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts, total_steps,
                                             [self.cached_c], self.extra_network_data)

    def get_conds(self):
        return self.c, self.uc

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        raise NotImplementedError()

    def txt2img_image_conditioning(self, x):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def get_token_merging_ratio(self, for_hr=False):
        return 0

    def close(self):
        self.sampler = None
        self.c = self.uc = None


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    def __init__(self, enable_hr=False, denoising_strength=0.75, hr_scale=2.0, hr_upscaler="Latent",
                 hr_second_pass_steps=0, hr_prompt="", hr_negative_prompt="", hr_sampler_name=None, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr, self.denoising_strength, self.hr_scale = enable_hr, denoising_strength, hr_scale
        self.hr_upscaler, self.hr_second_pass_steps = hr_upscaler, hr_second_pass_steps
        self.hr_prompt, self.hr_negative_prompt, self.hr_sampler_name = hr_prompt, hr_negative_prompt, hr_sampler_name
        self.hr_c = self.hr_uc = None
        self.hr_extra_network_data = None
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c
        self.latent_scale_mode = {"mode": "nearest", "antialias": False}

    def setup_prompts(self):
        super().setup_prompts()
        if not self.enable_hr:
            return
        n = len(self.all_prompts)
        self.all_hr_prompts = n * [self.hr_prompt or self.prompt] if isinstance(self.prompt, str) else \
            [self.hr_prompt or x for x in self.all_prompts]
        self.all_hr_negative_prompts = n * [self.hr_negative_prompt or self.all_negative_prompts[0]]

    def init(self, all_prompts, all_seeds, all_subseeds):
        if self.enable_hr:
            self.extra_generation_params["Denoising strength"] = self.denoising_strength
            self.extra_generation_params["Hires upscale"] = self.hr_scale
            if self.hr_second_pass_steps:
                self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps
            self.extra_generation_params["Hires upscaler"] = self.hr_upscaler

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        target_h, target_w = int(self.height * self.hr_scale), int(self.width * self.hr_scale)
        samples = torch.nn.functional.interpolate(samples, size=(target_h // opt_f, target_w // opt_f),
                                                  mode=self.latent_scale_mode["mode"])
        image_conditioning = self.txt2img_image_conditioning(samples)
        shared.state.nextjob()
        self.rng = ImageRNG(samples.shape[1:], self.seeds)
        noise = self.rng.next()
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=image_conditioning)
        self.sampler = None
        self.is_hr_pass = False
        return samples

    def calculate_hr_conds(self):
        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts)
        hr_negative_prompts = prompt_parser.SdConditioning(self.hr_negative_prompts, is_negative_prompt=True)
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        steps = self.hr_second_pass_steps or self.steps
        total_steps = config.total_steps(steps) if config else steps
        self.hr_uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, hr_negative_prompts,
                                                 self.firstpass_steps, [self.cached_hr_uc, self.cached_uc],
                                                 self.hr_extra_network_data, total_steps)
        self.hr_c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, hr_prompts,
                                                self.firstpass_steps, [self.cached_hr_c, self.cached_c],
                                                self.hr_extra_network_data, total_steps)

    def get_conds(self):
        if self.is_hr_pass:
            return self.hr_c, self.hr_uc
        return super().get_conds()

    def parse_extra_network_prompts(self):
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            n, b = self.iteration, self.batch_size
            self.hr_prompts = self.all_hr_prompts[n * b:(n + 1) * b]
            self.hr_negative_prompts = self.all_hr_negative_prompts[n * b:(n + 1) * b]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)
        return res


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, denoising_strength=0.75, resize_mode=0, initial_noise_multiplier=1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.init_images, self.denoising_strength, self.resize_mode = init_images or [], denoising_strength, resize_mode
        self.initial_noise_multiplier = initial_noise_multiplier
        self.init_latent = None
        self.image_conditioning = None
        self.mask = self.nmask = None
        self.image_cfg_scale = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        image = self.init_images[0].convert("RGB").resize((self.width, self.height))
        arr = np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0)
        batch = torch.from_numpy(np.stack([arr] * self.batch_size)) * 2.0 - 1.0
        model = self.sd_model
        self.init_latent = model.get_first_stage_encoding(model.encode_first_stage(batch.to(devices.device)))
        self.image_conditioning = self.init_latent.new_zeros(self.init_latent.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        return self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                           image_conditioning=self.image_conditioning)


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.info = info
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.width, self.height = p.width, p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale, self.steps, self.batch_size = p.cfg_scale, p.steps, p.batch_size
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.infotexts = infotexts or [info] * len(images_list)

    def infotext(self, p, index):
        return create_infotext(p, self.all_prompts, self.all_seeds, [], comments=[], position_in_batch=index % self.batch_size,
                               iteration=index // self.batch_size)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts

    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]

    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model.sd_model_hash if opts.add_model_hash_to_info else None,
        "Model": p.sd_model.sd_checkpoint_info.name_for_extra if opts.add_model_name_to_info else None,
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        **p.extra_generation_params,
        "Version": "v1.10.1" if opts.add_version_to_infotext else None,
        "User": None,
    }

    for key, value in generation_params.items():
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**locals())
        except Exception:
            from modules import errors

            errors.report(f'Error creating infotext for key "{key}"', exc_info=True)
            generation_params[key] = None

    generation_params_text = ", ".join([k if k == v else f"{k}: {infotext_utils.quote(v)}"
                                        for k, v in generation_params.items() if v is not None])
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_prompt_text}\n{generation_params_text}".strip()


def get_fixed_seed(seed):
    return 1 if seed is None or seed == "" or seed == -1 else seed


def process_images(p: StableDiffusionProcessing) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {k: opts.data[k] for k in p.override_settings.keys() if k in opts.data}
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)
    return res


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)
    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    p.setup_prompts()
    p.all_seeds = [int(seed) + x for x in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts = []
    output_images = []
    with torch.no_grad(), p.sd_model.ema_scope():
        with devices.autocast():
            p.init(p.all_prompts, p.all_seeds, p.all_subseeds)

        if state.job_count == -1:
            state.job_count = p.n_iter

        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break

            sd_models.reload_model_weights()
            b = p.batch_size
            p.prompts = p.all_prompts[n * b:(n + 1) * b]
            p.negative_prompts = p.all_negative_prompts[n * b:(n + 1) * b]
            p.seeds = p.all_seeds[n * b:(n + 1) * b]
            p.subseeds = p.all_subseeds[n * b:(n + 1) * b]
            p.rng = ImageRNG((opt_C, p.height // opt_f, p.width // opt_f), p.seeds, subseeds=p.subseeds)

            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            if len(p.prompts) == 0:
                break

            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                with devices.autocast():
                    extra_networks.activate(p, p.extra_network_data)

            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            p.setup_conds()

            with devices.autocast():
                samples_ddim = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                                        subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)

            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples

            p.fake_latents.append(samples_ddim.detach().clone())
            devices.test_for_nans(samples_ddim, "unet")
            x_samples_ddim = decode_latent_batch(p.sd_model, samples_ddim, target_device=devices.cpu)
            x_samples_ddim = torch.stack(x_samples_ddim).float()
            x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)
            state.nextjob()

            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)
                p.prompts = p.all_prompts[n * b:(n + 1) * b]
                p.negative_prompts = p.all_negative_prompts[n * b:(n + 1) * b]
                batch_params = scripts.PostprocessBatchListArgs(list(x_samples_ddim))
                p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
                x_samples_ddim = batch_params.images

            def infotext(index=0, use_main_prompt=False):
                return create_infotext(p, p.prompts, p.seeds, p.subseeds, use_main_prompt=use_main_prompt,
                                       index=index, all_negative_prompts=p.negative_prompts)

            for i, x_sample in enumerate(x_samples_ddim):
                p.batch_index = i
                x_sample = (255. * np.moveaxis(x_sample.cpu().numpy(), 0, 2)).astype(np.uint8)
                image = Image.fromarray(x_sample)
                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image(p, pp)
                    image = pp.image
                text = infotext(i)
                infotexts.append(text)
                if opts.enable_pnginfo:
                    image.info["parameters"] = text
                output_images.append(image)

        if not infotexts:
            infotexts.append(Processed(p, []).infotext(p, 0))

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)

    res = Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0],
                    subseed=p.all_subseeds[0], infotexts=infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
