"""The registry of LoRA pairs: every pair trains from its seed alone, a pair file of one's own runs through the
comparison, and each pair is compared with the best of 25 merges. No test depends on which method wins."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lib_dynfuse.bench import main as bench
from lib_dynfuse.loras.files import read_lora
from lib_dynfuse.quality import compare, pairs, train, world
from lib_dynfuse.quality.model import ASSETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIR_FILE = '''
from lib_dynfuse.quality.pairs import Layer, LoraRecipe, Style, add_pair, add_shape, add_style, add_subject

add_shape("moon", lambda x, y: (x * x + y * y <= 1) & ((x - 0.45) ** 2 + y * y > 0.7 ** 2))
add_subject("moon", shape="moon")
add_style("ember", Style(Layer("solid", (0.1, 0.05, 0.05), (0.1, 0.05, 0.05)),
                         Layer("dots", (0.95, 0.4, 0.1), (1.0, 0.85, 0.3), 6.0)))
add_pair("moon-ember", "moon", "ember", subject_lora=LoraRecipe(alpha=8, steps=2, seed=11),
         style_lora=LoraRecipe(alpha=4, steps=2, layers="attn", seed=12))
'''


REGISTRIES = ((pairs, "PAIRS"), (pairs, "SUBJECTS"), (pairs, "STYLES"), (world, "SHAPES"), (world, "STYLE_BOOK"))


@pytest.fixture
def registry(monkeypatch):
    """A pair file's registrations stay in the test that made them; calling the fixture's value forgets them (as
    a new process would)."""
    originals = [(module, name, dict(getattr(module, name))) for module, name in REGISTRIES]

    def fresh() -> None:
        for module, name, original in originals:
            monkeypatch.setattr(module, name, dict(original))

    fresh()
    return fresh


def short(pair: pairs.Pair, steps: int = 2) -> pairs.Pair:
    return dataclasses.replace(pair, subject_lora=dataclasses.replace(pair.subject_lora, steps=steps),
                               style_lora=dataclasses.replace(pair.style_lora, steps=steps), bundled=False)


def test_the_bundled_pairs_span_loud_and_quiet_fine_and_coarse_texture_and_colour_and_layer_sets():
    bundled = [p for p in pairs.PAIRS.values() if p.bundled]
    assert len(bundled) >= 4 and set(pairs.TUNING_PAIRS) < {p.name for p in bundled} and len(pairs.TUNING_PAIRS) <= 2
    scale = {p.name: (p.subject_lora.alpha / p.subject_lora.rank, p.style_lora.alpha / p.style_lora.rank)
             for p in bundled}
    assert {(s > t) - (s < t) for s, t in scale.values()} == {-1, 0, 1}
    assert {p.subject for p in bundled} == {"heart", "diamond"} and {p.style for p in bundled} == {"zwx", "striped"}
    assert {p.subject_lora.layers for p in bundled} | {p.style_lora.layers for p in bundled} == {"attn", "attn+ff"}


@pytest.mark.parametrize("name", [n for n, p in pairs.PAIRS.items() if p.bundled])
def test_every_registered_pair_trains_the_same_loras_from_its_seed(name, tmp_path):
    pair = short(pairs.PAIRS[name])
    first = train.ensure_pair_loras(pair, tmp_path / "a", ASSETS, log=lambda line: None)
    second = train.ensure_pair_loras(pair, tmp_path / "b", ASSETS, log=lambda line: None)
    for path_a, path_b, recipe in zip(first, second, (pair.subject_lora, pair.style_lora)):
        a, b = load_file(path_a), load_file(path_b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        lora = read_lora(path_a)
        assert len(lora.layers) == {"attn": 80, "attn+ff": 100}[recipe.layers]
        ups = [v for k, v in a.items() if k.endswith("lora_up.weight")]
        assert ups[0].shape[1] == recipe.rank and any(u.abs().max() > 0 for u in ups)  # it trained


def test_the_original_pairs_recipe_is_the_one_its_bundled_files_were_trained_with():
    pair = pairs.PAIRS[pairs.ORIGINAL]
    subject, style = train.lora_files(pair, ASSETS)
    for path, recipe in ((subject, pair.subject_lora), (style, pair.style_lora)):
        lora = read_lora(path)
        assert {d.rank for d in lora.layers.values()} == {recipe.rank}
        assert {d.alpha for d in lora.layers.values()} == {recipe.alpha}


def test_a_pair_file_trains_what_it_needs_into_the_cache_and_runs_through_the_comparison(tmp_path, capsys,
                                                                                           registry):
    path = tmp_path / "my_pairs.py"
    path.write_text(PAIR_FILE)
    cache = tmp_path / "cache"
    args = ["--quality", "--pair-file", str(path), "--cache", str(cache), "--seeds", "2", "--steps", "2",
            "--prompt", "a sks, zwx style", "--static-weights", "0.5,1", "--methods", "kl", "--no-guidance",
            "--recipe", "identity_steps=2", "--recipe", "style_encoder_steps=2", "--recipe", "scorer_pool=64",
            "--out", str(tmp_path / "out")]
    assert bench.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["pairs"]) == ["moon-ember"] and summary["tuning_pairs"] == []
    assert summary["held_out"]["pairs"] == ["moon-ember"]
    assert summary["held_out"]["default_method"] == compare.DEFAULT_METHOD
    rows = {r["row"]: r for r in summary["pairs"]["moon-ember"]["rows"]}
    assert {"subject-only", "style-only", "static", "static 0.5/0.5", "kl"} <= set(rows)
    assert all(row["n"] == 2 for row in rows.values())
    trained = sorted(p.name for p in cache.rglob("*.safetensors"))
    assert [n for n in trained if n.startswith("scorers-")]  # the bundled scorers know neither moon nor ember
    assert len([n for n in trained if n.startswith(("subject-moon", "style-ember"))]) == 2
    # A second run (in a new process) finds everything in the cache and trains nothing.
    registry()
    assert bench.main(args) == 0
    assert "step 2/2" not in capsys.readouterr().out


def test_an_unknown_pair_is_named(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quality", "--pair", "nope"])
    assert "unknown pair 'nope'" in capsys.readouterr().err


def test_each_pair_is_compared_with_the_best_of_25_merges():
    rows, static, _ = compare.plan_rows(guided=False)
    merges = {(r.subject_strength, r.style_strength) for r in rows + static if r.engine["method"] == "static"}
    assert merges == {(s, t) for s in compare.STATIC_WEIGHTS for t in compare.STATIC_WEIGHTS}
    assert len(merges) == 25 and min(compare.STATIC_WEIGHTS) == 0.25 and max(compare.STATIC_WEIGHTS) == 1.25


def test_the_held_out_mean_is_the_mean_of_the_pairs_means_with_their_pooled_interval():
    default = compare.DEFAULT_METHOD
    differences = {"a": {default: {"balance": torch.tensor([0.1, 0.3]), "prompt": torch.tensor([0.0, 0.0])},
                         "switch": {"balance": torch.tensor([1.0, 1.0])}},
                   "b": {default: {"balance": torch.tensor([-0.2, 0.0, 0.2, 0.4]), "prompt": torch.tensor([1.0] * 4)}},
                   "t": {default: {"balance": torch.tensor([9.0, 9.0])}}}
    held = compare.held_out(differences, ["a", "b"])
    assert held["pairs"] == ["a", "b"] and held["default_method"] == compare.DEFAULT_METHOD
    assert held["default_minus_best_static"]["mean"] == pytest.approx((0.2 + 0.1) / 2)
    variance = (0.02 / 2 + (2 / 3 * 0.1) / 4) / 4  # each pair's sample variance over its n, over 2 pairs squared
    assert held["default_minus_best_static"]["ci"] == pytest.approx(1.96 * math.sqrt(variance), abs=1e-4)
    assert held["prompt_default_minus_best_static"]["mean"] == pytest.approx(0.5)
    assert held["default_minus_best_static_guided"] is None  # no guided rows ran
    assert list(held["by_method"]) == [default]  # switch ran on one held-out pair only
    assert held["by_method"][default]["minus_best_static"] == held["default_minus_best_static"]
