"""The DynFuse section of the WebUI's Settings tab (guidance models, device, memory) and reading it back."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from lib_dynfuse.guidance import scorers
from lib_dynfuse.guidance.scorers import SETTING_LABELS, ScorerConfig, settings_path

SECTION = ("dynfuse", "DynFuse")
UNLOAD_KEY = "dynfuse_unload_after"
COMPILED_KEY = "dynfuse_compiled_divergence"
BUDGET_KEY = "dynfuse_divergence_budget_mb"

# key -> (default, label, ScorerConfig field or None). The CLIP/DINO models serve both guidance and the scores;
# their options carry the labels their error messages name (guidance.scorers.SETTING_LABELS).
OPTIONS: dict[str, tuple[object, str, str | None]] = {
    "dynfuse_scores": (True, "Write CLIP/DINO scores to the infotext", None),
    **{f"dynfuse_{f.name}": (f.default, SETTING_LABELS[f.name], f.name) for f in fields(ScorerConfig)},
    UNLOAD_KEY: (False, "Unload the CLIP/DINO models after each generation", None),
    COMPILED_KEY: (False, "Compile the divergence with torch.compile (CUDA; the first generation compiles for a "
                          "minute)", None),
    BUDGET_KEY: (0, "Memory for the divergence in MB; past it, it is computed in pieces (0: half of the free GPU "
                    "memory, 1024 on the CPU)", None),
}


def where(key: str) -> str:
    """How a message names an option: "Settings > DynFuse > <label>"."""
    return settings_path(OPTIONS[key][1])


def register_options() -> None:
    """on_ui_settings callback: add the options (idempotent; values already saved are kept)."""
    import gradio as gr

    from modules import shared

    for key, (default, label, _) in OPTIONS.items():
        if key == "dynfuse_precision":
            info = shared.OptionInfo(default, label, gr.Radio, {"choices": ["auto", "fp32", "fp16", "bf16"]},
                                     section=SECTION)
        elif key == UNLOAD_KEY:
            # Turning it on frees the models now, not only after the next generation that uses them.
            info = shared.OptionInfo(default, label, onchange=unload_models_if_asked, section=SECTION)
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


def unload_models_if_asked() -> None:
    """Free the CLIP/DINO models when the unload option is on: at the end of every job (any job, DynFuse on or
    off) and when the option is turned on."""
    if read_option(UNLOAD_KEY) and scorers.loaded_models():
        scorers.unload()


def samples_format() -> str | None:
    """The host's image file format (opts.samples_format): its LoRA browser also shows previews in it."""
    try:
        from modules import shared

        return getattr(shared.opts, "samples_format", None)
    except Exception:  # noqa: BLE001 - no host
        return None


def scorer_config() -> ScorerConfig:
    return ScorerConfig(**{field: read_option(key) for key, (_, _, field) in OPTIONS.items() if field})


def engine_options(settings: Any) -> Any:
    """A generation's engine options, with the compiled-divergence switch and the divergence's memory budget of the
    Settings tab."""
    return settings.engine_options(compiled=bool(read_option(COMPILED_KEY)), budget_mb=divergence_budget_mb())


def divergence_budget_mb() -> int:
    """The Settings tab's divergence budget (a number box may give a float); a negative or unreadable one is said in
    the console and the default (0) is used."""
    value = read_option(BUDGET_KEY)
    try:
        budget = int(value)
    except (TypeError, ValueError):
        budget = -1
    if budget < 0:
        print(f"DynFuse: {where(BUDGET_KEY)} is {value!r}, not a number of MB >= 0; the default (0) is used.")
        return 0
    return budget
