"""Counting the tensor operations a piece of code dispatches: on a GPU each is a kernel launch (views aside)
plus the dispatcher's own overhead, whatever its size, so the count is what decides the cost of a small op.

Counts are deterministic for a given torch version and input shapes: tests may assert them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside the block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(run: Callable[[], object]) -> OpCounter:
    counter = OpCounter()
    with counter:
        run()
    return counter


def count_ops_per_call(run: Callable[[], object], modules: Iterable[nn.Module]) -> list[tuple[nn.Module, int]]:
    """Each call of any of ``modules`` inside ``run``, in call order, with the operations it dispatches: from just
    before its forward to just after its forward hooks, those installed before this is called (a session's)
    included."""
    counter = OpCounter()
    starts: list[int] = []
    calls: list[tuple[nn.Module, int]] = []
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(lambda *_: starts.append(counter.total)))
        handles.append(module.register_forward_hook(lambda m, *_: calls.append((m, counter.total - starts.pop()))))
    try:
        with counter:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return calls
