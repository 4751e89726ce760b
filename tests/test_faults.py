"""A rank that dies, stops or fails: every other rank exits non-zero, in bounded time, with its
own message naming that rank and the phase (iso_megatron.faults); SIGINT ends every rank.

Ranks run on separate torchrun agents (`--nnodes 2`, one worker each, on this machine), as on
two machines: a single agent would kill the survivors itself when a worker dies, and the test
would show nothing. The fault is injected by tests/fault_runner.py into `launch/infer.py`,
unchanged otherwise. The process groups' timeout is set to a few seconds through the
test-only ISO_MEGATRON_TEST_DISTRIBUTED_TIMEOUT_S (users: --distributed-timeout-minutes).
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.harness import ROOT, _descendants, _free_port, _kill, _kill_descendants, run_torchrun_agents

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 15  # the process groups' timeout in these tests
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "ckpt")
LOAD = ["--load", None, "--use-checkpoint-args", "--iso-min-tokens", "0",
        "--prompt-token-ids", "5,6,7,8,9,10,11,12"]  # the fixtures' positions end at 32
PP2 = ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "1"]

# (fault, extra flags, the rank that must speak, what it must say)
CASES = [
    ("kill:prefill:1", [], 0, "rank 1 was lost during prefill"),
    ("kill:decode:1", [], 0, "rank 1 was lost during decode"),
    ("kill:load:1", LOAD, 0, "rank 1 was lost during loading the checkpoint"),
    # node 0's agent holds the store: gone with it ("rank 0's node"), or not yet ("rank 0")
    ("kill:prefill:0", [], 1, ("rank 0's node was lost during prefill", "rank 0 was lost during prefill")),
    ("stop:prefill:1", [], 0, "rank 1 was lost during prefill"),  # alive but silent: the timeout
    ("raise:prefill:1", [], 0, "rank 1 failed during prefill: RuntimeError: injected fault on rank 1"),
    ("raise:calibrate:1", ["--iso-split", "auto"], 0,
     "calibration failed on 1 rank(s) (rank 1: RuntimeError: injected fault on rank 1"),
    # a dead pipeline stage (TP 1 x PP 2, one stage per node): the last stage dies while chunks
    # flow to it; the first dies while the last waits for its chunks
    ("kill:prefill:1", PP2, 0, "rank 1 was lost during prefill"),
    ("kill:prefill:0", PP2, 1, ("rank 0's node was lost during prefill", "rank 0 was lost during prefill")),
]


def _fixture() -> str:
    # saved by megatron-core 0.16.1; every supported version loads it (tests/test_ckpt_versions.py)
    return os.path.join(FIXTURE, "mcore-0.16.1", "gpt-tp2", "checkpoint")


@pytest.mark.parametrize("fault,flags,speaker,message", CASES,
                         ids=[c[0] + ("-pp2" if c[1] is PP2 else "") for c in CASES])
def test_every_rank_stops_naming_the_lost_rank(fault, flags, speaker, message):
    flags = [_fixture() if f is None else f for f in flags]
    faulty = int(fault.split(":")[2])
    t_start = time.monotonic()
    results = run_torchrun_agents(
        2, ["tests/fault_runner.py", "--num-tokens-to-generate", "4"] + flags, timeout=240,
        env={"ISO_TEST_FAULT": fault, "ISO_MEGATRON_TEST_DISTRIBUTED_TIMEOUT_S": str(TIMEOUT_S)},
        wait_for=(speaker,))
    rc, log, ended = results[speaker]
    print(f"\n{fault}: " + "; ".join(  # the note's table: each agent's exit code and time to exit
        f"node {n} rc {r[0]} after {'-' if r[2] is None else f'{r[2]:.1f}'} s" for n, r in enumerate(results)))
    where = f"{fault}: rank {speaker}'s agent (rc {rc}, after {ended} s)\n{log[-3000:]}"
    assert f"[fault_runner] rank {faulty}:" in results[faulty][1], "the fault was not injected\n" + where
    assert rc is not None and rc != 0, where  # exited by itself, with an error
    assert f"error: rank {speaker}: " in log or (speaker == 0 and "error: " in log), where
    assert any(m in log for m in ((message,) if isinstance(message, str) else message)), where
    # bounded: start-up (~10-20 s here) plus, for a silent rank, the timeout; never a hang
    assert ended < 120 + (TIMEOUT_S if fault.startswith("stop") else 0), where
    if fault.startswith("raise"):  # the failing rank exits with its own message too
        rc1, log1, _ = results[faulty]
        assert rc1 is not None and rc1 != 0 and "injected fault on rank 1" in log1, log1[-3000:]
    assert time.monotonic() - t_start < 240


def test_sigint_to_torchrun_ends_every_rank():
    """Ctrl-C on torchrun during generation: torchrun and both ranks are gone within seconds."""
    import psutil

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(port), "launch/infer.py",
                             "--num-tokens-to-generate", "3000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out, seen = [], {}
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(256), b"")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while b"generating:" not in b"".join(out) or len(seen) < 2:  # both ranks are at work
            assert time.monotonic() < deadline and proc.poll() is None, b"".join(out).decode()[-3000:]
            _descendants(proc, seen)
            time.sleep(0.2)
        time.sleep(1.0)
        workers = [p for p in seen.values() if p.is_running()]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        psutil.wait_procs(workers, timeout=max(0.1, 30 - (time.monotonic() - t0)))
        took = time.monotonic() - t0
        alive = [p.pid for p in workers if p.is_running()]
        assert not alive and took < 30, (took, alive, b"".join(out).decode()[-3000:])
        assert proc.returncode != 0
    finally:
        _kill([proc])
        _kill_descendants(seen)
