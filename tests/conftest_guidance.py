"""Shared helpers for the guidance tests: real open_clip / timm architectures with random weights.

A test module imports what it needs and the autouse fixture:
``from conftest_guidance import CPU, TINY, guidance_release_models``.
"""
from __future__ import annotations

import pytest
import torch

from lib_dynfuse.guidance import scorers


def tiny_clip(config: scorers.ScorerConfig) -> torch.nn.Module:
    """open_clip's ViT-B-32 class at toy width and depth (same tokenizer vocabulary), random weights."""
    import open_clip

    torch.manual_seed(1)
    return open_clip.create_model(
        "ViT-B-32", pretrained=None, embed_dim=32,
        vision_cfg={"image_size": 224, "layers": 1, "width": 64, "patch_size": 32, "head_width": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1})


def tiny_dino(config: scorers.ScorerConfig) -> torch.nn.Module:
    """timm's vit_small_patch16_224.dino at toy width and depth, random weights, pooled features."""
    import timm

    torch.manual_seed(2)
    return timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, depth=1,
                             embed_dim=64, num_heads=2)


def full_clip(config: scorers.ScorerConfig) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(3)
    return open_clip.create_model("ViT-B-32", pretrained=None)


def full_dino(config: scorers.ScorerConfig) -> torch.nn.Module:
    import timm

    torch.manual_seed(4)
    return timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)


TINY = {"clip_factory": tiny_clip, "dino_factory": tiny_dino}
FULL = {"clip_factory": full_clip, "dino_factory": full_dino}
CPU = scorers.ScorerConfig(device="cpu", precision="fp32")


@pytest.fixture(autouse=True)
def guidance_release_models():
    """Empties the model cache and forgets failed downloads after each test so no test sees another's models."""
    yield
    scorers.unload()
    scorers._UNAVAILABLE.clear()
