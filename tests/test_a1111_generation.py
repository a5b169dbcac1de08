"""DynFuse inside the fake AUTOMATIC1111 1.10.1 host, end to end on the tiny SD1.5-shaped model."""

from __future__ import annotations

import os
import re

import pytest
import torch
import tolerances as tol

PROMPT = "a dog <lora:subj:1> <lora:sty:0.8>"


def write_pair(ui, *, te=True, third=False, same_layers=False):
    import loras

    keys = loras.attention_keys()
    loras.write_lora(os.path.join(ui.lora_dir, "subj.safetensors"), ui.model, keys, seed=1, te=te)
    # Unless asked otherwise, the style LoRA also touches the convs, which the subject leaves alone (such layers
    # always get their one LoRA).
    convs = [r["kohya_key"] for r in loras.unet_rows() if r["kind"] == "Conv2d"]
    style_keys = keys if same_layers else keys[2:] + convs
    loras.write_lora(os.path.join(ui.lora_dir, "sty.safetensors"), ui.model, style_keys, seed=2, te=te)
    if third:
        loras.write_lora(os.path.join(ui.lora_dir, "third.safetensors"), ui.model, keys[:6] + convs[:2], seed=3,
                         te=te)


def run_without_extension(a1111, prompt, *, te=True, third=False, **kwargs):
    ui = a1111(with_dynfuse=False)
    write_pair(ui, te=te, third=third)
    p, res = ui.txt2img(prompt, steps=3, seed=5, **kwargs)
    return ui, p, res


def test_dynfuse_on_fuses_reports_and_leaves_the_model_as_the_host_would(a1111):
    import checks

    _ui0, p0, _res0 = run_without_extension(a1111, PROMPT)
    after0 = checks.probe()
    state0 = checks.state()

    ui = a1111()
    write_pair(ui)
    p, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    from lib_dynfuse.hosts import detect

    job = detect.get_adapter().last_job
    assert job is not None and not job.failed and len(job.last_log) > 0
    assert {d.winner for d in job.last_log.decisions()} <= {"subject", "style"}
    assert not torch.allclose(p.fake_latents[0], p0.fake_latents[0], atol=1e-3)
    text = res.infotexts[0]
    for key in ("DynFuse method: kl", 'DynFuse subject: "subj:1"', 'DynFuse style: "sty:0.8"',
                "DynFuse version: 0.1.0", "DynFuse selection: subject "):
        assert key in text
    assert checks.dynfuse_hooks() == 0
    # The host gets its activated list back: the next forward merges exactly what it would have merged.
    out, cond = checks.probe()
    assert torch.equal(out, after0[0]) and torch.equal(cond, after0[1])
    checks.assert_same_state(checks.state(), state0)


def test_unet_weights_are_never_written(a1111):
    import checks

    from modules import sd_models

    ui = a1111()
    write_pair(ui, te=False)
    pristine = checks.state(sd_models.build_model())
    ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    checks.assert_same_state(checks.state(), pristine)


def test_off_is_bit_identical_to_no_extension(a1111):
    import checks

    _, p0, res0 = run_without_extension(a1111, PROMPT)
    ui = a1111()
    write_pair(ui)
    p, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(enabled=False))
    assert torch.equal(p.fake_latents[0], p0.fake_latents[0])
    assert res.infotexts == res0.infotexts
    assert "DynFuse" not in res.infotexts[0]


@pytest.mark.parametrize("functional", [False, True])
def test_static_method_matches_the_host_merge_and_keeps_other_loras(a1111, functional):
    import checks

    from modules import shared

    prompt = PROMPT + " <lora:third:0.7>"
    shared.opts.lora_functional = functional
    try:
        _, p0, _ = run_without_extension(a1111, prompt, third=True)
        ui = a1111()
        write_pair(ui, third=True)
        p, res = ui.txt2img(prompt, steps=3, seed=5, dynfuse=checks.dynfuse_args(method="static"))
    finally:
        shared.opts.lora_functional = False
    assert "DynFuse method: static" in res.infotexts[0]
    tol.assert_sampled_close(p.fake_latents[0], p0.fake_latents[0], ui.model, steps=3)


def test_third_lora_is_merged_exactly_as_without_the_extension(a1111):
    import checks

    # The host alone, with only the third LoRA: its merged weights are the reference.
    ui0 = a1111(with_dynfuse=False)
    write_pair(ui0, te=False, third=True)
    ui0.txt2img("a dog <lora:third:0.7>", steps=3, seed=5)
    reference = checks.state()

    ui = a1111()
    write_pair(ui, te=False, third=True)
    ui.txt2img(PROMPT + " <lora:third:0.7>", steps=3, seed=5, dynfuse=checks.dynfuse_args())
    # Right after the job (no forward since): only the third LoRA was ever merged into the UNet.
    checks.assert_same_state(checks.state(), reference)


def _check_subject_only(a1111, prompt_pair, prompt_subject, **kwargs):
    """subject-only through DynFuse ~ the host with the subject LoRA alone (LoRAs without a text-encoder half)."""
    import checks

    ui0 = a1111(with_dynfuse=False)
    write_pair(ui0, te=False, same_layers=True)
    p0, _res0 = ui0.txt2img(prompt_subject, steps=3, seed=5, **kwargs)
    ui = a1111()
    write_pair(ui, te=False, same_layers=True)
    p, res = ui.txt2img(prompt_pair, steps=3, seed=5, dynfuse=checks.dynfuse_args(method="subject-only"), **kwargs)
    assert len(p.fake_latents) == len(p0.fake_latents)
    for a, b in zip(p.fake_latents, p0.fake_latents):
        tol.assert_sampled_close(a, b, ui.model, steps=3)
    return p, res


def test_batch_size_and_count(a1111):
    _p, res = _check_subject_only(a1111, PROMPT, "a dog <lora:subj:1>", batch_size=2, n_iter=2)
    assert len(res.infotexts) == 4 and all("DynFuse method: subject-only" in t for t in res.infotexts)
    from lib_dynfuse.hosts import detect

    log = detect.get_adapter().last_job.last_log
    assert {d.unit for d in log.decisions()} == {0, 1}


def test_hires_second_pass_is_fused_too(a1111):
    from lib_dynfuse.hosts import detect

    p, res = _check_subject_only(a1111, PROMPT, "a dog <lora:subj:1>", enable_hr=True, hr_scale=2.0,
                                 hr_second_pass_steps=2, denoising_strength=0.6)
    assert p.fake_latents[0].shape[-1] == 16
    assert "Hires upscale: 2.0" in res.infotexts[0] and "DynFuse method: subject-only" in res.infotexts[0]
    assert detect.get_adapter().last_job.last_log.steps  # the hires session decided too


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_timestep_samplers_and_and_prompts(a1111, sampler):
    _check_subject_only(a1111, "a dog AND a cat:0.5 <lora:subj:1> <lora:sty:0.8>",
                        "a dog AND a cat:0.5 <lora:subj:1>", sampler_name=sampler)


@pytest.mark.parametrize(("sampler", "steps_of_calls"), [
    ("DDIM", [0, 1, 2, 3]),
    # PLMS's first step evaluates the model a second time, at the next step's timestep: that call is step 1
    ("PLMS", [0, 1, 1, 2, 3]),
    ("UniPC", [0, 1, 2, 3, 4]),
])
def test_timestep_samplers_step_clock_is_the_timesteps_step(a1111, sampler, steps_of_calls):
    import checks

    from lib_dynfuse.hosts import detect
    from modules import script_callbacks

    ui = a1111()
    write_pair(ui)
    calls = []  # registered after DynFuse's own callback: sees the clock it set for this call
    script_callbacks.on_cfg_denoiser(lambda params: calls.append((float(params.sigma[0]),
                                                                   detect.get_adapter().job.host["clock"])))
    ui.txt2img(PROMPT, steps=5, seed=5, sampler_name=sampler, dynfuse=checks.dynfuse_args())
    assert [clock.index for _, clock in calls] == steps_of_calls
    assert {clock.total for _, clock in calls} == {5}
    timesteps = [t for t, _ in calls]
    assert timesteps == sorted(timesteps, reverse=True)
    assert detect.get_adapter().last_job.last_log.steps == sorted(set(steps_of_calls))


def test_kl_with_and_prompts_decides_per_image(a1111):
    import checks

    from lib_dynfuse.hosts import detect

    ui = a1111()
    write_pair(ui)
    _p, res = ui.txt2img("a dog AND a cat " + PROMPT[6:], steps=3, seed=5, batch_size=2,
                        dynfuse=checks.dynfuse_args())
    log = detect.get_adapter().last_job.last_log
    assert {d.unit for d in log.decisions()} == {0, 1}
    assert "DynFuse selection" in res.infotexts[1]


@pytest.mark.parametrize("sampler", ["Euler", "UniPC"])
def test_img2img(a1111, sampler):
    import checks
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 40, 90))
    ui0 = a1111(with_dynfuse=False)
    write_pair(ui0, te=False, same_layers=True)
    p0, _ = ui0.img2img("a dog <lora:subj:1>", image, steps=4, seed=5, denoising_strength=0.5, sampler_name=sampler)
    ui = a1111()
    write_pair(ui, te=False, same_layers=True)
    p, res = ui.img2img(PROMPT, image, steps=4, seed=5, denoising_strength=0.5, sampler_name=sampler,
                        dynfuse=checks.dynfuse_args(method="subject-only"))
    tol.assert_sampled_close(p.fake_latents[0], p0.fake_latents[0], ui.model, steps=4)
    assert "DynFuse method: subject-only" in res.infotexts[0]


def test_selection_map_is_added_to_the_outputs(a1111):
    import checks

    ui = a1111()
    write_pair(ui)
    _, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(show_map=True))
    assert len(res.images) == 2 and res.images[1].size != res.images[0].size
    assert len(res.infotexts) == 2


def _opened_sessions(monkeypatch) -> list:
    """Every FusionSession a job opens, in order: one per sampling run (a batch's first pass, its hires pass)."""
    from lib_dynfuse.engine import session

    opened = []
    init = session.FusionSession.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(session.FusionSession, "__init__", recording_init)
    return opened


def _share(*logs, image=None) -> str:
    weights = [d.subject_weight for log in logs for d in log.decisions() if image is None or d.unit == image]
    return f"subject {sum(weights) / len(weights):.2f}"


def test_selection_and_map_cover_every_pass_of_each_image(a1111, monkeypatch):
    """Hires fix and two batches of two: an image's selection is the share of its own decisions over its batch's
    first pass and hires pass; one map per image, the hires steps after the first pass's."""
    import checks

    from lib_dynfuse import report

    sessions = _opened_sessions(monkeypatch)
    ui = a1111()
    write_pair(ui)
    _, res = ui.txt2img(PROMPT, steps=3, seed=5, batch_size=2, n_iter=2, enable_hr=True, hr_scale=2.0,
                        hr_second_pass_steps=2, denoising_strength=0.6, dynfuse=checks.dynfuse_args(show_map=True))
    assert len(sessions) == 4 and len(res.images) == 8 and len(res.infotexts) == 8
    shares = []
    for batch in (0, 1):
        first, hires = sessions[2 * batch].log, sessions[2 * batch + 1].log
        assert first.steps == [0, 1, 2] and hires.steps == [0, 1]
        for in_batch in (0, 1):
            image = 2 * batch + in_batch
            shares.append(_share(first, hires, image=in_batch))
            assert f"DynFuse selection: {shares[-1]}," in res.infotexts[image]
            expected = report.selection_map([first, hires], title=f"image {image + 1}: ", image=in_batch)
            assert res.images[4 + image].tobytes() == expected.tobytes()
            assert res.infotexts[4 + image] == res.infotexts[image]
    assert len(set(shares)) > 1  # each image its own
    assert _share(sessions[3].log) != _share(sessions[2].log, sessions[3].log)  # the hires pass alone differs


def test_strength_override_and_full_weight_lora(a1111):
    """static at a strength override ~ the host with that tag weight; a LyCORIS "diff" layer goes the dense way."""
    import checks
    import loras

    def files(ui):
        keys = loras.attention_keys()
        loras.write_lora(os.path.join(ui.lora_dir, "subj.safetensors"), ui.model, keys, seed=1, te=False)
        loras.write_lora(os.path.join(ui.lora_dir, "sty.safetensors"), ui.model, keys, seed=2, te=False,
                         full_keys=keys[:3])

    ui0 = a1111(with_dynfuse=False)
    files(ui0)
    p0, _ = ui0.txt2img("a dog <lora:subj:0.4> <lora:sty:0.8>", steps=3, seed=5)
    ui = a1111()
    files(ui)
    p, _ = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(method="static", subject_strength=0.4))
    tol.assert_sampled_close(p.fake_latents[0], p0.fake_latents[0], ui.model, steps=3)


def test_taken_loras_are_not_read_from_disk_again(a1111, monkeypatch):
    import checks

    ui = a1111()
    import networks  # in sys.modules once the Lora script has loaded, as in the host

    write_pair(ui)
    reads = []
    original = networks.load_network
    monkeypatch.setattr(networks, "load_network", lambda name, on_disk: reads.append(name) or original(name, on_disk))
    ui.txt2img(PROMPT, steps=2, seed=5, n_iter=3, dynfuse=checks.dynfuse_args())
    assert sorted(reads) == ["sty", "subj"]  # once each, although lora_in_memory_limit is 0


def _kl_decisions(a1111, prompt, **kwargs):
    """A kl run of two images: its latents, each (layer, step, image)'s winner, the selection text, the weights and
    the model."""
    import checks

    from lib_dynfuse.hosts import detect

    ui = a1111()
    write_pair(ui)
    p, res = ui.txt2img(prompt, steps=3, seed=5, batch_size=2, dynfuse=checks.dynfuse_args(), **kwargs)
    log = detect.get_adapter().last_job.last_log
    winners = {(d.layer, d.step, d.unit): d.winner for d in log.decisions()}
    selection = [line for line in res.infotexts[0].split(", ") if line.startswith("DynFuse selection")]
    return p.fake_latents[0], winners, selection, checks.state(), ui.model


@pytest.mark.parametrize("prompt", [PROMPT, "a dog AND a cat " + PROMPT[6:]])
def test_cond_and_uncond_in_separate_calls_decide_as_in_one(a1111, prompt):
    """With batch_cond_uncond off the host runs cond and uncond rows in separate UNet calls: each image's cond row
    still decides for all its rows, so the result is the one of the joined call."""
    import checks

    joined = _kl_decisions(a1111, prompt)
    split = _kl_decisions(a1111, prompt, override_settings={"batch_cond_uncond": False})
    assert split[1] == joined[1] and {unit for *_, unit in split[1]} == {0, 1}
    assert split[2] == joined[2]
    # float32 GEMMs round differently at other batch sizes: close, not equal
    tol.assert_sampled_close(split[0], joined[0], joined[4], steps=3)
    checks.assert_same_state(split[3], joined[3])


def test_a_prompt_longer_than_the_negative_prompt_decides_as_in_one_call(a1111):
    """A prompt of two token chunks and a one-chunk negative prompt: the host runs the cond rows, then the uncond
    rows. At CFG scale 1 the uncond rows do not move the latents, so a joined run (a negative prompt of two chunks
    as well) must give the same decisions and latents."""
    import checks

    long_prompt = "a dog on a green hill under a blue sky at noon " + PROMPT[6:]
    joined = _kl_decisions(a1111, long_prompt, cfg_scale=1.0, negative_prompt="blurry " * 9)
    split = _kl_decisions(a1111, long_prompt, cfg_scale=1.0, negative_prompt="blurry")
    assert split[1] == joined[1] and {unit for *_, unit in split[1]} == {0, 1}
    assert split[2] == joined[2]
    tol.assert_sampled_close(split[0], joined[0], joined[4], steps=3)
    checks.assert_same_state(split[3], joined[3])


def _norm_files(ui):
    """The pair, the subject with LyCORIS w_norm / b_norm on a GroupNorm and a LayerNorm of the UNet as well."""
    import loras

    write_pair(ui)
    g = torch.Generator().manual_seed(7)
    norms = {f"lora_unet_input_blocks_1_1_{layer}.{part}": torch.randn(8, generator=g) * 0.1
             for layer in ("norm", "transformer_blocks_0_norm1") for part in ("w_norm", "b_norm")}
    loras.write_lora(os.path.join(ui.lora_dir, "subj.safetensors"), ui.model, loras.attention_keys(), seed=1,
                     extra=norms)


NORM_LAYERS = ("input_blocks.1.1.norm", "input_blocks.1.1.transformer_blocks.0.norm1")


def _norm_weights_in_sampling(ui, prompt, **kwargs):
    """Run a job; the weight and bias the two norm layers had at each of their calls."""
    unet = ui.model.model.diffusion_model
    seen = []
    handles = [unet.get_submodule(name).register_forward_hook(
        lambda module, _inputs, _output: seen.append((module.weight.clone(), module.bias.clone())))
        for name in NORM_LAYERS]
    try:
        p, res = ui.txt2img(prompt, steps=3, seed=5, n_iter=2, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return p, res, seen


@pytest.mark.parametrize("override", [None, 0.4])
def test_norm_layers_keep_the_hosts_merge_and_the_rest_is_fused(a1111, capsys, override):
    """LyCORIS w_norm / b_norm: 1-D diffs on GroupNorm and LayerNorm weights, which no hook can add in output
    space. Those layers keep the host's merge (at the strength override, if one is set); every other layer of the
    LoRA is still fused."""
    import checks

    ui0 = a1111(with_dynfuse=False)
    _norm_files(ui0)
    _p0, _res0, host = _norm_weights_in_sampling(ui0, PROMPT)
    checks.probe()
    state0 = checks.state()
    if override is not None:
        _p0, _res0, host = _norm_weights_in_sampling(ui0, PROMPT.replace("subj:1", f"subj:{override}"))

    ui = a1111()
    _norm_files(ui)
    capsys.readouterr()
    _p, res, ours = _norm_weights_in_sampling(ui, PROMPT, dynfuse=checks.dynfuse_args(subject_strength=override))
    out = capsys.readouterr().out
    from lib_dynfuse.hosts import detect

    job = detect.get_adapter().last_job
    assert not job.failed and "could not take over" not in out
    assert {d.winner for d in job.last_log.decisions()} == {"subject", "style"}
    assert not {name.replace(".", "_") for name in NORM_LAYERS} & set(job.last_log.layers)
    note = ("diffusion_model_input_blocks_1_1_norm and 1 more layers keep the subject LoRA merged statically "
            "(not a Linear or Conv2d layer: weight of shape [8])")
    assert [line for line in out.splitlines() if "merged statically" in line] == [f"DynFuse: {note}"]  # once a job
    assert note in res.infotexts[0] and note in res.infotexts[1]
    # The host's merge, bit for bit, at every call of both batches.
    assert len(ours) == len(host) > 0
    for (w, b), (w0, b0) in zip(ours, host):
        assert torch.equal(w, w0) and torch.equal(b, b0)
    assert not torch.equal(ours[0][0], ui.model.model.diffusion_model.input_blocks[1][1].norm.network_weights_backup)
    checks.probe()
    checks.assert_same_state(checks.state(), state0)


@pytest.mark.parametrize(("style_tag", "style_rank"), [("sty:0.8", 2), ("sty:0.8:dyn=1", 1)])
def test_k_lora_takes_a_loha_layers_rank_from_the_host(a1111, klora_ranks, style_tag, style_rank):
    """K = r_subject·r_style: a LoHa layer's dense delta carries the rank the host gives it (hada_w1_b's rows),
    not the bound of the matrix; a LoRA with a dyn-dim tag (rebuilt densely) has the cut rank."""
    import checks
    import loras

    ui = a1111()
    keys = loras.attention_keys()
    loras.write_lora(os.path.join(ui.lora_dir, "subj.safetensors"), ui.model, keys, rank=3, seed=1, te=False,
                     loha_keys=keys[:4])
    loras.write_lora(os.path.join(ui.lora_dir, "sty.safetensors"), ui.model, keys, rank=2, seed=2, te=False)
    ui.txt2img(PROMPT.replace("sty:0.8", style_tag), steps=3, seed=5, dynfuse=checks.dynfuse_args(method="k-lora"))
    loha = {row["a1111_layer_name"] for row in loras.unet_rows() if row["kohya_key"] in keys[:4]}
    assert loha < klora_ranks.keys()
    assert set(klora_ranks.values()) == {(3, style_rank)}


def test_kl_soft_chooses_between_loras_of_different_strength(a1111):
    """The style at four times the subject's weight: kl-soft gives it most of each blend, not half."""
    import checks

    from lib_dynfuse.hosts import detect

    ui = a1111()
    write_pair(ui, same_layers=True)
    _, res = ui.txt2img("a dog <lora:subj:0.25> <lora:sty:1>", steps=3, seed=5, batch_size=2,
                        dynfuse=checks.dynfuse_args(method="kl-soft"))
    weights = torch.tensor([d.subject_weight for d in detect.get_adapter().last_job.last_log.decisions()])
    assert float((weights - 0.5).abs().mean()) > 0.2, weights
    assert float(re.search(r"DynFuse selection: subject (\d\.\d\d)", res.infotexts[0])[1]) < 0.3
