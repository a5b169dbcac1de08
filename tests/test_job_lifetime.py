"""What a DynFuse generation leaves alive once it has ended, on the fake AUTOMATIC1111, Forge and Forge Neo hosts.

Twenty generations in a row, with `kl` and with guidance on. After each: the fusion session, the kernels with
their prepared factors, the guidance with its decoder, and on Forge and Neo the UNet clone DynFuse made are gone
through reference counting alone (the cyclic garbage collector is off while the generations run: a WebUI process is
large, and its full collections are rare, so whatever waits for one stays for many generations); the finished job,
which p's infotext and the adapter keep, reaches no tensor; and after a full collection the process holds as many
tensors after the twentieth generation as after the first, and no more tensor memory (the host's weight copies
and merge backups) than the same host after generations without DynFuse.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import types
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import is_fake
from PIL import Image

from lib_dynfuse.settings import DynFuseSettings

RUNS = 20
REFS = {"subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
        "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
GUIDED = {"guidance": True, "guidance_strength": 0.5, "guidance_start": 0.0, "guidance_end": 1.0, **REFS}
CASES = {"kl": {"method": "kl"}, "kl+guidance": {"method": "kl", **GUIDED}}


def import_encoder_libraries(case: str) -> None:
    """Guidance imports open_clip and timm at its first use; an import leaves frames in reference cycles (the
    first job's among them, through their callers) that only the cyclic collector frees: imported before the
    generations are counted."""
    if "guidance" in case:
        pytest.importorskip("open_clip")
        pytest.importorskip("timm")


def _harness(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_harness",
                                                  Path(__file__).parent / f"fakehost/{name}/{name}_harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fh, nh = _harness("forge"), _harness("neo")


class Allocations:
    """Weak references to what DynFuse builds for one job, taken as it builds them."""

    def __init__(self, monkeypatch) -> None:
        from lib_dynfuse.engine import fusion, session
        from lib_dynfuse.guidance import correction
        from lib_dynfuse.hosts import forge_family

        self.refs: list[tuple[str, weakref.ref]] = []
        init, make_kernel, prepare = session.FusionSession.__init__, fusion.pair_kernel, correction.Guidance.prepare
        start = forge_family.ForgeFamilyAdapter._start_session

        def session_init(obj, *args, **kwargs):
            init(obj, *args, **kwargs)
            self.add("FusionSession", obj)

        def kernel(*args, **kwargs):
            return self.add("pair kernel", make_kernel(*args, **kwargs))

        def guidance(*args, **kwargs):
            made = prepare(*args, **kwargs)
            self.add("Guidance", made)
            self.add("guidance decoder", made.decoder)
            return made

        def start_session(adapter, p, job, engine, source, unet, targets):
            self.add("UNet clone", unet)
            return start(adapter, p, job, engine, source, unet, targets)

        monkeypatch.setattr(session.FusionSession, "__init__", session_init)
        monkeypatch.setattr(fusion, "pair_kernel", kernel)
        monkeypatch.setattr(correction.Guidance, "prepare", guidance)
        monkeypatch.setattr(forge_family.ForgeFamilyAdapter, "_start_session", start_session)

    def add(self, what: str, obj):
        self.refs.append((what, weakref.ref(obj)))
        return obj

    def alive(self, held_by_host: Callable[[], list] = list) -> list[str]:
        """What is still alive, but for what the host itself holds (``held_by_host``: those objects)."""
        host = {id(obj) for obj in held_by_host()}
        return [what for what, ref in self.refs if ref() is not None and id(ref()) not in host]

    def built(self) -> set[str]:
        return {what for what, _ in self.refs}


def tensors_reached(root) -> list[str]:
    """The tensors reachable from ``root`` through object references (not through modules, classes or a
    function's globals), named by the type of the object holding them."""
    found, seen, todo = [], {id(root)}, [(root, type(root).__name__)]
    while todo:
        obj, holder = todo.pop()
        if isinstance(obj, types.FunctionType):
            referents = [*(obj.__closure__ or ()), *(obj.__defaults__ or ())]
        else:
            referents = gc.get_referents(obj)
        for ref in referents:
            if id(ref) in seen or isinstance(ref, (type, types.ModuleType)):
                continue
            seen.add(id(ref))
            if isinstance(ref, torch.Tensor):
                found.append(type(obj).__name__)
            else:
                todo.append((ref, type(obj).__name__))
    return found


def live_tensors() -> tuple[int, int]:
    """(count, bytes of their distinct storages) of every tensor alive after a full collection."""
    gc.collect()
    count, storages = 0, {}
    for obj in gc.get_objects():
        # Tensors without storage of their own (meta, and the fake tensors torch.compile keeps in its caches from
        # earlier tests) hold no memory and are not DynFuse's.
        if isinstance(obj, torch.Tensor) and not obj.is_meta and not is_fake(obj):
            count += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values())


@contextlib.contextmanager
def without_cycle_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def run_jobs(generate, adapter, allocations: Allocations, expected: set[str],
             held_by_host: Callable[[], list] = list) -> list[tuple[int, int]]:
    """``RUNS`` generations with DynFuse on, each checked as it ends; the live tensors after the first, the second,
    the tenth and the last (a full count takes a while in a large test process)."""
    after = []
    for run in range(RUNS):
        with without_cycle_collector():
            generate(True)
            assert allocations.alive(held_by_host) == [], f"generation {run + 1}"
            job = adapter.last_job
            assert job is not None and not job.failed and job.logs(), f"generation {run + 1}: {job}"
            assert tensors_reached(job) == [], f"generation {run + 1}"
        if run + 1 in (1, 2, 10, RUNS):
            after.append(live_tensors())
    assert expected <= allocations.built()
    return after


def assert_flat(off: tuple[int, int], on: list[tuple[int, int]]) -> None:
    first = on[0]
    assert all(now == first for now in on[1:]), [now for now in on if now != first]
    assert first[1] <= off[1], f"{first[1] - off[1]} bytes more tensor memory than without DynFuse"


# ---- AUTOMATIC1111 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_a1111_jobs_leave_nothing_alive(a1111, monkeypatch, case):
    from test_a1111_generation import PROMPT, write_pair

    import checks

    import_encoder_libraries(case)
    ui = a1111()
    write_pair(ui)
    from conftest_guidance import CPU, TINY

    from lib_dynfuse.guidance import scorers
    from lib_dynfuse.hosts import a1111 as hosts_a1111
    from lib_dynfuse.hosts import detect
    from modules import shared

    monkeypatch.setattr(hosts_a1111.A1111Adapter, "guidance_factories", dict(TINY))
    shared.opts.set("dynfuse_device", CPU.device)
    shared.opts.set("dynfuse_precision", CPU.precision)
    fields = {k: v for k, v in CASES[case].items()}

    def generate(on: bool) -> None:
        p, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(enabled=on, **fields))
        p.close()  # as the WebUI's txt2img does ("with closing(p)")

    try:
        generate(False)
        off = live_tensors()
        allocations = Allocations(monkeypatch)
        on = run_jobs(generate, detect.get_adapter(), allocations, _expected(case, clone=False))
    finally:
        scorers.unload()
    if case == "kl":
        assert_flat(off, on)
    else:  # the CLIP and DINO models stay cached between generations, by design
        assert all(now == on[0] for now in on[1:])


# ---- Forge and Forge Neo -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def forge_family_host(name: str, tmp_path, monkeypatch):
    harness = fh if name == "forge" else nh
    start = harness.forge_host if name == "forge" else harness.neo_host
    with start(tmp_path) as host, harness.tiny_guidance_models(host, monkeypatch, adapter=_adapter_path(name)):
        harness.write_test_loras(tmp_path, host.sd_model)
        yield harness, host


def _adapter_path(name: str) -> str:
    return "lib_dynfuse.hosts.forge:ForgeAdapter" if name == "forge" else "lib_dynfuse.hosts.neo:NeoAdapter"


def _expected(case: str, clone: bool) -> set[str]:
    built = {"FusionSession", "pair kernel"} | ({"UNet clone"} if clone else set())
    return built | ({"Guidance", "guidance decoder"} if "guidance" in case else set())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["forge", "neo"])
def test_forge_family_jobs_leave_nothing_alive(tmp_path, monkeypatch, name, case):
    import_encoder_libraries(case)
    module, cls = _adapter_path(name).split(":")
    adapter = getattr(importlib.import_module(module), cls)()
    with forge_family_host(name, tmp_path, monkeypatch) as (harness, host):
        script = harness.AdapterScript(host, adapter, DynFuseSettings(enabled=True, **CASES[case]))
        runner = host.scripts.ScriptRunner([script])

        def generate(on: bool) -> None:
            p = host.txt2img(harness.PROMPT, runner=runner if on else None, steps=3)[1]
            p.sampler = None  # as the WebUI's txt2img does when it closes p
            script.job = None  # the test script's own reference; the entry script keeps none

        generate(False)
        off = live_tensors()
        # Forge's memory manager holds the patcher it loaded last (DynFuse's clone) until it loads another; Neo's
        # holds it by a weak reference.
        loaded = (lambda: [m.model for m in host.memory_management.current_loaded_models]) if name == "forge" else list
        on = run_jobs(generate, adapter, Allocations(monkeypatch), _expected(case, clone=True), loaded)
        if case == "kl":
            assert_flat(off, on)
        else:
            assert all(now == on[0] for now in on[1:])
        if name == "neo":  # one merge of the other LoRA when DynFuse took over, none after
            assert host.sd_model.forge_objects_original.unet.model.merge_count == 2


# ---- the finished job's decisions ----------------------------------------------------------------------------------
def test_a_settled_log_reads_as_before_and_holds_no_tensor():
    from lib_dynfuse.engine.decisions import DecisionLog

    def filled() -> DecisionLog:
        log = DecisionLog()
        log.record("a", 0, (0, 1), torch.tensor([0, 1]), torch.tensor([[4.0, 1.0], [2.0, 3.0]]), 2, winners=True)
        log.record("a", 0, (2,), torch.tensor([1]), torch.tensor([[0.5], [1.5]]), 2, winners=True)  # a second chunk
        log.record("b", 1, (0, 1), 0.25)  # a fixed rule: one weight for all, no divergences
        log.record_parts(("c:q", "c:k"), 1, (0,), torch.tensor([[0.2, 0.9]]), torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]),
                         4)
        return log

    live, settled = filled(), filled()
    settled.settle()
    assert tensors_reached(settled) == []
    assert settled.decisions() == live.decisions() and settled.steps == live.steps and len(settled) == len(live)
    assert settled.subject_share() == live.subject_share()
    torch.testing.assert_close(settled.matrix()[2], live.matrix()[2], equal_nan=True)
    joined = DecisionLog.joined([settled, filled()]).decisions()
    assert joined == DecisionLog.joined([live, filled()]).decisions()
    assert [d for d in live.decisions() if d.layer == "a"][0].d_subject == 2.0  # 4 over 2 tokens: really compared
