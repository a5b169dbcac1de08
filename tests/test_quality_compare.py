"""The quality comparison's command line, its options and its JSON; the demo's picture. No test depends on which
method wins."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lib_dynfuse.bench import main as bench
from lib_dynfuse.cli import main as cli_main
from lib_dynfuse.quality import compare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_short_comparison_prints_every_row_with_confidence_intervals(tmp_path, capsys):
    code = bench.main(["--quality", "--seeds", "2", "--steps", "2", "--prompt", "a sks, zwx style",
                       "--static-weights", "0.5,1", "--sweep", "temperature=0.5,2", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["row"]: r for r in summary["rows"]}
    dynamic = ["kl", "kl-even", "kl-soft", "k-lora S", "k-lora S*", "switch"]
    assert set(["subject-only", "style-only", "static"] + dynamic + [f"{m} + guidance" for m in dynamic]) <= set(rows)
    assert {"kl temperature=0.5", "kl temperature=2.0", "static 0.5/0.5", "static 1/0.5"} <= set(rows)
    assert rows["kl temperature=0.5"]["options"] == {"temperature": 0.5}
    assert summary["best_static"]["row"] in rows
    weights = f"{summary['best_static']['subject_strength']:g}/{summary['best_static']['style_strength']:g}"
    assert f"best static {weights} + guidance" in rows
    # the default rule again at the best static's weights, when those are not the tag weights it already ran at
    assert (f"{compare.DEFAULT_METHOD} {weights}" in rows) == (weights != "1/1")
    for row in rows.values():
        assert row["n"] == 2
        for key in ("subject", "style", "prompt", "balance"):
            assert isinstance(row[key], float) and row[f"{key}_ci"] >= 0
    assert rows["kl"]["subject_share"] is not None and rows["static"]["subject_share"] is None
    assert set(summary["sanity"]) == {"subject_only_beats_style_only_on_subject",
                                      "subject_only_loses_to_style_only_on_style"}
    assert "balance_diff_ci" in summary["versus_best_static"]["kl"]
    assert list(summary["pairs"]) == ["heart-zwx"] and summary["tuning_pairs"] == ["heart-zwx"]
    assert summary["held_out"]["pairs"] == [] and summary["pairs"]["heart-zwx"]["rows"] == summary["rows"]
    assert Image.open(tmp_path / "quality_grid.png").size[1] == 32 * 3 * len(rows)
    assert json.loads((tmp_path / "quality.json").read_text())["rows"] == summary["rows"]


def test_any_engine_option_and_guidance_parameter_can_be_swept():
    assert compare.parse_assignment("temperature=0.5,1,2") == ("temperature", [0.5, 1.0, 2.0])
    assert compare.parse_assignment("standardize=true,false") == ("standardize", [True, False])
    assert compare.parse_assignment("switch-every=2") == ("switch_every", [2])
    assert compare.parse_assignment("guidance_strength=0.1") == ("guidance_strength", [0.1])
    rows, _, _ = compare.plan_rows(sweeps=[("decide_per", ["row"]), ("guidance_end", [0.9])], guided=False)
    row = rows[-1]
    assert (row.label, row.guided, row.guidance) == ("kl decide_per=row guidance_end=0.9", True, {"end": 0.9})
    assert row.options().decide_per == "row" and row.params().end == 0.9


@pytest.mark.parametrize("text, message", [("warmth=1", "unknown option 'warmth'"),
                                           ("standardize=maybe", "standardize takes true or false"),
                                           ("temperature", "expected NAME=VALUE")])
def test_a_bad_sweep_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        compare.parse_assignment(text)


def test_the_demo_writes_one_picture(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli_main(["demo", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.width >= 4 * 32 * 4 and image.height > 3 * 32 * 4
    printed = capsys.readouterr().out
    assert "best static merge" in printed and "(of 25)" in printed and f"saved {out}" in printed
    assert f"DynFuse {compare.DEFAULT_METHOD} (default)" in printed and "DynFuse kl" in printed


def test_the_demo_takes_a_pair(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path / "x.png"), "--pair", "nope"]) == 2
    assert "unknown pair 'nope'" in capsys.readouterr().err


def test_the_demo_names_an_unknown_word(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path / "x.png"), "--prompt", "a dog, zwx style"]) == 2
    assert "does not know 'dog'" in capsys.readouterr().err
