"""Asynchronous tensor-parallel reduces, and which backend carries them.

A reducer has one method, `start(tensor) -> handle`, that begins an in-place sum of `tensor`
over the TP group; `handle.wait()` makes the caller's later work see the sum. With NCCL the
all-reduce runs on NCCL's own stream and `wait()` only orders the current CUDA stream after
it (no host synchronisation); with gloo it runs on gloo's thread and `wait()` blocks the host.

Backends are chosen with `with`, never by patching a module:
  (default)                 TorchDistReducer: torch.distributed.all_reduce(async_op=True)
  with use_reducer(f):      f(group) carries ISO's reduces (benchmarks: an emulated link,
                            `iso_megatron.emulated`, or the one-GPU proxy link)
  with stand_in_tp(n):      one process plans as if its TP group had n ranks (the proxy link
                            stands in for the group); `tp_size(group)` answers n
Both are context variables: they end with their block, also on error, and do not leak into
other threads.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Optional

import torch.distributed as dist


class TorchDistReducer:
    """All-reduce over a torch.distributed process group, started with async_op=True."""

    def __init__(self, group):
        self.group = group

    def start(self, tensor):
        return dist.all_reduce(tensor, group=self.group, async_op=True)


_reducer_factory: ContextVar[Callable] = ContextVar("iso_reducer_factory", default=TorchDistReducer)
_stand_in_tp: ContextVar[Optional[int]] = ContextVar("iso_stand_in_tp", default=None)


def make_reducer(group):
    """The reducer ISO uses for `group` (TorchDistReducer unless `use_reducer` says otherwise)."""
    return _reducer_factory.get()(group)


def reducer_key():
    """Identity of the backend in use (calibrations are cached per backend)."""
    return _reducer_factory.get()


@contextmanager
def use_reducer(factory: Callable):
    """Route ISO's reduces through `factory(group)` for the duration of the block."""
    token = _reducer_factory.set(factory)
    try:
        yield factory
    finally:
        _reducer_factory.reset(token)


@contextmanager
def stand_in_tp(size: int):
    """Plan ISO as if the TP group had `size` ranks although this process is alone in it: the
    one-GPU proxy benchmark, whose link stands in for the other ranks (`use_reducer`)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"stand_in_tp: size must be an int >= 1, got {size!r}")
    token = _stand_in_tp.set(size)
    try:
        yield size
    finally:
        _stand_in_tp.reset(token)


def tp_size(group) -> int:
    """The tensor-parallel size ISO plans for: the stand-in's, else the group's (1 without one)."""
    pretend = _stand_in_tp.get()
    if pretend is not None:
        return pretend
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)
