from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import install

TORCH_PIN = f"torch=={importlib.metadata.version('torch')}"


def write_pyproject(tmp_path: Path, *dependencies: str) -> Path:
    path = tmp_path / "pyproject.toml"
    listed = ", ".join(f'"{d}"' for d in dependencies)
    path.write_text(f'[project]\nname = "x"\ndependencies = [{listed}]\n', encoding="utf-8")
    return path


class Recorder:
    """Stands in for subprocess.run or launch.run_pip; keeps the constraints file's text as pip saw it."""

    def __init__(self, returncode: int = 0, error: Exception | None = None):
        self.calls: list[tuple] = []
        self.constraints: list[str] = []
        self.returncode, self.error = returncode, error

    def __call__(self, command, **kwargs):
        self.calls.append((command, kwargs))
        path = (
            command[command.index("-c") + 1] if isinstance(command, list) else command.split('-c "')[1][:-1]
        )
        self.constraints.append(Path(path).read_text(encoding="utf-8"))
        if self.error is not None:
            raise self.error
        return subprocess.CompletedProcess(command, self.returncode)


def missing_timm(name: str) -> bool:
    return name != "timm"


def test_dependencies_come_from_pyproject_and_match_the_fallback():
    assert install.dependencies() == list(install.FALLBACK_DEPENDENCIES)
    assert install.dependencies(Path("/nonexistent/pyproject.toml")) == list(install.FALLBACK_DEPENDENCIES)


def test_dependencies_without_a_toml_reader(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    assert install.dependencies(write_pyproject(tmp_path, "other>=1")) == list(install.FALLBACK_DEPENDENCIES)


def test_distribution_names():
    assert install.distribution_name("open_clip_torch>=2.20.0") == "open_clip_torch"
    assert install.distribution_name("timm [extra] >=0.9; python_version > '3'") == "timm"


def test_is_installed_by_distribution_or_import_name(monkeypatch):
    assert install.is_installed("pytest")
    assert not install.is_installed("dynfuse-no-such-distribution")
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed")

    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    assert install.is_installed("open_clip_torch")  # found through its import name


def test_nothing_missing_means_no_pip_and_no_output(capsys):
    run = Recorder()
    assert install.main([], run=run, launch=None, installed=lambda name: True) == 0
    assert run.calls == []
    assert capsys.readouterr() == ("", "")


def test_one_missing_means_one_pip_call_with_pinned_host_packages(capsys):
    run = Recorder()
    assert install.main([], run=run, launch=None, installed=missing_timm) == 0
    assert len(run.calls) == 1
    command, kwargs = run.calls[0]
    assert command[:5] == [sys.executable, "-m", "pip", "install", "timm>=0.9.2"]
    assert command[5] == "-c" and len(command) == 7 and kwargs == {"check": False}
    assert TORCH_PIN in run.constraints[0].splitlines()
    assert not Path(command[6]).exists()  # the constraints file is removed again
    assert capsys.readouterr().out == ""


def test_the_hosts_run_pip_is_preferred():
    run, run_pip = Recorder(), Recorder()
    launch = SimpleNamespace(run_pip=run_pip, args=SimpleNamespace(skip_install=False))
    install.main([], run=run, launch=launch, installed=missing_timm)
    assert run.calls == []
    ((command, kwargs),) = run_pip.calls
    assert command.startswith('install "timm>=0.9.2" -c "') and command.endswith('.txt"')
    assert kwargs == {"desc": "DynFuse requirements: timm>=0.9.2"}
    assert TORCH_PIN in run_pip.constraints[0].splitlines()


@pytest.mark.parametrize(
    ("argv", "launch"),
    [
        (["--skip-install"], None),
        ([], SimpleNamespace(run_pip=Recorder(), args=SimpleNamespace(skip_install=True))),
    ],
)
def test_skip_install_means_no_pip(argv, launch, capsys):
    run = Recorder()
    assert install.main(argv, run=run, launch=launch, installed=missing_timm) == 0
    assert run.calls == []
    assert launch is None or launch.run_pip.calls == []
    out = capsys.readouterr().out
    assert out.startswith("DynFuse: timm>=0.9.2 missing and --skip-install given")
    assert f'-m pip install "timm>=0.9.2" "{TORCH_PIN}"' in out


@pytest.mark.parametrize(
    "launch",
    [None, SimpleNamespace(run_pip=Recorder(error=RuntimeError("Couldn't install")), args=SimpleNamespace())],
)
def test_pip_failure_prints_the_manual_command_and_lets_the_host_start(launch, capsys):
    run = Recorder(returncode=1)
    assert install.main([], run=run, launch=launch, installed=missing_timm) == 0
    out = capsys.readouterr().out
    manual = install.manual_command(["timm>=0.9.2"], install.protected_pins())
    assert manual.startswith(f'"{sys.executable}" -m pip install "timm>=0.9.2" "{TORCH_PIN}"')
    assert out.endswith(
        "DynFuse: could not install timm>=0.9.2; guidance stays off until they are installed. "
        f"Install by hand with:\n    {manual}\n"
    )


def test_several_missing_are_installed_in_one_call(tmp_path):
    run = Recorder()
    pyproject = write_pyproject(tmp_path, "open_clip_torch>=2.20.0", "timm>=0.9.2", "pytest")
    install.main([], run=run, launch=None, pyproject=pyproject, installed=lambda name: name == "pytest")
    ((command, _),) = run.calls
    assert command[4:6] == ["open_clip_torch>=2.20.0", "timm>=0.9.2"]


def test_runs_quietly_as_the_host_runs_it(tmp_path):
    if not all(install.is_installed(install.distribution_name(d)) for d in install.dependencies()):
        pytest.skip("the dependencies are not all installed here")
    result = subprocess.run(
        [sys.executable, str(Path(install.__file__))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
