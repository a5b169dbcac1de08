"""The per-token divergence kernels and their options: how far each candidate's softmax over the channels is from
the base's, computed in fp32 whatever the layer's dtype (log-softmax underflows in fp16).

:mod:`lib_dynfuse.engine.divergence` runs them over rows in chunks that fit the memory budget, and
:mod:`lib_dynfuse.engine.compiled` compiles them; both import this module, which imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MEASURES = ("kl", "kl-reverse", "js", "dot")


@dataclass(frozen=True)
class MeasureOptions:
    """How a per-token divergence is measured; the defaults are the engine's."""

    measure: str = "kl"
    temperature: float = 1.0
    standardize: bool = False
    max_tokens: int = 0  # 0: every token; else a fixed-stride subsample of at most this many tokens per row
    compiled: bool = False  # measure with compiled kernels (lib_dynfuse.engine.compiled), whole rows at once

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"unknown divergence measure {self.measure!r}; use one of {', '.join(MEASURES)}")

    @property
    def scaled(self) -> bool:
        return self.measure != "dot" and (self.standardize or self.temperature != 1.0)


# Every full-size temporary below is an fp32 tensor made here and then overwritten in place, and each is dropped
# as soon as it is used up: _live_copies() counts them and the chunk size depends on it. Mixed-dtype in-place
# operations are avoided on purpose: on CPU they cast an input into a hidden temporary.


def measure_tokens(a: Tensor, z: Tensor, channels_first: bool, options: MeasureOptions,
                   groups: int | None = None) -> Tensor:
    """Per-token divergences of the candidates ``z`` ``[K, rows, ...]`` from ``a`` ``[rows, ...]``, summed over
    every axis but the candidate and the row (and the group, when the last axis is cut into ``groups``)."""
    dim = 1 if channels_first else -1
    if groups is not None:
        a, z = a.unflatten(-1, (groups, -1)), z.unflatten(-1, (groups, -1))
    # The group axis, second to last, is kept.
    reduce = tuple(range(2, z.dim())) if groups is None else (*range(2, z.dim() - 2), z.dim() - 1)
    if options.measure == "dot":
        per_token = _dot(a, z, dim)
        tokens = tuple(range(2, per_token.dim() - (groups is not None)))
        return per_token.sum(tokens) if tokens else per_token
    scale = _scale(a, dim, options)
    log_p = _log_softmax32(a, dim, scale)
    log_q = _log_softmax32(z, dim + 1 if channels_first else dim, scale)
    if options.measure == "kl":
        # Σ p (log p - log q), the difference written over log q
        terms = torch.sub(log_p, log_q, out=log_q).mul_(log_p.exp_())
    elif options.measure == "kl-reverse":
        terms = torch.sub(log_q, log_p).mul_(log_q.exp_())
    else:
        terms = _js_terms(log_p, log_q)
    return terms.sum(reduce)


def _js_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    # JS = ½ Σ m (e^r_p r_p + e^r_q r_q) with r = log(p/m); e^r r is xlogy(e^r, e^r), so all stays in place.
    log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
    r_p = torch.sub(log_p, log_m)
    r_q = log_q.sub_(log_m)
    terms = r_p.exp_().xlogy_(r_p).add_(r_q.exp_().xlogy_(r_q))
    return terms.mul_(log_m.exp_()).mul_(0.5)



def _dot(a: Tensor, z: Tensor, dim: int) -> Tensor:
    """1 - cosine between the base and each candidate, per token: a normalised dot-product score, zero for a
    zero delta. A cosine ignores the per-token temperature and standardisation scales."""
    a32, z32 = _fp32(a), _fp32(z)
    zdim = dim + 1 if dim >= 0 else dim
    norms = torch.linalg.vector_norm(z32, dim=zdim) * torch.linalg.vector_norm(a32, dim=dim)
    cos = torch.mul(z32, a32).sum(zdim) / norms.clamp_min_(1e-12)
    return torch.rsub(cos, 1.0)


def _scale(a: Tensor, dim: int, options: MeasureOptions) -> float | Tensor:
    """1/τ, or 1/(τ·std) per token (keeping the channel axis, for broadcasting) when standardising."""
    if not options.standardize:
        return 1.0 / options.temperature
    return _fp32(a).std(dim=dim, keepdim=True).clamp_min_(1e-6).mul_(options.temperature).reciprocal_()


def _log_softmax32(t: Tensor, dim: int, scale: float | Tensor) -> Tensor:
    """log-softmax of ``t · scale`` over ``dim``, in fp32, in at most one new fp32 tensor of ``t``'s size."""
    if isinstance(scale, float) and scale == 1.0:
        if t.dtype == torch.float32:
            return torch.log_softmax(t, dim)
        if t.dtype == torch.float16 and t.is_cuda:
            return torch.log_softmax(t, dim, dtype=torch.float32)  # one kernel: it reads fp16 and writes fp32
        scaled = t.float()
    else:
        scaled = t * scale if t.dtype == torch.float32 else t.float().mul_(scale)
    # The fp32 copy becomes its own log-softmax: a second copy would live beside it for a moment.
    return torch.log_softmax(scaled, dim, out=scaled)


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()
