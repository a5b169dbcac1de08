"""Layers a model fuses from several of its own (FLUX's, Chroma's and Flux.2's ``img_attn.qkv`` and ``txt_attn.qkv``:
q, k and v side by side; their single blocks' ``linear1``: q, k, v and the MLP input; Z-Image's and Lumina 2's
``attention.qkv``: q, k and v, with fewer key and value heads on Lumina 2), whose LoRA patches may be slices of them.

The Forge family reads a LoRA that patches q, k and v apart (diffusers and OneTrainer names: ``to_q``, ``add_k_proj``,
``proj_mlp``) into patches with an offset ``(0, start, length)`` into the fused weight, and a LoRA in kohya or BFL
names into patches on the whole fused layer. Either way DynFuse fuses the layer part by part, each part a layer of
its own for the decisions (``…img_attn.qkv:q``): the parts are the finest slices the subject's and the style's
patches cut, and a delta on more channels than a part (a kohya LoRA's whole qkv beside a diffusers LoRA's q, k and
v) is cut into its parts by the rows of its up factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Piece:
    """One LoRA's delta on output channels [start, start + length) of a layer (all of them, or a slice)."""

    start: int
    length: int
    delta: Any  # lib_dynfuse.engine.deltas.Delta


def layer_targets(path: str, module: torch.nn.Module, pieces: dict[str, list[Piece]]) -> list[Any]:
    """The layer's targets (lib_dynfuse.engine.session.LayerTarget) from each LoRA's pieces on it: one for the whole layer,
    or one per part."""
    from lib_dynfuse.engine.deltas import LayerGeometry
    from lib_dynfuse.engine.session import LayerTarget

    geometry = LayerGeometry.of(module)
    out = geometry.out_channels
    if all((p.start, p.length) == (0, out) for found in pieces.values() for p in found):
        deltas = {role: found[0].delta for role, found in pieces.items()}
        return [LayerTarget(path, module, deltas.get("subject"), deltas.get("style"))]
    cuts = sorted({c for found in pieces.values() for p in found for c in (p.start, p.start + p.length)})
    targets = []
    for start, stop in zip(cuts, cuts[1:]):
        deltas = {role: delta for role, found in pieces.items()
                  if (delta := _channels(found, start, stop, geometry)) is not None}
        if deltas:  # else channels no patch touches, between two slices
            targets.append(LayerTarget(f"{path}:{part_name(geometry, start, stop - start)}", module,
                                       deltas.get("subject"), deltas.get("style"), (start, stop - start)))
    return targets


def part_name(geometry: Any, start: int, length: int) -> str:
    """What a slice of a fused layer's output is: q, k, v (or all three) of a projection from the hidden width, the
    MLP input after them (FLUX's and Chroma's single blocks, Flux.2's gated one); with grouped-query attention
    (Lumina 2's ``attention.qkv``: fewer key and value heads than query heads, no MLP) q of the hidden width and k
    and v of half the rest each; else its channels."""
    hidden, out = geometry.weight_shape[1], geometry.out_channels
    kv = (out - hidden) // 2 if hidden < out < 3 * hidden and (out - hidden) % 2 == 0 else hidden
    names = {(0, hidden): "q", (hidden, kv): "k", (hidden + kv, kv): "v", (0, hidden + 2 * kv): "qkv",
             (hidden, 2 * kv): "kv"}
    if start == 3 * hidden and start + length == out:
        return "mlp"
    return names.get((start, length), f"{start}-{start + length}")


def _channels(pieces: list[Piece], start: int, stop: int, geometry: Any) -> Any:
    """One LoRA's delta on output channels [start, stop): from the pieces that cover them (None when none does)."""
    from lib_dynfuse.engine.deltas import DenseDelta

    covering = [_rows(p.delta, start - p.start, stop - start) for p in pieces
                if p.start <= start and stop <= p.start + p.length]
    if len(covering) <= 1:
        return covering[0] if covering else None
    # Two patches of one LoRA on the same channels (a whole-layer one and a slice): added up as the host would.
    own = geometry.with_out_channels(stop - start)
    biases = [d.bias.float() * d.strength for d in covering if d.bias is not None]
    return DenseDelta(sum(d.dense_weight(own) for d in covering), sum(biases) if biases else None)


def _rows(delta: Any, first: int, count: int) -> Any:
    """``delta`` on ``count`` of its output rows from ``first`` on."""
    from lib_dynfuse.engine.deltas import DenseDelta, LowRankDelta

    if (first, count) == (0, delta.out_channels):
        return delta
    bias = None if delta.bias is None else delta.bias[first:first + count]
    if isinstance(delta, LowRankDelta):
        return LowRankDelta(delta.down, delta.up[first:first + count], delta.mid, delta.alpha, delta.strength, bias)
    return DenseDelta(delta.weight[first:first + count], bias, delta.strength, delta.nominal_rank)
