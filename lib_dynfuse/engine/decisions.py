"""The record of every decision of a generation: layer × step × image → subject weight and both divergences.

While sampling runs, the hooks only append the tensors their decisions already are (no operation, no host
sync per layer); everything is brought to the host in one transfer when the log is first read. A finished
generation's log is settled: it keeps those host values only, and lets go of the tensors. A layer made of
parts (the q, k and v of a fused projection) decides for all its parts at once: each part is a layer of the log,
whose entries read their column of the shared tensors.
"""

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


@dataclass(frozen=True)
class _Entry:
    """One call's decisions for ``units``, as the hook made them."""

    units: tuple[int, ...]
    # the subject weight per unit (or for all units), or the winner index (0 = subject); settled: the weights
    value: Tensor | float | tuple[float, ...]
    winners: bool  # value holds winner indices
    # [2, units]: the divergences summed over `tokens` tokens; settled: (d_subject..., d_style...) per unit
    sums: Tensor | tuple[float | None, ...] | None
    tokens: int
    part: int | None = None  # the column of value ([units, parts]) and sums ([2, units, parts]) that is this layer's


@dataclass(frozen=True)
class _Row:
    units: tuple[int, ...]
    weights: list[float]
    d_subject: list[float | None]
    d_style: list[float | None]


class DecisionLog:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], list[_Entry]] = {}
        self._layers: dict[str, None] = {}
        self._host: dict[tuple[str, int], _Row] | None = None
        # The image of the batch each unit belongs to, where units are rows (deciding per row); an image's unit is
        # the image itself.
        self._image_of_unit: dict[int, int] = {}

    def units_are_rows_of(self, image_of_unit: dict[int, int]) -> None:
        """Say which image of the batch each of these units (rows that decide alone) belongs to."""
        self._image_of_unit.update(image_of_unit)

    def _image(self, unit: int) -> int:
        return self._image_of_unit.get(unit, unit)

    @property
    def images(self) -> list[int]:
        """The images of the batch that have decisions."""
        return sorted({self._image(u) for row in self._rows().values() for u in row.units})

    def record(self, layer: str, step: int, units: tuple[int, ...], value: Tensor | float,
               sums: Tensor | None = None, tokens: int = 1, *, winners: bool = False) -> None:
        """The decisions for ``units`` as the hook made them: ``value`` holds the winner's index per unit
        (``winners``, 0 = subject; a hard rule) or the subject's weight, per unit or one for all; ``sums``
        ``[2, units]`` the divergences (subject, style) summed over ``tokens`` tokens."""
        self._add(layer, step, _Entry(units, _detach(value), winners, _detach(sums), tokens))

    def record_parts(self, parts: tuple[str, ...], step: int, units: tuple[int, ...], value: Tensor,
                     sums: Tensor | None = None, tokens: int = 1, *, winners: bool = False) -> None:
        """The decisions of a layer made of ``parts``, one column per part: ``value`` ``[units, parts]`` holds the
        winner indices (``winners``) or the subject's weights, ``sums`` ``[2, units, parts]`` the divergences
        summed over ``tokens`` tokens."""
        value, sums = _detach(value), _detach(sums)
        for column, part in enumerate(parts):
            self._add(part, step, _Entry(units, value, winners, sums, tokens, column))

    def _add(self, layer: str, step: int, entry: _Entry) -> None:
        self._layers.setdefault(layer)
        # A second call in the same step deciding for other images (chunked cond/uncond) adds an entry.
        self._entries.setdefault((layer, step), []).append(entry)
        self._host = None

    def __len__(self) -> int:
        return sum(len(e.units) for entries in self._entries.values() for e in entries)

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    @property
    def steps(self) -> list[int]:
        return sorted({step for _, step in self._entries})

    def decisions(self) -> list[Decision]:
        return [Decision(layer, step, u, w, a, b)
                for (layer, step), row in self._rows().items()
                for u, w, a, b in zip(row.units, row.weights, row.d_subject, row.d_style)]

    def _weights(self, image: int | None) -> dict[tuple[str, int], list[float]]:
        """The subject weights of every layer and step: of all units, or of one image's."""
        rows = self._rows()
        if image is None:
            return {key: row.weights for key, row in rows.items()}
        found = {key: [w for u, w in zip(row.units, row.weights) if self._image(u) == image]
                 for key, row in rows.items()}
        return {key: weights for key, weights in found.items() if weights}

    def subject_share(self, image: int | None = None) -> float | None:
        """Share of layer-step-image decisions won by the subject (mean subject weight for soft rules), of the
        whole batch or of one of its images."""
        weights = [w for row in self._weights(image).values() for w in row]
        return sum(weights) / len(weights) if weights else None

    def matrix(self, layers: list[str] | None = None, image: int | None = None) -> tuple[list[str], list[int], Tensor]:
        """Mean subject weight over the batch (or of one image), as a ``[layers, steps]`` fp32 tensor (NaN: no
        decision)."""
        layers = layers if layers is not None else self.layers
        steps = self.steps
        grid = torch.full((len(layers), len(steps)), float("nan"))
        row_of = {name: i for i, name in enumerate(layers)}
        col_of = {step: j for j, step in enumerate(steps)}
        for (layer, step), weights in self._weights(image).items():
            if layer in row_of:
                grid[row_of[layer], col_of[step]] = sum(weights) / len(weights)
        return layers, steps, grid

    @classmethod
    def joined(cls, logs: Iterable[DecisionLog]) -> DecisionLog:
        """One log of several sampling runs of the same images (a first pass, then its hires pass): each run's
        steps come after the previous run's last step."""
        out = cls()
        offset = 0
        for log in logs:
            out._layers.update(log._layers)
            out._image_of_unit.update(log._image_of_unit)
            out._entries.update({(layer, step + offset): entries for (layer, step), entries in log._entries.items()})
            if log._entries:
                offset += max(log.steps) + 1
        return out

    def settle(self) -> None:
        """Keep the decisions as host values only (one entry per layer and step) and let go of the tensors the
        hooks made: what a finished generation keeps for its infotext and for inspection."""
        self._entries = {key: [_Entry(row.units, tuple(row.weights), False, (*row.d_subject, *row.d_style), 1)]
                         for key, row in self._rows().items()}

    def clear(self) -> None:
        self._entries.clear()
        self._layers.clear()
        self._image_of_unit.clear()
        self._host = None

    def _rows(self) -> dict[tuple[str, int], _Row]:
        """Every entry on the host: the device values of all entries go over in one transfer per kind."""
        if self._host is None:
            flat = [(key, e) for key, entries in self._entries.items() for e in entries]
            weights = _host_lists([_weights(e) for _, e in flat])
            divergences = _host_lists([(_column(e.sums, e).float() / e.tokens).flatten()
                                       if isinstance(e.sums, Tensor) else None for _, e in flat])
            host: dict[tuple[str, int], _Row] = {}
            for (key, entry), w, d in zip(flat, weights, divergences):
                n = len(entry.units)
                if isinstance(entry.value, tuple):  # settled
                    w, d = list(entry.value), list(entry.sums)
                w = w if w is not None else [float(entry.value)] * n
                d_s, d_t = (d[:n], d[n:]) if d is not None else ([None] * n, [None] * n)
                previous = host.get(key)
                if previous is not None:
                    host[key] = _Row(previous.units + entry.units, previous.weights + w,
                                     previous.d_subject + d_s, previous.d_style + d_t)
                else:
                    host[key] = _Row(entry.units, w, d_s, d_t)
            self._host = host
        return self._host


def _column(t: Tensor, entry: _Entry) -> Tensor:
    """An entry's own values of a tensor it shares with the other parts of its layer."""
    return t if entry.part is None else t[..., entry.part]


def _weights(entry: _Entry) -> Tensor | None:
    if not isinstance(entry.value, Tensor):
        return None
    value = _column(entry.value, entry).float()
    if value.dim() == 0:
        value = value.expand(len(entry.units))
    return 1.0 - value if entry.winners else value


def _host_lists(tensors: list[Tensor | None]) -> list[list[float] | None]:
    """The tensors' values as lists, moved to the host together (one copy per device)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in present:
        by_device.setdefault(t.device, []).append(t.reshape(-1))
    values: dict[torch.device, list[float]] = {d: torch.cat(ts).cpu().tolist() for d, ts in by_device.items()}
    offsets = {d: 0 for d in values}
    out: list[list[float] | None] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        start, n = offsets[t.device], t.numel()
        out.append(values[t.device][start:start + n])
        offsets[t.device] = start + n
    return out


def _detach(t: Tensor | float | None) -> Tensor | float | None:
    # No detach op when there is no graph to let go of (sampling runs without gradients).
    return t.detach() if isinstance(t, Tensor) and t.requires_grad else t
