"""The DynFuse accordion, built the same way for gradio 3.41 (AUTOMATIC1111) and gradio 4.40 (Forge).

`build_ui` only creates components and wires their events inside the caller's Blocks context: it keeps no
state and registers nothing with the host, because the host builds the UI more than once (both tabs, and the
API's own Script instances). Version differences go through `gradio_compat`.

The subject/style dropdowns follow the `<lora:...>` tags of the prompt: javascript/dynfuse.js reads the
prompt textarea, writes the tag names as a JSON list into a hidden textbox (`dynfuse_<tab>_tags`), and that
textbox's change event calls `tag_choices` on the server, which refills both dropdowns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr

from lib_dynfuse import __version__
from lib_dynfuse.engine.measure import MEASURES
from lib_dynfuse.hosts import gradio_compat
from lib_dynfuse.engine.policies import KLORA_SCHEDULES, METHODS
from lib_dynfuse.settings import (
    DECIDE_PER,
    DECODERS,
    DEFAULTS,
    FIELDS,
    INFOTEXT_KEYS,
    DynFuseSettings,
    coerce,
    from_infotext,
)

if TYPE_CHECKING:
    from typing_extensions import Self

AUTO = "Auto"

# Settings fields in the order of the UI's components after the enable accordion. This order is the script's
# positional argument order (API `alwayson_scripts` args), so new fields are only ever appended.
UI_FIELDS: tuple[str, ...] = (
    "subject", "subject_strength", "style", "style_strength",
    "method", "measure", "temperature", "standardize", "decide_per", "soft_temperature", "switch_every",
    "klora_alpha", "klora_beta", "klora_schedule", "show_map",
    "guidance", "guidance_strength", "guidance_balance", "guidance_start", "guidance_end", "guidance_every",
    "guidance_decoder", "subject_refs", "style_ref", "show_loss_plot", "decide_every", "max_tokens",
)

METHOD_INFO = ("kl: per layer and step, the LoRA that changes the output more wins · "
               "kl-soft: blend instead · k-lora: choose by weights · switch: alternate · "
               "static: plain merge · *-only: one LoRA")


@dataclass
class UiBuild:
    """What the entry script's `ui()` needs: `components` is its return value (accordion first);
    `infotext_fields` and `paste_field_names` go to the Script attributes of the same names."""
    components: list
    infotext_fields: list[tuple[object, PasteKey]]
    paste_field_names: list[str]
    # settings field -> component, the accordion ("enabled") included
    by_field: dict[str, object] = field(default_factory=dict)
    tags: object = None  # the hidden textbox the page script writes the prompt's tag names into


def tag_choices(tags_json: str, subject: str | None, style: str | None,
                lora_names: Callable[[], list[str]] | None = None) -> tuple[dict, dict, dict]:
    """Updates for (subject dropdown, style dropdown, status line) from the JSON tag list the page sends.

    A current value that is no longer among the tags is kept (as a custom value): it may come from pasted
    infotext before the prompt arrives, and the generation reports a name that is really missing.
    """
    try:
        names = json.loads(tags_json or "[]")
    except ValueError:
        names = []
    if not isinstance(names, list):
        names = []
    names = list(dict.fromkeys(str(name) for name in names if isinstance(name, str) and name.strip()))
    choices = [AUTO, *names]
    updates = tuple(gradio_compat.dropdown_update(choices, value or AUTO) for value in (subject, style))
    return updates[0], updates[1], gr.update(value=_status(names, lora_names))


def _status(names: list[str], lora_names: Callable[[], list[str]] | None) -> str:
    if not names:
        return "No <code>&lt;lora:…&gt;</code> tags in the prompt yet: add two, a subject and a style."
    known = set(lora_names()) if lora_names is not None else None
    unknown = [name for name in names if known is not None and name not in known]
    text = f"LoRA tags in the prompt: {len(names)}"
    if len(names) < 2:
        text += " (DynFuse needs two)"
    if unknown:
        text += f" · not found among the installed LoRAs: {', '.join(_escape(name) for name in unknown)}"
    return text


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def values_to_settings(values: Sequence) -> DynFuseSettings:
    """Settings from the UI's values in component order (first the accordion's `enabled`, then UI_FIELDS).

    Also takes the same list from an API call (numbers as text, images as base64). Raises SettingsError
    naming the field when a value cannot be one of its kind; cross-field checks are left to validate().
    """
    names = ("enabled", *UI_FIELDS)
    result = {}
    for name, value in zip(names, values, strict=False):
        if name in ("subject", "style") and (value is None or not str(value).strip()):
            value = AUTO  # a cleared dropdown means "pick from the prompt"
        elif name == "subject_refs":
            value = gradio_compat.files_to_images(value)
        result[name] = coerce(name, value)
    # Values missing at the end (an older API caller) keep their defaults.
    return DynFuseSettings(**{**{n: getattr(DEFAULTS, n) for n in names}, **result})


class PasteKey(str):
    """An infotext key for `infotext_fields` that is also the function computing its field's pasted value.

    The host takes a callable key as a paste function and compares string keys with `paste_field_names` when
    "Send to img2img" copies values between tabs; being both lets one entry serve both. A function is needed
    because one key can carry several fields ("DynFuse subject" holds the name and the strength) and because
    fields left out of the infotext are their defaults once DynFuse was used.
    """

    field_name: str
    warn: bool

    def __new__(cls, key: str, field_name: str, *, warn: bool = False) -> Self:
        self = super().__new__(cls, key)
        self.field_name = field_name
        self.warn = warn  # only one key per paste prints warnings about damaged values, so each shows once
        return self

    def __call__(self, params: Mapping[str, str]) -> object:
        values = from_infotext(params, warn=print if self.warn else _quiet, fill_defaults=True)
        if self.field_name not in values:
            return None  # DynFuse was not used: leave the control as it is
        # An update, not a bare value: the host would cast a bare value to the type of the control's
        # current value, and the enable accordion's "value" here is a bool computed from several keys.
        return gr.update(value=_ui_value(self.field_name, values[self.field_name]))


def _ui_value(name: str, value: object) -> object:
    """A settings value as its control holds it: strengths are text, empty for the tag's own weight."""
    if name in ("subject_strength", "style_strength"):
        return "" if value is None else str(value)
    return value


def _quiet(message: str) -> None:
    """Warnings are printed by the accordion's key alone."""


def build_ui(*, is_img2img: bool, input_accordion: type,
             lora_names: Callable[[], list[str]] | None = None, notice: str | None = None) -> UiBuild:
    """Create the DynFuse accordion inside the current Blocks context (see the module docstring).

    `notice`: a message shown atop the accordion's content, e.g. why DynFuse cannot run on this WebUI."""
    tab = "img2img" if is_img2img else "txt2img"

    def eid(item: str) -> str:
        return f"dynfuse_{tab}_{item}"

    c: dict[str, object] = {}
    with input_accordion(DEFAULTS.enabled, label="DynFuse", elem_id=f"dynfuse_{tab}") as accordion:
        with accordion.extra():
            gr.HTML(f'<span class="dynfuse-version">v{__version__}</span>', elem_id=eid("version"))
        if notice:
            gr.HTML(f"<p><strong>{_escape(notice)}</strong></p>", elem_id=eid("notice"))
        tags = gr.Textbox(value="[]", label="LoRA tags in the prompt", elem_id=eid("tags"),
                          **gradio_compat.HIDDEN_BY_CSS)
        for role, which in (("subject", "first"), ("style", "second")):
            with gr.Row(elem_id=eid(f"{role}_row"), elem_classes=["dynfuse-lora"]):
                c[role] = gr.Dropdown(
                    label=f"{role.capitalize()} LoRA", choices=[AUTO], value=getattr(DEFAULTS, role),
                    allow_custom_value=True, scale=3, elem_id=eid(role),
                    info=f"A LoRA tag of the prompt; Auto takes the {which} one.")
                # A textbox because "empty" must be a value: gradio 3's number box shows and sends 0 for None.
                c[f"{role}_strength"] = gr.Textbox(
                    label=f"{role.capitalize()} strength", value=_ui_value(f"{role}_strength", None),
                    placeholder="tag weight", info="Empty: the tag's weight.", max_lines=1, scale=1,
                    min_width=120, elem_id=eid(f"{role}_strength"))
        status = gr.HTML(_status([], None), elem_id=eid("tag_status"), elem_classes=["dynfuse-status"])
        with gr.Row():
            c["method"] = gr.Radio(label="Method", choices=list(METHODS), value=DEFAULTS.method,
                                   info=METHOD_INFO, elem_id=eid("method"))
        c["show_map"] = gr.Checkbox(label="Show selection map", value=DEFAULTS.show_map,
                                    elem_id=eid("show_map"))

        with gr.Accordion("Advanced", open=False, elem_id=eid("advanced")):
            with gr.Row():
                c["measure"] = gr.Dropdown(label="Measure", choices=list(MEASURES), value=DEFAULTS.measure,
                                           info="For kl and kl-soft.", elem_id=eid("measure"))
                c["temperature"] = gr.Slider(label="KL temperature", minimum=0.05, maximum=10.0, step=0.05,
                                             value=DEFAULTS.temperature, elem_id=eid("temperature"))
                c["standardize"] = gr.Checkbox(label="Standardize outputs", value=DEFAULTS.standardize,
                                               info="Per-token std of the base output.",
                                               elem_id=eid("standardize"))
            with gr.Row():
                c["decide_per"] = gr.Radio(label="Decide per", choices=list(DECIDE_PER),
                                           value=DEFAULTS.decide_per, info="row: each CFG row alone.",
                                           elem_id=eid("decide_per"))
                c["soft_temperature"] = gr.Slider(label="kl-soft temperature", minimum=0.05, maximum=10.0,
                                                  step=0.05, value=DEFAULTS.soft_temperature,
                                                  elem_id=eid("soft_temperature"))
                c["switch_every"] = gr.Slider(label="switch: every n steps", minimum=1, maximum=50, step=1,
                                              value=DEFAULTS.switch_every, elem_id=eid("switch_every"))
            with gr.Row():
                c["klora_alpha"] = gr.Slider(label="K-LoRA alpha", minimum=0.05, maximum=5.0, step=0.05,
                                             value=DEFAULTS.klora_alpha, elem_id=eid("klora_alpha"))
                c["klora_beta"] = gr.Slider(label="K-LoRA beta", minimum=0.0, maximum=5.0, step=0.05,
                                            value=DEFAULTS.klora_beta, elem_id=eid("klora_beta"))
                c["klora_schedule"] = gr.Radio(label="K-LoRA schedule", choices=list(KLORA_SCHEDULES),
                                               value=DEFAULTS.klora_schedule, elem_id=eid("klora_schedule"))
            with gr.Row():
                c["decide_every"] = gr.Slider(label="Decide every n steps", minimum=1, maximum=10, step=1,
                                              value=DEFAULTS.decide_every, info="kl, kl-soft: keep in between.",
                                              elem_id=eid("decide_every"))
                c["max_tokens"] = gr.Slider(label="Divergence tokens per row", minimum=0, maximum=4096, step=64,
                                            value=DEFAULTS.max_tokens, info="0 = all; fewer is faster.",
                                            elem_id=eid("max_tokens"))

        with gr.Accordion("Guidance", open=False, elem_id=eid("guidance_group")):
            c["guidance"] = gr.Checkbox(label="Enable guidance", value=DEFAULTS.guidance,
                                        info=FIELDS["guidance"].metadata["doc"], elem_id=eid("guidance"))
            with gr.Row():
                c["subject_refs"] = gr.File(label="Subject references", file_count="multiple",
                                            file_types=["image"], elem_id=eid("subject_refs"))
                c["style_ref"] = gr.Image(label="Style reference", type="pil", height=220,
                                          elem_id=eid("style_ref"))
            with gr.Row():
                c["guidance_strength"] = gr.Slider(label="Guidance strength", minimum=0.0, maximum=2.0,
                                                   step=0.01, value=DEFAULTS.guidance_strength,
                                                   elem_id=eid("guidance_strength"))
                c["guidance_balance"] = gr.Slider(label="Subject/style balance", minimum=0.0, maximum=1.0,
                                                  step=0.05, value=DEFAULTS.guidance_balance,
                                                  info="1: subject only · 0: style only.",
                                                  elem_id=eid("guidance_balance"))
            with gr.Row():
                c["guidance_start"] = gr.Slider(label="Guidance start", minimum=0.0, maximum=1.0, step=0.01,
                                                value=DEFAULTS.guidance_start, elem_id=eid("guidance_start"))
                c["guidance_end"] = gr.Slider(label="Guidance end", minimum=0.0, maximum=1.0, step=0.01,
                                              value=DEFAULTS.guidance_end, elem_id=eid("guidance_end"))
            with gr.Row():
                c["guidance_every"] = gr.Slider(label="Guide every n steps", minimum=1, maximum=10, step=1,
                                                value=DEFAULTS.guidance_every, elem_id=eid("guidance_every"))
                c["guidance_decoder"] = gr.Radio(label="Decoder", choices=list(DECODERS),
                                                 value=DEFAULTS.guidance_decoder,
                                                 info="auto: TAESD when installed, else approx.",
                                                 elem_id=eid("guidance_decoder"))
            c["show_loss_plot"] = gr.Checkbox(label="Show loss plot", value=DEFAULTS.show_loss_plot,
                                              elem_id=eid("show_loss_plot"))

    tags.change(fn=lambda text, subject, style: tag_choices(text, subject, style, lora_names),
                inputs=[tags, c["subject"], c["style"]], outputs=[c["subject"], c["style"], status],
                show_progress="hidden", queue=False)

    by_field = {"enabled": accordion, **c}
    infotext_fields = _infotext_fields(by_field)
    return UiBuild(
        components=[accordion, *(c[name] for name in UI_FIELDS)],
        infotext_fields=infotext_fields,
        paste_field_names=list(dict.fromkeys(str(key) for _, key in infotext_fields)),
        by_field=by_field,
        tags=tags,
    )


def _infotext_fields(by_field: Mapping[str, object]) -> list[tuple[object, PasteKey]]:
    """(component, PasteKey) for the accordion and every field the infotext table can restore."""
    keys = {"enabled": PasteKey(_METHOD_KEY, "enabled", warn=True)}
    for entry in INFOTEXT_KEYS:
        if entry.decode is not None:
            keys.update({name: PasteKey(entry.key, name) for name in entry.fields if name in by_field})
    return [(by_field[name], key) for name, key in keys.items()]


# DynFuse was used exactly when the infotext has this key, so the enable accordion pairs with it.
_METHOD_KEY = next(entry.key for entry in INFOTEXT_KEYS if entry.fields == ("method",))
