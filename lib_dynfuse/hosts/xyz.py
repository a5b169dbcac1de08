"""[DynFuse] axes for the X/Y/Z plot script.

Each axis stores its value on the cell's own `p` (a shallow copy per cell) under XYZ_ATTR, in a fresh dict;
`Script.process` merges that dict over the UI / API settings. Values are checked by `confirm` before the plot
makes its first image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

XYZ_ATTR = "_dynfuse_xyz"
XYZ_MODULE_NAMES = ("xyz_grid.py", "xyz_grid", "scripts.xyz_grid")

# label -> settings field; choices for enumerations
AXES: tuple[tuple[str, str], ...] = (
    ("[DynFuse] Enabled", "enabled"),
    ("[DynFuse] Method", "method"),
    ("[DynFuse] Subject strength", "subject_strength"),
    ("[DynFuse] Style strength", "style_strength"),
    ("[DynFuse] KL temperature", "temperature"),
    ("[DynFuse] Decide every", "decide_every"),
    ("[DynFuse] Divergence tokens", "max_tokens"),
    ("[DynFuse] Guidance strength", "guidance_strength"),
    ("[DynFuse] Guidance balance", "guidance_balance"),
    ("[DynFuse] Guidance start", "guidance_start"),
    ("[DynFuse] Guidance end", "guidance_end"),
)


def overrides(p: Any) -> dict[str, object]:
    return dict(getattr(p, XYZ_ATTR, None) or {})


def _apply(field: str) -> Callable[[Any, object, list], None]:
    def apply(p: Any, x: object, xs: list) -> None:
        from lib_dynfuse.settings import coerce

        # A new dict: cells are shallow copies of one p and must not share their overrides.
        setattr(p, XYZ_ATTR, {**overrides(p), field: coerce(field, x)})

    return apply


def _confirm(field: str) -> Callable[[Any, list], None]:
    def confirm(p: Any, xs: list) -> None:
        from lib_dynfuse.settings import coerce

        for x in xs:
            coerce(field, x)  # SettingsError names the field and the accepted values

    return confirm


def _choices(field: str) -> Callable[[], list[str]] | None:
    from lib_dynfuse.settings import FIELDS

    if field == "enabled":
        return lambda: ["True", "False"]
    choices = FIELDS[field].metadata.get("choices")
    return (lambda: list(choices)) if choices else None


def _axis_type(field: str) -> type:
    from lib_dynfuse.settings import FIELDS

    return float if FIELDS[field].metadata["kind"] in ("float", "optfloat") else str


def find_xyz_module() -> Any | None:
    from modules import scripts

    for entry in scripts.scripts_data:
        if entry.script_class.__module__ in XYZ_MODULE_NAMES and hasattr(entry.module, "axis_options"):
            return entry.module
    return None


def register_axes() -> int:
    """on_before_ui callback: add the axes once (the xyz script is re-executed on Reload UI). Returns how many."""
    module = find_xyz_module()
    if module is None:
        return 0
    present = {getattr(o, "label", None) for o in module.axis_options}
    added = 0
    for label, field in AXES:
        if label in present:
            continue
        module.axis_options.append(module.AxisOption(label, _axis_type(field), _apply(field),
                                                     confirm=_confirm(field), choices=_choices(field)))
        added += 1
    return added
