# Fake of modules/script_callbacks.py (stable-diffusion-webui-forge dfdcbab6 = A1111 1.10.1).
# Kept: the three CFG parameter classes and their fields, registration by function with name=, removal helpers,
# errors inside a callback reported and swallowed. Forge calls only cfg_denoiser and cfg_after_cfg.
import traceback


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


callback_map = {name: [] for name in ("callbacks_cfg_denoiser", "callbacks_cfg_denoised", "callbacks_cfg_after_cfg",
                                      "callbacks_script_unloaded", "callbacks_before_ui", "callbacks_app_started",
                                      "callbacks_ui_settings")}


def _add(category, callback, name=None):
    callback_map[category].append((name or getattr(callback, "__qualname__", repr(callback)), callback))


def _run(category, *args):
    for name, callback in list(callback_map[category]):
        try:
            callback(*args)
        except Exception:
            print(f"Error executing callback {name} for {category}")
            traceback.print_exc()


def on_cfg_denoiser(callback, *, name=None):
    _add("callbacks_cfg_denoiser", callback, name)


def on_cfg_denoised(callback, *, name=None):
    _add("callbacks_cfg_denoised", callback, name)


def on_cfg_after_cfg(callback, *, name=None):
    _add("callbacks_cfg_after_cfg", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("callbacks_script_unloaded", callback, name)


def on_before_ui(callback, *, name=None):
    _add("callbacks_before_ui", callback, name)


def on_app_started(callback, *, name=None):
    _add("callbacks_app_started", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("callbacks_ui_settings", callback, name)


def cfg_denoiser_callback(params):
    _run("callbacks_cfg_denoiser", params)


def cfg_denoised_callback(params):
    _run("callbacks_cfg_denoised", params)


def cfg_after_cfg_callback(params):
    _run("callbacks_cfg_after_cfg", params)


def script_unloaded_callback():
    _run("callbacks_script_unloaded")


def remove_callbacks_for_function(callback_func):
    for entries in callback_map.values():
        entries[:] = [(n, c) for n, c in entries if c != callback_func]


def clear_callbacks():
    for entries in callback_map.values():
        entries.clear()
