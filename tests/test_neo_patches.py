"""Forge Neo's patch payloads (LoRA, LoHa, DoRA adapter objects, bias diffs, norm-layer diffs, online patches) as
the Neo adapter turns them into deltas or leaves them to Neo, and what it says when it cannot take a LoRA over."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import tolerances as tol
from safetensors.torch import load_file

from lib_dynfuse.hosts.base import NOTE_KEY
from lib_dynfuse.settings import DynFuseSettings

_spec = importlib.util.spec_from_file_location("neo_harness", Path(__file__).parent / "fakehost/neo/neo_harness.py")
nh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nh)

CONTESTED = "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"


@pytest.fixture
def host(tmp_path):
    with nh.neo_host(tmp_path) as host:
        nh.write_test_loras(tmp_path, host.sd_model)
        yield host


def test_loha_and_bias_patches_become_dense_deltas_matching_neos_merge(host, tmp_path):
    nh.write_loha(host.sd_model, tmp_path)
    merged, _ = host.txt2img(nh.LOHA_PROMPT, steps=2)
    script, runner = nh.dynfuse(host, method="static")
    fused, p = host.txt2img(nh.LOHA_PROMPT, runner=runner, steps=2)
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], nh.diffusion_model(host.sd_model), steps=2)
    assert NOTE_KEY not in p.extra_generation_params and script.job.last_log.layers


def test_k_lora_takes_a_loha_layers_rank_from_the_adapter(host, tmp_path, klora_ranks):
    loha = nh.write_loha(host.sd_model, tmp_path, rank=3)
    _script, runner = nh.dynfuse(host, method="k-lora")
    host.txt2img(nh.LOHA_PROMPT, runner=runner, steps=2)
    shared = [path for path in loha if path in klora_ranks]
    assert len(shared) >= 2 and {klora_ranks[path] for path in shared} == {(3, 2)}


def write_dora_subject(host, tmp_path) -> None:
    """subj.safetensors again, with a DoRA magnitude on each of its Linear layers."""
    keys = list(nh.kohya_keys())[nh.SUBJECT_KEYS]
    model = host.sd_model.forge_objects_original.unet.model
    g = torch.Generator().manual_seed(11)
    dora = {f"{nh.kohya_keys()[key]}.dora_scale": torch.rand(shape[0], 1, generator=g) + 0.5
            for key in keys if len(shape := tuple(model.get_submodule(key[:-7]).weight.shape)) == 2}
    nh.write_lora(tmp_path / "subj.safetensors", host.sd_model, keys, seed=1, extra=dora)


def test_dora_deltas_are_taken_against_the_original_weight_neo_keeps_in_backup(host, tmp_path):
    """DoRA rescales the weight it is merged into, so its delta depends on that weight: with subj, style and other
    merged by an earlier plain generation, the model holds merged weights and only Neo's backup the original."""
    write_dora_subject(host, tmp_path)
    _script, runner = nh.dynfuse(host, method="static")
    merged, _ = host.txt2img(nh.PROMPT, steps=2)
    assert host.sd_model.forge_objects.unet.backup  # the weights are merged now
    fused, p = host.txt2img(nh.PROMPT, runner=runner, steps=2)
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], nh.diffusion_model(host.sd_model), steps=2)
    assert NOTE_KEY not in p.extra_generation_params


def test_norm_layer_patches_stay_with_neo_in_place_and_the_rest_is_fused(host, tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    norms = {"lora_unet_input_blocks_1_1_norm.w_norm": torch.randn(8, generator=g) * 0.1,
             "lora_unet_input_blocks_1_1_norm.b_norm": torch.randn(8, generator=g) * 0.1}
    nh.write_lora(tmp_path / "subj.safetensors", host.sd_model, list(nh.kohya_keys())[nh.SUBJECT_KEYS], seed=1,
                  extra=norms)
    merged, _ = host.txt2img(nh.PROMPT, steps=2, enable_hr=True)
    script, runner = nh.dynfuse(host, method="static")
    kept = {}
    host.script_callbacks.on_cfg_denoiser(lambda params: kept.update(host.sd_model.forge_objects.unet.patches))
    fused, p = host.txt2img(nh.PROMPT, runner=runner, steps=2, enable_hr=True)
    out = capsys.readouterr().out
    assert out.count("input_blocks.1.1.norm keeps the subject LoRA merged statically") == 1
    norm = "diffusion_model.input_blocks.1.1.norm"
    assert [e[0] for e in kept[f"{norm}.weight"]] == [0.8] and [e[0] for e in kept[f"{norm}.bias"]] == [0.8]
    assert "input_blocks.1.1.norm keeps the subject LoRA merged statically" in p.extra_generation_params[NOTE_KEY]
    assert script.job.last_log.layers
    torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=1e-3, atol=1e-3)


def test_online_loras_stay_per_forward_for_the_other_loras(host):
    """Neo's "(fp16 LoRA)" choices for low-bit UNets: every entry is online, merged per forward by LowVramPatch."""
    from backend.args import dynamic_args

    dynamic_args.online_lora = True
    original = nh.unet_weights(host.sd_model)
    merged, _ = host.txt2img(nh.PROMPT, steps=2)
    _script, runner = nh.dynfuse(host, method="static")
    online = []
    host.script_callbacks.on_cfg_denoiser(lambda params: online.append(
        len(host.sd_model.forge_objects.unet.model.get_submodule(CONTESTED).weight_function)))
    fused, _ = host.txt2img(nh.PROMPT, runner=runner, steps=2)
    assert online == [1, 1]          # "other" is still patched online on the contested layer
    torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=1e-3, atol=1e-3)
    assert all(torch.equal(original[k], v) for k, v in nh.unet_weights(host.sd_model).items())


def test_loras_loaded_before_dynfuse_watched_the_loader_are_loaded_again(host):
    merged, _ = host.txt2img(nh.PROMPT, steps=2)       # no adapter yet: Neo's loader is not watched
    script, runner = nh.dynfuse(host, method="static")
    fused, p = host.txt2img(nh.PROMPT, runner=runner, steps=2)
    assert NOTE_KEY not in p.extra_generation_params and script.job.last_log.layers
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], nh.diffusion_model(host.sd_model), steps=2)


def test_a_tag_neo_did_not_load_turns_dynfuse_off_with_a_message(host, capsys):
    prompt = "a dog <lora:subj:0.8> <lora:nothere:1> <lora:other:0.5>"
    clean, _ = host.txt2img(prompt, steps=2)
    _script, runner = nh.dynfuse(host)
    processed, p = host.txt2img(prompt, runner=runner, steps=2)
    assert "the style 'nothere' LoRA has no UNet weights loaded by Forge Neo" in capsys.readouterr().out
    assert p.extra_generation_params[NOTE_KEY] == "off: LoRA has no UNet weights"
    assert torch.equal(processed.images[0], clean.images[0])


class ForgeMainPatcher:   # backend/patcher/base.py of Forge main: per-file lora_patches and a LoraLoader
    lora_patches: dict = {}
    lora_loader = None


class ClassicPatcher:     # ldm_patched ModelPatcher of old Forge and Forge Classic: patches, no patches_uuid
    patches: dict = {}


@pytest.mark.parametrize(("patcher", "found"), [
    (ForgeMainPatcher, "per LoRA file (Forge main's lora_patches)"),
    (ClassicPatcher, "in the ldm_patched store of old Forge and Forge Classic")])
def test_a_store_neo_support_cannot_read_is_refused_once_naming_what_it_found(host, capsys, patcher, found):
    host.sd_model.forge_objects.unet = patcher()
    adapter = nh.adapter_module().NeoAdapter()
    p = host.processing.StableDiffusionProcessingTxt2Img(prompt=nh.PROMPT)
    p.setup_prompts()
    assert adapter.begin_job(p, DynFuseSettings(enabled=True)) is None
    assert capsys.readouterr().out == (
        f"DynFuse: this WebUI's UNet keeps its LoRAs {found}, where DynFuse's Forge Neo support expects them per "
        "model weight under a patches_uuid (Forge Neo's store); DynFuse cannot take them over here. DynFuse is off "
        "for this generation.\n")


def test_a_loader_without_file_names_is_refused(host, capsys, monkeypatch):
    import networks

    monkeypatch.setattr(networks, "load_lora_for_models", lambda model, clip, lora, strength_model, strength_clip:
                        (model, clip))
    adapter = nh.adapter_module().NeoAdapter()
    p = host.processing.StableDiffusionProcessingTxt2Img(prompt=nh.PROMPT)
    p.setup_prompts()
    assert adapter.begin_job(p, DynFuseSettings(enabled=True)) is None
    assert nh.adapter_module().LOADER_CHANGED in capsys.readouterr().out


def test_a_failing_takeover_gives_neo_back_every_lora(host, monkeypatch, capsys):
    from lib_dynfuse.engine import session

    _script, runner = nh.dynfuse(host)
    clean, _ = host.txt2img(nh.PROMPT, steps=2)
    cached = host.sd_model.forge_objects_after_applying_lora.unet

    def broken_install(self):
        raise RuntimeError("no hooks today")

    monkeypatch.setattr(session.FusionSession, "install", broken_install)
    processed, p = host.txt2img(nh.PROMPT, runner=runner, steps=2)
    assert "could not take over the LoRAs: RuntimeError: no hooks today" in capsys.readouterr().out
    assert p.extra_generation_params[NOTE_KEY] == "off: could not take over the LoRAs (RuntimeError)"
    assert host.sd_model.forge_objects.unet is cached
    assert torch.equal(processed.images[0], clean.images[0])


def test_neo_keeps_device_memory_free_for_the_hooks_factors(host, tmp_path, monkeypatch):
    unet_model = host.sd_model.forge_objects_original.unet.model
    real = host.memory_management.load_models_gpu
    required = []

    def recording(models, memory_required=0, **kwargs):
        if models[0].model is unet_model:
            required.append(memory_required)
        return real(models, memory_required=memory_required, **kwargs)

    monkeypatch.setattr(host.memory_management, "load_models_gpu", recording)
    host.txt2img(nh.PROMPT, steps=1)
    _script, runner = nh.dynfuse(host)
    host.txt2img(nh.PROMPT, runner=runner, steps=1)
    factors = sum(t.numel() for name in ("subj", "style") for key, t in load_file(tmp_path / f"{name}.safetensors").items()
                  if key.endswith(("lora_up.weight", "lora_down.weight")))
    assert required[1] - required[0] == 4 * factors  # float32 factors on top of what the UNet itself needs


def test_another_extension_replacing_the_unet_wrapper_is_reported_once(host, capsys):
    merged, _ = host.txt2img(nh.PROMPT, steps=3)
    script, _ = nh.dynfuse(host, method="static")

    class Later:
        filename = "wrapper-ext"

        def process_before_every_sampling(self, p, *args, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            unet.set_model_unet_function_wrapper(
                lambda apply_model, args: apply_model(args["input"], args["timestep"], **args["c"]))
            p.sd_model.forge_objects.unet = unet

    fused, _ = host.txt2img(nh.PROMPT, runner=host.scripts.ScriptRunner([script, Later()]), steps=3)
    assert capsys.readouterr().out.count("another extension replaced Forge Neo's UNet function wrapper") == 1
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], nh.diffusion_model(host.sd_model), steps=3)
    assert sum(len(m._forward_hooks) for m in host.sd_model.forge_objects_original.unet.model.modules()) == 0


def test_host_detection_picks_the_neo_adapter(host):
    from lib_dynfuse.hosts import detect

    detect.reset_adapter()
    try:
        assert isinstance(detect.get_adapter(), nh.adapter_module().NeoAdapter)
        assert detect.unsupported_notice() is None
    finally:
        detect.reset_adapter()
