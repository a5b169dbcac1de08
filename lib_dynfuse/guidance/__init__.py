"""Metric-guided correction of the x0 estimate: decoders, CLIP/DINO scorers, references, the step itself.

Importing this package loads neither open_clip nor timm; they are imported when a model is first needed.
"""
from __future__ import annotations

from .correction import SCORE_KEYS, Guidance, GuidanceParams, GuidanceRecord, format_scores
from .decoders import DECODER_KINDS, make_decoder, private_module, taesd_path
from .errors import DecoderError, GuidanceError, ModelDownloadError, ScorerLoadError, ScorerSettingError
from .references import ReferenceImageError, find_preview, load_image, lora_reference, preview_candidates
from .scorers import ScorerConfig, Scorers, loaded_models, unload
from .spaces import eps_from_x0, shift_eps, x0_from_eps

__all__ = ["DECODER_KINDS", "SCORE_KEYS", "DecoderError", "Guidance", "GuidanceError", "GuidanceParams",
           "GuidanceRecord", "ModelDownloadError", "ReferenceImageError", "ScorerConfig", "ScorerLoadError",
           "ScorerSettingError", "Scorers", "eps_from_x0", "find_preview", "format_scores", "load_image",
           "loaded_models", "lora_reference", "make_decoder", "preview_candidates", "private_module", "shift_eps",
           "taesd_path", "unload", "x0_from_eps"]
