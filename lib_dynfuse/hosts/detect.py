"""Which WebUI hosts us, decided by capability (never by git tag):

* Forge (main): the webui root holds `modules_forge` and the `backend` package, whose LoRA module has Forge's
  per-file LoraLoader;
* Forge Neo: the same packages, with ComfyUI's per-weight patch store instead (no LoraLoader);
* reForge, Forge Classic, old Forge: `modules_forge` with `ldm_patched` and no `backend` -> unsupported, each named
  in its message (reForge by its ComfyUI weight adapters; Classic and old Forge, whose code is the same, by the
  version file they ship);
* otherwise AUTOMATIC1111.

Each host's adapter lives in its own module and is imported only when that host is detected.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from lib_dynfuse.hosts.base import HostAdapter, Job, refuse, say

A1111 = "a1111"
FORGE = "forge"
NEO = "forge-neo"
REFORGE = "reforge"
FORGE_CLASSIC = "forge-classic"
OLD_FORGE = "old-forge"

# host -> "module:Class"
ADAPTERS = {
    A1111: "lib_dynfuse.hosts.a1111:A1111Adapter",
    FORGE: "lib_dynfuse.hosts.forge:ForgeAdapter",
    NEO: "lib_dynfuse.hosts.neo:NeoAdapter",
}

SUPPORTED = "DynFuse supports AUTOMATIC1111 1.9-1.10.1, Forge (main) and Forge Neo."
UNSUPPORTED = {
    REFORGE: f"this WebUI is reForge (ldm_patched with ComfyUI's patch store); {SUPPORTED}",
    FORGE_CLASSIC: f"this WebUI is Forge Classic (ldm_patched, the patch store of old Forge); {SUPPORTED}",
    OLD_FORGE: f"this WebUI is old Forge (ldm_patched, from before Forge's backend rewrite); {SUPPORTED}",
}
STAYS_OFF = "It stays off; the WebUI works as usual."


def _root() -> str | None:
    try:
        from modules import paths

        return os.path.realpath(paths.script_path)
    except Exception:  # noqa: BLE001 - no host, or a host without modules.paths
        return None


def _spec_under_root(name: str, root: str | None) -> bool:
    """The module exists and lives inside the webui (a stray pip package of the same name does not count)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if root is None:
        return True
    locations = [spec.origin] if spec.origin and spec.origin != "namespace" else []
    locations += list(spec.submodule_search_locations or [])
    return any(_inside(loc, root) for loc in locations if loc)


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (a sibling folder such as ``webui-x`` is not)."""
    path, root = os.path.normcase(os.path.realpath(path)), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # another drive (Windows)
        return False


def detect_host() -> str:
    root = _root()
    if not _spec_under_root("modules_forge", root):
        return A1111
    if _spec_under_root("backend.patcher.lora", root) and _spec_under_root("backend.diffusion_engine.base", root):
        return FORGE if _has_lora_loader() else NEO
    if _spec_under_root("ldm_patched.modules.weight_adapter", root):
        return REFORGE
    return FORGE_CLASSIC if _forge_version() == "classic" else OLD_FORGE


def _has_lora_loader() -> bool:
    """Forge keeps LoRAs per file and merges them with backend.patcher.lora.LoraLoader; Forge Neo replaced both
    with ComfyUI's ModelPatcher. A module that cannot be imported is taken for Forge's: its adapter checks the
    store of the loaded model before every takeover and says what it found."""
    try:
        return hasattr(importlib.import_module("backend.patcher.lora"), "LoraLoader")
    except Exception:  # noqa: BLE001 - a broken host module: let the adapter's own checks speak
        return True


def _forge_version() -> str | None:
    try:
        return str(importlib.import_module("modules_forge.forge_version").version)
    except Exception:  # noqa: BLE001 - no version file
        return None


class UnsupportedHost(HostAdapter):
    """Keeps dynfuse off with one clear message, in the console at load and atop the accordion (`notice`); the
    WebUI runs as usual. A generation that turns DynFuse on anyway (API, pasted infotext) gets a note."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__()
        self.message = message
        self.name = name

    @property
    def notice(self) -> str:
        return f"{self.message[:1].upper()}{self.message[1:]} {STAYS_OFF}"

    def begin_job(self, p: Any, settings: Any) -> Job | None:
        if settings is not None and getattr(settings, "enabled", False):
            refuse(p, f"{self.message} DynFuse is off for this generation.", "off: unsupported WebUI")
        return None

    def take_over(self, p: Any, job: Job) -> None:
        return None

    def release(self, job: Job, keep_job: bool = False) -> None:
        return None


_adapter: HostAdapter | None = None


def get_adapter() -> HostAdapter:
    """The adapter for this process's host, created once (a Reload UI keeps it; cleanup() resets its state)."""
    global _adapter
    if _adapter is None:
        host = detect_host()
        if host in UNSUPPORTED:
            _adapter = UnsupportedHost(UNSUPPORTED[host], host)
            say(f"{UNSUPPORTED[host]} {STAYS_OFF}")
        else:
            module_name, class_name = ADAPTERS[host].split(":")
            _adapter = getattr(importlib.import_module(module_name), class_name)()
    return _adapter


def unsupported_notice() -> str | None:
    """The message the accordion shows when DynFuse cannot run on this WebUI, else None."""
    adapter = get_adapter()
    return adapter.notice if isinstance(adapter, UnsupportedHost) else None


def reset_adapter() -> None:
    """Forget the adapter (script unload, tests switching hosts)."""
    global _adapter
    if _adapter is not None:
        _adapter.cleanup()
    _adapter = None
