# Follows the startup order of webui.py / modules/initialize.py / modules/ui.py of AUTOMATIC1111 v1.10.1
# (82a973c0): load_scripts (root scripts/, then built-in extensions, then user extensions), model load
# (on_model_loaded), before_ui callbacks, per-tab ScriptRunners with every script's ui() inside gr.Blocks,
# on_ui_settings, then on_app_started(demo, app). Test infrastructure, not a copy of a host file: `WebUI` also
# offers the calls a user makes (generate, paste infotext, call the API, reload) in the host's own terms.
from __future__ import annotations

import os
import sys

import gradio as gr
from fastapi import FastAPI

from modules import extra_networks, infotext_utils, processing, script_callbacks, scripts, sd_models, shared

ROOT = os.path.dirname(os.path.realpath(__file__))
LORA_EXTENSION = os.path.join(ROOT, "extensions-builtin", "Lora")


class WebUI:
    def __init__(self, lora_dir: str, extension_roots: list[str] = (), *, with_lora: bool = True,
                 api_only: bool = False):
        _fresh_process_state()
        shared.cmd_opts.lora_dir = lora_dir
        files = [scripts.ScriptFile(ROOT, "xyz_grid.py", os.path.join(ROOT, "scripts", "xyz_grid.py"))]
        if with_lora:
            files.append(scripts.ScriptFile(LORA_EXTENSION, "lora_script.py",
                                            os.path.join(LORA_EXTENSION, "scripts", "lora_script.py")))
        for root in extension_roots:
            folder = os.path.join(root, "scripts")
            files += [scripts.ScriptFile(root, f, os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                      if f.endswith(".py")]
        extra_networks.initialize()
        scripts.load_scripts(files)
        self.model = sd_models.load_model()
        script_callbacks.before_ui_callback()
        self.demo = None
        with gr.Blocks() as demo:
            for runner, is_img2img in ((scripts.scripts_txt2img, False), (scripts.scripts_img2img, True)):
                runner.initialize_scripts(is_img2img)
                runner.setup_ui()
        script_callbacks.ui_settings_callback()
        self.demo = None if api_only else demo
        self.app = FastAPI()
        script_callbacks.app_started_callback(self.demo, self.app)

    # ---- generation -----------------------------------------------------------------------------
    @staticmethod
    def runner(is_img2img: bool = False):
        return scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img

    def script(self, title: str, is_img2img: bool = False):
        return self.runner(is_img2img).script(title)

    def default_args(self, is_img2img: bool = False) -> list:
        """What the page sends when nothing is touched: every input component's value."""
        return [0] + [c.value for c in self.runner(is_img2img).inputs[1:]]

    def script_args(self, title: str, values: list | None, is_img2img: bool = False) -> tuple:
        args = self.default_args(is_img2img)
        script = self.script(title, is_img2img)
        if values is not None and script is not None:
            args[script.args_from:script.args_from + len(values)] = values
        return tuple(args)

    def txt2img(self, prompt: str, *, dynfuse: list | None = None, **kwargs):
        p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, **kwargs)
        return self._run(p, dynfuse)

    def img2img(self, prompt: str, init_image, *, dynfuse: list | None = None, **kwargs):
        p = processing.StableDiffusionProcessingImg2Img(prompt=prompt, init_images=[init_image], **kwargs)
        return self._run(p, dynfuse, is_img2img=True)

    def make_p(self, prompt: str, *, dynfuse: list | None = None, is_img2img: bool = False, **kwargs):
        cls = processing.StableDiffusionProcessingImg2Img if is_img2img else processing.StableDiffusionProcessingTxt2Img
        p = cls(prompt=prompt, **kwargs)
        p.scripts = self.runner(is_img2img)
        p.script_args = self.script_args("DynFuse", dynfuse, is_img2img)
        return p

    def _run(self, p, dynfuse, is_img2img=False):
        p.scripts = self.runner(is_img2img)
        p.script_args = self.script_args("DynFuse", dynfuse, is_img2img)
        shared.state.begin()
        return p, processing.process_images(p)

    # ---- infotext and API -----------------------------------------------------------------------
    def paste(self, infotext: str, is_img2img: bool = False) -> list:
        """PNG Info -> "Send to txt2img": one value (or infotext_utils.KEEP) per registered paste field."""
        return infotext_utils.paste(infotext, self.runner(is_img2img).infotext_fields)

    def api_txt2img(self, payload: dict) -> dict:
        from modules.api.api import Api

        shared.state.begin()
        return Api().text2imgapi(payload)

    # ---- lifetime -------------------------------------------------------------------------------
    def unload(self) -> None:
        """Reload UI / shutdown: script_unloaded callbacks (reverse order), then all callbacks cleared."""
        script_callbacks.script_unloaded_callback()
        script_callbacks.clear_callbacks()


def _fresh_process_state() -> None:
    """What a new WebUI process starts with (tests start several WebUIs in one Python process)."""
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
    shared.state.__init__()  # modules hold the object itself (from modules.shared import state)
    networks = sys.modules.get("networks")
    if networks is None:
        return
    networks.loaded_networks.clear()
    networks.networks_in_memory.clear()
    networks.available_networks.clear()
    networks.available_network_aliases.clear()
