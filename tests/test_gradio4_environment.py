"""Runs the UI tests a second time under gradio 4.40 (Forge's pin), in the virtualenv `.ci/run` prepares.

One pytest command then covers both gradio versions; without that virtualenv the pass is skipped with the
command that makes it.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-gradio4" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


@pytest.mark.slow
def test_ui_tests_pass_under_gradio_4():
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv-gradio4: run `bash .ci/run` once, or create it with "
                    "`python -m venv --system-site-packages .venv-gradio4 && "
                    ".venv-gradio4/bin/pip install -r .ci/gradio4-requirements.txt`")
    version = subprocess.run([str(VENV_PYTHON), "-c", "import gradio; print(gradio.__version__)"],
                             capture_output=True, text=True, cwd=ROOT)
    assert version.stdout.strip() == "4.40.0", version.stderr
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_ui_*.py")) + ["tests/browser"]
    result = subprocess.run([str(VENV_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
