"""End to end through the fake Forge Neo: lib_dynfuse.hosts.neo takes the subject and style LoRAs out of Neo's
per-weight patch store, fuses them with hooks, and leaves the model, the other LoRAs and Neo's shared structures
exactly as a run without the extension would, whatever Neo merged before (its patches_uuid)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import tolerances as tol

from lib_dynfuse.hosts.base import NOTE_KEY
from lib_dynfuse.settings import DynFuseSettings

_spec = importlib.util.spec_from_file_location("neo_harness", Path(__file__).parent / "fakehost/neo/neo_harness.py")
nh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nh)

CONTESTED = "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"  # cond and uncond rows differ here
OTHER_ONLY = "a dog <lora:other:0.5>"


@pytest.fixture
def host(tmp_path):
    with nh.neo_host(tmp_path) as host:
        nh.write_test_loras(tmp_path, host.sd_model)
        yield host


def hooks_on(host) -> int:
    return sum(len(m._forward_hooks) for m in host.sd_model.forge_objects_original.unet.model.modules())


def weights_while_sampling(host) -> dict:
    """The model's weights as the sampler's first step sees them (filled by the next generation)."""
    seen = {}

    def first_step(params):
        if params.denoiser.step == 0 and "weights" not in seen:
            seen["weights"] = nh.unet_weights(host.sd_model)

    host.script_callbacks.on_cfg_denoiser(first_step)
    return seen


def fresh_host_run(tmp_path, prompt, **kwargs):
    """(processed, weights after it) of ``prompt`` in a new fake Neo that never had DynFuse, with the same files."""
    folder = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    folder.mkdir()
    with nh.neo_host(folder) as fresh:
        nh.write_test_loras(folder, fresh.sd_model)
        processed, _ = fresh.txt2img(prompt, **kwargs)
        return processed, nh.unet_weights(fresh.sd_model)


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def store_snapshot(unet) -> dict:
    """The patch store as identities and values: which lists and entries, holding what."""
    return {key: (id(entries), [(id(e), e[0], id(e[1]), tuple(id(t) for t in e[1].weights[:2]), e[2:]) for e in entries])
            for key, entries in unet.patches.items()}


def test_off_is_bit_identical_to_no_extension(host):
    plain, _ = host.txt2img(nh.PROMPT, steps=3)
    script = nh.AdapterScript(host, nh.adapter_module().NeoAdapter(), DynFuseSettings(enabled=False))
    off, _ = host.txt2img(nh.PROMPT, runner=host.scripts.ScriptRunner([script]), steps=3)
    assert torch.equal(plain.images[0], off.images[0]) and plain.infotexts == off.infotexts


def test_static_method_reproduces_neos_merge(host):
    merged, _ = host.txt2img(nh.PROMPT, steps=3, batch_size=2)
    script, runner = nh.dynfuse(host, method="static")
    fused, p = host.txt2img(nh.PROMPT, runner=runner, steps=3, batch_size=2)
    # Output-space deltas instead of merged weights: equal up to fp32 rounding.
    tol.assert_sampled_close(torch.stack(fused.latents), torch.stack(merged.latents),
                             nh.diffusion_model(host.sd_model), steps=3)
    assert script.takeovers == 1 and NOTE_KEY not in p.extra_generation_params
    assert len(script.job.last_log.layers) == 10  # the layers both LoRAs patch


def test_only_subject_and_style_leave_neos_store_and_the_rest_stays_merged(host, tmp_path):
    _script, runner = nh.dynfuse(host)
    seen = weights_while_sampling(host)
    recorder, files = nh.adapter_module().RECORDER, []

    def loaded_from(params):
        unet = host.sd_model.forge_objects.unet
        known = recorder.files(unet)
        files.append({recorder.file_of(e, known) for entries in unet.patches.values() for e in entries})

    host.script_callbacks.on_cfg_denoiser(loaded_from)
    host.txt2img(nh.PROMPT, runner=runner, steps=2)
    assert files[0] == {str(tmp_path / "other.safetensors")}
    _, other_only = fresh_host_run(tmp_path, OTHER_ONLY, steps=1)
    assert equal_weights(seen["weights"], other_only)


def test_the_patches_uuid_trap_neo_re_merges_after_a_plain_generation_with_the_same_loras(host, tmp_path):
    """A plain generation leaves subj, style and other merged under the store's patches_uuid. DynFuse's clone must
    carry another uuid, or Neo keeps that merge and the hooks add subj and style a second time."""
    _script, runner = nh.dynfuse(host)  # DynFuse is installed, off for the first generation
    before, _ = host.txt2img(nh.PROMPT, steps=3)
    seen = weights_while_sampling(host)
    host.txt2img(nh.PROMPT, runner=runner, steps=3)
    after, _ = host.txt2img(nh.PROMPT, steps=3)

    _, other_only = fresh_host_run(tmp_path, OTHER_ONLY, steps=1)
    never, all_merged = fresh_host_run(tmp_path, nh.PROMPT, steps=3)
    assert equal_weights(seen["weights"], other_only)
    assert torch.equal(after.images[0], before.images[0]) and torch.equal(after.images[0], never.images[0])
    assert equal_weights(nh.unet_weights(host.sd_model), all_merged)


def test_the_trap_is_real_a_clone_keeping_the_sources_uuid_keeps_the_old_merge(host, tmp_path, monkeypatch):
    """The test above can fail: with the source's uuid on the clone, Neo keeps subj and style merged."""
    _script, runner = nh.dynfuse(host)
    host.txt2img(nh.PROMPT, steps=1)
    monkeypatch.setattr(nh.adapter_module(), "derived_uuid", lambda source, *args: source)
    seen = weights_while_sampling(host)
    host.txt2img(nh.PROMPT, runner=runner, steps=1)
    _, all_merged = fresh_host_run(tmp_path, nh.PROMPT, steps=1)
    assert equal_weights(seen["weights"], all_merged)


def test_next_generation_without_dynfuse_matches_a_host_that_never_had_it(host, tmp_path):
    originals = nh.unet_weights(host.sd_model)
    _script, runner = nh.dynfuse(host)
    host.txt2img(nh.PROMPT, runner=runner, steps=3)
    assert hooks_on(host) == 0
    after, _ = host.txt2img(nh.PROMPT, steps=3)
    weights_after = nh.unet_weights(host.sd_model)
    host.txt2img("a dog", steps=1)
    never, weights_never = fresh_host_run(tmp_path, nh.PROMPT, steps=3)
    assert torch.equal(after.images[0], never.images[0]) and equal_weights(weights_after, weights_never)
    assert equal_weights(nh.unet_weights(host.sd_model), originals)


def test_neos_shared_structures_are_not_mutated(host):
    _script, runner = nh.dynfuse(host, subject_strength=0.3)
    host.txt2img(nh.PROMPT, steps=1)
    cached = host.sd_model.forge_objects_after_applying_lora.unet
    before, uuid, options = store_snapshot(cached), cached.patches_uuid, repr(cached.model_options)
    host.txt2img(nh.PROMPT, runner=runner, steps=2, enable_hr=True)
    assert host.sd_model.forge_objects_after_applying_lora.unet is cached
    assert store_snapshot(cached) == before and cached.patches_uuid == uuid
    assert repr(cached.model_options) == options and "model_function_wrapper" not in cached.model_options


def test_neo_merges_once_per_change_and_not_again_for_the_same_loras_and_settings(host):
    model = host.sd_model.forge_objects_original.unet.model
    _script, runner = nh.dynfuse(host)
    host.txt2img(nh.PROMPT, steps=1)
    host.txt2img(nh.PROMPT, runner=runner, steps=2)
    merges = model.merge_count
    host.txt2img(nh.PROMPT, runner=runner, steps=2, batch_size=2)
    host.txt2img(nh.PROMPT, runner=runner, steps=2, n_iter=2, enable_hr=True)
    assert model.merge_count == merges == 2      # the plain run's merge, then one for DynFuse's store
    _script, runner = nh.dynfuse(host, style_strength=0.5)
    host.txt2img(nh.PROMPT, runner=runner, steps=2)
    assert model.merge_count == 2                  # an override of fused layers only: the same store, no merge


def test_hires_fix_takes_over_for_each_pass_with_one_store(host):
    script, runner = nh.dynfuse(host)
    seen = []
    host.script_callbacks.on_cfg_denoiser(lambda params: seen.append(
        (tuple(params.x.shape), hooks_on(host), host.sd_model.forge_objects.unet.patches_uuid)))
    model = host.sd_model.forge_objects_original.unet.model
    in_calls = []
    model.diffusion_model.register_forward_pre_hook(lambda module, args: in_calls.append(hooks_on(host)))
    processed, _ = host.txt2img(nh.PROMPT, runner=runner, steps=2, enable_hr=True, denoising_strength=0.6)
    assert script.takeovers == 2 and processed.images[0].shape == (3, 128, 128)
    assert seen[0][0] == (1, 4, 8, 8) and seen[-1][0] == (1, 4, 16, 16)
    assert {hooks for _, hooks, _ in seen} == {0} and set(in_calls) == {25}
    assert len({uuid for _, _, uuid in seen}) == 1
    assert [log.steps for log in script.job.logs(0)] == [[0, 1], [0, 1]]
    assert model.merge_count == 1


@pytest.mark.parametrize("inside_unet", [False, True], ids=["between-unet-calls", "inside-a-unet-call"])
def test_an_exception_during_sampling_leaves_no_hook_and_the_next_image_is_clean(host, monkeypatch, inside_unet):
    clean, _ = host.txt2img(nh.PROMPT, steps=3)
    weights = nh.unet_weights(host.sd_model)
    script, runner = nh.dynfuse(host)
    with monkeypatch.context() as patch:
        nh.crash_at_step_1(host, patch, inside_unet, CONTESTED)
        with pytest.raises(RuntimeError, match="out of memory"):
            host.txt2img(nh.PROMPT, runner=runner, steps=3)
    assert hooks_on(host) == 0
    script.settings = DynFuseSettings(enabled=False)
    after, _ = host.txt2img(nh.PROMPT, runner=runner, steps=3)
    assert torch.equal(after.images[0], clean.images[0]) and equal_weights(nh.unet_weights(host.sd_model), weights)


def test_interrupt_keeps_the_job_and_removes_everything(host):
    script, runner = nh.dynfuse(host)
    clean, _ = host.txt2img(nh.PROMPT, steps=3)
    weights = nh.unet_weights(host.sd_model)
    interrupting = [True]

    def interrupt(params):
        if interrupting[0] and params.denoiser.step == 1:
            host.shared.state.interrupt()

    host.script_callbacks.on_cfg_denoiser(interrupt)
    processed, _ = host.txt2img(nh.PROMPT, runner=runner, steps=4, enable_hr=True)
    assert len(processed.images) == 1 and script.takeovers == 1
    assert script.job.last_log.steps == [0, 1] and hooks_on(host) == 0 and script.adapter.job is None
    interrupting[0] = False
    after, _ = host.txt2img(nh.PROMPT, steps=3)
    assert torch.equal(after.images[0], clean.images[0]) and equal_weights(nh.unet_weights(host.sd_model), weights)


def test_img2img_is_taken_over_once_and_matches_neos_merge(host):
    from PIL import Image

    init = [Image.new("RGB", (80, 48), (200, 40, 30))]
    merged, _ = host.img2img(nh.PROMPT, init, steps=4, denoising_strength=0.5)
    script, runner = nh.dynfuse(host, method="static")
    fused, _ = host.img2img(nh.PROMPT, init, runner=runner, steps=4, denoising_strength=0.5)
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], nh.diffusion_model(host.sd_model), steps=4)
    assert script.takeovers == 1 and script.job.last_log.steps == [0, 1, 2] and hooks_on(host) == 0


def test_strength_override_and_tag_strength_scale_the_deltas(host):
    _script, runner = nh.dynfuse(host, method="static", subject_strength=0.3)
    fused, _ = host.txt2img(nh.PROMPT, runner=runner, steps=2)
    merged, _ = host.txt2img(nh.PROMPT.replace("subj:0.8", "subj:0.3"), steps=2)
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], nh.diffusion_model(host.sd_model), steps=2)


class Rescaler:
    """An extension (or a LoRA type) that rescales the base weight: strength_model != 1 on one subject layer's
    entry, which DynFuse cannot fuse. It rebuilds the entry, as it must (Neo's entries are shared tuples), and
    keeps its payload."""

    filename = "rescaler"
    layer = "diffusion_model.input_blocks.1.1.proj_in.weight"

    def process_before_every_sampling(self, p, *args, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()
        first, *rest = unet.patches[self.layer]
        unet.patches[self.layer] = [(first[0], first[1], 0.5, *first[3:]), *rest]
        p.sd_model.forge_objects.unet = unet


def test_a_patch_dynfuse_cannot_fuse_stays_with_neo_where_it_was_at_the_override(host, tmp_path):
    rescaler = Rescaler()
    strengths = (0.3, 0.6)
    expected = [host.txt2img(nh.PROMPT.replace("subj:0.8", f"subj:{s}"), runner=host.scripts.ScriptRunner([rescaler]),
                             steps=2)[0] for s in strengths]
    for strength, reference in zip(strengths, expected):  # the second strength must be merged anew
        script, _ = nh.dynfuse(host, method="static", subject_strength=strength)
        kept = {}
        host.script_callbacks.on_cfg_denoiser(
            lambda params: kept.update(layer=list(host.sd_model.forge_objects.unet.patches[Rescaler.layer])))
        fused, p = host.txt2img(nh.PROMPT, runner=host.scripts.ScriptRunner([rescaler, script]), steps=2)
        tol.assert_sampled_close(fused.latents[0], reference.latents[0],
                                 nh.diffusion_model(host.sd_model), steps=2)
        assert [(e[0], e[2]) for e in kept["layer"]] == [(strength, 0.5), (0.5, 1.0)]  # subj first, then other
        assert "proj_in keeps the subject LoRA merged statically" in p.extra_generation_params[NOTE_KEY]


# ---- damaged factors: found before DynFuse's clone is made Neo's, the LoRAs stay with Neo's merge ---------------

@pytest.mark.parametrize("name,role,value,problem", nh.NON_FINITE_FACTORS)
def test_a_non_finite_factor_turns_dynfuse_off_and_neo_keeps_its_merge_and_patches_uuid(host, tmp_path, capsys, name,
                                                                                       role, value, problem):
    """After a plain generation with the same LoRAs, Neo samples with its own patcher under its own patches_uuid:
    no clone of DynFuse's, no merge, the image and weights of the plain generation; nothing is left behind."""
    line, note = nh.write_damaged(tmp_path, host.sd_model, name, role, value, problem)
    originals = nh.unet_weights(host.sd_model)
    script, runner = nh.dynfuse(host)  # installed (its loader watched), off for the plain generation
    clean, _ = host.txt2img(nh.PROMPT, steps=2, enable_hr=True)
    model = host.sd_model.forge_objects_original.unet.model
    cached = host.sd_model.forge_objects_after_applying_lora.unet
    before, uuid, merges = store_snapshot(cached), cached.patches_uuid, model.merge_count
    merged = nh.unet_weights(host.sd_model)
    sampled = []
    host.script_callbacks.on_cfg_denoiser(lambda params: sampled.append(host.sd_model.forge_objects.unet))
    capsys.readouterr()
    processed, p = host.txt2img(nh.PROMPT, runner=runner, steps=2, enable_hr=True)
    assert nh.dynfuse_lines(capsys) == [line] and p.extra_generation_params[NOTE_KEY] == note
    assert script.takeovers == 2 and script.job.session is None and hooks_on(host) == 0
    assert host.sd_model.forge_objects_after_applying_lora.unet is cached and sampled and all(
        unet.patches_uuid == uuid for unet in sampled)
    assert store_snapshot(cached) == before and cached.patches_uuid == uuid and model.merge_count == merges
    torch.testing.assert_close(processed.images[0], clean.images[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(nh.unet_weights(host.sd_model), merged, rtol=0, atol=0, equal_nan=True)
    host.txt2img("a dog", steps=1)
    assert equal_weights(nh.unet_weights(host.sd_model), originals)


def test_each_lora_is_checked_once_per_job(host, monkeypatch):
    """Neo takes the LoRAs over before each of its two sampling runs of a hires job; one check each."""
    from lib_dynfuse.loras import factors

    checked = []
    check = factors.check_deltas
    monkeypatch.setattr(factors, "check_deltas", lambda deltas: checked.append(1) or check(deltas))
    script, runner = nh.dynfuse(host)
    host.txt2img(nh.PROMPT, runner=runner, steps=2, enable_hr=True)
    assert script.takeovers == 2 and len(checked) == 2
    assert [log.steps for log in script.job.logs(0)] == [[0, 1], [0, 1]]
