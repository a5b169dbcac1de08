"""How much a LoRA changes a layer's output, per batch row.

For every token (a sequence position of a linear layer, a pixel of a conv layer) the output channels are
turned into a distribution by a softmax at temperature τ; the divergence between the base distribution and
the one with the LoRA's delta added is averaged over tokens. Everything is computed in fp32 whatever the
layer's dtype (log-softmax underflows in fp16), in chunks of tokens small enough that the fp32 temporaries
never exceed the size of the layer output itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

MEASURES = ("kl", "kl-reverse", "js", "dot")

# fp32 tensors of one chunk alive at the same time in the worst measure (js).
_LIVE_TEMPORARIES = 4


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
    ``budget_bytes`` caps the fp32 temporaries (default: the byte size of ``base``). ``rows`` restricts the
    computation to those batch rows (the result then has one entry per listed row).
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
    chunk = max(1, budget // (_LIVE_TEMPORARIES * 4 * channels))
    out = torch.empty(len(rows), dtype=torch.float32, device=base.device)
    for i, r in enumerate(rows):
        total = torch.zeros((), dtype=torch.float32, device=base.device)
        for start, stop in _chunks(tokens, chunk):
            a = base3[r].narrow(tdim - 1, start, stop - start).float()
            d = delta3[r].narrow(tdim - 1, start, stop - start).float()
            total += _token_measure(a, d, cdim - 1, measure, temperature, standardize).sum()
        out[i] = total / tokens
    return out


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


def _token_measure(a: Tensor, d: Tensor, dim: int, measure: str, temperature: float, standardize: bool) -> Tensor:
    scale = 1.0 / temperature
    if standardize:
        std = a.std(dim=dim, keepdim=True).clamp_min(1e-6)
        a = a / (std * temperature)
        d = d / (std * temperature)
    elif scale != 1.0:
        a = a * scale
        d = d * scale
    if measure == "dot":
        # 1 - cosine between base and base + delta: a normalised dot-product score, zero for a zero delta.
        ad = a + d
        cos = (a * ad).sum(dim) / (a.norm(dim=dim) * ad.norm(dim=dim)).clamp_min(1e-12)
        return 1.0 - cos
    lse_a = torch.logsumexp(a, dim=dim)
    ad = a + d
    lse_ad = torch.logsumexp(ad, dim=dim)
    if measure == "kl":
        # KL(p||q) = Σ p (log p - log q) = lse(a+d) - lse(a) - E_p[d]
        p = torch.softmax(a, dim=dim)
        return (lse_ad - lse_a - (p * d).sum(dim)).clamp_min(0.0)
    if measure == "kl-reverse":
        q = torch.softmax(ad, dim=dim)
        return ((q * d).sum(dim) - lse_ad + lse_a).clamp_min(0.0)
    log_p = a - lse_a.unsqueeze(dim)
    log_q = ad - lse_ad.unsqueeze(dim)
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=a.device))
    p, q = log_p.exp(), log_q.exp()
    return (0.5 * (p * (log_p - log_m)).sum(dim) + 0.5 * (q * (log_q - log_m)).sum(dim)).clamp_min(0.0)
