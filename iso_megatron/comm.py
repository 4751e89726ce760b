"""Asynchronous tensor-parallel reduces.

A backend has one method, `start(tensor) -> handle`, that begins an in-place sum of `tensor`
over the TP group; `handle.wait()` makes the caller's later work see the sum. With NCCL the
all-reduce runs on NCCL's own stream and `wait()` only orders the current CUDA stream after
it (no host synchronisation); with gloo it runs on gloo's thread and `wait()` blocks the host.
The same code serves both. `emulated link` backends for benchmarks implement the same method.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist


class TorchDistReducer:
    """All-reduce over a torch.distributed process group, started with async_op=True."""

    def __init__(self, group):
        self.group = group

    def start(self, tensor):
        return dist.all_reduce(tensor, group=self.group, async_op=True)


_factory = TorchDistReducer


def make_reducer(group):
    """The reducer ISO uses for `group`: TorchDistReducer unless `use_reducer` says otherwise."""
    return _factory(group)


@contextmanager
def use_reducer(factory):
    """Route ISO's reduces through `factory(group)` (benchmarks: an emulated link)."""
    global _factory
    previous, _factory = _factory, factory
    try:
        yield
    finally:
        _factory = previous
