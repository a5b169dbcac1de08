"""One sampler step whose UNet rows arrive in several calls (A1111 without batch_cond_uncond, or with a prompt
longer than the negative prompt): the chunks map onto the step's layout in order."""

from itertools import pairwise

import pytest
import torch
import tolerances as tol

from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import BatchLayout, FusionSession, StepClock
from tests.test_core_session import ALL_LAYERS, lora_deltas, targets_for
from tests.tiny_unet import TinyUNet, make_inputs


@pytest.fixture
def model():
    return TinyUNet().eval()


def _step_rows(conds_per_image, seed=3):
    """x and context of one A1111 CFG step of two images: every image's cond rows, then one uncond row each."""
    x, context = make_inputs(batch=2, seed=seed)
    uncond = torch.randn_like(context)
    xs = torch.cat([x[i:i + 1] for i in range(2) for _ in range(conds_per_image)] + [x])
    cs = torch.cat([context[i:i + 1] * (1 + k) for i in range(2) for k in range(conds_per_image)] + [uncond])
    return xs, cs


def _run(model, xs, cs, layout, chunks, options=None):
    """Two steps, each split into UNet calls of the given row counts; the fused rows and the session's log."""
    subject = lora_deltas(model, ALL_LAYERS, seed=9)
    style = lora_deltas(model, ALL_LAYERS, seed=10, scale=0.7)
    session = FusionSession(targets_for(model, subject, style), options or EngineOptions())
    outputs = []
    with session:
        for step in range(2):
            session.set_step(StepClock(step, 2))
            session.set_layout(layout)
            bounds = torch.tensor([0, *chunks]).cumsum(0).tolist()
            outputs.append(torch.cat([model(xs[a:b], cs[a:b]) for a, b in pairwise(bounds)]))
    decisions = {(d.layer, d.step, d.unit): (d.winner, d.d_subject) for d in session.log.decisions()}
    return outputs, decisions


@pytest.mark.parametrize(("conds_per_image", "chunks"), [
    (1, [2, 2]),  # batch_cond_uncond off: cond rows, then uncond rows
    (2, [2, 2, 2]),  # AND prompts, batch_cond_uncond off: chunks of batch size cut across the images' cond rows
    (2, [4, 2]),  # a prompt longer than the negative prompt: all cond rows, then the uncond rows
])
def test_chunks_of_one_step_decide_per_image_as_the_joined_call(model, conds_per_image, chunks):
    xs, cs = _step_rows(conds_per_image)
    layout = BatchLayout.a1111(2, conds_per_image)
    joined, joined_log = _run(model, xs, cs, layout, [len(layout)])
    split, split_log = _run(model, xs, cs, layout, chunks)
    assert {unit for *_, unit in split_log} == {0, 1}
    assert split_log.keys() == joined_log.keys()
    for key, (winner, d_subject) in joined_log.items():
        assert split_log[key][0] == winner
        assert split_log[key][1] == pytest.approx(d_subject, rel=1e-4, abs=1e-6)  # the cond row decided
    for a, b in zip(split, joined):
        # rows follow their image's decision; the outputs differ only by batch-size-dependent fp32 GEMM rounding
        tol.assert_sampled_close(a, b, model, steps=1)


def test_chunks_deciding_per_row_keep_every_rows_decision(model):
    xs, cs = _step_rows(1)
    layout = BatchLayout.a1111(2)
    options = EngineOptions(decide_per="row")
    joined, joined_log = _run(model, xs, cs, layout, [4], options)
    split, split_log = _run(model, xs, cs, layout, [2, 2], options)
    assert {unit for *_, unit in split_log} == {0, 1, 2, 3}
    assert {key: winner for key, (winner, _) in split_log.items()} == \
        {key: winner for key, (winner, _) in joined_log.items()}
    for a, b in zip(split, joined):
        tol.assert_sampled_close(a, b, model, steps=1)


def test_an_extra_call_after_the_step_follows_the_steps_decisions(model):
    """Another extension's extra UNet call after the step's calls (e.g. a guidance pass on the uncond rows) is
    read from the layout's first rows: its images keep this step's decisions and the log is not touched."""
    xs, cs = _step_rows(1)
    layout = BatchLayout.a1111(2)
    subject = lora_deltas(model, ALL_LAYERS, seed=9)
    style = lora_deltas(model, ALL_LAYERS, seed=10, scale=0.7)
    session = FusionSession(targets_for(model, subject, style), EngineOptions())
    with session:
        session.set_step(StepClock(0, 2))
        session.set_layout(layout)
        model(xs, cs)
        logged = {(d.layer, d.unit): d.winner for d in session.log.decisions()}
        model(xs[2:] * 3, cs[2:])
        assert {(d.layer, d.unit): d.winner for d in session.log.decisions()} == logged
        assert len(session.log) == len(logged)


def test_a_batch_of_equal_chunks_in_the_hosts_order():
    """ComfyUI's and the Forge family's batches: one chunk per cond_or_uncond entry (uncond first there), row i of
    each chunk is image i; rows that do not split into the chunks give no layout."""
    layout = BatchLayout.chunks([1, 0], 4)
    assert layout.image_of_row == (0, 1, 0, 1) and layout.is_cond == (False, False, True, True)
    assert layout.deciding_row == {0: 2, 1: 3}
    assert BatchLayout.chunks([0], 3).is_cond == (True, True, True)
    assert BatchLayout.chunks([1, 0], 3) is None and BatchLayout.chunks([], 2) is None
