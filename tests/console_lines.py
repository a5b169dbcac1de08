"""What DynFuse prints while a fake WebUI runs: every print() of the project's own code (lib_dynfuse, scripts/,
install.py) must be one line starting with "DynFuse: ", so that users can find and search it in a busy console."""

from __future__ import annotations

import builtins
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
OWN_CODE = (PROJECT / "lib_dynfuse", PROJECT / "scripts", PROJECT / "install.py")


def _own(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path == own or own in path.parents for own in OWN_CODE)


def one_dynfuse_line(text: str) -> bool:
    return text.startswith("DynFuse: ") and text.endswith("\n") and text.count("\n") == 1 and "\r" not in text


@contextlib.contextmanager
def dynfuse_console() -> Iterator[list[str]]:
    """Records what the project's code prints (the text as it reaches the console), and fails at the end when a
    print was not one DynFuse line. The output itself still goes where it went."""
    printed: list[str] = []
    real_print = builtins.print

    def recording_print(*args, sep=None, end=None, **kwargs):
        if _own(sys._getframe(1).f_code.co_filename):
            printed.append((" " if sep is None else sep).join(map(str, args)) + ("\n" if end is None else end))
        real_print(*args, sep=sep, end=end, **kwargs)

    builtins.print = recording_print
    try:
        yield printed
    finally:
        builtins.print = real_print
    bad = [text for text in printed if not one_dynfuse_line(text)]
    assert not bad, f"DynFuse printed {len(bad)} console output(s) that are not one 'DynFuse: ' line: {bad[:3]}"
