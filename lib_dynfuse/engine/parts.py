"""Layers whose output channels are several parts side by side, each with its own LoRA deltas.

A fused projection computes what a model describes as separate layers: FLUX's ``img_attn.qkv`` is q, k and v, its
single blocks' ``linear1`` is q, k, v and the MLP input. A LoRA may patch the whole layer or each part on its own (a
slice ``[start, start + length)`` of the output channels), and the subject's and style's contributions are then
compared part by part. Each part is a layer of its own for the decisions; the layer's output is still one tensor.

The products run per *run* of parts: neighbouring parts of one length (q, k, v) share one batched product for
every part and candidate, whatever their number. All the parts' down factors are one matrix, as for a whole layer.
Parts whose deltas are not plain low-rank linear LoRAs are placed into one whole-layer delta per candidate instead:
correct, with the cost of a dense product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lib_dynfuse.engine.deltas import Delta, DenseDelta, LayerGeometry, LowRankDelta
from lib_dynfuse.engine.pair import DeltaByDelta, padded

# What one part adds to one output of a kernel: its deltas with their weights (empty: nothing).
Terms = Sequence[tuple[Delta, float]]


@dataclass(frozen=True)
class Part:
    """A slice of a layer's output channels with the subject's and the style's delta on it (either may be absent)."""

    name: str
    start: int
    length: int
    subject: Delta | None
    style: Delta | None

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def contested(self) -> bool:
        return self.subject is not None and self.style is not None

    @property
    def only(self) -> Delta | None:
        """The one delta of an uncontested part."""
        return self.subject if self.style is None else self.style

    def geometry(self, layer: LayerGeometry) -> LayerGeometry:
        """The part as a layer of its own: the layer's geometry with the part's output channels."""
        return layer.with_out_channels(self.length)


def check_parts(name: str, parts: Sequence[Part], geometry: LayerGeometry) -> None:
    """ValueError unless ``parts`` are disjoint slices of a linear layer's output, each with a delta of its size."""
    if geometry.kind != "linear":
        raise ValueError(f"layer {name}: parts of the output channels need a linear layer, not {geometry.kind}")
    end = 0
    for part in sorted(parts, key=lambda p: p.start):
        if part.start < end or part.length < 1 or part.stop > geometry.out_channels:
            raise ValueError(f"layer {name}: part {part.name} [{part.start}, {part.stop}) overlaps another or leaves "
                             f"the {geometry.out_channels} output channels")
        if part.subject is None and part.style is None:
            raise ValueError(f"layer {name}: part {part.name} has neither a subject nor a style delta")
        for delta in (part.subject, part.style):
            rows = None if delta is None else delta.out_channels
            if rows is not None and rows != part.length:
                raise ValueError(f"layer {name}: part {part.name} has {part.length} channels, a delta on it {rows}")
        end = part.stop


@dataclass(frozen=True)
class Run:
    """Neighbouring parts of one length: ``count`` parts from channel ``start`` on."""

    start: int
    count: int
    length: int

    @property
    def channels(self) -> int:
        return self.count * self.length


def runs(parts: Sequence[Part]) -> list[Run]:
    """The parts (in channel order) as runs of neighbours of one length."""
    found: list[Run] = []
    for part in parts:
        last = found[-1] if found else None
        if last is not None and last.length == part.length and last.start + last.channels == part.start:
            found[-1] = replace(last, count=last.count + 1)
        else:
            found.append(Run(part.start, 1, part.length))
    return found


def plain(delta: Delta) -> bool:
    """A delta the batched products take: a linear low-rank LoRA without a bias."""
    return isinstance(delta, LowRankDelta) and delta.mid is None and delta.bias is None


class SlicedKernel:
    """The outputs of one sliced layer on one device and dtype: ``outputs(x, base)`` is ``[S, *base.shape]``, output
    ``s`` being the layer's output plus every part's ``slots[s][part]`` terms in the part's channels."""

    def __init__(self, parts: Sequence[Part], slots: Sequence[Sequence[Terms]], geometry: LayerGeometry,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.slots = len(slots)
        terms = [[[(d, w) for d, w in slot[i] if w != 0.0] for slot in slots] for i in range(len(parts))]
        self.batched = all(plain(d) for per_part in terms for slot in per_part for d, _ in slot)
        if self.batched:
            self._prepare_runs(parts, terms, geometry, device, dtype)
        else:
            self.whole = [_placed(parts, [per_part[s] for per_part in terms], geometry) for s in range(self.slots)]
            self.kernels = [None if d is None else DeltaByDelta(d, None, geometry, device, dtype) for d in self.whole]

    def _prepare_runs(self, parts: Sequence[Part], terms: list, geometry: LayerGeometry, device: torch.device,
                      dtype: torch.dtype) -> None:
        """Per run, the up factors of every slot and part as one batch ``[S·P, R, L]`` (ranks padded to the run's
        largest with zeros, which add exact zeros), and all down factors as one matrix in the same order."""
        in_features = geometry.weight_shape[1]
        downs, self.runs = [], []
        column, first = 0, 0
        for run in runs(parts):
            factors = [_factors(terms[first + p][s], in_features) for s in range(self.slots) for p in range(run.count)]
            first += run.count
            rank = max(down.shape[0] for down, _ in factors)
            if rank == 0:
                continue
            ups = torch.zeros(len(factors), rank, run.length)
            for b, (down, up) in enumerate(factors):
                downs.append(padded(down, 0, rank))
                if down.shape[0]:
                    ups[b, :down.shape[0]] = up.t()
            self.runs.append((run, column, ups.to(device=device, dtype=dtype).contiguous()))
            column += len(factors) * rank
        self.down_t = torch.cat(downs).t().to(device=device, dtype=dtype).contiguous() if downs else None
        # One run over every output channel (a fused q, k, v): the base is added to the products as they are placed.
        self.whole_run = len(self.runs) == 1 and self.runs[0][0].channels == geometry.out_channels

    def outputs(self, x: Tensor, base: Tensor) -> Tensor:
        if not self.batched:
            return torch.stack([base if k is None else k.weighted(x, base, 1.0, 0.0) for k in self.kernels])
        if self.down_t is None:
            return base.expand(self.slots, *base.shape).clone()
        channels = base.shape[-1]
        h = x.reshape(-1, x.shape[-1]).mm(self.down_t)
        tokens = h.shape[0]
        if self.whole_run:
            run, _, ups = self.runs[0]
            y = torch.bmm(h.view(tokens, ups.shape[0], -1).transpose(0, 1), ups)
            out = torch.add(base.reshape(1, tokens, run.count, run.length),
                            y.view(self.slots, run.count, tokens, run.length).transpose(1, 2))
            return out.view(self.slots, *base.shape)
        out = base.expand(self.slots, *base.shape).clone()
        flat = out.view(self.slots, tokens, channels)
        for run, column, ups in self.runs:
            batch = ups.shape[0]
            width = batch * ups.shape[1]
            hr = h if width == h.shape[1] else h.narrow(1, column, width)
            y = torch.bmm(hr.view(tokens, batch, -1).transpose(0, 1), ups)
            target = flat if run.channels == channels else flat.narrow(2, run.start, run.channels)
            target.view(self.slots, tokens, run.count, run.length).add_(
                y.view(self.slots, run.count, tokens, run.length).transpose(1, 2))
        return out


def _factors(terms: Terms, in_features: int) -> tuple[Tensor, Tensor]:
    """One part's terms as one pair of factors: the downs stacked, the ups side by side with each term's scale and
    weight folded in (fp32; rank 0 when there is no term)."""
    if not terms:
        return torch.zeros(0, in_features), torch.zeros(0, 0)
    down = torch.cat([d.down.float().flatten(1) for d, _ in terms])
    up = torch.cat([d.up.float().flatten(1) * (d.scale * w) for d, w in terms], dim=1)
    return down, up


def _placed(parts: Sequence[Part], terms: Sequence[Terms], geometry: LayerGeometry) -> Delta | None:
    """Every part's terms as one dense delta on the whole layer (None when there is none)."""
    if not any(terms):
        return None
    weight = torch.zeros(geometry.weight_shape)
    bias = None
    for part, part_terms in zip(parts, terms):
        for delta, w in part_terms:
            weight[part.start:part.stop] += delta.dense_weight(part.geometry(geometry)) * w
            if delta.bias is not None:
                bias = torch.zeros(geometry.out_channels) if bias is None else bias
                bias[part.start:part.stop] += delta.bias.float() * (delta.strength * w)
    return DenseDelta(weight, bias)
