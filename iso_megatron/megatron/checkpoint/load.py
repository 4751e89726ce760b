"""`load_checkpoint`: collective over the world, every rank calls it. Each rank finds the
checkpoint, checks it against its model and loads its own slice; after each local step the
ranks all-reduce a failure flag (gloo) and, on failure, all raise the failing rank's message."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .find import CheckpointError, CheckpointInfo, CheckpointNotFoundError, find_checkpoint
from .keys import _sample, is_ignored_key
from .reshard import _resharded_state_dict
from .stored_args import _args_dict, _check_config, check_tp
from .torch_dist import _dcp_message, _dist_request, find_corrupt_distcp
from .unpickle import UnsafeCheckpointError, allowlisted_dcp_reads

# ---------------------------------------------------------------------------------------------
# Every rank agrees
# ---------------------------------------------------------------------------------------------

_gloo_group = None
_ERRORS = {"not_found": CheckpointNotFoundError, "error": CheckpointError,
           "unsafe": UnsafeCheckpointError}


def _agreement_group():
    global _gloo_group
    if dist.get_backend() == "gloo":
        return None
    if _gloo_group is None:
        _gloo_group = dist.new_group(backend="gloo")
    return _gloo_group


def _describe(error: BaseException):
    if isinstance(error, UnsafeCheckpointError):
        return "unsafe", str(error)
    if isinstance(error, CheckpointNotFoundError) or (
            isinstance(error, FileNotFoundError) and not isinstance(error, CheckpointError)):
        return "not_found", str(error)
    if isinstance(error, CheckpointError):
        return "error", str(error)
    return "error", f"{type(error).__name__}: {error}"


def _agree(error: Optional[BaseException]) -> None:
    """Collective over the world: raise on every rank when any rank failed, with its message."""
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            kind, msg = _describe(error)
            raise _ERRORS[kind](msg) from error
        return
    group = _agreement_group()
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    dist.all_reduce(flag, group=group)
    if int(flag.item()) == 0:
        return
    reports = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, None if error is None else _describe(error), group=group)
    failed = [r for r, x in enumerate(reports) if x is not None]
    kind, msg = reports[failed[0]]
    where = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {', '.join(map(str, failed))}"
    raise _ERRORS[kind](f"{msg} [checkpoint load failed on {where}]") from error


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _load_into(model, state: dict, where: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_ignored_key(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where}: loading into the model left missing keys "
                              f"{_sample(missing)}, unexpected keys {_sample(result.unexpected_keys)}")


@contextlib.contextmanager
def _preloaded_common_state(info: CheckpointInfo):
    """dist_checkpointing.load with the common state find_checkpoint already read (allowlisted,
    from either layout), yielding load's keywords. megatron-core 0.16's default strategy reads
    common.pt only, so it is handed over as `common_strategy`; 0.19's `load` has no such keyword
    and reads it itself (the .distcp entry through torch's DefaultLoadPlanner, which unpickles it
    with weights_only=False), so its `load_common_state_dict` returns this one meanwhile."""
    from megatron.core.dist_checkpointing import serialization

    from ..compat import dist_load_reads_common_from_distcp

    common = info.common
    if not dist_load_reads_common_from_distcp():
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

        class PreloadedCommon(TorchCommonLoadStrategy):
            def load_common(self, checkpoint_dir):
                return dict(common)

        yield {"common_strategy": PreloadedCommon()}
        return
    saved = serialization.load_common_state_dict
    serialization.load_common_state_dict = lambda checkpoint_dir: dict(common)
    try:
        yield {}
    finally:
        serialization.load_common_state_dict = saved


def load_checkpoint(model, load_dir: str, ckpt_format: str = "auto",
                    trust_checkpoint: bool = False) -> CheckpointInfo:
    """Load the checkpoint in `load_dir` into a built megatron-core GPTModel (stock or ISO;
    DDP/Float16Module/DeepSpeed wrappers are unwrapped via `.module`) at the current
    tensor-parallel size of megatron's parallel_state, whatever TP it was saved at.

    Its pickles are read with an allowlist of the types Megatron/DeepSpeed checkpoints hold
    (unpickle.py): anything else raises UnsafeCheckpointError. `trust_checkpoint=True` unpickles
    them fully, as Megatron-LM does, which runs any code they name: only for trusted checkpoints.

    Collective: call on every rank of the world. Raises CheckpointError / CheckpointNotFoundError
    on every rank if any rank fails, before any rank goes on to the next collective step."""
    from megatron.core import parallel_state

    while hasattr(model, "module"):
        model = model.module
    tp, rank = 1, 0
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()

    info, request, error = None, None, None
    try:
        info = find_checkpoint(load_dir, ckpt_format, trust_checkpoint)
        check_tp(_args_dict(info.args), tp, f"the checkpoint in {info.directory}")
        if info.format == "torch_dist":
            request = _dist_request(model, info)
            _check_config(info, model.config)
        else:  # torch / DeepSpeed shards saved at any (TP, PP): this rank's part, resharded
            _check_config(info, model.config)
            state = _resharded_state_dict(model, info, tp, rank)
            _load_into(model, state, info.directory)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every failure must reach all ranks
        error = e
    _agree(error)

    if info.format == "torch_dist":
        from megatron.core import dist_checkpointing

        error = None
        try:  # megatron-core reads .metadata (and any bytes entry) itself: allowlisted
            with allowlisted_dcp_reads(info.trust_checkpoint), \
                    _preloaded_common_state(info) as common_kw:
                loaded = dist_checkpointing.load(request, info.directory, **common_kw)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException  # noqa: BLE001
            corrupt = find_corrupt_distcp(info.directory, info.trust_checkpoint)  # which file
            error = CheckpointError(f"reading the torch_dist checkpoint in {info.directory} failed"
                                    + (f": {corrupt} ({_dcp_message(e)})" if corrupt else
                                       f" (corrupt file?): {_dcp_message(e)}"))
        if error is None:
            try:  # dist_checkpointing.load also returns the common state (args, iteration, ...)
                _load_into(model, {k: v for k, v in loaded.items() if k in request}, info.directory)
            except Exception as e:  # noqa: BLE001
                error = e
        _agree(error)
    return info
