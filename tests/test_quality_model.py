"""The bundled world model: its LoRA files load through the hosts' code path (read_lora → LowRankDelta →
FusionSession hooks), fuse, and are scored by encoders that tell the references apart."""

from __future__ import annotations

import pytest
import torch

from lib_dynfuse.bench.main import merged
from lib_dynfuse.engine.deltas import LowRankDelta
from lib_dynfuse.guidance import GuidanceParams
from lib_dynfuse.loras.files import deltas_for_model, read_lora
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.quality import world
from lib_dynfuse.quality.diffusion import to_model_space
from lib_dynfuse.quality.lora import LORA_TARGETS
from lib_dynfuse.quality.model import World
from lib_dynfuse.quality.scorers import Judge

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> World:
    return World.load()


def test_the_loras_are_kohya_files_on_every_attention_and_feed_forward_layer(model):
    subject, style = read_lora(model.subject_lora), read_lora(model.style_lora)
    transformer_linears = [name for name, _ in model.unet.named_modules()
                           if ".transformer_blocks." in name and name.endswith(LORA_TARGETS)]
    assert len(transformer_linears) == 100
    assert "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in subject.layers
    assert "up_blocks_2_attentions_1_transformer_blocks_0_ff_net_2" in style.layers
    for lora, rank, alpha in ((subject, 8, 4.0), (style, 8, 8.0)):
        deltas = deltas_for_model(lora, model.unet)
        assert sorted(deltas) == sorted(transformer_linears)  # both LoRAs touch the same 100 layers
        assert all(isinstance(d, LowRankDelta) and d.rank == rank and d.alpha == alpha for d in deltas.values())


def test_static_fusion_gives_the_image_of_the_loras_merged_into_the_weights(model):
    prompts, seeds = ["a sks, zwx style"], [3]
    fused = model.generate(prompts, seeds, steps=4, session=model.fusion(EngineOptions(method="static"), 0.8, 0.6))
    layers = dict(model.unet.named_modules())
    subject = deltas_for_model(read_lora(model.subject_lora), model.unet, 0.8)
    style = deltas_for_model(read_lora(model.style_lora), model.unet, 0.6)
    with merged({name: (layers[name], None) for name in subject}, subject, style):  # whole layers, no parts
        merge = model.generate(prompts, seeds, steps=4)
    plain = model.generate(prompts, seeds, steps=4)
    assert torch.allclose(fused, merge, atol=2e-4)
    assert (fused - plain).abs().max() > 0.05  # the LoRAs did something
    assert not any(m._forward_hooks for m in model.unet.modules())  # the session removed its hooks


def test_kl_decides_every_shared_layer_at_every_step_for_every_image(model):
    session = model.fusion(EngineOptions(method="kl"))
    images = model.generate(["a sks, zwx style"] * 2, [0, 1], steps=3, session=session)
    layers, steps, grid = session.log.matrix()
    assert images.shape == (2, 3, 32, 32)
    assert len(layers) == 100 and steps == [0, 1, 2]
    assert len(session.log) == 100 * 3 * 2
    assert not torch.isnan(grid).any()


def test_both_scorer_sets_tell_the_subject_references_from_the_style_references(model):
    subject_refs, style_refs = model.references()
    for name, encoders in model.scorers.items():
        judge = Judge(encoders, subject_refs, style_refs)
        on_subject = judge.scores(subject_refs, ["a sks, plain style"] * len(subject_refs))
        on_style = judge.scores(style_refs, ["a circle, zwx style"] * len(style_refs))
        assert on_subject["subject"].min() > on_style["subject"].max(), name
        assert on_style["style"].min() > on_subject["style"].max(), name


def test_prompt_fidelity_reads_the_prompts_object_and_size(model):
    judge = model.judge()
    big_sks = world.render([world.Scene(world.SUBJECT, "zwx", "big", 5)])
    assert judge.scores(big_sks, ["a big sks, zwx style"])["prompt"] > 0.8
    assert judge.scores(big_sks, ["a small ring, zwx style"])["prompt"] < 0.2


def test_world_guidance_runs_the_real_correction_and_lowers_its_loss(model):
    guidance = model.guidance(GuidanceParams(strength=0.5, balance=0.5, start=0.0, end=1.0))
    x0 = to_model_space(world.render([world.Scene("circle", "plain", "big", 9)]))
    x0_uncond = x0 * 0.5
    before = guidance.loss(x0)
    corrected = guidance.correct(x0, x0_uncond, progress=0.5, step=5)
    assert corrected is not x0 and corrected.shape == x0.shape
    assert guidance.loss(corrected) < before
    assert guidance.losses and guidance.losses[0][0] == 5
