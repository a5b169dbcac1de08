"""Fixtures shared by the test files: the fake AUTOMATIC1111 host on sys.path, removed again afterwards; what
DynFuse prints meanwhile must be one "DynFuse: " line per print (console_lines)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from console_lines import dynfuse_console

TESTS = os.path.dirname(os.path.realpath(__file__))
PROJECT = os.path.dirname(TESTS)
FAKE_A1111 = os.path.join(TESTS, "fakehost", "a1111")
# Only the webui root: the built-in Lora's folder is put on sys.path by the script loader while its script runs,
# so with the extension disabled `import networks` fails, as in the real host.
FAKE_A1111_PATHS = (FAKE_A1111,)
# Top-level module names the fake host (and the real built-in Lora extension) use.
A1111_TOP_LEVEL = ("modules", "webui", "loras", "checks", "network", "networks", "network_lora", "network_full",
                   "network_hada", "network_norm", "lyco_helpers", "lora", "lora_patches", "extra_networks_lora")
# The torch classes whose methods the built-in Lora extension patches.
LORA_PATCHED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _purge_host_modules() -> None:
    for name in list(sys.modules):
        top = name.split(".")[0]
        if top in A1111_TOP_LEVEL or name.startswith("lib_dynfuse.hosts"):
            del sys.modules[name]


@pytest.fixture
def a1111(tmp_path):
    """A factory for fake A1111 WebUIs (`a1111(with_dynfuse=True, **kw)`); everything is undone afterwards."""
    saved_path = list(sys.path)
    saved_forwards = {cls: (cls.forward, cls._load_from_state_dict) for cls in LORA_PATCHED}
    _purge_host_modules()
    sys.path[:0] = FAKE_A1111_PATHS
    import webui

    started = []
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()

    def start(with_dynfuse: bool = True, **kwargs):
        for ui in started:  # one WebUI per process at a time, as in the real host
            ui.unload()
        started.clear()
        ui = webui.WebUI(str(lora_dir), [PROJECT] if with_dynfuse else [], **kwargs)
        ui.lora_dir = str(lora_dir)
        started.append(ui)
        return ui

    try:
        with dynfuse_console():
            yield start
    finally:
        for ui in started:
            ui.unload()
        for cls, (forward, load) in saved_forwards.items():
            cls.forward, cls._load_from_state_dict = forward, load
        _purge_host_modules()
        sys.path[:] = saved_path


@pytest.fixture
def klora_ranks(monkeypatch):
    """{layer: (subject rank, style rank)} as the K-LoRA policy sees them, filled when a session prepares it."""
    from lib_dynfuse.engine.policies import KLoraPolicy

    ranks = {}
    prepare = KLoraPolicy.prepare

    def spy(self, layers):
        ranks.update({name: (pair.subject.rank, pair.style.rank) for name, pair in layers.items()})
        return prepare(self, layers)

    monkeypatch.setattr(KLoraPolicy, "prepare", spy)
    return ranks


@pytest.fixture(scope="module")
def one_torch_thread():
    """The quality tests' models are tiny: one thread runs them fastest, and does not slow to a crawl when the
    machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
