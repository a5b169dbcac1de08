"""CLIP and DINO image/text encoders for guidance and scores, loaded on first use.

open_clip and timm are imported inside functions only: importing the extension never loads them.
Models live in a small module-level cache (one CLIP, one DINO) that survives between generations;
``unload()`` releases them.
"""
from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PREFIX, ModelDownloadError, ScorerLoadError, ScorerSettingError, out_of_memory, short

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# The Settings tab shows each ScorerConfig field under these labels (hosts/options.py registers them), and the
# failure messages name the one to change by them.
SETTING_LABELS = {
    "clip_model": "CLIP model name (open_clip)",
    "clip_pretrained": "CLIP pretrained tag (open_clip)",
    "clip_weights": "CLIP weights path (a local file; overrides the pretrained tag)",
    "dino_model": "DINO model name (timm)",
    "dino_weights": "DINO weights path (a local file; overrides the timm download)",
    "cache_dir": "CLIP/DINO model cache folder (empty: the libraries' default)",
    "device": "CLIP/DINO device (auto, cpu, cuda:0, ...)",
    "precision": "CLIP/DINO precision",
}


def settings_path(label: str) -> str:
    """How a message names an option of the DynFuse settings section."""
    return f"Settings > DynFuse > {label}"


def where(field: str) -> str:
    """How a message names the option of a ScorerConfig field: "Settings > DynFuse > <label>"."""
    return settings_path(SETTING_LABELS[field])


@dataclass(frozen=True)
class ScorerConfig:
    """Which encoders to load and where. Empty strings mean "not set".

    clip_weights / dino_weights: local weights files (for offline machines); they override the
    pretrained tag / the timm hub download (clip_pretrained still says which weights the file holds, and
    so the activation to build). device: "auto" (CUDA when available), "cpu", "cuda:0", ...
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
        """The device; raises ScorerLoadError naming the device option when torch cannot use it here."""
        if self.device in ("", "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ScorerLoadError(f"{PREFIX}the CLIP/DINO device '{self.device}' is not a device name. "
                                  f"Set {where('device')} to auto, cpu or cuda:0, or turn guidance off.",
                                  "device", "CLIP/DINO device name unknown") from None
        if device.type != "cpu":
            try:
                torch.empty(0, device=device)  # a missing GPU fails here rather than in the middle of a load
            except Exception as error:  # noqa: BLE001 -- RuntimeError, or AssertionError from a CPU-only build
                raise ScorerLoadError(
                    f"{PREFIX}the CLIP/DINO device '{self.device}' cannot be used on this machine "
                    f"({short(error)}). Set {where('device')} to auto or cpu, or turn guidance off.",
                    "device", "CLIP/DINO device not available") from None
        return device

    def torch_dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise ScorerLoadError(f"{PREFIX}unknown CLIP/DINO precision '{self.precision}'. Set "
                                  f"{where('precision')} to one of {', '.join(PRECISIONS)}, or turn guidance off.",
                                  "precision", "CLIP/DINO precision unknown")
        if self.precision == "auto":
            return torch.float16 if self.torch_device().type == "cuda" else torch.float32
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]


ModelFactory = Callable[[ScorerConfig], nn.Module]


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    return path


def quick_gelu(model: str, tag: str) -> bool:
    """Whether the open_clip weights ``tag`` of the built-in model ``model`` were trained with QuickGELU.

    open_clip 3 builds "ViT-B-32" with GELU whatever the weights, and only warns when the tag says otherwise;
    a local weights file tells it nothing. Before 2.29 the pretrained configs carry no flag, and the "openai" tag
    loads through open_clip's own OpenAI loader, which builds QuickGELU, as a local copy of those weights needs.
    Models named with a schema ("hf-hub:", "local-dir:") bring a config that says it itself.
    """
    import open_clip

    if not tag or ":" in model:
        return False
    return bool(open_clip.get_pretrained_cfg(_open_clip_name(model), tag).get("quick_gelu", tag.lower() == "openai"))


def _open_clip_name(model: str) -> str:
    return model.replace("/", "-")  # as open_clip itself reads "ViT-B/32"


def open_clip_arguments(config: ScorerConfig) -> dict:
    """``open_clip.create_model`` keyword arguments for ``config`` (besides the model name): the weights from
    ``clip_weights`` or the pretrained tag, with the activation the tag's weights were trained with."""
    pretrained = _existing_file(config.clip_weights) if config.clip_weights else config.clip_pretrained or None
    return {"pretrained": pretrained, "force_quick_gelu": quick_gelu(config.clip_model, config.clip_pretrained),
            "cache_dir": config.cache_dir or None, "require_pretrained": pretrained is not None}


def open_clip_factory(config: ScorerConfig) -> nn.Module:
    """The default CLIP factory: open_clip model ``clip_model`` with ``clip_weights`` or ``clip_pretrained``."""
    import open_clip

    name, tag = _open_clip_name(config.clip_model), config.clip_pretrained
    if ":" not in name:  # "hf-hub:" / "local-dir:" models are not listed, and ignore the tag
        if name not in open_clip.list_models():
            raise ScorerSettingError("clip_model", "open_clip has no model of that name")
        if tag and not config.clip_weights and not open_clip.get_pretrained_cfg(name, tag) and not os.path.isfile(tag):
            raise ScorerSettingError("clip_pretrained", f"open_clip has no pretrained tag '{tag}' for it")
    return open_clip.create_model(config.clip_model, **open_clip_arguments(config))


def timm_dino_factory(config: ScorerConfig) -> nn.Module:
    """The default DINO factory: timm model ``dino_model`` returning pooled features (no classifier head)."""
    import timm

    name = config.dino_model
    if ":" not in name and not (timm.is_model(name) and ("." not in name or timm.list_pretrained(name))):
        raise ScorerSettingError("dino_model", "timm has no model of that name")
    if config.dino_weights:
        overlay = {"file": _existing_file(config.dino_weights)}
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    return timm.create_model(name, pretrained=True, num_classes=0, cache_dir=config.cache_dir or None)


# The pip name of a module the models import, where it is not the module's own.
PACKAGES = {"open_clip": "open_clip_torch"}

_CACHE: dict[str, tuple[tuple, nn.Module]] = {}
# Per slot, the key and error of a download that failed. Offline, each try waits through the hub's retries (most
# of a minute) before it fails: it is not tried again with the same settings until the process ends.
_UNAVAILABLE: dict[str, tuple[tuple, ModelDownloadError]] = {}


def _load(slot: str, name: str, key: tuple, factory: ModelFactory, config: ScorerConfig,
          device: torch.device, dtype: torch.dtype) -> nn.Module:
    cached = _CACHE.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    failed = _UNAVAILABLE.get(slot)
    if failed is not None and failed[0] == key:
        error = failed[1]
        raise ModelDownloadError(str(error), error.setting, error.reason)
    _CACHE.pop(slot, None)  # one model per slot: a changed setting replaces the old model
    try:
        # Forge generates under inference_mode; parameters made there could never be differentiated.
        with torch.inference_mode(False):
            model = factory(config).to(device, dtype)
            model = model.eval().requires_grad_(False)
    except Exception as error:
        load_error = _load_error(slot, name, error, config, device)
        if isinstance(load_error, ModelDownloadError):
            _UNAVAILABLE[slot] = (key, load_error)
        raise load_error from error
    _UNAVAILABLE.pop(slot, None)
    _CACHE[slot] = (key, model)
    return model


def _load_error(slot: str, name: str, error: Exception, config: ScorerConfig,
                device: torch.device) -> ScorerLoadError:
    """The message for a model that did not load, naming the option that most likely fixes it."""
    label = slot.upper()
    failed = f"{PREFIX}could not load the {label} model '{name}'"
    if isinstance(error, ImportError) and error.name:
        package = PACKAGES.get(error.name.partition(".")[0], error.name.partition(".")[0])
        return ScorerLoadError(f"{failed}: the Python package {package} is not installed. Restart the WebUI so that "
                               f"DynFuse's install.py installs it, or run \"{sys.executable}\" -m pip install "
                               f"{package}, or turn guidance off.", f"{slot}_model", f"{package} not installed")
    if isinstance(error, ScorerSettingError):
        return ScorerLoadError(f"{failed} ({error}). Check {where(error.setting)}, or turn guidance off.",
                               error.setting, f"{SETTING_LABELS[error.setting].partition(' (')[0]} unknown")
    if out_of_memory(error):
        return ScorerLoadError(f"{failed}: not enough memory on {device}. Set {where('device')} to cpu, or turn "
                               "guidance off.", "device", f"not enough memory for the {label} model")
    weights = f"{slot}_weights"
    if getattr(config, weights):
        missing = isinstance(error, FileNotFoundError)
        return ScorerLoadError(f"{failed} ({short(error)}). Check the file in {where(weights)}, or turn guidance "
                               "off.", weights, f"{label} weights file {'not found' if missing else 'does not load'}")
    # Nothing local to blame: the download failed (offline machine, blocked host, full disk).
    return ModelDownloadError(f"{failed} ({short(error)}). Set a local weights file in {where(weights)}, or turn "
                              "guidance off.", weights, f"{label} weights not available offline")


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
    """RGB in [0, 1] ``[B, 3, H, W]`` -> encoder input as CLIP's and DINO's own preprocessing makes it: bicubic
    antialiased resize until the image covers ``size`` (the shorter side fits, aspect ratio kept), center crop,
    then mean/std normalisation; in fp32, cast to ``dtype`` last. Differentiable with respect to ``images``."""
    x = images.float()
    (h, w), (th, tw) = x.shape[-2:], size
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        resized = (max(th, round(h * scale)), max(tw, round(w * scale)))
        if resized != (h, w):
            x = F.interpolate(x, size=resized, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
        x = x[..., top:top + th, left:left + tw]
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
        """Raises ScorerLoadError when the configured device or precision cannot be used."""
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self._clip_factory = clip_factory or open_clip_factory
        self._dino_factory = dino_factory or timm_dino_factory

    def clip_model(self) -> nn.Module:
        c = self.config
        key = (c.clip_model, c.clip_pretrained, c.clip_weights, c.cache_dir, self.device, self.dtype,
               self._clip_factory)
        return _load("clip", c.clip_model, key, self._clip_factory, c, self.device, self.dtype)

    def dino_model(self) -> nn.Module:
        c = self.config
        key = (c.dino_model, c.dino_weights, c.cache_dir, self.device, self.dtype, self._dino_factory)
        return _load("dino", c.dino_model, key, self._dino_factory, c, self.device, self.dtype)

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


__all__ = ["SETTING_LABELS", "ScorerConfig", "ScorerLoadError", "ScorerSettingError", "Scorers", "loaded_models",
           "open_clip_arguments", "open_clip_factory", "preprocess", "quick_gelu", "settings_path",
           "timm_dino_factory", "unload", "where"]
