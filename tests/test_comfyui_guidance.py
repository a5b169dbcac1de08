"""The DynFuse guidance node on the fake ComfyUI: built under ComfyUI's inference mode, it still differentiates
through its decoder and scorers at every step (post-CFG), with the approximate decoder and with a private copy of
the checkpoint's VAE."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest_guidance import TINY, guidance_release_models  # noqa: F401 - autouse fixture

HARNESS = Path(__file__).parent / "fakehost/comfyui/comfyui_harness.py"
_spec = importlib.util.spec_from_file_location("comfyui_harness", HARNESS)
ch = sys.modules.get("comfyui_harness") or importlib.util.module_from_spec(_spec)
if "comfyui_harness" not in sys.modules:
    sys.modules["comfyui_harness"] = ch
    _spec.loader.exec_module(ch)


@pytest.fixture
def host(tmp_path, monkeypatch):
    with ch.comfy_host(tmp_path) as host:
        ch.write_test_loras(host)
        from lib_dynfuse.hosts import comfyui

        monkeypatch.setattr(comfyui, "GUIDANCE_FACTORIES", TINY)
        yield host


def references() -> dict:
    g = torch.Generator().manual_seed(4)
    return {"subject_images": torch.rand(2, 32, 32, 3, generator=g),
            "style_image": torch.rand(1, 32, 32, 3, generator=g)}


def guide(host, model, decoder="approx", **inputs):
    settings = {"strength": 0.5, "balance": 0.5, "start": 0.0, "end": 1.0, "every": 1, "decoder": decoder,
                "taesd_dir": "", "clip_weights": "", "dino_weights": "", "device": "cpu", **references(), **inputs}
    return host.run("DynFuseGuidance", model=model, vae=host.vae, **settings)[0]


def guidance_of(model):
    return next(fn.guidance for fn in model.model_options["sampler_post_cfg_function"]
                if fn.__name__ == "dynfuse_guidance")


@pytest.mark.parametrize("decoder", ["approx", "vae"])
def test_guidance_moves_the_image_at_every_step(host, decoder):
    fused, clip = host.pair(method="kl")
    guided = guide(host, fused, decoder=decoder)
    assert guided is not fused and "sampler_post_cfg_function" not in fused.model_options
    plain = host.sample(fused, clip, steps=3)
    moved = host.sample(guided, clip, steps=3)
    assert (moved - plain).abs().max() > 1e-3
    guidance = guidance_of(guided)
    assert [step for step, _ in guidance.losses] == [0, 1, 2] and guidance.active


def test_the_window_leaves_steps_unguided(host):
    guided = guide(host, host.model, start=0.5)
    clip = host.clip
    host.sample(guided, clip, steps=4)
    assert [step for step, _ in guidance_of(guided).losses] == [2, 3]


def test_guidance_refuses_latents_it_cannot_decode_and_needs_a_reference(tmp_path, monkeypatch):
    from lib_dynfuse.hosts.comfyui import DynFuseInputError

    with ch.comfy_host(tmp_path, family="flux") as host:
        with pytest.raises(DynFuseInputError, match="SD1.5, SD2 and SDXL latents only"):
            guide(host, host.model)
    with ch.comfy_host(tmp_path) as host:
        with pytest.raises(DynFuseInputError, match="needs a subject reference image"):
            guide(host, host.model, subject_images=None, style_image=None)
