"""`subject-only` and `style-only` are the WebUI's merge of that one LoRA, on every host and model: the other LoRA is
absent from every UNet layer, the layers only it touches and those no hook can fuse included, while its
text-encoder half stays with the WebUI (as for every method)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

from lib_dynfuse.settings import DynFuseSettings
from family_harnesses import fh, nh


HOSTS = {"forge": (fh.forge_host, "lib_dynfuse.hosts.forge", "ForgeAdapter"),
         "neo": (nh.neo_host, "lib_dynfuse.hosts.neo", "NeoAdapter")}
FORGE_PROMPT = "a dog <lora:subj:0.8> <lora:style:1> <lora:other:0.5>"
# The WebUI merging one of the two: the other's tag gone (these LoRA files have no text-encoder half).
ALONE = {"subject-only": FORGE_PROMPT.replace(" <lora:style:1>", ""),
         "style-only": FORGE_PROMPT.replace(" <lora:subj:0.8>", "")}
NORMS = {"lora_unet_input_blocks_1_1_norm.w_norm": 8, "lora_unet_input_blocks_1_1_norm.b_norm": 8,
         "lora_unet_input_blocks_1_1_transformer_blocks_0_norm1.w_norm": 8}


def _dynfuse(which, host, **settings):
    _factory, module, name = HOSTS[which]
    adapter = getattr(importlib.import_module(module), name)()
    script = fh.AdapterScript(host, adapter, DynFuseSettings(enabled=True, **settings))
    return script, host.scripts.ScriptRunner([script])


def _norm_patches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(n, generator=g) * 0.1 for key, n in NORMS.items()}


def _write_forge_loras(folder: Path, sd_model, family: str) -> None:
    """subj and style share some layers and each has layers of its own, and each has norm-layer patches (which
    stay with the WebUI's merge when fused); other touches all of them."""
    keys = list(fh.lora_keys(sd_model))
    n = len(keys)
    norms = family == "sd15"
    fh.write_lora(folder / "subj.safetensors", sd_model, keys[n // 6: n // 2], seed=1, scale=0.3,
                  extra=_norm_patches(1) if norms else None)
    fh.write_lora(folder / "style.safetensors", sd_model, keys[n // 3: 2 * n // 3], seed=2, scale=0.3,
                  extra=_norm_patches(2) if norms else None)
    fh.write_lora(folder / "other.safetensors", sd_model, keys[: 3 * n // 4], seed=3, scale=0.3)


@pytest.mark.parametrize("which", sorted(HOSTS))
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", sorted(ALONE))
def test_one_lora_methods_are_the_webuis_merge_of_that_lora_on_forge_and_neo(tmp_path, which, family, method):
    with HOSTS[which][0](tmp_path, family=family) as host:
        _write_forge_loras(tmp_path, host.sd_model, family)
        alone, _ = host.txt2img(ALONE[method], steps=3, batch_size=2, enable_hr=True, denoising_strength=0.6)
        script, runner = _dynfuse(which, host, method=method)
        fused, p = host.txt2img(FORGE_PROMPT, runner=runner, steps=3, batch_size=2, enable_hr=True,
                                denoising_strength=0.6)
    assert not script.job.failed
    # Output-space deltas instead of merged weights, over two passes: equal up to fp32 rounding.
    torch.testing.assert_close(torch.stack(fused.latents), torch.stack(alone.latents), rtol=1e-3, atol=1e-3)
    # The other LoRA's norm patches are not kept with the WebUI either: nothing says they are.
    other = "style" if method == "subject-only" else "subject"
    assert f"the {other} LoRA merged statically" not in str(p.extra_generation_params.get("DynFuse note"))


@pytest.mark.parametrize("which", sorted(HOSTS))
@pytest.mark.parametrize("layouts", [("diffusers", "diffusers"), ("kohya", "diffusers"), ("bfl", "kohya")])
@pytest.mark.parametrize("method", sorted(ALONE))
def test_one_lora_methods_on_flux_slices_are_that_lora_alone(tmp_path, which, layouts, method):
    """The subject alone patches the text q, k, v of the first double block, the style alone the second block's
    image q, k, v: slices of fused layers only the other LoRA touches get nothing."""
    with HOSTS[which][0](tmp_path, family="flux") as host:
        fh.write_flux_loras(tmp_path, host.sd_model, *layouts)
        size = dict(width=32, height=32, cfg_scale=1.0)
        alone, _ = host.txt2img(ALONE[method], steps=2, **size)
        script, runner = _dynfuse(which, host, method=method)
        fused, _p = host.txt2img(FORGE_PROMPT, runner=runner, steps=2, **size)
    assert not script.job.failed
    torch.testing.assert_close(torch.stack(fused.latents), torch.stack(alone.latents), rtol=1e-4, atol=1e-4)


# ---- AUTOMATIC1111 ------------------------------------------------------------------------------------------------
A1111_PROMPT = "a dog <lora:subj:1> <lora:sty:0.8>"
# <lora:name:te:unet>: the other LoRA's text-encoder half at its weight, its UNet half at 0.
A1111_ALONE = {"subject-only": "a dog <lora:subj:1> <lora:sty:0.8:0>",
               "style-only": "a dog <lora:subj:1:0> <lora:sty:0.8>"}


def _write_a1111_pair(ui) -> None:
    """Both with a text-encoder half and norm-layer patches; each has UNet layers the other lacks (the subject the
    first attention layers, the style the convolutions)."""
    import loras

    keys = loras.attention_keys()
    convs = [r["kohya_key"] for r in loras.unet_rows() if r["kind"] == "Conv2d"]
    for name, unet_keys, seed in (("subj", keys[:-2], 1), ("sty", keys[2:] + convs, 2)):
        g = torch.Generator().manual_seed(seed)
        norms = {f"lora_unet_input_blocks_1_1_{layer}.{part}": torch.randn(8, generator=g) * 0.1
                 for layer in ("norm", "transformer_blocks_0_norm1") for part in ("w_norm", "b_norm")}
        loras.write_lora(os.path.join(ui.lora_dir, f"{name}.safetensors"), ui.model, unet_keys, seed=seed, te=True,
                         extra=norms)


@pytest.mark.parametrize("method", sorted(A1111_ALONE))
def test_one_lora_methods_are_the_hosts_merge_of_that_lora_on_a1111(a1111, method):
    import checks

    ui0 = a1111(with_dynfuse=False)
    _write_a1111_pair(ui0)
    p0, _ = ui0.txt2img(A1111_ALONE[method], steps=3, seed=5, batch_size=2, n_iter=2)
    ui = a1111()
    _write_a1111_pair(ui)
    p, res = ui.txt2img(A1111_PROMPT, steps=3, seed=5, batch_size=2, n_iter=2,
                        dynfuse=checks.dynfuse_args(method=method))
    assert all(f"DynFuse method: {method}" in text for text in res.infotexts)
    other = "style" if method == "subject-only" else "subject"
    assert not any(f"the {other} LoRA merged statically" in text for text in res.infotexts)
    assert len(p.fake_latents) == len(p0.fake_latents) == 2
    for a, b in zip(p.fake_latents, p0.fake_latents):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
