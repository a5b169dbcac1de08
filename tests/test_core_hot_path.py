"""The batched hook hot path against the straightforward reference in tests/reference_fusion.py: the same
decisions and the same outputs, for linear and conv layers, every low-rank and dense form, fp32/fp16/bf16,
batches of one to three images with and without CFG rows, AND prompts, per-image and per-row deciding, every
rule and measure, the cheaper-decision options, with the divergence in one piece or cut into many chunks; and
for layers made of parts (a fused q, k, v, the q, k, v and MLP input of a FLUX single block, parts of other
lengths with gaps between them), decided and fused part by part as the reference does each slice alone."""

from unittest import mock

import pytest
import torch
import tolerances as tol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_dynfuse.engine import fusion
from lib_dynfuse.engine.deltas import DenseDelta, LayerGeometry, LowRankDelta
from lib_dynfuse.engine.measure import MEASURES
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import BatchLayout, FusionSession, LayerTarget, StepClock
from tests.reference_fusion import reference_layer, reference_parts

KINDS = ("linear", "linear-2d", "locon", "tucker", "locon+tucker", "dense", "low-rank+dense")
METHODS = ("kl", "kl-even", "kl-soft", "static", "subject-only", "style-only", "switch")
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
    """The hot path with its divergence budget ``factor`` copies of the layer output: << 1 cuts the divergence into
    many chunks."""
    original = fusion.divergence_sums

    def scaled(base, candidates, *args, budget_bytes, **kwargs):
        output = candidates[0].numel() * candidates.element_size()
        return original(base, candidates, *args, budget_bytes=max(1, int(output * factor)), **kwargs)

    return mock.patch.object(fusion, "divergence_sums", scaled)


def decides_as(got, reference, rel, method) -> bool:
    """Whether a logged decision is the reference's (weight, d_subject, d_style), asserted; False for a kl near-tie,
    which rounding may decide either way (the rows following it are then not compared)."""
    w, d_s, d_t = reference
    if d_s is not None:
        assert got.d_subject == pytest.approx(d_s, rel=rel, abs=1e-6)
        assert got.d_style == pytest.approx(d_t, rel=rel, abs=1e-6)
        if method == "kl" and abs(d_s - d_t) <= rel * max(d_s, d_t) + 1e-6:
            return False
    assert got.subject_weight == pytest.approx(w, abs=rel)
    return True


def one_call(layer, x, targets, options, layout, step, budget):
    """The session, the layer's output without it and the fused output of one hooked call at ``step``."""
    session = FusionSession(targets, options)
    with torch.no_grad():
        base = layer(x)
        with session, with_budget(budget):
            session.set_layout(layout)
            session.set_step(StepClock(step, 10))
            fused = layer(x)
    return session, base, fused


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
    session, base, fused = one_call(layer, x, [LayerTarget("layer", layer, subject, style)], options, layout, step,
                                    budget)
    plan = unit_rows(layout, len(layout), decide_per)
    expected, decided = reference_layer(x, base, subject, style, LayerGeometry.of(layer), plan, options, step=step)
    rel, atol = TOLERANCE[dtype]
    logged = {d.unit: d for d in session.log.decisions()}
    compared = []
    for unit, reference in decided.items():
        if decides_as(logged[unit], reference, rel, method):
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
        tol.assert_reordered_close(outputs[d.step], expected, terms=layer.in_features, depth=2)
    assert len(set(divergences_per_step)) == -(-7 // every)


# (name, start, length) of every part, for layers of IN input features: a fused q, k, v; FLUX's linear1 (q, k, v and
# the MLP input, four times as long); parts of other lengths with channels between them that no LoRA touches.
IN = 12
PART_LAYOUTS = {
    "qkv": [("q", 0, 8), ("k", 8, 8), ("v", 16, 8)],
    "linear1": [("q", 0, 6), ("k", 6, 6), ("v", 12, 6), ("mlp", 18, 24)],
    "gaps": [("a", 2, 8), ("b", 10, 6), ("c", 19, 6), ("d", 25, 6)],
}
# A part's divergence is a softmax over a few channels, of a single token for 2-D outputs: a bf16 rounding of one
# candidate value moves it more than a whole layer's.
PART_TOLERANCE = {**TOLERANCE, torch.bfloat16: (0.1, 3e-2)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(sorted(PART_LAYOUTS)), touched=st.lists(st.sampled_from(["both", "subject", "style"]),
                                                                      min_size=4, max_size=4),
       forms=st.lists(st.sampled_from(["low-rank", "dense"]), min_size=8, max_size=8),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), images=st.integers(1, 3),
       cfg=st.booleans(), decide_per=st.sampled_from(["image", "row"]), method=st.sampled_from(METHODS),
       measure=st.sampled_from(MEASURES), standardize=st.booleans(), max_tokens=st.sampled_from([0, 4]),
       budget=st.sampled_from([0.02, 1.0]), step=st.integers(0, 9), two_dimensional=st.booleans(),
       seed=st.integers(0, 10_000))
def test_each_part_of_a_layer_decides_and_fuses_on_its_own_channels_as_the_reference(
        layout, touched, forms, dtype, images, cfg, decide_per, method, measure, standardize, max_tokens, budget, step,
        two_dimensional, seed):
    g = torch.Generator().manual_seed(seed)
    specs = PART_LAYOUTS[layout]
    touched = ["both"] + touched[1:]  # at least one part both LoRAs touch
    out = max(start + length for _, start, length in specs) + 1
    layer = torch.nn.Linear(IN, out).to(dtype)
    parts, targets = [], []
    for (name, start, length), who, (subject_form, style_form) in zip(specs, touched, zip(forms[::2], forms[1::2])):
        shape = torch.nn.Linear(IN, length)
        subject = make_delta(subject_form, shape, g, 2).to(dtype=dtype) if who != "style" else None
        style = make_delta(style_form, shape, g, 3).to(dtype=dtype) if who != "subject" else None
        parts.append((f"qkv:{name}", start, length, subject, style))
        targets.append(LayerTarget(f"qkv:{name}", layer, subject, style, (start, length)))
    layout_rows = BatchLayout.a1111(images, uncond=cfg)
    x = (torch.randn((len(layout_rows), IN) if two_dimensional else (len(layout_rows), 7, IN), generator=g) * 2).to(dtype)
    options = EngineOptions(method=method, measure=measure, standardize=standardize, decide_per=decide_per,
                            max_tokens=max_tokens, switch_every=3)
    session, base, fused = one_call(layer, x, targets, options, layout_rows, step, budget)
    plan = unit_rows(layout_rows, len(layout_rows), decide_per)
    expected, decided = reference_parts(x, base, parts, LayerGeometry.of(layer), plan, options, step=step)
    rel, atol = PART_TOLERANCE[dtype]
    logged = {(d.layer, d.unit): d for d in session.log.decisions()}
    assert set(logged) == set(decided)  # a decision per contested part and unit, each part a layer of the log
    compared = []
    for (name, unit), reference in decided.items():
        start, length = next((s, n) for part, s, n, *_ in parts if part == name)
        if decides_as(logged[(name, unit)], reference, rel, method):
            compared += [(r, slice(start, start + length)) for r in plan[unit][1]]
    settled = [slice(start, start + length) for _, start, length, subject, style in parts if subject is None or style is None]
    scale = float(expected.abs().max())
    for r, channels in compared + [(r, c) for r in range(len(layout_rows)) for c in settled]:
        torch.testing.assert_close(fused[r][..., channels].float(), expected[r][..., channels].float(), rtol=0,
                                   atol=atol * scale)
    untouched = torch.ones(out, dtype=torch.bool)
    for _, start, length in specs:
        untouched[start:start + length] = False
    assert torch.equal(fused[..., untouched], base[..., untouched])  # channels of no part keep the base exactly


def qkv_targets(g, layer, ranks=(3, 2)):
    return [LayerTarget(f"qkv:{name}", layer, make_delta("low-rank", torch.nn.Linear(12, 4), g, ranks[0]),
                        make_delta("low-rank", torch.nn.Linear(12, 4), g, ranks[1]), (start, 4))
            for name, start in (("q", 0), ("k", 4), ("v", 8))]


@pytest.mark.parametrize("every", [1, 3])
def test_a_layer_of_parts_keeps_each_parts_decision_until_the_next(every):
    g = torch.Generator().manual_seed(6)
    layer = torch.nn.Linear(12, 12)
    targets = qkv_targets(g, layer)
    session = FusionSession(targets, EngineOptions(decide_every=every))
    inputs = [torch.randn(2, 9, 12, generator=g) for _ in range(7)]
    outputs = []
    with torch.no_grad(), session:
        session.set_layout(BatchLayout.a1111(1))
        for step, x in enumerate(inputs):
            session.set_step(StepClock(step, 7))
            outputs.append(layer(x))
    decisions = {(d.layer, d.step): d for d in session.log.decisions()}
    assert session.log.layers == ["qkv:q", "qkv:k", "qkv:v"]
    assert set(decisions) == {(t.name, step) for t in targets for step in range(7)}
    for (name, step), d in decisions.items():
        decided_at = decisions[(name, step - step % every)]
        assert (d.d_subject, d.winner) == (decided_at.d_subject, decided_at.winner)
        target = next(t for t in targets if t.name == name)
        chosen = target.subject if d.winner == "subject" else target.style
        start, length = target.channels
        with torch.no_grad():
            base = layer(inputs[step])[..., start:start + length]
            expected = base + chosen.output(inputs[step], LayerGeometry("linear", (length, 12)))
        tol.assert_reordered_close(outputs[step][..., start:start + length], expected, terms=12, depth=2)


def test_k_lora_weighs_each_part_by_its_own_ratio():
    """A part's ratio comes from its own deltas, so one part of a layer may go to the subject and another to the
    style at the same step."""
    g = torch.Generator().manual_seed(8)
    layer = torch.nn.Linear(12, 12)
    targets = qkv_targets(g, layer)
    strong = targets[1]
    targets[1] = LayerTarget(strong.name, layer, strong.subject.with_strength(40.0), strong.style, strong.channels)
    session = FusionSession(targets, EngineOptions(method="k-lora"))
    x = torch.randn(2, 9, 12, generator=g)
    with torch.no_grad(), session:
        session.set_layout(BatchLayout.a1111(1))
        session.set_step(StepClock(0, 10))
        fused = layer(x)
    winners = {d.layer: d.winner for d in session.log.decisions()}
    assert winners == {"qkv:q": "style", "qkv:k": "subject", "qkv:v": "style"}
    with torch.no_grad():
        base = layer(x)
    for t in targets:
        start, length = t.channels
        chosen = t.subject if winners[t.name] == "subject" else t.style
        expected = base[..., start:start + length] + chosen.output(x, LayerGeometry("linear", (length, 12)))
        tol.assert_reordered_close(fused[..., start:start + length], expected, terms=12, depth=2)


def test_a_layer_cannot_take_deltas_on_its_whole_output_and_on_parts_of_it():
    g = torch.Generator().manual_seed(9)
    layer = torch.nn.Linear(12, 12)
    whole = make_delta("low-rank", layer, g, 2)
    with pytest.raises(ValueError, match="qkv:q: a layer gets deltas on its whole output and on parts of it"):
        FusionSession([*qkv_targets(g, layer), LayerTarget("qkv", layer, whole, whole)], EngineOptions())
    overlapping = qkv_targets(g, layer)
    overlapping[1] = LayerTarget("qkv:k", layer, overlapping[1].subject, overlapping[1].style, (2, 4))
    with pytest.raises(ValueError, match=r"part qkv:k \[2, 6\) overlaps another"):
        FusionSession(overlapping, EngineOptions())
