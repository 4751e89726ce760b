"""A rank that fails or dies: every other rank stops with a message naming it and the phase.

Gloo and NCCL only tell a surviving rank that a collective broke ("Connection closed by peer",
or a timeout after `--distributed-timeout-minutes`), not which rank is gone or why. A
`FaultWatch` adds that, on the c10d store the process group already uses, with no collective
and nothing on the hot path:

  report     a rank whose phase raises writes `<rank>: failed` = "<phase>: <Type>: <message>"
             before the exception leaves the phase (the rank then exits, which closes its
             connections, so the others' collectives fail at once instead of waiting);
  heartbeat  a thread adds 1 to `<rank>: alive` every `HEARTBEAT_S` seconds;
  diagnose   a rank whose collective failed waits up to `GRACE_S` for a report, then names the
             ranks whose heartbeat stopped (killed, crashed, or stopped by a signal). If the
             store itself is gone, so is the process holding it: under torchrun node 0's
             agent, else rank 0.

Such a rank raises `RankLost` with the diagnosis, in its own words; the entry points
(`iso_megatron.runtime.run_main`) print it and exit non-zero. The bound on a silent hang is the
process group's timeout (`distributed_timeout`).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Dict, List, Optional

import torch.distributed as dist

HEARTBEAT_S = 0.5
GRACE_S = 3.0  # > several heartbeats: a live rank's count moves within it
_PREFIX = "iso_megatron/faults/"
# Tests only: the process-group timeout in seconds (Megatron-LM's --distributed-timeout-minutes
# is the user's setting; a test cannot wait minutes for a stopped rank to time out).
TEST_TIMEOUT_ENV = "ISO_MEGATRON_TEST_DISTRIBUTED_TIMEOUT_S"


class RankLost(RuntimeError):
    """Raised on a surviving rank: another rank failed or died; the message says which and when."""


def distributed_timeout(minutes: float) -> timedelta:
    """The process group's timeout: Megatron-LM's --distributed-timeout-minutes, or the test-only
    seconds of ISO_MEGATRON_TEST_DISTRIBUTED_TIMEOUT_S."""
    override = os.environ.get(TEST_TIMEOUT_ENV)
    if override:
        return timedelta(seconds=float(override))
    if minutes <= 0:
        raise ValueError(f"--distributed-timeout-minutes must be > 0, got {minutes}")
    return timedelta(minutes=minutes)


def is_comm_failure(exc: BaseException) -> bool:
    """A collective that broke because of another rank (its connection closed, or the timeout)."""
    if isinstance(exc, getattr(dist, "DistError", ())) and not isinstance(exc, RankLost):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and not isinstance(exc, RankLost) and any(
        t in text for t in ("third_party/gloo", "Connection closed by peer", "Connection reset by peer",
                            "Timed out waiting", "timeout caused pair closure", "Broken pipe",
                            "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))


class FaultWatch:
    """Heartbeat, reports and diagnosis for one rank (`watch_job()` makes the process's one)."""

    def __init__(self, store, rank: int, world: int, store_host=("rank 0", "rank 0")):
        """`store_host`: (what is lost when the store is gone, what holds the store)."""
        self.store, self.rank, self.world, self.store_host = store, rank, world, store_host
        self.current: Optional[str] = None
        self.reported = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- heartbeat ---------------------------------------------------------------------------
    def start(self) -> "FaultWatch":
        self._beat()  # a count exists before any phase can fail
        self._thread = threading.Thread(target=self._beats, name="iso_fault_heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the heartbeat thread (before the process group and its store go)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _beat(self) -> None:
        self.store.add(self._key(self.rank, "alive"), 1)

    def _beats(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the store is gone: the job is ending; diagnosis says so
                return

    # ---- phases ------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        """Run a phase of the job: an exception leaving it is reported (this rank failed) or,
        when it is a broken collective, turned into `RankLost` naming the other rank."""
        outer, self.current = self.current, name
        try:
            yield
        except RankLost:
            raise
        except (Exception, KeyboardInterrupt) as exc:  # not SystemExit: a chosen exit code
            if is_comm_failure(exc):
                raise RankLost(self.diagnose(exc)) from exc
            self.report(exc)
            raise
        finally:
            self.current = outer

    def report(self, exc: BaseException) -> None:
        if self.reported:
            return
        what = "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else \
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        try:
            self.store.set(self._key(self.rank, "failed"), f"{self.current}: {what}")
            self.reported = True
        except Exception:
            pass  # the store is gone too: the others will find this rank's heartbeat stopped

    # ---- diagnosis ---------------------------------------------------------------------------
    def diagnose(self, exc: BaseException) -> str:
        """Which rank(s) failed or were lost, in which phase; for a rank whose collective broke."""
        phase = self.current or "the job"
        cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        others = [r for r in range(self.world) if r != self.rank]
        try:
            start = {r: self._count(r) for r in others}
            deadline = time.monotonic() + GRACE_S
            while True:
                failed = self._reports(others)
                if failed:
                    return "; ".join(f"rank {r} failed during {msg}" for r, msg in sorted(failed.items())) \
                        + f" (rank {self.rank} stopped during {phase})"
                if time.monotonic() >= deadline:
                    break
                time.sleep(HEARTBEAT_S / 2)
            lost = [r for r in others if self._count(r) == start[r]]
        except Exception:  # the store is unreachable: its holder is gone
            return (f"{self.store_host[0]} was lost during {phase} (rank {self.rank} lost contact with "
                    f"{self.store_host[1]}, which holds the job's store; it saw: {cause})")
        if lost:
            names = ", ".join(map(str, lost))
            return (f"rank{'s' if len(lost) > 1 else ''} {names} {'were' if len(lost) > 1 else 'was'} lost "
                    f"during {phase} (its process stopped without a report: killed, crashed or "
                    f"stopped; rank {self.rank} saw: {cause})")
        return (f"a collective failed during {phase} on rank {self.rank} ({cause}), but every other "
                f"rank is alive and none reported a failure: a rank is stuck or the network failed")

    def _key(self, rank: int, what: str) -> str:
        return f"{_PREFIX}{rank}:{what}"

    def _count(self, rank: int) -> int:
        return int(self.store.add(self._key(rank, "alive"), 0))

    def _reports(self, ranks: List[int]) -> Dict[int, str]:
        out = {}
        for r in ranks:
            key = self._key(r, "failed")
            if self.store.check([key]):
                out[r] = self.store.get(key).decode()
        return out


class NoWatch:
    """A world of one, or no process group: phases run as they are."""

    reported = False

    @contextmanager
    def phase(self, name: str):
        yield

    def stop(self) -> None:
        pass


def watch_job():
    """The FaultWatch of this process's default process group (started), or NoWatch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return NoWatch()
    from torch.distributed.distributed_c10d import _get_default_store

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        holder = ("rank 0's node", "node 0's torchrun agent")
    else:
        holder = ("rank 0", "rank 0")
    return FaultWatch(_get_default_store(), dist.get_rank(), dist.get_world_size(), holder).start()
