"""Asynchronous tensor-parallel reduces and pipeline transfers, and which backend carries them.

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

The point-to-point transfers between pipeline stages likewise (`make_p2p(group)`: an object
with `isend(tensor, dst, tag)` / `irecv(tensor, src, tag)` returning handles with `wait()`):
  (default)                 TorchDistP2P: torch.distributed.isend / irecv on the group
  with use_p2p(f):          f(group) carries them (benchmarks: `emulated.EmulatedP2P`, a
                            stage link at a chosen speed)
All are context variables: they end with their block, also on error, and do not leak into
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


class TorchDistP2P:
    """Point-to-point transfers on a torch.distributed process group (dst / src: global ranks)."""

    def __init__(self, group):
        self.group = group

    def isend(self, tensor, dst: int, tag: int = 0):
        return dist.isend(tensor, dst=dst, group=self.group, tag=tag)

    def irecv(self, tensor, src: int, tag: int = 0):
        return dist.irecv(tensor, src=src, group=self.group, tag=tag)


_reducer_factory: ContextVar[Callable] = ContextVar("iso_reducer_factory", default=TorchDistReducer)
_stand_in_tp: ContextVar[Optional[int]] = ContextVar("iso_stand_in_tp", default=None)
_p2p_factory: ContextVar[Callable] = ContextVar("iso_p2p_factory", default=TorchDistP2P)


def make_reducer(group):
    """The reducer ISO uses for `group` (TorchDistReducer unless `use_reducer` says otherwise)."""
    return _reducer_factory.get()(group)


def reducer_key():
    """Identity of the backend in use (calibrations are cached per backend)."""
    return _reducer_factory.get()


@contextmanager
def _setting(var: ContextVar, value):
    """`var` set to `value` for the block, reset after it (also on error)."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def use_reducer(factory: Callable):
    """Route ISO's reduces through `factory(group)` for the duration of the block."""
    return _setting(_reducer_factory, factory)


def make_p2p(group):
    """The transport of a pipeline stage's transfers on `group` (TorchDistP2P unless `use_p2p`
    says otherwise)."""
    return _p2p_factory.get()(group)


def p2p_key():
    """Identity of the stage-link backend in use (a measured stage link is cached per backend)."""
    return _p2p_factory.get()


def use_p2p(factory: Callable):
    """Route pipeline stages' point-to-point transfers through `factory(group)` for the block."""
    return _setting(_p2p_factory, factory)


def stand_in_tp(size: int):
    """Plan ISO as if the TP group had `size` ranks although this process is alone in it: the
    one-GPU proxy benchmark, whose link stands in for the other ranks (`use_reducer`)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"stand_in_tp: size must be an int >= 1, got {size!r}")
    return _setting(_stand_in_tp, size)


def stand_in_factor(group) -> int:
    """How many ranks' work one rank of `group` does: the stand-in's size over the group's
    (a process standing in for TP n runs the whole model), 1 without a stand-in."""
    pretend = _stand_in_tp.get()
    if pretend is None:
        return 1
    real = dist.get_world_size(group) if group is not None and dist.is_available() and dist.is_initialized() else 1
    return max(1, pretend // real)


def tp_size(group) -> int:
    """The tensor-parallel size ISO plans for: the stand-in's, else the group's (1 without one)."""
    pretend = _stand_in_tp.get()
    if pretend is not None:
        return pretend
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)
