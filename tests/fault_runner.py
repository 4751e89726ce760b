"""`launch/infer.py` with one fault injected on one rank (tests/test_faults.py runs it).

    ISO_TEST_FAULT=ACTION:WHERE:RANK python tests/fault_runner.py <launch/infer.py flags>

ACTION: kill (SIGKILL itself), stop (SIGSTOP itself: alive, silent), raise (RuntimeError).
WHERE:  load      before the rank loads its slice of the --load checkpoint
        prefill   in the ISO schedule: the attention compute of layer 1, chunk 1
        decode    at the second decode step
        calibrate inside split="auto"'s local measurements
Only rank RANK is touched; the launcher itself is unchanged (run as __main__).
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fault(action: str, where: str, rank: int):
    def act():
        print(f"[fault_runner] rank {rank}: {action} at {where}", file=sys.stderr, flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        raise RuntimeError(f"injected fault on rank {rank} at {where}")
    return act


def install(action: str, where: str, rank: int) -> None:
    act = fault(action, where, rank)
    if where == "prefill":
        from iso_megatron.megatron.block import MegatronChunkOps

        attention = MegatronChunkOps.attention

        def faulty(self, i, c, hidden):
            if i == 1 and c == 1:
                act()
            return attention(self, i, c, hidden)
        MegatronChunkOps.attention = faulty
    elif where == "decode":
        from iso_megatron.megatron import generate

        sample, calls = generate.sample, []

        def faulty(*a, **k):
            calls.append(1)
            if len(calls) == 2:  # the first sample ends the prefill; the second is in decode
                act()
            return sample(*a, **k)
        generate.sample = faulty
    elif where == "load":
        from iso_megatron.megatron.checkpoint import load

        load_into = load._load_into

        def faulty(*a, **k):
            act()
            return load_into(*a, **k)
        load._load_into = faulty
    elif where == "calibrate":
        from iso_megatron import calibrate

        measure = calibrate._measure_locally

        def faulty(*a, **k):
            act()
            return measure(*a, **k)
        calibrate._measure_locally = faulty
    else:
        raise SystemExit(f"fault_runner: unknown WHERE {where!r}")


if __name__ == "__main__":
    action, where, rank = os.environ["ISO_TEST_FAULT"].split(":")
    sys.path.insert(0, ROOT)
    if int(os.environ.get("RANK", "0")) == int(rank):
        install(action, where, int(rank))
    script = os.path.join(ROOT, "launch", "infer.py")
    sys.argv = [script] + sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
