"""The batched hook hot path against the straightforward reference in tests/reference_fusion.py: the same
decisions and the same outputs, for linear and conv layers, every low-rank and dense form, fp32/fp16/bf16,
batches of one to three images with and without CFG rows, AND prompts, per-image and per-row deciding, every
rule and measure, the cheaper-decision options, with the divergence in one piece or cut into many chunks."""

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_dynfuse import fusion
from lib_dynfuse.deltas import DenseDelta, LayerGeometry, LowRankDelta
from lib_dynfuse.divergence import MEASURES
from lib_dynfuse.policies import EngineOptions
from lib_dynfuse.session import BatchLayout, FusionSession, LayerTarget, StepClock
from tests.reference_fusion import reference_layer

KINDS = ("linear", "linear-2d", "locon", "tucker", "locon+tucker", "dense", "low-rank+dense")
METHODS = ("kl", "kl-soft", "static", "subject-only", "style-only", "switch")
# Half-precision candidates are rounded differently by the batched products than by the reference's one
# delta at a time, which moves a divergence by up to a few percent of the delta's size.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (3e-2, 4e-3), torch.bfloat16: (6e-2, 3e-2)}


def make_layer(kind, g):
    if kind.startswith("linear"):
        return torch.nn.Linear(12, 10)
    return torch.nn.Conv2d(6, 8, 3, padding=1)


def make_delta(form, layer, g, rank):
    geometry = LayerGeometry.of(layer)
    out_ch, in_ch, *kernel = geometry.weight_shape
    if form == "dense":
        return DenseDelta(torch.randn(geometry.weight_shape, generator=g) * 0.3, strength=0.8, rank=rank)
    if geometry.kind == "linear":
        down, up, mid = torch.randn(rank, in_ch, generator=g), torch.randn(out_ch, rank, generator=g), None
    elif form == "tucker":
        down = torch.randn(rank, in_ch, 1, 1, generator=g)
        mid = torch.randn(rank, rank, *kernel, generator=g) * 0.3
        up = torch.randn(out_ch, rank, 1, 1, generator=g)
    else:
        down, up, mid = torch.randn(rank, in_ch, *kernel, generator=g) * 0.3, torch.randn(out_ch, rank, 1, 1, generator=g), None
    return LowRankDelta(down * 0.5, up * 0.5, mid, alpha=float(rank) / 2, strength=0.9)


def forms(kind):
    return {"locon+tucker": ("locon", "tucker"), "low-rank+dense": ("low-rank", "dense"), "dense": ("dense", "dense"),
            "tucker": ("tucker", "tucker")}.get(kind, ("low-rank", "low-rank"))


def make_input(kind, rows, g):
    shape = {"linear": (rows, 9, 12), "linear-2d": (rows, 12)}.get(kind, (rows, 6, 5, 5))
    return torch.randn(shape, generator=g) * 2


def unit_rows(layout, rows, decide_per):
    """Each unit's deciding row and every row that follows it, as the method defines them."""
    if layout is None or decide_per == "row":
        return [(r, [r]) for r in range(rows)]
    return [(layout.deciding_row[image], [r for r, i in enumerate(layout.image_of_row) if i == image])
            for image in layout.images]


def with_budget(factor):
    """The hot path with its divergence budget scaled: << 1 cuts the divergence into many chunks."""
    original = fusion.divergence_sums

    def scaled(*args, budget_bytes, **kwargs):
        return original(*args, budget_bytes=max(1, int(budget_bytes * factor)), **kwargs)

    return mock.patch.object(fusion, "divergence_sums", scaled)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       images=st.integers(1, 3), cfg=st.booleans(), conds=st.integers(1, 2), decide_per=st.sampled_from(["image", "row"]),
       method=st.sampled_from(METHODS), measure=st.sampled_from(MEASURES), temperature=st.sampled_from([1.0, 0.6]),
       standardize=st.booleans(), max_tokens=st.sampled_from([0, 4]), budget=st.sampled_from([0.02, 1.0, 100.0]),
       ranks=st.tuples(st.integers(1, 4), st.integers(1, 4)), step=st.integers(0, 9), seed=st.integers(0, 10_000))
def test_the_hot_path_decides_and_fuses_as_the_reference(kind, dtype, images, cfg, conds, decide_per, method, measure,
                                                         temperature, standardize, max_tokens, budget, ranks, step, seed):
    g = torch.Generator().manual_seed(seed)
    layer = make_layer(kind, g).to(dtype)
    subject, style = (make_delta(form, layer, g, rank).to(dtype=dtype) for form, rank in zip(forms(kind), ranks))
    layout = BatchLayout.a1111(images, conds, uncond=cfg)
    x = make_input(kind, len(layout), g).to(dtype)
    options = EngineOptions(method=method, measure=measure, temperature=temperature, standardize=standardize,
                            decide_per=decide_per, max_tokens=max_tokens, switch_every=3)
    session = FusionSession([LayerTarget("layer", layer, subject, style)], options)
    with torch.no_grad():
        base = layer(x)
        with session, with_budget(budget):
            session.set_layout(layout)
            session.set_step(StepClock(step, 10))
            fused = layer(x)
    plan = unit_rows(layout, len(layout), decide_per)
    expected, decided = reference_layer(x, base, subject, style, LayerGeometry.of(layer), plan, options, step=step)
    rel, atol = TOLERANCE[dtype]
    logged = {d.unit: d for d in session.log.decisions()}
    compared = []
    for unit, (w, d_s, d_t) in decided.items():
        got = logged[unit]
        if d_s is not None:
            assert got.d_subject == pytest.approx(d_s, rel=rel, abs=1e-6)
            assert got.d_style == pytest.approx(d_t, rel=rel, abs=1e-6)
            if method == "kl" and abs(d_s - d_t) <= rel * max(d_s, d_t) + 1e-6:
                continue  # a near-tie that rounding may decide either way
        assert got.subject_weight == pytest.approx(w, abs=rel)
        compared += plan[unit][1]
    scale = float(expected.abs().max())
    for r in compared:
        torch.testing.assert_close(fused[r].float(), expected[r].float(), rtol=0, atol=atol * scale)


@pytest.mark.parametrize("every", [1, 3])
def test_deciding_every_n_steps_keeps_each_decision_until_the_next(every):
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(12, 10)
    subject, style = make_delta("low-rank", layer, g, 3), make_delta("low-rank", layer, g, 2)
    session = FusionSession([LayerTarget("layer", layer, subject, style)], EngineOptions(decide_every=every))
    inputs = [torch.randn(2, 9, 12, generator=g) for _ in range(7)]
    divergences_per_step = []
    with torch.no_grad(), session:
        session.set_layout(BatchLayout.a1111(1))
        outputs = []
        for step, x in enumerate(inputs):
            session.set_step(StepClock(step, 7))
            outputs.append(layer(x))
    decisions = sorted(session.log.decisions(), key=lambda d: d.step)
    assert [d.step for d in decisions] == list(range(7))  # every step is in the log
    for d in decisions:
        decided_at = d.step - d.step % every
        divergences_per_step.append(d.d_subject)
        assert d.d_subject == decisions[decided_at].d_subject
        assert d.winner == decisions[decided_at].winner
        # the rows follow the kept decision, on this step's input
        with torch.no_grad():
            chosen = subject if d.winner == "subject" else style
            expected = layer(inputs[d.step]) + chosen.output(inputs[d.step], LayerGeometry.of(layer))
        torch.testing.assert_close(outputs[d.step], expected, rtol=1e-5, atol=1e-6)
    assert len(set(divergences_per_step)) == -(-7 // every)
