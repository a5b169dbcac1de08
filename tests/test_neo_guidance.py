"""Guidance through the fake Forge Neo, as on Forge: the after-CFG x0 estimate is corrected at every step of both
hires passes under Neo's inference mode, the step is sized by Neo's own unconditional estimate (from a
sampler_post_cfg_function on DynFuse's clone), nothing touches Neo's VAE or memory manager while the sampler runs,
and the next plain generation is the one Neo would have made anyway."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_forge_isolation import GUIDED, forbid_forge_models_while_sampling

from lib_dynfuse.settings import DynFuseSettings

pytest.importorskip("open_clip")
pytest.importorskip("timm")

_spec = importlib.util.spec_from_file_location("neo_harness", Path(__file__).parent / "fakehost/neo/neo_harness.py")
nh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nh)


@pytest.fixture
def host(tmp_path, monkeypatch):
    with nh.neo_host(tmp_path) as host, nh.tiny_guidance_models(host, monkeypatch):
        nh.write_test_loras(tmp_path, host.sd_model)
        yield host


@pytest.mark.parametrize("decoder", ["approx", "vae"])
def test_guidance_on_neo_corrects_each_step_with_neos_unconditional_estimate(host, monkeypatch, capsys, decoder):
    from lib_dynfuse.hosts.neo import NeoAdapter

    script = nh.AdapterScript(host, NeoAdapter(), DynFuseSettings(enabled=True, guidance_decoder=decoder, **GUIDED))
    plain, _ = host.txt2img(nh.PROMPT, steps=3, cfg_scale=5.0, enable_hr=True)
    cached = host.sd_model.forge_objects_after_applying_lora.unet
    options = repr(cached.model_options)

    neo_uncond, given = nh.record_unconditional_estimates(monkeypatch)
    called = forbid_forge_models_while_sampling(host, monkeypatch)
    guided, _ = host.txt2img(nh.PROMPT, runner=host.scripts.ScriptRunner([script]), steps=3, cfg_scale=5.0,
                             enable_hr=True)
    assert called == [] and "failed" not in capsys.readouterr().out and "DynFuse note" not in guided.infotexts[0]
    assert [step for step, _ in script.job.guided.losses] == [0, 1, 2] * 2  # first pass, then hires
    assert len(given) == len(neo_uncond) == 6 and all(torch.equal(a, b) for a, b in zip(given, neo_uncond))
    assert torch.isfinite(guided.latents[0]).all() and not torch.allclose(guided.latents[0], plain.latents[0])

    monkeypatch.undo()
    again, _ = host.txt2img(nh.PROMPT, steps=3, cfg_scale=5.0, enable_hr=True)
    assert torch.equal(again.images[0], plain.images[0])
    assert host.sd_model.forge_objects_after_applying_lora.unet is cached and repr(cached.model_options) == options
