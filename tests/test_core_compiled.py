"""The compiled divergence (lib_dynfuse.engine.compiled): the same sums as the standard path, compiled once for every
shape a generation sees, and a compiler that fails hands over to the standard path with one console line."""

import pytest
import torch
from torch._dynamo.utils import counters

from lib_dynfuse.engine import compiled
from lib_dynfuse.engine.divergence import divergence_sums
from lib_dynfuse.engine.measure import MeasureOptions
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import BatchLayout, FusionSession, LayerTarget, StepClock
from tests.test_core_hot_path import make_delta


@pytest.fixture
def fresh(monkeypatch):
    compiled.reset()
    torch._dynamo.reset()
    counters.clear()
    yield monkeypatch
    compiled.reset()
    torch._dynamo.reset()


def sums(base, candidates, channel_dim=-1, budget_bytes=None, **options):
    with torch.no_grad():
        return divergence_sums(base, candidates, channel_dim=channel_dim, options=MeasureOptions(**options),
                               budget_bytes=budget_bytes)


def inputs(rows, tokens, channels, seed=0, conv=False):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, channels, tokens // 4, 4) if conv else (rows, tokens, channels)
    base = torch.randn(shape, generator=g) * 2
    return base, base + torch.randn((2, *shape), generator=g) * 0.3


def test_new_steps_and_shapes_reuse_the_compiled_kernels(fresh):
    """One graph for whole rows, one for rows cut into chunks (their strides differ), whatever the sizes: a budget of
    one copy of the rows cuts the larger ones."""
    fresh.setattr(compiled, "BACKEND", "aot_eager")  # the graph capture, without code generation
    shapes = [(2, 64, 8), (3, 300, 8), (2, 16, 40), (4, 1000, 24), (3, 700, 12)]
    graphs = []
    for _ in range(2):
        for rows, tokens, channels in shapes:
            base, candidates = inputs(rows, tokens, channels)
            got, count = sums(base, candidates, budget_bytes=base.numel() * 4, compiled=True)
            torch.testing.assert_close(got, sums(base, candidates)[0])
            assert count == tokens
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 2]


@pytest.mark.parametrize("conv", [False, True])
def test_the_compiled_kernels_give_the_standard_sums(fresh, conv):
    base, candidates = inputs(2, 256, 16, seed=1, conv=conv)
    got, _ = sums(base, candidates, 1 if conv else -1, compiled=True, max_tokens=100)
    expected, _ = sums(base, candidates, 1 if conv else -1, max_tokens=100)
    assert compiled.failure is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_channel_groups_are_compiled_too(fresh):
    """The q, k, v of a fused projection measured as groups give the standard sums through the compiled kernels."""
    fresh.setattr(compiled, "BACKEND", "aot_eager")
    base, candidates = inputs(2, 64, 24, seed=2)
    with torch.no_grad():
        got, _ = divergence_sums(base, candidates, channel_dim=-1, options=MeasureOptions(compiled=True), groups=3)
        expected, _ = divergence_sums(base, candidates, channel_dim=-1, options=MeasureOptions(), groups=3)
    assert compiled.failure is None and got.shape == (2, 2, 3)
    torch.testing.assert_close(got, expected)


def test_a_failing_compiler_is_said_once_and_the_standard_path_takes_over(fresh, capsys):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run

    fresh.setattr(torch, "compile", broken)
    base, candidates = inputs(2, 32, 8)
    for _ in range(3):
        got, _ = sums(base, candidates, compiled=True)
        torch.testing.assert_close(got, sums(base, candidates)[0])
    assert capsys.readouterr().out == ("DynFuse: the compiled divergence is not available (RuntimeError: no C++ "
                                       "compiler found); the standard one is used instead.\n")


def test_a_session_with_the_compiled_divergence_fuses_as_the_standard_one(fresh):
    fresh.setattr(compiled, "BACKEND", "aot_eager")
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(12, 10)
    subject, style = make_delta("low-rank", layer, g, 3), make_delta("low-rank", layer, g, 2)
    x = torch.randn(4, 9, 12, generator=g)
    outputs = []
    for flag in (False, True):
        session = FusionSession([LayerTarget("layer", layer, subject, style)], EngineOptions(compiled=flag))
        with torch.no_grad(), session:
            session.set_layout(BatchLayout.a1111(2))
            session.set_step(StepClock(0, 4))
            outputs.append((layer(x), [d.d_subject for d in session.log.decisions()]))
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    assert outputs[1][1] == pytest.approx(outputs[0][1], rel=1e-5)
