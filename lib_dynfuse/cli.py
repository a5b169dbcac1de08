"""``python -m lib_dynfuse inspect SUBJECT.safetensors STYLE.safetensors``: what two LoRAs hold and how they
would be fused. ``python -m lib_dynfuse demo``: the static merge next to DynFuse in the bundled world model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lib_dynfuse.engine.deltas import LayerGeometry, LowRankDelta
from lib_dynfuse.loras.files import LoraFile, LoraFileError, LoraLayer, read_lora
from lib_dynfuse.engine.policies import KLORA_SCHEDULES, EngineOptions, KLoraPolicy, LayerPair


def _alphas(lora: LoraFile) -> str:
    values = sorted({layer.alpha for layer in lora.layers.values()}, key=lambda a: (a is None, a or 0))
    return ", ".join("none (scale 1)" if a is None else f"{a:g}" for a in values) or "-"


def _pair(layer: LoraLayer) -> tuple[LowRankDelta, LayerGeometry]:
    return LowRankDelta(layer.down, layer.up, layer.mid, layer.alpha), _guess_geometry(layer)


def _guess_geometry(layer: LoraLayer) -> LayerGeometry:
    if layer.down.dim() == 2:
        return LayerGeometry("linear", (layer.up.shape[0], layer.down.shape[1]))
    kernel = tuple((layer.mid if layer.mid is not None else layer.down).shape[2:])
    return LayerGeometry("conv2d", (layer.up.shape[0], layer.down.shape[1], *kernel))


def _ranges(steps: list[int]) -> str:
    """``[0, 1, 2, 7, 9, 10]`` → ``0-2, 7, 9-10``."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "none"


def describe(lora: LoraFile, label: str) -> list[str]:
    return [
        f"{label}: {lora.path}",
        f"  family guess : {lora.family}",
        f"  rank         : {lora.rank}" + (" (varies by layer)" if len({l.rank for l in lora.layers.values()}) > 1 else ""),
        f"  alpha        : {_alphas(lora)}",
        f"  UNet layers  : {len(lora.layers)}" + ("  (LoCon/Tucker mid factors)" if any(l.mid is not None for l in lora.layers.values()) else ""),
        f"  text encoder : {len(lora.text_encoder_keys)} layers (left to the host)",
    ]


def inspect(subject_path: str, style_path: str, *, steps: int = 30, summary: bool = False,
            options: EngineOptions | None = None) -> list[str]:
    subject, style = read_lora(subject_path, text_encoder=True), read_lora(style_path, text_encoder=True)
    subject.require_unet_layers()
    style.require_unet_layers()
    lines = describe(subject, "subject") + describe(style, "style")
    shared = [k for k in subject.layers if k in style.layers]
    lines.append(f"overlap: {len(shared)} layers touched by both, {len(subject.layers) - len(shared)} by the "
                 f"subject only, {len(style.layers) - len(shared)} by the style only")
    if subject.family != style.family and "unknown" not in (subject.family, style.family):
        lines.append(f"warning: the subject looks like {subject.family}, the style like {style.family}")
    if not shared:
        return lines
    pairs = {}
    for key in shared:
        (d_c, geometry), (d_s, geometry_s) = _pair(subject.layers[key]), _pair(style.layers[key])
        if geometry.weight_shape != geometry_s.weight_shape:
            raise LoraFileError(f"layer {key} has shape {list(geometry.weight_shape)} in the subject and "
                                f"{list(geometry_s.weight_shape)} in the style: the LoRAs are for different models")
        pairs[key] = LayerPair(d_c, d_s, geometry)
    options = options or EngineOptions(method="k-lora")
    options.validate()
    policy = KLoraPolicy(options)
    policy.prepare(pairs)
    style_steps = {k: policy.style_steps(k, steps) for k in shared}
    subject_throughout = sum(1 for s in style_steps.values() if not s)
    style_throughout = sum(1 for s in style_steps.values() if len(s) == steps)
    schedule = (f"S(t) = {options.klora_alpha:g}*t + {options.klora_beta:g}" if options.klora_schedule == "S"
                else f"S*(t) = ({options.klora_alpha:g}*t + 0.85*{options.klora_alpha:g}) mod {options.klora_alpha:g}")
    lines.append(f"K-LoRA (gamma {policy.gamma:.3g}, {schedule}, {steps} steps): subject throughout in "
                 f"{subject_throughout} layers, style throughout in {style_throughout}, a switch in between in "
                 f"{len(shared) - subject_throughout - style_throughout}")
    if summary:
        return lines
    # The switch step is the first step at which the style wins, asked of the engine's own rule; S* can hand
    # the layer back and forth, so its style steps are listed too.
    ranges = options.klora_schedule != "S"
    lines.append(f"  {'shared layer':<72} {'ratio R':>8} {'switch step':>11}" + ("  style at steps" if ranges else ""))
    for k in shared:
        first = str(style_steps[k][0]) if style_steps[k] else "never"
        lines.append(f"  {k:<72} {policy.ratio[k]:>8.3f} {first:>11}" + (f"  {_ranges(style_steps[k])}" if ranges else ""))
    return lines


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_dynfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("inspect", help="describe a subject and a style LoRA and how they overlap")
    cmd.add_argument("subject")
    cmd.add_argument("style")
    cmd.add_argument("--steps", type=_positive_int, default=30, help="sampling steps for the K-LoRA switch steps")
    cmd.add_argument("--summary", action="store_true", help="leave out the per-layer list of shared layers")
    defaults = EngineOptions()
    cmd.add_argument("--klora-alpha", type=float, default=defaults.klora_alpha, help="K-LoRA schedule slope α")
    cmd.add_argument("--klora-beta", type=float, default=defaults.klora_beta, help="K-LoRA schedule offset β (S only)")
    cmd.add_argument("--klora-schedule", choices=KLORA_SCHEDULES, default=defaults.klora_schedule)
    demo = commands.add_parser("demo", help="static merge vs DynFuse on one prompt of the bundled world model")
    demo.add_argument("--out", default="dynfuse_demo.png", help="the PNG to write (default dynfuse_demo.png)")
    demo.add_argument("--prompt", default=None, help='a prompt of the world (default "a sks, zwx style")')
    demo.add_argument("--method", default=None,
                      help="a further DynFuse method, shown beside the default and kl (and its selection map)")
    demo.add_argument("--pair", default="heart-zwx", help="the world's LoRA pair (python -m lib_dynfuse.bench "
                                                         "--quality --help lists them; default heart-zwx)")
    demo.add_argument("--guidance", action="store_true", help="add guidance to the DynFuse row")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    options = EngineOptions(method="k-lora", klora_alpha=args.klora_alpha, klora_beta=args.klora_beta,
                            klora_schedule=args.klora_schedule)
    try:
        lines = inspect(args.subject, args.style, steps=args.steps, summary=args.summary, options=options)
    except Exception as error:  # noqa: BLE001 - a tool for users: one line, never a traceback
        message = str(error) if isinstance(error, LoraFileError) else f"{type(error).__name__}: {error}"
        print(f"error: {message.strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from lib_dynfuse.quality import demo

    # The world model's operations are tiny: thread hand-offs cost more than they save, and on a busy machine
    # a second thread that waits for a core slows every operation down many times.
    torch.set_num_threads(1)
    try:
        demo.run(args.out, prompt=args.prompt or demo.DEMO_PROMPT, method=args.method, guidance=args.guidance,
                 pair=args.pair)
    except (OSError, ValueError) as error:  # missing weights, an unknown word or method: one line
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
