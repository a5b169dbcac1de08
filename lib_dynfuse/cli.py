"""``python -m lib_dynfuse inspect SUBJECT.safetensors STYLE.safetensors``: what two LoRAs hold and how they
would be fused."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from lib_dynfuse.deltas import LayerGeometry, LowRankDelta
from lib_dynfuse.lora_file import LoraFile, LoraFileError, LoraLayer, read_lora
from lib_dynfuse.policies import EngineOptions, KLoraPolicy, LayerPair


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


def describe(lora: LoraFile, label: str) -> list[str]:
    return [
        f"{label}: {lora.path}",
        f"  family guess : {lora.family}",
        f"  rank         : {lora.rank}" + (" (varies by layer)" if len({l.rank for l in lora.layers.values()}) > 1 else ""),
        f"  alpha        : {_alphas(lora)}",
        f"  UNet layers  : {len(lora.layers)}" + ("  (LoCon/Tucker mid factors)" if any(l.mid is not None for l in lora.layers.values()) else ""),
        f"  text encoder : {len(lora.text_encoder_keys)} layers (left to the host)",
    ]


def inspect(subject_path: str, style_path: str, *, steps: int = 30, list_layers: bool = False,
            options: EngineOptions | None = None) -> list[str]:
    subject, style = read_lora(subject_path), read_lora(style_path)
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
    policy = KLoraPolicy(options or EngineOptions(method="k-lora"))
    policy.prepare(pairs)
    switch = {k: math.ceil(policy.switch_progress(k) * steps) for k in shared}
    subject_throughout = sum(1 for s in switch.values() if s >= steps)
    style_throughout = sum(1 for s in switch.values() if s <= 0)
    lines.append(f"K-LoRA (gamma {policy.gamma:.3g}, S(t) = {policy.options.klora_alpha:g}*t + "
                 f"{policy.options.klora_beta:g}, {steps} steps): subject throughout in {subject_throughout} "
                 f"layers, style throughout in {style_throughout}, a switch in between in "
                 f"{len(shared) - subject_throughout - style_throughout}")
    if list_layers:
        lines.append(f"  {'layer':<72} {'ratio':>8} {'switch step':>11}")
        lines += [f"  {k:<72} {policy.ratio[k]:>8.3f} {switch[k]:>11d}" for k in shared]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_dynfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("inspect", help="describe a subject and a style LoRA and how they overlap")
    cmd.add_argument("subject")
    cmd.add_argument("style")
    cmd.add_argument("--steps", type=int, default=30, help="sampling steps for the K-LoRA switch steps")
    cmd.add_argument("--layers", action="store_true", help="list every shared layer with its K-LoRA switch step")
    args = parser.parse_args(argv)
    try:
        lines = inspect(args.subject, args.style, steps=args.steps, list_layers=args.layers)
    except LoraFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a tool for users: one line, never a traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
