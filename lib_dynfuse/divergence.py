"""How much a LoRA changes a layer's output, per batch row.

For every token (a sequence position of a linear layer, a pixel of a conv layer) the output channels are
turned into a distribution by a softmax at temperature τ; the divergence between the base distribution and
the one with the LoRA's delta added is averaged over tokens. Everything is computed in fp32 whatever the
layer's dtype (log-softmax underflows in fp16), in chunks of tokens small enough that all temporaries alive
at once, the fp32 casts of fp16/bf16 inputs included, never exceed the size of the layer output itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

MEASURES = ("kl", "kl-reverse", "js", "dot")

# Per-token fp32 vectors (maxima, sums, log-sum-exps, scales) alive at once beside the chunk-sized ones.
_TOKEN_VECTORS = 8


def row_divergence(
    base: Tensor,
    delta: Tensor,
    *,
    channel_dim: int,
    measure: str = "kl",
    temperature: float = 1.0,
    standardize: bool = False,
    budget_bytes: int | None = None,
    rows: Sequence[int] | None = None,
) -> Tensor:
    """Divergence of ``base + delta`` from ``base`` for each row of the batch, as an fp32 tensor ``[rows]``.

    ``channel_dim`` is 1 for conv outputs ``[B, C, H, W]`` and -1 for linear outputs ``[B, N, C]`` / ``[B, C]``.
    ``budget_bytes`` caps the memory allocated at once (default: the byte size of ``base``); it is exceeded
    only when one token alone does not fit. ``rows`` restricts the computation to those batch rows (the result
    then has one entry per listed row).
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown divergence measure {measure!r}; use one of {', '.join(MEASURES)}")
    if base.shape != delta.shape:
        raise ValueError(f"base {list(base.shape)} and delta {list(delta.shape)} differ in shape")
    rows = range(base.shape[0]) if rows is None else rows
    # [rows, C, T] for conv, [rows, T, C] for linear: reduce over the channel axis, chunk over tokens.
    base3, delta3 = _token_view(base, channel_dim), _token_view(delta, channel_dim)
    cdim = 1 if _channels_first(base, channel_dim) else 2
    tdim = 3 - cdim
    channels, tokens = base3.shape[cdim], base3.shape[tdim]
    budget = budget_bytes if budget_bytes is not None else base.numel() * base.element_size()
    token_bytes = 4 * (_live_copies(measure, base.dtype) * channels + _TOKEN_VECTORS)
    chunk = max(1, budget // token_bytes)
    out = torch.empty(len(rows), dtype=torch.float32, device=base.device)
    for i, r in enumerate(rows):
        total = torch.zeros((), dtype=torch.float32, device=base.device)
        for start, stop in _chunks(tokens, chunk):
            a = base3[r].narrow(tdim - 1, start, stop - start)
            d = delta3[r].narrow(tdim - 1, start, stop - start)
            total += _token_measure(a, d, cdim - 1, measure, temperature, standardize).sum()
        out[i] = total / tokens
    return out


def _live_copies(measure: str, dtype: torch.dtype) -> int:
    """How many fp32 tensors of a chunk's size :func:`_token_measure` holds at once, at most.

    One working copy, plus the fp32 cast of the other input when the layer is not fp32; ``js`` holds
    log p, log q and log m, and the casts are gone by then.
    """
    if measure == "js":
        return 3
    return 1 if dtype == torch.float32 else 2


def _token_view(t: Tensor, channel_dim: int) -> Tensor:
    if t.dim() == 2:
        return t.unsqueeze(1)
    if _channels_first(t, channel_dim):
        return t.flatten(2)
    return t.flatten(1, -2)


def _channels_first(t: Tensor, channel_dim: int) -> bool:
    return t.dim() > 2 and channel_dim % t.dim() == 1


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


# Every full-size temporary below is an fp32 tensor this module allocated and then overwrites in place, and
# each is dropped as soon as it is used up: _live_copies() counts them and the chunk size depends on it.
# Mixed-dtype operations are avoided on purpose: on CPU they cast an input into a hidden temporary.


def _token_measure(a: Tensor, d: Tensor, dim: int, measure: str, temperature: float, standardize: bool) -> Tensor:
    """Per-token divergence for base logits ``a`` and delta ``d`` (views of the layer output, any float dtype)."""
    if measure == "dot":
        # 1 - cosine between base and base + delta: a normalised dot-product score, zero for a zero delta. A
        # cosine ignores the per-token temperature and standardisation scales.
        shifted = _fp32_sum(a, d)
        norm_shifted = torch.linalg.vector_norm(shifted, dim=dim)
        a32 = _fp32(a)
        cos = shifted.mul_(a32).sum(dim) / (torch.linalg.vector_norm(a32, dim=dim) * norm_shifted).clamp_min(1e-12)
        return 1.0 - cos
    scale = _scale(a, dim, temperature, standardize)
    if measure == "js":
        return _js(a, d, dim, scale)
    # KL(p||q) = lse(a+d) - lse(a) - E_p[d] and KL(q||p) = E_q[d] - lse(a+d) + lse(a), logits scaled.
    reverse = measure == "kl-reverse"
    first = _scaled(_fp32_sum(a, d) if reverse else _fp32_copy(a), scale)
    lse_first = _softmax_(first, dim)
    # first now holds q (reverse) or p: the expectation of the scaled delta under it.
    expected = _scaled(first.mul_(_fp32(d)), scale).sum(dim)
    del first
    second = _scaled(_fp32_copy(a) if reverse else _fp32_sum(a, d), scale)
    lse_second = _softmax_(second, dim)
    del second
    if reverse:
        return (expected - lse_first + lse_second).clamp_min(0.0)
    return (lse_second - lse_first - expected).clamp_min(0.0)


def _js(a: Tensor, d: Tensor, dim: int, scale: float | Tensor) -> Tensor:
    log_q = torch.log_softmax(_scaled(_fp32_sum(a, d), scale), dim=dim)
    log_p = torch.log_softmax(_scaled(_fp32_copy(a), scale), dim=dim)
    log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
    # KL(p||m) = Σ m·e^r·r with r = log(p/m); e^r·r is xlogy(e^r, e^r), so everything stays in place.
    r_p, r_q = log_p.sub_(log_m), log_q.sub_(log_m)
    terms = r_p.exp_().xlogy_(r_p).add_(r_q.exp_().xlogy_(r_q)).mul_(log_m.exp_())
    return (0.5 * terms.sum(dim)).clamp_min(0.0)


def _scale(a: Tensor, dim: int, temperature: float, standardize: bool) -> float | Tensor:
    """1/τ, or 1/(τ·std) per token (keeping the channel axis, for broadcasting) when standardising."""
    if not standardize:
        return 1.0 / temperature
    return _fp32(a).std(dim=dim, keepdim=True).clamp_min_(1e-6).mul_(temperature).reciprocal_()


def _scaled(t: Tensor, scale: float | Tensor) -> Tensor:
    return t if isinstance(scale, float) and scale == 1.0 else t.mul_(scale)


def _softmax_(t: Tensor, dim: int) -> Tensor:
    """Turn logits ``t`` into their softmax in place; returns their log-sum-exp, one value per token."""
    top = t.amax(dim, keepdim=True)
    total = t.sub_(top).exp_().sum(dim, keepdim=True)
    t.div_(total)
    return total.log_().add_(top).squeeze(dim)


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _fp32_copy(t: Tensor) -> Tensor:
    return t.clone() if t.dtype == torch.float32 else t.float()


def _fp32_sum(a: Tensor, d: Tensor) -> Tensor:
    if a.dtype == torch.float32:
        return a + d
    total = a.float()
    return total.add_(d.float())
