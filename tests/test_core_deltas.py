import pytest
import torch
import tolerances as tol
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lib_dynfuse.engine.deltas import DenseDelta, LayerGeometry, LowRankDelta


class ForgeLikeLinear(nn.Module):
    """Like Forge's operations Linear: not an nn.Linear subclass, same weight layout."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i))


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 6), in_f=st.integers(1, 12), out_f=st.integers(1, 12), tokens=st.integers(1, 9),
       alpha=st.one_of(st.none(), st.floats(0.5, 16)), strength=st.floats(-2, 2))
def test_linear_low_rank_output_equals_dense_delta(rank, in_f, out_f, tokens, alpha, strength):
    g = torch.Generator().manual_seed(rank * 100 + in_f)
    down, up = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
    delta = LowRankDelta(down, up, alpha=alpha, strength=strength)
    geometry = LayerGeometry("linear", (out_f, in_f))
    x = torch.randn(2, tokens, in_f, generator=g)
    expected = x @ (up @ down).T * strength * ((alpha / rank) if alpha is not None else 1.0)
    tol.assert_reordered_close(delta.output(x, geometry), expected, terms=max(in_f, rank), depth=2)
    torch.testing.assert_close(delta.dense_weight(geometry), (up @ down) * delta.scale)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_conv_low_rank_uses_the_layers_geometry(stride, padding, dilation):
    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=padding, dilation=dilation)
    geometry = LayerGeometry.of(conv)
    down, up = torch.randn(3, 6, 3, 3), torch.randn(5, 3, 1, 1)
    delta = LowRankDelta(down, up, alpha=1.5, strength=0.7)
    x = torch.randn(2, 6, 11, 11)
    dense = delta.dense_weight(geometry)
    expected = F.conv2d(x, dense, None, stride, padding, dilation)
    tol.assert_reordered_close(delta.output(x, geometry), expected, terms=6 * 9, depth=2)


def test_tucker_mid_factor_matches_dense_form():
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    geometry = LayerGeometry.of(conv)
    delta = LowRankDelta(torch.randn(2, 4, 1, 1), torch.randn(6, 2, 1, 1), mid=torch.randn(2, 2, 3, 3), alpha=2.0)
    x = torch.randn(1, 4, 9, 9)
    expected = F.conv2d(x, delta.dense_weight(geometry), None, 2, 1)
    tol.assert_reordered_close(delta.output(x, geometry), expected, terms=4 * 9, depth=3)


def test_dense_delta_with_groups_and_bias():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    geometry = LayerGeometry.of(conv)
    w, b = torch.randn(6, 2, 3, 3), torch.randn(6)
    delta = DenseDelta(w, bias=b, strength=0.5)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(delta.output(x, geometry), F.conv2d(x, w * 0.5, b * 0.5, 1, 1, 1, 2))


def test_geometry_is_duck_typed_for_forge_layers():
    geometry = LayerGeometry.of(ForgeLikeLinear(7, 3))
    assert geometry == LayerGeometry("linear", (3, 7))
    with pytest.raises(ValueError, match="shape"):
        LayerGeometry.of(nn.LayerNorm(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    delta = LowRankDelta(torch.randn(2, 8), torch.randn(4, 2), alpha=2.0)
    geometry = LayerGeometry("linear", (4, 8))
    x = torch.randn(3, 8)
    y = delta.to(dtype=dtype).output(x.to(dtype), geometry)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), delta.output(x, geometry), rtol=3e-2, atol=3e-2)


def test_with_strength_rescales():
    delta = LowRankDelta(torch.randn(2, 8), torch.randn(4, 2), alpha=4.0, strength=1.0)
    half = delta.with_strength(0.5)
    assert half.scale == pytest.approx(delta.scale / 2)
    assert half.down is delta.down
