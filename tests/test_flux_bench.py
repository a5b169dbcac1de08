"""The FLUX benchmark (python -m lib_dynfuse.bench --model flux): its FLUX-shaped transformer has FLUX.1's block
layers and fused shapes, its LoRAs patch the fused layers part by part, and its last line is one JSON object with the
operations per hooked call. No timing is checked."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from lib_dynfuse.bench import flux as bench_flux
from lib_dynfuse.bench import main as bench

TABLE = Path(__file__).parent / "data" / "flux-dev-layers.tsv"


def table_rows():
    with open(TABLE, encoding="utf-8") as f:
        return list(csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t"))


def test_the_blocks_have_flux_devs_layers_and_fused_shapes_at_any_width():
    width = 128
    model = bench_flux.build(width, "cpu", torch.float32)
    assert (len(model.double_blocks), len(model.single_blocks)) == (19, 38)
    rows = [row for row in table_rows() if row["kind"] == "linear" and "blocks." in row["module"]]
    for row in rows:
        out, in_features = (int(m[1] or 1) * width for m in (re.fullmatch(r"(\d*)h", d) for d in row["shape"].split(",")))
        assert tuple(model.get_submodule(row["module"]).weight.shape) == (out, in_features), row["module"]
    block_linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     and re.match(r"(double|single)_blocks\.0\.", name)}
    assert block_linears == {row["module"] for row in rows}


def test_the_loras_patch_the_fused_layers_part_by_part():
    model = bench_flux.build(64, "cpu", torch.float32)
    sites = bench_flux.lora_sites(model)
    assert {name: channels for name, (_, channels) in sites.items() if name.startswith("single_blocks.0.")} == {
        "single_blocks.0.linear1:q": (0, 64), "single_blocks.0.linear1:k": (64, 64),
        "single_blocks.0.linear1:v": (128, 64), "single_blocks.0.linear1:mlp": (192, 256),
        "single_blocks.0.linear2": None, "single_blocks.0.modulation.lin": None}
    assert len(sites) == 19 * 14 + 38 * 6
    attention = bench_flux.lora_sites(model, "attention")
    assert {name for name in attention if name.startswith("single_blocks.0.")} == {
        f"single_blocks.0.linear1:{x}" for x in "qkv"}
    assert len(attention) == 19 * 8 + 38 * 3


@pytest.fixture
def one_thread():
    # The model is tiny: one thread is many times faster than several fighting over a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_last_line_is_one_json_object_with_the_operations_per_hooked_call(monkeypatch, capsys, one_thread):
    monkeypatch.setattr(bench_flux, "DOUBLE", 2)
    monkeypatch.setattr(bench_flux, "SINGLE", 2)
    assert bench.main(["--model", "flux", "--width", "64", "--size", "64", "--repeats", "1", "--device", "cpu",
                       "--rank", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert out[0].startswith("flux width 64, 64x64, batch 2, cpu float32, 26 hooked layers (40 LoRA layers)")
    assert (result["model"], result["width"], result["hooked_layers"], result["lora_layers"]) == ("flux", 64, 26, 40)
    ops = result["ops_per_hooked_call"]
    assert set(ops) == set(result["us_per_hooked_call"]) == set(bench.METHODS)
    # A part-wise layer decides its q, k, v (and MLP input) in one or two grouped measures: a little more than a
    # whole layer, less than one per part.
    assert ops["static"] <= 14 and ops["kl"] <= 40
    assert {"ratio", "floor", "extra_mem_mb"} <= set(result)


def test_the_width_must_hold_whole_heads():
    with pytest.raises(ValueError, match="multiple of 64"):
        bench_flux.FluxShaped(100)
