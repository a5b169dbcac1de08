"""The process's resident memory after each of a series of DynFuse generations on a fake host (a figure, not a test).

    python tests/rss_over_generations.py --host neo --runs 20 [--guidance] [--off]

Prints VmRSS and VmHWM (Linux /proc/self/status) after each generation and the spread of VmRSS after the first
(warm-up) generation. ``--ballast N`` first makes N long-lived objects, as a WebUI process has millions (gradio,
torch, the models' modules): Python then runs its full cyclic collections rarely, so whatever a generation leaves in
a reference cycle stays for many generations, as it would in the WebUI.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROJECT = TESTS.parent


def status(field: str) -> float:
    """A /proc/self/status memory field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


@contextlib.contextmanager
def a1111_generate(settings: dict, on: bool):
    sys.path[:0] = [str(TESTS / "fakehost" / "a1111")]
    import checks
    import webui
    from test_a1111_generation import PROMPT, write_pair

    from lib_dynfuse.hosts import a1111 as adapter
    from modules import shared

    folder = tempfile.mkdtemp()
    ui = webui.WebUI(folder, [str(PROJECT)])
    ui.lora_dir = folder
    write_pair(ui)
    if settings.get("guidance"):
        from conftest_guidance import CPU, TINY

        adapter.A1111Adapter.guidance_factories = dict(TINY)
        shared.opts.set("dynfuse_device", CPU.device)
        shared.opts.set("dynfuse_precision", CPU.precision)

    def generate() -> None:
        p, _ = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(enabled=on, **settings))
        p.close()  # as the WebUI's txt2img does

    yield generate


@contextlib.contextmanager
def forge_family_generate(name: str, settings: dict, on: bool):
    spec = importlib.util.spec_from_file_location("harness", TESTS / "fakehost" / name / f"{name}_harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    from lib_dynfuse.settings import DynFuseSettings

    folder = Path(tempfile.mkdtemp())
    start = harness.forge_host if name == "forge" else harness.neo_host
    with start(folder) as host:
        harness.write_test_loras(folder, host.sd_model)
        module, cls = ("lib_dynfuse.hosts.forge", "ForgeAdapter") if name == "forge" else ("lib_dynfuse.hosts.neo",
                                                                                         "NeoAdapter")
        adapter_class = getattr(importlib.import_module(module), cls)
        if settings.get("guidance"):
            from conftest_guidance import TINY

            host.shared.opts.data.update(dynfuse_device="cpu", dynfuse_precision="fp32")
            adapter_class.guidance_factories = dict(TINY)
        script = harness.AdapterScript(host, adapter_class(), DynFuseSettings(enabled=on, **settings))
        runner = host.scripts.ScriptRunner([script])

        def generate() -> None:
            p = host.txt2img(harness.PROMPT, runner=runner, steps=3)[1]
            p.sampler = None  # as the WebUI's txt2img does when it closes p
            script.job = None

        yield generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=("a1111", "forge", "neo"), default="neo")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--guidance", action="store_true", help="guidance on (tiny random CLIP and DINO)")
    parser.add_argument("--off", action="store_true", help="DynFuse off: the host's own figures")
    parser.add_argument("--ballast", type=int, default=2_000_000, help="long-lived objects made first")
    args = parser.parse_args()
    sys.path[:0] = [str(PROJECT), str(TESTS)]
    ballast = [[] for _ in range(args.ballast)]
    gc.collect()
    from PIL import Image

    settings = {"method": "kl"}
    if args.guidance:
        settings.update(guidance=True, guidance_strength=0.5, subject_refs=(Image.new("RGB", (32, 32), "red"),),
                        style_ref=Image.new("RGB", (32, 32), "blue"))
    context = (a1111_generate(settings, not args.off) if args.host == "a1111"
               else forge_family_generate(args.host, settings, not args.off))
    rss = []
    with context as generate:
        for run in range(1, args.runs + 1):
            generate()
            rss.append(status("VmRSS"))
            print(f"generation {run:2d}: VmRSS {rss[-1]:8.1f} MB, VmHWM {status('VmHWM'):8.1f} MB", flush=True)
    after = rss[1:] or rss
    print(f"{args.host}, DynFuse {'off' if args.off else 'on'}{' with guidance' if args.guidance else ''}: "
          f"VmRSS from generation 2 to {args.runs} within {max(after) - min(after):.1f} MB "
          f"(first {rss[0]:.1f} MB, last {rss[-1]:.1f} MB)")
    del ballast


if __name__ == "__main__":
    main()
