from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest_guidance import CPU, FULL, TINY, guidance_release_models  # noqa: F401

from lib_dynfuse.guidance import ModelDownloadError, ScorerConfig, ScorerLoadError, Scorers, loaded_models, unload
from lib_dynfuse.guidance.scorers import CLIP_MEAN, CLIP_STD, open_clip_arguments, preprocess

DEVICE = "Settings > DynFuse > CLIP/DINO device (auto, cpu, cuda:0, ...)"
CLIP_WEIGHTS = "Settings > DynFuse > CLIP weights path (a local file; overrides the pretrained tag)"
DINO_WEIGHTS = "Settings > DynFuse > DINO weights path (a local file; overrides the timm download)"


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


def test_preprocess_keeps_the_aspect_ratio_and_crops_the_center_differentiably():
    """As CLIP's and DINO's own preprocessing: the shorter side fits, the middle is cut out, nothing squashed."""
    image = torch.zeros(1, 3, 64, 128)
    image[..., 32:96] = 1.0  # a white middle square between black side bands
    image.requires_grad_(True)
    x = preprocess(image, (224, 224), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), torch.float32)
    assert x.shape == (1, 3, 224, 224)
    # Squashing would show the black bands in the outer quarters; the crop leaves only the middle square
    # (bicubic blends a few pixels at the cut).
    torch.testing.assert_close(x[..., 8:-8], torch.ones_like(x[..., 8:-8]), atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(x.sum(), image)
    assert grad[..., 36:92].abs().min() > 0 and grad[..., :28].abs().max() == 0 and grad[..., 100:].abs().max() == 0


def test_precision_and_device_resolution():
    assert ScorerConfig(device="cpu").torch_dtype() == torch.float32
    assert ScorerConfig(device="cpu", precision="bf16").torch_dtype() == torch.bfloat16
    with pytest.raises(ScorerLoadError) as info:
        ScorerConfig(precision="fp8").torch_dtype()
    assert str(info.value) == ("DynFuse: guidance: unknown CLIP/DINO precision 'fp8'. Set Settings > DynFuse > "
                               "CLIP/DINO precision to one of auto, fp32, fp16, bf16, or turn guidance off.")
    assert info.value.setting == "precision"


def test_a_device_that_is_no_device_name_names_the_device_setting():
    with pytest.raises(ScorerLoadError) as info:
        Scorers(ScorerConfig(device="gpu"), **TINY)
    assert str(info.value) == (f"DynFuse: guidance: the CLIP/DINO device 'gpu' is not a device name. Set {DEVICE} "
                               "to auto, cpu or cuda:0, or turn guidance off.")
    assert info.value.setting == "device" and loaded_models() == []


def test_a_device_this_machine_lacks_names_the_device_setting():
    # No machine has a hundredth GPU; on a CPU-only one "cuda" itself would fail the same way.
    with pytest.raises(ScorerLoadError) as info:
        Scorers(ScorerConfig(device="cuda:99"), **TINY)
    text = str(info.value)
    assert text.startswith("DynFuse: guidance: the CLIP/DINO device 'cuda:99' cannot be used on this machine (")
    assert text.endswith(f"). Set {DEVICE} to auto or cpu, or turn guidance off.")
    assert info.value.setting == "device"


def test_running_out_of_memory_while_loading_names_the_device_setting():
    def too_big(config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(ScorerLoadError) as info:
        Scorers(CPU, clip_factory=too_big).clip_model()
    assert str(info.value) == ("DynFuse: guidance: could not load the CLIP model 'ViT-B-32': not enough memory on "
                               f"cpu. Set {DEVICE} to cpu, or turn guidance off.")
    assert info.value.setting == "device" and loaded_models() == []


def test_a_failed_download_asks_for_a_local_weights_file():
    def offline(config):
        raise RuntimeError("Failed to download weights for tag 'openai': connection refused")

    with pytest.raises(ScorerLoadError) as info:
        Scorers(CPU, clip_factory=offline).clip_model()
    assert str(info.value) == ("DynFuse: guidance: could not load the CLIP model 'ViT-B-32' (Failed to download "
                               "weights for tag 'openai': connection refused). Set a local weights file in "
                               f"{CLIP_WEIGHTS}, or turn guidance off.")
    assert info.value.setting == "clip_weights"


def test_openai_clip_weights_are_built_with_quick_gelu():
    """open_clip 3 builds ViT-B-32 with GELU and only warns; OpenAI's weights were trained with QuickGELU, also when
    they come from a local file. Checked on the architecture the default factory's arguments build (no download)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    def activations(config):
        arguments = {**open_clip_arguments(config), "pretrained": None, "require_pretrained": False}
        model = open_clip.create_model(config.clip_model, **arguments, **TINY_CLIP)
        return {type(block.mlp.gelu) for block in model.visual.transformer.resblocks}

    assert open_clip_arguments(ScorerConfig())["pretrained"] == "openai"
    assert activations(ScorerConfig()) == {QuickGELU}
    assert activations(ScorerConfig(clip_weights=__file__)) == {QuickGELU}  # a local copy of the OpenAI weights
    assert activations(ScorerConfig(clip_pretrained="laion2b_s34b_b79k")) == {torch.nn.GELU}
    assert open_clip_arguments(ScorerConfig(clip_model="ViT-B/32"))["force_quick_gelu"]  # open_clip's old spelling
    # a hub model's own config says which activation it has; the default tag must not override it
    assert not open_clip_arguments(ScorerConfig(clip_model="hf-hub:timm/vit_base_patch32_clip_224.laion2b"))[
        "force_quick_gelu"]


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


def message(label: str, name: str, reason: str, advice: str) -> str:
    return f"DynFuse: guidance: could not load the {label} model '{name}' ({reason}). {advice}, or turn guidance off."


@pytest.mark.parametrize(("config", "label", "name", "reason", "setting"), [
    (ScorerConfig(clip_model="ViT-Nope", device="cpu"), "CLIP", "ViT-Nope", "open_clip has no model of that name",
     "CLIP model name (open_clip)"),
    (ScorerConfig(clip_pretrained="openia", device="cpu"), "CLIP", "ViT-B-32",
     "open_clip has no pretrained tag 'openia' for it", "CLIP pretrained tag (open_clip)"),
    (ScorerConfig(dino_model="vit_nope", device="cpu"), "DINO", "vit_nope", "timm has no model of that name",
     "DINO model name (timm)"),
    (ScorerConfig(dino_model="vit_small_patch16_224.dinov9", device="cpu"), "DINO",
     "vit_small_patch16_224.dinov9", "timm has no model of that name", "DINO model name (timm)"),
])
def test_unknown_names_name_their_own_setting(config, label, name, reason, setting):
    scorers = Scorers(config)
    with pytest.raises(ScorerLoadError) as info:
        scorers.clip_model() if label == "CLIP" else scorers.dino_model()
    assert str(info.value) == message(label, name, reason, f"Check Settings > DynFuse > {setting}")
    assert loaded_models() == []


def test_missing_local_weights_files_are_named(tmp_path):
    missing = str(tmp_path / "clip.safetensors")
    with pytest.raises(ScorerLoadError) as info:
        Scorers(ScorerConfig(clip_weights=missing, device="cpu")).clip_model()
    assert str(info.value) == message("CLIP", "ViT-B-32", f"file not found: {missing}",
                                      f"Check the file in {CLIP_WEIGHTS}")
    with pytest.raises(ScorerLoadError) as info:
        Scorers(ScorerConfig(dino_weights=missing, device="cpu")).dino_model()
    assert str(info.value) == message("DINO", "vit_small_patch16_224.dino", f"file not found: {missing}",
                                      f"Check the file in {DINO_WEIGHTS}")
    assert info.value.setting == "dino_weights"


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


def raising(error):
    """A model factory that counts its calls and raises ``error``."""
    def factory(config):
        factory.calls += 1
        raise error

    factory.calls = 0
    return factory


OFFLINE = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                  "the cached files.")


@pytest.mark.parametrize("config,factory,reason", [
    (ScorerConfig(device="gpu"), None, "CLIP/DINO device name unknown"),
    (ScorerConfig(device="cuda:99"), None, "CLIP/DINO device not available"),
    (ScorerConfig(device="cpu", precision="fp8"), None, "CLIP/DINO precision unknown"),
    (CPU, raising(torch.cuda.OutOfMemoryError("CUDA out of memory")), "not enough memory for the CLIP model"),
    (CPU, raising(OFFLINE), "CLIP weights not available offline"),
    (ScorerConfig(device="cpu", clip_weights="/nowhere/clip.pt"), None, "CLIP weights file not found"),
    (ScorerConfig(device="cpu", clip_weights=__file__), None, "CLIP weights file does not load"),
    (ScorerConfig(device="cpu", clip_model="ViT-Nope"), None, "CLIP model name unknown"),
    (ScorerConfig(device="cpu", clip_pretrained="openia"), None, "CLIP pretrained tag unknown"),
])
def test_each_load_failure_says_why_in_a_few_words_for_the_infotext(config, factory, reason):
    with pytest.raises(ScorerLoadError) as info:
        Scorers(config, clip_factory=factory).clip_model()
    assert info.value.reason == reason
    assert isinstance(info.value, ModelDownloadError) == reason.endswith("not available offline")


def test_a_failed_download_is_not_tried_again_until_a_setting_changes():
    """Offline, each try waits through the hub's retries: the same settings fail at once with the same message."""
    offline = raising(OFFLINE)
    with pytest.raises(ModelDownloadError) as first:
        Scorers(CPU, dino_factory=offline).dino_model()
    with pytest.raises(ModelDownloadError) as again:
        Scorers(CPU, dino_factory=offline).dino_model()
    assert offline.calls == 1 and str(again.value) == str(first.value) and again.value.reason == first.value.reason
    moved = ScorerConfig(device="cpu", precision="fp32", cache_dir="/models/cache")
    with pytest.raises(ModelDownloadError):
        Scorers(moved, dino_factory=offline).dino_model()
    assert offline.calls == 2
    unload()  # releasing the models does not forget the failure
    with pytest.raises(ModelDownloadError):
        Scorers(moved, dino_factory=offline).dino_model()
    assert offline.calls == 2


def test_other_load_failures_are_tried_again_each_time():
    """A weights file may be fixed in place, and memory may be free next time."""
    broken = raising(RuntimeError("unexpected key in state dict"))
    config = ScorerConfig(device="cpu", precision="fp32", dino_weights=__file__)
    for _ in range(2):
        with pytest.raises(ScorerLoadError) as info:
            Scorers(config, dino_factory=broken).dino_model()
        assert info.value.reason == "DINO weights file does not load"
    assert broken.calls == 2
