"""Puts the fake Forge Neo on sys.path for one test: the fake Forge's harness (tests/fakehost/forge/forge_harness.py)
with Neo's folders first, so that Neo's modules replace the fake Forge's where Neo changed them.

Not a Forge Neo file: test support only. Everything but `neo_host` is the fake Forge's harness, re-exported.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("forge_harness", ROOT.parent / "forge" / "forge_harness.py")
forge_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(forge_harness)
globals().update({k: v for k, v in vars(forge_harness).items() if not k.startswith("_") and k != "ROOT"})

# network.py (NetworkOnDisk, Network) is the fake Forge's: Neo has the same fields.
PATHS = [str(ROOT), str(ROOT / "sd_forge_lora"), str(forge_harness.ROOT / "sd_forge_lora")]
NEO_ADAPTER = "lib_dynfuse.hosts.neo:NeoAdapter"

neo_host = functools.partial(forge_harness.forge_host, paths=PATHS)
tiny_guidance_models = functools.partial(forge_harness.tiny_guidance_models, adapter=NEO_ADAPTER)


def adapter_module():
    """lib_dynfuse.hosts.neo as imported now (other test modules' fixtures re-import lib_dynfuse.hosts)."""
    return importlib.import_module("lib_dynfuse.hosts.neo")


def dynfuse(host, **settings):
    """An always-on script running a new NeoAdapter with DynFuse on (``settings`` over the defaults), and a script
    runner holding it alone."""
    from lib_dynfuse.settings import DynFuseSettings

    script = forge_harness.AdapterScript(host, adapter_module().NeoAdapter(), DynFuseSettings(enabled=True, **settings))
    return script, host.scripts.ScriptRunner([script])
