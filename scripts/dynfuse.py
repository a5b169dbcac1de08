"""DynFuse for the AUTOMATIC1111, Forge and Forge Neo WebUIs: the one file the host loads as a script.

It builds the accordion, turns UI / API / X/Y/Z values into settings and hands each generation to the adapter of
the detected host (lib_dynfuse.hosts). Callbacks are registered here, at import, because a Reload UI clears them
and re-executes this file (but not the cached lib_dynfuse package).
"""

from __future__ import annotations

import dataclasses

from lib_dynfuse import __version__
from lib_dynfuse.hosts import api, detect, options, xyz
from lib_dynfuse.hosts.base import plain, refuse, say
from modules import script_callbacks, scripts

BASEDIR = scripts.basedir()


def _settings_for(p, args):
    """Settings from the script args (UI values, or one dict from the API), with X/Y/Z overrides on top."""
    from lib_dynfuse.hosts import ui
    from lib_dynfuse.settings import SettingsError, from_api

    try:
        if args and isinstance(args[0], dict):
            settings = from_api(args[0])
        else:
            settings = ui.values_to_settings(list(args))
        cell = xyz.overrides(p)
        return dataclasses.replace(settings, **cell) if cell else settings
    except SettingsError as e:
        message = plain(str(e))
        refuse(p, f"{message}. DynFuse is off for this generation.", f"off: {message}")
        return None


class Script(scripts.Script):
    def title(self):
        return "DynFuse"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from lib_dynfuse.hosts import ui
        from modules.ui_components import InputAccordion

        built = ui.build_ui(is_img2img=is_img2img, input_accordion=InputAccordion, lora_names=_lora_names,
                            notice=detect.unsupported_notice())
        self.infotext_fields = built.infotext_fields
        self.paste_field_names = built.paste_field_names
        return built.components

    def process(self, p, *args):
        adapter = detect.get_adapter()
        settings = _settings_for(p, args)
        if settings is None:
            adapter.cleanup()
            return
        adapter.begin_job(p, settings)

    def after_extra_networks_activate(self, p, *args, **kwargs):
        adapter = detect.get_adapter()
        if adapter.job is not None and adapter.takeover_at == "after_extra_networks_activate":
            adapter.take_over(p, adapter.job)

    def process_before_every_sampling(self, p, *args, **kwargs):
        adapter = detect.get_adapter()
        if adapter.job is not None and adapter.takeover_at == "process_before_every_sampling":
            adapter.take_over(p, adapter.job)

    def postprocess_batch(self, p, *args, images=None, batch_number=0, **kwargs):
        # After the batch is decoded (RGB in [0, 1]) and before its images' infotexts are built.
        adapter = detect.get_adapter()
        adapter.score_batch(p, adapter.job, images, batch_number)

    def postprocess(self, p, processed, *args):
        adapter = detect.get_adapter()
        adapter.end_job(p, adapter.job, processed)


def _lora_names():
    try:
        import networks

        return sorted(networks.available_networks)
    except Exception:  # noqa: BLE001 - Lora disabled, or Forge's loader
        return []


def _on_cfg_denoiser(params):
    detect.get_adapter().on_cfg_denoiser(params)


def _on_cfg_denoised(params):
    detect.get_adapter().on_cfg_denoised(params)


def _on_cfg_after_cfg(params):
    detect.get_adapter().on_cfg_after_cfg(params)


def _on_before_ui():
    try:
        xyz.register_axes()
    except Exception as e:  # noqa: BLE001
        say(f"could not add the X/Y/Z plot axes: {e}")


def _on_unload():
    detect.reset_adapter()


script_callbacks.on_cfg_denoiser(_on_cfg_denoiser, name="dynfuse_cfg_denoiser")
script_callbacks.on_cfg_denoised(_on_cfg_denoised, name="dynfuse_cfg_denoised")
script_callbacks.on_cfg_after_cfg(_on_cfg_after_cfg, name="dynfuse_cfg_after_cfg")
script_callbacks.on_before_ui(_on_before_ui, name="dynfuse_xyz_axes")
script_callbacks.on_app_started(api.add_routes, name="dynfuse_api")
script_callbacks.on_ui_settings(options.register_options, name="dynfuse_options")
script_callbacks.on_script_unloaded(_on_unload, name="dynfuse_unload")
say(f"version {__version__} loaded")
