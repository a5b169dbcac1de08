"""The patch-store layer the Forge and Forge Neo adapters share, without a host: stored payloads in both forms, which
entries can be fused, and the recorder that tells which file loaded an entry."""

from __future__ import annotations

import types

import pytest
import torch

from lib_dynfuse.engine.deltas import LayerGeometry
from lib_dynfuse.hosts.fused_layers import part_name
from lib_dynfuse.hosts.patch_store import (
    LoadRecorder,
    NotFusable,
    Taken,
    check_entry,
    nominal_rank,
    payload_parts,
    same_file,
    split_patches,
    with_strength,
)


class Adapter:
    """A weight adapter as Forge Neo, reForge and ComfyUI store it: no tuple interface."""

    def __init__(self, name, weights):
        self.name, self.weights = name, weights


UP, DOWN = torch.ones(4, 3), torch.ones(3, 5)


def test_payloads_of_both_forms_read_the_same():
    assert payload_parts(("lora", (UP, DOWN, 1.0, None, None))) == ("lora", (UP, DOWN, 1.0, None, None))
    assert payload_parts(Adapter("lora", [UP, DOWN, 1.0, None, None, None]))[0] == "lora"
    diff = (torch.zeros(3),)
    assert payload_parts(diff) == ("diff", diff)
    with pytest.raises(NotFusable, match="a patch of type list"):
        payload_parts([(torch.zeros(3), None), (1.0, ("diff", diff), 1.0, None, None)])


def test_a_rank_is_read_from_tuples_and_adapters_alike():
    entries = [[0.5, ("lora", (UP, DOWN, 1.0, None, None)), 1.0, None, None],
               (0.5, Adapter("loha", (UP, DOWN, 1.0, UP, DOWN, None, None, None)), 1.0, None, None, False)]
    assert nominal_rank(entries) == 6
    assert nominal_rank([(1.0, ("diff", (torch.zeros(4, 5),)), 1.0, None, None)]) is None


def test_a_new_strength_makes_a_new_entry_of_the_same_kind():
    forge = [0.8, ("diff", (UP,)), 1.0, None, None]
    neo = (0.8, Adapter("lora", ()), 1.0, None, None, True)
    assert with_strength(forge, 0.3) == [0.3, *forge[1:]] and forge[0] == 0.8
    assert with_strength(neo, 0.3) == (0.3, *neo[1:])


LINEAR = LayerGeometry("linear", (12, 5))
LORA = Adapter("lora", (UP, DOWN, 1.0, None, None, None))


@pytest.mark.parametrize(("entry", "geometry", "reason"), [
    ((1.0, LORA, 1.0, (1, 0, 4), None, False), LINEAR, "a slice of the layer's input channels"),
    ((1.0, LORA, 1.0, (0, 10, 4), None, False), LINEAR, r"channels \[10, 14\) of a layer with 12"),
    ((1.0, LORA, 1.0, (0, 0, 4), None, False), LayerGeometry("conv2d", (12, 5, 3, 3)), "a convolution's output"),
    ((1.0, LORA, 0.5, None, None, False), LINEAR, "rescales the base weight"),
    ((1.0, Adapter("lora", (UP, DOWN, 1.0, None, None, [8, 5])), 1.0, None, None, False), LINEAR,
     "pads the layer's weight")])
def test_entries_no_hook_can_add_are_named(entry, geometry, reason):
    with pytest.raises(NotFusable, match=reason):
        check_entry(entry, geometry)


def test_a_slice_of_a_linear_layers_output_channels_can_be_fused():
    check_entry((1.0, LORA, 1.0, (0, 8, 4), None, False), LINEAR)


class Patcher:
    def __init__(self, model, patches):
        self.model, self.patches = model, patches


def loader_module():
    """A LoRA front end whose loader appends one payload per weight to a copy of the patcher, as Neo's does."""

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
        patches = {k: v[:] for k, v in model.patches.items()}
        for key in lora:
            patches.setdefault(key, []).append((strength_model, Adapter("lora", (key,)), 1.0, None, None, online_mode))
        return Patcher(model.model, patches), clip

    return types.SimpleNamespace(load_lora_for_models=load_lora_for_models)


def test_the_recorder_tells_which_file_loaded_each_entry_of_later_clones():
    module, recorder, model = loader_module(), LoadRecorder(), object()
    assert recorder.install(module) and recorder.install(module)   # idempotent
    base = Patcher(model, {})
    a, _ = module.load_lora_for_models(base, None, ["w1", "w2"], 0.8, 1.0, filename="/loras/a.safetensors")
    b, _ = module.load_lora_for_models(a, None, ["w2"], 0.5, 1.0, "/loras/b.safetensors")
    clone = Patcher(model, {k: [(0.1, *e[1:]) for e in v] for k, v in b.patches.items()})  # strengths rewritten
    files = recorder.files(clone)
    assert [[recorder.file_of(e, files) for e in entries] for entries in clone.patches.values()] == [
        ["/loras/a.safetensors"], ["/loras/a.safetensors", "/loras/b.safetensors"]]
    assert recorder.knows(clone) and not recorder.knows(Patcher(object(), clone.patches))


def test_a_new_recorder_replaces_a_former_ones_wrapper():
    module, model = loader_module(), object()
    first, second = LoadRecorder(), LoadRecorder()
    first.install(module)
    second.install(module)
    assert module.load_lora_for_models.__wrapped__.__name__ == "load_lora_for_models"
    assert not hasattr(module.load_lora_for_models.__wrapped__, LoadRecorder.MARK)
    loaded, _ = module.load_lora_for_models(Patcher(model, {}), None, ["w"], 1.0, 1.0, filename="x.safetensors")
    assert second.knows(loaded) and not first.knows(loaded)


def test_what_the_loader_returns_is_returned_even_when_it_cannot_be_recorded():
    module = types.SimpleNamespace(
        load_lora_for_models=lambda model, clip, lora, strength_model, strength_clip, filename="default": 5)
    assert LoadRecorder().install(module)
    assert module.load_lora_for_models(None, None, {}, 1.0, 1.0, filename="x.safetensors") == 5


def test_a_loader_without_a_file_name_is_not_wrapped():
    module = types.SimpleNamespace(load_lora_for_models=lambda model, clip, lora, strength_model, strength_clip: 0)
    assert not LoadRecorder().install(module)
    assert not LoadRecorder().install(types.SimpleNamespace())


def test_files_match_by_path_or_by_name_when_the_tag_has_no_file():
    assert same_file("/loras/./dog.safetensors", "/loras/dog.safetensors", "dog")
    assert not same_file("/loras/dog.safetensors", "/loras/cat.safetensors", "dog")
    assert same_file("/elsewhere/dog.safetensors", None, "dog") and not same_file(None, None, "dog")


# ---- fused layers: patches on slices of a layer's output channels ---------------------------------------------------
H = 4  # the hidden width: FLUX's qkv is Linear(H, 3H), its single blocks' linear1 Linear(H, 3H + 4H)


def fused_model():
    model = torch.nn.Module()
    model.qkv = torch.nn.Linear(H, 3 * H)
    model.linear1 = torch.nn.Linear(H, 7 * H)
    return model


def lora(rows, seed, rank=2, alpha=1.0):
    g = torch.Generator().manual_seed(seed)
    return ("lora", (torch.randn(rows, rank, generator=g), torch.randn(rank, H, generator=g), alpha, None, None))


def merge(entries, weight, key):
    """Forge's merge for plain LoRA tuples: each patch narrowed to its slice, strength · alpha / rank · up @ down."""
    for strength, (_kind, (up, down, alpha, _mid, _dora)), _model, offset, _function, *_ in entries:
        target = weight if offset is None else weight.narrow(offset[0], offset[1], offset[2])
        target += strength * (alpha / down.shape[0]) * (up @ down)
    return weight


def sliced(rows_and_names, seed, strength=1.0):
    """{model key: [entry]} of a LoRA patching these slices, as diffusers names load (an offset per patch)."""
    return [(start, [strength, lora(length, seed + i), 1.0, (0, start, length), None])
            for i, (start, length) in enumerate(rows_and_names)]


def split(model, subject, style, base_weight=lambda key, module: module.weight):
    taken = [Taken("subject", "s.safetensors", subject), Taken("style", "t.safetensors", style)]
    return split_patches(model, taken, {"subject": None, "style": None}, base_weight, merge)


QKV = [(0, H), (H, H), (2 * H, H)]


def test_q_k_v_slices_become_parts_each_with_both_loras():
    model = fused_model()
    subject = {"qkv.weight": [e for _, e in sliced(QKV, 1)]}
    style = {"qkv.weight": [e for _, e in sliced(QKV, 5, strength=0.5)]}
    result = split(model, subject, style)
    assert [(t.name, t.channels) for t in result.targets] == [("qkv:q", (0, H)), ("qkv:k", (H, H)), ("qkv:v", (2 * H, H))]
    x = torch.randn(3, H)
    for role, entries in (("subject", subject), ("style", style)):
        expected = x @ merge(entries["qkv.weight"], torch.zeros(3 * H, H), "qkv.weight").t()
        for t in result.targets:
            start, length = t.channels
            geometry = LayerGeometry("linear", (length, H))
            torch.testing.assert_close(getattr(t, role).output(x, geometry), expected[:, start:start + length])
    assert not result.kept and not result.notes


def test_a_whole_layer_lora_beside_a_sliced_one_is_cut_into_the_same_parts():
    """A kohya (or BFL) LoRA patches the whole fused qkv; a diffusers one its q, k and v apart."""
    model = fused_model()
    whole = [1.0, lora(3 * H, 9), 1.0, None, None]
    result = split(model, {"qkv.weight": [whole]}, {"qkv.weight": [e for _, e in sliced(QKV[:2], 5)]})
    assert [(t.name, t.channels, t.style is not None) for t in result.targets] == [
        ("qkv:q", (0, H), True), ("qkv:k", (H, H), True), ("qkv:v", (2 * H, H), False)]
    x = torch.randn(3, H)
    expected = x @ merge([whole], torch.zeros(3 * H, H), "qkv.weight").t()
    for t in result.targets:
        start, length = t.channels
        torch.testing.assert_close(t.subject.output(x, LayerGeometry("linear", (length, H))),
                                   expected[:, start:start + length])


def test_the_single_blocks_linear1_parts_are_q_k_v_and_the_mlp_input():
    model = fused_model()
    slices = [*QKV, (3 * H, 4 * H)]
    result = split(model, {"linear1.weight": [e for _, e in sliced(slices, 1)]},
                   {"linear1.weight": [e for _, e in sliced(slices, 5)]})
    assert [t.name for t in result.targets] == ["linear1:q", "linear1:k", "linear1:v", "linear1:mlp"]
    assert part_name(LayerGeometry("linear", (7 * H, H)), 0, 3 * H) == "qkv"  # Forge Neo's linear1_qkv patches
    assert part_name(LayerGeometry("linear", (7 * H, H)), 2, 5) == "2-7"


def test_the_parts_of_a_grouped_query_qkv_are_q_and_the_narrower_k_and_v():
    """Lumina 2's attention.qkv: q as wide as the hidden state, k and v each half the rest; Flux.2's linear1 (q, k, v
    and a gated MLP input twice as wide as FLUX's) keeps its names."""
    gqa = LayerGeometry("linear", (2 * H, H))
    assert [part_name(gqa, start, length) for start, length in ((0, H), (H, H // 2), (3 * H // 2, H // 2),
                                                                (H, H), (0, 2 * H))] == ["q", "k", "v", "kv", "qkv"]
    flux2 = LayerGeometry("linear", (9 * H, H))
    assert [part_name(flux2, start, length) for start, length in ((0, H), (H, H), (2 * H, H), (3 * H, 6 * H))] == [
        "q", "k", "v", "mlp"]


class Quantised(torch.nn.Module):
    """A layer whose weight is stored packed, as bitsandbytes NF4 keeps it: the layer's shape is in its quant state."""

    def __init__(self, out_features, in_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(out_features * in_features // 2, 1, dtype=torch.uint8),
                                         requires_grad=False)
        self.weight.quant_state = types.SimpleNamespace(shape=torch.Size([out_features, in_features]))


def test_a_quantised_layer_takes_plain_loras_and_keeps_weight_dependent_ones_with_the_host():
    model = torch.nn.Module()
    model.qkv = Quantised(3 * H, H)
    up, down, alpha, _mid, _ = lora(3 * H, 3)[1]
    dora = [1.0, ("lora", (up, down, alpha, None, torch.ones(3 * H, 1))), 1.0, None, None]
    result = split(model, {"qkv.weight": [e for _, e in sliced(QKV, 1)]}, {"qkv.weight": [dora]})
    assert [(t.name, t.style) for t in result.targets] == [("qkv:q", None), ("qkv:k", None), ("qkv:v", None)]
    assert result.kept == {"t.safetensors": {"qkv.weight": [(dora, dora)]}}
    assert result.notes == ["qkv keeps the style LoRA merged statically (the patch (DoRA, GLoRA, OFT, ...) needs the "
                            "layer's weight, which is stored quantised)"]
