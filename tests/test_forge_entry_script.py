"""The entry script (scripts/dynfuse.py) on the fake Forge host: host detection picks the Forge adapter and the
takeover runs from process_before_every_sampling, with settings given as an API payload."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import tolerances as tol

from lib_dynfuse.hosts.base import NOTE_KEY

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)


@pytest.fixture
def forge(tmp_path):
    # Imported per test: the A1111 fixtures drop lib_dynfuse.hosts.* from sys.modules.
    from lib_dynfuse.hosts import detect

    detect.reset_adapter()
    with fh.forge_host(tmp_path) as host:
        fh.write_test_loras(tmp_path, host.sd_model)
        entry = fh.load_entry_script(PROJECT)
        script = entry.Script()
        runner = host.scripts.ScriptRunner()
        runner.add(script, n_args=1)
        yield host, runner
    detect.reset_adapter()


def test_entry_script_runs_the_forge_takeover(forge, capsys):
    from lib_dynfuse.hosts import detect
    from lib_dynfuse.hosts import forge as forge_adapter

    host, runner = forge
    merged, _ = host.txt2img(fh.PROMPT, steps=3, enable_hr=True)
    fused, _p = host.txt2img(fh.PROMPT, runner=runner, script_args=({"enabled": True, "method": "static"},),
                            steps=3, enable_hr=True)
    assert isinstance(detect.get_adapter(), forge_adapter.ForgeAdapter)
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], fh.diffusion_model(host.sd_model), steps=6)
    assert "DynFuse method: static" in fused.infotexts[0]
    assert 'DynFuse subject: "subj:0.8"' in fused.infotexts[0] and 'DynFuse style: "style:1"' in fused.infotexts[0]
    assert detect.get_adapter().job is None
    assert sum(len(m._forward_hooks) for m in host.sd_model.forge_objects_original.unet.model.modules()) == 0
    assert "Error running" not in capsys.readouterr().out


def test_entry_script_refuses_bad_api_settings_and_forge_runs_as_usual(forge, capsys):
    host, runner = forge
    clean, _ = host.txt2img(fh.PROMPT, steps=2)
    processed, p = host.txt2img(fh.PROMPT, runner=runner, script_args=({"enabled": True, "method": "loudest"},),
                                steps=2)
    out = capsys.readouterr().out
    assert "DynFuse is off for this generation" in out and "loudest" in out
    assert p.extra_generation_params[NOTE_KEY].startswith("off:")
    assert torch.equal(processed.images[0], clean.images[0])
