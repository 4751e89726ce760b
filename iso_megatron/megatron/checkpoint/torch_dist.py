"""Megatron `torch_dist` checkpoints (dist_checkpointing): the request
`dist_checkpointing.load(model.sharded_state_dict(), dir)` is given, checked first against the
saved metadata and data files so that a mismatch or a damaged file is named; megatron reshards."""

from __future__ import annotations

import os

from .find import CheckpointError, CheckpointInfo, CheckpointNotFoundError, _brief
from .keys import _mismatch, is_ignored_key

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def _dist_request(model, info: CheckpointInfo) -> dict:
    """model.sharded_state_dict() without `_extra_state`, checked against the saved metadata."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    def request():
        return {k: v for k, v in model.sharded_state_dict().items() if not is_ignored_key(k)}

    probe = request()
    apply_factories(probe)
    expected = {}
    for sh in nested_values(probe):
        if isinstance(sh, ShardedTensor):
            expected[sh.key] = tuple(sh.global_shape)
    try:
        saved = dist_checkpointing.load_tensors_metadata(info.directory)
    except Exception as e:
        raise CheckpointError(f"cannot read the torch_dist metadata in {info.directory} (.metadata "
                              f"truncated or corrupt?): {_brief(e)}") from e
    saved = {k: tuple(v.global_shape) for k, v in saved.items()}
    _check_distcp_sizes(info.directory)
    missing = set(expected) - set(saved)
    unexpected = {k for k in saved if k.startswith(_MODEL_PREFIXES)} - set(expected)
    if missing or unexpected:
        raise _mismatch(f"the torch_dist checkpoint in {info.directory}", missing, unexpected,
                        missing, unexpected)
    for key, shape in expected.items():
        if saved[key] != shape:
            raise CheckpointError(f"shape mismatch for {key}: checkpoint {saved[key]}, model {shape} "
                                  "(global shapes; decoder.layers.* stack the layers in dim 0)")
    return request()


def _check_distcp_sizes(directory: str) -> None:
    """Every data file the metadata points into exists and is long enough (names the file)."""
    from torch.distributed.checkpoint import FileSystemReader

    ends = {}
    for item in (FileSystemReader(directory).read_metadata().storage_data or {}).values():
        path = getattr(item, "relative_path", None)
        if path is not None:
            ends[path] = max(ends.get(path, 0), item.offset + item.length)
    for rel, end in sorted(ends.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"torch_dist data file {path} is missing")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"torch_dist data file {path} is truncated: {size} bytes, "
                                  f"the checkpoint metadata needs {end}")


def _dcp_message(error: BaseException) -> str:
    """torch.distributed.checkpoint's CheckpointException: each failing rank's own error."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return f"{type(error).__name__}: {str(error)[:500]}"
    return "; ".join(f"rank {r}: {type(getattr(f, 'exception', f)).__name__}: "
                     f"{str(getattr(f, 'exception', f))[:300]}" for r, f in sorted(failures.items()))
