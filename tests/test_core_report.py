import torch

from lib_dynfuse.engine.decisions import Decision, DecisionLog
from lib_dynfuse.report import EMPTY_RGB, STYLE_RGB, SUBJECT_RGB, cell_colour, selection_map, selection_summary


def make_log():
    log = DecisionLog()
    for step in range(4):
        log.record("a", step, (0, 1), torch.tensor([1.0, 1.0]), torch.tensor([[0.2, 0.3], [0.1, 0.1]]))
        log.record("b", step, (0, 1), torch.tensor([0.0, 1.0 if step < 2 else 0.0]))
    return log


def test_summary_is_the_share_won_by_the_subject():
    log = make_log()
    assert len(log) == 16
    assert log.subject_share() == (8 + 2) / 16
    assert selection_summary(log) == "subject 0.62"
    assert selection_summary(DecisionLog()) == ""


def test_matrix_and_map_colours():
    log = make_log()
    layers, steps, grid = log.matrix()
    assert layers == ["a", "b"] and steps == [0, 1, 2, 3]
    assert grid.tolist() == [[1.0] * 4, [0.5, 0.5, 0.0, 0.0]]
    image = selection_map(log, width=400, min_height=100)
    cell_w, cell_h = 100, 50
    assert image.size == (400, 100 + 18)
    assert image.getpixel((10, 18 + 10)) == SUBJECT_RGB
    assert image.getpixel((3 * cell_w + 10, 18 + cell_h + 10)) == STYLE_RGB
    assert image.getpixel((10, 18 + cell_h + 10)) == cell_colour(0.5)


def test_layers_missing_from_the_log_are_grey():
    image = selection_map(make_log(), ["a", "never"], width=40, min_height=20)
    assert image.getpixel((5, image.size[1] - 2)) == EMPTY_RGB


def test_chunked_records_of_one_step_are_merged():
    log = DecisionLog()
    log.record("a", 0, (0,), torch.tensor([1.0]))
    log.record("a", 0, (1,), torch.tensor([0.0]))
    assert sorted((d.unit, d.winner) for d in log.decisions()) == [(0, "subject"), (1, "style")]


def test_a_first_pass_and_its_hires_pass_are_joined_in_order():
    first, hires = make_log(), DecisionLog()
    for step in range(2):
        hires.record("a", step, (0, 1), torch.tensor([0.0, 0.0]))
    layers, steps, grid = DecisionLog.joined([first, hires]).matrix()
    assert layers == ["a", "b"] and steps == [0, 1, 2, 3, 4, 5]
    assert grid[0].tolist() == [1.0] * 4 + [0.0] * 2
    assert grid[1, 4].isnan() and grid[1, 5].isnan()
    assert selection_summary([first, hires]) == "subject 0.50"  # (8 + 2 + 0) of 20
    image = selection_map([first, hires], width=600, min_height=100)
    cell_w = 100
    assert image.size == (600, 100 + 18)
    assert image.getpixel((4 * cell_w, 18 + 10)) == (20, 20, 20)  # the line where the hires pass starts
    assert image.getpixel((4 * cell_w - 5, 18 + 10)) == SUBJECT_RGB
    assert image.getpixel((4 * cell_w + 5, 18 + 10)) == STYLE_RGB
    assert image.getpixel((5 * cell_w + 5, 18 + 60)) == EMPTY_RGB


def test_hard_decisions_are_read_from_winner_indices_and_divergence_sums():
    log = DecisionLog()
    log.record("a", 0, (3, 5), torch.tensor([0, 1]), torch.tensor([[8.0, 2.0], [4.0, 6.0]]), tokens=4, winners=True)
    log.record("a", 1, (3,), torch.tensor([0.25]), torch.tensor([[1.0], [3.0]]), tokens=2)
    log.record("b", 0, (3, 5), 1.0)
    assert sorted(log.decisions(), key=lambda d: (d.layer, d.step, d.unit)) == [
        Decision("a", 0, 3, 1.0, 2.0, 1.0), Decision("a", 0, 5, 0.0, 0.5, 1.5),
        Decision("a", 1, 3, 0.25, 0.5, 1.5), Decision("b", 0, 3, 1.0, None, None), Decision("b", 0, 5, 1.0, None, None)]
    assert log.subject_share() == (1.0 + 0.0 + 0.25 + 2.0) / 5
