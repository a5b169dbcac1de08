"""Nothing DynFuse runs inside Forge's sampling loop may call Forge's VAE or its memory manager: loading a model
there can evict UNet weights mid-sampling, and Forge's VAE is made of inference tensors. Here every such entry
point raises while the sampler runs, and a guided, fused generation must still finish with guidance applied."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_dynfuse.settings import DynFuseSettings

pytest.importorskip("open_clip")
pytest.importorskip("timm")

_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)

GUIDED = {"guidance": True, "guidance_strength": 0.5, "guidance_start": 0.0, "guidance_end": 1.0,
          "subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
          "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}


@pytest.fixture
def host(tmp_path, monkeypatch):
    with fh.forge_host(tmp_path) as host, fh.tiny_guidance_models(host, monkeypatch):
        fh.write_test_loras(tmp_path, host.sd_model)
        yield host


def forbid_forge_models_while_sampling(host, monkeypatch) -> list[str]:
    """From the sampler's first step to its last, Forge's memory manager and VAE raise; returns what was called."""
    called = []
    real_sampler = host.kdiffusion.sample_euler
    engine = host.sd_model
    vae = engine.forge_objects.vae
    forbidden = [(host.memory_management, "load_models_gpu"), (host.memory_management, "load_model_gpu"),
                 (vae, "decode"), (vae, "encode"), (vae.first_stage_model, "decode"),
                 (vae.first_stage_model, "encode"), (engine, "decode_first_stage"), (engine, "encode_first_stage")]

    def forbidden_call(name):
        def call(*args, **kwargs):
            called.append(name)
            raise RuntimeError(f"{name} called during sampling")
        return call

    def sampler(*args, **kwargs):
        with monkeypatch.context() as patch:
            for owner, name in forbidden:
                patch.setattr(owner, name, forbidden_call(name))
            return real_sampler(*args, **kwargs)

    monkeypatch.setattr(host.kdiffusion, "sample_euler", sampler)
    return called


@pytest.mark.parametrize("decoder", ["approx", "vae"])
def test_guided_fusion_never_calls_forges_vae_or_memory_manager_while_sampling(host, monkeypatch, capsys, decoder):
    from lib_dynfuse.hosts.forge import ForgeAdapter

    plain, _ = host.txt2img(fh.PROMPT, steps=3, cfg_scale=5.0)
    called = forbid_forge_models_while_sampling(host, monkeypatch)
    settings = DynFuseSettings(enabled=True, guidance_decoder=decoder, **GUIDED)
    script = fh.AdapterScript(host, ForgeAdapter(), settings)
    guided, _ = host.txt2img(fh.PROMPT, runner=host.scripts.ScriptRunner([script]), steps=3, cfg_scale=5.0,
                             enable_hr=True)
    assert called == []
    assert "failed" not in capsys.readouterr().out and "DynFuse note" not in guided.infotexts[0]
    job = script.job
    assert job.guided is not None and job.guided.decoder_kind == decoder
    assert [step for step, _ in job.guided.losses] == [0, 1, 2] * 2  # first pass, then hires
    assert job.last_log is not None and job.last_log.layers
    assert torch.isfinite(guided.latents[0]).all() and guided.latents[0].shape != plain.latents[0].shape
