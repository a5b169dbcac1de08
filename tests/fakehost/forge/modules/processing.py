# Fake of modules/processing.py (stable-diffusion-webui-forge dfdcbab6): process_images_inner (l.852-1157),
# create_infotext (l.668-797), StableDiffusionProcessingTxt2Img.sample (l.1342) and sample_hr_pass (l.1430-1539),
# StableDiffusionProcessingImg2Img.init and .sample (l.1637-1850).
# Kept, in the real order: scripts.process OUTSIDE torch.inference_mode(); inside it p.init (img2img: the init
# images resized, stacked to the batch and encoded by the VAE into init_latent), then per batch: forge_objects
# reset from forge_objects_original, before_process_batch, parse_extra_network_prompts, extra_networks.activate,
# forge_objects reset from forge_objects_after_applying_lora, process_batch, setup_conds, sample (sampler
# created, forge_objects reset again, process_before_every_sampling -- img2img with x=init_latent and the noise
# --, sampler.sample or sample_img2img), post_sample, decode, postprocess_batch, then each image's infotext (list
# values indexed, callables called with create_infotext's locals; inside the batch loop it gets the batch's own
# lists and an index within the batch); hires: activate hr networks, hr conds, before_hr,
# process_before_every_sampling, reset, process_before_every_sampling again, sample_img2img; after the loop
# deactivate and postprocess (skipped when sampling raises). Simplified: latent upscale (nearest) for hires; no
# inpainting masks, color correction or image conditioning (the real one is zeros for non-inpainting models); no
# cond cache, no saving, the infotext is only the "key: value" list (no prompt, no quoting).
import numpy as np
import torch
import torch.nn.functional as F

from modules import extra_networks, infotext_utils, scripts, sd_samplers_common, sd_samplers_kdiffusion, shared
from modules.shared import state


class StableDiffusionProcessing:
    def __init__(self, prompt="", negative_prompt="", seed=1, steps=4, cfg_scale=7.0, width=64, height=64,
                 batch_size=1, n_iter=1, script_runner=None, script_args=()):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.scripts = script_runner
        self.script_args = tuple(script_args)
        self.extra_generation_params = {}
        self.sd_model = shared.sd_model
        self.is_hr_pass = False
        self.disable_extra_networks = False
        self.enable_hr = False
        self.latents_after_sampling = []
        self.modified_noise = None
        self.sampler = None
        self.denoising_strength = 0.75
        self.hr_cfg = cfg_scale

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = [self.prompt] * n
        self.all_negative_prompts = [self.negative_prompt] * n
        self.all_seeds = [self.seed + i for i in range(n)]
        self.all_hr_prompts = list(self.all_prompts)
        self.all_hr_negative_prompts = list(self.all_negative_prompts)

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        if self.enable_hr:
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)

    def setup_conds(self):
        self.c = self.sd_model.get_learned_conditioning(self.prompts)
        self.uc = self.sd_model.get_learned_conditioning(self.negative_prompts)

    def noise(self, shape_hw):
        h, w = shape_hw
        channels = shared.sd_model.forge_objects.vae.latent_channels  # 16 for Flux (process_images_inner l.943)
        return torch.stack([torch.randn(channels, h, w, generator=torch.Generator().manual_seed(s))
                            for s in self.seeds])

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, enable_hr=False, hr_scale=2.0, hr_second_pass_steps=0, denoising_strength=0.5, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.hr_scale = hr_scale
        self.hr_second_pass_steps = hr_second_pass_steps
        self.denoising_strength = denoising_strength

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers_kdiffusion.KDiffusionSampler("sample_euler", self.sd_model)
        x = self.noise((self.height // 8, self.width // 8))

        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)

        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    def calculate_hr_conds(self):
        self.hr_c = self.sd_model.get_learned_conditioning(self.hr_prompts)
        self.hr_uc = self.sd_model.get_learned_conditioning(self.hr_negative_prompts)

    def sample_hr_pass(self, samples):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        samples = F.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        noise = self.noise(tuple(samples.shape[2:]))

        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()

        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()

        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps)
        self.sampler = None
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, resize_mode=0, denoising_strength=0.75, initial_noise_multiplier=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images
        self.resize_mode = resize_mode
        self.denoising_strength = denoising_strength
        self.initial_noise_multiplier = (shared.opts.initial_noise_multiplier if initial_noise_multiplier is None
                                         else initial_noise_multiplier)
        self.init_latent = None
        self.image_conditioning = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.sampler = sd_samplers_kdiffusion.KDiffusionSampler("sample_euler", self.sd_model)
        imgs = []
        for img in self.init_images:
            image = img.convert("RGB")
            if self.resize_mode != 3:
                image = image.resize((self.width, self.height))
            image = np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0)
            imgs.append(image)
        if len(imgs) == 1:
            batch_images = np.expand_dims(imgs[0], axis=0).repeat(self.batch_size, axis=0)
        elif len(imgs) <= self.batch_size:
            self.batch_size = len(imgs)
            batch_images = np.array(imgs)
        else:
            raise RuntimeError(f"bad number of images passed: {len(imgs)}; expecting {self.batch_size} or less")
        image = torch.from_numpy(batch_images).to(shared.device, dtype=torch.float32)
        self.init_latent = sd_samplers_common.images_tensor_to_samples(image, 0, self.sd_model)
        self.image_conditioning = self.init_latent.new_zeros(self.init_latent.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.noise(tuple(self.init_latent.shape[2:]))
        if self.initial_noise_multiplier != 1.0:
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x *= self.initial_noise_multiplier

        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        if self.modified_noise is not None:
            x = self.modified_noise
            self.modified_noise = None

        return self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                           image_conditioning=self.image_conditioning)


class Processed:
    def __init__(self, p, images_list, infotexts):
        self.images = images_list
        self.infotexts = infotexts
        self.latents = list(p.latents_after_sampling)
        self.extra_generation_params = dict(p.extra_generation_params)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    generation_params = dict(p.extra_generation_params)
    for key, value in generation_params.items():
        if isinstance(value, list):
            generation_params[key] = value[index]
        elif callable(value):
            generation_params[key] = value(**locals())
    return ", ".join(k if k == v else f"{k}: {infotext_utils.quote(v)}"
                     for k, v in generation_params.items() if v is not None)


def process_images(p):
    return process_images_inner(p)


def process_images_inner(p):
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)

    infotexts = []
    output_images = []
    with torch.inference_mode():
        p.init(p.all_prompts, p.all_seeds, None)
        for n in range(p.n_iter):
            p.iteration = n
            if state.interrupted or state.stopping_generation:
                break

            p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.hr_prompts = p.all_hr_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.hr_negative_prompts = p.all_hr_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]

            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)

            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)

            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()

            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)

            p.setup_conds()

            samples_ddim = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                                    subseeds=p.seeds, subseed_strength=0, prompts=p.prompts)
            for x_sample in samples_ddim:
                p.latents_after_sampling.append(x_sample)

            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples

            x_samples = ((p.sd_model.decode_first_stage(samples_ddim) + 1.0) / 2.0).clamp(0.0, 1.0)
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples, batch_number=n)

            def infotext(index=0, use_main_prompt=False):
                return create_infotext(p, p.prompts, p.seeds, p.seeds, use_main_prompt=use_main_prompt, index=index,
                                       all_negative_prompts=p.negative_prompts)

            for i, image in enumerate(x_samples):
                output_images.append(image)
                infotexts.append(infotext(i))

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)

    res = Processed(p, output_images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
