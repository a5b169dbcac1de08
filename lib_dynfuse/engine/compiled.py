"""The divergence as compiled kernels (``torch.compile``): meant for CUDA, where each eager operation is a kernel
launch.

The compiler fuses the log-softmaxes, the weighted differences and the sums into a few kernels that keep per-token
values only. It is compiled once per set of measure options, with dynamic shapes: new token counts, channel counts
and numbers of rows reuse the same kernels (the compiler specialises a single row once). A compiler that fails (no Triton, no C++ compiler) is said once in the
console and the standard path takes over for the rest of the process. The one full-size buffer the kernels keep,
the base rows' probabilities in fp32, counts against the divergence's memory budget like the standard path's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lib_dynfuse.engine.measure import MeasureOptions, measure_tokens

BACKEND = "inductor"
_compiled: dict[MeasureOptions, Callable[..., Tensor]] = {}
failure: str | None = None  # why the compiler could not be used; set once


class Unavailable(Exception):
    """The compiler failed (said once); the standard path measures instead."""


def measure(a: Tensor, z: Tensor, channels_first: bool, options: MeasureOptions, groups: int | None = None) -> Tensor:
    """The compiled per-row sums of :func:`lib_dynfuse.engine.measure.measure_tokens`; :class:`Unavailable` when the
    compiler fails, now or earlier."""
    global failure
    if failure is not None:
        raise Unavailable(failure)
    fn = _compiled.get(options)
    if fn is None:
        fn = _compiled[options] = torch.compile(measure_tokens, dynamic=True, backend=BACKEND)
    # The candidate count is always the same: left dynamic, it would be tied to an equal row count and recompile.
    # Detached, the inputs are no longer views, whose base's sizes the compiler would tie together the same way.
    a, z = a.detach(), z.detach()
    torch._dynamo.mark_static(z, 0)
    try:
        return fn(a, z, channels_first, options, groups)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any compiler failure: the eager path computes the same
        failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"DynFuse: the compiled divergence is not available ({failure}); the standard one is used instead.")
        raise Unavailable(failure) from error


def reset() -> None:
    """Forget the compiled kernels and any failure (tests; a changed setting)."""
    global failure
    _compiled.clear()
    failure = None
