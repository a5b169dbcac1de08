"""What a newcomer meets before any WebUI: the `demo` extra installs what `python -m lib_dynfuse` imports, and a
missing package is one line naming it and the install command. (`.ci/run` runs the README's commands themselves
in a clean virtualenv.)"""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = 'pip install -e ".[demo]"'


def run_without(module: str, *args: str) -> subprocess.CompletedProcess:
    # None in sys.modules makes `import module` fail as if it were not installed.
    probe = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv[1:] = {list(args)!r}; "
             "runpy.run_module('lib_dynfuse', run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("module", "package", "args"), [
    ("torch", "torch", ["demo"]),
    ("safetensors", "safetensors", ["demo", "--out", "unused.png"]),
    ("PIL", "Pillow", ["demo"]),
])
def test_a_missing_package_is_one_line_with_the_install_command(module, package, args, tmp_path):
    result = run_without(module, *[str(tmp_path / a) if a.endswith(".png") else a for a in args])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: the Python package {package} is not installed; install what `python -m lib_dynfuse` needs with: "
        f"{INSTALL} (in the repository's folder)"]


def test_another_missing_module_is_not_hidden():
    # Only the packages a WebUI brings are explained; a bug that imports something else still shows its traceback.
    result = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.modules['lib_dynfuse.cli'] = None; "
                             "runpy.run_module('lib_dynfuse', run_name='__main__')"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_the_demo_extra_is_what_the_readme_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {req.split(">")[0].split("=")[0].strip() for req in project["project"]["optional-dependencies"]["demo"]}
    assert names == {"torch", "safetensors", "Pillow"}
    readme = (ROOT / "README.md").read_text()
    assert f"{INSTALL}" in readme and "python -m lib_dynfuse demo" in readme
    assert "pip install -q --disable-pip-version-check -e \".[demo]\"" in (ROOT / ".ci" / "run").read_text()
