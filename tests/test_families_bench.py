"""The families' benchmark (python -m lib_dynfuse.bench --model zimage|lumina2|qwen|chroma|flux2|wan|krea2): each
shaped transformer has its family's layer names and fused shapes, its LoRAs patch fused layers part by part where
the family's finest LoRA layout does, and its last line is one JSON object. No timing is checked."""

from __future__ import annotations

import json

import pytest
import torch

from lib_dynfuse.bench import families
from lib_dynfuse.bench import main as bench

W = 96  # whole heads of 8 channels for every family (Lumina 2: 3 query heads per key/value head, Krea 2: 4)

# family -> {a block-0 layer's name: its (out, in) at width W}
SHAPES = {
    "zimage": {"layers.0.attention.qkv": (3 * W, W), "layers.0.feed_forward.w1": (256, W),
               "layers.0.adaLN_modulation.0": (4 * W, W)},
    "lumina2": {"layers.0.attention.qkv": (W + 2 * W // 3, W), "layers.0.feed_forward.w2": (W, 4 * W)},
    "qwen": {"transformer_blocks.0.attn.add_k_proj": (W, W), "transformer_blocks.0.img_mod.1": (6 * W, W),
             "transformer_blocks.0.txt_mlp.net.0.proj": (4 * W, W), "transformer_blocks.0.attn.to_out.0": (W, W)},
    "chroma": {"double_blocks.0.img_attn.qkv": (3 * W, W), "single_blocks.0.linear1": (7 * W, W),
               "single_blocks.0.linear2": (W, 5 * W)},
    "flux2": {"double_blocks.0.img_mlp.0": (6 * W, W), "single_blocks.0.linear1": (9 * W, W),
              "single_blocks.0.linear2": (W, 4 * W)},
    "wan": {"blocks.0.cross_attn.k": (W, W), "blocks.0.ffn.0": (int(13824 / 5120 * W), W)},
    "krea2": {"blocks.0.attn.wk": (W // 4, W), "blocks.0.attn.gate": (W, W), "blocks.0.mlp.up": (4 * W, W)},
}
DEPTHS = {"zimage": (2, 30), "lumina2": (2, 26), "qwen": (60,), "chroma": (19, 38), "flux2": (5, 20), "wan": (40,),
          "krea2": (28,)}


@pytest.fixture
def small_heads(monkeypatch):
    """Heads of 8 channels: every family's real depth at a width small enough to build in a test."""
    monkeypatch.setattr(families, "HEAD", 8)


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_each_family_has_its_layers_depths_and_fused_shapes(small_heads, family):
    model = families.build(family, W, "cpu", torch.float32)
    for name, shape in SHAPES[family].items():
        assert tuple(model.get_submodule(name).weight.shape) == shape, name
    assert tuple(len(getattr(model, name)) for name, _ in model.modes)[-len(DEPTHS[family]):] == DEPTHS[family]
    out = model(**families.inputs(model, 64, 2, "cpu", torch.float32))
    assert out.shape == (2, 16, 64) and torch.isfinite(out).all()


def test_fused_layers_are_cut_where_the_familys_finest_layout_cuts_them(small_heads):
    def parts(family: str, prefix: str) -> dict:
        model = families.build(family, W, "cpu", torch.float32)
        return {name: channels for name, (_, channels) in families.lora_sites(model).items()
                if name.startswith(prefix)}

    assert parts("lumina2", "layers.0.attention.qkv") == {"layers.0.attention.qkv:q": (0, W),
                                                          "layers.0.attention.qkv:k": (W, W // 3),
                                                          "layers.0.attention.qkv:v": (W + W // 3, W // 3)}
    assert parts("chroma", "single_blocks.0.linear1") == {
        "single_blocks.0.linear1:q": (0, W), "single_blocks.0.linear1:k": (W, W),
        "single_blocks.0.linear1:v": (2 * W, W), "single_blocks.0.linear1:mlp": (3 * W, 4 * W)}
    assert parts("flux2", "single_blocks.0.linear1") == {"single_blocks.0.linear1": None}
    assert parts("qwen", "transformer_blocks.0.attn.to_q") == {"transformer_blocks.0.attn.to_q": None}


def test_the_width_must_hold_whole_heads():
    with pytest.raises(ValueError, match="multiple of 192"):  # heads of 64, 3 query heads per key/value head
        families.FamilyShaped("lumina2", 256)


def test_the_last_line_is_one_json_object_with_the_operations_per_hooked_call(monkeypatch, capsys):
    monkeypatch.setitem(families.DEPTHS, "zimage", (1, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--model", "zimage", "--width", "64", "--size", "64", "--repeats", "1", "--device",
                           "cpu", "--rank", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    # 3 blocks, each: qkv (q, k, v), out, w1, w2, w3, and the modulation of the two that have one
    assert (result["model"], result["width"], result["hooked_layers"], result["lora_layers"]) == ("zimage", 64, 17, 23)
    assert set(result["ops_per_hooked_call"]) == set(bench.METHODS)
    assert {"ratio", "floor", "extra_mem_mb"} <= set(result)
