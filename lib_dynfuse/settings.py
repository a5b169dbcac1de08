"""Every user setting of DynFuse in one record, with validation, the API payload, the infotext and a schema.

Field names are also the API keys. Each field's metadata (kind, range, choices, label, description) is
declared once here and drives validation, coercion of API and XYZ values, the JSON schema, the infotext
table and the XYZ labels.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace

from PIL import Image, UnidentifiedImageError

from lib_dynfuse import __version__
from lib_dynfuse.engine.measure import MEASURES
from lib_dynfuse.engine.policies import DIVERGENCE_METHODS, KLORA_SCHEDULES, METHODS, EngineOptions
from lib_dynfuse.loras.prompt_tags import LoraTag, TagError, parse_lora_tags

DECIDE_PER = ("image", "row")
# Methods that choose between the LoRAs per layer and step; the others apply fixed weights, so a share of
# decisions won ("DynFuse selection") means nothing for them.
CHOOSING_METHODS = ("kl", "kl-soft", "k-lora", "switch")
DECODERS = ("auto", "approx", "taesd", "vae")
STRENGTH_RANGE = (-2.0, 2.0)


class SettingsError(ValueError):
    """A setting the user must change; the message names it and says what to use instead."""


@dataclass(frozen=True)
class UnreadableImage:
    """Stands in for a reference image that could not be read; ``reason`` says which and why. Guidance then turns
    off only the side of that reference and says so, instead of DynFuse refusing the whole generation."""

    reason: str


_IMAGE_TYPES = (Image.Image, UnreadableImage)


def _setting(
    default: object,
    kind: str,
    label: str,
    doc: str,
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> Field:
    """A dataclass field carrying what every consumer needs to know about it.

    kind: bool | float | optfloat (None allowed) | int | str | images (tuple of PIL) | image (PIL or None).
    low/high are inclusive bounds unless low_open.
    """
    meta = {
        "kind": kind,
        "label": label,
        "doc": doc,
        "choices": choices,
        "low": low,
        "high": high,
        "low_open": low_open,
    }
    return field(default=default, metadata=meta)


@dataclass
class DynFuseSettings:
    enabled: bool = _setting(False, "bool", "enabled", "Turn dynamic fusion on for this generation.")
    subject: str = _setting(
        "Auto",
        "str",
        "subject",
        "Subject LoRA: its name as written in <lora:NAME:...>, or Auto (first LoRA tag).",
    )
    style: str = _setting(
        "Auto", "str", "style", "Style LoRA: its name as written in <lora:NAME:...>, or Auto (next LoRA tag)."
    )
    subject_strength: float | None = _setting(
        None,
        "optfloat",
        "subject strength",
        "Subject LoRA strength; null uses the tag's own unet weight.",
        low=STRENGTH_RANGE[0],
        high=STRENGTH_RANGE[1],
    )
    style_strength: float | None = _setting(
        None,
        "optfloat",
        "style strength",
        "Style LoRA strength; null uses the tag's own unet weight.",
        low=STRENGTH_RANGE[0],
        high=STRENGTH_RANGE[1],
    )
    method: str = _setting(
        "kl", "str", "method", "Fusion rule: who wins each layer at each step.", choices=METHODS
    )
    measure: str = _setting("kl", "str", "measure", "Divergence used by kl and kl-soft.", choices=MEASURES)
    temperature: float = _setting(
        1.0,
        "float",
        "KL temperature",
        "Softmax temperature of the divergence.",
        low=0.0,
        high=100.0,
        low_open=True,
    )
    standardize: bool = _setting(
        False,
        "bool",
        "standardize",
        "Divide outputs by the base output's per-token std before the divergence.",
    )
    decide_per: str = _setting(
        "image",
        "str",
        "decide per",
        "image: the conditional row decides for both rows of its image; row: each row decides alone.",
        choices=DECIDE_PER,
    )
    soft_temperature: float = _setting(
        1.0,
        "float",
        "soft temperature",
        "kl-soft: temperature of the blend, relative to the divergences' scale (1: each LoRA by its share of the "
        "two divergences; lower: nearer kl's choice).",
        low=0.0,
        low_open=True,
    )
    switch_every: int = _setting(
        5, "int", "switch every", "switch: alternate the LoRAs every this many steps.", low=1
    )
    klora_alpha: float = _setting(
        1.5,
        "float",
        "K-LoRA alpha",
        "k-lora: slope α of the time schedule S(t) = α·t/T + β.",
        low=0.0,
        low_open=True,
    )
    klora_beta: float = _setting(
        0.5,
        "float",
        "K-LoRA beta",
        "k-lora: offset β of the time schedule S(t) = α·t/T + β (S only; S* keeps its fixed offset 0.85·α).",
        low=0.0,
    )
    klora_schedule: str = _setting(
        "S",
        "str",
        "K-LoRA schedule",
        "k-lora: step schedule S(t) = α·t/T + β, or S*(t) = (α·t/T + 0.85·α) mod α, which lets the style in early.",
        choices=KLORA_SCHEDULES,
    )
    decide_every: int = _setting(
        1,
        "int",
        "decide every",
        "kl, kl-soft: decide at every n-th step and keep each layer's decision in between (1 = every step).",
        low=1,
    )
    max_tokens: int = _setting(
        0,
        "int",
        "divergence tokens",
        "kl, kl-soft: measure the divergence on at most this many tokens per row, a fixed-stride subsample "
        "(0 = every token).",
        low=0,
    )
    show_map: bool = _setting(False, "bool", "show map", "Add the selection map image to the outputs.")
    guidance: bool = _setting(
        False,
        "bool",
        "guidance",
        "Steer the x0 estimate toward the reference images (CLIP for style, DINO for subject).",
    )
    guidance_strength: float = _setting(
        0.2,
        "float",
        "guidance strength",
        "Step size relative to the classifier-free guidance update.",
        low=0.0,
        high=2.0,
    )
    guidance_balance: float = _setting(
        0.5, "float", "guidance balance", "1 = subject (DINO) only, 0 = style (CLIP) only.", low=0.0, high=1.0
    )
    guidance_start: float = _setting(
        0.0, "float", "guidance start", "Fraction of the schedule where guidance starts.", low=0.0, high=1.0
    )
    guidance_end: float = _setting(
        1.0,
        "float",
        "guidance end",
        "Fraction of the schedule where guidance ends (after start).",
        low=0.0,
        high=1.0,
    )
    guidance_every: int = _setting(1, "int", "guidance every", "Guide every this many steps.", low=1)
    guidance_decoder: str = _setting(
        "auto",
        "str",
        "guidance decoder",
        "Latent decoder for guidance: auto (TAESD when present, else approx), approx, taesd or vae.",
        choices=DECODERS,
    )
    subject_refs: tuple = _setting(
        (),
        "images",
        "subject references",
        "Subject reference images (API: base64 strings, data: URLs allowed).",
    )
    style_ref: object | None = _setting(
        None, "image", "style reference", "Style reference image (API: a base64 string, data: URL allowed)."
    )
    show_loss_plot: bool = _setting(
        False, "bool", "show loss plot", "Add the guidance loss curve to the outputs."
    )

    def engine_options(self, *, compiled: bool = False, budget_mb: int = 0) -> EngineOptions:
        """The engine's share of the settings; ``compiled`` and the divergence's memory budget come from the WebUI's
        Settings tab, not from here."""
        shared = {f.name: getattr(self, f.name) for f in fields(EngineOptions) if f.name in FIELDS}
        return EngineOptions(**shared, compiled=compiled, divergence_budget_mb=budget_mb)

    def validate(self) -> None:
        for f in fields(self):
            _check(f, getattr(self, f.name))
        if not self.guidance_start < self.guidance_end:
            raise SettingsError(
                f"DynFuse: guidance_start ({self.guidance_start}) must be before "
                f"guidance_end ({self.guidance_end}); lower the start or raise the end"
            )


DEFAULTS = DynFuseSettings()
FIELDS: dict[str, Field] = {f.name: f for f in fields(DynFuseSettings)}


def _range_text(meta: Mapping) -> str:
    parts = []
    if meta["low"] is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {_num(meta['low'])}")
    if meta["high"] is not None:
        parts.append(f"<= {_num(meta['high'])}")
    return " and ".join(parts)


def _check(f: Field, value: object) -> None:
    """Raise SettingsError unless value is valid for the field (already of the right Python type)."""
    meta, name = f.metadata, f.name
    kind = meta["kind"]
    if value is None and kind in ("optfloat", "image"):
        return
    if not _is_kind(kind, value):
        raise SettingsError(f"DynFuse: {name} must be {_KIND_TEXT[kind]}, not {type(value).__name__}")
    if kind == "images" and not all(isinstance(image, _IMAGE_TYPES) for image in value):
        raise SettingsError(f"DynFuse: {name} must hold images only")
    if kind == "str" and not value.strip():
        raise SettingsError(f"DynFuse: {name} is empty; use Auto or a LoRA name")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise SettingsError(f"DynFuse: {name} '{value}' is unknown; use one of {', '.join(meta['choices'])}")
    if kind in ("float", "optfloat", "int"):
        low, high = meta["low"], meta["high"]
        too_low = low is not None and (value <= low if meta["low_open"] else value < low)
        too_high = high is not None and value > high
        if not math.isfinite(value) or too_low or too_high:
            raise SettingsError(f"DynFuse: {name} is {_num(value)}; use a value {_range_text(meta)}")


def _is_kind(kind: str, value: object) -> bool:
    if kind in ("float", "optfloat", "int"):
        number_types = (int,) if kind == "int" else (int, float)
        return isinstance(value, number_types) and not isinstance(value, bool)
    return isinstance(value, {"bool": bool, "str": str, "images": (tuple, list), "image": _IMAGE_TYPES}[kind])


_KIND_TEXT = {
    "bool": "true or false",
    "float": "a number",
    "optfloat": "a number or null",
    "int": "a whole number",
    "str": "a string",
    "images": "a list of images",
    "image": "an image or null",
}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _decode_image(value: object, where: str) -> Image.Image | UnreadableImage:
    """A base64 string (data: URL allowed) or an image, as an RGB image; text that is not an image (a file path,
    damaged data) as an UnreadableImage."""
    if isinstance(value, UnreadableImage):
        return value
    if isinstance(value, str):
        data = re.sub(r"\s+", "", re.sub(r"^\s*data:[^,]*;base64,", "", value))
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except UnidentifiedImageError:
            return UnreadableImage(f"{where} is not a base64-encoded image (the data is no image format)")
        except (binascii.Error, ValueError, OSError) as e:
            return UnreadableImage(f"{where} is not a base64-encoded image ({e})")
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise SettingsError(f"DynFuse: {where} must be a base64 string, not {type(value).__name__}")
    # The scorers work on RGB; converting here makes palette, alpha and greyscale inputs behave the same.
    return image.convert("RGB")


def coerce(name: str, value: object) -> object:
    """Turn an API or XYZ value into the field's type and check it; SettingsError if that is not sensible.

    Numbers may come as strings ("0.5"); booleans as true/false, yes/no, on/off, 1/0; images as base64.
    """
    if name not in FIELDS:
        raise SettingsError(f"DynFuse: unknown setting '{name}'; known settings: {', '.join(FIELDS)}")
    f = FIELDS[name]
    kind = f.metadata["kind"]
    bad = SettingsError(f"DynFuse: {name} must be {_KIND_TEXT[kind]}, not {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            result = value
        elif isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE + _FALSE:
            result = str(value).strip().lower() in _TRUE
        else:
            raise bad
    elif kind in ("float", "optfloat", "int"):
        if kind == "optfloat" and (
            value is None or isinstance(value, str) and value.strip().lower() in ("", "none", "null")
        ):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)
        except ValueError:
            raise bad from None
        if kind == "int":
            if not number.is_integer():
                raise bad
            result = int(number)
        else:
            result = number
    elif kind == "str":
        if not isinstance(value, str):
            raise bad
        result = value
    elif kind == "images":
        items = [value] if isinstance(value, (str, Image.Image)) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        result = tuple(_decode_image(item, f"{name}[{i}]") for i, item in enumerate(items))
    else:
        result = None if value is None or value == "" else _decode_image(value, name)
    _check(f, result)
    return result


def from_api(payload: Mapping[str, object]) -> DynFuseSettings:
    """Settings from an API payload (a JSON object keyed by field name); missing keys take their defaults."""
    if not isinstance(payload, Mapping):
        raise SettingsError(f"DynFuse: the settings must be a JSON object, not {type(payload).__name__}")
    unknown = [key for key in payload if key not in FIELDS]
    if unknown:
        raise SettingsError(
            f"DynFuse: unknown setting(s) {', '.join(map(repr, unknown))}; "
            f"known settings: {', '.join(FIELDS)}"
        )
    settings = replace(DEFAULTS, **{key: coerce(key, value) for key, value in payload.items()})
    settings.validate()
    return settings


def xyz_label(name: str) -> str:
    """The XYZ-plot axis label of a field, e.g. "[DynFuse] KL temperature"."""
    return f"[DynFuse] {FIELDS[name].metadata['label']}"


# ---------------------------------------------------------------------------------------------- infotext


def _num(value: float) -> str:
    """Shortest text that reads back as exactly the same number."""
    if isinstance(value, int):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _format(value: object) -> str:
    return _num(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


# LoRA names cannot contain ':' or '>' in a prompt, but a name chosen elsewhere might; '%', ':' and '"' and
# whitespace at either end are %-escaped so that the value survives the host's own quoting, which strips
# leading spaces and unquotes any value that begins and ends with '"'.
_NAME_UNSAFE = re.compile(r'[%:"]|^\s|\s$')
_NAME_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def _encode_lora(tag: LoraTag, strength: float | None) -> str:
    """`name:weight` with the UNet weight the LoRA was fused at: the strength override, else the tag's."""
    text = _NAME_UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", tag.name)
    return f"{text}:{_num(tag.unet if strength is None else strength)}"


def _decode_lora(role: str, text: str, params: Mapping[str, str]) -> dict[str, object]:
    """Name and strength override; no override where the weight is that of the pasted prompt's tag.

    An empty override follows the tag, so editing the tag's weight after pasting keeps working as usual. A
    name alone (no weight) is read as the tag's weight too.
    """
    name, colon, weight = text.partition(":")
    name = _NAME_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)
    tag_weight = _tag_weight(params.get("Prompt", ""), name)
    # Both sides are _num text, so equal weights give equal text and the damaged-value check stays in coerce.
    same = tag_weight is not None and weight.strip() == _num(tag_weight)
    return {
        role: coerce(role, name),
        f"{role}_strength": coerce(f"{role}_strength", weight) if colon and not same else None,
    }


def _tag_weight(prompt: str, name: str) -> float | None:
    """The UNet weight of the LoRA's first tag in the prompt (the tag the fusion takes); None if absent."""
    try:
        tags = parse_lora_tags(prompt)
    except TagError:
        return None
    return next((tag.unet for tag in tags if tag.name == name), None)


_GUIDANCE_PARTS = ("strength", "balance", "start", "end", "every", "decoder")


def _encode_guidance(s: DynFuseSettings) -> str:
    return ", ".join(f"{part} {_format(getattr(s, 'guidance_' + part))}" for part in _GUIDANCE_PARTS)


def _decode_guidance(text: str) -> dict[str, object]:
    values: dict[str, object] = {"guidance": True}
    for item in text.split(","):
        part, _, value = item.strip().partition(" ")
        if part not in _GUIDANCE_PARTS:
            raise SettingsError(f"'{part}' is not one of {', '.join(_GUIDANCE_PARTS)}")
        values["guidance_" + part] = coerce("guidance_" + part, value)
    missing = [part for part in _GUIDANCE_PARTS if "guidance_" + part not in values]
    if missing:
        raise SettingsError(f"{', '.join(missing)} missing")
    if not values["guidance_start"] < values["guidance_end"]:
        raise SettingsError("start is not before end")
    return values


@dataclass(frozen=True)
class InfotextKey:
    """One "DynFuse ..." key of the infotext and the settings fields it carries.

    applies: whether the key means anything for these settings (e.g. soft temperature only for kl-soft).
    Keys with encode=None are written by others and ignored when pasting.
    """

    key: str
    fields: tuple[str, ...]
    applies: Callable[[DynFuseSettings], bool] = lambda s: True
    always: bool = False  # written even when the value is the default
    # encode(settings, {"subject": tag, "style": tag}); decode(value, all parsed params) -> {field: value}
    encode: Callable[[DynFuseSettings, Mapping[str, LoraTag]], str] | None = None
    decode: Callable[[str, Mapping[str, str]], dict[str, object]] | None = None


def _simple(
    name: str, applies: Callable[[DynFuseSettings], bool] = lambda s: True, *, always: bool = False
) -> InfotextKey:
    return InfotextKey(
        f"DynFuse {FIELDS[name].metadata['label']}",
        (name,),
        applies,
        always,
        encode=lambda s, tags: _format(getattr(s, name)),
        decode=lambda text, params: {name: coerce(name, text)},
    )


def _lora_key(role: str) -> InfotextKey:
    return InfotextKey(
        f"DynFuse {role}",
        (role, f"{role}_strength"),
        always=True,
        encode=lambda s, tags: _encode_lora(tags[role], getattr(s, f"{role}_strength")),
        decode=lambda text, params: _decode_lora(role, text, params),
    )


def _uses_divergence(s: DynFuseSettings) -> bool:
    return s.method in DIVERGENCE_METHODS


def _method_is(method: str) -> Callable[[DynFuseSettings], bool]:
    return lambda s: s.method == method


INFOTEXT_KEYS: tuple[InfotextKey, ...] = (
    _simple("method", always=True),
    _lora_key("subject"),
    _lora_key("style"),
    _simple("measure", _uses_divergence),
    _simple("temperature", _uses_divergence),
    _simple("standardize", _uses_divergence),
    _simple("decide_per", _uses_divergence),
    _simple("decide_every", _uses_divergence),
    _simple("max_tokens", _uses_divergence),
    _simple("soft_temperature", _method_is("kl-soft")),
    _simple("switch_every", _method_is("switch")),
    _simple("klora_alpha", _method_is("k-lora")),
    _simple("klora_beta", _method_is("k-lora")),
    _simple("klora_schedule", _method_is("k-lora")),
    _simple("show_map"),  # written only when on, like every default-off switch
    InfotextKey(
        "DynFuse guidance",
        ("guidance",) + tuple("guidance_" + p for p in _GUIDANCE_PARTS),
        applies=lambda s: s.guidance,
        always=True,
        encode=lambda s, tags: _encode_guidance(s),
        decode=lambda text, params: _decode_guidance(text),
    ),
    _simple("show_loss_plot", lambda s: s.guidance),
    InfotextKey("DynFuse version", (), always=True, encode=lambda s, tags: __version__),
    InfotextKey("DynFuse selection", ()),  # written by the report: share of layers won by the subject
    InfotextKey("DynFuse scores", ()),  # written by the report: guidance scores
)


def to_infotext(s: DynFuseSettings, *, subject: LoraTag, style: LoraTag) -> dict[str, str]:
    """The "DynFuse ..." entries for p.extra_generation_params: defaults and irrelevant values left out.

    subject/style are the prompt tags actually used (what "Auto" resolved to): their names and weights are
    written. Values are plain text; the host quotes those containing ',' or ':' itself.
    """
    tags = {"subject": subject, "style": style}
    result = {}
    for entry in INFOTEXT_KEYS:
        if entry.encode is None or not entry.applies(s):
            continue
        if entry.always or any(getattr(s, name) != getattr(DEFAULTS, name) for name in entry.fields):
            result[entry.key] = entry.encode(s, tags)
    return result


def from_infotext(
    params: Mapping[str, str], warn: Callable[[str], object] = print, *, fill_defaults: bool = False
) -> dict[str, object]:
    """{field: value} for the DynFuse keys present in parsed infotext; damaged values skipped with a warning.

    `enabled` is True when the infotext has a "DynFuse method" key (even a damaged one). With fill_defaults,
    every field that to_infotext leaves out when it is the default gets its default (only when DynFuse was
    used), so pasting restores the generation exactly instead of keeping whatever the UI held.
    """
    result: dict[str, object] = {}
    for entry in INFOTEXT_KEYS:
        if entry.decode is None or entry.key not in params:
            continue
        text = str(params[entry.key])
        try:
            result.update(entry.decode(text, params))
        except SettingsError as e:
            warn(f"DynFuse: ignoring damaged infotext value {entry.key}: {text!r} ({e})")
    if "DynFuse method" in params:
        result["enabled"] = True
        if fill_defaults:
            for entry in INFOTEXT_KEYS:
                if entry.decode is not None and entry.key not in params:
                    result.update({name: getattr(DEFAULTS, name) for name in entry.fields})
    return result


# ---------------------------------------------------------------------------------------------- schema


def _schema_of(f: Field) -> dict[str, object]:
    meta, kind = f.metadata, f.metadata["kind"]
    if kind == "images":
        schema: dict[str, object] = {
            "type": "array",
            "default": [],
            "items": {"type": "string", "contentEncoding": "base64"},
        }
    elif kind == "image":
        schema = {"type": ["string", "null"], "contentEncoding": "base64", "default": None}
    else:
        json_type = {
            "bool": "boolean",
            "float": "number",
            "optfloat": ["number", "null"],
            "int": "integer",
            "str": "string",
        }[kind]
        schema = {"type": json_type, "default": f.default}
    if meta["choices"] is not None:
        schema["enum"] = list(meta["choices"])
    if meta["low"] is not None:
        schema["exclusiveMinimum" if meta["low_open"] else "minimum"] = meta["low"]
    if meta["high"] is not None:
        schema["maximum"] = meta["high"]
    schema["title"] = meta["label"]
    schema["description"] = meta["doc"]
    return schema


def json_schema() -> dict[str, object]:
    """JSON Schema (draft-07) of the API payload accepted by from_api."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "DynFuse settings",
        "description": "Settings of one DynFuse generation; missing keys take their defaults.",
        "type": "object",
        "additionalProperties": False,
        "properties": {name: _schema_of(f) for name, f in FIELDS.items()},
    }


def describe() -> dict[str, object]:
    """Version and the choices a client needs, for a read-only API route."""
    return {
        "version": __version__,
        "methods": list(METHODS),
        "measures": list(MEASURES),
        "decoders": list(DECODERS),
        "infotext_keys": [entry.key for entry in INFOTEXT_KEYS],
    }
