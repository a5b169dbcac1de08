"""The DynFuse section of the WebUI's Settings tab (guidance models, device, memory) and reading it back."""

from __future__ import annotations

from typing import Any

SECTION = ("dynfuse", "DynFuse")

# key -> (default, label, ScorerConfig field or None). The CLIP/DINO models serve both guidance and the scores;
# their error messages name the "CLIP weights path" / "DINO weights path" options.
OPTIONS: dict[str, tuple[object, str, str | None]] = {
    "dynfuse_scores": (True, "Write CLIP/DINO scores to the infotext", None),
    "dynfuse_clip_model": ("ViT-B-32", "CLIP model name (open_clip)", "clip_model"),
    "dynfuse_clip_pretrained": ("openai", "CLIP pretrained tag (open_clip)", "clip_pretrained"),
    "dynfuse_clip_weights": ("", "CLIP weights path: a local weights file (overrides the pretrained tag)",
                             "clip_weights"),
    "dynfuse_dino_model": ("vit_small_patch16_224.dino", "DINO model name (timm)", "dino_model"),
    "dynfuse_dino_weights": ("", "DINO weights path: a local weights file (overrides the timm download)",
                             "dino_weights"),
    "dynfuse_cache_dir": ("", "CLIP/DINO model cache folder (empty: the libraries' default)", "cache_dir"),
    "dynfuse_device": ("auto", "CLIP/DINO device (auto, cpu, cuda:0, ...)", "device"),
    "dynfuse_precision": ("auto", "CLIP/DINO precision", "precision"),
    "dynfuse_unload_after": (False, "Unload the CLIP/DINO models after each generation", None),
}


def where(key: str) -> str:
    """How a message names an option: "Settings > DynFuse > <label>"."""
    return f"Settings > {SECTION[1]} > {OPTIONS[key][1]}"


def register_options() -> None:
    """on_ui_settings callback: add the options (idempotent; values already saved are kept)."""
    import gradio as gr

    from modules import shared

    for key, (default, label, _) in OPTIONS.items():
        if key == "dynfuse_precision":
            info = shared.OptionInfo(default, label, gr.Radio, {"choices": ["auto", "fp32", "fp16", "bf16"]},
                                     section=SECTION)
        else:
            info = shared.OptionInfo(default, label, section=SECTION)
        shared.opts.add_option(key, info)


def read_option(key: str) -> Any:
    """The saved value, else the default (also when the settings section was never registered)."""
    default = OPTIONS[key][0]
    try:
        from modules import shared

        return shared.opts.data.get(key, default)
    except Exception:  # noqa: BLE001 - no host
        return default


def scorer_config() -> Any:
    from lib_dynfuse.guidance import ScorerConfig

    return ScorerConfig(**{field: read_option(key) for key, (_, _, field) in OPTIONS.items() if field})
