"""Errors that stop guidance from being set up. Each message is one line for the console and the UI."""
from __future__ import annotations

import torch

# Every guidance message starts so; the hosts strip it to say the rest in a note.
PREFIX = "DynFuse: guidance: "


class GuidanceError(RuntimeError):
    """Guidance cannot run for this job; the generation goes on without it. ``reason`` says why in a few words,
    for the infotext ("guidance off: <reason>")."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DecoderError(GuidanceError):
    """A decoder could not be built."""


class ScorerLoadError(GuidanceError):
    """A CLIP or DINO model could not be loaded; ``setting`` is the ScorerConfig field the message names."""

    def __init__(self, message: str, setting: str, reason: str) -> None:
        super().__init__(message, reason)
        self.setting = setting


class ModelDownloadError(ScorerLoadError):
    """No local weights were set and the download failed (offline machine, blocked host, full disk)."""


class ScorerSettingError(ValueError):
    """Raised by a model factory when a setting names something that does not exist (an unknown model name or
    pretrained tag); ``setting`` is that ScorerConfig field."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(reason)
        self.setting = setting


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error (CUDA's, or another backend's with the usual words)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def short(error: BaseException) -> str:
    """An error's text for a one-line message: library errors can list every known model, or explain at
    length; the first sentence is what the user needs."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 100 and ". " in text:
        text = text[:text.index(". ")]
    return text[:200]
