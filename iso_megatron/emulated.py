"""An emulated link for benchmarks: real all-reduces, completion held to a modelled time.

On a CPU box the tensor-parallel "link" (gloo over loopback) and the compute share the same
cores, so real overlap barely shows. `EmulatedLink` brings a chosen communication/compute ratio
onto the machine instead:

- every all-reduce runs for real (outputs stay exactly those of the real collective);
- its handle's `wait()` returns no earlier than the transfer's modelled completion;
- transfers on one rank's link queue in order: one starts when it is issued AND the previous
  one has finished (`free_at`), and takes `LinkModel.seconds(nbytes)`.

The same link object serves ISO's deferred reduces (`comm.use_reducer(link)`: the link is the
reducer factory) and stock megatron's synchronous ones (`link.stock_reduces()` wraps
`megatron.core.tensor_parallel.mappings._reduce`, which RowParallelLinear reaches through
`reduce_from_tensor_model_parallel_region`: start, then wait at once). So the baseline is the
untouched stock code and pays the same modelled time per all-reduce as ISO does.

How the real all-reduce travels (`real=`):
  "shm"   (default; ranks on one host) through shared memory, as NCCL's SHM transport carries
          all-reduces between GPUs without P2P: `start()` copies the rank's partial sum into its
          slot of a shared ring, `wait()` sums all ranks' slots in rank order (bit-identical on
          every rank; for 2 ranks also bit-identical to gloo's a + b) into the tensor. No
          barrier, no helper thread: ~0.1 ms of the compute thread per MiB, against ~1 ms of
          gloo's TCP loopback, which would otherwise be charged to the overlapped schedule.
          Tensors larger than the ring's slots fall back to "eager".
  "lazy"  gloo, synchronously in `wait()` just before the hold (a barrier between ranks).
  "eager" gloo with async_op=True in `start()`: gloo's thread runs it beside the compute.
  "none"  no communication at all (calibration passes that must skip communication;
          outputs are then the ranks' partial sums).
Measured on the 2-core CPU (S=1024, ratio 0.5, even split; compute-only ISO 393 ms): none
387-425 ms, eager 423-466 ms, lazy 490-543 ms.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.distributed as dist

REAL_MODES = ("shm", "lazy", "eager", "none")


@dataclass(frozen=True)
class LinkModel:
    """Modelled time of one all-reduce: latency_s + nbytes * per_byte_s."""

    latency_s: float = 0.0
    per_byte_s: float = 0.0

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes * self.per_byte_s if nbytes > 0 else 0.0

    @classmethod
    def for_ratio(cls, ratio: float, compute_s: float, num_reduces: int, nbytes: int,
                  latency_fraction: float = 0.0) -> "LinkModel":
        """The link on which `num_reduces` all-reduces of `nbytes` each take `ratio` x `compute_s`
        together, `latency_fraction` of each being fixed latency (the rest scales with bytes)."""
        if ratio < 0 or compute_s < 0 or num_reduces < 1 or nbytes < 1:
            raise ValueError(f"bad link calibration: ratio={ratio}, compute_s={compute_s}, "
                             f"num_reduces={num_reduces}, nbytes={nbytes}")
        if not 0 <= latency_fraction < 1:
            raise ValueError(f"latency_fraction must be in [0, 1), got {latency_fraction}")
        per_reduce = ratio * compute_s / num_reduces
        return cls(latency_fraction * per_reduce, (1 - latency_fraction) * per_reduce / nbytes)


class Transfer(NamedTuple):
    issued: float     # clock when start() was called
    started: float    # when the link took it (issued, or when the previous one finished)
    done: float       # modelled completion
    nbytes: int


def _hold_until(deadline: float, clock: Callable[[], float]) -> None:
    # sleep most of the way, then spin the last ~0.2 ms (sleep overshoots by ~0.05-0.1 ms)
    while True:
        left = deadline - clock()
        if left <= 0:
            return
        if left > 4e-4:
            time.sleep(left - 2e-4)


class _ShmRing:
    """Shared-memory slots of one process group: per rank `slots` slots of `slot_bytes`, plus
    two counters per rank (transfers written, transfers read: a slot is rewritten only once
    every rank has read it). Collective to create; the file is unlinked once all have mapped it."""

    def __init__(self, group, slot_bytes: int, slots: int = 16):
        import os
        import uuid

        self.group, self.slot_bytes, self.slots = group, int(slot_bytes), slots
        self.rank, self.n = dist.get_rank(group), dist.get_world_size(group)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        name = [f"/dev/shm/iso_emulated_link_{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=src, group=group)
        path = name[0]
        self.header = 2 * 8 * self.n
        total = self.header + self.n * slots * self.slot_bytes
        if self.rank == 0:
            with open(path, "wb") as f:
                f.truncate(total)
        dist.barrier(group=group)
        self.buf = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        dist.barrier(group=group)
        if self.rank == 0:
            os.unlink(path)
        self.written = self.buf[: 8 * self.n].view(torch.int64)
        self.read = self.buf[8 * self.n: 16 * self.n].view(torch.int64)
        self.seq = 0
        self._reads_done = set()
        self._read_upto = 0

    def _slot(self, rank: int, seq: int, nbytes: int):
        off = self.header + (rank * self.slots + seq % self.slots) * self.slot_bytes
        return self.buf[off: off + nbytes]

    @staticmethod
    def _spin(cond):
        while not cond():
            time.sleep(2e-5)

    def put(self, tensor) -> int:
        seq = self.seq
        if seq - self._read_upto >= self.slots:
            raise RuntimeError(f"emulated link: more than {self.slots} transfers in flight on one rank")
        self.seq += 1
        need = seq - self.slots + 1  # every rank must have read my transfer seq - slots
        self._spin(lambda: int(self.read.min()) >= need)
        nbytes = tensor.numel() * tensor.element_size()
        self._slot(self.rank, seq, nbytes).view(tensor.dtype).copy_(tensor.reshape(-1))
        self.written[self.rank] = seq + 1
        return seq

    def sum_into(self, tensor, seq: int) -> None:
        self._spin(lambda: int(self.written.min()) >= seq + 1)
        nbytes = tensor.numel() * tensor.element_size()
        parts = [self._slot(r, seq, nbytes).view(tensor.dtype) for r in range(self.n)]
        flat = tensor.view(-1) if tensor.is_contiguous() else None
        acc = torch.add(parts[0], parts[1]) if self.n > 1 else parts[0].clone()
        for p in parts[2:]:
            acc.add_(p)
        if flat is not None:
            flat.copy_(acc)
        else:
            tensor.copy_(acc.view(tensor.shape))
        self._reads_done.add(seq)
        while self._read_upto in self._reads_done:  # reads may finish out of order
            self._reads_done.discard(self._read_upto)
            self._read_upto += 1
        self.read[self.rank] = self._read_upto


class EmulatedHandle:
    def __init__(self, link: "EmulatedLink", transfer: Transfer, tensor, group, work, ring=None, seq=None):
        self.link, self.transfer, self.tensor, self.group, self.work = link, transfer, tensor, group, work
        self.ring, self.seq = ring, seq
        self._done = False

    def wait(self):
        if self._done:
            return True
        if self.ring is not None:
            self.ring.sum_into(self.tensor, self.seq)
        elif self.link.real == "lazy":
            dist.all_reduce(self.tensor, group=self.group)
        elif self.work is not None:
            self.work.wait()
        _hold_until(self.transfer.done, self.link.clock)
        self._done = True
        self.link._waited(self)
        return True

    def is_completed(self) -> bool:
        return self._done


class EmulatedReducer:
    """What `comm.make_reducer(group)` returns while `use_reducer(link)` is active."""

    def __init__(self, link: "EmulatedLink", group):
        self.link, self.group = link, group

    def start(self, tensor):
        return self.link.start(tensor, self.group)


class EmulatedLink:
    """One rank's emulated link. Call it with a group to get a reducer (a `use_reducer` factory)."""

    def __init__(self, model: LinkModel = LinkModel(), real: str = "shm",
                 clock: Callable[[], float] = time.perf_counter, record: bool = False,
                 max_bytes: int = 4 << 20):
        if real not in REAL_MODES:
            raise ValueError(f"real must be one of {REAL_MODES}, got {real!r}")
        self.model, self.real, self.clock, self.record = model, real, clock, record
        self.max_bytes = int(max_bytes)  # shm: slot size (larger transfers fall back to eager gloo)
        self._rings = {}
        self.free_at = 0.0
        self.log: List[Transfer] = []
        self.busy_s = 0.0  # modelled link time so far
        self.count = 0
        self._pending: List[EmulatedHandle] = []
        self._lock = threading.Lock()

    def __call__(self, group) -> EmulatedReducer:
        return EmulatedReducer(self, group)

    def reset(self, model: Optional[LinkModel] = None) -> None:
        self.drain()
        if model is not None:
            self.model = model
        self.free_at, self.busy_s, self.count, self.log = 0.0, 0.0, 0, []

    def start(self, tensor, group) -> EmulatedHandle:
        now = self.clock()
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            started = max(now, self.free_at)
            seconds = self.model.seconds(nbytes)
            transfer = Transfer(now, started, started + seconds, nbytes)
            self.free_at = transfer.done
            self.busy_s += seconds
            self.count += 1
            if self.record:
                self.log.append(transfer)
        work = ring = seq = None
        if self.real == "shm" and nbytes <= self.max_bytes:
            ring = self._ring(group)
            if ring is not None:
                seq = ring.put(tensor)
        if ring is None and self.real in ("eager", "shm"):
            work = dist.all_reduce(tensor, group=group, async_op=True)
        handle = EmulatedHandle(self, transfer, tensor, group, work, ring, seq)
        self._pending.append(handle)
        return handle

    def _ring(self, group):
        key = id(group)
        if key not in self._rings:
            size = dist.get_world_size(group)
            self._rings[key] = _ShmRing(group, self.max_bytes) if size > 1 else None
        return self._rings[key]

    def _waited(self, handle) -> None:
        try:
            self._pending.remove(handle)
        except ValueError:
            pass

    def drain(self) -> None:
        """Wait every transfer still in flight (in issue order)."""
        for handle in list(self._pending):
            handle.wait()

    def sync_reduce(self, tensor, group):
        """A synchronous all-reduce over the link (what stock megatron does): start, wait."""
        self.start(tensor, group).wait()
        return tensor

    @contextmanager
    def stock_reduces(self):
        """Route megatron's synchronous TP all-reduces (`mappings._reduce`) through this link."""
        from megatron.core.tensor_parallel import mappings

        stock = mappings._reduce

        def emulated_reduce(input_, group):
            if group is None or group.size() == 1:
                return stock(input_, group)
            tensor = input_.contiguous()
            self.sync_reduce(tensor, group)
            return tensor

        mappings._reduce = emulated_reduce
        try:
            yield self
        finally:
            mappings._reduce = stock


@contextmanager
def emulate(link: EmulatedLink):
    """ISO's reduces and stock megatron's synchronous ones both over `link`."""
    from .comm import use_reducer

    with use_reducer(link), link.stock_reduces():
        try:
            yield link
        finally:
            link.drain()


def no_comm_link() -> EmulatedLink:
    """A link that does not communicate and takes no time: for compute-only calibration."""
    return EmulatedLink(LinkModel(), real="none")


# ---------------------------------------------------------------- profiles

def parse_profile(spec: str):
    """"ratio:R" -> ("ratio", R); "gpu:<device>/<model>/tp<N>" -> ("gpu", spec)."""
    spec = spec.strip()
    if spec.startswith("ratio:"):
        try:
            r = float(spec[len("ratio:"):])
        except ValueError:
            raise ValueError(f"bad ratio profile {spec!r}: want ratio:<float>") from None
        if not r >= 0:
            raise ValueError(f"ratio must be >= 0 in {spec!r}")
        return "ratio", r
    if spec.startswith("gpu:"):
        from .costmodel import parse_gpu_profile

        parse_gpu_profile(spec)  # validates
        return "gpu", spec
    raise ValueError(f"unknown profile {spec!r}: want ratio:<R> or gpu:<device>/<model>/tp<N>")


def profile_ratio(spec: str, seq_len: int, batch: int = 1):
    """(M/C ratio, latency fraction of one unsplit-prompt all-reduce) that `spec` asks for.

    ratio:R -> (R, 0). gpu:<device>/<model>/tp<N> -> the cost model's M/C for that GPU, model
    and TP at `seq_len` (`costmodel.ratio_profile`), and the share of the link's fixed latency
    in one all-reduce of the whole prompt there, so that chunked all-reduces scale as they
    would on that GPU link.
    """
    kind, value = parse_profile(spec)
    if kind == "ratio":
        return value, 0.0
    from . import costmodel as cm

    device, link, model, tp = cm.parse_gpu_profile(value)
    ratio = cm.ratio_profile(model, device, link, tp, seq_len, batch)
    full = cm.allreduce_time(seq_len * batch * model.hidden * 2, link, tp)
    latency = link.latency_us * 1e-6 if tp > 1 else 0.0
    return ratio, (latency / full if full > 0 else 0.0)


def link_for_profile(spec: str, seq_len: int, batch: int, compute_s: float, num_layers: int,
                     hidden: int, dtype_bytes: int) -> LinkModel:
    """The link model reproducing `spec` on a model whose unsplit prefill computes in
    `compute_s` (measured with communication skipped) and does 2 all-reduces per layer of
    seq_len x batch x hidden elements."""
    ratio, lat = profile_ratio(spec, seq_len, batch)
    return LinkModel.for_ratio(ratio, compute_s, 2 * num_layers,
                               seq_len * batch * hidden * dtype_bytes, lat)
