"""The fake Forge Neo behaves like Forge Neo 2.26 where DynFuse depends on it: its per-weight patch store, clone
semantics, the merge that runs only when patches_uuid changes, its merge function, its hires calling pattern. If
one of these fails, the Neo adapter tests prove nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("neo_harness", Path(__file__).parent / "fakehost/neo/neo_harness.py")
nh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nh)

SHARED = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"  # all three LoRAs patch it


@pytest.fixture
def host(tmp_path):
    with nh.neo_host(tmp_path) as host:
        nh.write_test_loras(tmp_path, host.sd_model)
        yield host


def test_the_store_is_per_weight_with_adapter_objects_and_no_file_names(host, tmp_path):
    from modules_forge.packages.comfy.weight_adapter import LoRAAdapter

    host.txt2img(nh.PROMPT, steps=1)
    unet = host.sd_model.forge_objects.unet
    assert not hasattr(unet, "lora_patches") and not hasattr(unet, "lora_loader")
    entries = unet.patches[SHARED]
    # subj (0.8), style (1.0) and other (0.5) all touch this weight, in load order
    assert [e[0] for e in entries] == [0.8, 1.0, 0.5]
    strength, adapter, strength_model, offset, function, online_mode = entries[0]
    assert isinstance(adapter, LoRAAdapter) and adapter.name == "lora"
    up, down, alpha, mid, dora, reshape = adapter.weights
    assert up.shape == (8, 2) and down.shape == (2, 8) and alpha == 1.0 and mid is dora is reshape is None
    assert (strength_model, offset, function, online_mode) == (1.0, None, None, False)
    assert not any(str(tmp_path) in repr(e) for entries in unet.patches.values() for e in entries)
    with pytest.raises(TypeError):
        adapter[1]


def test_clones_copy_the_lists_share_entries_backup_and_uuid(host):
    host.txt2img(nh.PROMPT, steps=1)
    unet = host.sd_model.forge_objects.unet
    clone = unet.clone()
    assert clone.patches[SHARED] is not unet.patches[SHARED]
    assert all(a is b for a, b in zip(clone.patches[SHARED], unet.patches[SHARED]))
    assert clone.backup is unet.backup and clone.patches_uuid == unet.patches_uuid and clone.parent is unet
    clone.add_patches({SHARED: ("diff", (torch.zeros(8, 8),))}, 1.0, filename="ignored.safetensors")
    assert clone.patches_uuid != unet.patches_uuid and len(unet.patches[SHARED]) == 3


def test_merges_only_when_patches_uuid_changes(host):
    """The trap DynFuse must avoid: a clone whose patches changed but whose uuid did not keeps the old merge."""
    original = nh.unet_weights(host.sd_model)
    host.txt2img(nh.PROMPT, steps=1)
    merged = nh.unet_weights(host.sd_model)
    model = host.sd_model.forge_objects.unet.model
    assert model.merge_count == 1 and not torch.equal(merged[SHARED], original[SHARED])

    memory = host.memory_management
    emptied = host.sd_model.forge_objects.unet.clone()
    emptied.patches = {}
    memory.load_models_gpu([emptied])
    assert torch.equal(nh.unet_weights(host.sd_model)[SHARED], merged[SHARED])   # same uuid: still merged
    fresh = emptied.clone()
    fresh.patches_uuid = "another"
    memory.load_models_gpu([fresh])
    assert torch.equal(nh.unet_weights(host.sd_model)[SHARED], original[SHARED])  # new uuid: restored from backup
    assert not host.sd_model.forge_objects.unet.backup


def test_merge_works_in_place_needs_the_key_and_rejects_forge_tuples(host):
    from backend.patcher.lora import merge_lora_to_weight

    host.txt2img(nh.PROMPT, steps=1)
    unet = host.sd_model.forge_objects.unet
    weight = torch.zeros(8, 8)
    out = merge_lora_to_weight(unet.patches[SHARED][:1], weight, SHARED)
    assert out is weight and weight.abs().sum() > 0
    with pytest.raises(TypeError):
        merge_lora_to_weight(unet.patches[SHARED][:1], torch.zeros(8, 8))
    up, down = unet.patches[SHARED][0][1].weights[:2]
    with pytest.raises(ValueError, match='of type "lora" is not recognized'):
        merge_lora_to_weight([(1.0, ("lora", (up, down, 1.0, None, None)), 1.0, None, None)], weight, SHARED)
    expected = unet.backup[SHARED].weight + 0.8 * (1.0 / 2) * up @ down
    torch.testing.assert_close(merge_lora_to_weight(unet.patches[SHARED][:1], unet.backup[SHARED].weight.clone(), SHARED),
                               expected)


class Recorder:
    filename = "recorder"

    def __init__(self):
        self.events = []

    def process(self, p):
        self.events.append("process")

    def process_before_every_sampling(self, p, **kwargs):
        self.events.append(("before_sampling", tuple(kwargs["x"].shape), torch.is_inference_mode_enabled(),
                            p.sd_model.forge_objects.unet is p.sd_model.forge_objects_after_applying_lora.unet))

    def postprocess(self, p, processed):
        self.events.append("postprocess")


def test_hires_calls_process_before_every_sampling_once_per_pass(host):
    rec = Recorder()
    processed, _ = host.txt2img(nh.PROMPT, runner=host.scripts.ScriptRunner([rec]), steps=2, enable_hr=True)
    assert rec.events == ["process", ("before_sampling", (1, 4, 8, 8), True, True),
                          ("before_sampling", (1, 4, 16, 16), True, True), "postprocess"]
    assert processed.images[0].shape == (3, 128, 128)


def test_linear_layers_are_nn_linear_with_inference_weights(host):
    model = host.sd_model.forge_objects.unet.model
    q = model.get_submodule("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    assert isinstance(q, torch.nn.Linear) and q.weight_function == [] and q.parameters_manual_cast is False
    assert all(p.is_inference() for p in model.parameters())


def test_online_loras_are_applied_per_forward_from_the_patchers_store(host):
    from backend.args import dynamic_args

    dynamic_args.online_lora = True
    original = nh.unet_weights(host.sd_model)
    host.txt2img(nh.PROMPT, steps=1)
    unet = host.sd_model.forge_objects.unet
    assert all(e[-1] is True for entries in unet.patches.values() for e in entries)
    assert all(torch.equal(original[k], v) for k, v in nh.unet_weights(host.sd_model).items())
    layer = unet.model.get_submodule(SHARED.removesuffix(".weight"))
    (patch,) = layer.weight_function
    assert patch.patches is unet.patches and patch.key == SHARED


def test_the_host_is_detected_as_forge_neo(host):
    from lib_dynfuse.hosts import detect

    assert detect.detect_host() == detect.NEO
