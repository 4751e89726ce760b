"""An emulated link for benchmarks: real all-reduces, completion held to a modelled time.

On a CPU box the tensor-parallel "link" (gloo over loopback) and the compute share the same
cores, so real overlap barely shows. `EmulatedLink` brings a chosen communication/compute ratio
onto the machine instead:

- every all-reduce runs for real (outputs stay exactly those of the real collective);
- its handle's `wait()` returns no earlier than the transfer's modelled completion;
- transfers on one rank's link queue in order: one starts when it is issued AND the previous
  one has finished (`free_at`), and takes `LinkModel.seconds(nbytes)`.

`with emulate(link):` puts the link in place for the block, and only for the block: it carries
ISO's deferred reduces (`comm.use_reducer(link)`: the link is the reducer factory) and stock
megatron's synchronous ones (`route_stock_reduces`: start, then wait at once). So the baseline is
the untouched stock code and pays the same modelled time per all-reduce as ISO does. On leaving
the block every transfer still in flight is waited for and megatron's own reduce is back.

How the real all-reduce travels (`real=`):
  "shm"   (default; ranks on one host) through shared memory, as NCCL's SHM transport carries
          all-reduces between GPUs without P2P: `start()` copies the rank's partial sum into its
          slot of a shared ring, `wait()` sums all ranks' slots in rank order (bit-identical on
          every rank; for 2 ranks also bit-identical to gloo's a + b) into the tensor. No
          barrier, no helper thread: ~0.1 ms of the compute thread per MiB with the data in
          cache, 0.4-0.5 ms inside a prefill (the benchmark's `iso_host_ms`), against ~1 ms of
          gloo's TCP loopback, which would otherwise be charged to the overlapped schedule.
          Tensors larger than the ring's slots fall back to "eager".
  "lazy"  gloo, synchronously in `wait()` just before the hold (a barrier between ranks).
  "eager" gloo with async_op=True in `start()`: gloo's thread runs it beside the compute.
  "none"  no communication at all (calibration passes that must skip communication;
          outputs are then the ranks' partial sums).
Measured on the 2-core CPU (S=1024, ratio 0.5, even split; compute-only ISO 393 ms): none
387-425 ms, eager 423-466 ms, lazy 490-543 ms.

`emulate(link, stand_in_tp=n)`: one process stands in for a TP group of n (the pipeline
benchmark's stages), its reduces and stock's held to the link over a group of one.
`WaitedReducer` waits each reduce as it starts (ISO's chunks without the overlap).
`EmulatedP2P` is the same idea for the link between pipeline stages (`comm.use_p2p`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist

REAL_MODES = ("shm", "lazy", "eager", "none")


@dataclass(frozen=True)
class LinkModel:
    """Modelled time of one all-reduce: latency_s + nbytes * per_byte_s.

    `contention` s: while a transfer is in flight the compute beside it runs at (1 - s) of its
    speed (on a GPU the collective's kernels take SMs and memory bandwidth; the cost model's
    `simulate(..., contention=s)` is the same rule). The CPU computes at full speed meanwhile,
    so `wait()` adds the time that compute would have lost: see `contention_delay`."""

    latency_s: float = 0.0
    per_byte_s: float = 0.0
    contention: float = 0.0

    def __post_init__(self):
        if not 0 <= self.contention < 1:
            raise ValueError(f"link contention must be in [0, 1), got {self.contention}")

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes * self.per_byte_s if nbytes > 0 else 0.0

    def contention_delay(self, computed_s: float, in_flight_s: float) -> float:
        """Extra seconds the compute beside one transfer takes under contention: `computed_s`
        of compute ran (at full speed) since the transfer started, which was in flight for
        `in_flight_s`. At (1 - s) speed that work takes computed / (1 - s) while the transfer
        lasts, at full speed after it: the loss is min(computed * s / (1 - s), in_flight * s)."""
        s = self.contention
        if s == 0 or computed_s <= 0 or in_flight_s <= 0:
            return 0.0
        return min(computed_s * s / (1 - s), in_flight_s * s)

    @classmethod
    def for_ratio(cls, ratio: float, compute_s: float, num_reduces: int, nbytes: int,
                  latency_fraction: float = 0.0, contention: float = 0.0) -> "LinkModel":
        """The link on which `num_reduces` all-reduces of `nbytes` each take `ratio` x `compute_s`
        together, `latency_fraction` of each being fixed latency (the rest scales with bytes)."""
        if ratio < 0 or compute_s < 0 or num_reduces < 1 or nbytes < 1:
            raise ValueError(f"bad link calibration: ratio={ratio}, compute_s={compute_s}, "
                             f"num_reduces={num_reduces}, nbytes={nbytes}")
        if not 0 <= latency_fraction < 1:
            raise ValueError(f"latency_fraction must be in [0, 1), got {latency_fraction}")
        per_reduce = ratio * compute_s / num_reduces
        return cls(latency_fraction * per_reduce, (1 - latency_fraction) * per_reduce / nbytes, contention)


class Transfer(NamedTuple):
    issued: float     # clock when start() was called
    started: float    # when the link took it (issued, or when the previous one finished)
    done: float       # modelled completion
    nbytes: int


class HostTime(NamedTuple):
    """The calling thread's own time for one transfer, beside the link's modelled time: on a CPU
    the emulation's real data movement runs on the compute core (a GPU's NCCL does it on SMs:
    the contention term). `start_s`: in start() once the transfer is on the link (the data into
    shared memory); `wait_s`: in wait() before the hold (the peers' data summed in). Time spent
    waiting for a peer (its data not yet put, a slot not yet read) is left out: that is the
    ranks' skew, not this rank's work. Recorded for the shared-memory path ("shm") only:
    gloo's paths run on their own threads or are the transfer itself."""
    nbytes: int
    start_s: float
    wait_s: float


def _hold_until(deadline: float) -> None:
    # sleep most of the way, then spin the last ~0.2 ms (sleep overshoots by ~0.05-0.1 ms)
    while True:
        left = deadline - time.perf_counter()
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
        self.spun_s = 0.0  # seconds spent waiting for the peers, all transfers
        self._reads_done = set()
        self._read_upto = 0

    def _slot(self, rank: int, seq: int, nbytes: int):
        off = self.header + (rank * self.slots + seq % self.slots) * self.slot_bytes
        return self.buf[off: off + nbytes]

    def _spin(self, cond):
        """Wait for the peers (a slot read, a slot written); the time goes to `spun_s`, which
        is waiting, not this rank's own data movement."""
        if cond():
            return
        began = time.perf_counter()
        while not cond():
            time.sleep(2e-5)
        self.spun_s += time.perf_counter() - began

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
        if flat is not None and self.n == 2:  # straight into the tensor: no temporary, same bits
            torch.add(parts[0], parts[1], out=flat)
        else:
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
    def __init__(self, link: "EmulatedLink", transfer: Transfer, tensor, group, work, ring=None, seq=None,
                 start_s: float = 0.0):
        self.link, self.transfer, self.tensor, self.group, self.work = link, transfer, tensor, group, work
        self.ring, self.seq, self.start_s = ring, seq, start_s
        self._done = False

    def wait(self):
        if self._done:
            return True
        entered = time.perf_counter()
        spun = self.ring.spun_s if self.ring is not None else 0.0
        if self.ring is not None:
            self.ring.sum_into(self.tensor, self.seq)
        elif self.link.real == "lazy":
            dist.all_reduce(self.tensor, group=self.group)
        elif self.work is not None:
            self.work.wait()
        # the compute since the transfer started (the executor computes the next step between
        # start() and wait()) as it would have run beside it; stock waits at once: nothing
        t = self.transfer
        now = time.perf_counter()
        if self.link.record and self.ring is not None:  # the shared-memory path's own copies
            self.link.host_log.append(HostTime(t.nbytes, self.start_s, now - entered - (self.ring.spun_s - spun)))
        slowed = self.link.model.contention_delay(now - t.started, t.done - t.started)
        _hold_until(max(t.done, now + slowed))
        self._done = True
        self.link._waited(self)
        return True


class EmulatedReducer:
    """What `comm.make_reducer(group)` returns while `emulate(link)` is active."""

    def __init__(self, link: "EmulatedLink", group):
        self.link, self.group = link, group

    def start(self, tensor):
        return self.link.start(tensor, self.group)


class EmulatedLink:
    """One rank's emulated link. Call it with a group to get a reducer (a `use_reducer` factory);
    put it in place with `with emulate(link):`. `record=True` keeps every `Transfer` in `log` and
    the calling thread's own time for each (`HostTime`) in `host_log`, as each is waited."""

    def __init__(self, model: LinkModel = LinkModel(), real: str = "shm", record: bool = False,
                 max_bytes: int = 4 << 20):
        if real not in REAL_MODES:
            raise ValueError(f"real must be one of {REAL_MODES}, got {real!r}")
        self.model, self.real, self.record = model, real, record
        self.max_bytes = int(max_bytes)  # shm: slot size (larger transfers fall back to eager gloo)
        self._rings = {}
        self.free_at = 0.0
        self.log: List[Transfer] = []
        self.host_log: List[HostTime] = []
        self._pending: List[EmulatedHandle] = []

    def __call__(self, group) -> EmulatedReducer:
        return EmulatedReducer(self, group)

    def start(self, tensor, group) -> EmulatedHandle:
        now = time.perf_counter()
        nbytes = tensor.numel() * tensor.element_size()
        started = max(now, self.free_at)
        transfer = Transfer(now, started, started + self.model.seconds(nbytes), nbytes)
        self.free_at = transfer.done
        if self.record:
            self.log.append(transfer)
        work = ring = seq = None
        spun = 0.0
        if self.real == "shm" and nbytes <= self.max_bytes:
            ring = self._ring(group)
            if ring is not None:
                spun = ring.spun_s
                seq = ring.put(tensor)
                spun = ring.spun_s - spun
        if ring is None and self.real in ("eager", "shm"):
            work = dist.all_reduce(tensor, group=group, async_op=True)
        handle = EmulatedHandle(self, transfer, tensor, group, work, ring, seq, time.perf_counter() - now - spun)
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
def route_stock_reduces(reduce: Callable):
    """Stock megatron-core's synchronous tensor-parallel all-reduce calls `reduce(tensor, group)`
    for the duration of the block (the benchmark links' baseline: `emulate`, `proxy.stand_in`).

    Megatron has no hook for it: RowParallelLinear (through
    `reduce_from_tensor_model_parallel_region`) and the vocab-parallel embedding call
    `megatron.core.tensor_parallel.mappings._reduce(input_, group)`, which all-reduces in place
    over torch.distributed. That one module attribute is swapped while the block runs and put
    back when it ends, also on error. Not thread-local: do not run unrelated megatron models on
    other threads meanwhile.
    """
    from megatron.core.tensor_parallel import mappings

    stock = mappings._reduce

    def routed(input_, group):
        tensor = input_.contiguous()
        reduce(tensor, group)
        return tensor

    mappings._reduce = routed
    try:
        yield
    finally:
        mappings._reduce = stock


@contextmanager
def emulate(link: EmulatedLink, stand_in_tp: Optional[int] = None):
    """ISO's reduces and stock megatron's synchronous ones both over `link`, for the block; on
    exit every transfer still in flight is waited for. A group of one rank is left alone (stock
    megatron does not reduce there, nor does the link: TP 1 has no all-reduce at all) unless
    `stand_in_tp` = n: then this process stands in for a TP group of n (`comm.stand_in_tp`: ISO
    plans as TP n) and every reduce, stock's included, takes the link's time over its group of
    one (give such a link real="none": the sum over one rank is the tensor itself)."""
    from .comm import stand_in_tp as planned_as, use_reducer

    if stand_in_tp is not None and link.real != "none":
        raise ValueError(f"emulate(stand_in_tp={stand_in_tp}): the link must be real='none' (a group of one "
                         f"has nothing to sum), got real={link.real!r}")

    def stock_reduce(tensor, group):
        if stand_in_tp is not None or (group is not None and group.size() > 1):
            link.sync_reduce(tensor, group)

    with use_reducer(link), route_stock_reduces(stock_reduce), \
            (planned_as(stand_in_tp) if stand_in_tp is not None else nullcontext()):
        try:
            yield link
        finally:
            link.drain()


class WaitedReducer:
    """Every reduce waited for as soon as it starts: ISO's chunks without the overlap (the
    pipeline benchmark's "chunked" column). A `use_reducer` factory around another one."""

    def __init__(self, factory: Callable):
        self.factory = factory

    def __call__(self, group) -> "_WaitedStart":
        return _WaitedStart(self.factory(group))


class _WaitedStart:
    def __init__(self, inner):
        self.inner = inner

    def start(self, tensor):
        handle = self.inner.start(tensor)
        handle.wait()
        return handle


# ---------------------------------------------------------------- the link between pipeline stages

class _P2PHandle:
    def __init__(self, works, deadline: Callable[[], float], keep=()):
        self.works, self.deadline, self.keep, self._done = works, deadline, keep, False

    def wait(self):
        if not self._done:
            for w in self.works:
                w.wait()
            _hold_until(self.deadline())
            self._done = True
        return True


class EmulatedP2P:
    """A pipeline stage's emulated point-to-point link (a `comm.use_p2p` factory; one per rank):
    every transfer runs for real (torch.distributed isend / irecv: the values are the real
    ones) and lands no earlier than its modelled time. The sender's transfers to one peer
    queue in order, each taking `LinkModel.seconds(nbytes)` from when it is issued and the
    previous one is done; the modelled arrival travels with the data (one float64 on the next
    tag) and the receiver's `wait()` holds until it. Both ranks read time.perf_counter
    (CLOCK_MONOTONIC: one clock for the processes of one host), so the ranks must share a
    host. Contention does not apply (a stage transfer takes a few SMs at most)."""

    def __init__(self, model: LinkModel = LinkModel()):
        if model.contention:
            raise ValueError("EmulatedP2P: contention applies to TP all-reduces only, give contention=0")
        self.model = model
        self.free_at: Dict[int, float] = {}

    def __call__(self, group) -> "_EmulatedP2PGroup":
        return _EmulatedP2PGroup(self, group)


class _EmulatedP2PGroup:
    def __init__(self, link: EmulatedP2P, group):
        self.link, self.group = link, group

    def isend(self, tensor, dst: int, tag: int = 0):
        now = time.perf_counter()
        nbytes = tensor.numel() * tensor.element_size()
        done = max(now, self.link.free_at.get(dst, 0.0)) + self.link.model.seconds(nbytes)
        self.link.free_at[dst] = done
        stamp = torch.tensor([done], dtype=torch.float64, device=tensor.device)
        works = [dist.isend(tensor, dst=dst, group=self.group, tag=2 * tag),
                 dist.isend(stamp, dst=dst, group=self.group, tag=2 * tag + 1)]
        return _P2PHandle(works, lambda: done, keep=(stamp,))

    def irecv(self, tensor, src: int, tag: int = 0):
        stamp = torch.zeros(1, dtype=torch.float64, device=tensor.device)
        works = [dist.irecv(tensor, src=src, group=self.group, tag=2 * tag),
                 dist.irecv(stamp, src=src, group=self.group, tag=2 * tag + 1)]
        return _P2PHandle(works, lambda: float(stamp.item()))


def no_comm_link() -> EmulatedLink:
    """A link that does not communicate and takes no time: for compute-only calibration."""
    return EmulatedLink(LinkModel(), real="none")
