"""gradio 3.41 (AUTOMATIC1111): the UI's events and value shapes through gradio's own processing."""

from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
if int(gr.__version__.split(".", 1)[0]) != 3:
    pytest.skip(f"gradio {gr.__version__} is not 3.x (see test_ui_gradio4.py)", allow_module_level=True)

from ui_stand_ins import InputAccordion

from lib_dynfuse.hosts import ui


@pytest.fixture(scope="module")
def page():
    with gr.Blocks() as demo:
        built = ui.build_ui(is_img2img=True, input_accordion=InputAccordion, lora_names=lambda: ["subj"])
    return demo, built


def test_tag_box_change_refills_both_dropdowns(page):
    demo, built = page
    index = next(i for i, dep in enumerate(demo.dependencies) if dep["inputs"][:1] == [built.tags._id])
    dep = demo.dependencies[index]
    assert dep["outputs"][:2] == [built.by_field["subject"]._id, built.by_field["style"]._id]
    assert dep["queue"] is False and dep["show_progress"] == "hidden"
    result = asyncio.run(demo.process_api(index, [json.dumps(["subj", "sty"]), "Auto", "sty"], state={}))
    subject, style, status = result["data"]
    assert subject == {"choices": ["Auto", "subj", "sty"], "value": "Auto", "__type__": "update"}
    assert style == {"choices": ["Auto", "subj", "sty"], "value": "sty", "__type__": "update"}
    assert status["value"].endswith("not found among the installed LoRAs: sty")


def test_accordion_value_is_the_enable_flag(page):
    demo, built = page
    config = {c["id"]: c for c in demo.get_config_file()["components"]}
    accordion = built.components[0]
    assert config[accordion._id]["props"]["elem_id"] == "dynfuse_img2img-checkbox"
    assert config[accordion._id]["props"]["visible"] is False
    assert config[accordion.accordion._id]["props"]["elem_id"] == "dynfuse_img2img"
    assert accordion.preprocess(True) is True


def test_uploaded_reference_files_convert(page, tmp_path):
    _, built = page
    path = tmp_path / "ref.png"
    Image.new("RGB", (5, 4), (1, 2, 3)).save(path)
    uploaded = built.by_field["subject_refs"].preprocess(
        [{"name": str(path), "data": None, "is_file": True, "orig_name": "ref.png"}])
    values = [c.value for c in built.components]
    values[1 + ui.UI_FIELDS.index("subject_refs")] = uploaded
    (image,) = ui.values_to_settings(values).subject_refs
    assert image.size == (5, 4) and image.getpixel((0, 0)) == (1, 2, 3)


def test_strength_box_text_becomes_the_strength(page):
    _, built = page
    values = [c.value for c in built.components]
    box = built.by_field["subject_strength"]
    assert box.value == ""
    values[1 + ui.UI_FIELDS.index("subject_strength")] = box.preprocess(box.value)
    assert ui.values_to_settings(values).subject_strength is None  # empty: the tag's own weight
    values[1 + ui.UI_FIELDS.index("subject_strength")] = box.preprocess(" 0.65 ")
    assert ui.values_to_settings(values).subject_strength == 0.65
