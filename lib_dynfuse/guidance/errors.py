"""Errors that stop guidance from being set up. Each message is one line for the console and the UI."""
from __future__ import annotations


class GuidanceError(RuntimeError):
    """Guidance cannot run for this job; the generation goes on without it."""


class DecoderError(GuidanceError):
    """A decoder could not be built."""


class ScorerLoadError(GuidanceError):
    """A CLIP or DINO model could not be loaded."""
