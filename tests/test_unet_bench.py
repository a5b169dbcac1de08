"""Smoke test of the fusion benchmark (python -m lib_dynfuse.bench) on a tiny diffusers UNet: the layers it hooks,
the keys of its last JSON line, and its operation counts. No timing is checked."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lib_dynfuse.bench import main as bench
from lib_dynfuse.bench import unets
from lib_dynfuse.engine.policies import DIVERGENCE_METHODS, EngineOptions

pytest.importorskip("diffusers")

TINY = dict(unets._COMMON, sample_size=8, block_out_channels=(32, 64), cross_attention_dim=16, attention_head_dim=8,
            layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


# SDXL's block types, linear projections, several transformer layers per block and pooled-text embedding, small.
TINY_XL = dict(unets.CONFIGS["sdxl"], block_out_channels=(32, 64, 64), cross_attention_dim=16,
               attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), layers_per_block=1,
               norm_num_groups=8, addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)

SD15_TABLE = Path(__file__).parent / "data" / "sd15-unet-layers.tsv"


def test_all_layers_are_those_a_kohya_locon_lora_touches_in_the_sd15_table():
    unet = bench.build_unet("sd15")
    keys = {"lora_unet_" + name.replace(".", "_") for name in bench.lora_layers(unet, "all")}
    with SD15_TABLE.open() as f:
        table = {row["kohya_key"] for row in csv.DictReader(f, delimiter="\t")}
    # kohya's LoCon targets leave out the time embedding and the first and last convolutions
    assert table - keys == {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2",
                            "lora_unet_conv_in", "lora_unet_conv_out"}
    assert keys <= table
    attention = bench.lora_layers(unet, "attention")
    assert len(attention) == 128 and set(attention) < set(bench.lora_layers(unet, "all"))


def test_the_last_line_is_one_json_object_with_the_costs_per_hooked_call(monkeypatch, capsys):
    monkeypatch.setitem(unets.CONFIGS, "tiny", TINY)
    assert bench.main(["--model", "tiny", "--size", "64", "--repeats", "1", "--device", "cpu", "--rank", "4",
                       "--engine", "max_tokens=8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ratio", "floor", "extra_mem_mb", "ops_per_hooked_call", "us_per_hooked_call", "layers"} <= set(result)
    assert result["layers"] == "all" and result["engine"] == {"max_tokens": 8}
    ops = result["ops_per_hooked_call"]
    assert set(ops) == set(result["us_per_hooked_call"]) == {"kl", "kl-even", "kl-soft", "k-lora", "switch",
                                                               "static", "subject-only", "style-only"}
    assert ops["static"] <= 12 and ops["kl"] <= 30


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("config", ["sd15", "sdxl"])
def test_every_locon_layer_stays_within_the_operation_budgets_in_every_dtype(monkeypatch, config, dtype):
    """Every layer a kohya LoCon LoRA touches in a small SD1.5- or SDXL-shaped UNet (the same kinds of layers and
    inputs as the real ones), one image with CFG: kl at most 20 operations per call, kl-soft 24, and the methods with
    fixed weights 5 on average (one more on SDXL's proj_in, whose input arrives strided and is copied for the down
    product, as the layer's own product copies it)."""
    monkeypatch.setitem(unets.CONFIGS, "tiny", TINY if config == "sd15" else TINY_XL)
    model = bench.build_model("tiny", 64, "all", "cpu", bench.DTYPES[dtype], 0)
    subject, style = (bench.random_loras(model.sites, 4, seed, "cpu", bench.DTYPES[dtype]) for seed in (1, 2))
    ops = bench.hooked_call_ops(model.tiny_run, model.sites, subject, style, EngineOptions())
    # kl-soft's ratio of the divergences (a clamp and a log before its softmax) takes the strided proj_in to 25.
    assert ops["kl"][1] <= 20 and ops["kl-soft"][1] <= 24 + (config == "sdxl" and dtype != "fp32")
    fixed = {method: count for method, count in ops.items() if method not in DIVERGENCE_METHODS}
    assert all(mean <= 5 and most <= 6 for mean, most in fixed.values())


def test_engine_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--engine", "decide_every=0"])
    assert "decide_every=0" in capsys.readouterr().err
