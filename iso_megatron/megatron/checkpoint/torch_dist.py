"""Megatron `torch_dist` checkpoints (dist_checkpointing): the request
`dist_checkpointing.load(model.sharded_state_dict(), dir)` is given, checked first against the
saved metadata and data files so that a mismatch or a damaged file is named; megatron reshards.

Two layouts of the common (non-tensor) state — the Megatron `args`, `iteration`,
`checkpoint_version` — are read, whichever megatron-core is installed:
- `common.pt` beside the `.distcp` files: what megatron-core 0.16 (and earlier) writes;
- inside the `.distcp` files, as the `common_state` entry (a ShardedObject written by rank 0), with
  no `common.pt`: what megatron-core 0.19 writes (Megatron-LM PR #5160). Its metadata.json also
  drops `common_backend`.
0.19's `dist_checkpointing.load` reads both layouts itself; 0.16's reads common.pt only, so there
the common state read here is handed to it (`compat.dist_load_reads_common_from_distcp`).
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Optional, Tuple

import torch

from .find import CheckpointError, CheckpointInfo, CheckpointNotFoundError, _brief, _torch_load
from .keys import _mismatch, is_ignored_key
from .unpickle import (UnsafeCheckpointError, _weights_only_detail, allowlisted_dcp_reads,
                       dcp_reader, keep_bytes_planner, read_dcp_metadata, torch_load)

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
COMMON_PT = "common.pt"            # megatron-core 0.16's file for the common state
COMMON_STATE_KEY = "common_state"  # megatron-core 0.19's entry for it in the .distcp files
DCP_METADATA = ".metadata"         # torch.distributed.checkpoint's index of the .distcp files


def _dcp_metadata(directory: str, trust_checkpoint: bool = False):
    """torch.distributed.checkpoint's Metadata (.metadata: keys, shapes, file offsets), read with
    torch.distributed.checkpoint's own metadata classes allowed only (unpickle.py)."""
    path = os.path.join(directory, DCP_METADATA)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"torch_dist metadata file {path} is missing (incomplete "
                                      "checkpoint?)")
    try:
        return read_dcp_metadata(directory, trust_checkpoint)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a pickle: anything can go wrong
        raise CheckpointError(f"cannot read the torch_dist metadata file {path} (truncated or "
                              f"corrupt?): {_brief(e)}") from e


def _common_state_entry(metadata) -> Optional[Tuple[str, object]]:
    """(key, storage info) of 0.19's `common_state` entry in the .distcp files, or None."""
    for index, item in (metadata.storage_data or {}).items():
        if index.fqn.split("/")[0] == COMMON_STATE_KEY:
            return index.fqn, item
    return None


def read_common_state(directory: str, trust_checkpoint: bool = False) -> Tuple[dict, str]:
    """(the common state dict, the file it was read from, relative to `directory`) of the
    torch_dist checkpoint in `directory`: `common.pt` (megatron-core 0.16's layout) or the .distcp
    file holding its `common_state` entry (0.19's). Local: no collectives. Its pickle is read with
    an allowlist (unpickle.py) unless `trust_checkpoint`."""
    path = os.path.join(directory, COMMON_PT)
    if os.path.exists(path):
        try:
            return _torch_load(path, trust_checkpoint), COMMON_PT
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            detail = _brief(e.__cause__) if e.__cause__ is not None else str(e)
            raise CheckpointError(f"cannot read the torch_dist common state file {path} (Megatron "
                                  f"args, iteration; truncated or corrupt?): {detail}") from e
    metadata = _dcp_metadata(directory, trust_checkpoint)
    entry = _common_state_entry(metadata)
    if entry is None:
        raise CheckpointError(
            f"the torch_dist checkpoint in {directory} holds no common state (Megatron args, "
            f"iteration): neither {COMMON_PT} (as megatron-core 0.16 writes it) nor a "
            f"'{COMMON_STATE_KEY}' entry in its .distcp files (as megatron-core 0.19 writes it); "
            "incomplete checkpoint?")
    key, item = entry
    holder = os.path.join(directory, item.relative_path)
    _check_distcp_sizes(directory, metadata, holder=item.relative_path)  # truncated: named
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    where = (f"the torch_dist common state (Megatron args, iteration: the '{COMMON_STATE_KEY}' "
             f"entry, bytes {item.offset}..{item.offset + item.length}) in {holder}")
    state = {key: io.BytesIO()}
    try:  # as megatron-core 0.19's load_common_state_dict: this process alone, no collectives;
        # the entry's bytes are kept (torch's DefaultLoadPlanner would unpickle them fully)
        dcp.load(state, storage_reader=dcp_reader(directory, trust_checkpoint),
                 planner=keep_bytes_planner(), no_dist=True)
        value = state[key]
        value.seek(0)
        value = torch_load(value, where, trust_checkpoint)  # torch.save([state]) of rank 0
    except UnsafeCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException  # noqa: BLE001
        detail = (_dcp_message(e) if isinstance(e, CheckpointException) else
                  _weights_only_detail(e) if isinstance(e, pickle.UnpicklingError) else _brief(e))
        raise CheckpointError(f"cannot read {where} (corrupt?): {detail}") from e
    if isinstance(value, (list, tuple)) and len(value) == 1:  # a ShardedObject's data: [state]
        value = value[0]
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} holds a {type(value).__name__}, not a dict (corrupt?)")
    return value, item.relative_path


def _other_stages(model, key: str) -> bool:
    """A key a pipeline stage does not hold: the embedding before the first stage's layers, the
    final norm and output layer after the last stage's (the layers are one global tensor)."""
    if not getattr(model, "pre_process", True) and key.startswith("embedding."):
        return True
    return not getattr(model, "post_process", True) and key.startswith(("decoder.final_layernorm", "output_layer"))


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
    metadata = _dcp_metadata(info.directory, info.trust_checkpoint)
    try:  # megatron-core reads .metadata itself: through the allowlist (unpickle.py)
        with allowlisted_dcp_reads(info.trust_checkpoint):
            saved = dist_checkpointing.load_tensors_metadata(info.directory)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the torch_dist metadata in {info.directory} (.metadata "
                              f"truncated or corrupt?): {_brief(e)}") from e
    saved = {k: tuple(v.global_shape) for k, v in saved.items()}
    _check_distcp_sizes(info.directory, metadata)
    missing = set(expected) - set(saved)
    unexpected = {k for k in saved if k.startswith(_MODEL_PREFIXES) and not _other_stages(model, k)} - set(expected)
    if missing or unexpected:
        raise _mismatch(f"the torch_dist checkpoint in {info.directory}", missing, unexpected,
                        missing, unexpected)
    for key, shape in expected.items():
        if saved[key] != shape:
            raise CheckpointError(f"shape mismatch for {key}: checkpoint {saved[key]}, model {shape} "
                                  "(global shapes; decoder.layers.* stack the layers in dim 0)")
    return request()


def _check_distcp_sizes(directory: str, metadata, holder: Optional[str] = None) -> None:
    """Every data file the metadata points into exists and is long enough (names the file;
    `holder`, the one holding the common state, is said to hold it)."""
    ends = {}
    for item in (metadata.storage_data or {}).values():
        path = getattr(item, "relative_path", None)
        if path is not None:
            ends[path] = max(ends.get(path, 0), item.offset + item.length)
    for rel, end in sorted(ends.items()):
        path = os.path.join(directory, rel)
        what = f"torch_dist data file {path}" + (
            " (holding the common state: Megatron args, iteration)" if rel == holder else "")
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"{what} is missing")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"{what} is truncated: {size} bytes, the checkpoint metadata "
                                  f"needs {end}")


def find_corrupt_distcp(directory: str, trust_checkpoint: bool = False) -> Optional[str]:
    """After a failed read: which .distcp file holds an unreadable tensor, said in a sentence
    (None when every tensor entry reads). Each tensor entry is a torch.save of its own."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = _dcp_metadata(directory, trust_checkpoint)
    except CheckpointError as e:
        return str(e)
    by_file = {}
    for index, item in (metadata.storage_data or {}).items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata) \
                and not getattr(item, "transform_descriptors", None):
            by_file.setdefault(item.relative_path, []).append((item.offset, item.length, index.fqn))
    for rel, items in sorted(by_file.items()):
        path = os.path.join(directory, rel)
        try:
            with open(path, "rb") as f:
                for offset, length, fqn in sorted(items):
                    f.seek(offset)
                    data = f.read(length)
                    try:
                        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                    except Exception as e:  # noqa: BLE001
                        return (f"torch_dist data file {path} is corrupt: its entry for {fqn} "
                                f"(bytes {offset}..{offset + length}) cannot be read: {_brief(e)}")
        except OSError as e:
            return f"cannot read torch_dist data file {path}: {e}"
    return None


def _dcp_message(error: BaseException) -> str:
    """torch.distributed.checkpoint's CheckpointException: each failing rank's own error (its
    failures are exceptions, or (exception, traceback) pairs, by torch version)."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return f"{type(error).__name__}: {str(error)[:500]}"

    def one(f):
        f = getattr(f, "exception", f)
        if isinstance(f, tuple) and f and isinstance(f[0], BaseException):
            f = f[0]
        return _brief(f) if isinstance(f, BaseException) else str(f)[:300]

    return "; ".join(f"rank {r}: {one(f)}" for r, f in sorted(failures.items()))
