# Fake of modules/shared.py + modules/shared_state.py (stable-diffusion-webui-forge dfdcbab6).
# Simplified: only the options and state fields the generation path reads; options as a namespace.
from types import SimpleNamespace


class State:
    interrupted = False
    skipped = False
    stopping_generation = False
    sampling_step = 0
    sampling_steps = 0
    job_count = 0
    current_latent = None

    def interrupt(self):
        self.interrupted = True

    def begin(self, job="(unknown)"):
        self.interrupted = self.skipped = self.stopping_generation = False
        self.sampling_step = 0


# data: the saved values of extension options (modules/options.py Options.data), e.g. the DynFuse settings section.
opts = SimpleNamespace(sd_lora="None", extra_networks_default_multiplier=1.0, lora_add_hashes_to_infotext=True,
                       skip_early_cond=0.0, s_min_uncond_all=False, always_discard_next_to_last_sigma=False,
                       img2img_fix_steps=False, initial_noise_multiplier=1.0, samples_format="png", data={})
cmd_opts = SimpleNamespace(lora_dir="")
state = State()
sd_model = None
device = "cpu"
