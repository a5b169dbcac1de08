# Follows modules/infotext_utils.py of AUTOMATIC1111 v1.10.1 (82a973c0): PasteField, quote/unquote, the
# parameter regex, parse_generation_parameters, and the paste path of connect_paste (parse, on_infotext_pasted
# callbacks, then each (component, key-or-function) pair cast to the component's value type). Styles, hires
# defaults and override settings are not modelled.
from __future__ import annotations

import json
import re

from modules import errors, script_callbacks

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


class PasteField(tuple):
    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields: list[str] | None = None):
    res = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f'Error parsing "{k}: {v}"')
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for key in skip_fields or []:
        res.pop(key, None)
    return res


type_of_gr_update = dict  # type(gr.update()) in gradio 3.41


class _Keep:
    """Stands for gr.update() (no change) in paste results."""

    def __repr__(self):
        return "gr.update()"


KEEP = _Keep()


def paste(infotext: str, paste_fields) -> list:
    """What connect_paste's paste_func returns: one value (or KEEP) per (component, key) pair."""
    params = parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, params)
    res = []
    for output, key in paste_fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:
                errors.report(f"Error executing {key}", exc_info=True)
                v = None
        else:
            v = params.get(key, None)
        if v is None:
            res.append(KEEP)
        elif isinstance(v, type_of_gr_update):  # a gr.update(...) dict goes to the page as it is
            res.append(v.get("value", KEEP))
        else:
            try:
                valtype = type(output.value)
                if valtype == bool and v == "False":
                    val = False
                elif valtype == int:
                    val = float(v)
                else:
                    val = valtype(v)
                res.append(val)
            except Exception:
                res.append(KEEP)
    return res
