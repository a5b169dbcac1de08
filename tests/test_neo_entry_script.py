"""The entry script (scripts/dynfuse.py) on the fake Forge Neo: host detection picks the Neo adapter, the takeover
runs from process_before_every_sampling, settings come from the API (the README's request), from X/Y/Z cells, and
the infotext carries them back as on the other hosts."""

from __future__ import annotations

import copy
import importlib.util
import types
from pathlib import Path

import pytest
import torch
from test_a1111_integration import _readme_settings
from test_settings import RE_PARAM, host_unquote

from lib_dynfuse.hosts.base import NOTE_KEY

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("neo_harness", Path(__file__).parent / "fakehost/neo/neo_harness.py")
nh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nh)

README_PROMPT = "my dog <lora:my_dog:1> <lora:watercolor:1> <lora:other:0.5>"


@pytest.fixture
def neo(tmp_path):
    # Imported per test: the A1111 fixtures drop lib_dynfuse.hosts.* from sys.modules.
    from lib_dynfuse.hosts import detect

    detect.reset_adapter()
    with nh.neo_host(tmp_path) as host:
        keys = list(nh.kohya_keys())
        nh.write_lora(tmp_path / "my_dog.safetensors", host.sd_model, keys[nh.SUBJECT_KEYS], seed=1)
        nh.write_lora(tmp_path / "watercolor.safetensors", host.sd_model, keys[nh.STYLE_KEYS], seed=2)
        nh.write_lora(tmp_path / "other.safetensors", host.sd_model, keys[nh.OTHER_KEYS], seed=3)
        entry = nh.load_entry_script(PROJECT)
        script = entry.Script()
        runner = host.scripts.ScriptRunner()
        runner.add(script, n_args=1)
        yield host, runner
        detect.reset_adapter()


def parse(infotext: str, prompt: str = README_PROMPT) -> dict[str, str]:
    """The infotext's parameters as the WebUI parses them (the fake writes no prompt line: given here)."""
    return {"Prompt": prompt, **{k: host_unquote(v) if v[:1] == '"' else v for k, v in RE_PARAM.findall(infotext)}}


def test_the_readmes_api_request_runs_the_neo_takeover(neo, capsys):
    from lib_dynfuse.hosts import detect
    from lib_dynfuse.hosts.neo import NeoAdapter
    from lib_dynfuse.settings import from_infotext

    host, runner = neo
    settings = _readme_settings()
    processed, _ = host.txt2img(README_PROMPT, runner=runner, script_args=(settings,), steps=3, enable_hr=True)
    assert isinstance(detect.get_adapter(), NeoAdapter) and detect.get_adapter().job is None
    info = parse(processed.infotexts[0])
    assert from_infotext(info, warn=pytest.fail) == {
        "enabled": True, "method": "kl", "subject": "my_dog", "subject_strength": None, "style": "watercolor",
        "style_strength": 0.8,
        "show_map": True}
    assert info["DynFuse selection"].startswith("subject ") and NOTE_KEY not in info
    assert "my_dog" in info["Lora hashes"]
    assert len(processed.images) == 2        # the image and its selection map (show_map)
    assert [log.steps for log in detect.get_adapter().last_job.logs(0)] == [[0, 1, 2], [0, 1, 2]]
    assert sum(len(m._forward_hooks) for m in host.sd_model.forge_objects_original.unet.model.modules()) == 0
    assert "Error running" not in capsys.readouterr().out


def test_bad_api_settings_are_refused_and_neo_runs_as_usual(neo, capsys):
    host, runner = neo
    clean, _ = host.txt2img(README_PROMPT, steps=2)
    processed, p = host.txt2img(README_PROMPT, runner=runner, script_args=({"enabled": True, "method": "loudest"},),
                                steps=2)
    out = capsys.readouterr().out
    assert "DynFuse is off for this generation" in out and "loudest" in out
    assert p.extra_generation_params[NOTE_KEY].startswith("off:")
    assert torch.equal(processed.images[0], clean.images[0])


def test_xyz_cells_override_the_api_settings(neo, monkeypatch):
    """As the X/Y/Z plot script runs a cell: a shallow copy of the plot's p, the axis applied, process_images."""
    from lib_dynfuse.hosts import xyz

    host, runner = neo
    plot = types.SimpleNamespace(axis_options=[], AxisOption=lambda label, type, apply, **kw: types.SimpleNamespace(
        label=label, type=type, apply=apply, **kw))
    monkeypatch.setattr(xyz, "find_xyz_module", lambda: plot)
    assert xyz.register_axes() == len(xyz.AXES)
    method = next(o for o in plot.axis_options if o.label == "[DynFuse] Method")
    subject = next(o for o in plot.axis_options if o.label == "[DynFuse] Subject strength")

    p = host.processing.StableDiffusionProcessingTxt2Img(prompt=README_PROMPT, script_runner=runner,
                                                        script_args=({"enabled": True, "method": "kl"},), steps=2)
    infos = []
    for option, value in ((method, "static"), (subject, 0.5)):
        cell = copy.copy(p)
        option.apply(cell, option.type(value), [value])
        host.shared.state.begin()
        infos.append(parse(host.processing.process_images(cell).infotexts[0]))
    assert infos[0]["DynFuse method"] == "static" and infos[0]["DynFuse subject"] == "my_dog:1"
    assert infos[1]["DynFuse method"] == "kl" and infos[1]["DynFuse subject"] == "my_dog:0.5"
    assert not hasattr(p, xyz.XYZ_ATTR)      # the plot's own p is untouched
