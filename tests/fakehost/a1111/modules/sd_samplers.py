# Follows modules/sd_samplers.py of AUTOMATIC1111 v1.10.1 (82a973c0): the sampler registry and create_sampler.
from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers = [
    *[sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: sd_samplers_kdiffusion.KDiffusionSampler(funcname, model), aliases, options)
      for label, funcname, aliases, options in sd_samplers_kdiffusion.samplers_k_diffusion],
    *[sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: sd_samplers_timesteps.CompVisSampler(funcname, model), aliases, options)
      for label, funcname, aliases, options in sd_samplers_timesteps.samplers_timesteps],
]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
samplers_for_img2img = all_samplers
samplers_map = {x.name.lower(): x.name for x in all_samplers}


def find_sampler_config(name):
    return all_samplers_map.get(name) if name is not None else all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def fix_p_invalid_sampler_and_scheduler(p):
    pass
