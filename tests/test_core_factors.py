"""The factor checks hosts run on the deltas they parsed (the file reader's use is in test_core_lora_file.py)."""

import pytest
import torch

from lib_dynfuse.engine.deltas import DenseDelta, LowRankDelta
from lib_dynfuse.loras.factors import FactorError, check_deltas, check_factors

LAYER = "diffusion_model_input_blocks_1_0_in_layers_2"


def low_rank(**change):
    g = torch.Generator().manual_seed(0)
    factors = {"down": torch.randn(2, 8, 1, 1, generator=g), "up": torch.randn(8, 2, 1, 1, generator=g),
               "mid": torch.randn(2, 2, 3, 3, generator=g), "alpha": 1.0, **change}
    return LowRankDelta(**factors)


def with_nan(t, index=0):
    t = t.clone()
    t.view(-1)[index] = float("nan")
    return t


def error_of(deltas):
    with pytest.raises(FactorError) as info:
        check_deltas(deltas)
    return info.value


def test_sound_deltas_pass():
    check_deltas([(LAYER, low_rank()), ("dense", DenseDelta(torch.randn(8, 8), torch.randn(8), rank=2)),
                  ("bias", low_rank(bias=torch.randn(8)))])


@pytest.mark.parametrize("delta,message,kind", [
    (low_rank(mid=with_nan(torch.randn(2, 2, 3, 3), 5)), "mid factor holds 1 NaN value (of 36)", "non-finite values"),
    (low_rank(up=torch.full((8, 2, 1, 1), float("-inf"))), "up factor holds 16 infinite values (of 16)",
     "non-finite values"),
    (low_rank(alpha=float("inf")), "alpha is inf", "a damaged alpha"),
    (low_rank(bias=with_nan(torch.randn(8))), "bias update holds 1 NaN value (of 8)", "non-finite values"),
    (DenseDelta(with_nan(torch.randn(8, 8, 3, 3), 7), rank=2), "weight update holds 1 NaN value (of 576)",
     "non-finite values"),
    (low_rank(up=torch.randn(8, 3, 1, 1)),
     "mismatched factors: down factor [2, 8, 1, 1] has rank 2, up factor [8, 3, 1, 1] has rank 3", "mismatched factors"),
    (low_rank(mid=torch.randn(3, 2, 3, 3)),
     "mismatched factors: mid factor has shape [3, 2, 3, 3]; between factors of rank 2 it is [2, 2, kernel height, "
     "kernel width]", "mismatched factors"),
    (low_rank(up=None), "down factor and mid factor without its up factor", "a missing factor"),
])
def test_the_first_damaged_layer_is_named_with_its_tensor(delta, message, kind):
    error = error_of([("fine", low_rank()), (LAYER, delta), ("later", low_rank(alpha=float("nan")))])
    assert str(error) == f"layer {LAYER}: {message}"
    assert (error.layer, error.kind) == (LAYER, kind)


def test_large_finite_half_values_are_finite():
    """A sum of these overflows half precision; the values themselves are finite."""
    check_deltas([(LAYER, LowRankDelta(torch.full((2, 4096), 60000.0).half(), torch.full((8, 2), 60000.0).half()))])


def test_a_layer_without_factors():
    with pytest.raises(FactorError, match=f"^layer {LAYER}: no down and up factors$"):
        check_factors(LAYER, {"down": None, "up": None, "alpha": torch.tensor(1.0)})


@pytest.mark.parametrize("dtype,value,counted", [(torch.float8_e4m3fn, float("nan"), "1 NaN value"),
                                                 (torch.float8_e5m2, float("inf"), "1 infinite value"),
                                                 (torch.float8_e5m2, 2.0, None)])
def test_float8_factors_are_checked_too(dtype, value, counted):
    down = torch.zeros(2, 8)
    down[1, 3] = value
    delta = [(LAYER, LowRankDelta(down.to(dtype), torch.ones(8, 2).to(dtype)))]
    if counted is None:
        check_deltas(delta)
    else:
        assert str(error_of(delta)) == f"layer {LAYER}: down factor holds {counted} (of 16)"
