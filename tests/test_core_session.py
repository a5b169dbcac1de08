import copy

import pytest
import torch
import tolerances as tol
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_dynfuse.engine.deltas import LayerGeometry
from lib_dynfuse.loras.files import deltas_for_model, parse_lora_tensors
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import BatchLayout, FusionSession, LayerTarget, StepClock, remove_leftover_hooks
from tests.lora_files import lora_tensors
from tests.reference_fusion import row_divergence
from tests.tiny_unet import LAYERS, TinyUNet, make_inputs

ATTENTION = [f"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.{a}.{p}"
             for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
ALL_LAYERS = [f"model.diffusion_model.{path}" for path, _, _ in LAYERS]


class Interrupted(Exception):
    """Stands in for the host's InterruptedException raised between sampler steps."""


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def lora_deltas(model, names, seed, strength=1.0, **kwargs):
    lora = parse_lora_tensors(lora_tensors(model, names, seed=seed, **kwargs), path=f"lora{seed}.safetensors")
    return deltas_for_model(lora, model, strength)


def divergences(base, delta, options=EngineOptions()):
    """The reference divergence of every row of ``base + delta`` from ``base`` (linear outputs)."""
    return torch.tensor([row_divergence(base[r], base[r] + delta[r], -1, options) for r in range(base.shape[0])])


def targets_for(model, subject, style):
    modules = dict(model.named_modules())
    return [LayerTarget(n, modules[n], subject.get(n), style.get(n)) for n in sorted(set(subject) | set(style))]


@pytest.fixture
def model():
    return TinyUNet().eval()


def test_fused_output_is_base_plus_the_chosen_delta(model):
    layer = model.layer("input_blocks.1.1.transformer_blocks.0.attn1.to_v")
    name = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v"
    subject = lora_deltas(model, [name], seed=1)[name]
    style = lora_deltas(model, [name], seed=2, scale=0.9)[name]
    x = torch.randn(4, 6, 8)
    base = layer(x)
    geometry = LayerGeometry.of(layer)
    y_s, y_t = subject.output(x, geometry), style.output(x, geometry)
    session = FusionSession([LayerTarget(name, layer, subject, style)], EngineOptions(decide_per="row"))
    with session:
        fused = layer(x)
    d_s, d_t = divergences(base, y_s), divergences(base, y_t)
    expected = torch.where((d_s >= d_t).view(-1, 1, 1), base + y_s, base + y_t)
    torch.testing.assert_close(fused, expected)
    decisions = sorted(session.log.decisions(), key=lambda d: d.unit)
    assert [d.winner for d in decisions] == ["subject" if s >= t else "style" for s, t in zip(d_s, d_t)]
    assert [d.d_subject for d in decisions] == pytest.approx(d_s.tolist(), rel=1e-4)


def test_conv_layers_are_fused_too(model):
    name = "model.diffusion_model.input_blocks.3.0.op"
    layer = model.layer("input_blocks.3.0.op")
    subject, style = lora_deltas(model, [name], 3)[name], lora_deltas(model, [name], 4, mid=True)[name]
    x = torch.randn(2, 8, 8, 8)
    base, geometry = layer(x), LayerGeometry.of(layer)
    with FusionSession([LayerTarget(name, layer, subject, style)], EngineOptions(method="subject-only")):
        torch.testing.assert_close(layer(x), base + subject.output(x, geometry))
    with FusionSession([LayerTarget(name, layer, subject, style)], EngineOptions(method="style-only")):
        torch.testing.assert_close(layer(x), base + style.output(x, geometry))


@pytest.mark.parametrize("method", ["kl", "static", "switch", "style-only"])
def test_layers_touched_by_one_lora_get_it_except_under_the_other_ones_method(model, method):
    subject = lora_deltas(model, ALL_LAYERS[:3], seed=7)
    style = lora_deltas(model, ATTENTION, seed=8)
    session = FusionSession(targets_for(model, subject, style), EngineOptions(method=method))
    name = ALL_LAYERS[0]
    layer = dict(model.named_modules())[name]
    x = torch.randn(1, 4, 8, 8)
    base = layer(x)
    with session:
        expected = base if method == "style-only" else base + subject[name].output(x, LayerGeometry.of(layer))
        torch.testing.assert_close(layer(x), expected)
    assert all(d.layer in ATTENTION for d in session.log.decisions())


def decisions_of_image0(model, subject, style, batch_images, seed):
    torch.manual_seed(seed)
    x, context = make_inputs(batch=1, seed=seed)
    extra_x, extra_c = make_inputs(batch=batch_images - 1, seed=seed + 1) if batch_images > 1 else (x[:0], context[:0])
    uncond_c = torch.zeros_like(context)
    # A1111 order: cond rows of every image, then uncond rows of every image.
    xs = torch.cat([x, extra_x, x, extra_x])
    cs = torch.cat([context, extra_c, uncond_c, torch.zeros_like(extra_c)])
    session = FusionSession(targets_for(model, subject, style), EngineOptions())
    with session:
        session.set_step(StepClock(3, 10, 5.0))
        session.set_layout(BatchLayout.a1111(batch_images))
        out = model(xs, cs)
    return {(d.layer, d.step): d.winner for d in session.log.decisions() if d.unit == 0}, out[0], out[batch_images]


@settings(max_examples=6, deadline=None)
@given(batch_images=st.integers(2, 4), seed=st.integers(0, 100))
def test_an_images_decisions_do_not_depend_on_the_other_images_of_the_batch(batch_images, seed):
    model = TinyUNet().eval()
    subject = lora_deltas(model, ALL_LAYERS, seed=9)
    style = lora_deltas(model, ALL_LAYERS, seed=10, scale=0.7)
    alone, cond_alone, uncond_alone = decisions_of_image0(model, subject, style, 1, seed)
    batched, cond_batched, uncond_batched = decisions_of_image0(model, subject, style, batch_images, seed)
    assert alone == batched
    # outputs differ only by batch-size-dependent float32 GEMM rounding
    tol.assert_sampled_close(cond_alone, cond_batched, model, steps=1)
    tol.assert_sampled_close(uncond_alone, uncond_batched, model, steps=1)


def test_uncond_rows_follow_their_images_cond_row(model):
    name = ATTENTION[4]
    layer = dict(model.named_modules())[name]
    subject, style = lora_deltas(model, [name], 11)[name], lora_deltas(model, [name], 12)[name]
    geometry = LayerGeometry.of(layer)
    x = torch.randn(4, 6, 8)
    base = layer(x)
    y_s, y_t = subject.output(x, geometry), style.output(x, geometry)
    d_s, d_t = divergences(base, y_s), divergences(base, y_t)
    session = FusionSession([LayerTarget(name, layer, subject, style)], EngineOptions())
    session.set_layout(BatchLayout.a1111(2))
    with session:
        fused = layer(x)
    for row, image in enumerate([0, 1, 0, 1]):
        chosen = y_s if d_s[image] >= d_t[image] else y_t
        torch.testing.assert_close(fused[row], base[row] + chosen[row])
    assert len(session.log.decisions()) == 2


@pytest.mark.parametrize("first_is_cond", [True, False])
def test_separate_cond_and_uncond_calls_stay_tied_within_a_step(model, first_is_cond):
    """Forge may run cond and uncond in separate UNet calls (uncond first); the first call of the step decides."""
    name = ATTENTION[0]
    layer = dict(model.named_modules())[name]
    subject, style = lora_deltas(model, [name], 13)[name], lora_deltas(model, [name], 14)[name]
    geometry = LayerGeometry.of(layer)
    x_first, x_second = torch.randn(1, 6, 8), torch.randn(1, 6, 8) * 5
    session = FusionSession([LayerTarget(name, layer, subject, style)], EngineOptions())
    with session:
        session.set_step(StepClock(0, 4))
        session.set_layout(BatchLayout.rows([0], [first_is_cond]))
        layer(x_first)
        first_winner = session.log.decisions()[0].winner
        session.set_layout(BatchLayout.rows([0], [not first_is_cond]))
        base = layer.forward(x_second)
        fused = layer(x_second)
        chosen = subject if first_winner == "subject" else style
        torch.testing.assert_close(fused, base + chosen.output(x_second, geometry))
        assert len(session.log.decisions()) == 1
        session.set_step(StepClock(1, 4))  # a new step decides anew
        layer(x_second)
    assert len(session.log.decisions()) == 2


def test_weights_are_bit_identical_after_a_normal_run(model):
    before = snapshot(model)
    x, context = make_inputs()
    reference = model(x, context)
    subject, style = lora_deltas(model, ALL_LAYERS, 15), lora_deltas(model, ATTENTION, 16)
    with FusionSession(targets_for(model, subject, style), EngineOptions()) as session:
        for step in range(3):
            session.set_step(StepClock(step, 3))
            model(x, context)
    assert_bit_identical(model, before)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x, context), reference)


def test_an_exception_inside_a_hook_falls_back_to_static_and_is_reported_once(model, monkeypatch):
    before = snapshot(model)
    subject, style = lora_deltas(model, ATTENTION, 17), lora_deltas(model, ATTENTION, 18)
    x, context = make_inputs()
    with FusionSession(targets_for(model, subject, style), EngineOptions(method="static")):
        static = model(x, context)
    messages = []
    session = FusionSession(targets_for(model, subject, style), EngineOptions(), log_errors=messages.append)
    broken = session.layers[0]
    monkeypatch.setattr(broken, "fuse", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with session:
        out1 = model(x, context)
        model(x, context)
    assert messages == [(f"DynFuse: layer {broken.name} failed (RuntimeError: boom); it gets both LoRAs at their "
                         "strengths for the rest of this generation.")]
    assert len(session.errors) == 1
    assert not torch.equal(out1, static)  # the other layers still fuse dynamically
    assert_bit_identical(model, before)
    assert all(not m._forward_hooks for m in model.modules())


def test_an_interrupt_between_steps_leaves_nothing_installed(model):
    before = snapshot(model)
    x, context = make_inputs()
    reference = model(x, context)
    subject, style = lora_deltas(model, ATTENTION, 19), lora_deltas(model, ATTENTION, 20)
    with pytest.raises(Interrupted), FusionSession(targets_for(model, subject, style), EngineOptions()) as session:
        for step in range(5):
            session.set_step(StepClock(step, 5))
            model(x, context)
            if step == 2:
                raise Interrupted()
    assert_bit_identical(model, before)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x, context), reference)


def test_install_twice_is_harmless_and_leftovers_of_a_crashed_session_are_removed(model):
    subject, style = lora_deltas(model, ATTENTION, 21), lora_deltas(model, ATTENTION, 22)
    crashed = FusionSession(targets_for(model, subject, style), EngineOptions())
    crashed.install()
    crashed.install()
    assert sum(len(m._forward_hooks) for m in model.modules()) == len(ATTENTION)
    crashed._handles.clear()  # the owner is gone: its handles are lost, its hooks are not
    fresh = FusionSession(targets_for(model, subject, style), EngineOptions())
    fresh.install()
    assert sum(len(m._forward_hooks) for m in model.modules()) == len(ATTENTION)
    fresh.remove()
    fresh.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    crashed.install()
    crashed._handles.clear()
    assert remove_leftover_hooks(model) == len(ATTENTION)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_foreign_hooks_are_left_alone(model):
    layer = model.layer("input_blocks.0.0")
    calls = []
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    assert remove_leftover_hooks(model) == 0
    layer(torch.randn(1, 4, 8, 8))
    assert calls == [1]
    handle.remove()


# Largest error of a forward of the tiny UNet in each dtype, relative to the output's peak: a few roundings
# (eps 1e-3 for fp16, 8e-3 for bf16). A LoRA moves the output by tens of percent of it, so a delta lost or
# misplaced shows.
TOLERANCE = {torch.float32: 3e-6, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def assert_close_in(dtype, out, expected):
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=TOLERANCE[dtype] * float(expected.abs().max()))


def run_session(model, subject, style, x, context, method="kl"):
    session = FusionSession(targets_for(model, subject, style), EngineOptions(method=method))
    with session, torch.no_grad():
        session.set_layout(BatchLayout.a1111(1))
        out = model(x, context)
    return out, {(d.layer, d.unit): d.winner for d in session.log.decisions()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fusion_matches_fp32(model, dtype):
    # The subject is the stronger LoRA in attn1, the style in attn2, so both win somewhere and no decision is a
    # near-tie that rounding could flip.
    subject = {**lora_deltas(model, ATTENTION[:4], 23, scale=0.8), **lora_deltas(model, ATTENTION[4:], 23, scale=0.1)}
    style = {**lora_deltas(model, ATTENTION[:4], 24, scale=0.1), **lora_deltas(model, ATTENTION[4:], 24, scale=0.8)}
    x, context = make_inputs()
    half = copy.deepcopy(model).to(dtype)
    expected, expected_decisions = run_session(model, subject, style, x, context)
    out, decisions = run_session(half, subject, style, x.to(dtype), context.to(dtype))
    assert decisions == expected_decisions
    assert {w for (layer, _), w in decisions.items() if ".attn1." in layer} == {"subject"}
    assert {w for (layer, _), w in decisions.items() if ".attn2." in layer} == {"style"}
    assert_close_in(dtype, out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_static_matches_a_forward_with_both_loras_merged_into_the_weights(model, dtype):
    subject = lora_deltas(model, ALL_LAYERS, seed=5, strength=0.8, alpha=1.0)
    style = lora_deltas(model, ATTENTION, seed=6, strength=0.6, alpha=2.0, rank=3)
    x, context = make_inputs()
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for deltas in (subject, style):
            for name, delta in deltas.items():
                modules[name].weight += delta.dense_weight(LayerGeometry.of(modules[name]))
        expected = merged.to(dtype)(x.to(dtype), context.to(dtype))
    out, _ = run_session(copy.deepcopy(model).to(dtype), subject, style, x.to(dtype), context.to(dtype), "static")
    assert_close_in(dtype, out, expected)


def test_an_inactive_session_passes_the_base_output_through(model):
    subject, style = lora_deltas(model, ATTENTION, 25), lora_deltas(model, ATTENTION, 26)
    x, context = make_inputs()
    reference = model(x, context)
    session = FusionSession(targets_for(model, subject, style), EngineOptions())
    with session:
        session.active = False
        assert torch.equal(model(x, context), reference)


def test_rows_not_matching_the_layout_decide_per_row(model):
    name = ATTENTION[1]
    layer = dict(model.named_modules())[name]
    session = FusionSession([LayerTarget(name, layer, lora_deltas(model, [name], 27)[name],
                                         lora_deltas(model, [name], 28)[name])], EngineOptions())
    session.set_layout(BatchLayout.a1111(2))  # 4 rows expected
    with session:
        layer(torch.randn(5, 6, 8))
    assert sorted(d.unit for d in session.log.decisions()) == [0, 1, 2, 3, 4]
