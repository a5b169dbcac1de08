"""Shared helpers for the guidance tests: real open_clip / timm architectures with random weights.

Import the fixtures by name into a test module (``from conftest_guidance import guidance_tiny_factories``).
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


@pytest.fixture
def guidance_tiny_factories():
    """``dict(clip_factory=..., dino_factory=...)`` for Scorers / Guidance.prepare; empties the model
    cache afterwards so no test sees another's models."""
    yield {"clip_factory": tiny_clip, "dino_factory": tiny_dino}
    scorers.unload()


@pytest.fixture
def guidance_cpu_config() -> scorers.ScorerConfig:
    return scorers.ScorerConfig(device="cpu", precision="fp32")
