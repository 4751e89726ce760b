"""The one-device proxy link: a single process measures ISO as if it were one rank of TP n.

On GPUs without peer-to-peer access (RTX 4090) NCCL carries an all-reduce through host memory.
`ProxyLink` reproduces that path on one device, where there is no other rank to sum with: its
"all-reduce" copies the partial sum device -> host -> device, in place, off the compute stream
(a CUDA side stream; on CPU one worker thread), in issue order. The values do not change (the
sum over a group of one), the time and the compute/copy concurrency are real.

`with stand_in(link, tp=2):` puts it in place for the block, and only for the block:
  - ISO's deferred reduces go through the link (`comm.use_reducer`);
  - stock megatron's synchronous reduces too, start then wait (`emulated.route_stock_reduces`):
    at TP 1 stock megatron does not reduce at all, so without this the baseline would skip
    the transfer that ISO pays for;
  - ISO plans as if its TP group had `tp` ranks (`comm.stand_in_tp`): at TP 1 it would step
    aside;
  - on CPU the worker thread starts on entry and is joined on exit; on CUDA the side stream is
    synchronised on exit. Every transfer still in flight is waited for on exit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


class _ProxyHandle:
    def __init__(self, done):
        self.done = done

    def wait(self):
        if isinstance(self.done, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(self.done)
        else:
            self.done.result()
        return True


class ProxyLink:
    """'All-reduce' of one device: copy the partial sum D2H then H2D, in place, off the compute
    stream. Transfers queue in issue order. A reducer factory (`link(group)` is the link)."""

    def __init__(self, device: str):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"ProxyLink: device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.buffers = {}
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.pool = None  # CPU: the worker thread, alive inside `stand_in` only

    def __call__(self, group):
        return self

    def _host(self, tensor):
        key = (tensor.numel(), tensor.dtype)
        if key not in self.buffers:  # one per size: the transfers are serial, reuse is safe
            self.buffers[key] = torch.empty(tensor.numel(), dtype=tensor.dtype,
                                            pin_memory=self.device == "cuda")
        return self.buffers[key]

    def start(self, tensor):
        host = self._host(tensor)
        flat = tensor.view(-1)
        if self.device == "cuda":
            ready = torch.cuda.Event()
            ready.record()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                host.copy_(flat, non_blocking=True)
                flat.copy_(host, non_blocking=True)
                tensor.record_stream(self.stream)
                done = torch.cuda.Event()
                done.record()
            return _ProxyHandle(done)
        if self.pool is None:
            raise RuntimeError("ProxyLink: use it inside `with stand_in(link):` (the CPU worker "
                               "thread lives there)")

        def copy():
            host.copy_(flat)
            flat.copy_(host)
        return _ProxyHandle(self.pool.submit(copy))

    def sync_reduce(self, tensor, group=None):
        """What stock megatron's synchronous reduce does over the link: start, wait."""
        self.start(tensor).wait()
        return tensor

    def drain(self) -> None:
        """Wait every transfer still in flight."""
        if self.device == "cuda":
            self.stream.synchronize()
        elif self.pool is not None:
            self.pool.submit(lambda: None).result()


@contextmanager
def stand_in(link: ProxyLink, tp: int = 2):
    """ISO's and stock megatron's reduces over `link`, ISO planned as TP `tp`, for the block."""
    from .comm import stand_in_tp, use_reducer
    from .emulated import route_stock_reduces

    if tp < 2:
        raise ValueError(f"stand_in: the proxy stands in for a TP group of >= 2 ranks, got tp={tp}")
    if link.device == "cpu":
        if link.pool is not None:
            raise RuntimeError("stand_in: this ProxyLink is already in use")
        link.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iso-proxy-link")
        link.pool.submit(lambda: None).result()  # the thread starts here, not in a timed run
    try:
        with use_reducer(link), route_stock_reduces(link.sync_reduce), stand_in_tp(tp):
            try:
                yield link
            finally:
                link.drain()
    finally:
        if link.pool is not None:
            link.pool.shutdown(wait=True)
            link.pool = None
