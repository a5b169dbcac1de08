from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest_guidance import CPU, FULL, TINY, guidance_release_models  # noqa: F401

from lib_dynfuse.guidance import ScorerConfig, ScorerLoadError, Scorers, loaded_models, unload
from lib_dynfuse.guidance.scorers import CLIP_MEAN, CLIP_STD, preprocess


def test_importing_the_package_loads_neither_open_clip_nor_timm():
    code = "import sys, lib_dynfuse.guidance; print('open_clip' in sys.modules or 'timm' in sys.modules)"
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=project)
    assert out.stdout.strip() == "False"


def test_default_model_names_exist_in_the_installed_libraries():
    import open_clip
    import timm

    config = ScorerConfig()
    assert config.clip_model in open_clip.list_models()
    assert config.clip_pretrained in open_clip.list_pretrained_tags_by_model(config.clip_model)
    assert timm.is_model(config.dino_model)


def test_preprocess_resizes_to_224_and_normalises_with_the_given_statistics():
    image = torch.full((1, 3, 64, 48), 0.5)
    x = preprocess(image, (224, 224), CLIP_MEAN, CLIP_STD, torch.float32)
    assert x.shape == (1, 3, 224, 224)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0, :, 100, 100], expected)


def test_precision_and_device_resolution():
    assert ScorerConfig(device="cpu").torch_dtype() == torch.float32
    assert ScorerConfig(device="cpu", precision="bf16").torch_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        ScorerConfig(precision="fp8").torch_dtype()


def test_models_are_cached_replaced_on_change_and_released():
    scorers = Scorers(CPU, **TINY)
    first = scorers.clip_model()
    assert scorers.clip_model() is first and loaded_models() == ["clip"]
    assert Scorers(CPU, **TINY).clip_model() is first
    other = Scorers(ScorerConfig(device="cpu", precision="fp32", clip_pretrained="laion2b_s34b_b79k"),
                    **TINY)
    assert other.clip_model() is not first and loaded_models() == ["clip"]
    scorers.dino_model()
    assert loaded_models() == ["clip", "dino"]
    unload()
    assert loaded_models() == []


def test_models_loaded_inside_inference_mode_stay_differentiable():
    scorers = Scorers(CPU, **TINY)
    with torch.inference_mode():
        model = scorers.dino_model()
    assert not any(p.is_inference() or p.requires_grad for p in model.parameters())
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(scorers.dino_image(image).sum() + scorers.clip_image(image).sum(), image)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_embedding_shapes_and_text():
    scorers = Scorers(CPU, **TINY)
    images = torch.rand(2, 3, 64, 64)
    assert scorers.clip_image(images).shape == (2, 32)
    assert scorers.dino_image(images).shape == (2, 64)
    assert scorers.clip_text(["a dog", "a cat"]).shape == (2, 32)


def message(label: str, name: str, reason: str, setting: str) -> str:
    return (f"DynFuse guidance: could not load the {label} model '{name}' ({reason}). Set a local weights "
            f"file in Settings > DynFuse > {setting}, or turn guidance off.")


def test_unknown_clip_name_gives_the_settings_hint():
    scorers = Scorers(ScorerConfig(clip_model="ViT-Nope", clip_pretrained="", device="cpu"))
    with pytest.raises(ScorerLoadError) as info:
        scorers.clip_model()
    assert str(info.value) == message("CLIP", "ViT-Nope", "Model config for 'ViT-Nope' not found in built-ins",
                                      "CLIP weights path")
    assert loaded_models() == []


def test_missing_local_weights_files_are_named(tmp_path):
    missing = str(tmp_path / "clip.safetensors")
    with pytest.raises(ScorerLoadError) as info:
        Scorers(ScorerConfig(clip_weights=missing, device="cpu")).clip_model()
    assert str(info.value) == message("CLIP", "ViT-B-32", f"file not found: {missing}", "CLIP weights path")
    with pytest.raises(ScorerLoadError) as info:
        Scorers(ScorerConfig(dino_weights=missing, device="cpu")).dino_model()
    assert str(info.value) == message("DINO", "vit_small_patch16_224.dino", f"file not found: {missing}",
                                      "DINO weights path")


def test_unknown_dino_name():
    with pytest.raises(ScorerLoadError) as info:
        Scorers(ScorerConfig(dino_model="vit_nope", device="cpu")).dino_model()
    assert str(info.value) == message("DINO", "vit_nope", "Unknown model (vit_nope)", "DINO weights path")


TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "patch_size": 32, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
TINY_DINO = {"depth": 1, "embed_dim": 64, "num_heads": 2}


def test_local_weights_files_load_through_the_default_factories(tmp_path, monkeypatch):
    """Offline use: the default factories read local files (the libraries are only shrunk to toy sizes)."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    real_clip, real_timm = open_clip.create_model, timm.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: real_clip(*a, **k, **TINY_CLIP))
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: real_timm(*a, **k, **TINY_DINO))
    torch.manual_seed(5)
    clip = real_clip("ViT-B-32", pretrained=None, **TINY_CLIP)
    dino = real_timm("vit_small_patch16_224.dino", pretrained=False, num_classes=0, **TINY_DINO)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    save_file(dino.state_dict(), str(tmp_path / "dino.safetensors"))
    config = ScorerConfig(device="cpu", precision="fp32", clip_weights=str(tmp_path / "clip.pt"),
                          dino_weights=str(tmp_path / "dino.safetensors"), cache_dir=str(tmp_path / "cache"))
    try:
        scorers = Scorers(config)
        for source, loaded in ((clip, scorers.clip_model()), (dino, scorers.dino_model())):
            for key, value in source.state_dict().items():
                assert torch.equal(loaded.state_dict()[key], value), key
    finally:
        unload()


@pytest.mark.slow
def test_full_size_architectures_build_and_differentiate():
    scorers = Scorers(CPU, **FULL)
    try:
        image = torch.rand(1, 3, 224, 224, requires_grad=True)
        assert scorers.clip_image(image).shape == (1, 512) and scorers.dino_image(image).shape == (1, 384)
        (grad,) = torch.autograd.grad(scorers.clip_image(image).sum() + scorers.dino_image(image).sum(), image)
        assert torch.isfinite(grad).all()
    finally:
        unload()
