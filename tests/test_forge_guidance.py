"""Guidance through the fake Forge host: the after-CFG x0 estimate is corrected under Forge's inference mode,
with the unconditional estimate from a sampler_post_cfg_function on DynFuse's own UNet clone, a private VAE copy
for decoder "vae", TAESD from Forge's models folder, and every failure leaving a finished image."""

from __future__ import annotations

import gc
import importlib.util
import re
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_dynfuse.settings import DynFuseSettings

pytest.importorskip("open_clip")
pytest.importorskip("timm")

_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)

REFS = {"subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
        "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
GUIDED = {"guidance": True, "guidance_strength": 0.5, "guidance_start": 0.0, "guidance_end": 1.0}
SCORES = re.compile(r'DynFuse scores: "subject-DINO -?\d\.\d{3}, style-CLIP -?\d\.\d{3}, clip-T -?\d\.\d{3}"')


def adapter_class():
    # Looked up per test: the A1111 fixtures drop lib_dynfuse.hosts.* from sys.modules.
    from lib_dynfuse.hosts.forge import ForgeAdapter

    return ForgeAdapter


@pytest.fixture
def host(tmp_path, monkeypatch):
    from conftest_guidance import TINY

    from lib_dynfuse.guidance import scorers

    with fh.forge_host(tmp_path) as host:
        fh.write_test_loras(tmp_path, host.sd_model)
        host.shared.opts.data.update(dynfuse_device="cpu", dynfuse_precision="fp32")
        monkeypatch.setattr(adapter_class(), "guidance_factories", dict(TINY))
        yield host
    scorers.unload()


def run(host, steps=3, **settings):
    script = fh.AdapterScript(host, adapter_class()(), DynFuseSettings(enabled=True, **REFS, **settings))
    processed, p = host.txt2img(fh.PROMPT, runner=host.scripts.ScriptRunner([script]), steps=steps, cfg_scale=5.0)
    return script, processed, p


def dynfuse_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse")]


@pytest.mark.parametrize("decoder", ["approx", "vae"])
def test_guidance_moves_the_image_and_writes_scores(host, decoder):
    _, plain, _ = run(host)
    script, guided, _ = run(host, guidance_decoder=decoder, **GUIDED)
    record = script.job.guided
    assert script.job.guidance is None and record.decoder_kind == decoder
    assert [step for step, _ in record.losses] == [0, 1, 2]
    assert torch.isfinite(guided.latents[0]).all()
    assert not torch.allclose(plain.latents[0], guided.latents[0], atol=1e-4)
    assert SCORES.search(plain.infotexts[0]) and SCORES.search(guided.infotexts[0])
    assert "DynFuse note" not in guided.infotexts[0]


def spy_private_vae(monkeypatch, keep=lambda vae: vae) -> list:
    """Every VAE module the adapter hands guidance for decoder "vae", as ``keep`` holds it."""
    made = []
    original = adapter_class().guidance_vae

    def spy(self, p):
        vae = original(self, p)
        made.append(keep(vae))
        return vae

    monkeypatch.setattr(adapter_class(), "guidance_vae", spy)
    return made


def test_the_vae_decoder_is_a_private_copy_of_forges_inference_tensor_vae(host, monkeypatch):
    vae = host.sd_model.forge_objects.vae.first_stage_model
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    made = spy_private_vae(monkeypatch)
    run(host, guidance_decoder="vae", **GUIDED)
    (private,) = made
    assert private is not vae and not any(t.is_inference() for t in private.state_dict().values())
    assert all(t.is_inference() for t in vae.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    torch.testing.assert_close(private.state_dict(), before)


def test_the_private_vae_copy_is_freed_when_the_job_ends(host, monkeypatch):
    made = spy_private_vae(monkeypatch, keep=weakref.ref)
    script, processed, _ = run(host, guidance_decoder="vae", show_loss_plot=True, **GUIDED)
    gc.collect()
    assert len(made) == 1 and made[0]() is None  # nothing of the job holds the copy any more
    assert script.job.guidance is None and [step for step, _ in script.job.guided.losses] == [0, 1, 2]
    assert len(processed.images) == 2  # the loss plot was drawn before the decoder went
    assert not {"denoiser", "x_t", "t", "uncond_out"} & set(script.job.host)


def test_guidance_leaves_weights_and_forges_structures_as_a_run_without_the_extension(host):
    clean, _ = host.txt2img(fh.PROMPT, steps=3, cfg_scale=5.0)
    merged = fh.unet_weights(host.sd_model)  # with the prompt's LoRAs merged by Forge
    cached = host.sd_model.forge_objects_after_applying_lora.unet
    options = repr(cached.model_options)
    vae = {k: v.clone() for k, v in host.sd_model.forge_objects.vae.first_stage_model.state_dict().items()}
    script, _, _ = run(host, guidance_decoder="vae", **GUIDED)
    assert script.job.guided.losses
    after, _ = host.txt2img(fh.PROMPT, steps=3, cfg_scale=5.0)
    assert torch.equal(clean.images[0], after.images[0])
    assert all(torch.equal(merged[k], v) for k, v in fh.unet_weights(host.sd_model).items())
    assert host.sd_model.forge_objects_after_applying_lora.unet is cached and repr(cached.model_options) == options
    assert "sampler_post_cfg_function" not in cached.model_options
    torch.testing.assert_close(host.sd_model.forge_objects.vae.first_stage_model.state_dict(), vae, rtol=0, atol=0)
    assert "uncond_x0" not in script.job.host


def test_the_step_is_sized_by_forges_unconditional_estimate(host, monkeypatch):
    forge_uncond, given = fh.record_unconditional_estimates(monkeypatch)
    run(host, **GUIDED)
    assert len(given) == len(forge_uncond) == 3
    assert all(torch.equal(a, b) for a, b in zip(given, forge_uncond))


def test_taesd_weights_come_from_forges_models_folder(host, tmp_path, monkeypatch):
    from lib_dynfuse.guidance.decoders import TaesdDecoder
    from modules import paths_internal

    folder = tmp_path / "models" / "VAE-taesd"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(TaesdDecoder().state_dict(), folder / "taesd_decoder.pth")
    monkeypatch.setattr(paths_internal, "models_path", str(tmp_path / "models"))
    script, processed, _ = run(host, guidance_decoder="auto", **GUIDED)
    assert script.job.guided.decoder_kind == "taesd" and script.job.guided.losses
    assert torch.isfinite(processed.latents[0]).all()


def test_a_non_finite_gradient_turns_guidance_off_once_and_the_image_says_so(host, monkeypatch, capsys):
    from lib_dynfuse.guidance import Guidance

    def nan_gradient(self, x0):
        return torch.full_like(x0, float("nan")), 0.0

    _, plain, _ = run(host)
    monkeypatch.setattr(Guidance, "_gradient", nan_gradient)
    capsys.readouterr()
    script, processed, _ = run(host, show_loss_plot=True, **GUIDED)
    assert dynfuse_lines(capsys) == [
        ("DynFuse: guidance: the gradient was not finite at step 0; guidance is off for the rest of this generation. "
         "Lower Guidance strength or choose Decoder 'approx'.")]
    assert script.job.guided.off_reason == "the gradient was not finite at step 0"
    assert torch.equal(processed.latents[0], plain.latents[0])
    assert SCORES.search(processed.infotexts[0])
    assert "DynFuse note: " in processed.infotexts[0]
    assert "guidance off: the gradient was not finite at step 0" in processed.infotexts[0]
    assert len(processed.images) == 1  # no empty loss plot


def test_an_error_in_the_guidance_step_turns_it_off_with_a_note(host, monkeypatch, capsys):
    from lib_dynfuse.guidance import Guidance

    def broken(self, *args, **kwargs):
        raise RuntimeError("decoder exploded")

    _, plain, _ = run(host)
    monkeypatch.setattr(Guidance, "correct", broken)
    capsys.readouterr()
    script, processed, _ = run(host, **GUIDED)
    assert dynfuse_lines(capsys) == [
        "DynFuse: guidance failed (RuntimeError: decoder exploded); it is off for the rest of this generation."]
    assert script.job.guidance is None and 'DynFuse note: "guidance off: failed (RuntimeError)"' in processed.infotexts[0]
    assert torch.equal(processed.latents[0], plain.latents[0])


def test_unloadable_models_turn_guidance_and_scores_off_with_one_message(host, monkeypatch, capsys):
    def missing(config):
        raise FileNotFoundError("file not found: /models/clip.pt")

    _, plain, _ = run(host)
    monkeypatch.setattr(adapter_class(), "guidance_factories", {"clip_factory": missing, "dino_factory": missing})
    capsys.readouterr()
    script, processed, _ = run(host, **GUIDED)
    assert dynfuse_lines(capsys) == [
        ("DynFuse: guidance: could not load the DINO model 'vit_small_patch16_224.dino' (file not found: "
         "/models/clip.pt). Set a local weights file in Settings > DynFuse > DINO weights path (a local file; "
         "overrides the timm download), or turn guidance off. Guidance is off for this generation and no CLIP/DINO "
         "scores are written; the fusion still runs. Not tried or said again until a CLIP/DINO setting changes or "
         "the WebUI restarts.")]
    assert script.job.guidance is None and "DynFuse scores" not in processed.infotexts[0]
    assert 'DynFuse note: "guidance off: DINO weights not available offline"' in processed.infotexts[0]
    assert torch.equal(processed.latents[0], plain.latents[0])


def test_offline_the_scores_are_given_up_once_per_session(host, monkeypatch, capsys):
    """Scores on, guidance off (the defaults), no internet: one line and one note in the session's first
    generation; later ones are quiet and do not wait for the hub again. A new session (a reloaded UI) says it once
    more."""
    def offline(config):
        offline.calls += 1
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    offline.calls = 0
    monkeypatch.setattr(adapter_class(), "guidance_factories", {"clip_factory": offline, "dino_factory": offline})
    session = adapter_class()()
    capsys.readouterr()
    found = []
    for adapter in (session, session, adapter_class()()):
        script = fh.AdapterScript(host, adapter, DynFuseSettings(enabled=True, **REFS))
        processed, _ = host.txt2img(fh.PROMPT, runner=host.scripts.ScriptRunner([script]), steps=2)
        assert "DynFuse method: kl" in processed.infotexts[0] and "DynFuse scores" not in processed.infotexts[0]
        found.append((len(dynfuse_lines(capsys)), 'DynFuse note: "no scores: DINO weights not available offline"'
                      in processed.infotexts[0]))
    assert found == [(1, True), (0, False), (1, True)]
    assert offline.calls == 1


def test_a_model_without_a_guidance_decoder_keeps_the_fusion_and_the_scores(host, capsys):
    host.sd_model.is_sd1 = False  # as SD3 in Forge: no SD1/SD2/SDXL flag, no FLUX latent
    capsys.readouterr()
    script, processed, _ = run(host, **GUIDED)
    assert dynfuse_lines(capsys) == [
        ("DynFuse: guidance: this model has no latent decoder for guidance (SD 1.5, SD 2, SDXL and FLUX-latent "
         "models -- FLUX.1, Chroma, Z-Image, Lumina 2 -- are supported). Guidance is off for this generation; the "
         "fusion still runs.")]
    assert script.job.guidance is None and script.job.last_log is not None
    assert 'DynFuse note: "guidance off: no decoder for this model"' in processed.infotexts[0]
    assert SCORES.search(processed.infotexts[0])
