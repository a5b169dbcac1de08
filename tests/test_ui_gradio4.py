"""gradio 4.40 (Forge): the UI's events and value shapes through gradio's own processing.

Run in the gradio 4 environment: .venv-gradio4/bin/python -m pytest tests/test_ui_*.py
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
if int(gr.__version__.split(".", 1)[0]) != 4:
    pytest.skip(f"gradio {gr.__version__} is not 4.x (see test_ui_gradio3.py)", allow_module_level=True)

from gradio.data_classes import FileData, ListFiles
from ui_stand_ins import InputAccordion

from lib_dynfuse.hosts import ui


@pytest.fixture(scope="module")
def page():
    with gr.Blocks() as demo:
        built = ui.build_ui(is_img2img=False, input_accordion=InputAccordion, lora_names=lambda: ["subj"])
    return demo, built


def test_tag_box_change_refills_both_dropdowns(page):
    demo, built = page
    block_fn = next(fn for fn in demo.fns.values() if fn.inputs[:1] == [built.tags])
    assert block_fn.outputs[:2] == [built.by_field["subject"], built.by_field["style"]]
    assert block_fn.queue is False and block_fn.show_progress == "hidden"
    result = asyncio.run(demo.process_api(block_fn, [json.dumps(["subj", "sty"]), "Auto", "custom"]))
    subject, style, status = result["data"]
    assert subject["__type__"] == "update" and subject["value"] == "Auto"
    choices = [tuple(choice) for choice in subject["choices"]]  # (label, value) pairs in gradio 4
    assert choices == [("Auto", "Auto"), ("subj", "subj"), ("sty", "sty")]
    assert style["value"] == "custom"  # allow_custom_value: a pasted name survives
    assert status["value"].endswith("not found among the installed LoRAs: sty")


def test_dropdown_accepts_a_value_outside_its_choices(page):
    _, built = page
    assert built.by_field["subject"].preprocess("pasted_name") == "pasted_name"


def test_accordion_value_is_the_enable_flag(page):
    demo, built = page
    config = {c["id"]: c for c in demo.get_config_file()["components"]}
    accordion = built.components[0]
    assert config[accordion._id]["props"]["visible"] is False
    assert config[accordion._id]["props"]["elem_id"] == "dynfuse_txt2img-checkbox"
    assert config[accordion.accordion._id]["props"]["elem_id"] == "dynfuse_txt2img"
    assert accordion.preprocess(True) is True


def test_uploaded_reference_files_convert(page, tmp_path):
    _, built = page
    path = tmp_path / "ref.png"
    Image.new("RGB", (5, 4), (1, 2, 3)).save(path)
    # gradio's upload route creates its cache folder before any file reaches preprocess; on a fresh machine
    # nothing else has made it yet.
    Path(built.by_field["subject_refs"].GRADIO_CACHE).mkdir(parents=True, exist_ok=True)
    uploaded = built.by_field["subject_refs"].preprocess(
        ListFiles(root=[FileData(path=str(path), orig_name="ref.png")]))
    assert uploaded == [str(path)]  # paths (NamedString), not tempfile wrappers as in 3.41
    values = [c.value for c in built.components]
    values[1 + ui.UI_FIELDS.index("subject_refs")] = uploaded
    (image,) = ui.values_to_settings(values).subject_refs
    assert image.size == (5, 4) and image.getpixel((0, 0)) == (1, 2, 3)


def test_style_reference_is_a_pil_image(page, tmp_path):
    _, built = page
    path = tmp_path / "style.png"
    Image.new("RGB", (3, 3), (9, 8, 7)).save(path)
    image = built.by_field["style_ref"].preprocess(FileData(path=str(path)))
    assert isinstance(image, Image.Image) and image.getpixel((1, 1)) == (9, 8, 7)


def test_strength_box_text_becomes_the_strength(page):
    _, built = page
    values = [c.value for c in built.components]
    box = built.by_field["subject_strength"]
    assert box.value == ""
    values[1 + ui.UI_FIELDS.index("subject_strength")] = box.preprocess(box.value)
    assert ui.values_to_settings(values).subject_strength is None  # empty: the tag's own weight
    values[1 + ui.UI_FIELDS.index("subject_strength")] = box.preprocess(" 0.65 ")
    assert ui.values_to_settings(values).subject_strength == 0.65
