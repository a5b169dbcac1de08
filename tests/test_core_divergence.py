import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lib_dynfuse.divergence as divergence
from lib_dynfuse.divergence import row_divergence


def reference_kl(base, delta, temperature=1.0):
    """Per row: mean over tokens of KL(softmax(base) || softmax(base + delta)), channels last."""
    p = F.log_softmax(base.double() / temperature, -1)
    q = F.log_softmax((base + delta).double() / temperature, -1)
    return (p.exp() * (p - q)).sum(-1).flatten(1).mean(1).float()


def test_matches_reference_kl_for_linear_outputs():
    g = torch.Generator().manual_seed(0)
    base, delta = torch.randn(3, 17, 10, generator=g), torch.randn(3, 17, 10, generator=g)
    torch.testing.assert_close(row_divergence(base, delta, channel_dim=-1), reference_kl(base, delta))
    torch.testing.assert_close(row_divergence(base, delta, channel_dim=-1, temperature=2.5),
                               reference_kl(base, delta, 2.5))


def test_conv_outputs_reduce_over_the_channel_axis():
    g = torch.Generator().manual_seed(1)
    base, delta = torch.randn(2, 6, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    as_tokens = lambda t: t.flatten(2).transpose(1, 2)
    torch.testing.assert_close(row_divergence(base, delta, channel_dim=1),
                               reference_kl(as_tokens(base), as_tokens(delta)))


def test_two_dimensional_outputs_have_one_token():
    base, delta = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(row_divergence(base, delta, channel_dim=-1), reference_kl(base[:, None], delta[:, None]))


@pytest.mark.parametrize("measure", divergence.MEASURES)
def test_zero_for_a_zero_delta(measure):
    base = torch.randn(2, 7, 5)
    assert torch.all(row_divergence(base, torch.zeros_like(base), channel_dim=-1, measure=measure).abs() < 1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), measure=st.sampled_from(divergence.MEASURES))
def test_grows_with_the_scale_of_the_delta(seed, measure):
    g = torch.Generator().manual_seed(seed)
    base, delta = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    values = [float(row_divergence(base, s * delta, channel_dim=-1, measure=measure)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert values[0] < values[-1]


def test_chunked_equals_unchunked_and_respects_the_budget(monkeypatch):
    base, delta = torch.randn(2, 8, 9, 9), torch.randn(2, 8, 9, 9)
    whole = row_divergence(base, delta, channel_dim=1, budget_bytes=1 << 30)
    seen = []
    original = divergence._token_measure

    def spy(a, d, *args):
        seen.append(a.numel())
        return original(a, d, *args)

    monkeypatch.setattr(divergence, "_token_measure", spy)
    budget = 3 * 1024
    chunked = row_divergence(base, delta, channel_dim=1, budget_bytes=budget)
    torch.testing.assert_close(chunked, whole)
    assert len(seen) > 2
    assert max(seen) * 4 * divergence._LIVE_TEMPORARIES <= budget


def test_default_budget_is_the_size_of_the_output(monkeypatch):
    base, delta = torch.randn(2, 64, 32).half(), torch.randn(2, 64, 32).half()
    seen = []
    original = divergence._token_measure
    monkeypatch.setattr(divergence, "_token_measure", lambda a, d, *r: seen.append(a.numel()) or original(a, d, *r))
    row_divergence(base, delta, channel_dim=-1)
    output_bytes = base.numel() * base.element_size()
    assert max(seen) * 4 * divergence._LIVE_TEMPORARIES <= output_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_measured_in_fp32(dtype):
    base, delta = torch.randn(2, 5, 16) * 4, torch.randn(2, 5, 16) * 0.05
    result = row_divergence(base.to(dtype), delta.to(dtype), channel_dim=-1)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, reference_kl(base.to(dtype).float(), delta.to(dtype).float()),
                               rtol=1e-3, atol=1e-6)


def test_rows_selects_rows():
    base, delta = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    full = row_divergence(base, delta, channel_dim=-1)
    torch.testing.assert_close(row_divergence(base, delta, channel_dim=-1, rows=[2, 0]), full[[2, 0]])


def test_js_is_symmetric_and_reverse_kl_swaps_the_arguments():
    a, b = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    js_ab = row_divergence(a, b - a, channel_dim=-1, measure="js")
    js_ba = row_divergence(b, a - b, channel_dim=-1, measure="js")
    torch.testing.assert_close(js_ab, js_ba)
    torch.testing.assert_close(row_divergence(a, b - a, channel_dim=-1, measure="kl-reverse"),
                               row_divergence(b, a - b, channel_dim=-1, measure="kl"))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown divergence measure 'x'"):
        row_divergence(torch.zeros(1, 2), torch.zeros(1, 2), channel_dim=-1, measure="x")
    with pytest.raises(ValueError, match="differ in shape"):
        row_divergence(torch.zeros(1, 2), torch.zeros(1, 3), channel_dim=-1)
