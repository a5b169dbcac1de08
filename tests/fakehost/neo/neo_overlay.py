"""Not a Forge Neo file: how the fake Neo reuses the fake Forge where Forge Neo 2.26 is the same.

Each package of the fake Neo searches its own folder first, then the fake Forge's (`extend`): a module Neo changed is
a file here, a module Neo kept as Forge had it comes from the fake Forge. A module Neo changed in a few functions
only loads the fake Forge's module under a private name (`forge_module`) and replaces those functions.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FORGE = Path(__file__).resolve().parents[1] / "forge"


def extend(package_path: list[str], package: str) -> None:
    """Let ``package`` (a package of the fake Neo) find the fake Forge's modules after its own."""
    package_path.append(str(FORGE.joinpath(*package.split("."))))


def forge_module(name: str) -> ModuleType:
    """The fake Forge's module ``name`` (e.g. "modules.processing"), loaded as "<name>_forge": a submodule of the
    same host package, so the harness drops it with the host."""
    alias = f"{name}_forge"
    if alias not in sys.modules:
        spec = importlib.util.spec_from_file_location(alias, FORGE.joinpath(*name.split(".")).with_suffix(".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        spec.loader.exec_module(module)
    return sys.modules[alias]


def public(module: ModuleType) -> dict:
    """What ``from module import *`` would bring: for a Neo module that keeps the rest of Forge's."""
    return {name: value for name, value in vars(module).items() if not name.startswith("_")}
