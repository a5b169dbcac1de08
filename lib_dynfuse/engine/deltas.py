"""What one LoRA adds to the output of one layer.

A delta is evaluated on the layer's input, never merged into the layer's weight: the fusion needs the base
output and both LoRA contributions separately at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pair(value: int | tuple[int, ...] | str) -> tuple[int, int] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


@dataclass(frozen=True)
class LayerGeometry:
    """The shape and convolution arithmetic of the layer a delta is added to."""

    kind: str
    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, module: nn.Module) -> LayerGeometry:
        # Duck-typed on purpose: Forge's Linear is not an nn.Linear subclass, but has the same weight layout. A 4-bit
        # weight (bitsandbytes NF4/FP4) is stored packed and keeps the layer's shape in its quantisation state.
        weight = module.weight
        shape = tuple(getattr(getattr(weight, "quant_state", None), "shape", None) or weight.shape)
        if len(shape) == 2:
            return cls("linear", shape)
        if len(shape) == 4:
            return cls(
                "conv2d",
                shape,
                stride=_pair(getattr(module, "stride", 1)),
                padding=_pair(getattr(module, "padding", 0)),
                dilation=_pair(getattr(module, "dilation", 1)),
                groups=int(getattr(module, "groups", 1)),
            )
        # A norm layer's 1-D weight (LyCORIS w_norm / b_norm) acts inside the normalisation: only a host's merge
        # can apply it.
        raise ValueError(f"not a Linear or Conv2d layer: weight of shape {list(shape)}")

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def with_out_channels(self, count: int) -> LayerGeometry:
        """This layer cut to ``count`` of its output channels (a slice of a fused layer, as a layer of its own)."""
        return replace(self, weight_shape=(count, *self.weight_shape[1:]))


class LowRankDelta:
    """up · (mid ·) down, scaled by strength · alpha / rank, evaluated as small products on the input."""

    def __init__(
        self,
        down: Tensor,
        up: Tensor,
        mid: Tensor | None = None,
        alpha: float | None = None,
        strength: float = 1.0,
        bias: Tensor | None = None,
    ) -> None:
        self.down = down
        self.up = up
        self.mid = mid
        self.alpha = alpha
        self.strength = float(strength)
        self.bias = bias
        self.rank = int(down.shape[0])
        self.scale = self.strength * (float(alpha) / self.rank if alpha is not None else 1.0)

    def output(self, x: Tensor, geometry: LayerGeometry) -> Tensor:
        down, up, mid = (_as(t, x) for t in (self.down, self.up, self.mid))
        # The scale goes on the rank-r intermediate: the cheapest tensor to touch, and no scaled copy of up.
        if geometry.kind == "linear":
            y = F.linear(F.linear(x, down.flatten(1)).mul_(self.scale), up.flatten(1))
        else:
            if mid is None:
                h = F.conv2d(x, down, None, geometry.stride, geometry.padding, geometry.dilation)
            else:
                # Tucker/LoCon: the 1x1 down projection first, the kernel's geometry sits on mid.
                h = F.conv2d(x, down)
                h = F.conv2d(h, mid, None, geometry.stride, geometry.padding, geometry.dilation)
            y = F.conv2d(h.mul_(self.scale), up)
        return _add_bias(y, self.bias, self.strength, geometry, x)

    def dense_weight(self, geometry: LayerGeometry) -> Tensor:
        down, up = self.down.float(), self.up.float()
        if geometry.kind == "linear":
            w = up.flatten(1) @ down.flatten(1)
        elif self.mid is None:
            w = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            w = torch.einsum("or,rskl,si->oikl", up.flatten(1), self.mid.float(), down.flatten(1))
        return (w * self.scale).reshape(geometry.weight_shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LowRankDelta:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return LowRankDelta(move(self.down), move(self.up), move(self.mid), self.alpha, self.strength, move(self.bias))

    def with_strength(self, strength: float) -> LowRankDelta:
        return LowRankDelta(self.down, self.up, self.mid, self.alpha, strength, self.bias)

    def factor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.mid, self.bias) if t is not None)

    @property
    def out_channels(self) -> int:
        """The layer output channels the delta adds to (all of them, or a slice's)."""
        return int(self.up.shape[0])


class DenseDelta:
    """A full ΔW for LoRA types without a low-rank form (LoHa, LoKr, DoRA-adjusted): the host's own scale is
    already in ``weight``; ``strength`` multiplies on top.

    ``rank`` is the network's nominal rank (its dim, which the host knows), used for K-LoRA's K = r_c·r_s;
    without it the rank is the bound of the matrix, min(out, in·k·k), and K-LoRA's top-K sum becomes nearly
    the whole matrix.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, strength: float = 1.0,
                 rank: int | None = None) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"a dense LoRA delta needs a rank of at least 1, not {rank}")
        self.weight = weight
        self.bias = bias
        self.strength = float(strength)
        self.nominal_rank = rank
        self.rank = int(rank) if rank is not None else min(weight.shape[0], weight[0].numel())

    def output(self, x: Tensor, geometry: LayerGeometry) -> Tensor:
        w = _as(self.weight, x).reshape(geometry.weight_shape) * self.strength
        if geometry.kind == "linear":
            y = F.linear(x, w)
        else:
            y = F.conv2d(x, w, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        return _add_bias(y, self.bias, self.strength, geometry, x)

    def dense_weight(self, geometry: LayerGeometry) -> Tensor:
        return self.weight.float().reshape(geometry.weight_shape) * self.strength

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DenseDelta:
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return DenseDelta(self.weight.to(device=device, dtype=dtype), bias, self.strength, self.nominal_rank)

    def with_strength(self, strength: float) -> DenseDelta:
        return DenseDelta(self.weight, self.bias, strength, self.nominal_rank)

    def factor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    @property
    def out_channels(self) -> int:
        """The layer output channels the delta adds to (all of them, or a slice's)."""
        return int(self.weight.shape[0])


Delta = LowRankDelta | DenseDelta


def _as(t: Tensor | None, like: Tensor) -> Tensor | None:
    if t is None or (t.device == like.device and t.dtype == like.dtype):
        return t
    return t.to(device=like.device, dtype=like.dtype)


def _add_bias(y: Tensor, bias: Tensor | None, strength: float, geometry: LayerGeometry, x: Tensor) -> Tensor:
    if bias is None:
        return y
    b = _as(bias, x) * strength
    return y + (b if geometry.kind == "linear" else b.view(1, -1, 1, 1))
