"""Both LoRAs of one layer, prepared once per device and dtype for the hooks' batched products.

On a GPU every tensor operation is a kernel launch whatever its size, so the two LoRAs are not evaluated one
after the other: their down factors are concatenated into one matrix (one product for both), their scales are
folded into the up factors once, and the two up products run as one batched product that also adds the base
output. A layer whose two deltas do not share a form (a dense delta, a bias, kernels of other shapes) is
evaluated delta by delta: correct, with a few more operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lib_dynfuse.engine.deltas import Delta, DenseDelta, LayerGeometry, LowRankDelta


class PairKernel:
    """The products of one layer's two deltas on one device and dtype."""

    def candidates(self, x: Tensor, base: Tensor) -> Tensor:
        """``[2, *base.shape]``: the layer's output with the subject's delta added, and with the style's."""
        raise NotImplementedError

    def weighted(self, x: Tensor, base: Tensor, w_subject: float, w_style: float) -> Tensor:
        """``base + w_subject · subject delta + w_style · style delta``, for weights that are the same for every
        row (the static methods, and the winner of a whole step)."""
        raise NotImplementedError


def pair_kernel(subject: Delta | None, style: Delta | None, geometry: LayerGeometry, device: torch.device,
                dtype: torch.dtype) -> PairKernel:
    """The kernel for one layer; either delta may be absent (a layer only one LoRA touches), and then only
    :meth:`PairKernel.weighted` is used."""
    present = [d for d in (subject, style) if d is not None]
    if all(isinstance(d, LowRankDelta) and d.bias is None for d in present):
        if geometry.kind == "linear" and all(d.mid is None for d in present):
            return LinearLowRank(subject, style, device, dtype)
        if geometry.kind == "conv2d" and geometry.groups == 1 and _same_kernels(present):
            return ConvLowRank(subject, style, geometry, device, dtype)
    return DeltaByDelta(subject, style, geometry, device, dtype)


def _same_kernels(deltas: list[LowRankDelta]) -> bool:
    """Whether the deltas' convolutions can run as one: the same kernel on the down factor, or all Tucker with
    1x1 down factors and the same kernel on mid."""
    if len({d.mid is None for d in deltas}) > 1:
        return False
    if deltas[0].mid is not None:
        return len({d.mid.shape[2:] for d in deltas}) == 1 and all(d.down.shape[2:] == (1, 1) for d in deltas)
    return len({d.down.shape[2:] for d in deltas}) == 1


def padded(t: Tensor, dim: int, size: int) -> Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``: a rank padded this way adds exact zeros."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim)


class _LowRankPair(PairKernel):
    """Factors of two low-rank deltas, padded to one rank so that the two up products batch; the scales are in
    the up factors."""

    def __init__(self, subject: LowRankDelta | None, style: LowRankDelta | None, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.pair = (subject, style)
        self.both = subject is not None and style is not None
        self.rank = max(d.rank for d in self.pair if d is not None)
        self.device, self.dtype = device, dtype
        # (subject weight, style weight) -> the factors of weighted(); () when both weights are zero
        self._weighted: dict[tuple[float, float], tuple] = {}

    # The padded fp32 factors, scales folded in, are made when factors are prepared and not kept: kept, they would
    # hold a second (for fp16 layers a third) copy of every LoRA for the whole generation.
    @property
    def downs(self) -> list[Tensor | None]:
        return [None if d is None else padded(d.down.float(), 0, self.rank) for d in self.pair]

    @property
    def ups(self) -> list[Tensor | None]:
        return [None if d is None else padded(d.up.float() * d.scale, 1, self.rank) for d in self.pair]

    def _on_device(self, t: Tensor) -> Tensor:
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def _factors_for(self, w_subject: float, w_style: float) -> tuple[list[Tensor], list[Tensor]]:
        """Down and weighted up factors of the deltas with a non-zero weight."""
        used = [(down, up * w) for down, up, w in zip(self.downs, self.ups, (w_subject, w_style))
                if down is not None and w != 0.0]
        return [d for d, _ in used], [u for _, u in used]


class LinearLowRank(_LowRankPair):
    def __init__(self, subject: LowRankDelta, style: LowRankDelta, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(subject, style, device, dtype)
        if self.both:
            # x @ down_t is [tokens, 2·rank]: both intermediates from one product.
            self.down_t = self._on_device(torch.cat(self.downs).t())
            self.ups_t = self._on_device(torch.stack([u.t() for u in self.ups]))  # [2, rank, out]

    def candidates(self, x: Tensor, base: Tensor) -> Tensor:
        out = base.shape[-1]
        h = x.reshape(-1, x.shape[-1]).mm(self.down_t)
        # h is [tokens, 2·rank]: each LoRA's intermediates as a batch [2, tokens, rank], in one view.
        tokens = h.shape[0]
        per_lora = h.as_strided((2, tokens, self.rank), (self.rank, 2 * self.rank, 1))
        z = torch.baddbmm(base.reshape(1, -1, out), per_lora, self.ups_t)
        return z.view(2, *base.shape)

    def weighted(self, x: Tensor, base: Tensor, w_subject: float, w_style: float) -> Tensor:
        factors = self._weighted.get((w_subject, w_style))
        if factors is None:
            downs, ups = self._factors_for(w_subject, w_style)
            factors = self._weighted[(w_subject, w_style)] = (
                (self._on_device(torch.cat(downs).t()), self._on_device(torch.cat(ups, 1).t())) if downs else ())
        if not factors:
            return base
        down_t, up_t = factors
        h = x.reshape(-1, x.shape[-1]).mm(down_t)
        return torch.addmm(base.reshape(-1, base.shape[-1]), h, up_t).view(base.shape)


class ConvLowRank(_LowRankPair):
    """LoCon (the layer's kernel on the down factor) or Tucker (1x1 down, the kernel on mid) in both deltas:
    the two up (and mid) convolutions run as one grouped convolution."""

    def __init__(self, subject: LowRankDelta | None, style: LowRankDelta | None, geometry: LayerGeometry,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(subject, style, device, dtype)
        self.geometry = geometry
        self.tucker = any(d is not None and d.mid is not None for d in self.pair)
        self.mids = [None if d is None or d.mid is None else padded(padded(d.mid.float(), 0, self.rank), 1, self.rank)
                     for d in self.pair]
        if self.both:
            self.down = self._on_device(torch.cat(self.downs))
            self.mid = self._on_device(torch.cat(self.mids)) if self.tucker else None
            self.up = self._on_device(torch.cat(self.ups))  # [2·out, rank, 1, 1], two groups

    def _spatial(self, t: Tensor, weight: Tensor, groups: int) -> Tensor:
        g = self.geometry
        return F.conv2d(t, weight, None, g.stride, g.padding, g.dilation, groups)

    def candidates(self, x: Tensor, base: Tensor) -> Tensor:
        if self.tucker:
            h = self._spatial(F.conv2d(x, self.down), self.mid, 2)
        else:
            h = self._spatial(x, self.down, 1)
        y = F.conv2d(h, self.up, groups=2)
        b, c = base.shape[:2]
        return y.view(b, 2, c, *y.shape[2:]).add_(base.unsqueeze(1)).transpose(0, 1)

    def weighted(self, x: Tensor, base: Tensor, w_subject: float, w_style: float) -> Tensor:
        factors = self._weighted.get((w_subject, w_style))
        if factors is None:
            factors = self._weighted[(w_subject, w_style)] = self._weighted_factors(w_subject, w_style)
        if not factors:
            return base
        down, mid, up = factors
        groups = up.shape[1] // self.rank
        h = self._spatial(F.conv2d(x, down), mid, groups) if self.tucker else self._spatial(x, down, 1)
        return base + F.conv2d(h, up)

    def _weighted_factors(self, w_subject: float, w_style: float) -> tuple:
        downs, ups = self._factors_for(w_subject, w_style)
        if not downs:
            return ()
        mids = [m for m, w in zip(self.mids, (w_subject, w_style)) if m is not None and w != 0.0]
        mid = self._on_device(torch.cat(mids)) if mids else None
        return self._on_device(torch.cat(downs)), mid, self._on_device(torch.cat(ups, 1))


class DeltaByDelta(PairKernel):
    """Any two deltas, evaluated one after the other with their strengths folded in once."""

    def __init__(self, subject: Delta | None, style: Delta | None, geometry: LayerGeometry, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.geometry = geometry
        self.pair = tuple(None if d is None else _strength_folded(d).to(device=device, dtype=dtype)
                          for d in (subject, style))

    def candidates(self, x: Tensor, base: Tensor) -> Tensor:
        return torch.stack([base + d.output(x, self.geometry) for d in self.pair])

    def weighted(self, x: Tensor, base: Tensor, w_subject: float, w_style: float) -> Tensor:
        out = base
        for delta, w in zip(self.pair, (w_subject, w_style)):
            if delta is not None and w != 0.0:
                y = delta.output(x, self.geometry)
                out = out + (y if w == 1.0 else y.mul_(w))
        return out


def _strength_folded(delta: Delta) -> Delta:
    """The same delta with strength 1: a dense ΔW multiplied by its strength once, not at every call."""
    if isinstance(delta, DenseDelta) and delta.strength != 1.0:
        bias = None if delta.bias is None else delta.bias * delta.strength
        return DenseDelta(delta.weight * delta.strength, bias, 1.0, delta.nominal_rank)
    return delta
