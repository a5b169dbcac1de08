"""The fake Forge's and Forge Neo's harnesses and the Neo families' LoRA writers, loaded by file path: their folders
hold the hosts' own packages (modules, backend), which must not be on sys.path outside the test that runs a host."""
import importlib.util
import sys
from pathlib import Path


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # the writers' dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fh = _load("forge_harness", "fakehost/forge/forge_harness.py")
nh = _load("neo_harness", "fakehost/neo/neo_harness.py")
fl = _load("family_loras", "fakehost/neo/family_loras.py")
