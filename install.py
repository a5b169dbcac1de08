"""Installs what DynFuse needs beyond the WebUI itself (open_clip and timm, for guidance).

The WebUI runs this file on every start, so it checks first and stays silent when nothing is missing. It
installs only packages that are absent and never upgrades or downgrades one: a constraints file pins every
installed distribution (the WebUI's torch, gradio, numpy, Pillow, ... alike) to its installed version, so pip
can only add what is missing, or fail. A failure prints the command to run by hand (the constraints file is
kept for it) and never stops the WebUI from starting.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

PYPROJECT = Path(__file__).resolve().parent / "pyproject.toml"
# Used only where pyproject.toml cannot be read (Python 3.10 without tomli); keep equal to it.
FALLBACK_DEPENDENCIES = ("open_clip_torch>=2.20.0", "timm>=0.9.2")
IMPORT_NAMES = {"open_clip_torch": "open_clip"}

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_SEPARATORS = re.compile(r"[-_.]+")
KEEP_NOTE = (
    "(that file pins every installed package to its installed version, so pip adds what is missing and changes "
    "nothing else; where it cannot, its message names the package in the way)"
)
_AUTO = object()


def dependencies(pyproject: Path = PYPROJECT) -> list[str]:
    """`[project].dependencies` of pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            return list(FALLBACK_DEPENDENCIES)
    try:
        with open(pyproject, "rb") as file:
            return list(tomllib.load(file)["project"]["dependencies"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return list(FALLBACK_DEPENDENCIES)


def distribution_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def is_installed(distribution: str) -> bool:
    """Installed as a distribution, or at least importable (as the WebUI's own launch.is_installed does)."""
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        module = IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))
        return importlib.util.find_spec(module) is not None


def installed_pins() -> list[str]:
    """`name==version` for every installed distribution, which pip must leave exactly as it is.

    A distribution found twice on sys.path is pinned as the first one, the one Python imports (two pins of
    one name would make pip refuse everything). One whose version pip cannot read is left out, likewise.
    """
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version and _is_pep440(version):
            pins.setdefault(_SEPARATORS.sub("-", name).lower(), f"{name}=={version}")
    return sorted(pins.values(), key=str.lower)


def _is_pep440(version: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pip itself vendors packaging; without one here, pip names a bad line when it fails
        return True
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def write_constraints(pins: Sequence[str]) -> str:
    handle, path = tempfile.mkstemp(prefix="dynfuse-constraints-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write("".join(pin + "\n" for pin in pins))
    return path


def manual_command(missing: Sequence[str], constraints: str) -> str:
    quoted = [f'"{r}"' for r in missing]
    return " ".join([f'"{sys.executable}"', "-m", "pip", "install", *quoted, "-c", f'"{constraints}"'])


def say(message: str) -> None:
    """One console line starting with "DynFuse: ", as every line DynFuse prints in the WebUI's console."""
    print("DynFuse: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), flush=True)


def pip_errors(text: str) -> str:
    """What a failed pip run's report (the host's run_pip: description, command, exit code, pip's whole output)
    says went wrong: its first line and pip's ERROR lines."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line[line.index("ERROR:"):] for line in lines[1:] if "ERROR:" in line]
    return " ".join(lines[:1] + errors)


def _import_launch() -> ModuleType | None:
    try:
        import launch
    # Standalone, or a host whose launch module fails to import here: plain pip still works.
    except Exception:  # noqa: BLE001
        return None
    return launch


def _install(
    missing: list[str],
    constraints: str,
    launch: ModuleType | None,
    run: Callable[..., subprocess.CompletedProcess],
) -> bool:
    run_pip = getattr(launch, "run_pip", None)
    if run_pip is not None:
        # The host's run_pip adds the user's index URL and --prefer-binary; it runs through a shell.
        command = " ".join(["install", *(f'"{r}"' for r in missing), "-c", f'"{constraints}"'])
        try:
            run_pip(command, desc=f"DynFuse requirements: {', '.join(missing)}")
        except Exception as e:  # noqa: BLE001 - run_pip raises RuntimeError, forks may raise others
            say(f"pip failed: {pip_errors(str(e)) or type(e).__name__}")
            return False
        return True
    try:
        result = run([sys.executable, "-m", "pip", "install", *missing, "-c", constraints], check=False)
    except OSError as e:
        say(f"pip could not start: {e}")
        return False
    return result.returncode == 0


def main(
    argv: Sequence[str] | None = None,
    *,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    launch: ModuleType | None | object = _AUTO,
    pyproject: Path = PYPROJECT,
    installed: Callable[[str], bool] = is_installed,
) -> int:
    """Install the missing dependencies; always returns 0 so that the WebUI keeps starting."""
    argv = sys.argv[1:] if argv is None else argv
    missing = [r for r in dependencies(pyproject) if not installed(distribution_name(r))]
    if not missing:
        return 0
    if launch is _AUTO:
        launch = _import_launch()
    constraints = write_constraints(installed_pins())
    if "--skip-install" in argv or getattr(getattr(launch, "args", None), "skip_install", False):
        say(f"{', '.join(missing)} missing and --skip-install given; guidance needs them. Install with: "
            f"{manual_command(missing, constraints)} {KEEP_NOTE}")
        return 0
    if _install(missing, constraints, launch, run):
        os.unlink(constraints)
    else:
        say(f"could not install {', '.join(missing)}; guidance stays off until they are installed. Install by "
            f"hand with: {manual_command(missing, constraints)} {KEEP_NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
