"""How much each LoRA changes a layer's output, per batch row, for all LoRAs at once.

For every token (a sequence position of a linear layer, a pixel of a conv layer) the output channels are
turned into a distribution by a softmax at temperature τ; the divergence between the base distribution and the
distribution of each candidate output (base plus one LoRA's delta, as the layer would output it) is averaged
over the row's tokens. All candidates are measured by the same few batched operations, because on a GPU every
operation is a kernel launch whatever its size.

Everything is computed in fp32 whatever the layer's dtype (log-softmax underflows in fp16), in chunks of tokens
small enough that all temporaries alive at once, the fp32 casts of fp16/bf16 inputs included, never exceed the
memory budget: by default the size of the layer output the rows come from. The per-token kernels themselves
are in :mod:`lib_dynfuse.engine.measure`.

The output channels of a linear layer may be measured in equal groups (the q, k and v of a fused projection): each
group is then its own distribution, and each row gets one divergence per group from the same operations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lib_dynfuse.engine import compiled
from lib_dynfuse.engine.measure import MeasureOptions, measure_tokens


def divergences(base: Tensor, candidates: Tensor, *, channel_dim: int, options: MeasureOptions = MeasureOptions(),
                budget_bytes: int | None = None) -> Tensor:
    """Divergence of each candidate output from ``base``, per row: an fp32 tensor ``[K, rows]``.

    ``base`` holds the rows that are measured, ``[rows, ...]``; ``candidates`` is ``[K, rows, ...]`` (the same
    rows with each LoRA's delta added). ``channel_dim`` is 1 for conv outputs ``[rows, C, H, W]`` and -1 for
    linear outputs ``[rows, N, C]`` / ``[rows, C]``. ``budget_bytes`` caps the memory allocated at once
    (default: the byte size of ``base``); it is exceeded only when one token alone does not fit.
    """
    sums, tokens = divergence_sums(base, candidates, channel_dim=channel_dim, options=options,
                                   budget_bytes=budget_bytes)
    return sums / tokens


def divergence_sums(base: Tensor, candidates: Tensor, *, channel_dim: int, options: MeasureOptions,
                    budget_bytes: int | None = None, groups: int | None = None) -> tuple[Tensor, int]:
    """The divergences summed over each row's tokens, ``[K, rows]``, and the number of tokens summed per row.

    The sum is what the hooks need (comparing two LoRAs on the same row needs no division); :func:`divergences`
    divides by the count. ``groups`` (linear outputs only) cuts the channels into that many equal groups, each
    measured as a distribution of its own: the sums are then ``[K, rows, groups]``.
    """
    if candidates.shape[1:] != base.shape:
        raise ValueError(f"base {list(base.shape)} and candidates {list(candidates.shape)} differ in shape")
    if groups is not None and ((base.dim() > 2 and channel_dim % base.dim() == 1) or base.shape[-1] % groups):
        raise ValueError(f"{groups} channel groups need a linear output whose channels they divide, not "
                         f"{list(base.shape)}")
    budget = budget_bytes if budget_bytes is not None else base.numel() * base.element_size()
    if options.compiled:
        if compiled.failure is None:
            try:
                # The compiled kernels keep one fp32 copy of the rows (the base's probabilities), nothing per candidate.
                return _sums(base, candidates, channel_dim, options, budget, 1, compiled.measure, groups)
            except compiled.Unavailable:
                pass
    copies = _live_copies(options, candidates.shape[0], base.dtype, base.device)
    return _sums(base, candidates, channel_dim, options, budget, copies, measure_tokens, groups)


def _sums(base: Tensor, candidates: Tensor, channel_dim: int, options: MeasureOptions, budget: int, copies: int,
          measure: Callable[..., Tensor], groups: int | None) -> tuple[Tensor, int]:
    """:func:`divergence_sums` by ``measure``, in chunks of tokens for which ``copies`` fp32 copies of the rows fit
    the budget."""
    rows, k = base.shape[0], candidates.shape[0]
    channels_first = base.dim() > 2 and channel_dim % base.dim() == 1
    channels = base.shape[1] if channels_first else base.shape[-1]
    tokens = base[0].numel() // channels
    stride = -(-tokens // options.max_tokens) if 0 < options.max_tokens < tokens else 1
    measured = -(-tokens // stride)
    # The per-row sums (the running total and a chunk's) and a standardising scale per token are small but
    # counted too.
    sums = k * rows * (groups or 1)
    token_bytes = 4 * rows * (channels * copies + _token_values(options, k) * (groups or 1))
    chunk = max(1, (budget - 2 * 4 * sums) // token_bytes)
    if stride == 1 and chunk >= tokens:
        return measure(base, candidates, channels_first, options, groups), tokens
    # [rows, T, C] or [rows, C, T]: one token axis to subsample and to cut into chunks.
    tdim = 2 if channels_first else 1
    a = _every(base.flatten(2) if channels_first else base.reshape(rows, tokens, channels), tdim, stride)
    z = _every(candidates.flatten(3) if channels_first else candidates.reshape(k, rows, tokens, channels), tdim + 1,
               stride)
    if chunk >= measured:
        return measure(a, z, channels_first, options, groups), measured
    total = None
    for a_part, z_part in zip(a.split(chunk, tdim), z.split(chunk, tdim + 1)):
        part = measure(a_part, z_part, channels_first, options, groups)
        total = part if total is None else total.add_(part)
    return total, measured


def _live_copies(options: MeasureOptions, k: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many fp32 tensors of one chunk's base size :func:`measure_tokens` holds at once, at most, for ``k``
    candidates: the base's log-probabilities, ``k`` candidate ones and what each measure adds, or for ``dot`` the
    products and the fp32 casts of the inputs."""
    if options.measure == "dot":
        return k + (0 if dtype == torch.float32 else 1 + k)
    copies = {"kl": 1 + k, "kl-reverse": 1 + 2 * k, "js": 1 + 3 * k}[options.measure]
    # A CUDA fp16 softmax writes fp32 directly; other dtypes, and scaled logits, take a copy of the candidates
    # that lives beside their log-softmax for a moment.
    native = dtype == torch.float32 or (dtype == torch.float16 and device.type == "cuda")
    if options.scaled or not native:
        copies = max(copies, 1 + 2 * k)
    return copies


def _token_values(options: MeasureOptions, k: int) -> int:
    """fp32 values per token beside the chunk-sized tensors: for ``dot`` the norms, dot products and cosines of
    each candidate, else a standardising scale and the std it comes from."""
    return 4 * k + 1 if options.measure == "dot" else 2


def _every(t: Tensor, dim: int, step: int) -> Tensor:
    return t if step == 1 else t[(slice(None),) * dim + (slice(None, None, step),)]
