"""Finding a checkpoint (local, no collectives): which format, which iteration, the saved TP
and pipeline (PP) sizes and the args stored with it; the checkpoint errors and the torch.load of
one file."""

from __future__ import annotations

import os
import re
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Optional

FORMATS = ("torch", "torch_dist", "deepspeed")
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_TRACKER = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model; the message names the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory, tracker target or a shard file does not exist."""


@dataclass
class CheckpointInfo:
    format: str                      # "torch" | "torch_dist" | "deepspeed"
    directory: str                   # the directory holding this iteration's files
    load_dir: str                    # what the user passed
    iteration: Optional[int] = None  # None for `release` and non-numeric DeepSpeed tags
    tag: Optional[str] = None        # "iter_0000010", "release", or the DeepSpeed tag
    tp: Optional[int] = None         # saved TP size (torch_dist: from args, if stored)
    pp: int = 1                      # saved pipeline size (torch: its mp_rank_XX_YYY stages)
    args: Optional[Namespace] = None  # Megatron-LM args stored with the checkpoint
    checkpoint_version: Optional[float] = None
    files: list = field(default_factory=list)  # every shard file, stage by stage (torch, deepspeed)
    # [saved pipeline stage][saved TP rank] -> shard file: Megatron-LM's mp_rank_{tp:02d}_{pp:03d}
    # (or mp_rank_{tp:02d} at PP 1, one stage); DeepSpeed: one stage
    stage_files: list = field(default_factory=list)
    # torch_dist: the file (relative to `directory`) its common state (args, iteration) was read
    # from: "common.pt" as megatron-core 0.16 writes it, or the .distcp file holding the
    # `common_state` entry, as megatron-core 0.19 writes it (no common.pt); None for other formats
    common_state: Optional[str] = None
    common: Optional[dict] = field(default=None, repr=False)  # torch_dist: that common state
    # the user trusts the checkpoint: its pickles are unpickled fully (unpickle.py), not allowlisted
    trust_checkpoint: bool = False


def _brief(error: BaseException) -> str:
    """`Type: first sentence` of an exception from torch/pickle (their messages run long)."""
    text = re.split(r"(?<=[.!?])\s", str(error).strip(), maxsplit=1)[0]
    return f"{type(error).__name__}: {text[:200]}"


def _ranked(directory: str, pattern: str) -> dict:
    """{rank: name} of the entries of `directory` matching `pattern` (one group: the rank)."""
    out = {}
    for name in os.listdir(directory):
        m = re.fullmatch(pattern, name)
        if m:
            out[int(m.group(1))] = name
    return out


def _detect_format(directory: str) -> Optional[str]:
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        return None
    if os.path.exists(os.path.join(directory, "metadata.json")):
        if not dist_checkpointing.check_is_distributed_checkpoint(directory):
            raise CheckpointError(f"{os.path.join(directory, 'metadata.json')} is not a valid "
                                  "dist_checkpointing metadata file (corrupt?)")
        return "torch_dist"
    names = os.listdir(directory)
    if any(re.fullmatch(r"mp_rank_\d\d_\d\d\d_\d\d\d", n) for n in names):
        raise CheckpointError(f"{directory} holds an expert-parallel torch checkpoint "
                              "(mp_rank_XX_YYY_ZZZ): not supported")
    if any(re.fullmatch(r"mp_rank_\d\d(_\d\d\d)?", n) for n in names):
        return "torch"
    if any(re.fullmatch(r"mp_rank_\d\d_model_states\.pt", n) for n in names):
        return "deepspeed"
    if any(re.fullmatch(r"layer_\d+-model_\d\d-model_states\.pt", n) for n in names):
        raise CheckpointError(f"{directory} holds a DeepSpeed pipeline-module checkpoint "
                              "(layer_XX-model_YY-model_states.pt): not supported")
    return None


def _read_tracker(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise CheckpointError(f"cannot read tracker file {path}: {e}") from e
    if not text:
        raise CheckpointError(f"tracker file {path} is empty")
    return text


def _megatron_target(load_dir: str):
    """(directory, iteration, tag) named by latest_checkpointed_iteration.txt."""
    tracker = os.path.join(load_dir, MEGATRON_TRACKER)
    text = _read_tracker(tracker)
    if text == "release":
        return os.path.join(load_dir, "release"), None, "release"
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"tracker file {tracker} holds {text[:40]!r}: expected an iteration "
                              "number or 'release'") from None
    tag = f"iter_{iteration:07d}"
    return os.path.join(load_dir, tag), iteration, tag


def _deepspeed_target(load_dir: str):
    tracker = os.path.join(load_dir, DEEPSPEED_TRACKER)
    tag = _read_tracker(tracker)
    if "/" in tag or "\n" in tag:
        raise CheckpointError(f"tracker file {tracker} holds {tag[:40]!r}: expected a tag name")
    m = re.search(r"(\d+)$", tag)
    return os.path.join(load_dir, tag), (int(m.group(1)) if m else None), tag


def _stage_files(directory: str, fmt: str) -> list:
    """[saved pipeline stage][saved TP rank] -> shard file, checked complete."""
    if fmt != "torch":
        ranks = _ranked(directory, r"mp_rank_(\d\d)_model_states\.pt")
        return [_complete_tp(directory, {r: os.path.join(directory, n) for r, n in ranks.items()})]
    grid, pipelined = {}, set()
    for name in os.listdir(directory):
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?", name)
        if m:
            pipelined.add(m.group(2) is not None)
            stage = int(m.group(2) or 0)
            grid.setdefault(stage, {})[int(m.group(1))] = os.path.join(directory, name, "model_optim_rng.pt")
    if len(pipelined) > 1:
        raise CheckpointError(f"{directory} mixes mp_rank_XX and mp_rank_XX_YYY shard directories "
                              "(two checkpoints in one directory?)")
    if not pipelined.pop():
        return [_complete_tp(directory, grid[0])]
    what = (f"the pipeline-parallel torch checkpoint in {directory} (mp_rank_XX_YYY: TP rank XX, "
            "pipeline stage YYY)")
    if sorted(grid) != list(range(len(grid))):
        raise CheckpointError(f"{what} is incomplete: pipeline stages {sorted(grid)} are not "
                              f"0..{len(grid) - 1}")
    tps = {stage: sorted(ranks) for stage, ranks in grid.items()}
    if any(t != tps[0] or t != list(range(len(t))) for t in tps.values()):
        raise CheckpointError(f"{what} is incomplete: its stages hold TP ranks "
                              + ", ".join(f"{s}: {t}" for s, t in sorted(tps.items())))
    for stage in sorted(grid):
        for path in grid[stage].values():
            if not os.path.isfile(path):
                raise CheckpointError(f"{what} is incomplete: {path} is missing")
    return [[grid[stage][r] for r in range(len(tps[0]))] for stage in range(len(grid))]


def _complete_tp(directory: str, files: dict) -> list:
    """Shard files of saved TP ranks 0..T-1 ({rank: path}), checked present."""
    if sorted(files) != list(range(len(files))):
        raise CheckpointError(f"{directory}: TP shards {sorted(files)} are not 0..{len(files) - 1} "
                              "(incomplete checkpoint?)")
    for path in files.values():
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"checkpoint shard file {path} is missing")
    return [files[r] for r in range(len(files))]


def _torch_load(path: str, trust_checkpoint: bool = False) -> dict:
    """torch.load of a Megatron/DeepSpeed checkpoint file, allowlisted unless trusted
    (unpickle.torch_load_file)."""
    from .unpickle import torch_load_file

    return torch_load_file(path, trust_checkpoint)


def find_checkpoint(load_dir: str, ckpt_format: str = "auto",
                    trust_checkpoint: bool = False) -> CheckpointInfo:
    """The checkpoint that `load_dir` names (Megatron tracker, DeepSpeed `latest`, or the
    iteration directory itself), its format, saved TP and stored args. Local: no collectives.
    Its pickles are read with an allowlist of the types checkpoints hold (unpickle.py); only
    `trust_checkpoint=True` unpickles them fully, which runs any code they name."""
    if ckpt_format not in ("auto",) + FORMATS:
        raise CheckpointError(f"unknown checkpoint format {ckpt_format!r}: choose auto, "
                              + ", ".join(FORMATS))
    if not load_dir or not os.path.isdir(load_dir):
        raise CheckpointNotFoundError(f"checkpoint directory {load_dir!r} does not exist")
    load_dir = os.path.abspath(load_dir)
    trackers = []  # (directory, iteration, tag, tracker file)
    if os.path.isfile(os.path.join(load_dir, MEGATRON_TRACKER)):
        trackers.append(_megatron_target(load_dir) + (MEGATRON_TRACKER,))
    if os.path.isfile(os.path.join(load_dir, DEEPSPEED_TRACKER)):
        trackers.append(_deepspeed_target(load_dir) + (DEEPSPEED_TRACKER,))
    if ckpt_format == "deepspeed":  # Megatron-DeepSpeed writes both trackers
        trackers.sort(key=lambda c: c[3] != DEEPSPEED_TRACKER)

    found = None
    for directory, iteration, tag, _ in trackers:
        fmt = _detect_format(directory)
        if fmt is not None:
            found = (directory, iteration, tag, fmt)
            break
    if found is None and trackers:
        directory, _, tag, tracker = trackers[0]
        raise CheckpointNotFoundError(
            f"{os.path.join(load_dir, tracker)} names {tag!r}, but {directory} "
            + ("does not exist" if not os.path.isdir(directory) else "holds no checkpoint files"))
    if found is None:  # the iteration directory itself
        fmt = _detect_format(load_dir)
        if fmt is not None:
            tag = os.path.basename(load_dir)
            m = re.fullmatch(r"(?:iter_|global_step)(\d+)", tag)
            found = (load_dir, int(m.group(1)) if m else None, tag, fmt)
    if found is None:
        iters = sorted(n for n in os.listdir(load_dir) if re.fullmatch(r"iter_\d{7}|release", n))
        hint = f" (found {', '.join(iters[-3:])} but no tracker file: pass that directory)" if iters else ""
        raise CheckpointNotFoundError(
            f"no checkpoint found in {load_dir}: looked for {MEGATRON_TRACKER} (Megatron), "
            f"'{DEEPSPEED_TRACKER}' (DeepSpeed), or checkpoint files in the directory itself "
            "(metadata.json of torch_dist, mp_rank_XX/model_optim_rng.pt, "
            f"mp_rank_XX_model_states.pt){hint}")
    directory, iteration, tag, fmt = found
    if ckpt_format not in ("auto", fmt):
        raise CheckpointError(f"--ckpt-format {ckpt_format} was asked for, but {directory} holds a "
                              f"{fmt} checkpoint")
    info = CheckpointInfo(format=fmt, directory=directory, load_dir=load_dir, iteration=iteration,
                          tag=tag, trust_checkpoint=trust_checkpoint)
    if fmt == "torch_dist":  # common state: common.pt (mcore 0.16) or inside the .distcp (0.19)
        from .torch_dist import read_common_state

        common, info.common_state = read_common_state(directory, trust_checkpoint)
        info.common = common
        info.args = common.get("args")
        info.checkpoint_version = common.get("checkpoint_version")
        info.tp = getattr(info.args, "tensor_model_parallel_size", None)
        info.pp = getattr(info.args, "pipeline_model_parallel_size", None) or 1
        if info.iteration is None and isinstance(common.get("iteration"), int) and tag != "release":
            info.iteration = common["iteration"]
    else:
        info.stage_files = _stage_files(directory, fmt)
        info.files = [path for stage in info.stage_files for path in stage]
        info.tp, info.pp = len(info.stage_files[0]), len(info.stage_files)
        first = _torch_load(info.files[0], trust_checkpoint)
        info.args = first.get("args")
        info.checkpoint_version = first.get("checkpoint_version")
        if fmt == "deepspeed" and first.get("mp_world_size") not in (None, info.tp):
            raise CheckpointError(f"{directory}: DeepSpeed saved mp_world_size="
                                  f"{first['mp_world_size']} but {info.tp} shard files are present")
    if info.args is not None and not isinstance(info.args, Namespace):
        info.args = Namespace(**info.args) if isinstance(info.args, dict) else None
    saved_tp = getattr(info.args, "tensor_model_parallel_size", None)
    if fmt == "torch" and saved_tp not in (None, info.tp):
        raise CheckpointError(f"{directory}: args say tensor_model_parallel_size={saved_tp} but "
                              f"{info.tp} mp_rank_XX shard directories are present (incomplete?)")
    saved_pp = getattr(info.args, "pipeline_model_parallel_size", None)
    if fmt == "torch" and saved_pp not in (None, info.pp):
        raise CheckpointError(f"{directory}: args say pipeline_model_parallel_size={saved_pp} but "
                              f"{info.pp} pipeline stage{'s' if info.pp > 1 else ''} of shard "
                              "directories (mp_rank_XX_YYY) are present: the stored pipeline "
                              "layout does not match the files")
    return info
