"""How many tensor operations one hooked layer call dispatches (each a kernel launch on a GPU): a count, not a
timing, so the same on every machine."""

from unittest import mock

import pytest
import torch

from lib_dynfuse.engine import fusion
from lib_dynfuse.engine.deltas import LowRankDelta
from lib_dynfuse.bench.opcount import count_ops
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import BatchLayout, FusionSession, LayerTarget, StepClock

RANK = 16


def low_rank(layer, seed, kernel=()):
    g = torch.Generator().manual_seed(seed)
    out_ch, in_ch = layer.weight.shape[:2]
    up_kernel = (1, 1) if kernel else ()
    return LowRankDelta(torch.randn(RANK, in_ch, *kernel, generator=g) * 0.05,
                        torch.randn(out_ch, RANK, *up_kernel, generator=g) * 0.05, alpha=8.0, strength=0.8)


def ops_per_hooked_call(layer, x, options, layout, budget=None, targets=None):
    """Operations the hook adds to one call of ``layer`` at a step it has not decided yet."""
    kernel = (3, 3) if isinstance(layer, torch.nn.Conv2d) else ()
    targets = targets or [LayerTarget("layer", layer, low_rank(layer, 1, kernel), low_rank(layer, 2, kernel))]
    session = FusionSession(targets, options)
    unbounded = mock.patch.object(fusion, "divergence_sums", _unbounded) if budget == "unbounded" else mock.patch.object(
        fusion, "divergence_sums", fusion.divergence_sums)
    with torch.no_grad(), unbounded:
        plain = count_ops(lambda: layer(x)).total
        with session:
            session.set_layout(layout)
            session.set_step(StepClock(0, 10))
            layer(x)  # the factors are prepared once, at the first call
            session.set_step(StepClock(1, 10))
            hooked = count_ops(lambda: layer(x)).total
    return hooked - plain


def _unbounded(*args, budget_bytes, **kwargs):
    return _divergence_sums(*args, budget_bytes=1 << 40, **kwargs)


_divergence_sums = fusion.divergence_sums
LINEAR = torch.nn.Linear(320, 320)
CONV = torch.nn.Conv2d(320, 320, 3, padding=1)


def linear_input(images):
    return torch.randn(2 * images, 64, 320)


@pytest.mark.parametrize("images", [1, 2, 4])
def test_kl_at_the_default_settings_stays_within_20_operations_on_an_unchunked_layer(images):
    ops = ops_per_hooked_call(LINEAR, linear_input(images), EngineOptions(), BatchLayout.a1111(images), "unbounded")
    assert ops <= 20


@pytest.mark.parametrize("layer,x", [(LINEAR, linear_input(2)), (CONV, torch.randn(4, 320, 8, 8))])
def test_kl_even_adds_its_two_weights_within_30_operations(layer, x):
    # Both deltas at their own weight cost 11 operations more than kl's one winner: over the 20 of kl's budget.
    ops = ops_per_hooked_call(layer, x, EngineOptions(method="kl-even"), BatchLayout.a1111(2), "unbounded")
    assert ops <= 30


def test_the_count_does_not_grow_with_the_batch_or_the_deciding_rows():
    """Consecutive deciding rows are a view, others one index per tensor; when every row decides alone there is
    nothing to select."""
    per_image = {ops_per_hooked_call(LINEAR, torch.randn(len(layout), 64, 320), EngineOptions(), layout, "unbounded")
                 for layout in [BatchLayout.a1111(1), BatchLayout.a1111(4), BatchLayout.a1111(2, 2)]}
    per_row = ops_per_hooked_call(LINEAR, linear_input(2), EngineOptions(decide_per="row"), BatchLayout.a1111(2),
                                  "unbounded")
    assert len(per_image) == 1 and per_row < min(per_image)


@pytest.mark.parametrize("method", ["static", "subject-only", "style-only", "switch", "k-lora"])
@pytest.mark.parametrize("layer,x", [(LINEAR, linear_input(1)), (CONV, torch.randn(2, 320, 8, 8))])
def test_the_fixed_weight_methods_cost_no_more_than_a_functional_lora(method, layer, x):
    assert ops_per_hooked_call(layer, x, EngineOptions(method=method), BatchLayout.a1111(1)) <= 12


def test_a_conv_layer_decides_within_20_operations_unchunked():
    ops = ops_per_hooked_call(CONV, torch.randn(2, 320, 8, 8), EngineOptions(), BatchLayout.a1111(1), "unbounded")
    assert ops <= 20


def test_a_chunked_divergence_adds_a_few_operations_per_chunk():
    """With CFG in fp32 the two divergences need 1.5 copies of the output, so the one-copy budget cuts them in
    two; each further chunk costs its own softmaxes and sums."""
    unchunked = ops_per_hooked_call(LINEAR, linear_input(1), EngineOptions(), BatchLayout.a1111(1), "unbounded")
    chunked = ops_per_hooked_call(LINEAR, linear_input(1), EngineOptions(), BatchLayout.a1111(1))
    assert unchunked < chunked <= unchunked + 12


def test_a_step_that_keeps_its_decisions_measures_nothing():
    decided = ops_per_hooked_call(LINEAR, linear_input(1), EngineOptions(), BatchLayout.a1111(1), "unbounded")
    kept = ops_per_hooked_call(LINEAR, linear_input(1), EngineOptions(decide_every=2), BatchLayout.a1111(1), "unbounded")
    assert kept <= decided - 6


# ---- layers made of parts: FLUX's fused q, k, v projection and its single blocks' linear1 --------------------------
HIDDEN = 64


def sliced(parts, seed=1):
    """A linear layer whose output channels are ``parts`` (name, start, length), each with both LoRAs."""
    layer = torch.nn.Linear(HIDDEN, max(start + length for _, start, length in parts))
    targets = []
    for name, start, length in parts:
        shape = torch.nn.Linear(HIDDEN, length)
        targets.append(LayerTarget(f"layer:{name}", layer, low_rank(shape, seed), low_rank(shape, seed + 1),
                                   (start, length)))
    return layer, targets


QKV = [(name, i * HIDDEN, HIDDEN) for i, name in enumerate("qkv")]
LINEAR1 = [*QKV, ("mlp", 3 * HIDDEN, 4 * HIDDEN)]


def sliced_ops(parts, options, images=1):
    layer, targets = sliced(parts)
    return ops_per_hooked_call(layer, torch.randn(2 * images, 64, HIDDEN), options, BatchLayout.a1111(images),
                               "unbounded", targets)


def test_a_fused_qkv_decides_its_three_parts_within_30_operations_whatever_their_number():
    """Equal neighbouring parts share every product and one grouped divergence: q, k, v cost what six parts do."""
    six = [(str(i), i * HIDDEN, HIDDEN) for i in range(6)]
    assert sliced_ops(QKV, EngineOptions()) == sliced_ops(six, EngineOptions()) <= 30
    assert sliced_ops(QKV, EngineOptions(), images=3) == sliced_ops(QKV, EngineOptions())


def test_each_further_run_of_parts_adds_its_own_products_and_divergence():
    """FLUX's linear1: the q, k, v run and the four times longer MLP input, measured apart."""
    qkv, linear1 = sliced_ops(QKV, EngineOptions()), sliced_ops(LINEAR1, EngineOptions())
    assert qkv < linear1 <= qkv + 28


@pytest.mark.parametrize("method", ["static", "switch", "k-lora"])
def test_the_fixed_weight_methods_on_parts_cost_a_product_per_run(method):
    assert sliced_ops(QKV, EngineOptions(method=method)) <= 14
    assert sliced_ops(LINEAR1, EngineOptions(method=method)) <= 26
