"""The fake ComfyUI behaves like ComfyUI 0.30 where DynFuse depends on it: the patch store and its uuid, clones,
the merge at load time, injections around patching, the wrappers' and callbacks' order, the batch rows of a UNet
call, the post-CFG arguments, LoraLoader. If one of these fails, the ComfyUI node tests prove nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

HARNESS = Path(__file__).parent / "fakehost/comfyui/comfyui_harness.py"
_spec = importlib.util.spec_from_file_location("comfyui_harness", HARNESS)
ch = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("comfyui_harness", ch)
_spec.loader.exec_module(ch)

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture
def host(tmp_path):
    with ch.comfy_host(tmp_path) as host:
        ch.write_test_loras(host)
        yield host


def test_lora_loader_adds_entries_to_a_clone_and_rolls_its_uuid(host):
    from comfy.weight_adapter import LoRAAdapter

    model, clip = host.lora_loader(host.model, host.clip, "subject.safetensors", 0.8)
    assert model is not host.model and host.model.patches == {}
    strength, adapter, strength_model, offset, function = model.patches[KEY][0]
    assert isinstance(adapter, LoRAAdapter) and adapter.name == "lora" and len(adapter.weights) == 6
    assert (strength, strength_model, offset, function) == (0.8, 1.0, None, None)
    assert model.patches_uuid != host.model.patches_uuid
    assert any(k.startswith("transformer.") for k in clip.patcher.patches)
    assert not any(k.startswith("transformer.") for k in model.patches)


def test_clones_copy_the_lists_and_share_entries_backup_and_uuid(host):
    model, _ = host.lora_loader(host.model, host.clip, "subject.safetensors", 0.8)
    clone = model.clone()
    assert clone.patches[KEY] is not model.patches[KEY] and clone.patches[KEY][0] is model.patches[KEY][0]
    assert clone.backup is model.backup and clone.patches_uuid == model.patches_uuid and clone.model is model.model


def test_loading_merges_and_a_clone_with_another_uuid_restores_first(host):
    original = host.weights()
    model, clip = host.lora_loader(host.model, host.clip, "subject.safetensors", 0.8)
    host.model_management.load_models_gpu([model])
    merged = host.model.model.state_dict()[KEY]
    assert not torch.equal(merged, original[KEY]) and KEY in model.backup
    host.model_management.load_models_gpu([host.model])  # the plain checkpoint: restored, nothing merged
    assert all(torch.equal(v, original[k]) for k, v in host.model.model.state_dict().items())
    host.model_management.load_models_gpu([model])
    assert torch.equal(host.model.model.state_dict()[KEY], merged)


def test_injections_follow_patching_and_detaching(host):
    from comfy.patcher_extension import PatcherInjection

    events = []
    model = host.model.clone()
    injection = PatcherInjection(lambda p: events.append("inject"), lambda p: events.append("eject"))
    model.set_injections("probe", [injection])
    host.model_management.load_models_gpu([model])
    assert events[-1] == "inject" and model.is_injected
    host.model_management.load_models_gpu([host.model])  # another clone of the same model: this one is detached
    assert events[-1] == "eject" and not model.is_injected


def test_a_unet_call_sees_its_rows_step_and_schedule_uncond_first(host):
    seen, post = [], []
    model = host.model.clone()

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append((list(transformer_options["cond_or_uncond"]), x.shape[0], float(transformer_options["sigmas"][0]),
                     transformer_options["sample_sigmas"].tolist()))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    model.add_wrapper_with_key("apply_model", "probe", wrapper)
    model.set_model_sampler_post_cfg_function(lambda args: post.append(sorted(args)) or args["denoised"])
    host.sample(model, steps=3, batch=2)
    assert [s[:2] for s in seen] == [([1, 0], 4)] * 3
    schedule = seen[0][3]
    assert len(schedule) == 4 and schedule[-1] == 0.0 and [s[2] for s in seen] == pytest.approx(schedule[:3])
    assert post[0] == sorted(["denoised", "cond", "uncond", "cond_scale", "model", "uncond_denoised",
                              "cond_denoised", "sigma", "model_options", "input"])


def test_short_memory_splits_the_chunks_over_calls(host):
    seen = []
    model = host.model.clone()
    model.add_wrapper_with_key("apply_model", "probe", lambda ex, x, *a, **k: seen.append(
        list(a[4]["cond_or_uncond"])) or ex(x, *a, **k))
    host.model_management.max_batch_rows = 2
    host.sample(model, steps=1, batch=2)
    assert seen == [[1], [0]]


def test_pre_run_and_cleanup_surround_sampling_and_cleanup_runs_on_an_exception(host):
    events = []
    model = host.model.clone()
    model.add_callback_with_key("on_pre_run", "probe", lambda p: events.append("pre_run"))
    model.add_callback_with_key("on_cleanup", "probe", lambda p: events.append("cleanup"))
    host.sample(model, steps=1)
    assert events == ["pre_run", "cleanup"]
    host.model_management.interrupt_current_processing(True)
    with pytest.raises(host.model_management.InterruptProcessingException):
        host.sample(model, steps=2)
    assert events[2:] == ["pre_run", "cleanup"]


def test_nodes_run_under_inference_mode_and_cfg_1_skips_the_uncond_pass(host):
    seen = []
    model = host.model.clone()
    model.add_wrapper_with_key("apply_model", "probe", lambda ex, x, *a, **k: seen.append(
        (torch.is_inference_mode_enabled(), list(a[4]["cond_or_uncond"]))) or ex(x, *a, **k))
    host.sample(model, steps=1, cfg=1.0)
    assert seen == [(True, [0])]
