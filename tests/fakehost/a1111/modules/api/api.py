# Follows modules/api/api.py of AUTOMATIC1111 v1.10.1 (82a973c0): script_name_to_index (422 for unknown names),
# decode_base64_to_image, init_default_script_args (ui() called again inside a throw-away gr.Blocks, defaults from
# each component's .value) and init_script_args (alwayson args written positionally up to the shorter length).
# The request object is a plain dict here; only the script-argument path and the txt2img call are modelled.
from __future__ import annotations

import base64
import io

import gradio as gr
from fastapi.exceptions import HTTPException
from PIL import Image

from modules import processing, scripts


def script_name_to_index(name, scripts_list):
    try:
        return [script.title().lower() for script in scripts_list].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def decode_base64_to_image(encoding):
    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        return Image.open(io.BytesIO(base64.b64decode(encoding)))
    except Exception as e:
        raise HTTPException(status_code=500, detail="Invalid encoded image") from e


class Api:
    def get_script(self, script_name, script_runner):
        if script_name is None or script_name == "":
            return None
        return script_runner.scripts[script_name_to_index(script_name, script_runner.scripts)]

    def init_default_script_args(self, script_runner):
        last_arg_index = 1
        for script in script_runner.scripts:
            last_arg_index = max(last_arg_index, script.args_to)
        script_args = [None] * last_arg_index
        script_args[0] = 0
        with gr.Blocks():
            for script in script_runner.scripts:
                if script.ui(script.is_img2img):
                    script_args[script.args_from:script.args_to] = [e.value for e in script.ui(script.is_img2img)]
        return script_args

    def init_script_args(self, request: dict, default_script_args, script_runner):
        script_args = default_script_args.copy()
        for name, entry in (request.get("alwayson_scripts") or {}).items():
            script = self.get_script(name, script_runner)
            if script is None:
                raise HTTPException(status_code=422, detail=f"always on script {name} not found")
            if script.alwayson is False:
                raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
            if "args" in entry:
                for idx in range(min(script.args_to - script.args_from, len(entry["args"]))):
                    script_args[script.args_from + idx] = entry["args"][idx]
        return script_args

    def text2imgapi(self, request: dict):
        runner = scripts.scripts_txt2img
        args = {k: v for k, v in request.items() if k != "alwayson_scripts"}
        script_args = self.init_script_args(request, self.init_default_script_args(runner), runner)
        p = processing.StableDiffusionProcessingTxt2Img(**args)
        p.scripts = runner
        p.script_args = tuple(script_args)
        p.is_api = True
        processed = processing.process_images(p)
        return {"images": processed.images, "parameters": request, "info": processed.info,
                "infotexts": processed.infotexts}
