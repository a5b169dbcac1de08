import functools
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._decomp import decomposition_table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lib_dynfuse import divergence
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


class AllocationTracker(TorchDispatchMode):
    """The peak, over the block, of the bytes held by tensor storages created inside it and still alive.

    Operators without a CPU kernel of their own (composites such as logsumexp) run through their reference
    decomposition, so the temporaries they make inside are counted too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CPU") and func in decomposition_table:
            with self:
                return decomposition_table[func](*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in inputs or id(storage) in self._alive:
                continue  # a view or an in-place result: nothing new was allocated
            key, nbytes = id(storage), storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._alive[key] = weakref.ref(storage, functools.partial(self._freed, key, nbytes))
        return out

    def _freed(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        self.live -= nbytes
        del self._alive[key]


def peak_extra_bytes(*args, **kwargs) -> int:
    tracker = AllocationTracker()
    with tracker:
        row_divergence(*args, **kwargs)
    return tracker.peak


def test_the_tracker_sees_temporaries_made_inside_composite_operators():
    x = torch.randn(64, 100)
    tracker = AllocationTracker()
    with tracker:
        torch.logsumexp(x, 1)  # its output is 100 floats; inside it subtracts the maxima into a copy of x
    assert tracker.peak >= x.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,channel_dim", [((2, 4096, 320), -1), ((2, 320, 64, 64), 1)])
@pytest.mark.parametrize("measure", divergence.MEASURES)
def test_sd_sized_outputs_allocate_at_most_one_copy_of_the_output(measure, shape, channel_dim, dtype):
    base, delta = torch.randn(shape).to(dtype), (torch.randn(shape) * 0.1).to(dtype)
    assert peak_extra_bytes(base, delta, channel_dim=channel_dim, measure=measure) <= base.numel() * base.element_size()


@settings(max_examples=40, deadline=None)
@given(measure=st.sampled_from(divergence.MEASURES), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       conv=st.booleans(), batch=st.integers(1, 3), tokens=st.integers(8, 300), channels=st.integers(8, 96),
       temperature=st.sampled_from([1.0, 0.5, 3.0]), standardize=st.booleans(), seed=st.integers(0, 1000))
def test_peak_extra_allocation_is_at_most_the_output(measure, dtype, conv, batch, tokens, channels, temperature,
                                                       standardize, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, tokens // 8, 8) if conv else (batch, tokens, channels)
    base, delta = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    peak = peak_extra_bytes(base, delta, channel_dim=1 if conv else -1, measure=measure, temperature=temperature,
                            standardize=standardize)
    assert peak <= base.numel() * base.element_size()


@pytest.mark.parametrize("measure", divergence.MEASURES)
def test_chunked_equals_unchunked_and_respects_the_budget(monkeypatch, measure):
    base, delta = torch.randn(2, 8, 9, 9), torch.randn(2, 8, 9, 9)
    whole = row_divergence(base, delta, channel_dim=1, measure=measure, budget_bytes=1 << 30)
    calls = []
    original = divergence._token_measure
    monkeypatch.setattr(divergence, "_token_measure", lambda *a: calls.append(1) or original(*a))
    budget = 3 * 1024
    chunked = row_divergence(base, delta, channel_dim=1, measure=measure, budget_bytes=budget)
    torch.testing.assert_close(chunked, whole)
    assert len(calls) > 2
    assert peak_extra_bytes(base, delta, channel_dim=1, measure=measure, budget_bytes=budget) <= budget


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
