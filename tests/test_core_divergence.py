import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lib_dynfuse.bench.memory import AllocationTracker
from lib_dynfuse.engine import divergence
from lib_dynfuse.engine.divergence import divergences
from lib_dynfuse.engine.measure import MEASURES, MeasureOptions
from lib_dynfuse.engine.policies import EngineOptions
from tests.reference_fusion import row_divergence


def measured(base, delta, channel_dim=-1, **options):
    """The divergence of ``base + delta`` from ``base`` per row, through the batched measure (one candidate)."""
    return divergences(base, (base + delta)[None], channel_dim=channel_dim, options=MeasureOptions(**options))[0]


def reference(base, delta, channel_dim=-1, **options):
    return torch.tensor([row_divergence(base[r], base[r] + delta[r], channel_dim, EngineOptions(**options))
                         for r in range(base.shape[0])], dtype=torch.float32)


def test_matches_the_reference_for_linear_outputs():
    g = torch.Generator().manual_seed(0)
    base, delta = torch.randn(3, 17, 10, generator=g), torch.randn(3, 17, 10, generator=g)
    torch.testing.assert_close(measured(base, delta), reference(base, delta))
    torch.testing.assert_close(measured(base, delta, temperature=2.5), reference(base, delta, temperature=2.5))


def test_conv_outputs_reduce_over_the_channel_axis():
    g = torch.Generator().manual_seed(1)
    base, delta = torch.randn(2, 6, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    torch.testing.assert_close(measured(base, delta, 1), reference(base, delta, 1))


def test_two_dimensional_outputs_have_one_token():
    base, delta = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(measured(base, delta), reference(base, delta))


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("standardize", [False, True])
def test_every_measure_matches_the_reference(measure, standardize):
    g = torch.Generator().manual_seed(2)
    base, delta = torch.randn(2, 9, 12, generator=g) * 3, torch.randn(2, 9, 12, generator=g)
    got = measured(base, delta, measure=measure, temperature=0.7, standardize=standardize)
    torch.testing.assert_close(got, reference(base, delta, measure=measure, temperature=0.7, standardize=standardize))


def test_both_candidates_are_measured_as_each_alone():
    g = torch.Generator().manual_seed(3)
    base, d1, d2 = (torch.randn(3, 5, 8, generator=g) for _ in range(3))
    both = divergences(base, torch.stack([base + d1, base + d2]), channel_dim=-1)
    torch.testing.assert_close(both, torch.stack([measured(base, d1), measured(base, d2)]))


@pytest.mark.parametrize("conv", [False, True])
def test_max_tokens_measures_a_fixed_stride_subsample(conv):
    g = torch.Generator().manual_seed(4)
    shape = (2, 6, 5, 7) if conv else (2, 35, 6)
    base, delta = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    got = measured(base, delta, 1 if conv else -1, max_tokens=8)  # 35 tokens: every 5th, 7 of them
    torch.testing.assert_close(got, reference(base, delta, 1 if conv else -1, max_tokens=8))
    assert not torch.allclose(got, measured(base, delta, 1 if conv else -1))


@pytest.mark.parametrize("measure", MEASURES)
def test_zero_for_a_zero_delta(measure):
    base = torch.randn(2, 7, 5)
    assert torch.all(measured(base, torch.zeros_like(base), measure=measure).abs() < 1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), measure=st.sampled_from(MEASURES))
def test_grows_with_the_scale_of_the_delta(seed, measure):
    g = torch.Generator().manual_seed(seed)
    base, delta = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    values = [float(measured(base, s * delta, measure=measure)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert values[0] < values[-1]


def peak_extra_bytes(base, candidates, **kwargs) -> int:
    tracker = AllocationTracker()
    with tracker:
        divergence.divergence_sums(base, candidates, **kwargs)
    return tracker.peak


def test_the_tracker_sees_temporaries_made_inside_composite_operators():
    x = torch.randn(64, 100)
    tracker = AllocationTracker()
    with tracker:
        torch.logsumexp(x, 1)  # its output is 100 floats; inside it subtracts the maxima into a copy of x
    assert tracker.peak >= x.numel() * 4


def hook_inputs(shape, dtype, deciding_rows, g=None):
    """A layer output of ``shape`` and the two candidates of its first ``deciding_rows`` rows, as a hook sees
    them: the budget is one copy of the whole output, whatever part of it decides."""
    base = torch.randn(shape, generator=g).to(dtype)
    deltas = (torch.randn((2, *shape), generator=g) * 0.1).to(dtype)
    return base, (base + deltas)[:, :deciding_rows], base.numel() * base.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,channel_dim", [((2, 4096, 320), -1), ((2, 320, 64, 64), 1)])
@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("deciding_rows", [1, 2])  # the cond row of one image with CFG; every row
def test_sd_sized_outputs_allocate_at_most_one_copy_of_the_output(measure, shape, channel_dim, dtype, deciding_rows):
    base, candidates, budget = hook_inputs(shape, dtype, deciding_rows)
    peak = peak_extra_bytes(base[:deciding_rows], candidates, channel_dim=channel_dim,
                            options=MeasureOptions(measure), budget_bytes=budget)
    assert peak <= budget


@settings(max_examples=40, deadline=None)
@given(measure=st.sampled_from(MEASURES), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       conv=st.booleans(), batch=st.integers(1, 4), tokens=st.integers(8, 300), channels=st.integers(8, 96),
       temperature=st.sampled_from([1.0, 0.5, 3.0]), standardize=st.booleans(), max_tokens=st.sampled_from([0, 5, 64]),
       seed=st.integers(0, 1000), data=st.data())
def test_peak_extra_allocation_is_at_most_the_output(measure, dtype, conv, batch, tokens, channels, temperature,
                                                       standardize, max_tokens, seed, data):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, tokens // 8, 8) if conv else (batch, tokens, channels)
    rows = data.draw(st.integers(1, batch))
    base, candidates, budget = hook_inputs(shape, dtype, rows, g)
    # The budget is exceeded only when one token alone does not fit: leave out outputs of a few tokens.
    assume(budget >= 2 * 4 * rows * (8 * channels + 16))
    options = MeasureOptions(measure, temperature, standardize, max_tokens)
    peak = peak_extra_bytes(base[:rows], candidates, channel_dim=1 if conv else -1, options=options, budget_bytes=budget)
    assert peak <= budget


@pytest.mark.parametrize("measure", MEASURES)
def test_chunked_equals_unchunked_and_respects_the_budget(monkeypatch, measure):
    base, candidates = torch.randn(2, 8, 9, 9), torch.randn(2, 2, 8, 9, 9)
    options = MeasureOptions(measure)
    whole = divergences(base, candidates, channel_dim=1, options=options, budget_bytes=1 << 30)
    calls = []
    original = divergence.measure_tokens
    monkeypatch.setattr(divergence, "measure_tokens", lambda *a: calls.append(1) or original(*a))
    budget = 3 * 1024
    chunked = divergences(base, candidates, channel_dim=1, options=options, budget_bytes=budget)
    torch.testing.assert_close(chunked, whole)
    assert len(calls) > 2
    assert peak_extra_bytes(base, candidates, channel_dim=1, options=options, budget_bytes=budget) <= budget


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_are_measured_in_fp32(dtype):
    base, delta = (torch.randn(2, 5, 16) * 4).to(dtype), (torch.randn(2, 5, 16) * 0.05).to(dtype)
    result = measured(base, delta)
    assert result.dtype == torch.float32
    # the candidate is what the layer outputs: base + delta rounded to the layer's dtype
    torch.testing.assert_close(result, reference(base.float(), (base + delta).float() - base.float()),
                               rtol=1e-4, atol=1e-7)


def test_js_is_symmetric_and_reverse_kl_swaps_the_arguments():
    a, b = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    torch.testing.assert_close(measured(a, b - a, measure="js"), measured(b, a - b, measure="js"))
    torch.testing.assert_close(measured(a, b - a, measure="kl-reverse"), measured(b, a - b, measure="kl"))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown divergence measure 'x'"):
        MeasureOptions("x")
    with pytest.raises(ValueError, match="differ in shape"):
        divergences(torch.zeros(1, 2), torch.zeros(2, 1, 3), channel_dim=-1)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("shape", [(3, 7, 12), (3, 12)])
def test_channel_groups_are_each_measured_as_a_distribution_of_their_own(measure, shape):
    """The q, k and v of a fused projection: each group's divergence is that of its channels alone."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=g) * 2
    candidates = base + torch.randn((2, *shape), generator=g)
    options = MeasureOptions(measure, temperature=0.8, standardize=True, max_tokens=5)
    grouped, tokens = divergence.divergence_sums(base, candidates, channel_dim=-1, options=options, groups=3)
    assert grouped.shape == (2, 3, 3)
    for group in range(3):
        channels = slice(4 * group, 4 * group + 4)
        alone, alone_tokens = divergence.divergence_sums(base[..., channels], candidates[..., channels],
                                                         channel_dim=-1, options=options)
        assert alone_tokens == tokens
        torch.testing.assert_close(grouped[..., group], alone)


def test_grouped_chunks_add_up_to_the_whole_and_respect_the_budget():
    base, candidates = torch.randn(2, 40, 24), torch.randn(2, 2, 40, 24)
    options = MeasureOptions("kl")
    whole, _ = divergence.divergence_sums(base, candidates, channel_dim=-1, options=options, groups=4,
                                          budget_bytes=1 << 30)
    budget = 4 * 1024
    chunked, _ = divergence.divergence_sums(base, candidates, channel_dim=-1, options=options, groups=4,
                                            budget_bytes=budget)
    torch.testing.assert_close(chunked, whole)
    assert peak_extra_bytes(base, candidates, channel_dim=-1, options=options, budget_bytes=budget, groups=4) <= budget


def test_groups_need_linear_channels_they_divide():
    with pytest.raises(ValueError, match="3 channel groups"):
        divergence.divergence_sums(torch.zeros(1, 2, 5), torch.zeros(2, 1, 2, 5), channel_dim=-1,
                                   options=MeasureOptions(), groups=3)
    with pytest.raises(ValueError, match="2 channel groups"):
        divergence.divergence_sums(torch.zeros(1, 4, 3, 3), torch.zeros(2, 1, 4, 3, 3), channel_dim=1,
                                   options=MeasureOptions(), groups=2)
