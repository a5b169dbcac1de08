"""The peak memory of a piece of code as the allocator sees it: on CUDA the caching allocator's own high-water mark,
elsewhere the tensors allocated inside the block and still alive, tracked by storage (process RSS also moves with
the C allocator's free lists, the Python heap and any thread's work, so it cannot tell what a step allocated).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch._decomp import decomposition_table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    """The peak, over the block, of the bytes held by tensor storages created inside it and still alive.

    Operators without a kernel of their own on the device (composites such as logsumexp on the CPU) run through
    their reference decomposition, so the temporaries they make inside are counted too. Workspaces a kernel
    allocates and frees within itself (a convolution's) are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        key = tensors[0].device.type.upper() if tensors else "CPU"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key) and func in decomposition_table:
            with self:
                return decomposition_table[func](*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in inputs or id(storage) in self._alive:
                continue  # a view or an in-place result: nothing new was allocated
            key, nbytes = id(storage), storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._alive[key] = weakref.ref(storage, functools.partial(self._freed, key, nbytes))
        return out

    def _freed(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        self.live -= nbytes
        del self._alive[key]


def peak_bytes(run: Callable[[], object], device: str) -> int:
    """The most memory ``run`` holds at once above what was allocated before it: CUDA's
    ``max_memory_allocated``, else :class:`AllocationTracker`'s peak."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    tracker = AllocationTracker()
    with tracker:
        run()
    return tracker.peak
