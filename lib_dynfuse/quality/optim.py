"""The one training loop every part of the world uses: AdamW on a cosine schedule, with a progress line."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from torch import Tensor, nn

Log = Callable[[str], None]


def lr_at(step: int, steps: int, peak: float, warmup: int = 0) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def fit(params: Sequence[nn.Parameter], loss_at: Callable[[int], Tensor], *, steps: int, lr: float, label: str,
        log: Log, warmup: int = 0, weight_decay: float = 0.0, clip: float | None = None,
        after_step: Callable[[], None] | None = None, log_every: int = 100) -> None:
    """Minimise ``loss_at(step)`` (a scalar) over ``params``; ``after_step`` runs after each update (e.g. an
    EMA)."""
    import torch

    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start, running = time.time(), None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"{label} step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)")
