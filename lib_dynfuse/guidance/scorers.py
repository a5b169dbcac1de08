"""CLIP and DINO image/text encoders for guidance and scores, loaded on first use.

open_clip and timm are imported inside functions only: importing the extension never loads them.
Models live in a small module-level cache (one CLIP, one DINO) that survives between generations;
``unload()`` releases them.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ScorerLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ScorerConfig:
    """Which encoders to load and where. Empty strings mean "not set".

    clip_weights / dino_weights: local weights files (for offline machines); they override the
    pretrained tag / the timm hub download. device: "auto" (CUDA when available), "cpu", "cuda:0", ...
    precision: "auto" (fp16 on CUDA, fp32 elsewhere), "fp32", "fp16" or "bf16".
    """
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    clip_weights: str = ""
    dino_model: str = "vit_small_patch16_224.dino"
    dino_weights: str = ""
    cache_dir: str = ""
    device: str = "auto"
    precision: str = "auto"

    def torch_device(self) -> torch.device:
        if self.device in ("", "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise ValueError(f"DynFuse guidance: unknown precision '{self.precision}' "
                             f"(use one of {', '.join(PRECISIONS)}).")
        if self.precision == "auto":
            return torch.float16 if self.torch_device().type == "cuda" else torch.float32
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]


ModelFactory = Callable[[ScorerConfig], nn.Module]


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    return path


def open_clip_factory(config: ScorerConfig) -> nn.Module:
    """The default CLIP factory: open_clip model ``clip_model`` with ``clip_weights`` or ``clip_pretrained``."""
    import open_clip

    pretrained = _existing_file(config.clip_weights) if config.clip_weights else config.clip_pretrained or None
    return open_clip.create_model(config.clip_model, pretrained=pretrained, cache_dir=config.cache_dir or None,
                                  require_pretrained=pretrained is not None)


def timm_dino_factory(config: ScorerConfig) -> nn.Module:
    """The default DINO factory: timm model ``dino_model`` returning pooled features (no classifier head)."""
    import timm

    if config.dino_weights:
        overlay = {"file": _existing_file(config.dino_weights)}
        return timm.create_model(config.dino_model, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    return timm.create_model(config.dino_model, pretrained=True, num_classes=0,
                             cache_dir=config.cache_dir or None)


def _short(error: BaseException) -> str:
    # Library errors can list every known model; the first sentence is what the user needs.
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 160 and ". " in text:
        text = text[:text.index(". ")]
    return text[:200]


_CACHE: dict[str, tuple[tuple, nn.Module]] = {}


def _load(slot: str, label: str, setting: str, name: str, key: tuple, factory: ModelFactory,
          config: ScorerConfig) -> nn.Module:
    cached = _CACHE.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    _CACHE.pop(slot, None)  # one model per slot: a changed setting replaces the old model
    try:
        # Forge generates under inference_mode; parameters made there could never be differentiated.
        with torch.inference_mode(False):
            model = factory(config).to(config.torch_device(), config.torch_dtype())
            model = model.eval().requires_grad_(False)
    except Exception as error:
        raise ScorerLoadError(
            f"DynFuse guidance: could not load the {label} model '{name}' ({_short(error)}). Set a local "
            f"weights file in Settings > DynFuse > {setting}, or turn guidance off.") from error
    _CACHE[slot] = (key, model)
    return model


def unload() -> None:
    """Releases every cached CLIP/DINO model and frees the memory they held."""
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loaded_models() -> list[str]:
    """Names of the slots currently holding a model ("clip", "dino")."""
    return sorted(_CACHE)


def _input_size(model: nn.Module, default: int = 224) -> tuple[int, int]:
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, default, default))[-2:]
    return (size, size) if isinstance(size, int) else tuple(size)


def preprocess(images: torch.Tensor, size: tuple[int, int], mean: tuple, std: tuple,
               dtype: torch.dtype) -> torch.Tensor:
    """RGB in [0, 1] ``[B, 3, H, W]`` -> encoder input: bicubic antialiased resize to ``size``, then
    mean/std normalisation, in fp32 and cast to ``dtype`` last."""
    x = images.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


class Scorers:
    """CLIP (style, text) and DINO (subject) embeddings of RGB images in [0, 1].

    Models are loaded on first use through ``clip_factory`` / ``dino_factory`` (defaults: open_clip and
    timm per ``config``); tests inject random-weight factories. Outputs are fp32 and not normalised.
    Embedding calls follow the caller's grad mode, so gradients flow to the input images when enabled.
    """

    def __init__(self, config: ScorerConfig = ScorerConfig(), *, clip_factory: ModelFactory | None = None,
                 dino_factory: ModelFactory | None = None) -> None:
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self._clip_factory = clip_factory or open_clip_factory
        self._dino_factory = dino_factory or timm_dino_factory

    def clip_model(self) -> nn.Module:
        c = self.config
        key = (c.clip_model, c.clip_pretrained, c.clip_weights, c.cache_dir, self.device, self.dtype,
               self._clip_factory)
        return _load("clip", "CLIP", "CLIP weights path", c.clip_model, key, self._clip_factory, c)

    def dino_model(self) -> nn.Module:
        c = self.config
        key = (c.dino_model, c.dino_weights, c.cache_dir, self.device, self.dtype, self._dino_factory)
        return _load("dino", "DINO", "DINO weights path", c.dino_model, key, self._dino_factory, c)

    def clip_image(self, images: torch.Tensor) -> torch.Tensor:
        model = self.clip_model()
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        x = preprocess(images.to(self.device), _input_size(model), tuple(cfg.get("mean", CLIP_MEAN)),
                       tuple(cfg.get("std", CLIP_STD)), self.dtype)
        return model.encode_image(x).float()

    def clip_text(self, texts: list[str]) -> torch.Tensor:
        import open_clip

        model = self.clip_model()
        try:
            tokenizer = open_clip.get_tokenizer(self.config.clip_model)
        except Exception:  # noqa: BLE001 -- a custom model name: fall back to the standard CLIP tokenizer
            tokenizer = open_clip.tokenize
        return model.encode_text(tokenizer(texts).to(self.device)).float()

    def dino_image(self, images: torch.Tensor) -> torch.Tensor:
        model = self.dino_model()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        x = preprocess(images.to(self.device), _input_size(model), tuple(cfg.get("mean", IMAGENET_MEAN)),
                       tuple(cfg.get("std", IMAGENET_STD)), self.dtype)
        return model(x).float()


__all__ = ["ScorerConfig", "ScorerLoadError", "Scorers", "loaded_models", "open_clip_factory", "preprocess",
           "timm_dino_factory", "unload"]
