"""The LoRA patch stores of the Forge family (Forge, Forge Neo, and the ComfyUI code both port): what a stored patch
is, which ones DynFuse can fuse, the per-layer deltas and targets built from them, and which file put an entry into a
store that does not say.

Every host of the family keeps a LoRA as weight patches per model parameter,

    entry = (strength, payload, strength_model, offset, function[, online_mode])

where ``payload`` is a tuple ``("lora", (up, down, alpha, mid, dora))``, ``("diff", (t,))``, ... (Forge) or a weight
adapter object whose ``name`` and ``weights`` hold the same two things (Forge Neo, reForge, ComfyUI), and merges the
entries into the weights when the model loads. How the entries are filed, how the host notices a change and where
it keeps the original weights differ per host: the host adapters supply those. Nothing here imports a host module.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_dynfuse.hosts.fused_layers import Piece, layer_targets

ROLES = ("subject", "style")

# (entries, a fresh float32 weight, model key) -> the weight with the entries merged, the host's own merge
Merge = Callable[[list, torch.Tensor, str], torch.Tensor]
# (model key, the layer) -> the layer's weight before any LoRA was merged into it
BaseWeight = Callable[[str, torch.nn.Module], torch.Tensor]

# Weight adapters whose delta depends on the weight it is added to (an orthogonal or scaled transform).
WEIGHT_DEPENDENT = {"glora", "set", "oft", "oftv2", "boft"}
# Where a payload's values hold a DoRA scale (the merge then rescales the whole weight).
DORA_INDEX = {"lora": 4, "loha": 7, "lokr": 8}


class NotFusable(Exception):
    """A patch DynFuse leaves to the host's own merge; the message says why."""


def payload_parts(payload: Any) -> tuple[str, Sequence]:
    """A stored patch as (kind, values): a weight adapter's name and weights, or the tuple's two halves."""
    name, weights = getattr(payload, "name", None), getattr(payload, "weights", None)
    if isinstance(name, str) and weights is not None:
        return name, tuple(weights)
    if isinstance(payload, tuple) and len(payload) == 2 and isinstance(payload[0], str):
        return payload[0], tuple(payload[1])
    if isinstance(payload, tuple) and len(payload) == 1:
        return "diff", payload
    raise NotFusable(f"a patch of type {type(payload).__name__}")


def with_strength(entry: Sequence, strength: float) -> Sequence:
    """A new entry like ``entry`` (same container, same other fields) at ``strength``: stored entries are shared
    with the host's cached patchers and are never edited."""
    return type(entry)([strength, *entry[1:]]) if isinstance(entry, list) else (strength, *entry[1:])


@dataclass(frozen=True)
class Taken:
    """One LoRA's entries found in a host's store, by model key ("diffusion_model.<path>.weight")."""

    role: str
    source: Any                      # what the host files them under (Forge: the store key; Neo: the file)
    patches: dict[str, list]


@dataclass
class Split:
    """What becomes of the taken entries: layers the hooks fuse, and entries the host keeps merging."""

    targets: list = field(default_factory=list)  # lib_dynfuse.engine.session.LayerTarget
    # source -> model key -> [(stored entry, the entry the host merges instead: the same, or at the override)]
    kept: dict[Any, dict[str, list[tuple[Sequence, Sequence]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def replacements(self) -> dict[int, Sequence]:
        """id(stored entry) -> what the host merges in its place."""
        return {id(old): new for by_key in self.kept.values() for pairs in by_key.values() for old, new in pairs}


def split_patches(model: torch.nn.Module, taken: list[Taken], overrides: dict[str, float | None],
                  base_weight: BaseWeight, merge: Merge, absent: str | None = None) -> Split:
    """Turn the subject's and style's entries into layer targets (one delta per LoRA and layer, or per part of a
    fused layer whose patches are slices of it); the entries of a layer no hook can add stay with the host, at the
    strength override if one is set, except the ``absent`` role's (a one-LoRA method), which go nowhere."""
    # module path -> role -> "weight" | "bias" -> entries
    layers: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    origin: dict[tuple[str, str], Taken] = {}
    for item in taken:
        for model_key, entries in item.patches.items():
            path, _, param = model_key.rpartition(".")
            layers[path][item.role][param].extend(entries)
            origin[(item.role, path)] = item

    split = Split()
    refused: dict[tuple[str, str], list[str]] = {}  # (role, why) -> the layers that keep that LoRA merged
    for path, by_role in layers.items():
        pieces: dict[str, list[Piece]] = {}
        for role, params in by_role.items():
            override = overrides.get(role)
            try:
                module = model.get_submodule(path)
                pieces[role] = layer_pieces(params, path, module, lambda: base_weight(f"{path}.weight", module),
                                            override, merge)
            except (NotFusable, AttributeError) as e:
                if role == absent:
                    continue
                source = origin[(role, path)].source
                kept = split.kept.setdefault(source, {})
                for param, entries in params.items():
                    kept[f"{path}.{param}"] = [
                        (entry, entry if override is None else with_strength(entry, override)) for entry in entries]
                refused.setdefault((role, str(e)), []).append(path)
        if pieces:
            split.targets += layer_targets(path, model.get_submodule(path), pieces)
    for (role, why), paths in refused.items():
        layers_keep = f"{paths[0]} keeps" if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more layers keep"
        split.notes.append(f"{layers_keep} the {role} LoRA merged statically ({why})")
    return split


# ---- entries -> deltas ------------------------------------------------------------------------------
def layer_geometry(module: torch.nn.Module) -> Any:
    """The module's LayerGeometry, or NotFusable: hooks add a delta to a Linear's or Conv2d's output only (a norm
    layer's patches stay with the host's merge)."""
    from lib_dynfuse.engine.deltas import LayerGeometry

    try:
        return LayerGeometry.of(module)
    except ValueError as e:
        raise NotFusable(str(e)) from None


def check_entry(entry: Sequence, geometry: Any) -> None:
    """An entry the hooks can add in full to the layer's output (or to a slice of its output channels), or
    NotFusable."""
    offset = entry[3]
    if offset is not None:
        dim, start, length = offset
        if dim != 0:
            raise NotFusable("a patch on a slice of the layer's input channels")
        if geometry.kind != "linear":
            raise NotFusable("a patch on a slice of a convolution's output channels")
        if start < 0 or length < 1 or start + length > geometry.out_channels:
            raise NotFusable(f"a patch on channels [{start}, {start + length}) of a layer with "
                             f"{geometry.out_channels}")
    if entry[2] != 1.0:
        raise NotFusable("the patch rescales the base weight")
    kind, values = payload_parts(entry[1])
    if kind == "lora" and len(values) > 5 and values[5] is not None:
        raise NotFusable("the patch pads the layer's weight")
    rows = geometry.out_channels if offset is None else offset[2]
    if kind == "lora" and int(values[0].shape[0]) != rows:
        # A key map that gives a slice the wrong width (Forge Neo's diffusers names of Lumina 2's narrower k and v):
        # the host's merge skips or fails on it, and a hook must not add it either.
        raise NotFusable(f"a patch of {int(values[0].shape[0])} output channels on {rows} channels of the layer")


def quantised(weight: torch.Tensor) -> bool:
    """A weight stored quantised (GGUF, bitsandbytes NF4/FP4, int8): its values cannot be read as a float tensor."""
    return (getattr(weight, "gguf_cls", None) is not None or getattr(weight, "quant_state", None) is not None
            or not weight.dtype.is_floating_point)


def layer_pieces(params: dict[str, list], path: str, module: torch.nn.Module, base_weight: Callable[[], torch.Tensor],
                 override: float | None, merge: Merge) -> list[Piece]:
    """One LoRA's deltas on one layer from its entries (weight and optional bias): one piece for the whole layer,
    or one per slice of the output channels its patches cover (the q, k and v of a fused projection)."""
    geometry = layer_geometry(module)
    if set(params) - {"weight", "bias"}:
        raise NotFusable(f"patches on {sorted(set(params) - {'weight', 'bias'})}")
    by_channels: dict[tuple[int, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for param, entries in params.items():
        for entry in entries:
            check_entry(entry, geometry)
            start, length = (0, geometry.out_channels) if entry[3] is None else entry[3][1:]
            by_channels[(start, length)][param].append(entry)
    return [Piece(start, length, layer_delta(group, path, geometry, base_weight, override, merge, (start, length)))
            for (start, length), group in sorted(by_channels.items())]


def layer_delta(params: dict[str, list], path: str, geometry: Any, base_weight: Callable[[], torch.Tensor],
                override: float | None, merge: Merge, channels: tuple[int, int]):
    """One LoRA's contribution to the output channels ``channels`` = (start, length) of one layer (all of them, or
    a slice's) from its entries on those channels (weight and optional bias)."""
    from lib_dynfuse.engine.deltas import DenseDelta, LowRankDelta

    start, length = channels
    weight_entries, bias_entries = params.get("weight", []), params.get("bias", [])
    strengths = {override if override is not None else float(e[0]) for e in weight_entries + bias_entries}

    plain = _plain_lora(weight_entries)
    if plain is not None and len(strengths) == 1:
        # LowRankDelta applies its strength to the bias itself.
        up, down, alpha, mid = plain
        return LowRankDelta(down=down, up=up, mid=mid, alpha=alpha, strength=strengths.pop(),
                            bias=_bias_diff(bias_entries, 1.0))
    bias = _bias_diff(bias_entries, override)
    rows = (length, *geometry.weight_shape[1:])
    if not weight_entries:
        return DenseDelta(torch.zeros(rows), bias=bias)
    # The host's merge narrows to a patch's slice itself: it gets the whole weight, and its slice is taken after.
    weight = _dense_weight(weight_entries, f"{path}.weight", geometry, base_weight, override, merge)
    return DenseDelta(weight.narrow(0, start, length).reshape(rows), bias=bias, rank=nominal_rank(weight_entries))


def nominal_rank(entries: list) -> int | None:
    """The summed rank of the weight patches as the host's merge takes it (the rows of a LoRA's down factor, of
    LoHa's w1b, of a factorised LoKr's w2_b or else w1_b); None when a patch has none (diff, an unfactorised LoKr,
    glora, set, oft)."""
    total = 0
    for entry in entries:
        kind, values = payload_parts(entry[1])
        rank = None
        if kind in ("lora", "loha"):
            rank = int(values[1].shape[0])
        elif kind == "lokr":
            w1, w2, _alpha, _w1_a, w1_b, _w2_a, w2_b = values[:7]
            factor = w2_b if w2 is None else (w1_b if w1 is None else None)
            rank = None if factor is None else int(factor.shape[0])
        if rank is None:
            return None
        total += rank
    return total


def _plain_lora(entries: list) -> tuple | None:
    """(up, down, alpha, mid) when the layer has exactly one plain kohya LoRA patch, else None."""
    if len(entries) != 1 or entries[0][4] is not None:
        return None
    kind, values = payload_parts(entries[0][1])
    if kind != "lora" or values[4] is not None:
        return None
    up, down, alpha, mid = values[:4]
    return up, down, alpha, mid


def _bias_diff(entries: list, override: float | None) -> torch.Tensor | None:
    """The sum of the bias diffs, each at its own strength unless ``override`` replaces it."""
    total = None
    for entry in entries:
        kind, values = payload_parts(entry[1])
        if kind != "diff":
            raise NotFusable(f"a '{kind}' patch on a bias")
        term = values[0].float() * (override if override is not None else float(entry[0]))
        total = term if total is None else total + term
    return total


def _dense_weight(entries: list, key: str, geometry: Any, base_weight: Callable[[], torch.Tensor],
                  override: float | None, merge: Merge) -> torch.Tensor:
    """ΔW exactly as the host merges these entries: its merge on the base weight, minus the base weight.

    Types whose delta does not depend on the weight are merged onto zeros, so ΔW carries no rounding of W (nor needs
    a weight stored quantised). The merge gets a tensor of its own: some hosts' merges work in place."""
    if override is not None:
        entries = [with_strength(e, override) for e in entries]
    if not any(_weight_dependent(e[1]) for e in entries):
        return merge(entries, torch.zeros(geometry.weight_shape), key)
    weight = base_weight()
    if quantised(weight):
        raise NotFusable("the patch (DoRA, GLoRA, OFT, ...) needs the layer's weight, which is stored quantised")
    base = weight.detach().float()
    return merge(entries, base.clone(), key) - base


def _weight_dependent(payload: Any) -> bool:
    kind, values = payload_parts(payload)
    if kind in WEIGHT_DEPENDENT:
        return True
    index = DORA_INDEX.get(kind)
    return index is not None and len(values) > index and values[index] is not None


# ---- which file an entry came from --------------------------------------------------------------------
class LoadRecorder:
    """Which LoRA file put each entry into a store that keeps no file names (Forge Neo's ``patches``).

    The host's LoRA front end loads each file with a module-level ``load_lora_for_models(model, clip, lora, ...,
    filename=...)`` that returns a clone of ``model`` with the file's entries appended. Wrapped, it tells which
    payloads (the adapter objects and tuples an entry holds second) that call added: clones copy the per-weight
    lists and share the entries, and an extension that rebuilds an entry (another strength) keeps its payload.
    Records live as long as the patcher the call returned."""

    MARK = "__dynfuse_load_recorder__"

    def __init__(self) -> None:
        self._added: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # patcher -> {id: (payload, file)}

    def install(self, module: Any) -> bool:
        """Wrap ``module.load_lora_for_models`` (idempotent; a wrapper a former recorder left is replaced). False
        when the loader cannot be read: no such function, or one that takes no file name."""
        loader = getattr(module, "load_lora_for_models", None)
        if loader is None:
            return False
        if getattr(loader, self.MARK, None) is self:
            return True
        loader = getattr(loader, "__wrapped__", loader) if hasattr(loader, self.MARK) else loader
        try:
            signature = inspect.signature(loader)
        except (TypeError, ValueError):
            return False
        if "filename" not in signature.parameters:
            return False
        recorder = self

        def load_lora_for_models(*args: Any, **kwargs: Any) -> Any:
            result = loader(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                recorder.record(next(iter(bound.arguments.values())), result[0], bound.arguments["filename"])
            except Exception:  # noqa: BLE001 - never break the host's LoRA loading; unrecorded means "not found"
                pass
            return result

        load_lora_for_models.__wrapped__ = loader
        setattr(load_lora_for_models, self.MARK, self)
        module.load_lora_for_models = load_lora_for_models
        return True

    def record(self, before: Any, after: Any, filename: Any) -> None:
        """The payloads ``after`` holds that ``before`` did not came from ``filename``."""
        if after is None or after is before or not isinstance(getattr(after, "patches", None), dict):
            return
        seen = {id(e[1]) for entries in getattr(before, "patches", {}).values() for e in entries}
        self._added[after] = {id(e[1]): (e[1], str(filename)) for entries in after.patches.values() for e in entries
                              if id(e[1]) not in seen}

    def files(self, patcher: Any) -> dict[int, str]:
        """id(payload) -> file for every recorded payload of ``patcher``'s model (a recorded payload is kept alive
        by its record, so no other object shares its id)."""
        model = getattr(patcher, "model", None)
        return {key: filename for owner, added in list(self._added.items()) if getattr(owner, "model", None) is model
                for key, (_payload, filename) in added.items()}

    def file_of(self, entry: Sequence, files: dict[int, str]) -> str | None:
        """The file that loaded ``entry``, from ``files(...)``."""
        return files.get(id(entry[1]))

    def knows(self, patcher: Any) -> bool:
        """Whether any entry ``patcher`` holds was recorded."""
        files = self.files(patcher)
        return any(self.file_of(e, files) for entries in patcher.patches.values() for e in entries)


def same_file(stored: Any, filename: str | None, name: str) -> bool:
    """Whether a file the host loaded is the one a ``<lora:name>`` tag resolves to (by path; by name when the
    tag's file is unknown)."""
    if not isinstance(stored, str):
        return False
    if filename is not None:
        return os.path.normcase(os.path.abspath(stored)) == os.path.normcase(os.path.abspath(filename))
    return os.path.splitext(os.path.basename(stored))[0] == name
