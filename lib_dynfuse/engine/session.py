"""One generation's fusion: forward hooks on the layers both LoRAs touch, installed and removed by one owner.

The hooks read the base output of the layer (the host's result, other LoRAs included) and return it plus the
chosen LoRA contribution. Weights are never written, so removing the hooks restores the model exactly. Targets on
slices of one layer's output channels (the q, k and v of a fused projection) share that layer's one hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lib_dynfuse.engine.decisions import DecisionLog
from lib_dynfuse.engine.deltas import Delta
from lib_dynfuse.engine.fusion import LayerFusion, SlicedLayerFusion, StepState
from lib_dynfuse.engine.layout import BatchLayout, StepClock
from lib_dynfuse.engine.parts import Part
from lib_dynfuse.engine.policies import EngineOptions, make_policy

__all__ = ["BatchLayout", "FusionSession", "LayerTarget", "StepClock", "remove_leftover_hooks"]

# Set on every hook function this package installs, so a later job can find hooks a crashed one left behind.
HOOK_MARKER = "__dynfuse_hook__"


@dataclass
class LayerTarget:
    """A layer both or either LoRA patches; with ``channels`` = (start, length), one part of its output channels,
    named as a layer of its own (e.g. ``double_blocks.0.img_attn.qkv:q``)."""

    name: str
    module: nn.Module
    subject: Delta | None
    style: Delta | None
    channels: tuple[int, int] | None = None


def layer_fusions(targets: Iterable[LayerTarget]) -> list[LayerFusion]:
    """One fusion per hooked module, in the targets' order: a whole layer, or the parts of one."""
    layers: list[LayerFusion] = []
    parts: dict[int, tuple[LayerTarget, list[Part]]] = {}
    for t in targets:
        if t.channels is None:
            layers.append(LayerFusion(t.name, t.module, t.subject, t.style))
        else:
            first, found = parts.setdefault(id(t.module), (t, []))
            if not found:
                layers.append(first)  # its place, filled below
            found.append(Part(t.name, *t.channels, t.subject, t.style))
    whole = {id(layer.module) for layer in layers if isinstance(layer, LayerFusion)}
    if whole & set(parts):
        name = next(t.name for t, _ in parts.values() if id(t.module) in whole)
        raise ValueError(f"{name}: a layer gets deltas on its whole output and on parts of it")
    return [layer if isinstance(layer, LayerFusion) else _sliced(*parts[id(layer.module)]) for layer in layers]


def _sliced(first: LayerTarget, found: list[Part]) -> SlicedLayerFusion:
    # The layer's own name: its parts' names without the part (``…qkv:q`` -> ``…qkv``).
    return SlicedLayerFusion(first.name.rpartition(":")[0] or first.name, first.module, found)


class FusionSession:
    def __init__(self, targets: Iterable[LayerTarget], options: EngineOptions, *,
                 log_errors: Callable[[str], None] = print) -> None:
        self.layers = layer_fusions(targets)
        self.options = options
        self.policy = make_policy(options)
        self.log = DecisionLog()
        self.errors: list[str] = []
        self.active = True
        self._state = StepState(self.policy, options, self.log)
        self._handles: list[RemovableHandle] = []
        self._log_errors = log_errors
        self._failed: set[str] = set()
        self.policy.prepare({name: pair for layer in self.layers for name, pair in layer.pairs().items()})

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        if self._handles:
            return
        for layer in self.layers:
            remove_leftover_hooks(layer.module, recurse=False)
        try:
            for layer in self.layers:
                self._handles.append(layer.module.register_forward_hook(self._hook_for(layer)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> FusionSession:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def set_step(self, clock: StepClock) -> None:
        self._state.clock = clock

    def set_layout(self, layout: BatchLayout | None) -> None:
        self._state.set_layout(layout)

    @property
    def clock(self) -> StepClock:
        return self._state.clock

    def _hook_for(self, layer: LayerFusion) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if not self.active or not isinstance(output, Tensor) or not inputs:
                return None
            x = inputs[0]
            if layer.name in self._failed:
                return self._fallback(layer, x, output)
            try:
                return layer.fuse(x, output, self._state)
            except Exception as error:  # noqa: BLE001 - the host does not protect forward hooks: never let one break sampling
                self._failed.add(layer.name)
                self._report(f"DynFuse: layer {layer.name} failed ({type(error).__name__}: {error}); "
                             "it gets both LoRAs at their strengths for the rest of this generation.")
                return self._fallback(layer, x, output)

        setattr(hook, HOOK_MARKER, True)
        return hook

    def _fallback(self, layer: LayerFusion, x: Tensor, output: Tensor) -> Tensor | None:
        try:
            return layer.static_output(x, output)
        except Exception:  # noqa: BLE001 - even the merge failed: the host's own output, untouched
            return None

    def _report(self, message: str) -> None:
        # One line per failing layer kind is plenty; the console must not fill with one line per step.
        self.errors.append(message)
        if len(self.errors) == 1:
            self._log_errors(message)


def remove_leftover_hooks(root: nn.Module, *, recurse: bool = True) -> int:
    """Remove every hook this package installed on ``root`` (and its submodules), e.g. after a crashed job."""
    removed = 0
    modules = root.modules() if recurse else (root,)
    for module in modules:
        hooks = module._forward_hooks
        for key in [k for k, fn in hooks.items() if getattr(fn, HOOK_MARKER, False)]:
            del hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(key, None)
            removed += 1
    return removed
