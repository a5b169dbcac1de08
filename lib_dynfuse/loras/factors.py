"""Checks that a LoRA layer's factors are all there, fit each other and hold finite values.

The same checks serve the file reader (``python -m lib_dynfuse inspect``) and the hosts, which run them on the
deltas they parsed before sampling: a missing, mismatched or non-finite factor is named by its layer and tensor
instead of failing later as a shape error, or poisoning every image with NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lib_dynfuse.engine.deltas import Delta, DenseDelta, LowRankDelta

# What a host-side message calls each tensor of a delta (the reader names them as the file does).
DELTA_NAMES = {"down": "down factor", "up": "up factor", "mid": "mid factor", "alpha": "alpha",
               "weight": "weight update", "bias": "bias update"}


class FactorError(ValueError):
    """One layer's factors are missing, mismatched or not finite. ``kind`` is a short phrase for the infotext
    ("a missing factor", "mismatched factors", "non-finite values", "non-float values", "a damaged alpha")."""

    def __init__(self, layer: str, detail: str, kind: str) -> None:
        super().__init__(f"layer {layer}: {detail}")
        self.layer = layer
        self.kind = kind


def check_factors(layer: str, factors: Mapping[str, Tensor | float | None],
                  names: Mapping[str, str] | None = None) -> None:
    """Raise :class:`FactorError` unless ``factors`` ("down", "up", optional "mid" and "alpha") make one LoRA
    layer: down and up both present, floats, 2-D (linear) or 4-D (conv), of one rank, up with a 1x1 kernel; a mid
    factor joining that rank to itself beside a 1x1 down; every value finite. ``names`` says what to call each
    tensor in the message (default :data:`DELTA_NAMES`)."""
    names = {**DELTA_NAMES, **(names or {})}
    present = {role: t for role, t in factors.items() if t is not None}
    missing = [role for role in ("down", "up") if role not in present]
    if missing:
        found = [names[role] for role in ("down", "up", "mid") if role in present]
        wanted = f"{' and '.join(missing)} factor{'s' if len(missing) > 1 else ''}"
        detail = f"{' and '.join(found)} without its {wanted}" if found else f"no {wanted}"
        raise FactorError(layer, detail, "a missing factor")
    _check_alpha(layer, present.get("alpha"), names["alpha"])
    tensors = {role: present[role] for role in ("down", "up", "mid") if role in present}
    for role, t in tensors.items():
        if not t.is_floating_point():
            raise FactorError(layer, f"{names[role]} holds {t.dtype} values, not floats", "non-float values")
    _check_shapes(layer, tensors, names)
    for role, t in tensors.items():
        check_finite(layer, t, names[role])


def _check_alpha(layer: str, alpha: Tensor | float | None, name: str) -> None:
    if alpha is None:
        return
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise FactorError(layer, f"{name} holds {alpha.numel()} values instead of one", "a damaged alpha")
        alpha = float(alpha)
    if not math.isfinite(alpha):
        raise FactorError(layer, f"{name} is {alpha}", "a damaged alpha")


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_shapes(layer: str, tensors: dict[str, Tensor], names: Mapping[str, str]) -> None:
    def mismatch(detail: str) -> FactorError:
        return FactorError(layer, f"mismatched factors: {detail}", "mismatched factors")

    down, up, mid = tensors["down"], tensors["up"], tensors.get("mid")
    for role in ("down", "up"):
        if tensors[role].dim() not in (2, 4):
            raise mismatch(f"{names[role]} has shape {_shape(tensors[role])}; a factor has 2 dimensions (linear) "
                           "or 4 (conv)")
    rank = down.shape[0]
    if rank == 0 or up.shape[1] != rank:
        raise mismatch(f"{names['down']} {_shape(down)} has rank {rank}, {names['up']} {_shape(up)} has rank "
                       f"{up.shape[1]}")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise mismatch(f"{names['up']} {_shape(up)} has a {_kernel(up)} kernel; an up factor's kernel is 1x1")
    if mid is None:
        return
    if mid.dim() != 4 or tuple(mid.shape[:2]) != (rank, rank):
        raise mismatch(f"{names['mid']} has shape {_shape(mid)}; between factors of rank {rank} it is "
                       f"[{rank}, {rank}, kernel height, kernel width]")
    if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
        raise mismatch(f"{names['down']} {_shape(down)} has a {_kernel(down)} kernel; beside a mid factor, which "
                       "holds the kernel, it is 1x1")


def _kernel(t: Tensor) -> str:
    return "x".join(map(str, t.shape[2:]))


def check_finite(layer: str, t: Tensor, name: str) -> None:
    """Raise :class:`FactorError` when ``t`` holds NaN or infinite values."""
    if t.numel() == 0:
        return
    t = t.detach()
    if t.element_size() == 1:  # float8: torch has no min/max for it; float16 holds its every value, NaN and inf
        t = t.to(torch.float16)
    # One pass, no tensor of flags: NaN propagates into the extremes, and an infinity is one.
    lowest, highest = torch.aminmax(t)
    if bool(torch.isfinite(lowest)) and bool(torch.isfinite(highest)):
        return
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
    plural = "s" if nan + inf > 1 else ""
    raise FactorError(layer, f"{name} holds {counts} value{plural} (of {t.numel()})", "non-finite values")


def check_delta(layer: str, delta: Delta) -> None:
    """:func:`check_factors` for a host's parsed delta; a dense update (LoHa, LoKr, DoRA, full) is checked for
    finite values, its shape being the layer's."""
    if isinstance(delta, LowRankDelta):
        check_factors(layer, {"down": delta.down, "up": delta.up, "mid": delta.mid, "alpha": delta.alpha})
    elif isinstance(delta, DenseDelta):
        check_finite(layer, delta.weight, DELTA_NAMES["weight"])
    if delta.bias is not None:
        check_finite(layer, delta.bias, DELTA_NAMES["bias"])


def check_deltas(deltas: Iterable[tuple[str, Delta]]) -> None:
    """:func:`check_delta` for every (layer name, delta) of one LoRA; raises at the first problem."""
    for layer, delta in deltas:
        check_delta(layer, delta)
