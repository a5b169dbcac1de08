from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import install

# Installed versions of packages the WebUI needs (Pillow and numpy were not among the five pinned before).
HOST_VERSIONS = {name: importlib.metadata.version(name) for name in ("torch", "pillow", "numpy")}


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
    assert_pins_host_versions(run.constraints[0])
    assert not Path(command[6]).exists()  # the constraints file is removed again
    assert capsys.readouterr().out == ""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(constraints: str) -> dict[str, str]:
    """{canonical name: version} of a constraints file made of `name==version` lines."""
    result = {}
    for line in constraints.splitlines():
        name, version = line.split("==")
        result[_canonical(name)] = version
    assert len(result) == len(constraints.splitlines())  # one pin per distribution, or pip refuses the file
    return result


def assert_pins_host_versions(constraints: str) -> None:
    assert HOST_VERSIONS.items() <= pinned(constraints).items()


def test_every_installed_distribution_is_pinned_to_its_installed_version():
    pins = pinned("\n".join(install.installed_pins()))
    assert set(pins) == {_canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    assert all(importlib.metadata.version(name) == version for name, version in pins.items())
    assert HOST_VERSIONS.items() <= pins.items()


def test_a_distribution_found_twice_is_pinned_once_as_python_imports_it(monkeypatch):
    def fake(name, version):
        return SimpleNamespace(metadata={"Name": name}, version=version)

    listed = [fake("Pillow", "10.0.0"), fake("pillow", "9.0.0"), fake("odd", "not a version"),
              fake("a.b", "1")]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(listed))
    assert install.installed_pins() == ["a.b==1", "Pillow==10.0.0"]


def test_the_hosts_run_pip_is_preferred():
    run, run_pip = Recorder(), Recorder()
    launch = SimpleNamespace(run_pip=run_pip, args=SimpleNamespace(skip_install=False))
    install.main([], run=run, launch=launch, installed=missing_timm)
    assert run.calls == []
    ((command, kwargs),) = run_pip.calls
    assert command.startswith('install "timm>=0.9.2" -c "') and command.endswith('.txt"')
    assert kwargs == {"desc": "DynFuse requirements: timm>=0.9.2"}
    assert_pins_host_versions(run_pip.constraints[0])


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
    assert_manual_command_is_runnable(out)


def assert_manual_command_is_runnable(out: str, requirement: str = "timm>=0.9.2") -> None:
    """The printed pip command names a constraints file that is still there and pins the host's packages; every
    line is one line of DynFuse's."""
    (constraints,) = re.findall(rf'-m pip install "{re.escape(requirement)}" -c "([^"]+)" \(', out)
    try:
        assert_pins_host_versions(Path(constraints).read_text(encoding="utf-8"))
    finally:
        Path(constraints).unlink()
    assert out.endswith(f'-c "{constraints}" {install.KEEP_NOTE}\n')
    assert all(line.startswith("DynFuse: ") for line in out.splitlines())


@pytest.mark.parametrize(
    "launch",
    [None, SimpleNamespace(run_pip=Recorder(error=RuntimeError("Couldn't install")), args=SimpleNamespace())],
)
def test_pip_failure_prints_the_manual_command_and_lets_the_host_start(launch, capsys):
    run = Recorder(returncode=1)
    assert install.main([], run=run, launch=launch, installed=missing_timm) == 0
    out = capsys.readouterr().out
    assert (
        "DynFuse: could not install timm>=0.9.2; guidance stays off until they are installed. "
        f'Install by hand with: "{sys.executable}" -m pip install "timm>=0.9.2" -c "'
    ) in out
    assert_manual_command_is_runnable(out)


def test_the_hosts_pip_report_is_cut_to_its_first_line_and_pips_errors(capsys):
    """The host's run_pip raises with its whole report: description, command, exit code and pip's output."""
    report = ("Couldn't install DynFuse requirements: timm>=0.9.2.\nCommand: \"python\" -m pip install timm\n"
              "Error code: 1\nstdout: Collecting timm\n  Downloading timm-1.0.whl\nstderr: ERROR: Could not find a "
              "version that satisfies the requirement timm>=0.9.2\nERROR: No matching distribution found for timm\n")
    launch = SimpleNamespace(run_pip=Recorder(error=RuntimeError(report)), args=SimpleNamespace())
    install.main([], run=Recorder(), launch=launch, installed=missing_timm)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "DynFuse: pip failed: Couldn't install DynFuse requirements: timm>=0.9.2. ERROR: Could not find a version "
        "that satisfies the requirement timm>=0.9.2 ERROR: No matching distribution found for timm")
    assert_manual_command_is_runnable(out)


def test_pip_that_cannot_start_counts_as_a_failure(capsys):
    def run(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    assert install.main([], run=run, launch=None, installed=missing_timm) == 0
    out = capsys.readouterr().out
    assert "DynFuse: could not install timm>=0.9.2" in out
    assert_manual_command_is_runnable(out)


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


def wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    """A minimal pure-Python wheel; a dry run reads only its metadata."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{info}/METADATA", metadata + "".join(f"Requires-Dist: {r}\n" for r in requires))
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")


def test_real_pip_adds_what_is_missing_and_changes_nothing_installed(tmp_path, capsys):
    index = tmp_path / "index"
    index.mkdir()
    wheel(index, "pillow", "999.0")  # a newer Pillow that pip would otherwise take
    wheel(index, "dynfuse_probe_any", "1.0", "pillow")
    wheel(index, "dynfuse_probe_new", "1.0", "pillow>=999")
    offline = ["--dry-run", "--no-index", "--find-links", str(index), "--disable-pip-version-check"]
    # This machine's pip settings (extra wheel folders, a config file) stay out of it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    outputs = []

    def dry_run(command, check=False):
        result = subprocess.run([*command, *offline], check=check, capture_output=True, text=True, env=env)
        outputs.append(result.stdout + result.stderr)
        return result

    def would_install(output: str) -> set[str]:
        line = next((x for x in output.splitlines() if x.startswith("Would install ")), "Would install ")
        return {_canonical(item) for item in line.split()[2:]}

    # What plain pip would do: upgrade the WebUI's Pillow.
    dry_run([sys.executable, "-m", "pip", "install", "dynfuse_probe_new"])
    assert would_install(outputs[-1]) == {"dynfuse-probe-new-1-0", "pillow-999-0"}, outputs[-1]

    for probe, added in (("dynfuse_probe_any", {"dynfuse-probe-any-1-0"}), ("dynfuse_probe_new", set())):
        pyproject = write_pyproject(tmp_path, probe)
        assert install.main([], run=dry_run, launch=None, pyproject=pyproject) == 0
        assert would_install(outputs[-1]) == added, outputs[-1]
    out = capsys.readouterr().out
    assert "could not install dynfuse_probe_new" in out and "dynfuse_probe_any" not in out
    assert_manual_command_is_runnable(out, "dynfuse_probe_new")
