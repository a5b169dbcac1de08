"""Guidance wired into the fake A1111 host's CFG callbacks (random-weight CLIP / DINO stand-ins)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_a1111_generation import PROMPT, write_pair

pytest.importorskip("open_clip")
pytest.importorskip("timm")


@pytest.fixture
def tiny_encoders(a1111):
    from conftest_guidance import CPU, TINY

    from lib_dynfuse.guidance import scorers

    def start(**kwargs):
        ui = a1111(**kwargs)
        from lib_dynfuse.hosts import a1111 as adapter
        from modules import shared

        adapter.A1111Adapter.guidance_factories = dict(TINY)
        shared.opts.set("dynfuse_device", CPU.device)
        shared.opts.set("dynfuse_precision", CPU.precision)
        return ui

    yield start
    scorers.unload()


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_guidance_moves_the_sample_and_plots_its_loss(tiny_encoders, sampler):
    import checks

    refs = {"subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
                "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
    ui = tiny_encoders()
    write_pair(ui)
    common = {"steps": 4, "seed": 5, "sampler_name": sampler}
    p0, _ = ui.txt2img(PROMPT, dynfuse=checks.dynfuse_args(**refs), **common)
    p1, res = ui.txt2img(PROMPT, dynfuse=checks.dynfuse_args(guidance=True, guidance_strength=0.5,
                                                              guidance_start=0.0, guidance_end=1.0,
                                                              show_loss_plot=True, **refs), **common)
    assert not torch.allclose(p0.fake_latents[0], p1.fake_latents[0])
    assert torch.isfinite(p1.fake_latents[0]).all()
    assert len(res.images) == 2  # the image and the loss plot
    from lib_dynfuse.hosts import detect

    assert detect.get_adapter().last_job.guidance.losses


def test_guidance_without_references_leaves_the_sample_alone(tiny_encoders, capsys):
    import checks

    ui = tiny_encoders()
    write_pair(ui)
    p0, _ = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    p1, res = ui.txt2img(PROMPT, steps=3, seed=5,
                         dynfuse=checks.dynfuse_args(guidance=True, guidance_start=0.0, guidance_end=1.0))
    assert torch.allclose(p0.fake_latents[0], p1.fake_latents[0], atol=1e-5)
    assert "DynFuse method: kl" in res.infotexts[0]
