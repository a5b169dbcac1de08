# Follows modules/shared.py, modules/shared_options.py, modules/shared_state.py and modules/shared_cmd_options.py
# of AUTOMATIC1111 v1.10.1 (82a973c0). Only the options the processing loop, Lora and infotext read exist.
import types

from modules import options

OptionInfo = options.OptionInfo
options_section = options.options_section

cmd_opts = types.SimpleNamespace(
    lora_dir="", lyco_dir_backcompat="", no_prompt_history=True, hide_ui_dir_config=False,
    embeddings_dir="/nonexistent", disable_extension_access=False, api=True, nowebui=False,
)

options_templates = {}
options_templates.update(options_section(("saving-images", "Saving images/grids", "saving"), {
    "samples_format": OptionInfo("png", "File format for images"),
}))
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo("tiny-sd15.safetensors", "Stable Diffusion checkpoint"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
    "skip_early_cond": OptionInfo(0.0, "Ignore negative prompt during early sampling"),
    "s_min_uncond_all": OptionInfo(False, "NGMS: Skip every step"),
    "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt"),
    "pad_cond_uncond_v0": OptionInfo(False, "Pad prompt/negative prompt (v0)"),
    "live_preview_content": OptionInfo("Prompt", "Live preview subject"),
    "use_old_scheduling": OptionInfo(False, "Use old prompt editing timelines"),
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
    "add_version_to_infotext": OptionInfo(True, "Add program version to generation information"),
    "add_model_hash_to_info": OptionInfo(True, "Add model hash to infotext"),
    "add_model_name_to_info": OptionInfo(True, "Add model name to infotext"),
    "enable_pnginfo": OptionInfo(True, "Write infotext to metadata of the generated image"),
    "infotext_skip_pasting": OptionInfo([], "Disregard fields from pasted infotext"),
    "return_grid": OptionInfo(False, "Show grid in gallery"),
    "eta_noise_seed_delta": OptionInfo(0, "Eta noise seed delta"),
    "img2img_extra_noise": OptionInfo(0.0, "Extra noise multiplier for img2img and hires fix"),
    "always_discard_next_to_last_sigma": OptionInfo(False, "Always discard next-to-last sigma"),
    "prioritized_callbacks_cfg_denoiser": OptionInfo([], "cfg_denoiser callback priority"),
}))
# Registered at import by extensions-builtin/Lora/scripts/lora_script.py in the real host; here they exist from the
# start so that `opts.lora_functional` works in tests that never load the Lora script.
options_templates.update(options_section(("compatibility", "Compatibility"), {
    "lora_functional": OptionInfo(False, "Lora/Networks: use old method"),
}))
options_templates.update(options_section(("extra_networks", "Extra Networks"), {
    "sd_lora": OptionInfo("None", "Add network to prompt"),
    "lora_preferred_name": OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
    "lora_add_hashes_to_infotext": OptionInfo(True, "Add Lora hashes to infotext"),
    "lora_in_memory_limit": OptionInfo(0, "Number of Lora networks to keep cached in memory"),
    "lora_not_found_warning_console": OptionInfo(True, "Lora not found warning in console"),
}))

opts = options.Options(options_templates)


class State:
    """Follows modules/shared_state.py State."""

    def __init__(self):
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    def begin(self, job="(unknown)"):
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = job
        self.job_no = 0
        self.job_count = -1
        self.sampling_step = 0


state = State()
sd_model = None          # set by modules.sd_models.load_model()
device = "cpu"
prompt_styles = None
total_tqdm = types.SimpleNamespace(update=lambda *a, **k: None, clear=lambda: None)
