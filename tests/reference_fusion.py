"""A straightforward reference of the fusion rules, to check the batched hot path against: one row, one LoRA
and one token at a time, in float64, written from the method's definition and not from the engine's code."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lib_dynfuse.engine.deltas import Delta, LayerGeometry
from lib_dynfuse.engine.policies import EngineOptions


def tokens_of(row: Tensor, channel_dim: int) -> Tensor:
    """One output row as ``[tokens, channels]``."""
    if row.dim() == 1:
        return row[None]
    if channel_dim % (row.dim() + 1) == 1:  # conv [C, H, W]
        return row.flatten(1).t()
    return row.reshape(-1, row.shape[-1])


def token_divergence(a: Tensor, b: Tensor, measure: str, temperature: float, standardize: bool) -> float:
    """Divergence of channel vector ``b`` (base + delta) from ``a`` (base), both float64."""
    if measure == "dot":
        return 1.0 - float(torch.dot(a, b) / max(float(a.norm() * b.norm()), 1e-12))
    scale = 1.0 / temperature
    if standardize:
        scale /= max(float(a.std()), 1e-6)
    log_p, log_q = torch.log_softmax(a * scale, 0), torch.log_softmax(b * scale, 0)
    p, q = log_p.exp(), log_q.exp()
    if measure == "kl":
        return float((p * (log_p - log_q)).sum())
    if measure == "kl-reverse":
        return float((q * (log_q - log_p)).sum())
    m = (p + q) / 2
    return float(0.5 * (p * (log_p - m.log())).sum() + 0.5 * (q * (log_q - m.log())).sum())


def row_divergence(base_row: Tensor, candidate_row: Tensor, channel_dim: int, options: EngineOptions) -> float:
    """Mean over the row's tokens (a fixed-stride subsample when ``max_tokens`` limits them)."""
    a, b = tokens_of(base_row.detach().double(), channel_dim), tokens_of(candidate_row.detach().double(), channel_dim)
    if 0 < options.max_tokens < a.shape[0]:
        stride = math.ceil(a.shape[0] / options.max_tokens)
        a, b = a[::stride], b[::stride]
    values = [token_divergence(a[t], b[t], options.measure, options.temperature, options.standardize)
              for t in range(a.shape[0])]
    return sum(values) / len(values)


def candidate(x: Tensor, base: Tensor, delta: Delta, geometry: LayerGeometry) -> Tensor:
    """The layer's output with ``delta`` added, in the layer's dtype, as the layer would output it."""
    return base + delta.output(x, geometry)


def reference_layer(x: Tensor, base: Tensor, subject: Delta, style: Delta, geometry: LayerGeometry,
                    unit_rows: list[tuple[int, list[int]]], options: EngineOptions, progress: float = 0.5,
                    step: int = 0) -> tuple[Tensor, dict[int, tuple[float, float | None, float | None]]]:
    """The fused output of one call and each unit's (subject weight, d_subject, d_style).

    ``unit_rows`` lists, for every unit, its deciding row and then all rows that follow its decision. Only the
    rules that read the outputs (kl, kl-soft, kl-even) and the constant ones (static, subject-only, style-only, switch)
    are covered; k-lora's weight statistics have their own tests.
    """
    channel_dim = -1 if geometry.kind == "linear" else 1
    with_subject, with_style = candidate(x, base, subject, geometry), candidate(x, base, style, geometry)
    out = torch.empty_like(base)
    decided = {}
    for unit, (deciding, rows) in enumerate(unit_rows):
        d_s = d_t = None
        w_style = None  # the style's own weight, for the rules that give each LoRA one
        if options.method in ("kl", "kl-soft", "kl-even"):
            d_s = row_divergence(base[deciding], with_subject[deciding], channel_dim, options)
            d_t = row_divergence(base[deciding], with_style[deciding], channel_dim, options)
            if options.method == "kl":
                w = 1.0 if d_s >= d_t else 0.0
            elif options.method == "kl-even":
                w, w_style = (min(1.0, (max(b, 1e-30) / max(a, 1e-30)) ** options.even_power)
                              for a, b in ((d_s, d_t), (d_t, d_s)))
            else:
                # d_s^(1/T) / (d_s^(1/T) + d_t^(1/T)), in logs
                log_ratio = (math.log(max(d_t, 1e-30)) - math.log(max(d_s, 1e-30))) / options.soft_temperature
                w = 1.0 / (1.0 + math.exp(min(log_ratio, 700.0)))
        elif options.method == "switch":
            w = 1.0 if (step // options.switch_every) % 2 == 0 else 0.0
        else:
            w = {"subject-only": 1.0, "style-only": 0.0}.get(options.method, 1.0)
        decided[unit] = (w, d_s, d_t)
        for r in rows:
            if options.method == "static":
                out[r] = with_subject[r] + with_style[r] - base[r]
            elif w_style is not None:
                out[r] = base[r] + w * (with_subject[r] - base[r]) + w_style * (with_style[r] - base[r])
            elif w in (0.0, 1.0):
                out[r] = with_subject[r] if w == 1.0 else with_style[r]
            else:
                out[r] = w * with_subject[r] + (1 - w) * with_style[r]
    return out, decided


def reference_parts(x: Tensor, base: Tensor, parts: list[tuple[str, int, int, Delta | None, Delta | None]],
                    geometry: LayerGeometry, unit_rows: list[tuple[int, list[int]]], options: EngineOptions,
                    step: int = 0) -> tuple[Tensor, dict[tuple[str, int], tuple[float, float | None, float | None]]]:
    """The fused output of a linear layer whose output channels are ``parts`` (name, start, length, subject delta,
    style delta), and each contested part's decision per unit: every part on its own channels only, as
    :func:`reference_layer` does a whole layer; a part one LoRA touches gets that delta (none under the other
    LoRA's one-LoRA method); other channels keep the base."""
    out = base.clone()
    decided = {}
    absent = {"subject-only": "style", "style-only": "subject"}.get(options.method)
    for name, start, length, subject, style in parts:
        own = LayerGeometry("linear", (length, *geometry.weight_shape[1:]))
        channels = slice(start, start + length)
        if subject is None or style is None:
            role, lone = ("subject", subject) if style is None else ("style", style)
            if role != absent:
                out[..., channels] = candidate(x, base[..., channels], lone, own)
            continue
        fused, by_unit = reference_layer(x, base[..., channels], subject, style, own, unit_rows, options, step=step)
        out[..., channels] = fused
        decided.update({(name, unit): values for unit, values in by_unit.items()})
    return out, decided
