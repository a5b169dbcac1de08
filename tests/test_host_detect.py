"""Host detection looks for packages inside the WebUI's own folder: a package of the same name elsewhere on
sys.path, even in a folder whose name merely starts with the WebUI's, does not count."""

from __future__ import annotations

import os

from lib_dynfuse.hosts import detect


def _package(folder, name):
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").touch()


def test_only_packages_inside_the_webui_folder_count(tmp_path, monkeypatch):
    root, sibling = tmp_path / "webui", tmp_path / "webui-x"
    _package(root, "dynfuse_probe_inside")
    _package(sibling, "dynfuse_probe_sibling")
    _package(root / "sub", "dynfuse_probe_nested")
    for folder in (root, sibling, root / "sub"):
        monkeypatch.syspath_prepend(str(folder))
    webui = os.path.realpath(root)
    assert detect._spec_under_root("dynfuse_probe_inside", webui)
    assert detect._spec_under_root("dynfuse_probe_nested", webui)
    assert not detect._spec_under_root("dynfuse_probe_sibling", webui)
    assert not detect._spec_under_root("dynfuse_probe_missing", webui)
