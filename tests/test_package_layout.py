"""The package's folders and their import rules, read from the source with ``ast`` (nothing is imported): the
engine knows no host, tool or file format; the LoRA file code knows only the engine; no two modules import each
other, directly or round a longer circle, even through imports made inside functions."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lib_dynfuse"
ROOT_MODULES = {"__init__", "__main__", "cli", "report", "settings"}
# folder -> the lib_dynfuse folders (and root modules) its modules may import, as its __init__ docstring says
RULES = {
    "engine": {"engine"},
    "loras": {"engine", "loras"},
}
# what each rule's docstring names as off limits
FORBIDDEN_IN_DOCSTRING = {"engine": ("hosts/", "guidance/", "quality/", "bench/", "loras/"), "loras": ("engine/",)}
# Foreign packages only the host glue may import.
HOST_PACKAGES = ("modules", "backend", "gradio", "modules_forge", "comfy", "comfy_api", "folder_paths")


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}
GRAPH = {name: {i for i in imports_of(path) if i in MODULES and i != name} for name, path in MODULES.items()}


def folder_of(name: str) -> str:
    """The lib_dynfuse folder a module is in; "" for the root's modules."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] not in ROOT_MODULES else ""


def test_the_root_holds_only_the_entry_points_and_the_shared_modules():
    assert {p.stem for p in PACKAGE.glob("*.py")} == ROOT_MODULES
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {
        "bench", "engine", "guidance", "hosts", "loras", "quality"}


@pytest.mark.parametrize("folder", sorted(RULES))
def test_a_folder_imports_only_what_its_docstring_allows(folder):
    docstring = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
    assert all(name in docstring for name in FORBIDDEN_IN_DOCSTRING[folder])
    broken = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() if folder_of(name) == folder
                    for target in targets if target != "lib_dynfuse" and folder_of(target) not in RULES[folder])
    assert broken == []


def test_only_the_host_glue_imports_a_host():
    broken = sorted(f"{name} imports {i}" for name, path in MODULES.items() if folder_of(name) != "hosts"
                    for i in imports_of(path) if i.split(".")[0] in HOST_PACKAGES)
    assert broken == []


def test_no_import_circle():
    circles, state = [], {}

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_checker_sees_a_circle_and_a_forbidden_import(tmp_path):
    # The rules above only mean something if the reader finds imports in the forms the package uses.
    source = tmp_path / "lib_dynfuse" / "engine" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text("from lib_dynfuse.engine import fusion\nfrom .deltas import Delta\ndef f():\n"
                      "    from lib_dynfuse.hosts import base\n")
    assert {"lib_dynfuse.engine.fusion", "lib_dynfuse.engine.deltas", "lib_dynfuse.hosts.base"} <= imports_of(
        source, tmp_path)
    assert folder_of("lib_dynfuse.hosts.base") == "hosts" and folder_of("lib_dynfuse.settings") == ""
