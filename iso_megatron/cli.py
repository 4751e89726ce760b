"""The launchers' shared vocabulary: argument groups, dtype, ISO settings, timing.

Every launcher (`launch/infer.py`, `launch/bench.py`, `launch/infer_hf_deepspeed.py`) builds its
parser from these groups, so one knob has one spelling everywhere: Megatron-LM's names for the
model shape, precision and parallelism (`--num-layers`, `--hidden-size`, `--bf16`,
`--tensor-model-parallel-size`, ...), `--iso-*` for ISO, `--timing-*` for timing. Each launcher
sets its own defaults (`parser.set_defaults`). No framework is imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable, List, Optional

import torch

from .config import DEFAULT_MIN_TOKENS, ISOConfig


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"want a number > 0, got {text!r}")
    return value


def add_shape_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Model shape, precision and tensor parallelism, with Megatron-LM's names."""
    g = p.add_argument_group("model (Megatron-LM names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="TP size; default: the number of processes (torchrun --nproc-per-node)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int, help="default 4*hidden (swiglu: 8/3*hidden, /64*64)")
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--vocab-size", type=int, help="unpadded vocabulary (default: the tokenizer's)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--distributed-timeout-minutes", type=_positive_float, default=10,
                   help="Megatron-LM's: how long a collective waits for a rank that neither "
                        "answers nor fails before every rank stops with an error naming it")
    return g


def add_iso_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ISO")
    g.add_argument("--iso", dest="iso", action="store_true", default=True,
                   help="intra-sequence overlap in prefill (default on)")
    g.add_argument("--no-iso", dest="iso", action="store_false")
    g.add_argument("--iso-chunks", type=int, default=None,
                   help="chunks per prompt (default 2, or the number of --iso-split fractions)")
    g.add_argument("--iso-split", default="balanced", help="even | balanced | auto | f1,f2,...")
    g.add_argument("--iso-min-tokens", type=int, default=None,
                   help=f"prompts shorter run stock (default {DEFAULT_MIN_TOKENS}; auto: chosen by the cost model)")


def add_timing_args(p: argparse.ArgumentParser, repeats: int = 5, warmup: int = 1) -> None:
    g = p.add_argument_group("timing")
    g.add_argument("--timing-repeats", type=int, default=repeats, help="median of this many timed runs")
    g.add_argument("--timing-warmup", type=int, default=warmup, help="untimed runs first")


def iso_config_from_args(args) -> ISOConfig:
    """ISOConfig from the --iso-* flags (ValueError naming the flag when they don't fit)."""
    split = args.iso_split
    if split not in ("even", "balanced", "auto"):
        try:
            split = tuple(float(f) for f in split.split(","))
        except ValueError:
            raise ValueError(f"--iso-split: expected even, balanced, auto or comma-separated "
                             f"fractions, got {args.iso_split!r}") from None
    try:
        return ISOConfig(num_chunks=args.iso_chunks, split=split, min_tokens=args.iso_min_tokens,
                         enabled=args.iso)
    except ValueError as e:
        raise ValueError(f"--iso-*: {e}") from None


def dtype_from_args(args, default: torch.dtype = torch.float32) -> torch.dtype:
    """--bf16 / --fp16 (Megatron-LM's flags), else `default`."""
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive")
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else default


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 0,
            sync: Optional[Callable[[], None]] = None) -> List[float]:
    """Milliseconds of `repeats` calls of `fn` after `warmup` untimed ones. `sync` runs before
    every clock read (CUDA: synchronise; several ranks: also a barrier)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def spread(times: List[float]) -> float:
    """The repetitions' spread: interquartile range over the median (0 for one repetition)."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(times)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def fixed_malloc() -> bool:
    """glibc: every allocation below 2 GiB from the heap, and freed memory kept there.

    By default glibc maps each block above its dynamic threshold (128 KiB rising to at most
    32 MiB) from the kernel afresh and unmaps it when freed: the next tensor of that size
    faults its pages in again (zeroed by the kernel), a cost per byte that grows with the
    tensor. Stock's prefill makes larger tensors than ISO's chunks (8 layers at 4096 tokens on
    this CPU: 80-196 thousand page faults per prefill for stock, 38-48 thousand for two chunks),
    so stock measured 2-14% above ISO's compute and up to 15% above the cost model at 1-8k
    tokens, varying from run to run with the threshold's history. Fixed, both run page-fault
    free and agree within 2% from 1024 tokens on (docs/costmodel_validation.md). The benchmark and
    scripts/validate_costmodel.py call it on CPU before building the model. Returns whether
    glibc took the setting."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 2 ** 31 - 1)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def write_atomically(path: str, write: Callable[[object], None], binary: bool = False) -> None:
    """`write(f)` into a temporary file beside `path`, flushed to disk, then renamed over it:
    a crash (or an exception in `write`) never leaves a half-written file where a previous good
    one was, and readers see the old file or the new one, whole."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, data) -> None:
    """`data` as indented JSON at `path`, atomically (`write_atomically`)."""
    write_atomically(path, lambda f: json.dump(data, f, indent=1))
