"""How much each LoRA changes a layer's output, per batch row, for all LoRAs at once.

For every token (a sequence position of a linear layer, a pixel of a conv layer) the output channels are
turned into a distribution by a softmax at temperature τ; the divergence between the base distribution and the
distribution of each candidate output (base plus one LoRA's delta, as the layer would output it) is averaged
over the row's tokens. All candidates are measured by the same few batched operations, because on a GPU every
operation is a kernel launch whatever its size.

Everything is computed in fp32 whatever the layer's dtype (log-softmax underflows in fp16). The temporaries alive
at once, the fp32 casts of fp16/bf16 inputs included, never exceed a memory budget in bytes (:func:`memory_budget`:
the Settings tab's, else half of what the CUDA allocator can hand out, else 1 GiB off CUDA); rows whose
temporaries would exceed it are measured in chunks of tokens, each chunk a few more operations. The per-token
kernels themselves are in :mod:`lib_dynfuse.engine.measure`.

The output channels of a linear layer may be measured in equal groups (the q, k and v of a fused projection): each
group is then its own distribution, and each row gets one divergence per group from the same operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lib_dynfuse.engine import compiled
from lib_dynfuse.engine.measure import MeasureOptions, measure_tokens

# The budget off CUDA (CPU, Apple's MPS): one image's divergence of every SD1.5 layer up to 1152x1152 and of every
# SDXL layer up to 1536x1536 fits in one piece.
CPU_BUDGET = 1 << 30
# The least CUDA budget, however little the allocator has free: a smaller one would cut a large layer's divergence
# into hundreds of chunks.
MIN_CUDA_BUDGET = 64 << 20


def memory_budget(device: torch.device, megabytes: int = 0) -> int:
    """The bytes the divergence's temporaries may take at once on ``device``: ``megabytes`` when set (the Settings
    tab), else on CUDA half of what the allocator can hand out (the device's free memory and what it holds
    unused), else :data:`CPU_BUDGET`. A CUDA budget is read from the allocator, a driver call: once per
    step, not per layer (:class:`lib_dynfuse.engine.fusion.StepState`)."""
    if megabytes > 0:
        return megabytes << 20
    if device.type != "cuda":
        return CPU_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(MIN_CUDA_BUDGET, (free + unused) // 2)


def needed_bytes(base: Tensor, candidates: Tensor, *, channel_dim: int, options: MeasureOptions,
                 groups: int | None = None) -> int:
    """The bytes the divergence of these rows takes in one piece: the least budget that does not chunk it."""
    copies = _live_copies(options, candidates.shape[0], base.dtype)
    tokens, channels, _ = _token_layout(base, channel_dim)
    return _fixed_bytes(base, candidates, groups) + tokens * _token_bytes(base, candidates, channels, copies, options,
                                                                          groups)


def divergences(base: Tensor, candidates: Tensor, *, channel_dim: int, options: MeasureOptions = MeasureOptions(),
                budget_bytes: int | None = None) -> Tensor:
    """Divergence of each candidate output from ``base``, per row: an fp32 tensor ``[K, rows]``.

    ``base`` holds the rows that are measured, ``[rows, ...]``; ``candidates`` is ``[K, rows, ...]`` (the same
    rows with each LoRA's delta added). ``channel_dim`` is 1 for conv outputs ``[rows, C, H, W]`` and -1 for
    linear outputs ``[rows, N, C]`` / ``[rows, C]``. ``budget_bytes`` caps the memory allocated at once
    (default: :func:`memory_budget` of the rows' device); it is exceeded only when one token alone does not fit.
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
    budget = budget_bytes if budget_bytes is not None else memory_budget(base.device)
    if options.compiled:
        if compiled.failure is None:
            try:
                # The compiled kernels keep one fp32 copy of the rows (the base's probabilities), nothing per candidate.
                return _sums(base, candidates, channel_dim, options, budget, 1, compiled.measure, groups)
            except compiled.Unavailable:
                pass
    copies = _live_copies(options, candidates.shape[0], base.dtype)
    return _sums(base, candidates, channel_dim, options, budget, copies, measure_tokens, groups)


def _sums(base: Tensor, candidates: Tensor, channel_dim: int, options: MeasureOptions, budget: int, copies: int,
          measure: Callable[..., Tensor], groups: int | None) -> tuple[Tensor, int]:
    """:func:`divergence_sums` by ``measure``, in chunks of tokens for which ``copies`` fp32 copies of the rows fit
    the budget."""
    rows, k = base.shape[0], candidates.shape[0]
    tokens, channels, channels_first = _token_layout(base, channel_dim)
    stride = -(-tokens // options.max_tokens) if 0 < options.max_tokens < tokens else 1
    measured = -(-tokens // stride)
    token_bytes = _token_bytes(base, candidates, channels, copies, options, groups)
    chunk = max(1, (budget - _fixed_bytes(base, candidates, groups)) // token_bytes)
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


def _token_layout(base: Tensor, channel_dim: int) -> tuple[int, int, bool]:
    """Tokens per row, channels per token, and whether the channels come before the tokens (conv outputs). From
    the shape alone: indexing the tensor would be an operation."""
    channels_first = base.dim() > 2 and channel_dim % base.dim() == 1
    channels = base.shape[1] if channels_first else base.shape[-1]
    return math.prod(base.shape[1:]) // channels, channels, channels_first


def _token_bytes(base: Tensor, candidates: Tensor, channels: int, copies: int, options: MeasureOptions,
                 groups: int | None) -> int:
    """The temporaries' bytes per token of a chunk: ``copies`` fp32 copies of its channels in every row, and the
    per-token values beside them (a standardising scale, or the dot measure's norms)."""
    return 4 * base.shape[0] * (channels * copies + _token_values(options, candidates.shape[0]) * (groups or 1))


def _fixed_bytes(base: Tensor, candidates: Tensor, groups: int | None) -> int:
    """The per-row sums, the running total's and a chunk's: small, but counted too."""
    return 2 * 4 * candidates.shape[0] * base.shape[0] * (groups or 1)


def _live_copies(options: MeasureOptions, k: int, dtype: torch.dtype) -> int:
    """How many fp32 tensors of one chunk's base size :func:`measure_tokens` holds at once, at most, for ``k``
    candidates: the base's log-probabilities, ``k`` candidate ones and what each measure adds, or for ``dot`` the
    products and the fp32 casts of the inputs. A log-softmax of fp16/bf16 or of scaled logits overwrites its own
    fp32 copy, so no dtype or temperature adds one."""
    if options.measure == "dot":
        return k + (0 if dtype == torch.float32 else 1 + k)
    return {"kl": 1 + k, "kl-reverse": 1 + 2 * k, "js": 1 + 3 * k}[options.measure]


def _token_values(options: MeasureOptions, k: int) -> int:
    """fp32 values per token beside the chunk-sized tensors: for ``dot`` the norms, dot products and cosines of
    each candidate, else a standardising scale and the std it comes from."""
    return 4 * k + 1 if options.measure == "dot" else 2


def _every(t: Tensor, dim: int, step: int) -> Tensor:
    return t if step == 1 else t[(slice(None),) * dim + (slice(None, None, step),)]
