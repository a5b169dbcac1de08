import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib, pkgutil, sys
for blocked in ("modules", "gradio", "launch"):
    sys.modules[blocked] = None  # import raises ImportError, as without a WebUI
import lib_dynfuse
core = [m.name for m in pkgutil.walk_packages(lib_dynfuse.__path__, "lib_dynfuse.")
        if not m.name.startswith("lib_dynfuse.hosts") and not m.name.endswith(".__main__")]
for name in core:
    importlib.import_module(name)
heavy = sorted(m for m in ("open_clip", "timm") if m in sys.modules)
print(len(core), heavy)
"""


def test_the_core_imports_without_a_webui_and_without_open_clip_or_timm():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    count, heavy = result.stdout.strip().split(" ", 1)
    assert int(count) >= 10
    assert heavy == "[]"
