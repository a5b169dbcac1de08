"""On a Forge variant DynFuse does not support (reForge, Forge Classic, old Forge) the accordion says so, naming
that WebUI, at its top and the console says it once at load; the rest of the UI is built as usual, so pasted
infotext and API arguments keep their places. Runs under gradio 3.41 and, through test_gradio4_environment.py, 4.40."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gradio as gr
import pytest
from ui_stand_ins import InputAccordion

from lib_dynfuse.hosts import ui

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)

NOTICE = "This WebUI is <old> & unsupported."


def content(built: ui.UiBuild) -> list:
    """The accordion's children below its header (the extra() column with the version)."""
    accordion = built.components[0].accordion
    return [child for child in accordion.children if child.elem_id != f"{accordion.elem_id}-extra"]


def test_the_notice_is_the_first_thing_in_the_accordion():
    with gr.Blocks():
        built = ui.build_ui(is_img2img=True, input_accordion=InputAccordion, notice=NOTICE)
    first = content(built)[0]
    assert isinstance(first, gr.HTML) and first.elem_id == "dynfuse_img2img_notice"
    assert first.value == "<p><strong>This WebUI is &lt;old&gt; &amp; unsupported.</strong></p>"
    assert len(built.components) == 1 + len(ui.UI_FIELDS)  # the script's arguments are unchanged


def test_a_supported_host_gets_no_notice():
    with gr.Blocks():
        built = ui.build_ui(is_img2img=False, input_accordion=InputAccordion)
    assert not any(getattr(child, "elem_id", None) == "dynfuse_txt2img_notice" for child in content(built))


@pytest.fixture(params=["reforge", "forge-classic", "old-forge"])
def entry_on_old_forge(tmp_path, monkeypatch, request):
    """The entry script in a WebUI detected as reForge, Forge Classic or old Forge (the fake Forge's script front
    end); yields the host, the entry script and the message that names that WebUI."""
    from lib_dynfuse.hosts import detect

    detect.reset_adapter()
    monkeypatch.setattr(detect, "detect_host", lambda: request.param)
    with fh.forge_host(tmp_path) as host:
        fh.write_test_loras(tmp_path, host.sd_model)
        yield host, fh.load_entry_script(PROJECT), detect.UNSUPPORTED[request.param]
    detect.reset_adapter()


def test_the_entry_script_shows_the_message_in_both_tabs_and_prints_it_once(entry_on_old_forge, capsys):
    from lib_dynfuse.hosts import detect

    host, entry, message = entry_on_old_forge
    capsys.readouterr()
    notices = []
    for is_img2img in (False, True):
        script = entry.Script()
        with gr.Blocks():
            components = script.ui(is_img2img)
        accordion = components[0].accordion
        notices.append(next(c for c in accordion.children if c.elem_id and c.elem_id.endswith("_notice")))
    expected = message[0].upper() + message[1:]
    assert all(notice.value == f"<p><strong>{expected} {detect.STAYS_OFF}</strong></p>" for notice in notices)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"DynFuse: {message} {detect.STAYS_OFF}"]

    runner = host.scripts.ScriptRunner()
    runner.add(script, n_args=1)
    processed, _ = host.txt2img(fh.PROMPT, runner=runner, script_args=({"enabled": False},), steps=1)
    assert capsys.readouterr().out == ""  # left off: nothing more to say, nothing in the infotext
    assert "DynFuse" not in processed.infotexts[0]
    processed, _ = host.txt2img(fh.PROMPT, runner=runner, script_args=({"enabled": True},), steps=1)
    assert capsys.readouterr().out.splitlines() == [
        f"DynFuse: {message} DynFuse is off for this generation."]  # turned on through the API
    assert 'DynFuse note: "off: unsupported WebUI"' in processed.infotexts[0]
