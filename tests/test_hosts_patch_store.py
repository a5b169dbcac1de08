"""The patch-store layer the Forge and Forge Neo adapters share, without a host: stored payloads in both forms, which
entries can be fused, and the recorder that tells which file loaded an entry."""

from __future__ import annotations

import types

import pytest
import torch

from lib_dynfuse.hosts.patch_store import (
    LoadRecorder,
    NotFusable,
    check_entry,
    nominal_rank,
    payload_parts,
    same_file,
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


@pytest.mark.parametrize(("entry", "reason"), [
    ((1.0, Adapter("lora", (UP, DOWN, 1.0, None, None, None)), 1.0, (0, 0, 4), None, False), "slice of a fused layer"),
    ((1.0, Adapter("lora", (UP, DOWN, 1.0, None, None, None)), 0.5, None, None, False), "rescales the base weight"),
    ((1.0, Adapter("lora", (UP, DOWN, 1.0, None, None, [8, 5])), 1.0, None, None, False), "pads the layer's weight")])
def test_entries_no_hook_can_add_are_named(entry, reason):
    with pytest.raises(NotFusable, match=reason):
        check_entry(entry)


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
