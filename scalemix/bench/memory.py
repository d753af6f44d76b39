"""Peak tensor memory of a piece of work, on any device, exactly and repeatably.

The resident-set peak of a CPU process moves by ±15 % between identical runs (where glibc
puts blocks, which arena a thread uses), too much to compare engines at a 1.2x goal.
``TensorMemory`` counts instead what the work asks of the allocator: every tensor storage
that an operator creates while it is active (autograd's backward included), from its
creation until it is freed; ``peak_bytes`` is the most alive at once. This is what
``torch.cuda.max_memory_allocated`` reports on a GPU, without the caching allocator's
rounding, and it is the same number on every run. Storages that existed before (the
model, its inputs) are not counted; a library's own scratch memory outside tensors
(oneDNN workspaces) is not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """``with TensorMemory() as mem: work()`` then ``mem.peak_bytes``."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _ptr(t) not in inputs:  # views, in-place: not new
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, meta, ...
            return
        key = id(storage)  # the storage's Python object lives exactly as long as it does
        if key in self._seen or storage.data_ptr() == 0:
            return
        n = storage.nbytes()
        self._seen.add(key)
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live_bytes -= n


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1
