"""End to end through the fake Forge host: lib_dynfuse.hosts.forge takes the subject and style LoRAs over from
Forge's weight merge, fuses them with hooks, and leaves the model, the other LoRAs and Forge's shared
structures exactly as a run without the extension would."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import tolerances as tol

from lib_dynfuse.hosts.base import NOTE_KEY
from lib_dynfuse.hosts.forge import STATIC_SUFFIX, ForgeAdapter
from lib_dynfuse.settings import DynFuseSettings

_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)

CONTESTED = "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"  # cond and uncond rows differ here


@pytest.fixture
def host(tmp_path):
    with fh.forge_host(tmp_path) as host:
        fh.write_test_loras(tmp_path, host.sd_model)
        yield host


def dynfuse(host, **settings):
    script = fh.AdapterScript(host, ForgeAdapter(), DynFuseSettings(enabled=True, **settings))
    return script, host.scripts.ScriptRunner([script])


def hooks_on(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def hooks_in_unet_calls(host) -> list[int]:
    """The number of forward hooks on the model while each UNet forward runs (inside Forge's UNet wrapper)."""
    model = host.sd_model.forge_objects_original.unet.model
    seen = []
    model.diffusion_model.register_forward_pre_hook(lambda module, args: seen.append(hooks_on(model)))
    return seen


def store_snapshot(unet) -> dict:
    """The patch store as identities and values: which dicts, lists and tensors, holding what."""
    return {key: (id(patches), {k: (id(entries), [(e[0], id(e[1]), e[2:]) for e in entries])
                                for k, entries in patches.items()})
            for key, patches in unet.lora_patches.items()}


def test_off_is_bit_identical_to_no_extension(host):
    plain, _ = host.txt2img(fh.PROMPT, steps=3)
    script = fh.AdapterScript(host, ForgeAdapter(), DynFuseSettings(enabled=False))
    off, _ = host.txt2img(fh.PROMPT, runner=host.scripts.ScriptRunner([script]), steps=3)
    assert torch.equal(plain.images[0], off.images[0])
    assert plain.infotexts == off.infotexts


def test_static_method_reproduces_forges_merge(host):
    merged, _ = host.txt2img(fh.PROMPT, steps=3, batch_size=2)
    script, runner = dynfuse(host, method="static")
    fused, _p = host.txt2img(fh.PROMPT, runner=runner, steps=3, batch_size=2)
    # Output-space deltas instead of merged weights: equal up to fp32 rounding.
    tol.assert_sampled_close(torch.stack(fused.latents), torch.stack(merged.latents),
                             fh.diffusion_model(host.sd_model), steps=3)
    assert script.takeovers == 1
    assert script.job is not None and script.job.last_log is not None


def test_only_subject_and_style_leave_forges_store_and_the_rest_stays_merged(host, tmp_path):
    _script, runner = dynfuse(host)
    seen = {}

    def during_sampling(params):
        unet = host.sd_model.forge_objects.unet
        seen["keys"] = list(unet.lora_patches)
        seen["weights"] = fh.unet_weights(host.sd_model)

    host.script_callbacks.on_cfg_denoiser(during_sampling)
    host.txt2img(fh.PROMPT, runner=runner, steps=2)
    assert seen["keys"] == [(str(tmp_path / "other.safetensors"), 0.5, 1.0, False)]

    # What Forge merges for <lora:other:0.5> alone, in a fresh host where dynfuse never existed.
    with fh.forge_host(tmp_path / "fresh") as fresh:
        (tmp_path / "fresh").mkdir()
        fh.write_test_loras(tmp_path / "fresh", fresh.sd_model)
        fresh.txt2img("a dog <lora:other:0.5>", steps=1)
        expected = fh.unet_weights(fresh.sd_model)
    assert all(torch.equal(seen["weights"][k], expected[k]) for k in expected)


def test_forge_shared_structures_are_not_mutated(host):
    host.txt2img(fh.PROMPT, steps=1)
    cached = host.sd_model.forge_objects_after_applying_lora.unet
    before = store_snapshot(cached)
    options_before = repr(cached.model_options)
    _script, runner = dynfuse(host)
    host.txt2img(fh.PROMPT, runner=runner, steps=2, enable_hr=True)
    assert host.sd_model.forge_objects_after_applying_lora.unet is cached
    assert store_snapshot(cached) == before
    assert repr(cached.model_options) == options_before
    assert "model_function_wrapper" not in cached.model_options


def test_next_generation_without_dynfuse_matches_a_host_that_never_had_it(host, tmp_path):
    _script, runner = dynfuse(host)
    host.txt2img(fh.PROMPT, runner=runner, steps=3)
    model = host.sd_model.forge_objects_original.unet.model
    assert hooks_on(model) == 0
    after, _ = host.txt2img(fh.PROMPT, steps=3)
    weights_after = fh.unet_weights(host.sd_model)
    host.txt2img("a dog", steps=1)
    originals_after = fh.unet_weights(host.sd_model)

    (tmp_path / "fresh").mkdir()
    with fh.forge_host(tmp_path / "fresh") as fresh:
        fh.write_test_loras(tmp_path / "fresh", fresh.sd_model)
        originals = fh.unet_weights(fresh.sd_model)
        never, _ = fresh.txt2img(fh.PROMPT, steps=3)
        weights_never = fh.unet_weights(fresh.sd_model)
    assert torch.equal(after.images[0], never.images[0])
    assert all(torch.equal(weights_after[k], weights_never[k]) for k in weights_never)
    assert all(torch.equal(originals_after[k], originals[k]) for k in originals)


def test_repeated_dynfuse_generations_do_not_re_merge(host):
    _script, runner = dynfuse(host)
    host.txt2img(fh.PROMPT, runner=runner, steps=2)
    loader = host.sd_model.forge_objects.unet.lora_loader
    merges = loader.merge_count
    host.txt2img(fh.PROMPT, runner=runner, steps=2, batch_size=2)
    host.txt2img(fh.PROMPT, runner=runner, steps=2, n_iter=2)
    assert loader.merge_count == merges


def test_hires_fix_takes_over_again_for_the_second_pass(host):
    script, runner = dynfuse(host)
    steps_seen = []
    host.script_callbacks.on_cfg_denoiser(
        lambda params: steps_seen.append((tuple(params.x.shape), hooks_on(host.sd_model.forge_objects.unet.model),
                                          list(host.sd_model.forge_objects.unet.lora_patches))))
    in_calls = hooks_in_unet_calls(host)
    processed, _ = host.txt2img(fh.PROMPT, runner=runner, steps=2, enable_hr=True, denoising_strength=0.6)
    assert script.takeovers == 3
    assert processed.images[0].shape == (3, 128, 128)
    first, hires = steps_seen[0], steps_seen[-1]
    assert first[0] == (1, 4, 8, 8) and hires[0] == (1, 4, 16, 16)
    # hooks only inside the UNet calls, the same ones in both passes; the same store (only "other" left)
    assert first[1] == hires[1] == 0
    keys = list(fh.kohya_keys())
    assert set(in_calls) == {len(set(keys[fh.SUBJECT_KEYS]) | set(keys[fh.STYLE_KEYS]))}
    assert first[2] == hires[2] and len(hires[2]) == 1
    assert hooks_on(host.sd_model.forge_objects.unet.model) == 0
    # the selection of the image covers both passes (Forge's call between them samples nothing)
    assert [log.steps for log in script.job.logs(0)] == [[0, 1], [0, 1]]


@pytest.mark.parametrize("inside_unet", [False, True], ids=["between-unet-calls", "inside-a-unet-call"])
def test_an_exception_during_sampling_leaves_no_hook(host, monkeypatch, inside_unet):
    clean, _ = host.txt2img(fh.PROMPT, steps=3)
    model = host.sd_model.forge_objects_original.unet.model
    script = fh.AdapterScript(host, ForgeAdapter(), DynFuseSettings(enabled=True))
    runner = host.scripts.ScriptRunner([script])
    with monkeypatch.context() as patch:
        hooks_at_error = fh.crash_at_step_1(host, patch, inside_unet, CONTESTED)
        with pytest.raises(RuntimeError, match="out of memory"):
            host.txt2img(fh.PROMPT, runner=runner, steps=3)
    assert (hooks_at_error[0] > 0) == inside_unet
    assert hooks_on(model) == 0                       # postprocess never ran: the wrapper's finally removed them

    script.settings = DynFuseSettings(enabled=False)
    after, _ = host.txt2img(fh.PROMPT, runner=runner, steps=3)
    assert hooks_on(model) == 0
    assert torch.equal(after.images[0], clean.images[0])


def test_interrupt_keeps_the_job_and_removes_everything(host):
    script, runner = dynfuse(host)

    def interrupt(params):
        if params.denoiser.step == 1:
            host.shared.state.interrupt()

    host.script_callbacks.on_cfg_denoiser(interrupt)   # step 1 finishes, step 2 is never run
    processed, _ = host.txt2img(fh.PROMPT, runner=runner, steps=4)
    assert len(processed.images) == 1
    assert script.job.last_log is not None and script.job.last_log.steps == [0, 1]
    assert hooks_on(host.sd_model.forge_objects_original.unet.model) == 0
    assert script.adapter.job is None


def test_sampling_runs_under_inference_mode_with_inference_weights(host):
    script, runner = dynfuse(host)
    model = host.sd_model.forge_objects_original.unet.model
    module = model.get_submodule(CONTESTED)
    modes = []
    module.register_forward_hook(lambda m, i, o: modes.append((torch.is_inference_mode_enabled(), o.is_inference())))
    host.txt2img(fh.PROMPT, runner=runner, steps=2)
    assert modes and all(mode == (True, True) for mode in modes)
    assert all(p.is_inference() for p in model.parameters())
    log = script.job.last_log
    assert CONTESTED in log.layers and log.steps == [0, 1]


class FusedOutputObserver:
    """An extension whose UNet wrapper runs inside DynFuse's (it set the slot first, so DynFuse chains it): it
    watches a contested layer after DynFuse's hook and records, for every UNet call, the step and which LoRA's
    delta each row of the fused output holds."""

    filename = "observer"

    def __init__(self, host, script):
        self.module = host.sd_model.forge_objects_original.unet.model.get_submodule(CONTESTED)
        self.script = script
        self.calls = []

    def observe(self, m, inputs, fused):
        session = self.script.job.session
        layer = next(layer for layer in session.layers if layer.name == CONTESTED)
        x = inputs[0]
        base = torch.nn.functional.linear(x, m.weight, m.bias)
        added = (fused - base).flatten(1)
        errors = torch.stack([(added - d.output(x, layer.geometry).flatten(1)).abs().amax(1)
                              for d in (layer.subject, layer.style)])
        self.calls.append((session.clock.index, errors.argmin(0).tolist()))

    def process_before_every_sampling(self, p, *args, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()

        def wrapper(apply_model, args):
            handle = self.module.register_forward_hook(self.observe)  # after DynFuse's: sees the fused output
            try:
                return apply_model(args["input"], args["timestep"], **args["c"])
            finally:
                handle.remove()

        unet.set_model_unet_function_wrapper(wrapper)
        p.sd_model.forge_objects.unet = unet


def winners_per_call(host, batch_size, **settings):
    """For every UNet call: the step and, per row, which LoRA's delta the fused output of a contested layer holds."""
    script, _ = dynfuse(host, **settings)
    observer = FusedOutputObserver(host, script)
    host.txt2img(fh.PROMPT, batch_size=batch_size, runner=host.scripts.ScriptRunner([observer, script]), steps=6,
                 cfg_scale=5.0)
    return observer.calls


def test_split_cond_and_uncond_calls_keep_each_images_decision_tied(host):
    one_chunk = host.sd_model.forge_objects.unet.model.memory_required([2, 4, 8, 8])
    host.memory_management.free_memory_bytes = one_chunk * 1.5      # Forge runs uncond and cond separately
    calls = winners_per_call(host, 2, method="kl", temperature=0.5)
    assert [len(rows) for _, rows in calls] == [2] * 12                 # 6 steps x (uncond call, cond call)
    by_step = {}
    for step, rows in calls:
        by_step.setdefault(step, []).append(rows)
    assert all(len(pair) == 2 and pair[0] == pair[1] for pair in by_step.values())


def test_one_batched_call_ties_cond_and_uncond_rows(host):
    calls = winners_per_call(host, 2, method="kl", temperature=0.5)
    assert [len(rows) for _, rows in calls] == [4] * 6
    # rows are [uncond image 0, uncond image 1, cond image 0, cond image 1]
    assert all(rows[:2] == rows[2:] for _, rows in calls)


def test_deciding_per_row_can_split_an_images_rows(host):
    """The two tie tests above can fail: with per-row decisions cond and uncond rows do disagree."""
    calls = winners_per_call(host, 2, method="kl", temperature=0.5, decide_per="row")
    assert any(rows[:2] != rows[2:] for _, rows in calls)


def test_strength_override_and_tag_strength_scale_the_deltas(host):
    _script, runner = dynfuse(host, method="static", subject_strength=0.3)
    fused, _ = host.txt2img(fh.PROMPT, runner=runner, steps=2)
    merged, _ = host.txt2img(fh.PROMPT.replace("subj:0.8", "subj:0.3"), steps=2)
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], fh.diffusion_model(host.sd_model), steps=2)


def test_forge_keeps_device_memory_free_for_the_hooks_factors(host, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    unet_model = host.sd_model.forge_objects_original.unet.model
    real = host.memory_management.load_models_gpu
    preserved = []

    def recording(models, memory_required=0, hard_memory_preservation=0):
        if models[0].model is unet_model:
            preserved.append(hard_memory_preservation)
        return real(models, memory_required=memory_required, hard_memory_preservation=hard_memory_preservation)

    monkeypatch.setattr(host.memory_management, "load_models_gpu", recording)
    host.txt2img(fh.PROMPT, steps=1)
    _script, runner = dynfuse(host)
    host.txt2img(fh.PROMPT, runner=runner, steps=1, enable_hr=True)
    host.txt2img(fh.PROMPT, steps=1)
    factors = [t for name in ("subj", "style") for key, t in load_file(tmp_path / f"{name}.safetensors").items()
               if key.endswith(("lora_up.weight", "lora_down.weight"))]
    fp32 = 4  # the fake UNet computes in float32
    assert preserved == [0, fp32 * sum(t.numel() for t in factors), fp32 * sum(t.numel() for t in factors), 0]


def test_loha_and_bias_patches_become_dense_deltas_matching_forge(host, tmp_path):
    fh.write_loha(host.sd_model, tmp_path)
    prompt = fh.LOHA_PROMPT
    merged, _ = host.txt2img(prompt, steps=2)
    _script, runner = dynfuse(host, method="static")
    fused, _ = host.txt2img(prompt, runner=runner, steps=2)
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], fh.diffusion_model(host.sd_model), steps=2)


def test_k_lora_takes_a_loha_layers_rank_from_forges_patch(host, tmp_path, klora_ranks):
    """K = r_subject·r_style: a LoHa layer's dense delta carries the rank Forge's merge takes (w1b's rows), not the
    bound of the matrix."""
    loha = fh.write_loha(host.sd_model, tmp_path, rank=3)
    _script, runner = dynfuse(host, method="k-lora")
    host.txt2img(fh.LOHA_PROMPT, runner=runner, steps=2)
    shared = [path for path in loha if path in klora_ranks]
    assert len(shared) >= 2
    assert {klora_ranks[path] for path in shared} == {(3, 2)}


@pytest.mark.parametrize(("factors", "rank"), [("w1 w2", None), ("w1 w2_a w2_b", 4), ("w1_a w1_b w2", 3),
                                               ("w1_a w1_b w2_a w2_b", 4)])
def test_a_lokr_patch_has_the_rank_forges_merge_takes(factors, rank):
    """Forge's merge takes a LoKr's dim from a factorised w2 (w2_b's rows), else from a factorised w1 (w1_b's)."""
    from lib_dynfuse.hosts.patch_store import nominal_rank

    shapes = {"w1": (2, 2), "w1_a": (2, 3), "w1_b": (3, 2), "w2": (4, 6), "w2_a": (4, 4), "w2_b": (4, 6)}
    t = {name: torch.ones(shape) if name in factors.split() else None for name, shape in shapes.items()}
    patch = ("lokr", (t["w1"], t["w2"], 1.0, t["w1_a"], t["w1_b"], t["w2_a"], t["w2_b"], None, None))
    assert nominal_rank([[1.0, patch, 1.0, None, None]]) == rank


class Rescaler:
    """An extension (or a LoRA type) that rescales the base weight: strength_model != 1 on one subject layer,
    which dynfuse cannot fuse."""

    filename = "rescaler"
    layer = "diffusion_model.input_blocks.1.1.proj_in.weight"

    def process_before_every_sampling(self, p, *args, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()
        key = next(k for k in unet.lora_patches if k[0].endswith("subj.safetensors"))
        patches = dict(unet.lora_patches[key])
        patches[self.layer] = [[e[0], e[1], 0.5, e[3], e[4]] for e in patches[self.layer]]
        unet.lora_patches[key] = patches
        p.sd_model.forge_objects.unet = unet


def test_a_patch_dynfuse_cannot_fuse_stays_with_forge_under_its_own_key(host, tmp_path):
    script, runner = dynfuse(host, method="static")
    cached_store = {}

    def during(params):
        cached_store["keys"] = list(host.sd_model.forge_objects.unet.lora_patches)

    host.script_callbacks.on_cfg_denoiser(during)
    runner = host.scripts.ScriptRunner([Rescaler(), script])
    _processed, p = host.txt2img(fh.PROMPT, runner=runner, steps=2)
    assert any(k[0].endswith("subj.safetensors" + STATIC_SUFFIX) for k in cached_store["keys"])
    assert "proj_in keeps the subject LoRA merged statically" in p.extra_generation_params[NOTE_KEY]


def test_strength_override_reaches_the_layers_left_to_forge(host):
    strengths = (0.3, 0.6)
    expected = [host.txt2img(fh.PROMPT.replace("subj:0.8", f"subj:{strength}"),
                             runner=host.scripts.ScriptRunner([Rescaler()]), steps=2)[0] for strength in strengths]
    # One after the other: the second strength must be merged anew, not served from the first merge.
    for strength, reference in zip(strengths, expected):
        script, _ = dynfuse(host, method="static", subject_strength=strength)
        fused, _ = host.txt2img(fh.PROMPT, runner=host.scripts.ScriptRunner([Rescaler(), script]), steps=2)
        tol.assert_sampled_close(fused.latents[0], reference.latents[0],
                                 fh.diffusion_model(host.sd_model), steps=2)
    cached = host.sd_model.forge_objects_after_applying_lora.unet
    key = next(k for k in cached.lora_patches if k[0].endswith("subj.safetensors"))
    assert {e[0] for entries in cached.lora_patches[key].values() for e in entries} == {0.8}  # Forge's own, as loaded


def test_norm_layer_patches_stay_with_forge_and_the_rest_is_fused(host, tmp_path, capsys):
    """LyCORIS w_norm / b_norm: 1-D diffs on GroupNorm and LayerNorm weights, which no hook can add in output
    space. Those layers keep Forge's merge; every other layer of the LoRA is still fused."""
    g = torch.Generator().manual_seed(5)
    norms = {"lora_unet_input_blocks_1_1_norm.w_norm": torch.randn(8, generator=g) * 0.1,
             "lora_unet_input_blocks_1_1_norm.b_norm": torch.randn(8, generator=g) * 0.1,
             "lora_unet_input_blocks_1_1_transformer_blocks_0_norm1.w_norm": torch.randn(8, generator=g) * 0.1}
    fh.write_lora(tmp_path / "subj.safetensors", host.sd_model, list(fh.kohya_keys())[fh.SUBJECT_KEYS], seed=1,
                  extra=norms)
    merged, _ = host.txt2img(fh.PROMPT, steps=2, enable_hr=True)
    script, runner = dynfuse(host, method="static")
    kept = {}
    host.script_callbacks.on_cfg_denoiser(lambda params: kept.update(host.sd_model.forge_objects.unet.lora_patches))
    fused, p = host.txt2img(fh.PROMPT, runner=runner, steps=2, enable_hr=True)
    out = capsys.readouterr().out
    assert "could not take over" not in out
    # One line for the two norm layers (not once per layer, nor once per pass).
    line = ("DynFuse: diffusion_model.input_blocks.1.1.norm and 1 more layers keep the subject LoRA merged statically "
            "(not a Linear or Conv2d layer: weight of shape [8])")
    assert [text for text in out.splitlines() if "merged statically" in text] == [line]
    static = next(patches for key, patches in kept.items() if key[0].endswith("subj.safetensors" + STATIC_SUFFIX))
    assert sorted(static) == ["diffusion_model.input_blocks.1.1.norm.bias", "diffusion_model.input_blocks.1.1.norm.weight",
                              "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight"]
    assert line.removeprefix("DynFuse: ") in p.extra_generation_params[NOTE_KEY]
    assert len(script.job.last_log.layers) > 0
    # Output-space deltas instead of merged weights, over two passes: equal up to fp32 rounding.
    torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=1e-3, atol=1e-3)


def test_a_tag_forge_did_not_load_turns_dynfuse_off_with_a_message(host, capsys):
    clean, _ = host.txt2img("a dog <lora:subj:0.8> <lora:nothere:1> <lora:other:0.5>", steps=2)
    _script, runner = dynfuse(host)
    processed, p = host.txt2img("a dog <lora:subj:0.8> <lora:nothere:1> <lora:other:0.5>", runner=runner, steps=2)
    assert "style 'nothere' LoRA has no UNet weights" in capsys.readouterr().out
    assert "off:" in p.extra_generation_params[NOTE_KEY]
    assert torch.equal(processed.images[0], clean.images[0])


def test_old_forge_patcher_is_refused_once_with_a_clear_message(host, capsys):
    class OldPatcher:   # ldm_patched ModelPatcher: a flat .patches dict, no lora_patches / lora_loader
        def __init__(self):
            self.patches = {}

    host.sd_model.forge_objects.unet = OldPatcher()
    adapter = ForgeAdapter()
    p = host.processing.StableDiffusionProcessingTxt2Img(prompt=fh.PROMPT)
    p.setup_prompts()
    assert adapter.begin_job(p, DynFuseSettings(enabled=True)) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "keeps its LoRAs in the ldm_patched store of old Forge and Forge Classic" in out
    assert p.extra_generation_params[NOTE_KEY] == "off: " + adapter.unsupported_reason(p)


def test_host_detection_picks_the_forge_adapter(host):
    from lib_dynfuse.hosts import detect, forge  # as imported now (other tests' fixtures re-import hosts)

    assert detect.detect_host() == detect.FORGE
    detect.reset_adapter()
    try:
        assert isinstance(detect.get_adapter(), forge.ForgeAdapter)
    finally:
        detect.reset_adapter()


def test_a_failing_takeover_gives_forge_back_every_lora(host, monkeypatch, capsys):
    from lib_dynfuse.engine import session

    clean, _ = host.txt2img(fh.PROMPT, steps=2)

    def broken_install(self):
        raise RuntimeError("no hooks today")

    monkeypatch.setattr(session.FusionSession, "install", broken_install)
    _script, runner = dynfuse(host)
    processed, p = host.txt2img(fh.PROMPT, runner=runner, steps=2)
    assert "could not take over the LoRAs: RuntimeError: no hooks today" in capsys.readouterr().out
    assert p.extra_generation_params[NOTE_KEY] == "off: could not take over the LoRAs (RuntimeError)"
    assert len(host.sd_model.forge_objects.unet.lora_patches) == 3
    assert torch.equal(processed.images[0], clean.images[0])


class WrapperScript:
    """Another extension using Forge's single model_function_wrapper slot (as MultiDiffusion does)."""

    filename = "wrapper-ext"

    def __init__(self):
        self.calls = 0

    def process_before_every_sampling(self, p, *args, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()

        def wrapper(apply_model, args):
            self.calls += 1
            return apply_model(args["input"], args["timestep"], **args["c"])

        unet.set_model_unet_function_wrapper(wrapper)
        p.sd_model.forge_objects.unet = unet


def test_an_earlier_unet_wrapper_is_chained(host):
    earlier = WrapperScript()
    script, _ = dynfuse(host)
    runner = host.scripts.ScriptRunner([earlier, script])
    host.txt2img(fh.PROMPT, runner=runner, steps=3)
    assert earlier.calls == 3
    assert script.job.host["wrapper_calls"] == [3]


def test_a_later_extension_replacing_the_wrapper_is_reported_once(host, capsys):
    merged, _ = host.txt2img(fh.PROMPT, steps=3)
    script, _ = dynfuse(host, method="static")
    later = WrapperScript()
    runner = host.scripts.ScriptRunner([script, later])
    in_calls = hooks_in_unet_calls(host)
    fused, _ = host.txt2img(fh.PROMPT, runner=runner, steps=3)
    out = capsys.readouterr().out
    assert later.calls == 3
    assert out.count("replaced Forge's UNet function wrapper") == 1
    # The hooks went on for the whole pass instead, and came off at postprocess.
    assert len(in_calls) == 3 and min(in_calls) > 0
    tol.assert_sampled_close(fused.latents[0], merged.latents[0], fh.diffusion_model(host.sd_model), steps=3)
    assert hooks_on(host.sd_model.forge_objects_original.unet.model) == 0


def test_per_pass_hooks_left_by_an_exception_go_at_the_next_job(host, monkeypatch):
    model = host.sd_model.forge_objects_original.unet.model
    script, _ = dynfuse(host)
    runner = host.scripts.ScriptRunner([script, WrapperScript()])
    with monkeypatch.context() as patch:
        fh.crash_at_step_1(host, patch, True, CONTESTED)
        with pytest.raises(RuntimeError, match="out of memory"):
            host.txt2img(fh.PROMPT, runner=runner, steps=3)
    assert hooks_on(model) > 0                        # no wrapper of ours around the call, postprocess never ran
    script.settings = DynFuseSettings(enabled=False)
    host.txt2img(fh.PROMPT, runner=runner, steps=1)
    assert hooks_on(model) == 0


def test_hooks_failing_to_go_on_in_a_unet_call_end_dynfuse_and_the_image_finishes(host, monkeypatch, capsys):
    from lib_dynfuse.engine import session

    install = session.FusionSession.install
    installs = []

    def failing_from_step_1(self):
        installs.append(1)
        if len(installs) > 2:  # the takeover's try and step 0 pass
            raise RuntimeError("no hooks today")
        install(self)

    monkeypatch.setattr(session.FusionSession, "install", failing_from_step_1)
    _script, runner = dynfuse(host)
    processed, p = host.txt2img(fh.PROMPT, runner=runner, steps=3)
    out = capsys.readouterr().out
    assert out.count("could not put the hooks on the UNet: RuntimeError: no hooks today") == 1
    assert p.extra_generation_params[NOTE_KEY] == "off: could not put the hooks on the UNet (RuntimeError)"
    assert len(processed.images) == 1 and len(installs) == 3
    assert hooks_on(host.sd_model.forge_objects_original.unet.model) == 0


def test_online_lora_mode_for_low_bit_unets(host):
    """"(fp16 LoRA)" on an fp8/nf4/gguf UNet: Forge merges LoRAs per forward instead of into the weights."""
    importlib.import_module("backend.args").dynamic_args["online_lora"] = True
    host.sd_model.forge_objects.unet.model.storage_dtype = torch.float8_e4m3fn
    original = fh.unet_weights(host.sd_model)
    merged, _ = host.txt2img(fh.PROMPT, steps=2)
    unet = host.sd_model.forge_objects.unet
    assert all(key[3] for key in unet.lora_patches)
    assert all(torch.equal(original[k], v) for k, v in fh.unet_weights(host.sd_model).items())

    _script, runner = dynfuse(host, method="static")
    online = []
    host.script_callbacks.on_cfg_denoiser(
        lambda params: online.append(hasattr(host.sd_model.forge_objects.unet.model.get_submodule(CONTESTED),
                                             "forge_online_loras")))
    fused, _ = host.txt2img(fh.PROMPT, runner=runner, steps=2)
    assert online == [True, True]             # "other" still patched online on the contested layer
    torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=1e-3, atol=1e-3)
    assert all(torch.equal(original[k], v) for k, v in fh.unet_weights(host.sd_model).items())


# ---- damaged factors: found before sampling, the LoRAs stay with Forge's merge ----------------------------------

@pytest.mark.parametrize("name,role,value,problem", fh.NON_FINITE_FACTORS)
def test_a_non_finite_factor_turns_dynfuse_off_and_forge_merges_every_lora(host, tmp_path, capsys, name, role, value,
                                                                           problem):
    line, note = fh.write_damaged(tmp_path, host.sd_model, name, role, value, problem)
    clean, _ = host.txt2img(fh.PROMPT, steps=2, enable_hr=True)
    script, runner = dynfuse(host)
    capsys.readouterr()
    processed, p = host.txt2img(fh.PROMPT, runner=runner, steps=2, enable_hr=True)
    assert fh.dynfuse_lines(capsys) == [line] and p.extra_generation_params[NOTE_KEY] == note
    assert len(host.sd_model.forge_objects.unet.lora_patches) == 3 and script.job.session is None
    assert hooks_on(host.sd_model.forge_objects_original.unet.model) == 0
    torch.testing.assert_close(processed.images[0], clean.images[0], rtol=0, atol=0, equal_nan=True)


def test_each_lora_is_checked_once_per_job(host, monkeypatch):
    """Forge takes the LoRAs over before each of its three sampling runs of a hires job; one check each."""
    from lib_dynfuse.loras import factors

    checked = []
    check = factors.check_deltas
    monkeypatch.setattr(factors, "check_deltas", lambda deltas: checked.append(1) or check(deltas))
    script, runner = dynfuse(host)
    host.txt2img(fh.PROMPT, runner=runner, steps=2, enable_hr=True)
    assert script.takeovers == 3 and len(checked) == 2
    assert [log.steps for log in script.job.logs(0)] == [[0, 1], [0, 1]]
