"""Failures inside the fake AUTOMATIC1111 host: an exception mid-sampling, an interrupt, and bad input."""

from __future__ import annotations

import os

import pytest
import torch
import tolerances as tol
from test_a1111_generation import PROMPT, write_pair


class Boom(RuntimeError):
    pass


def _explode_at(model, call: int):
    """Another extension's hook that raises on the n-th UNet call (the host does not catch it)."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) == call:
            raise Boom("sampling failed")

    return model.model.diffusion_model.out.register_forward_hook(hook)


def _after_failure(ui, dynfuse):
    """Run a job that raises mid-sampling, then a plain job; return the plain job's latents and the model."""
    import checks

    handle = _explode_at(ui.model, 2)
    with pytest.raises(Boom):
        ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=dynfuse)
    handle.remove()
    p, _ = ui.txt2img("a cat", steps=3, seed=7, dynfuse=checks.dynfuse_args(enabled=False))
    return p.fake_latents[0], checks.probe(), checks.state()


def test_exception_mid_sampling_leaves_nothing_behind(a1111):
    import checks

    ui0 = a1111(with_dynfuse=False)
    write_pair(ui0)
    ref = _after_failure(ui0, None)

    ui = a1111()
    write_pair(ui)
    handle = _explode_at(ui.model, 2)
    with pytest.raises(Boom):
        ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    handle.remove()
    assert checks.dynfuse_hooks() > 0  # postprocess was skipped, as in the real host
    latents, (out, cond), state = _after_failure(ui, checks.dynfuse_args())
    assert checks.dynfuse_hooks() == 0
    assert torch.equal(latents, ref[0])
    assert torch.equal(out, ref[1][0]) and torch.equal(cond, ref[1][1])
    checks.assert_same_state(state, ref[2])


def test_leftovers_are_removed_on_script_unload(a1111):
    import checks

    ui = a1111()
    write_pair(ui)
    handle = _explode_at(ui.model, 2)
    with pytest.raises(Boom):
        ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    handle.remove()
    model = ui.model
    ui.unload()
    assert checks.dynfuse_hooks(model) == 0


def test_interrupt_mid_way(a1111):
    import checks

    from modules import script_callbacks, shared

    def interrupt_at_step_1(params):
        if params.denoiser.step == 1:
            shared.state.interrupt()

    ui0 = a1111(with_dynfuse=False)
    write_pair(ui0)
    script_callbacks.on_cfg_denoiser(interrupt_at_step_1)
    ui0.txt2img(PROMPT, steps=4, seed=5)
    p0, _ = ui0.txt2img("a cat", steps=3, seed=7)
    ref = p0.fake_latents[0], checks.state()

    ui = a1111()
    write_pair(ui)
    script_callbacks.on_cfg_denoiser(interrupt_at_step_1)
    _p, res = ui.txt2img(PROMPT, steps=4, seed=5, dynfuse=checks.dynfuse_args())
    assert checks.dynfuse_hooks() == 0  # an interrupt ends the job normally: postprocess ran
    assert "DynFuse method: kl" in res.infotexts[0]
    p2, _ = ui.txt2img("a cat", steps=3, seed=7, dynfuse=checks.dynfuse_args(enabled=False))
    assert torch.equal(p2.fake_latents[0], ref[0])
    checks.assert_same_state(checks.state(), ref[1])


def test_skip_in_the_first_of_two_batches(a1111):
    """Skip ends batch 1 at step 1 and batch 2 runs in full. With subject-only, both batches are what the host
    gives with the subject LoRA alone and the same skip; afterwards nothing is left hooked and a plain job is
    bit-identical to the host's."""
    import checks

    from modules import script_callbacks, shared

    def start(with_dynfuse):
        ui = a1111(with_dynfuse=with_dynfuse)
        write_pair(ui, te=False, same_layers=True)
        calls = []

        def skip_batch_1_at_step_1(params):
            calls.append((params.denoiser.p.iteration, params.denoiser.step))
            if calls[-1] == (0, 1):
                shared.state.skip()

        script_callbacks.on_cfg_denoiser(skip_batch_1_at_step_1)
        return ui, calls

    expected_calls = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]  # (batch, step)
    ui0, calls0 = start(with_dynfuse=False)
    p0, _ = ui0.txt2img("a dog <lora:subj:1>", steps=4, seed=5, n_iter=2)
    assert calls0 == expected_calls
    plain0, _ = ui0.txt2img("a cat", steps=3, seed=7)
    state0 = checks.state()
    ui, calls = start(with_dynfuse=True)
    p, res = ui.txt2img(PROMPT, steps=4, seed=5, n_iter=2, dynfuse=checks.dynfuse_args(method="subject-only"))
    assert calls == expected_calls
    assert checks.dynfuse_hooks() == 0
    assert len(p.fake_latents) == 2 and all("DynFuse method: subject-only" in t for t in res.infotexts)
    for a, b in zip(p.fake_latents, p0.fake_latents):
        tol.assert_sampled_close(a, b, ui.model, steps=4)
    plain, _ = ui.txt2img("a cat", steps=3, seed=7, dynfuse=checks.dynfuse_args(enabled=False))
    assert torch.equal(plain.fake_latents[0], plain0.fake_latents[0])
    checks.assert_same_state(checks.state(), state0)


# ---- bad input: one console line, one infotext note, the generation as without DynFuse -------------------------

def _bad(a1111, capsys, prompt, *, files=None, **fields):
    import checks

    ui0 = a1111(with_dynfuse=False)
    (files or write_pair)(ui0)
    p0, _res0 = ui0.txt2img(prompt, steps=3, seed=5)
    ui = a1111()
    (files or write_pair)(ui)
    capsys.readouterr()
    p, res = ui.txt2img(prompt, steps=3, seed=5, dynfuse=checks.dynfuse_args(**fields))
    out = capsys.readouterr().out
    assert torch.equal(p.fake_latents[0], p0.fake_latents[0])
    assert checks.dynfuse_hooks() == 0
    lines = [line for line in out.splitlines() if line.startswith("DynFuse: ")]
    _only_the_note(p.extra_generation_params)
    return lines, res.infotexts[0]


def _only_the_note(params):
    """DynFuse is off: its infotext has the note, and nothing that would turn it on again when pasted."""
    assert [key for key in params if key.startswith("DynFuse ")] == ["DynFuse note"]
    assert params["DynFuse note"].startswith("off: ")


def test_tag_not_in_prompt(a1111, capsys):
    lines, text = _bad(a1111, capsys, PROMPT, style="other")
    assert lines == [("DynFuse: style LoRA 'other' is not in the prompt (tags found: subj, sty). "
                     "DynFuse is off for this generation.")]
    assert "DynFuse note: \"off: style LoRA 'other' is not in the prompt (tags found: subj, sty)\"" in text
    assert "DynFuse method" not in text


def test_only_one_lora_in_prompt(a1111, capsys):
    lines, text = _bad(a1111, capsys, "a dog <lora:subj:1>")
    assert len(lines) == 1 and lines[0].endswith("DynFuse is off for this generation.")
    assert "DynFuse note" in text


def test_same_lora_twice(a1111, capsys):
    lines, text = _bad(a1111, capsys, PROMPT, subject="subj", style="subj")
    assert lines == [("DynFuse: 'subj' is chosen as both subject and style; choose two different LoRAs. "
                     "DynFuse is off for this generation.")]
    assert "DynFuse note" in text


def _broken_file(ui):
    write_pair(ui)
    with open(os.path.join(ui.lora_dir, "broken.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")


def test_lora_file_that_fails_to_load(a1111, capsys):
    lines, text = _bad(a1111, capsys, "a dog <lora:subj:1> <lora:broken:1>", files=_broken_file)
    assert lines == [("DynFuse: LoRA 'broken' is not loaded: broken.safetensors is not a .safetensors file or is "
                      "damaged (Error while deserializing header: header too large). DynFuse is off for this "
                      "generation.")]
    assert 'DynFuse note: "off: LoRA broken not loaded"' in text
    # Pasting this infotext must not turn DynFuse on with a LoRA that cannot load.
    assert not any(f"DynFuse {key}:" in text for key in ("method", "subject", "style", "version", "selection"))


def _foreign_file(ui):
    import loras
    import safetensors.torch

    write_pair(ui)
    # SDXL-style keys of a block the SD1.5 UNet does not have: the host loads it with no modules.
    sd = {"lora_unet_output_blocks_8_1_transformer_blocks_9_attn1_to_q.lora_down.weight": torch.ones(2, 8),
          "lora_unet_output_blocks_8_1_transformer_blocks_9_attn1_to_q.lora_up.weight": torch.ones(8, 2)}
    safetensors.torch.save_file(sd, os.path.join(ui.lora_dir, "xl.safetensors"))
    assert loras  # imported for the fixture's module bookkeeping


def test_lora_that_does_not_fit_the_model(a1111, capsys):
    lines, text = _bad(a1111, capsys, "a dog <lora:subj:1> <lora:xl:1>", files=_foreign_file)
    assert lines == [("DynFuse: LoRA 'xl' has no layers that fit this model's UNet (is it made for another model "
                     "family?). DynFuse is off for this generation.")]
    assert 'DynFuse note: "off: LoRA xl does not fit the UNet"' in text


def _sdxl_file(misfits_only):
    def files(ui):
        import loras

        write_pair(ui)
        files.misfits = loras.write_sdxl_lora(os.path.join(ui.lora_dir, "xl.safetensors"), ui.model,
                                              misfits_only=misfits_only, seed=4)

    return files


def test_sdxl_lora_whose_layers_all_have_other_shapes(a1111, capsys):
    """Names an SD1.5 model has too, shapes it does not: the host skips every layer, so does DynFuse."""
    files = _sdxl_file(misfits_only=True)
    lines, text = _bad(a1111, capsys, "a dog <lora:subj:1> <lora:xl:1>", files=files)
    assert len(files.misfits) == 2
    assert lines == [("DynFuse: LoRA 'xl' has no layers that fit this model's UNet: xl.safetensors is made for SDXL "
                      "and this model is SD1.5. DynFuse is off for this generation.")]
    assert 'DynFuse note: "off: LoRA xl does not fit the UNet"' in text


def _against_host(a1111, capsys, files, prompt, **fields):
    """The host alone, then DynFuse (scores off: without reference images they would add a line of their own) on
    the same files and prompt: both latents, DynFuse's infotext and its console lines."""
    import checks

    ui0 = a1111(with_dynfuse=False)
    files(ui0)
    p0, _ = ui0.txt2img(prompt, steps=3, seed=5)
    ui = a1111()
    files(ui)
    from modules import shared

    shared.opts.set("dynfuse_scores", False)
    capsys.readouterr()
    p, res = ui.txt2img(prompt, steps=3, seed=5, dynfuse=checks.dynfuse_args(**fields))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse: ")]
    return p0.fake_latents[0], p.fake_latents[0], res.infotexts[0], lines


def test_sdxl_lora_with_some_layers_of_other_shapes(a1111, capsys):
    """The layers that do not fit are left out, as the host leaves them out; the rest is fused."""
    import checks

    files = _sdxl_file(misfits_only=False)
    host, ours, text, lines = _against_host(a1111, capsys, files, "a dog <lora:subj:1> <lora:xl:0.8>",
                                            method="static", style="xl")
    first = files.misfits[0]
    assert lines == [(f"DynFuse: 2 of the 18 UNet layers of LoRA 'xl' do not fit this model (first: {first}, "
                      "LoRA 8x32, model 8x12); they are left out, as the host leaves them out.")]
    assert 'DynFuse note: "LoRA xl: 2 layers do not fit"' in text
    assert "DynFuse method: static" in text
    tol.assert_sampled_close(ours, host, checks.current_model(), steps=3)
    assert checks.dynfuse_hooks() == 0


@pytest.mark.parametrize("kind", ["lora", "diff"])
def test_inpainting_models_first_conv_gets_the_update_the_host_merges(a1111, kind):
    """An inpainting model's first conv reads 9 channels; an SD1.5 LoRA's update has 4, which the host zero-pads."""
    a1111()
    import network
    import network_full
    import network_lora
    import networks

    from lib_dynfuse.engine.deltas import LayerGeometry
    from lib_dynfuse.hosts import a1111 as adapter

    conv = torch.nn.Conv2d(9, 8, 3, padding=1)
    conv.network_layer_name = "diffusion_model_input_blocks_0_0"
    g = torch.Generator().manual_seed(0)
    if kind == "lora":
        w = {"lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
             "lora_up.weight": torch.randn(8, 2, 1, 1, generator=g), "alpha": torch.tensor(1.0)}
        module_type = network_lora.NetworkModuleLora
    else:
        w = {"diff": torch.randn(8, 4, 3, 3, generator=g)}
        module_type = network_full.NetworkModuleFull
    net = network.Network("inpaint", None)
    module = module_type(net, network.NetworkWeights("lora_unet_conv_in", conv.network_layer_name, w, conv))
    net.modules[conv.network_layer_name] = module
    x = torch.randn(1, 9, 8, 8, generator=g)
    with torch.no_grad():
        base = conv(x)
        networks.loaded_networks[:] = [net]
        merged = conv(x)  # the host's merge
        networks.loaded_networks.clear()
        delta = adapter._delta(module, conv, None)
        tol.assert_reordered_close(base + delta.output(x, LayerGeometry.of(conv)), merged,
                                   terms=conv.weight[0].numel(), depth=2)


def test_invalid_setting_from_the_ui(a1111, capsys):
    lines, text = _bad(a1111, capsys, PROMPT, guidance_start=0.8, guidance_end=0.3)
    assert len(lines) == 1 and "guidance_start (0.8) must be before guidance_end (0.3)" in lines[0]
    assert "DynFuse note" in text


def test_lora_extension_disabled(a1111, capsys):
    import checks

    ui = a1111(with_lora=False)
    capsys.readouterr()
    _p, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse: ")]
    assert lines == [("DynFuse: the built-in Lora extension is not loaded (it is disabled, or the WebUI runs with "
                     "--disable-all-extensions); DynFuse needs it to load LoRA files. DynFuse is off for this "
                     "generation.")]
    assert "DynFuse note" in res.infotexts[0]


def test_no_shared_layers_only_warns(a1111, capsys):
    import checks
    import loras

    def disjoint(ui):
        keys = loras.attention_keys()
        loras.write_lora(os.path.join(ui.lora_dir, "subj.safetensors"), ui.model, keys[:8], seed=1, te=False)
        loras.write_lora(os.path.join(ui.lora_dir, "sty.safetensors"), ui.model, keys[8:], seed=2, te=False)

    host, ours, text, lines = _against_host(a1111, capsys, disjoint, PROMPT)
    assert lines == [("DynFuse: 'subj' and 'sty' share no UNet layer: each layer gets its own LoRA, as without "
                     "DynFuse.")]
    assert "DynFuse note: no shared layers" in text and "DynFuse method: kl" in text
    tol.assert_sampled_close(ours, host, checks.current_model(), steps=3)


# ---- damaged factors: found before sampling, the LoRAs stay with the host's merge -------------------------------

TO_Q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TO_V = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"  # the first layer both LoRAs touch
CONV1 = "down_blocks_0_resnets_0_conv1"  # a 3x3 conv only the style LoRA touches


def _damaged(name, damage):
    """write_pair, then ``damage(tensors)`` edits LoRA ``name``'s tensors in place before it is written back."""
    def files(ui):
        import safetensors.torch

        write_pair(ui)
        path = os.path.join(ui.lora_dir, f"{name}.safetensors")
        tensors = safetensors.torch.load_file(path)
        damage(tensors)
        safetensors.torch.save_file(tensors, path)

    return files


def _nan_up(tensors):
    tensors[f"lora_unet_{TO_Q}.lora_up.weight"][1, 0] = float("nan")


def _inf_down(tensors):
    tensors[f"lora_unet_{TO_V}.lora_down.weight"][:] = float("inf")


def _rank_3_up(tensors):
    up = tensors[f"lora_unet_{TO_Q}.lora_up.weight"]
    tensors[f"lora_unet_{TO_Q}.lora_up.weight"] = torch.randn(up.shape[0], 3)


def _locon_mid_of_other_rank(tensors):
    """A LoCon layer: 1x1 down and up of rank 2 around a mid factor of rank 3."""
    down = tensors[f"lora_unet_{CONV1}.lora_down.weight"]
    tensors[f"lora_unet_{CONV1}.lora_down.weight"] = down[:, :, :1, :1].contiguous()
    tensors[f"lora_unet_{CONV1}.lora_mid.weight"] = torch.randn(3, 3, 3, 3)


def _host_layer(kohya_key):
    import loras

    return {r["kohya_key"]: r["a1111_layer_name"] for r in loras.unet_rows()}[kohya_key]


def _damaged_line(name, layer, problem):
    return (f"DynFuse: LoRA '{name}' has a damaged layer (layer {layer}: {problem}). DynFuse is off for this "
            "generation and leaves the LoRAs to the WebUI.")


@pytest.mark.parametrize("name,damage,layer,problem", [
    ("subj", _rank_3_up, TO_Q, "mismatched factors: down factor [2, 8] has rank 2, up factor [8, 3] has rank 3"),
    ("sty", _locon_mid_of_other_rank, CONV1, "mismatched factors: mid factor has shape [3, 3, 3, 3]; between "
     "factors of rank 2 it is [2, 2, kernel height, kernel width]"),
])
def test_mismatched_factors_turn_dynfuse_off_and_the_host_merges_what_it_can(a1111, capsys, name, damage, layer,
                                                                             problem):
    """The host's merge skips a layer whose factors cannot be multiplied and merges the rest: the same image."""
    lines, text = _bad(a1111, capsys, PROMPT, files=_damaged(name, damage))
    host_layer = _host_layer(f"lora_unet_{layer}")
    assert lines == [_damaged_line(name, host_layer, problem)]
    assert f'DynFuse note: "off: LoRA {name} has mismatched factors in layer {host_layer}"' in text
    assert "DynFuse selection" not in text


@pytest.mark.parametrize("name,damage,layer,problem", [
    ("subj", _nan_up, TO_Q, "up factor holds 1 NaN value (of 16)"),
    ("sty", _inf_down, TO_V, "down factor holds 16 infinite values (of 16)"),
])
def test_non_finite_factors_turn_dynfuse_off_and_the_host_meets_them_as_without_it(a1111, capsys, name, damage,
                                                                                  layer, problem):
    """The host merges the LoRAs and stops at its NaN check, with DynFuse as without it; nothing is left behind."""
    import checks

    from modules import devices, processing

    files = _damaged(name, damage)
    ui0 = a1111(with_dynfuse=False)
    files(ui0)
    with pytest.raises(devices.NansException):
        ui0.txt2img(PROMPT, steps=3, seed=5)
    ui = a1111()
    files(ui)
    capsys.readouterr()
    p = ui.make_p(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    with pytest.raises(devices.NansException):
        processing.process_images(p)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse")]
    host_layer = _host_layer(f"lora_unet_{layer}")
    assert lines == [_damaged_line(name, host_layer, problem)]
    assert p.extra_generation_params["DynFuse note"] == f"off: LoRA {name} has non-finite values in layer {host_layer}"
    _only_the_note(p.extra_generation_params)
    import networks

    assert [net.name for net in networks.loaded_networks] == ["subj", "sty"]  # as the host activated them
    assert checks.dynfuse_hooks() == 0


def test_a_layer_without_its_up_factor_is_refused_by_the_host_itself(a1111, capsys):
    """The host turns the whole file away; DynFuse says that it is not loaded, and the host merges the other."""
    lines, text = _bad(a1111, capsys, PROMPT, files=_damaged("subj", lambda t: t.pop(f"lora_unet_{TO_Q}.lora_up.weight")))
    assert lines == [(f"DynFuse: LoRA 'subj' is not loaded: subj.safetensors has missing or damaged factors (layer "
                      f"lora_unet_{TO_Q}: lora_down.weight without its up factor; the file is damaged). DynFuse is "
                      "off for this generation.")]
    assert 'DynFuse note: "off: LoRA subj not loaded"' in text


def test_each_lora_is_checked_once_per_job(a1111, monkeypatch):
    """Every batch and the hires pass take the LoRAs over again; their factors are checked at the first."""
    import checks

    from lib_dynfuse.loras import factors

    ui = a1111()
    write_pair(ui)
    checked = []
    check = factors.check_deltas
    monkeypatch.setattr(factors, "check_deltas", lambda deltas: checked.append(1) or check(deltas))
    _p, res = ui.txt2img(PROMPT, steps=2, seed=5, n_iter=2, enable_hr=True, dynfuse=checks.dynfuse_args())
    assert "DynFuse selection" in res.infotexts[0] and len(checked) == 2
    ui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args())
    assert len(checked) == 4  # a new job checks again


def test_a_takeover_that_fails_turns_dynfuse_off_with_the_note_alone(a1111, capsys, monkeypatch):
    from lib_dynfuse.hosts import a1111 as adapter

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter.A1111Adapter, "_targets", broken)
    lines, text = _bad(a1111, capsys, PROMPT)
    assert lines == ["DynFuse: could not take over the LoRAs: RuntimeError: boom. The generation continues without "
                     "DynFuse."]
    assert 'DynFuse note: "off: could not take over the LoRAs (RuntimeError)"' in text
