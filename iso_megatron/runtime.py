"""Process-group lifetime for every entry point: one init, one ordered teardown.

Every launcher (`launch/infer.py`, `launch/bench.py`, `launch/infer_hf_deepspeed.py`) runs
its work inside `distributed(...)`. On the way out, on success and on error alike, Megatron's
parallel state is destroyed first (its groups are sub-groups of the world), then every
torch.distributed group. A rank that leaves with groups still alive lets the interpreter
destroy gloo's communication threads while they run: "terminate called without an active
exception", SIGABRT at exit, after the work itself succeeded (seen on the DeepSpeed-checkpoint
launcher test before this existed).

Even after that teardown, third-party objects (a megatron-core model keeps its `tp_group`,
DeepSpeed's engine its `mp_group`) keep gloo groups, and their threads, alive into interpreter
finalization, where a group's thread can still die in the same way (seen once in CI on the
DeepSpeed launcher, rank 1, after its work and teardown). So an entry point ends through
`run_main`: teardown in order, streams flushed, then `os._exit` with main's exit code, which
skips finalization and with it that race.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, NoReturn, Optional

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: str, timeout: Optional[timedelta] = None) -> torch.device:
    """torch.distributed up (NCCL on CUDA, gloo on CPU); a plain `python script.py` becomes a
    world of one. `timeout` bounds every collective (iso_megatron.faults.distributed_timeout).
    Returns this rank's device."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def shutdown(watch=None) -> None:
    """Stop the fault watch's heartbeat (if given), destroy Megatron's parallel state (if any),
    then every torch.distributed group. Safe to call more than once, and when nothing was
    initialised."""
    if watch is not None:
        watch.stop()
    if "megatron.core" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device: str):
    """`with distributed("cpu") as dev:` the process group lives exactly as long as the block."""
    try:
        yield init_process_group(device)
    finally:
        shutdown()


def exit_code(main: Callable[[], object]) -> int:
    """Run an entry point's `main()`; its exit code, with any error printed (never raised)."""
    try:
        result = main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # SystemExit("error: ...") prints its message, as Python does
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    # an int is the exit code; anything else (a launcher's results, for in-process callers) is success
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_main(main: Callable[[], object]) -> NoReturn:
    """`if __name__ == "__main__": run_main(main)`: main, the ordered teardown, then `os._exit`
    (see the module's docstring) with main's exit code."""
    code = exit_code(main)
    try:
        shutdown()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
