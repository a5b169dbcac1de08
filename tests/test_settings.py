from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import fields, replace

import pytest
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from lib_dynfuse import __version__
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.loras.prompt_tags import LoraTag
from lib_dynfuse.settings import (
    DEFAULTS,
    FIELDS,
    INFOTEXT_KEYS,
    STRENGTH_RANGE,
    DynFuseSettings,
    SettingsError,
    UnreadableImage,
    coerce,
    describe,
    from_api,
    from_infotext,
    json_schema,
    to_infotext,
    xyz_label,
)

# ------------------------------------------------------------------ the host's infotext line, reimplemented
# After A1111 v1.10.1: processing.create_infotext joins `key: quote(value)` with ", ";
# infotext_utils.quote JSON-quotes values holding ',', ':' or a newline; parse_generation_parameters reads
# the last line with re_param and unquotes values that begin and end with '"'.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def host_quote(text: str) -> str:
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def host_unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


PROMPT = "a dog <lora:dog:0.8> <lora:ink:1:0.6>"
PROMPT_WEIGHTS = {"dog": 0.8, "ink": 0.6}  # the UNet weights of PROMPT's tags


def tag(name: str, unet: float) -> LoraTag:
    return LoraTag(name=name, te=1.0, unet=unet, role=None, text=f"<lora:{name}:1:{unet}>")


def host_infotext(extra: dict[str, str], prompt: str = PROMPT) -> str:
    params = {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "1",
        "Size": "512x512",
        **extra,
        "Version": "v1.10.1",
    }
    line = ", ".join(f"{k}: {host_quote(v)}" for k, v in params.items())
    return f"{prompt}\nNegative prompt: blurry\n{line}"


def host_parse(text: str) -> dict[str, str]:
    *lines, lastline = text.strip().split("\n")
    assert len(RE_PARAM.findall(lastline)) >= 3
    params = {
        k: host_unquote(v) if v[:1] == '"' and v[-1:] == '"' else v for k, v in RE_PARAM.findall(lastline)
    }
    negative = next(i for i, line in enumerate(lines) if line.startswith("Negative prompt:"))
    params["Prompt"] = "\n".join(lines[:negative])
    return params


def png_base64(color=(255, 0, 0), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (4, 3), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ------------------------------------------------------------------ record and validation


def test_engine_options_carry_the_same_values():
    s = replace(DEFAULTS, method="k-lora", klora_alpha=2.0, klora_schedule="S*", temperature=3.0, decide_every=2)
    options = s.engine_options()
    assert isinstance(options, EngineOptions)
    assert {f.name: getattr(options, f.name) for f in fields(EngineOptions)} == {
        "method": "k-lora",
        "measure": "kl",
        "temperature": 3.0,
        "standardize": False,
        "decide_per": "image",
        "soft_temperature": 1.0,
        "even_power": -0.5,
        "switch_every": 5,
        "klora_alpha": 2.0,
        "klora_beta": 0.5,
        "klora_schedule": "S*",
        "decide_every": 2,
        "max_tokens": 0,
        "compiled": False,  # a WebUI setting, not a generation's
        "divergence_budget_mb": 0,  # a WebUI setting too
    }
    assert s.engine_options(compiled=True).compiled
    assert s.engine_options(budget_mb=256).divergence_budget_mb == 256


def test_the_settings_tabs_divergence_budget_reaches_the_engine(monkeypatch, capsys):
    from lib_dynfuse.hosts import options

    for value, expected in ((512.0, 512), (0, 0), (-5, 0), ("lots", 0)):
        monkeypatch.setattr(options, "read_option", lambda key, v=value: v if key == options.BUDGET_KEY else False)
        assert options.engine_options(DEFAULTS).divergence_budget_mb == expected
    out = capsys.readouterr().out
    assert "Memory for the divergence in MB" in out and "'lots', not a number of MB >= 0" in out


def test_defaults_are_valid():
    DEFAULTS.validate()
    DEFAULTS.engine_options().validate()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"method": "foo"},
            (
                "DynFuse: method 'foo' is unknown; use one of kl, kl-even, kl-soft, k-lora, switch, static, "
                "subject-only, style-only"
            ),
        ),
        ({"measure": "l2"}, "DynFuse: measure 'l2' is unknown; use one of kl, kl-reverse, js, dot"),
        ({"temperature": 0.0}, "DynFuse: temperature is 0; use a value > 0 and <= 100"),
        ({"temperature": 100.5}, "DynFuse: temperature is 100.5; use a value > 0 and <= 100"),
        ({"subject_strength": 2.5}, "DynFuse: subject_strength is 2.5; use a value >= -2 and <= 2"),
        ({"style_strength": -2.01}, "DynFuse: style_strength is -2.01; use a value >= -2 and <= 2"),
        ({"soft_temperature": -1.0}, "DynFuse: soft_temperature is -1; use a value > 0"),
        ({"switch_every": 0}, "DynFuse: switch_every is 0; use a value >= 1"),
        ({"klora_alpha": 0.0}, "DynFuse: klora_alpha is 0; use a value > 0"),
        ({"klora_beta": -0.1}, "DynFuse: klora_beta is -0.1; use a value >= 0"),
        ({"guidance_strength": 3.0}, "DynFuse: guidance_strength is 3; use a value >= 0 and <= 2"),
        ({"guidance_balance": 1.5}, "DynFuse: guidance_balance is 1.5; use a value >= 0 and <= 1"),
        ({"guidance_every": 0}, "DynFuse: guidance_every is 0; use a value >= 1"),
        (
            {"guidance_start": 0.7, "guidance_end": 0.7},
            (
                "DynFuse: guidance_start (0.7) must be before guidance_end (0.7); "
                "lower the start or raise the end"
            ),
        ),
        ({"decide_per": "batch"}, "DynFuse: decide_per 'batch' is unknown; use one of image, row"),
        (
            {"guidance_decoder": "gpu"},
            "DynFuse: guidance_decoder 'gpu' is unknown; use one of auto, approx, taesd, vae",
        ),
        ({"subject": " "}, "DynFuse: subject is empty; use Auto or a LoRA name"),
        ({"switch_every": 2.0}, "DynFuse: switch_every must be a whole number, not float"),
        ({"standardize": 1}, "DynFuse: standardize must be true or false, not int"),
        ({"temperature": float("nan")}, "DynFuse: temperature is nan; use a value > 0 and <= 100"),
        ({"subject_refs": ("a.png",)}, "DynFuse: subject_refs must hold images only"),
    ],
)
def test_validate_names_the_field_and_what_to_use(change, message):
    with pytest.raises(SettingsError) as error:
        replace(DEFAULTS, **change).validate()
    assert str(error.value) == message


# ------------------------------------------------------------------ API payload


def test_api_defaults_fill_missing_keys():
    s = from_api({"enabled": True, "subject": "dog"})
    assert s == replace(DEFAULTS, enabled=True, subject="dog")


def test_api_unknown_keys_are_named():
    with pytest.raises(
        SettingsError,
        match=r"^DynFuse: unknown setting\(s\) 'temprature', 'foo'; known settings: "
        r"enabled, subject, ",
    ):
        from_api({"enabled": True, "temprature": 2, "foo": 1})


def test_api_coerces_sensible_types():
    s = from_api(
        {
            "enabled": "true",
            "temperature": "0.5",
            "switch_every": "7",
            "guidance_every": 2.0,
            "klora_beta": 1,
            "subject_strength": "0.9",
            "style_strength": None,
            "standardize": "no",
            "show_map": 1,
        }
    )
    assert (s.enabled, s.temperature, s.switch_every, s.guidance_every, s.klora_beta) == (
        True,
        0.5,
        7,
        2,
        1.0,
    )
    assert (s.subject_strength, s.style_strength, s.standardize, s.show_map) == (0.9, None, False, True)
    assert type(s.temperature) is float and type(s.switch_every) is int and type(s.klora_beta) is float


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"enabled": [True]}, "DynFuse: enabled must be true or false, not [True]"),
        ({"enabled": "maybe"}, "DynFuse: enabled must be true or false, not 'maybe'"),
        ({"temperature": "warm"}, "DynFuse: temperature must be a number, not 'warm'"),
        ({"temperature": True}, "DynFuse: temperature must be a number, not True"),
        ({"switch_every": 2.5}, "DynFuse: switch_every must be a whole number, not 2.5"),
        ({"subject": 3}, "DynFuse: subject must be a string, not 3"),
        ({"style_ref": 12}, "DynFuse: style_ref must be a base64 string, not int"),
        ({"method": "KL"}, "DynFuse: method 'KL' is unknown; use one of kl, "),
        ({"guidance_start": "1"}, "DynFuse: guidance_start (1.0) must be before guidance_end (1.0)"),
    ],
)
def test_api_rejects_bad_values_with_the_key(payload, message):
    with pytest.raises(SettingsError) as error:
        from_api(payload)
    assert str(error.value).startswith(message)


def test_api_rejects_a_payload_that_is_not_an_object():
    with pytest.raises(SettingsError, match="^DynFuse: the settings must be a JSON object, not list$"):
        from_api([True, "dog"])


def test_api_keeps_unreadable_references_for_guidance_to_report():
    """A reference that is no image turns off only its guidance side (said by guidance), not all of DynFuse."""
    s = from_api({"subject_refs": [png_base64(), "aGVsbG8="], "style_ref": "/home/me/style.png"})
    assert isinstance(s.subject_refs[0], Image.Image)
    assert s.subject_refs[1] == UnreadableImage(
        "subject_refs[1] is not a base64-encoded image (the data is no image format)")
    assert isinstance(s.style_ref, UnreadableImage)
    assert s.style_ref.reason.startswith("style_ref is not a base64-encoded image (")


def test_api_decodes_images_with_or_without_data_url():
    s = from_api(
        {
            "subject_refs": [png_base64((0, 255, 0)), "data:image/png;base64," + png_base64((0, 0, 255))],
            "style_ref": png_base64(128, mode="L"),
        }
    )
    assert len(s.subject_refs) == 2 and isinstance(s.subject_refs, tuple)
    assert [image.getpixel((0, 0)) for image in s.subject_refs] == [(0, 255, 0), (0, 0, 255)]
    assert (
        s.style_ref.mode == "RGB"
        and s.style_ref.size == (4, 3)
        and s.style_ref.getpixel((3, 2)) == (128,) * 3
    )
    assert from_api({"subject_refs": png_base64()}).subject_refs[0].size == (4, 3)
    rgba = Image.new("RGBA", (2, 2), (1, 2, 3, 4))
    assert from_api({"subject_refs": [rgba]}).subject_refs[0].getpixel((0, 0)) == (1, 2, 3)
    assert from_api({"style_ref": ""}).style_ref is None


def test_coerce_serves_xyz_values_and_labels():
    assert coerce("switch_every", "3") == 3
    assert coerce("method", "k-lora") == "k-lora"
    with pytest.raises(SettingsError, match="^DynFuse: unknown setting 'speed'"):
        coerce("speed", "1")
    assert xyz_label("temperature") == "[DynFuse] KL temperature"
    assert xyz_label("klora_alpha") == "[DynFuse] K-LoRA alpha"


# ------------------------------------------------------------------ infotext


def test_infotext_of_defaults_is_short_and_names_the_tag_weights():
    assert to_infotext(DEFAULTS, subject=tag("dog", 1.0), style=tag("ink wash", 0.6)) == {
        "DynFuse method": "kl",
        "DynFuse subject": "dog:1",
        "DynFuse style": "ink wash:0.6",
        "DynFuse version": __version__,
    }


def test_infotext_writes_non_defaults_that_matter():
    s = replace(
        DEFAULTS,
        method="kl-soft",
        measure="js",
        soft_temperature=0.25,
        switch_every=3,
        klora_alpha=2.0,
        subject_strength=0.9,
        show_map=True,
        guidance=True,
        guidance_end=0.8,
        guidance_decoder="taesd",
        show_loss_plot=True,
    )
    assert to_infotext(s, subject=tag("dog", 0.8), style=tag("a, b", 0.6)) == {
        "DynFuse method": "kl-soft",
        "DynFuse subject": "dog:0.9",  # the strength override, not the tag's 0.8
        "DynFuse style": "a, b:0.6",
        "DynFuse measure": "js",
        "DynFuse soft temperature": "0.25",
        "DynFuse show map": "True",
        "DynFuse guidance": "strength 0.2, balance 0.5, start 0, end 0.8, every 1, decoder taesd",
        "DynFuse show loss plot": "True",
        "DynFuse version": __version__,
    }  # switch_every and klora_alpha do not apply to kl-soft


def test_loss_plot_switch_is_written_with_guidance_only():
    s = replace(DEFAULTS, show_loss_plot=True)
    assert "DynFuse show loss plot" not in to_infotext(s, subject=tag("dog", 1), style=tag("ink", 1))


def test_infotext_keys_are_valid_host_keys_and_cover_the_infotext_fields():
    for entry in INFOTEXT_KEYS:
        assert re.fullmatch(r"DynFuse [\w \-/]+", entry.key)
        assert set(entry.fields) <= set(FIELDS)
    carried = {name for entry in INFOTEXT_KEYS for name in entry.fields}
    # enabled is the presence of "DynFuse method"; reference images are never written.
    assert set(FIELDS) - carried == {"enabled", "subject_refs", "style_ref"}
    assert {e.key for e in INFOTEXT_KEYS if e.decode is None} == {
        "DynFuse version",
        "DynFuse selection",
        "DynFuse scores",
    }


def test_infotext_through_the_host_line():
    s = replace(DEFAULTS, enabled=True, method="switch", switch_every=2, style_strength=-0.5)
    text = host_infotext(to_infotext(s, subject=tag("my lora, v2", 1.0), style=tag("ink", 0.6)))
    assert 'DynFuse subject: "my lora, v2:1", DynFuse style: "ink:-0.5", DynFuse switch every: 2, ' in text
    parsed = from_infotext(host_parse(text), warn=pytest.fail)
    assert parsed == {
        "enabled": True,
        "method": "switch",
        "subject": "my lora, v2",
        "subject_strength": 1.0,  # not among the prompt's tags: the written weight is kept as the override
        "style": "ink",
        "style_strength": -0.5,
        "switch_every": 2,
    }


def test_cheaper_decisions_round_trip_through_the_host_line_for_the_choosing_rules_only():
    s = replace(DEFAULTS, enabled=True, decide_every=3, max_tokens=512)
    text = host_infotext(to_infotext(s, subject=tag("dog", 1.0), style=tag("ink", 1.0)))
    assert "DynFuse decide every: 3, DynFuse divergence tokens: 512" in text
    parsed = from_infotext(host_parse(text), warn=pytest.fail)
    assert (parsed["decide_every"], parsed["max_tokens"]) == (3, 512)
    assert "decide every" not in str(to_infotext(replace(s, method="k-lora"), subject=tag("dog", 1), style=tag("ink", 1)))
    with pytest.raises(SettingsError, match="decide_every is 0; use a value >= 1"):
        coerce("decide_every", 0)
    with pytest.raises(SettingsError, match="max_tokens is -5; use a value >= 0"):
        coerce("max_tokens", -5)


@pytest.mark.parametrize(
    ("strength", "written", "pasted"),
    [(None, "ink:0.6", None), (0.6, "ink:0.6", None), (1.25, "ink:1.25", 1.25)],
)
def test_strength_round_trip_keeps_the_override_only_where_it_differs_from_the_tag(strength, written, pasted):
    s = replace(DEFAULTS, style_strength=strength)
    text = host_infotext(to_infotext(s, subject=tag("dog", 0.8), style=tag("ink", 0.6)))
    assert f"DynFuse style: {json.dumps(written)}" in text
    parsed = from_infotext(host_parse(text), warn=pytest.fail)
    assert (parsed["style"], parsed["style_strength"]) == ("ink", pasted)
    assert (parsed["subject"], parsed["subject_strength"]) == ("dog", None)


@pytest.mark.parametrize(
    ("prompt", "pasted"),
    [
        ("a dog <lora:dog:0.8> <lora:ink:1:0.6>", None),  # the tag as it was generated
        ("a dog <lora:dog:0.8> <lora:ink:0.9>", 0.6),  # the prompt's weight differs: the override keeps 0.6
        ("a dog <lora:dog:0.8> <lora:ink:1:unet=0.6>", None),  # the host's named unet weight
        ("a dog <lora:dog:0.8> <lora:ink:0.6:0.5> <lora:ink:0.6>", 0.6),  # the first tag is the one fused
        ("a dog <lora:dog:0.8> <lora:ink:abc>", 0.6),  # an unreadable prompt: keep the weight as written
        ("a dog", 0.6),
    ],
)
def test_paste_compares_the_weight_with_the_pasted_prompt(prompt, pasted):
    params = {"DynFuse method": "kl", "DynFuse style": "ink:0.6", "Prompt": prompt}
    assert from_infotext(params, warn=pytest.fail)["style_strength"] == pasted


def test_tag_weight_beyond_the_strength_range_pastes_as_the_tag_weight():
    params = {"DynFuse method": "kl", "DynFuse subject": "dog:3", "Prompt": "<lora:dog:3> <lora:ink>"}
    assert from_infotext(params, warn=pytest.fail) == {"enabled": True, "method": "kl", "subject": "dog",
                                                        "subject_strength": None}


def test_name_without_weight_still_pastes():
    params = {"DynFuse method": "kl", "DynFuse subject": "dog", "Prompt": "a dog"}
    assert from_infotext(params, warn=pytest.fail)["subject_strength"] is None


def test_show_switches_paste_on_and_default_to_off():
    s = replace(DEFAULTS, show_map=True, guidance=True, show_loss_plot=True)
    params = host_parse(host_infotext(to_infotext(s, subject=tag("dog", 0.8), style=tag("ink", 0.6))))
    pasted = from_infotext(params, warn=pytest.fail, fill_defaults=True)
    assert (pasted["show_map"], pasted["show_loss_plot"]) == (True, True)
    del params["DynFuse show map"], params["DynFuse show loss plot"]
    pasted = from_infotext(params, warn=pytest.fail, fill_defaults=True)
    assert (pasted["show_map"], pasted["show_loss_plot"]) == (False, False)


def test_read_only_keys_are_ignored():
    params = {
        "DynFuse method": "kl",
        "DynFuse selection": "subject 0.42",
        "DynFuse scores": "clip 0.3",
        "DynFuse version": "9.9",
        "Steps": "20",
    }
    assert from_infotext(params, warn=pytest.fail) == {"method": "kl", "enabled": True}
    assert from_infotext({"Steps": "20"}, warn=pytest.fail) == {}


def test_fill_defaults_restores_left_out_values():
    params = {"DynFuse method": "kl", "DynFuse subject": "dog", "DynFuse style": "ink"}
    filled = from_infotext(params, warn=pytest.fail, fill_defaults=True)
    assert filled["temperature"] == 1.0 and filled["guidance"] is False and filled["switch_every"] == 5
    assert replace(DEFAULTS, **filled) == replace(DEFAULTS, enabled=True, subject="dog", style="ink")
    assert from_infotext({"Steps": "20"}, warn=pytest.fail, fill_defaults=True) == {}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DynFuse KL temperature", "abc"),
        ("DynFuse KL temperature", "0"),
        ("DynFuse method", "mystery"),
        ("DynFuse switch every", "2.5"),
        ("DynFuse subject", "dog:heavy"),
        ("DynFuse subject", ""),
        ("DynFuse standardize", "sometimes"),
        ("DynFuse guidance", "strength 0.2, balance 0.5"),
        ("DynFuse guidance", "strength 0.2, balance 0.5, start 0.8, end 0.7, every 1, decoder auto"),
        ("DynFuse guidance", "strength 0.2, balance 0.5, start 0.2, end 0.7, every 1, decoder auto, speed 3"),
    ],
)
def test_damaged_values_are_skipped_with_one_warning(key, value):
    params = {"DynFuse method": "kl", "DynFuse style": "ink", key: value}
    warnings: list[str] = []
    parsed = from_infotext(params, warn=warnings.append)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"DynFuse: ignoring damaged infotext value {key}: {value!r} (")
    expected = {"enabled": True, "method": "kl", "style": "ink", "style_strength": None}
    if key == "DynFuse method":
        del expected["method"]
    assert parsed == expected


def _number(low: float | None, high: float | None, low_open: bool) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=low,
        max_value=1e6 if high is None else high,
        exclude_min=low_open,
        allow_nan=False,
        allow_infinity=False,
    )


def _strategy(name: str) -> st.SearchStrategy:
    meta = FIELDS[name].metadata
    kind = meta["kind"]
    if meta["choices"] is not None:
        return st.sampled_from(meta["choices"])
    if kind == "bool":
        return st.booleans()
    if kind == "int":
        return st.integers(min_value=int(meta["low"]), max_value=1000)
    if kind == "float":
        return _number(meta["low"], meta["high"], meta["low_open"])
    if kind == "optfloat":
        return st.none() | _number(meta["low"], meta["high"], meta["low_open"])
    return st.just(FIELDS[name].default)  # names are given as labels; images never go into infotext


valid_settings = st.builds(DynFuseSettings, **{name: _strategy(name) for name in FIELDS}).filter(
    lambda s: s.guidance_start < s.guidance_end
)
# The host's own quoting trips over quotes, commas, colons, '%' escapes and whitespace at either end.
lora_names = st.text(st.sampled_from(' ,:"%\\\n\tab.-') | st.characters(), min_size=1, max_size=20).filter(
    lambda text: text.strip() != ""
)


# Names and weights sometimes those of PROMPT's tags, so that both ways of pasting a strength are taken.
prompt_tags = st.builds(
    tag,
    st.sampled_from(list(PROMPT_WEIGHTS)) | lora_names,
    st.sampled_from(list(PROMPT_WEIGHTS.values())) | _number(*STRENGTH_RANGE, False),
)


def pasted_strength(used: LoraTag, strength: float | None) -> float | None:
    """The strength a paste of PROMPT's infotext restores: None where PROMPT's tag has the weight."""
    weight = used.unet if strength is None else strength
    return None if PROMPT_WEIGHTS.get(used.name) == weight else weight


@hypothesis_settings(max_examples=300, deadline=None)
@given(s=valid_settings, subject=prompt_tags, style=prompt_tags)
@example(s=DEFAULTS, subject=tag(" dog ", 1.0), style=tag('"ink"', 1.0)).via("the host strips or unquotes")
@example(s=DEFAULTS, subject=tag("50%3A50", 1.0), style=tag("ink", 0.6)).via("a name that looks escaped")
def test_infotext_round_trip(s, subject, style):
    s.validate()
    written = to_infotext(s, subject=subject, style=style)
    parsed = from_infotext(host_parse(host_infotext(written)), warn=pytest.fail)
    rebuilt = replace(DEFAULTS, **parsed)
    rebuilt.validate()
    expected = replace(
        s,
        subject=subject.name,
        subject_strength=pasted_strength(subject, s.subject_strength),
        style=style.name,
        style_strength=pasted_strength(style, s.style_strength),
    )
    for entry in INFOTEXT_KEYS:
        if entry.decode is not None and entry.applies(s):
            assert {n: getattr(rebuilt, n) for n in entry.fields} == {
                n: getattr(expected, n) for n in entry.fields
            }
    assert parsed["enabled"] is True
    # Written again with PROMPT's tags, the same infotext (a name not in PROMPT has its weight as override).
    assert to_infotext(rebuilt, subject=tag(subject.name, PROMPT_WEIGHTS.get(subject.name, 0)),
                       style=tag(style.name, PROMPT_WEIGHTS.get(style.name, 0))) == written


# ------------------------------------------------------------------ schema and describe


def test_json_schema_lists_exactly_the_fields():
    schema = json_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == [f.name for f in fields(DynFuseSettings)]
    for name, prop in schema["properties"].items():
        assert {"type", "default", "description"} <= set(prop), name
    props = schema["properties"]
    assert props["method"]["enum"] == [
        "kl",
        "kl-even",
        "kl-soft",
        "k-lora",
        "switch",
        "static",
        "subject-only",
        "style-only",
    ]
    assert props["temperature"] == {
        "type": "number",
        "default": 1.0,
        "exclusiveMinimum": 0.0,
        "maximum": 100.0,
        "title": "KL temperature",
        "description": "Softmax temperature of the divergence.",
    }
    assert props["subject_strength"]["type"] == ["number", "null"]
    assert props["switch_every"]["type"] == "integer" and props["switch_every"]["minimum"] == 1
    assert props["subject_refs"]["items"]["type"] == "string"
    json.dumps(schema)


def test_json_schema_is_valid_draft7_and_matches_from_api():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    defaults = {name: prop["default"] for name, prop in schema["properties"].items()}
    assert list(validator.iter_errors(defaults)) == []
    assert from_api(defaults) == DEFAULTS
    for bad in ({"temperature": 0}, {"method": "foo"}, {"guidance_every": 0}, {"unknown": 1}):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(SettingsError):
            from_api(bad)


def test_describe():
    info = describe()
    assert info["version"] == __version__
    assert info["methods"][0] == "kl" and "js" in info["measures"] and "taesd" in info["decoders"]
    assert "DynFuse guidance" in info["infotext_keys"]
    json.dumps(info)
