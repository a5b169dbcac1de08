"""Guidance wired into the fake A1111 host's CFG callbacks (random-weight CLIP / DINO stand-ins)."""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch
from PIL import Image
from test_a1111_generation import PROMPT, run_without_extension, write_pair

pytest.importorskip("open_clip")
pytest.importorskip("timm")

REFS = {"subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
        "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
GUIDED = {"guidance": True, "guidance_strength": 0.5, "guidance_start": 0.0, "guidance_end": 1.0}
SCORES = re.compile(r'DynFuse scores: "subject-DINO -?\d\.\d{3}, style-CLIP -?\d\.\d{3}, clip-T -?\d\.\d{3}"')


@pytest.fixture
def tiny_encoders(a1111):
    from conftest_guidance import CPU, TINY

    from lib_dynfuse.guidance import scorers

    def start(**kwargs):
        ui = a1111(**kwargs)
        from lib_dynfuse.hosts import a1111 as adapter
        from modules import shared

        adapter.A1111Adapter.guidance_factories = dict(TINY)
        shared.opts.set("dynfuse_device", CPU.device)
        shared.opts.set("dynfuse_precision", CPU.precision)
        return ui

    yield start
    scorers.unload()


def last_job():
    from lib_dynfuse.hosts import detect

    return detect.get_adapter().last_job


def dynfuse_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse")]


def note(infotext: str) -> str | None:
    from modules import infotext_utils

    return infotext_utils.parse_generation_parameters(infotext).get("DynFuse note")


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("sampler", "steps"), [("Euler", [0, 1, 2, 3]), ("DDIM", [0, 1, 2])])
def test_guidance_moves_the_sample_and_plots_its_loss(tiny_encoders, sampler, steps):
    import checks

    ui = tiny_encoders()
    write_pair(ui)
    common = {"steps": 4, "seed": 5, "sampler_name": sampler}
    p0, _ = ui.txt2img(PROMPT, dynfuse=checks.dynfuse_args(**REFS), **common)
    p1, res = ui.txt2img(PROMPT, dynfuse=checks.dynfuse_args(show_loss_plot=True, **GUIDED, **REFS), **common)
    assert not torch.allclose(p0.fake_latents[0], p1.fake_latents[0])
    assert torch.isfinite(p1.fake_latents[0]).all()
    assert len(res.images) == 2  # the image and the loss plot
    job = last_job()
    assert job.guidance is None and [step for step, _ in job.guided.losses] == steps  # (this DDIM skips t = 0)


def test_ddim_guidance_returns_the_epsilon_of_the_corrected_x0(tiny_encoders, monkeypatch):
    """DDIM works in epsilon space: the eps handed back must imply, with the sampler's own x_t and ᾱ, exactly
    the x0 that Guidance.correct produced."""
    import checks

    from lib_dynfuse.guidance import Guidance
    from modules import script_callbacks, shared

    ui = tiny_encoders()
    write_pair(ui)
    corrected, inputs, outputs = [], [], []
    correct = Guidance.correct

    def record(self, x0, *args, **kwargs):
        guided = correct(self, x0, *args, **kwargs)
        corrected.append(None if guided is x0 else guided.clone())
        return guided

    monkeypatch.setattr(Guidance, "correct", record)
    # Registered after DynFuse's: they see the sampler's input and the eps DynFuse hands back.
    script_callbacks.on_cfg_denoiser(lambda params: inputs.append((params.x[-1:].clone(), params.sigma[-1])))
    script_callbacks.on_cfg_after_cfg(lambda params: outputs.append(params.x.clone()))
    ui.txt2img(PROMPT, steps=4, seed=5, sampler_name="DDIM", dynfuse=checks.dynfuse_args(**GUIDED, **REFS))
    assert len(corrected) == len(inputs) == len(outputs) == 3 and all(c is not None for c in corrected)
    for guided, (x_t, t), eps in zip(corrected, inputs, outputs):
        alpha_bar = shared.sd_model.alphas_cumprod[int(t)]
        implied = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        torch.testing.assert_close(implied, guided.to(implied.dtype), rtol=1e-4, atol=1e-4)


def test_after_guidance_everything_is_as_if_the_extension_never_existed(tiny_encoders, a1111):
    import checks

    _, p0, res0 = run_without_extension(a1111, PROMPT)
    probe0, state0 = checks.probe(), checks.state()
    ui = tiny_encoders()
    write_pair(ui)
    vae = ui.model.first_stage_model
    grad_flags = [p.requires_grad for p in vae.parameters()]
    ui.txt2img(PROMPT, steps=3, seed=5,
               dynfuse=checks.dynfuse_args(guidance_decoder="vae", show_loss_plot=True, **GUIDED, **REFS))
    assert last_job().guided.decoder_kind == "vae" and last_job().guided.losses
    p, res = ui.txt2img(PROMPT, steps=3, seed=5)  # the page's defaults: DynFuse off
    assert torch.equal(p.fake_latents[0], p0.fake_latents[0])
    assert res.infotexts == res0.infotexts
    out, cond = checks.probe()
    assert torch.equal(out, probe0[0]) and torch.equal(cond, probe0[1])
    checks.assert_same_state(checks.state(), state0)  # UNet, text encoder and VAE weights
    assert [p.requires_grad for p in vae.parameters()] == grad_flags and all(p.grad is None for p in vae.parameters())
    assert checks.dynfuse_hooks() == 0


def test_the_vae_decoder_guides_through_the_models_own_vae(tiny_encoders, monkeypatch):
    import checks

    ui = tiny_encoders()
    write_pair(ui)
    decoded = []
    original = type(ui.model.first_stage_model).decode
    monkeypatch.setattr(type(ui.model.first_stage_model), "decode",
                        lambda self, z: decoded.append(torch.is_grad_enabled()) or original(self, z))
    p0, _ = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(**REFS))
    decoded.clear()
    p1, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(guidance_decoder="vae", **GUIDED, **REFS))
    assert last_job().guided.decoder_kind == "vae" and [s for s, _ in last_job().guided.losses] == [0, 1, 2]
    assert decoded.count(True) == 3  # one differentiated decode per guided step (the host's own run without grad)
    assert not torch.allclose(p0.fake_latents[0], p1.fake_latents[0])
    assert SCORES.search(res.infotexts[0]) and note(res.infotexts[0]) is None


def test_a_non_finite_gradient_is_noted_in_every_later_image_and_draws_no_plot(tiny_encoders, monkeypatch, capsys):
    import checks

    from lib_dynfuse.guidance import Guidance

    ui = tiny_encoders()
    write_pair(ui)
    monkeypatch.setattr(Guidance, "_gradient", lambda self, x0: (torch.full_like(x0, float("nan")), 0.0))
    capsys.readouterr()
    _, res = ui.txt2img(PROMPT, steps=3, seed=5, n_iter=2,
                        dynfuse=checks.dynfuse_args(show_loss_plot=True, **GUIDED, **REFS))
    assert dynfuse_lines(capsys) == [
        ("DynFuse: guidance: the gradient was not finite at step 0; guidance is off for the rest of this generation. "
         "Lower Guidance strength or choose Decoder 'approx'.")]
    assert [note(text) for text in res.infotexts] == ["guidance off: the gradient was not finite at step 0"] * 2
    assert len(res.images) == 2  # the two images, no empty loss plot
    assert 'DynFuse guidance: "strength 0.5, ' in res.infotexts[1]  # what was asked stays on record


def test_missing_references_give_one_line_and_a_note_and_leave_the_sample_alone(tiny_encoders, capsys):
    import checks

    ui = tiny_encoders()
    write_pair(ui)
    p0, _ = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    capsys.readouterr()
    p1, res = ui.txt2img(PROMPT, steps=3, seed=5, n_iter=2, dynfuse=checks.dynfuse_args(**GUIDED))
    assert torch.allclose(p0.fake_latents[0], p1.fake_latents[0], atol=1e-5)
    assert "DynFuse method: kl" in res.infotexts[0]
    lines = dynfuse_lines(capsys)
    assert lines[0] == (
        "DynFuse: guidance: the subject side is off (no image under Subject references, and subj.safetensors has no "
        "preview image); the style side is off (no image under Style reference, and sty.safetensors has no preview "
        "image). Add an image under Subject references / Style reference in the DynFuse panel, or put a preview "
        "image beside the LoRA file.")
    assert [line for line in lines if line.startswith("DynFuse: guidance")] == lines[:1]  # once per job
    assert note(res.infotexts[1]) == ("guidance subject side off: no reference image; guidance style side off: no "
                                      "reference image")


def test_an_unreadable_upload_turns_off_only_its_side(tiny_encoders, tmp_path, capsys):
    """The UI's value path: an uploaded file that is not an image. The fusion and the other side go on."""
    import checks

    upload = tmp_path / "notes.txt"
    upload.write_text("not an image")
    ui = tiny_encoders()
    write_pair(ui)
    p0, _ = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    capsys.readouterr()
    p1, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(
        **{**GUIDED, "subject_refs": [str(upload)], "style_ref": REFS["style_ref"]}))
    assert dynfuse_lines(capsys) == [
        (f"DynFuse: guidance: the subject side is off (Subject references: '{upload}' is not a readable image "
         "(unknown format)). Add an image under Subject references in the DynFuse panel, or put a preview image "
         "beside the LoRA file.")]
    text = res.infotexts[0]
    assert "DynFuse method: kl" in text and "DynFuse selection: subject " in text
    assert note(text) == "guidance subject side off: unreadable reference"
    assert [s for s, _ in last_job().guided.losses] == [0, 1, 2]  # the style side still guides
    assert not torch.allclose(p0.fake_latents[0], p1.fake_latents[0])
    assert re.search(r'DynFuse scores: "style-CLIP -?\d\.\d{3}, clip-T -?\d\.\d{3}"', text)


def test_api_with_base64_references_guides_and_writes_scores(tiny_encoders):
    ui = tiny_encoders(api_only=True)
    write_pair(ui)
    args = {"enabled": True, **GUIDED, "subject_refs": [png_base64(REFS["subject_refs"][0])],
            "style_ref": "data:image/png;base64," + png_base64(REFS["style_ref"])}
    res = ui.api_txt2img({"prompt": PROMPT, "steps": 3, "seed": 5, "alwayson_scripts": {"DynFuse": {"args": [args]}}})
    assert SCORES.search(res["infotexts"][0]) and "DynFuse method: kl" in res["info"]
    assert [s for s, _ in last_job().guided.losses] == [0, 1, 2] and note(res["infotexts"][0]) is None


def test_api_with_an_unreadable_style_reference_keeps_the_fusion(tiny_encoders, capsys):
    ui = tiny_encoders(api_only=True)
    write_pair(ui)
    args = {"enabled": True, **GUIDED, "subject_refs": [png_base64(REFS["subject_refs"][0])],
            "style_ref": "/home/me/style.png"}
    capsys.readouterr()
    res = ui.api_txt2img({"prompt": PROMPT, "steps": 3, "seed": 5, "alwayson_scripts": {"DynFuse": {"args": [args]}}})
    lines = dynfuse_lines(capsys)
    assert lines[0].startswith("DynFuse: guidance: the style side is off (Style reference: style_ref is not a "
                               "base64-encoded image (")
    assert len(lines) == 1 and "DynFuse selection: subject " in res["info"]
    assert note(res["infotexts"][0]) == "guidance style side off: unreadable reference"
    assert [s for s, _ in last_job().guided.losses] == [0, 1, 2]


def test_an_xyz_cell_over_guidance_strength_guides_with_its_own_strength(tiny_encoders, monkeypatch):
    import checks

    from lib_dynfuse.guidance import Guidance
    from lib_dynfuse.hosts import xyz

    ui = tiny_encoders()
    write_pair(ui)
    strengths = []
    correct = Guidance.correct
    monkeypatch.setattr(Guidance, "correct", lambda self, *a, **k: strengths.append(self.params.strength) or
                        correct(self, *a, **k))
    plain, _ = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(**REFS))
    p = ui.make_p(PROMPT, dynfuse=checks.dynfuse_args(**GUIDED, **REFS), steps=3, seed=5)
    cells = xyz.find_xyz_module().run_axis(p, "[DynFuse] Guidance strength", "0, 0.8")
    assert strengths == [0.0] * 3 + [0.8] * 3
    (_, off, off_res), (_, on, on_res) = cells
    assert 'DynFuse guidance: "strength 0, ' in off_res.infotexts[0]
    assert 'DynFuse guidance: "strength 0.8, ' in on_res.infotexts[0]
    assert torch.allclose(off.fake_latents[0], plain.fake_latents[0], atol=1e-5)
    assert not torch.allclose(on.fake_latents[0], plain.fake_latents[0])
