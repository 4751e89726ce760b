"""Process-group lifetime for every entry point: one init, one ordered teardown.

Every launcher (`launch/infer.py`, `launch/bench.py`, `launch/infer_hf_deepspeed.py`) runs
its work inside `distributed(...)`. On the way out, on success and on error alike, Megatron's
parallel state is destroyed first (its groups are sub-groups of the world), then every
torch.distributed group. A rank that leaves with groups still alive lets the interpreter
destroy gloo's communication threads while they run: "terminate called without an active
exception", SIGABRT at exit, after the work itself succeeded (seen on the DeepSpeed-checkpoint
launcher test before this existed).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: str) -> torch.device:
    """torch.distributed up (NCCL on CUDA, gloo on CPU); a plain `python script.py` becomes a
    world of one. Returns this rank's device."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def shutdown() -> None:
    """Destroy Megatron's parallel state (if any), then every torch.distributed group.
    Safe to call more than once, and when nothing was initialised."""
    import sys

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
