"""Run a function on N real ranks (separate processes, gloo), with a timeout that kills them all.

`run_ranks(n, "tests.cases_core:core_group", *args)` starts `python -m tests.harness` n times,
each in its own process group; every rank calls `fn(*args)` after torch.distributed is up
and returns a picklable result. The target may also be the function itself, defined at module
level in the test file (`run_ranks(2, my_case, ...)`): a new multi-process test then touches one
file (rank-side helpers: tests/ranks.py). Any rank failing, or the deadline passing, kills every rank's
whole process group and raises with the failing rank's traceback. Ranks are started once per
group of cases: importing megatron-core costs seconds per process.
"""

from __future__ import annotations

import glob
import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RankFailure(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs):
    """SIGKILL each process's whole group, also when its leader has already exited: a rank's
    children (megatron's checkpoint-writer workers, spawned by multiprocessing) outlive it
    otherwise and pile up over a suite (measured: 138 orphans, ~190 MB each, after three runs)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        p.wait()


def _remove_deepspeed_shm(port: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_
    {uid}_{addr}_{port}_{rank} behind (69 MB each here); remove this run's by its port."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def run_ranks(world_size: int, target, *args, timeout: float = 300, env=None):
    """Results of `target(*args)` on each rank, in rank order ("module:function", or a
    module-level function)."""
    if callable(target):
        if "<locals>" in target.__qualname__:
            raise ValueError(f"run_ranks: {target.__qualname__} must be defined at module level")
        target = f"{target.__module__}:{target.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="iso_ranks_") as tmp:
        with open(os.path.join(tmp, "args.pkl"), "wb") as f:
            pickle.dump((target, args), f)
        port = _free_port()
        procs = []
        for rank in range(world_size):
            rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                        "LOCAL_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                        **(env or {})}
            log = open(os.path.join(tmp, f"rank{rank}.log"), "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.harness", tmp], cwd=ROOT,
                                          env=rank_env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    break  # one rank died: the others may wait forever on it
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            _kill(procs)
            _remove_deepspeed_shm(port)
        logs = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.log"), "rb") as f:
                logs.append(f.read().decode(errors="replace"))
        results = []
        for rank, p in enumerate(procs):
            out = os.path.join(tmp, f"rank{rank}.pkl")
            if p.returncode != 0 or not os.path.exists(out):
                timed_out = time.monotonic() > deadline
                why = f"timed out after {timeout:.0f}s" if timed_out else f"exit code {p.returncode}"
                raise RankFailure(f"rank {rank} of {world_size} failed ({why}) running {target}\n"
                                  + "\n".join(f"--- rank {r} log tail ---\n{l[-4000:]}"
                                              for r, l in enumerate(logs)))
            with open(out, "rb") as f:
                results.append(pickle.load(f))
        return results


def _rank_main(tmp: str) -> None:
    import torch.distributed as dist

    with open(os.path.join(tmp, "args.pkl"), "rb") as f:
        target, args = pickle.load(f)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    module, name = target.split(":")
    try:
        result = getattr(importlib.import_module(module), name)(*args)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # skip the collective teardown: the other ranks are about to be killed
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    from iso_megatron.runtime import shutdown

    shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    _rank_main(sys.argv[1])


_PORT_TAKEN = ("Address already in use", "EADDRINUSE")


def run_torchrun(nproc: int, argv, timeout: float = 300, env=None):
    """`torchrun --nproc-per-node nproc argv...` in its own process group; killed whole, with
    its workers, on timeout and after it returns.
    Returns (returncode, combined output). Retried once if the free port was taken meanwhile."""
    rc, out = _run_torchrun(nproc, argv, timeout, env)
    if rc != 0 and any(t in out for t in _PORT_TAKEN):
        rc, out = _run_torchrun(nproc, argv, timeout, env)
    return rc, out


def _descendants(proc, seen: dict) -> None:
    """Add `proc`'s live descendants to `seen` (pid -> psutil.Process): torchrun starts its
    workers in sessions of their own, so killing torchrun's group does not reach them, and once
    torchrun has exited they are no longer its children."""
    import psutil

    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(child.pid, child)
    except psutil.Error:
        pass


def _kill_descendants(seen: dict) -> None:
    import psutil

    for child in seen.values():
        try:
            if child.is_running():
                try:
                    os.killpg(os.getpgid(child.pid), signal.SIGKILL)  # its spawned workers too
                except (ProcessLookupError, PermissionError):
                    pass
                child.kill()
        except psutil.Error:
            pass


def _run_torchrun(nproc, argv, timeout, env):
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port)] + list(argv)
    try:
        return run_process(cmd, timeout, {"PYTHONUNBUFFERED": "1", **(env or {})}, what=f"torchrun {argv}")
    finally:
        _remove_deepspeed_shm(port)


def run_process(cmd, timeout: float, env=None, what=None):
    """(returncode, combined output) of `cmd` run from the repo root in its own process group;
    on timeout RankFailure, and whatever it left is killed either way: its group and every
    descendant's (torchrun's workers run in sessions of their own)."""
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline, seen = time.monotonic() + timeout, {}
    try:
        while True:
            _descendants(proc, seen)
            try:  # retrying communicate after its timeout loses no output
                out, _ = proc.communicate(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    _kill([proc])
                    _kill_descendants(seen)
                    out, _ = proc.communicate()
                    raise RankFailure(f"{what or ' '.join(map(str, cmd))} timed out after {timeout}s\n"
                                      f"{out.decode(errors='replace')[-4000:]}")
    finally:
        _kill([proc])
        _kill_descendants(seen)
    return proc.returncode, out.decode(errors="replace")


def run_torchrun_agents(nodes: int, argv, timeout: float, env=None, wait_for=(0,),
                        nproc_per_node: int = 1, rendezvous: str = "static"):
    """One torchrun agent per node (`--nnodes nodes --nproc-per-node N`) on this machine, as on
    `nodes` machines: an agent whose worker dies does not kill the others' workers, as a single
    agent would. `rendezvous`: "static" (`--node-rank n`, rank 0's agent hosts the store) or
    "c10d" (`--rdzv-backend c10d`, as a multi-node job is started: the agents take node ranks in
    the order they join). Each agent runs in its own session; all, with their workers, are
    killed once the agents of `wait_for` have exited and the others too (or 5 s later), or at
    the deadline.
    Returns [(returncode or None if killed, output, seconds until it exited)] per agent."""
    if rendezvous not in ("static", "c10d"):
        raise ValueError(f"rendezvous must be 'static' or 'c10d', got {rendezvous!r}")
    port = _free_port()
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.monotonic()

    def agent(n):
        where = (["--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port)]
                 if rendezvous == "static" else
                 ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"iso-test-{port}"])
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                "--nproc-per-node", str(nproc_per_node), *where]
    procs = [subprocess.Popen(agent(n) + list(argv), cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True) for n in range(nodes)]
    seen, ended = {}, [None] * nodes
    outs = [[] for _ in range(nodes)]
    readers = [threading.Thread(target=lambda p=p, o=o: o.append(p.stdout.read()), daemon=True)
               for p, o in zip(procs, outs)]
    for r in readers:
        r.start()
    try:
        while time.monotonic() - t0 < timeout:
            for p in procs:
                _descendants(p, seen)
            for n, p in enumerate(procs):
                if ended[n] is None and p.poll() is not None:
                    ended[n] = time.monotonic() - t0
            waited = [ended[n] for n in wait_for]
            if None not in waited and (None not in ended or time.monotonic() - t0 > max(waited) + 5):
                break
            time.sleep(0.2)
    finally:
        _kill(procs)
        _kill_descendants(seen)
        for r in readers:
            r.join(timeout=10)
        _remove_deepspeed_shm(port)
    return [(p.returncode if ended[n] is not None else None,
             b"".join(outs[n]).decode(errors="replace"), ended[n]) for n, p in enumerate(procs)]
