"""The fake Forge with an SDXL-shaped UNet (real SDXL layer names, Linear projections, deeper transformers,
label_emb) and img2img, both as Forge runs them: the takeover, the fusion and the cleanup hold there as they do
for txt2img on SD 1.5."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
import tolerances as tol
from PIL import Image

from lib_dynfuse.hosts.base import NOTE_KEY
from lib_dynfuse.settings import DynFuseSettings

_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)

SDXL_TABLE = Path(__file__).parent / "data" / "sdxl-unet-layers.tsv"
PROMPT = "a dog <lora:subj:0.8> <lora:style:1> <lora:other:0.5>"
INIT = Image.new("RGB", (80, 48), (200, 40, 30))  # resized to the job's 64 x 64, as Forge does


def write_loras(lora_dir: Path, sd_model) -> None:
    """subj and style overlap on a third of the UNet; other touches both and more."""
    keys = list(fh.lora_keys(sd_model))
    n = len(keys)
    fh.write_lora(lora_dir / "subj.safetensors", sd_model, keys[n // 6: n // 2], seed=1, scale=0.3)
    fh.write_lora(lora_dir / "style.safetensors", sd_model, keys[n // 3: 2 * n // 3], seed=2, scale=0.3)
    fh.write_lora(lora_dir / "other.safetensors", sd_model, keys[: 3 * n // 4], seed=3, scale=0.3)


@pytest.fixture(params=["sd15", "sdxl"])
def host(request, tmp_path):
    with fh.forge_host(tmp_path, family=request.param) as host:
        write_loras(tmp_path, host.sd_model)
        yield host


@pytest.fixture
def sdxl(tmp_path):
    with fh.forge_host(tmp_path, family="sdxl") as host:
        write_loras(tmp_path, host.sd_model)
        yield host


def dynfuse(host, **settings):
    # Looked up here, as fh.tiny_guidance_models does: other test modules' fixtures re-import lib_dynfuse.hosts.
    from lib_dynfuse.hosts.forge import ForgeAdapter

    script = fh.AdapterScript(host, ForgeAdapter(), DynFuseSettings(enabled=True, **settings))
    return script, host.scripts.ScriptRunner([script])


def hooks_on(host) -> int:
    return sum(len(m._forward_hooks) for m in host.sd_model.forge_objects_original.unet.model.modules())


def test_the_fake_sdxl_unet_has_real_sdxl_layers(sdxl):
    with open(SDXL_TABLE, encoding="utf-8") as f:
        real = {row["module"].removeprefix("model."): row for row in csv.DictReader(f, delimiter="\t")}
    model = sdxl.sd_model.forge_objects_original.unet.model
    names = fh.sdxl_kohya_keys(sdxl.sd_model)
    for key, kohya in names.items():
        path = key.removesuffix(".weight")
        assert path in real, path
        assert real[path]["kohya_key"] == kohya
        kind = "Linear" if model.get_submodule(path).weight.dim() == 2 else "Conv2d"
        assert real[path]["kind"] == kind, path
    for path in ("diffusion_model.label_emb.0.0", "diffusion_model.input_blocks.3.0.op",
                 "diffusion_model.input_blocks.4.1.proj_in", "diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_k",
                 "diffusion_model.output_blocks.2.2.conv"):
        assert f"{path}.weight" in names
    assert sdxl.sd_model.is_sdxl and not sdxl.sd_model.is_sd1


def test_static_method_reproduces_forges_merge_and_leaves_nothing(host):
    merged, _ = host.txt2img(PROMPT, steps=3, batch_size=2, enable_hr=True)
    plain, _ = host.txt2img("a dog", steps=2)
    script, runner = dynfuse(host, method="static")
    fused, p = host.txt2img(PROMPT, runner=runner, steps=3, batch_size=2, enable_hr=True)
    torch.testing.assert_close(torch.stack(fused.latents), torch.stack(merged.latents), rtol=1e-3, atol=1e-3)
    assert script.takeovers == 3 and NOTE_KEY not in p.extra_generation_params
    assert hooks_on(host) == 0
    again, _ = host.txt2img("a dog", steps=2)
    assert torch.equal(again.images[0], plain.images[0])


def test_sdxl_fusion_decides_on_linear_projections_and_second_transformer_blocks(sdxl):
    script, runner = dynfuse(sdxl, method="kl", temperature=0.5)
    sdxl.txt2img(PROMPT, runner=runner, steps=3, cfg_scale=5.0)
    log = script.job.last_log
    assert log.steps == [0, 1, 2]
    assert any(layer.endswith(".proj_in") for layer in log.layers)  # Linear in SDXL, a 1x1 conv in SD 1.5
    assert any(".transformer_blocks.1." in layer for layer in log.layers)
    assert "DynFuse selection" in sdxl.txt2img(PROMPT, runner=runner, steps=1)[0].infotexts[0]


def test_img2img_is_taken_over_once_and_starts_from_the_init_image(host):
    merged, _ = host.img2img(PROMPT, [INIT], steps=4, denoising_strength=0.5, batch_size=2)
    script, runner = dynfuse(host, method="static")
    seen = []
    host.script_callbacks.on_cfg_denoiser(lambda params: seen.append(params.denoiser.step))
    fused, p = host.img2img(PROMPT, [INIT], runner=runner, steps=4, denoising_strength=0.5, batch_size=2)
    tol.assert_sampled_close(torch.stack(fused.latents), torch.stack(merged.latents),
                             fh.diffusion_model(host.sd_model), steps=4)
    assert script.takeovers == 1 and seen == [0, 1, 2]  # denoising 0.5 of 4 steps: t_enc + 1 calls
    assert p.extra_generation_params["Denoising strength"] == 0.5
    assert script.job.last_log.steps == [0, 1, 2] and hooks_on(host) == 0
    blue, _ = host.img2img(PROMPT, [Image.new("RGB", (64, 64), (20, 40, 220))], runner=runner, steps=4,
                           denoising_strength=0.5)
    assert not torch.allclose(blue.latents[0], fused.latents[0], atol=1e-3)


def test_sdxl_guidance_corrects_each_step(sdxl, monkeypatch):
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    refs = {"subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
            "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
    with fh.tiny_guidance_models(sdxl, monkeypatch):
        plain, _ = sdxl.txt2img(PROMPT, steps=3, cfg_scale=5.0)
        script, runner = dynfuse(sdxl, guidance=True, guidance_strength=0.5, guidance_start=0.0, guidance_end=1.0,
                                 guidance_decoder="approx", **refs)
        guided, p = sdxl.txt2img(PROMPT, runner=runner, steps=3, cfg_scale=5.0)
    record = script.job.guided
    assert record is not None and [step for step, _ in record.losses] == [0, 1, 2]
    assert script.adapter.model_family(p) == "SDXL"  # the SDXL latent decoder and scale
    assert torch.isfinite(guided.latents[0]).all() and "DynFuse note" not in guided.infotexts[0]
    assert not torch.allclose(guided.latents[0], plain.latents[0], atol=1e-4)
