"""Guidance on the FLUX autoencoder's 16-channel latent (FLUX.1, Chroma, Z-Image, Lumina 2): the hosts' linear
preview map with its bias, TAEF1 when its weights are in models/VAE-taesd, the VAE with its shift; and end to end
on the fake Forge Neo, where Z-Image and Chroma get guidance and scores and Qwen-Image (another VAE's latent) says
why it has none."""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lib_dynfuse.guidance import make_decoder
from lib_dynfuse.guidance.decoders import ApproxDecoder, TaesdDecoder, VaeDecoder, latent_family
from lib_dynfuse.settings import DynFuseSettings
from family_harnesses import fh, fl, nh

# ComfyUI's and Forge Neo's published FLUX.1 preview factors (latent_formats.py / latent.py, class Flux), per
# latent channel, and the bias per colour.
FLUX_TABLE = torch.tensor([
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778]])
FLUX_BIAS = torch.tensor([-0.0329, -0.0718, -0.0851])


def test_the_flux_preview_map_is_the_published_table_with_its_bias():
    latent = torch.randn(2, 16, 8, 12)
    expected = (torch.einsum("bchw,cr->brhw", latent, FLUX_TABLE) + FLUX_BIAS[:, None, None]) * 0.5 + 0.5
    torch.testing.assert_close(ApproxDecoder("FLUX")(latent), expected)


@pytest.mark.parametrize("kind", ["approx", "taesd", "vae"])
def test_each_flux_decoder_gives_rgb_and_a_gradient_on_the_latent(tmp_path, kind):
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in TaesdDecoder(16).state_dict().items()}
    torch.save(state, tmp_path / "taef1_decoder.pth")
    vae = torch.nn.Conv2d(16, 3, 1)
    decoder, used = make_decoder(kind, "flux", taesd_dir=tmp_path, vae=SimpleNamespace(decode=vae))
    assert used == kind
    latent = torch.randn(1, 16, 8, 8, requires_grad=True)
    rgb = decoder(latent)
    assert rgb.shape == {"approx": (1, 3, 8, 8), "taesd": (1, 3, 64, 64), "vae": (1, 3, 8, 8)}[kind]
    rgb.square().mean().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    if kind == "taesd":  # TAEF1's file, read into a decoder of 16 latent channels
        assert all(torch.equal(v, state[k]) for k, v in decoder.state_dict().items())


def test_auto_takes_taef1_when_its_file_is_there_else_the_preview_map(tmp_path):
    assert make_decoder("auto", "FLUX", taesd_dir=tmp_path)[1] == "approx"
    torch.save(TaesdDecoder(16).state_dict(), tmp_path / "taef1_decoder.pth")
    assert make_decoder("auto", "FLUX", taesd_dir=tmp_path)[1] == "taesd"
    assert make_decoder("auto", "SDXL", taesd_dir=tmp_path)[1] == "approx"  # TAEF1 is not SDXL's


def test_the_vae_decoder_undoes_flux_scale_and_shift():
    seen = []
    decoder = VaeDecoder(lambda z: seen.append(z) or z[:, :3], 0.3611, 0.1159)
    latent = torch.randn(1, 16, 4, 4)
    decoder(latent)
    torch.testing.assert_close(seen[0], latent / 0.3611 + 0.1159)


def test_the_flux_latent_is_told_by_its_channels_scale_and_shift():
    def fmt(channels, scale, shift=0.0):
        return SimpleNamespace(latent_channels=channels, scale_factor=scale, shift_factor=shift)

    assert latent_family(fmt(16, 0.3611, 0.1159)) == "FLUX"
    assert latent_family(fmt(16, 1.0)) is None            # Wan 2.1's VAE: Qwen-Image, Wan, Krea 2
    assert latent_family(fmt(128, 1.0)) is None           # Flux.2's
    assert latent_family(None) is None


# ---- end to end on the fake Forge Neo -------------------------------------------------------------------------------
PROMPT = "a dog <lora:subj:0.8> <lora:style:1> <lora:other:0.5>"
GUIDED = {"guidance": True, "guidance_strength": 0.5, "guidance_start": 0.0, "guidance_end": 1.0,
          "subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
          "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
SCORES = re.compile(r'DynFuse scores: "subject-DINO -?\d\.\d{3}, style-CLIP -?\d\.\d{3}, clip-T -?\d\.\d{3}"')


@pytest.fixture
def guided_host(tmp_path, monkeypatch, request):
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    family, layout = request.param
    with nh.neo_host(tmp_path, family=family) as host, nh.tiny_guidance_models(host, monkeypatch):
        fl.write_family_loras(tmp_path, host.sd_model, family, layout, layout)
        yield host


def guided_run(host, **settings):
    from lib_dynfuse.hosts.neo import NeoAdapter

    script = nh.AdapterScript(host, NeoAdapter(), DynFuseSettings(enabled=True, **GUIDED, **settings))
    processed, p = host.txt2img(PROMPT, runner=host.scripts.ScriptRunner([script]), steps=3, cfg_scale=3.0,
                                width=32, height=32)
    return script, processed, p


@pytest.mark.parametrize("guided_host", [("zimage", "diffusers"), ("chroma", "kohya")], indirect=True)
@pytest.mark.parametrize("decoder", ["approx", "taesd"])
def test_guidance_and_scores_run_on_flux_latent_families(guided_host, capsys, monkeypatch, tmp_path, decoder):
    from lib_dynfuse.hosts.neo import NeoAdapter

    taesd_dir = tmp_path / "VAE-taesd"  # the WebUI's models/VAE-taesd, holding TAEF1
    taesd_dir.mkdir()
    torch.save(TaesdDecoder(16).state_dict(), taesd_dir / "taef1_decoder.pth")
    monkeypatch.setattr(NeoAdapter, "taesd_dir", lambda self: str(taesd_dir))
    plain, _ = guided_host.txt2img(PROMPT, steps=3, cfg_scale=3.0, width=32, height=32)
    script, processed, _ = guided_run(guided_host, guidance_decoder=decoder)
    assert "guidance off" not in processed.infotexts[0] and "failed" not in capsys.readouterr().out
    assert [step for step, _ in script.job.guided.losses] == [0, 1, 2] and script.job.guided.decoder_kind == decoder
    assert SCORES.search(processed.infotexts[0])
    assert torch.isfinite(processed.latents[0]).all() and not torch.allclose(processed.latents[0], plain.latents[0])


@pytest.mark.parametrize("guided_host", [("qwen", "diffusers")], indirect=True)
def test_a_family_of_another_latent_keeps_the_fusion_and_says_why_guidance_is_off(guided_host, capsys):
    script, processed, _ = guided_run(guided_host)
    assert script.job.guidance is None and script.job.last_log.layers
    assert 'DynFuse note: "guidance off: no decoder for this model"' in processed.infotexts[0]
    assert "no latent decoder for guidance" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["forge", "neo"])
def test_flux1_gets_guidance_and_scores_on_forge_and_neo(tmp_path, monkeypatch, capsys, which):
    """FLUX.1 dev at its distilled CFG 1 (no uncond pass: the x0 estimate sizes the step)."""
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    factory, adapter = {"forge": (fh.forge_host, "lib_dynfuse.hosts.forge:ForgeAdapter"),
                        "neo": (nh.neo_host, "lib_dynfuse.hosts.neo:NeoAdapter")}[which]
    with factory(tmp_path, family="flux") as host, fh.tiny_guidance_models(host, monkeypatch, adapter=adapter):
        fh.write_flux_loras(tmp_path, host.sd_model)
        module, name = adapter.split(":")
        script = fh.AdapterScript(host, getattr(importlib.import_module(module), name)(),
                                  DynFuseSettings(enabled=True, **GUIDED))
        processed, _ = host.txt2img(PROMPT, runner=host.scripts.ScriptRunner([script]), steps=3, cfg_scale=1.0,
                                    width=32, height=32)
    assert "guidance off" not in processed.infotexts[0] and "failed" not in capsys.readouterr().out
    assert [step for step, _ in script.job.guided.losses] == [0, 1, 2] and SCORES.search(processed.infotexts[0])
