"""The DynFuse accordion built with the environment's real gradio (3.41 system-wide, 4.40 in .venv-gradio4).

Runs under either version; the version-specific wiring is in test_ui_gradio3.py / test_ui_gradio4.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import fields, replace
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image
from ui_stand_ins import InputAccordion

from lib_dynfuse.hosts import gradio_compat, ui
from lib_dynfuse.loras.prompt_tags import parse_lora_tags
from lib_dynfuse.settings import DEFAULTS, INFOTEXT_KEYS, DynFuseSettings, SettingsError, to_infotext

ROOT = Path(__file__).resolve().parents[1]


def build(is_img2img: bool = False, lora_names=None) -> ui.UiBuild:
    with gr.Blocks():
        return ui.build_ui(is_img2img=is_img2img, input_accordion=InputAccordion, lora_names=lora_names)


@pytest.fixture(scope="module")
def built() -> ui.UiBuild:
    return build()


def test_ui_fields_cover_every_setting_once():
    names = [f.name for f in fields(DynFuseSettings)]
    assert sorted(ui.UI_FIELDS) == sorted(n for n in names if n != "enabled")
    assert len(set(ui.UI_FIELDS)) == len(ui.UI_FIELDS)


def test_components_are_the_accordion_then_ui_fields_in_order(built):
    assert len(built.components) == 1 + len(ui.UI_FIELDS)
    assert built.components[0] is built.by_field["enabled"]
    assert built.components[0].accordion.elem_id == "dynfuse_txt2img"
    assert built.components[1:] == [built.by_field[name] for name in ui.UI_FIELDS]
    assert [c.elem_id for c in built.components[1:]] == [f"dynfuse_txt2img_{name}" for name in ui.UI_FIELDS]


def test_default_values_are_the_default_settings(built):
    values = [component.value for component in built.components]
    assert ui.values_to_settings(values) == DynFuseSettings()


def test_img2img_ids_differ_from_txt2img():
    txt, img = build(False), build(True)
    assert img.components[0].accordion.elem_id == "dynfuse_img2img"
    assert img.tags.elem_id == "dynfuse_img2img_tags"
    assert not {c.elem_id for c in txt.components} & {c.elem_id for c in img.components}


def test_tags_box_is_rendered_but_hidden_by_css(built):
    assert built.tags.visible  # gradio 4 would leave an invisible component out of the page
    assert "dynfuse-hidden" in built.tags.elem_classes
    assert ".dynfuse-hidden" in (ROOT / "style.css").read_text()


def test_values_convert_to_settings():
    values = [True, "subj", "0.8", "Auto", "", "k-lora", "kl", 2.0, True, "row", 1.0, 3.0, 1.5, 0.5, "S*",
              True, True, 0.4, 0.25, 0.1, 0.9, 2.0, "approx", None, None, True]
    settings = ui.values_to_settings(values)
    assert settings == replace(DEFAULTS, enabled=True, subject="subj", subject_strength=0.8, method="k-lora",
                               temperature=2.0, standardize=True, decide_per="row", switch_every=3,
                               klora_schedule="S*", show_map=True, guidance=True, guidance_strength=0.4,
                               guidance_balance=0.25, guidance_start=0.1, guidance_end=0.9, guidance_every=2,
                               guidance_decoder="approx", show_loss_plot=True)
    assert isinstance(settings.switch_every, int)


def test_cleared_dropdown_means_auto_and_short_lists_keep_defaults():
    assert ui.values_to_settings([True, None, None, ""]) == replace(DEFAULTS, enabled=True)


def test_unreadable_strength_names_the_field():
    with pytest.raises(SettingsError, match="subject_strength must be a number or null, not 'strong'"):
        ui.values_to_settings([True, "Auto", "strong"])


def test_bad_value_names_the_field():
    values = [c.value for c in build().components]
    values[1 + ui.UI_FIELDS.index("method")] = "merge"
    with pytest.raises(SettingsError, match="method 'merge' is unknown"):
        ui.values_to_settings(values)


def test_uploaded_files_become_rgb_images(tmp_path):
    path = tmp_path / "ref.png"
    Image.new("RGBA", (8, 6), (10, 20, 30, 128)).save(path)

    class TempfileWrapper:  # what gradio 3.41's File gives: the path in .name
        name = str(path)

    for value in ([TempfileWrapper()], [str(path)], [{"path": str(path)}]):
        (image,) = gradio_compat.files_to_images(value)
        assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (10, 20, 30)
    assert gradio_compat.files_to_images(None) == ()


def paste(built: ui.UiBuild, params: dict) -> dict[str, object]:
    """What the host's paste does: each key function's update, by settings field."""
    by_component = {id(c): name for name, c in built.by_field.items()}
    result = {}
    for component, key in built.infotext_fields:
        update = key(params)
        if update is not None:
            result[by_component[id(component)]] = update["value"]
    return result


def test_infotext_fields_follow_the_settings_table(built):
    restorable = {name for entry in INFOTEXT_KEYS if entry.decode is not None for name in entry.fields}
    pairs = {(built_name(built, component), str(key)) for component, key in built.infotext_fields}
    expected = {(name, entry.key) for entry in INFOTEXT_KEYS if entry.decode is not None
                for name in entry.fields}
    assert pairs == expected | {("enabled", "DynFuse method")}
    assert {name for name, _ in pairs} == restorable | {"enabled"}
    assert built.paste_field_names == list(dict.fromkeys(str(key) for _, key in built.infotext_fields))


def built_name(built: ui.UiBuild, component) -> str:
    return next(name for name, c in built.by_field.items() if c is component)


PROMPT = "a dog <lora:subj:1> <lora:sty:0.8>"


def infotext_params(used: DynFuseSettings, prompt: str = PROMPT) -> dict[str, str]:
    """The parsed infotext of a generation of `prompt` with these settings, as the host hands it to paste."""
    subject, style = parse_lora_tags(prompt)
    return {**to_infotext(used, subject=subject, style=style), "Prompt": prompt}


def test_paste_restores_the_generation(built):
    used = replace(DEFAULTS, enabled=True, subject="subj", subject_strength=0.7, method="kl-soft",
                   soft_temperature=2.5, show_map=True, guidance=True, guidance_end=0.8, show_loss_plot=True)
    pasted = paste(built, infotext_params(used))
    assert pasted["enabled"] is True
    assert pasted["subject"] == "subj" and pasted["subject_strength"] == "0.7"  # the strength box holds text
    assert pasted["style"] == "sty" and pasted["style_strength"] == ""  # empty: the tag's own weight
    assert pasted["method"] == "kl-soft" and pasted["soft_temperature"] == 2.5
    assert pasted["guidance"] is True and pasted["guidance_end"] == 0.8
    assert pasted["show_map"] is True and pasted["show_loss_plot"] is True
    assert pasted["switch_every"] == DEFAULTS.switch_every  # left out of the infotext as a default


def test_paste_into_a_prompt_with_other_tag_weights_keeps_the_generation_weights(built):
    params = infotext_params(replace(DEFAULTS, enabled=True))
    params["Prompt"] = "a dog <lora:subj:1> <lora:sty:0.5>"
    pasted = paste(built, params)
    assert (pasted["subject_strength"], pasted["style_strength"]) == ("", "0.8")
    assert (pasted["show_map"], pasted["show_loss_plot"]) == (False, False)  # absent keys switch them off


def test_paste_without_dynfuse_leaves_the_controls_alone(built):
    assert paste(built, {"Steps": "20", "Sampler": "Euler"}) == {}


def test_damaged_value_is_reported_once(built, capsys):
    params = infotext_params(replace(DEFAULTS, enabled=True))
    params["DynFuse measure"] = "banana"
    pasted = paste(built, params)
    assert pasted["method"] == "kl" and "measure" not in pasted  # skipped, the control keeps its value
    assert capsys.readouterr().out.count("DynFuse measure") == 1


def test_tag_choices_offer_auto_and_the_prompt_tags():
    subject, style, status = ui.tag_choices(json.dumps(["subj", "sty", "subj"]), "Auto", "sty")
    assert subject["choices"] == ["Auto", "subj", "sty"] and subject["value"] == "Auto"
    assert style["choices"] == ["Auto", "subj", "sty"] and style["value"] == "sty"
    assert status["value"] == "LoRA tags in the prompt: 2"


def test_tag_choices_keep_a_pasted_name_and_flag_unknown_loras():
    subject, style, status = ui.tag_choices('["subj"]', "gone", None, lora_names=lambda: ["sty"])
    assert subject["value"] == "gone" and subject["choices"] == ["Auto", "subj"]
    assert style["value"] == "Auto"
    assert status["value"] == ("LoRA tags in the prompt: 1 (DynFuse needs two) · "
                               "not found among the installed LoRAs: subj")


def test_tag_choices_ignore_a_damaged_list():
    subject, _, status = ui.tag_choices("{not json", "Auto", "Auto")
    assert subject["choices"] == ["Auto"]
    assert "No <code>&lt;lora:" in status["value"]


PROMPTS = [
    "a photo of sks dog <lora:subj:0.8>, watercolor <lora:sty:1:0.6>",
    "<lyco:x:te=0.5:unet=1> and <lora:a=b:name:0.3> and <hypernet:h:1> <lora:subj:1:dynfuse=style>",
    "<lora:with space:1> <lora:dup> <lora:dup:0.2> <lora:>broken <lora:k=v>",
]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("prompt", PROMPTS)
def test_page_script_reads_tags_like_the_generation(prompt):
    script = (ROOT / "javascript" / "dynfuse.js").read_text()
    program = ("global.window = {}; global.document = {addEventListener() {}};\n" + script +
               "\nprocess.stdout.write(JSON.stringify(window.dynfuseLoraNames(process.argv[1])));")
    out = subprocess.run(["node", "-e", program, prompt], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == list(dict.fromkeys(tag.name for tag in parse_lora_tags(prompt)))
