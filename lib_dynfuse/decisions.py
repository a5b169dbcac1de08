"""The record of every decision of a generation: layer × step × image → subject weight and both divergences."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Decision:
    layer: str
    step: int
    unit: int  # the image (or, when deciding per row, the batch row)
    subject_weight: float  # 1.0: the subject won; 0.0: the style won; in between for soft rules
    d_subject: float | None
    d_style: float | None

    @property
    def winner(self) -> str:
        return "subject" if self.subject_weight >= 0.5 else "style"


class DecisionLog:
    """Kept as device tensors while sampling runs (no host sync inside the hooks); read after it."""

    def __init__(self) -> None:
        self._raw: dict[tuple[str, int], tuple[tuple[int, ...], Tensor, Tensor | None, Tensor | None]] = {}
        self._layers: dict[str, None] = {}

    def record(self, layer: str, step: int, units: tuple[int, ...], subject_weight: Tensor,
               d_subject: Tensor | None = None, d_style: Tensor | None = None) -> None:
        self._layers.setdefault(layer)
        previous = self._raw.get((layer, step))
        if previous is not None and previous[0] != units:
            # A second call in the same step deciding for other images (chunked cond/uncond): keep both.
            units = previous[0] + units
            subject_weight = torch.cat([previous[1], subject_weight.to(previous[1].device)])
            d_subject = _cat(previous[2], d_subject)
            d_style = _cat(previous[3], d_style)
        self._raw[(layer, step)] = (units, subject_weight.detach(), _detach(d_subject), _detach(d_style))

    def __len__(self) -> int:
        return sum(len(units) for units, *_ in self._raw.values())

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    @property
    def steps(self) -> list[int]:
        return sorted({step for _, step in self._raw})

    def decisions(self) -> list[Decision]:
        out = []
        for (layer, step), (units, w, ds, dt) in self._raw.items():
            w_list = w.float().cpu().tolist()
            ds_list = ds.float().cpu().tolist() if ds is not None else [None] * len(units)
            dt_list = dt.float().cpu().tolist() if dt is not None else [None] * len(units)
            out += [Decision(layer, step, u, wi, a, b) for u, wi, a, b in zip(units, w_list, ds_list, dt_list)]
        return out

    def subject_share(self) -> float | None:
        """Share of layer-step-image decisions won by the subject (mean subject weight for soft rules)."""
        if not self._raw:
            return None
        total = sum(float(w.float().sum()) for _, w, _, _ in self._raw.values())
        return total / len(self)

    def matrix(self, layers: list[str] | None = None) -> tuple[list[str], list[int], Tensor]:
        """Mean subject weight over the batch, as a ``[layers, steps]`` fp32 tensor (NaN: no decision)."""
        layers = layers if layers is not None else self.layers
        steps = self.steps
        grid = torch.full((len(layers), len(steps)), float("nan"))
        row_of = {name: i for i, name in enumerate(layers)}
        col_of = {step: j for j, step in enumerate(steps)}
        for (layer, step), (_, w, _, _) in self._raw.items():
            if layer in row_of:
                grid[row_of[layer], col_of[step]] = float(w.float().mean())
        return layers, steps, grid

    @classmethod
    def joined(cls, logs: Iterable[DecisionLog]) -> DecisionLog:
        """One log of several sampling runs of the same images (a first pass, then its hires pass): each run's
        steps come after the previous run's last step."""
        out = cls()
        offset = 0
        for log in logs:
            out._layers.update(log._layers)
            out._raw.update({(layer, step + offset): entry for (layer, step), entry in log._raw.items()})
            if log._raw:
                offset += max(log.steps) + 1
        return out

    def clear(self) -> None:
        self._raw.clear()
        self._layers.clear()


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return None
    return torch.cat([a, b.to(a.device)])
