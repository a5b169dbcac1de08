"""Benchmark, not a test: the cost of dynamic fusion on a UNet with the real SD1.5 / SDXL layer shapes.

    python -m lib_dynfuse.bench --model sd15            # 512x512, batch 2 (one image with CFG)
    python -m lib_dynfuse.bench --model sdxl --size 1024
    python -m lib_dynfuse.bench --model flux --width 256 # FLUX's layers and fused shapes at a small width
    python -m lib_dynfuse.bench --model zimage           # Z-Image; also lumina2, qwen, chroma, flux2, wan, krea2
    python -m lib_dynfuse.bench --layers attention      # only the attention projections hooked
    python -m lib_dynfuse.bench --engine decide_every=2 --engine max_tokens=1024   # cheaper decisions
    python -m lib_dynfuse.bench --guidance              # cost of one guided step, per decoder
    python -m lib_dynfuse.bench --counts-only --dtype fp16   # only the operations per hooked call, in fp16

The UNet is diffusers' ``UNet2DConditionModel`` built from the model's config with random weights (diffusers is
a benchmark-only dependency). Two random rank-64 LoRAs are attached to every layer a kohya LoCon LoRA touches
(``--layers all``: the transformers' linear and 1x1 layers, the resnets' and samplers' convolutions) or to the
attention projections only. ``--model flux`` is a FLUX-shaped transformer (lib_dynfuse.bench.flux: 19 double and
38 single blocks at ``--width`` channels) with two diffusers-named LoRAs, which patch the fused layers' q, k, v and
MLP input apart, so those layers are hooked part by part; ``--model zimage|lumina2|qwen|chroma|flux2|wan|krea2`` is
that family's transformer likewise (lib_dynfuse.bench.families), with LoRAs in its finest layout. One step is timed three ways: no LoRA, both LoRAs merged
into the weights, dynamic ``kl``; on CUDA with CUDA events after warm-up. Then, on a tiny latent where the fixed
cost of every operation dominates, the tensor operations each hooked layer call dispatches are counted for every
method and the microseconds each costs are timed. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn

from lib_dynfuse.bench import families as bench_families
from lib_dynfuse.bench import flux as bench_flux
from lib_dynfuse.bench.memory import peak_bytes
from lib_dynfuse.bench.opcount import count_ops_per_call
from lib_dynfuse.bench.unets import CONFIGS, build_unet, lora_layers, unet_inputs
from lib_dynfuse.engine.deltas import LayerGeometry, LowRankDelta
from lib_dynfuse.engine.policies import DIVERGENCE_METHODS, METHODS, EngineOptions
from lib_dynfuse.engine.session import BatchLayout, FusionSession, LayerTarget, StepClock

DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024, "flux": 512, **dict.fromkeys(bench_families.FAMILIES, 512)}
TRANSFORMERS = ("flux", *bench_families.FAMILIES)  # the models with a --width
DEFAULT_WIDTH = {"lumina2": 384}  # whole heads for its three query heads per key/value head
LAYER_SETS = ("all", "attention")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          **{name: getattr(torch, name) for name in ("float32", "float16", "bfloat16")}}
TINY_LATENT = 8  # the op-count and per-call runs: small enough that every operation costs its fixed overhead


# name -> (layer, the (start, length) of its output channels a part covers, or None for the whole layer)
Sites = dict[str, tuple[nn.Module, tuple[int, int] | None]]


@dataclass
class Model:
    """What one benchmark runs: one step of a network at the chosen size and one on a tiny input, and the places the
    two LoRAs patch."""

    run: Callable[[], object]
    tiny_run: Callable[[], object]
    sites: Sites

    @property
    def hooked(self) -> int:
        """The layers that get a hook (the parts of a fused layer share one)."""
        return len(_modules(self.sites))


def build_model(model: str, size: int, layer_set: str, device: str, dtype: torch.dtype, width: int) -> Model:
    if model in TRANSFORMERS:
        module = bench_flux if model == "flux" else bench_families
        net = bench_flux.build(width, device, dtype) if model == "flux" else \
            bench_families.build(model, width, device, dtype)
        full, tiny = (module.inputs(net, s, 2, device, dtype) for s in (size, TINY_LATENT * 8))
        sites = module.lora_sites(net, layer_set)
    else:
        net = build_unet(model, device, dtype)
        full, tiny = (unet_inputs(model, s, batch=2, device=device, dtype=dtype) for s in (size, TINY_LATENT * 8))
        sites = {name: (module, None) for name, module in lora_layers(net, layer_set).items()}
    return Model(lambda: net(**full), lambda: net(**tiny), sites)


def _modules(sites: Sites) -> dict[int, nn.Module]:
    """The layers of ``sites`` by identity: the parts of a fused layer are one layer."""
    return {id(module): module for module, _ in sites.values()}


def random_loras(sites: Sites, rank: int, seed: int, device: str, dtype: torch.dtype) -> dict[str, LowRankDelta]:
    """LoRA on linear layers (and their parts), LoCon (the layer's kernel on the down factor) on convolutions."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    deltas = {}
    for name, (module, channels) in sites.items():
        out_f, in_f, *kernel = module.weight.shape
        out_f = channels[1] if channels else out_f
        r = min(rank, out_f, in_f)
        fan_in = in_f * (kernel[0] * kernel[1] if kernel else 1)
        down = torch.randn(r, in_f, *kernel, generator=g) / fan_in ** 0.5
        up = torch.randn(out_f, r, *([1, 1] if kernel else []), generator=g) * 0.01
        deltas[name] = LowRankDelta(down, up, alpha=float(r)).to(device=device, dtype=dtype)
    return deltas


@contextmanager
def merged(sites: Sites, *all_deltas: dict[str, LowRankDelta]):
    """Both LoRAs merged into the weights the way the hosts' static path does; restored afterwards."""
    modules = _modules(sites)
    backup = {key: m.weight.detach().clone() for key, m in modules.items()}
    with torch.no_grad():
        for deltas in all_deltas:
            for name, delta in deltas.items():
                module, channels = sites[name]
                geometry = LayerGeometry.of(module)
                start, length = channels or (0, geometry.out_channels)
                rows = geometry.with_out_channels(length)
                module.weight[start:start + length] += delta.dense_weight(rows).to(module.weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for key, m in modules.items():
                m.weight.copy_(backup[key])


def _timed(run: Callable[[], object], device: str) -> float:
    """Seconds of one call: CUDA events on the GPU (the host returns before the kernels finish), else wall time."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start_s = time.perf_counter()
    run()
    return time.perf_counter() - start_s


def time_modes(modes: dict[str, Callable[[], object]], enter: dict[str, Callable[[], object]], device: str,
               repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one step per mode. The modes take turns within each repeat, so that a machine that slows
    down or speeds up affects all of them alike. The first ``warmup`` rounds (kernels chosen, factors prepared,
    caches filled) are not counted."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        for round_ in range(repeats + warmup):
            for mode, run in modes.items():
                with enter[mode]():
                    elapsed = _timed(run, device)
                if round_ >= warmup:
                    times[mode].append(elapsed)
    return {m: statistics.median(times[m]) for m in modes}


def peak_modes(modes: dict[str, Callable[[], object]], enter: dict[str, Callable[[], object]],
               device: str) -> dict[str, int]:
    """The memory one step allocates at its peak, per mode, once the modes have been warmed up (a session's factors
    are prepared at its first step and held for the generation: not part of a step's peak)."""
    peaks = {}
    with torch.no_grad():
        for mode, run in modes.items():
            with enter[mode]():
                peaks[mode] = peak_bytes(run, device)
    return peaks


def count_flops(run: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def kl_flops(sites: Sites, run: Callable[[], object], deciding_rows: int) -> int:
    """Element-wise work of the divergence (not seen by the FLOP counter): about 12 operations per output
    element for each LoRA, on the deciding rows only (a part's channels for a part)."""
    sizes: dict[int, int] = {}
    modules = _modules(sites)
    handles = [m.register_forward_hook(lambda mod, i, o, key=key: sizes.__setitem__(key, o[0].numel()))
               for key, m in modules.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    share = [1.0 if channels is None else channels[1] / LayerGeometry.of(module).out_channels
             for module, channels in sites.values()]
    return round(2 * 12 * deciding_rows * sum(sizes[id(module)] * f for (module, _), f in zip(sites.values(), share)))


def benchmark(model: str, size: int, rank: int, device: str, dtype: torch.dtype, repeats: int,
              layer_set: str = "all", engine: dict[str, object] | None = None, width: int = 256) -> dict:
    bench = build_model(model, size, layer_set, device, dtype, width)
    sites, run = bench.sites, bench.run
    subject = random_loras(sites, rank, 1, device, dtype)
    style = random_loras(sites, rank, 2, device, dtype)
    options = EngineOptions(**{"method": "kl", **(engine or {})})

    session = _session(sites, subject, style, options)
    warmup = 3 if device.startswith("cuda") else 1
    modes = {"base": run, "static": run, "dynamic": run}
    enter = {"base": nullcontext, "static": lambda: merged(sites, subject, style), "dynamic": lambda: session}
    base_s, static_s, dynamic_s = time_modes(modes, enter, device, repeats, warmup).values()
    peaks = peak_modes({"static": run, "dynamic": run}, enter, device)
    unet_flops = count_flops(run)
    with session:
        dynamic_flops = count_flops(run)
    extra_flops = dynamic_flops - unet_flops + kl_flops(sites, run, deciding_rows=1)
    factor_bytes = sum(d.factor_bytes() for d in (*subject.values(), *style.values()))
    del session  # its prepared factors: the per-call runs prepare their own
    ops = hooked_call_ops(bench.tiny_run, sites, subject, style, options)
    micros = hooked_call_micros(bench, subject, style, options, device, repeats, warmup)
    return {
        "model": model,
        **({"width": width} if model in TRANSFORMERS else {}),
        "size": size,
        "device": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "layers": layer_set,
        "hooked_layers": bench.hooked,
        "lora_layers": len(sites),
        "lora_rank": rank,
        "engine": {k: v for k, v in options.non_defaults().items() if k != "method"},
        "base_step_s": round(base_s, 4),
        "static_step_s": round(static_s, 4),
        "dynamic_step_s": round(dynamic_s, 4),
        "ops_per_hooked_call": {method: mean for method, (mean, _) in ops.items()},
        "max_ops_per_hooked_call": {method: most for method, (_, most) in ops.items()},
        "us_per_hooked_call": micros,
        "ratio": round(dynamic_s / static_s, 4),
        "floor": round(1 + extra_flops / unet_flops, 4),
        "unet_gflops": round(unet_flops / 1e9, 1),
        "extra_gflops": round(extra_flops / 1e9, 2),
        "lora_factors_mb": round(factor_bytes / 2**20, 1),
        "static_peak_mb": round(peaks["static"] / 2**20, 1),
        "dynamic_peak_mb": round(peaks["dynamic"] / 2**20, 1),
        "extra_mem_mb": round((peaks["dynamic"] - peaks["static"]) / 2**20, 1),
        "memory_measure": ("cuda max_memory_allocated" if device.startswith("cuda")
                           else "tensors allocated in the step (lib_dynfuse.bench.memory)"),
    }


def operation_counts(model: str, rank: int, device: str, dtype: torch.dtype, layer_set: str = "all",
                     engine: dict[str, object] | None = None, width: int = 256) -> dict:
    """The operations per hooked layer call of every method, on the tiny latent, without timing anything."""
    bench = build_model(model, TINY_LATENT * 8, layer_set, device, dtype, width)
    subject = random_loras(bench.sites, rank, 1, device, dtype)
    style = random_loras(bench.sites, rank, 2, device, dtype)
    options = EngineOptions(**{"method": "kl", **(engine or {})})
    ops = hooked_call_ops(bench.tiny_run, bench.sites, subject, style, options)
    return {"model": model, "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "layers": layer_set, "hooked_layers": bench.hooked,
            "engine": {k: v for k, v in options.non_defaults().items() if k != "method"},
            "ops_per_hooked_call": {method: mean for method, (mean, _) in ops.items()},
            "max_ops_per_hooked_call": {method: most for method, (_, most) in ops.items()}}


def _session(sites: Sites, subject: dict, style: dict, options: EngineOptions,
             layout: BatchLayout = BatchLayout.a1111(1)) -> FusionSession:
    session = FusionSession([LayerTarget(name, module, subject[name], style[name], channels)
                             for name, (module, channels) in sites.items()], options)
    session.set_layout(layout)
    session.set_step(StepClock(10, 20))
    return session


def hooked_call_ops(run: Callable[[], object], sites: Sites, subject: dict, style: dict, options: EngineOptions,
                    layout: BatchLayout = BatchLayout.a1111(1)) -> dict[str, tuple[float, int]]:
    """Per method: the mean and the most tensor operations one hooked layer call adds to the layer's own, at steps
    whose factors are prepared: the choosing methods decide at each (deciding every n steps: the mean over n
    consecutive steps), the others run a step they have run once already (a new pair of weights prepares its
    factors once)."""
    modules = list(_modules(sites).values())
    with torch.no_grad():
        plain = [n for _, n in count_ops_per_call(run, modules)]
    ops: dict[str, tuple[float, int]] = {}
    # One method at a time: every session prepares its own copy of the factors, and SDXL's would not fit twice.
    for method in METHODS:
        session = _session(sites, subject, style, replace(options, method=method), layout)
        added: list[int] = []
        with torch.no_grad(), session:
            for step in range(1 + options.decide_every):  # step 0 prepares the factors
                session.set_step(StepClock(step, 1000))
                if step == 0 or method not in DIVERGENCE_METHODS:
                    run()
                if step > 0:
                    added += [n - p for (_, n), p in zip(count_ops_per_call(run, modules), plain)]
        ops[method] = (round(sum(added) / len(added), 1), max(added))
        del session
    return ops


def hooked_call_micros(bench: Model, subject: dict, style: dict, options: EngineOptions, device: str, repeats: int,
                       warmup: int) -> dict[str, float]:
    """Per method: the microseconds one hooked layer call adds to a UNet call, on a tiny latent where the fixed cost
    of each operation dominates. Every timed call is a step of its own, so the choosing methods decide at each."""
    run, layers = bench.tiny_run, bench.hooked
    micros: dict[str, float] = {}
    steps = itertools.count()
    for method in METHODS:
        session = _session(bench.sites, subject, style, replace(options, method=method))

        def call(session: FusionSession = session) -> object:
            session.set_step(StepClock(next(steps) % 1000, 1000))
            return run()

        with torch.no_grad(), session:
            for _ in range(2 * options.switch_every):
                call()
        timed = time_modes({"base": run, method: call}, {"base": nullcontext, method: lambda s=session: s}, device,
                           max(repeats, 5), warmup)
        micros[method] = round((timed[method] - timed["base"]) / layers * 1e6, 2)
        del session, call
    return micros


def _device_name(device: str) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else device


def print_table(result: dict) -> None:
    rows = [("no LoRA", result["base_step_s"]), ("both merged (static)", result["static_step_s"]),
            ("dynamic kl", result["dynamic_step_s"])]
    width = f" width {result['width']}," if "width" in result else ""
    print(f"{result['model']}{width} {result['size']}x{result['size']}, batch 2, {result['device']} {result['dtype']}, "
          f"{result['hooked_layers']} hooked layers ({result['lora_layers']} LoRA layers), rank {result['lora_rank']}")
    print(f"{'mode':<24}{'step s':>10}")
    for label, seconds in rows:
        print(f"{label:<24}{seconds:>10.4f}")
    print(f"ratio dynamic/static {result['ratio']:.3f}   theoretical floor {result['floor']:.3f}   "
          f"extra memory {result['extra_mem_mb']:.1f} MB (LoRA factors {result['lora_factors_mb']:.1f} MB)")
    print(f"per hooked layer call, {TINY_LATENT}x{TINY_LATENT} latent:")
    print(f"{'method':<24}{'operations':>12}{'us':>10}")
    for method, ops in result["ops_per_hooked_call"].items():
        print(f"{method:<24}{ops:>12}{result['us_per_hooked_call'][method]:>10.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_dynfuse.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*sorted(CONFIGS), *TRANSFORMERS], default="sd15")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default 512 / 1024 / 512)")
    parser.add_argument("--width", type=int, default=None,
                        help=f"transformers: the width, a multiple of {bench_flux.HEAD} (FLUX.1: 3072), default 256 "
                             "(lumina2: a multiple of 192, default 384)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--counts-only", action="store_true",
                        help="only count the operations per hooked layer call, for every method (no timing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", choices=LAYER_SETS, default="all",
                        help="all: every layer a kohya LoCon LoRA touches; attention: the attention projections")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option for the dynamic run, e.g. decide_every=2 or max_tokens=1024")
    parser.add_argument("--guidance", action="store_true", help="time one guided step per decoder instead")
    parser.add_argument("--quality", nargs=argparse.REMAINDER, default=None, metavar="...",
                        help="the scored comparison of every method in the bundled world model instead (--retrain "
                             "first retrains its weights; --quality --help lists its options)")
    args = parser.parse_args(argv)
    if args.quality is not None:
        from lib_dynfuse.quality.bench import main as quality

        return quality(args.quality)
    dtype = DTYPES[args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    if args.guidance:
        from lib_dynfuse.bench import guidance as guidance_bench

        result = guidance_bench.run(size=args.size or 512, device=args.device, repeats=args.repeats, dtype=dtype)
        print(json.dumps(result))
        return 0
    size = args.size or DEFAULT_SIZE[args.model]
    if args.counts_only:
        print(json.dumps(operation_counts(args.model, args.rank, args.device, dtype, args.layers,
                                          _engine_options(parser, args.engine), args.width)))
        return 0
    result = benchmark(args.model, size, args.rank, args.device, dtype, args.repeats, args.layers,
                       _engine_options(parser, args.engine), args.width or DEFAULT_WIDTH.get(args.model, 256))
    print_table(result)
    print(json.dumps(result))
    return 0


def _engine_options(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as EngineOptions fields, each value of the field's default's type."""
    defaults = EngineOptions()
    options: dict[str, object] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(defaults, key) or not value:
            parser.error(f"--engine {pair!r}: use KEY=VALUE with KEY one of {', '.join(vars(defaults))}")
        default = getattr(defaults, key)
        options[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    try:
        EngineOptions(**options).validate()
    except ValueError as e:
        parser.error(str(e))
    return options

