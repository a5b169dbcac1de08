import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_dynfuse.engine.deltas import DenseDelta, LayerGeometry, LowRankDelta
from lib_dynfuse.engine.policies import METHODS, EngineOptions, KLoraPolicy, LayerPair, make_policy, robust_mean

def test_kl_hard_switch_picks_the_larger_divergence_per_unit_ties_to_the_subject():
    policy = make_policy(EngineOptions())
    sums = torch.tensor([[0.3, 0.1, 0.2], [0.2, 0.4, 0.2]])
    assert policy.one_hot and policy.decide(sums, tokens=5).tolist() == [0, 1, 0]  # winner index, 0 = subject


def test_kl_soft_weights_each_lora_by_its_share_of_the_divergences_sharpened_by_the_temperature():
    sums = torch.tensor([[0.03 * 4, 0.002 * 4, 0.0], [0.01 * 4, 0.002 * 4, 0.0]])  # summed over 4 tokens
    at_one = make_policy(EngineOptions(method="kl-soft")).decide(sums, tokens=4)
    assert at_one.tolist() == pytest.approx([0.75, 0.5, 0.5])  # d_s / (d_s + d_t); two zeros share equally
    sharp = make_policy(EngineOptions(method="kl-soft", soft_temperature=0.5))
    assert not sharp.one_hot and sharp.decide(sums, tokens=4).tolist() == pytest.approx([0.9, 0.5, 0.5])


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 100.0])
def test_kl_soft_chooses_whatever_the_divergences_scale(scale):
    """Divergences of different strength (one LoRA moves the layer three times as much): the same clear weights
    at any scale of the divergences (a mean KL per token is often 0.001-0.1), not a half-and-half merge."""
    policy = make_policy(EngineOptions(method="kl-soft"))
    w_s = policy.decide(torch.tensor([[3.0 * scale, 1.0 * scale], [1.0 * scale, 3.0 * scale]]) * 64, tokens=64)
    assert w_s.tolist() == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize("power,expected", [
    (-0.5, [[1.0, 0.5], [0.5, 1.0], [1.0, 1.0]]),  # the louder at 1, the quieter at sqrt(ratio)
    (0.5, [[0.5, 1.0], [1.0, 0.5], [1.0, 1.0]]),  # the quieter at 1, the louder turned down
    (0.0, [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]),  # the static merge
])
def test_kl_even_weighs_each_lora_by_the_ratio_of_the_divergences(power, expected):
    policy = make_policy(EngineOptions(method="kl-even", even_power=power))
    sums = torch.tensor([[0.8, 0.2, 0.3], [0.2, 0.8, 0.3]])
    weights = policy.decide(sums, tokens=7)
    assert policy.two_weights and not policy.one_hot
    torch.testing.assert_close(weights, torch.tensor(expected))  # [units, (subject, style)]
    assert policy.subject_weight(weights).tolist() == pytest.approx([row[0] for row in expected])


def test_kl_even_gives_full_weight_when_a_layer_does_not_move():
    policy = make_policy(EngineOptions(method="kl-even"))
    assert policy.decide(torch.tensor([[0.0], [0.0]]), tokens=3).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("method,expected", [("static", (1, 1)), ("subject-only", (1, 0)), ("style-only", (0, 1))])
def test_constant_rules(method, expected):
    policy = make_policy(EngineOptions(method=method))
    assert not policy.needs_divergence
    assert policy.fixed("l", 0.5, 3) == expected


def test_switch_alternates_every_k_steps_subject_first():
    policy = make_policy(EngineOptions(method="switch", switch_every=3))
    winners = [policy.fixed("l", 0, step)[0] for step in range(9)]
    assert winners == [1, 1, 1, 0, 0, 0, 1, 1, 1]


def test_validation_names_the_bad_fields():
    with pytest.raises(ValueError, match="method='nope'.*temperature=0"):
        make_policy(EngineOptions(method="nope", temperature=0))
    assert set(METHODS) == {"kl", "kl-even", "kl-soft", "k-lora", "switch", "static", "subject-only", "style-only"}


def brute_force_klora(pairs, alpha, beta, progress, schedule):
    """K-LoRA as method.md states it, computed from dense ΔW without any precomputation."""
    ratios = []
    for p in pairs.values():
        ratios.append(float(p.subject.dense_weight(p.geometry).abs().sum() / p.style.dense_weight(p.geometry).abs().sum()))
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    if schedule == "S":
        s = alpha * progress + beta
    else:
        s = (alpha * progress + 0.85 * alpha) % alpha
    out = {}
    for name, p in pairs.items():
        wc = p.subject.dense_weight(p.geometry).abs().flatten()
        ws = p.style.dense_weight(p.geometry).abs().flatten()
        k = p.subject.rank * p.style.rank
        s_c = torch.sort(wc, descending=True).values[:k].sum()
        s_s = torch.sort(ws, descending=True).values[:k].sum()
        out[name] = bool(s_c / gamma >= s_s * s)
    return out


def random_delta(g, geometry, rank, magnitude):
    out_ch, in_ch = geometry.weight_shape[:2]
    kernel = geometry.weight_shape[2:]
    down = torch.randn(rank, in_ch, *kernel, generator=g) * magnitude
    up = torch.randn(out_ch, rank, *(1,) * len(kernel), generator=g)
    return LowRankDelta(down, up, alpha=float(rank))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), schedule=st.sampled_from(["S", "S*"]), alpha=st.floats(0.5, 3), beta=st.floats(0, 1),
       steps=st.integers(2, 12))
def test_klora_switch_matches_brute_force(seed, schedule, alpha, beta, steps):
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i, (kind, shape) in enumerate([("linear", (6, 5)), ("linear", (4, 7)), ("conv2d", (4, 3, 3, 3)), ("linear", (5, 5))]):
        geometry = LayerGeometry(kind, shape)
        subject = random_delta(g, geometry, rank=1 + i % 2, magnitude=1.0 + i)
        style = random_delta(g, geometry, rank=2, magnitude=1.0 + (3 - i) * 0.5)
        pairs[f"layer{i}"] = LayerPair(subject, style, geometry)
    options = EngineOptions(method="k-lora", klora_alpha=alpha, klora_beta=beta, klora_schedule=schedule)
    policy = make_policy(options)
    policy.prepare(pairs)
    for step in range(steps):
        progress = step / steps
        expected = brute_force_klora(pairs, alpha, beta, progress, schedule)
        got = {name: policy.fixed(name, progress, step)[0] == 1.0 for name in pairs}
        assert got == expected


@pytest.mark.parametrize("ratio,total,style_steps", [
    (1.25, 2, []),  # S = 0.5, 1.25: the subject keeps the layer at S(t) == R
    (1.25, 4, [3]),  # S = 0.5, 0.875, 1.25, 1.625
    (0.5, 3, [1, 2]),  # R == β: the subject still wins the first step
    (0.2, 3, [0, 1, 2]),
    (5.0, 3, []),
])
def test_klora_style_steps_are_where_the_schedule_passes_the_ratio(ratio, total, style_steps):
    policy = KLoraPolicy(EngineOptions(method="k-lora"))
    policy.ratio = {"l": ratio}
    assert policy.style_steps("l", total) == style_steps
    engine = [policy.fixed("l", step / total, step)[1] == 1.0 for step in range(total)]
    assert [step for step, style in enumerate(engine) if style] == style_steps


def test_klora_s_star_ignores_beta():
    ratios = {"a": 0.3, "b": 1.0, "c": 1.4}
    steps = []
    for beta in (0.0, 0.5, 1.0):
        policy = KLoraPolicy(EngineOptions(method="k-lora", klora_schedule="S*", klora_beta=beta))
        policy.ratio = ratios
        steps.append({name: policy.style_steps(name, 20) for name in ratios})
    assert steps[0] == steps[1] == steps[2]
    # S* = (1.5·t + 1.275) mod 1.5: above 1 until it wraps at t = 0.15, above 1 again after t = 0.82
    assert steps[0]["b"] == [0, 1, 2, 17, 18, 19]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), rank_c=st.integers(1, 3), rank_s=st.integers(1, 3))
def test_klora_top_k_of_dense_deltas_uses_the_nominal_rank(seed, rank_c, rank_s):
    g = torch.Generator().manual_seed(seed)
    geometry = LayerGeometry("conv2d", (6, 4, 3, 3))
    pairs = {}
    for i in range(3):
        w_c, w_s = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g) * (1 + i)
        pairs[f"layer{i}"] = LayerPair(DenseDelta(w_c, rank=rank_c), DenseDelta(w_s, rank=rank_s), geometry)
    policy = make_policy(EngineOptions(method="k-lora"))
    policy.prepare(pairs)
    ratios = [float(p.subject.weight.abs().sum() / p.style.weight.abs().sum()) for p in pairs.values()]
    gamma = robust_mean(ratios)
    for name, p in pairs.items():
        k = rank_c * rank_s
        s_c = p.subject.weight.abs().flatten().sort(descending=True).values[:k].sum()
        s_s = p.style.weight.abs().flatten().sort(descending=True).values[:k].sum()
        assert policy.ratio[name] == pytest.approx(float(s_c / gamma / s_s), rel=1e-5)


def test_a_dense_delta_without_a_nominal_rank_uses_the_matrix_bound():
    w = torch.randn(6, 4, 3, 3)
    assert DenseDelta(w).rank == 6 and DenseDelta(w, rank=4).rank == 4
    assert DenseDelta(w, rank=4).with_strength(0.5).rank == 4 and DenseDelta(w, rank=4).to(dtype=torch.float16).rank == 4
    with pytest.raises(ValueError, match="rank of at least 1, not 0"):
        DenseDelta(w, rank=0)


def test_robust_mean_drops_outliers():
    assert robust_mean([1.0, 1.0, 1.0, 100.0]) == pytest.approx(1.0)
    assert robust_mean([]) == 1.0
