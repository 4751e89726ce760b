"""Resharding Megatron `torch` / DeepSpeed shards to the current TP size: each rank reads the
saved shards that overlap its own slice and merges/splits every TP-parallel tensor along its
partition dimension.

Layouts assumed (megatron-core's, which Megatron-DeepSpeed shares for checkpoint_version >= 2):
linear_qkv rows are per query group [q heads of the group; k; v] and a TP rank holds a contiguous
1/TP of them (a run of whole groups when TP divides the number of groups), so TP resharding is
plain chunking along dim 0. Gated linear_fc1 holds [gate_r; up_r] per rank (stride 2).
Vocab-parallel embedding/output rows are contiguous per rank. checkpoint_version 0 / 1.0 (legacy
per-rank [3, np, hn] / [np, hn, 3] qkv) is reordered as Megatron-LM's
`fix_query_key_value_ordering` does (multi-head attention only).
"""

from __future__ import annotations

import re

import torch

from .find import CheckpointError, CheckpointInfo, _torch_load
from .keys import _LEGACY_QKV, _canonical_state, _mismatch, _sample, canonical_name, is_ignored_key
from .stored_args import _args_dict, _heads_and_groups

_PARTITION_DIM = {  # canonical suffix -> dim, for params without megatron's TP attributes (TE)
    "embedding.word_embeddings.weight": 0, "output_layer.weight": 0, "output_layer.bias": 0,
    "self_attention.linear_qkv.weight": 0, "self_attention.linear_qkv.bias": 0,
    "mlp.linear_fc1.weight": 0, "mlp.linear_fc1.bias": 0,
    "self_attention.linear_proj.weight": 1, "mlp.linear_fc2.weight": 1,
}


def _partitioning(name: str, param, config):
    """(partition dim, stride) of a TP-parallel tensor, or None when it is replicated."""
    canon = canonical_name(name)
    if param is not None and hasattr(param, "tensor_model_parallel"):
        if not param.tensor_model_parallel:
            return None
        dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    else:
        dim = next((d for s, d in _PARTITION_DIM.items() if canon.endswith(s)), None)
        if dim is None:
            return None
        stride = 1
    if canon.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")) and \
            getattr(config, "gated_linear_unit", False):
        stride = 2  # [gate_r; up_r] per rank, whatever the attribute says (older mcore: 1)
    return dim, stride


def _needed_ranks(saved_tp: int, tp: int, rank: int) -> range:
    """Saved TP ranks whose slices overlap TP rank `rank`'s slice at size `tp`."""
    return range((rank * saved_tp) // tp, -(-((rank + 1) * saved_tp) // tp))


def _reshard(pieces: dict, saved_tp: int, tp: int, rank: int, dim: int, stride: int):
    """This rank's slice at TP `tp` from saved TP shards `pieces` ({saved rank: tensor})."""
    first = min(pieces)
    per_saved = pieces[first].size(dim) // stride
    per_new = per_saved * saved_tp // tp
    blocks = []
    for b in range(stride):
        span = torch.cat([pieces[q].chunk(stride, dim)[b] for q in sorted(pieces)], dim)
        blocks.append(span.narrow(dim, rank * per_new - first * per_saved, per_new))
    return torch.cat(blocks, dim) if stride > 1 else blocks[0]


def _fix_legacy_qkv(t, version: float, heads_per_rank: int):
    """checkpoint_version 0: [3, np, hn] rows per rank, 1.0: [np, hn, 3]; mcore: [np, 3, hn]."""
    shape = t.shape
    if version == 0:
        t = t.reshape(3, heads_per_rank, -1, *shape[1:]).transpose(0, 1)
    else:
        t = t.reshape(heads_per_rank, -1, 3, *shape[1:]).transpose(1, 2)
    return t.reshape(shape)


def _resharded_state_dict(model, info: CheckpointInfo, tp: int, rank: int) -> dict:
    """This rank's state dict for `model` (its own key names) from torch/DeepSpeed shards."""
    saved_tp = len(info.files)
    config = model.config
    model_sd = model.state_dict()
    params = dict(model.named_parameters())
    target = {canonical_name(k): k for k in model_sd if not is_ignored_key(k)}
    container = "model" if info.format == "torch" else "module"

    shards = {}
    for q in _needed_ranks(saved_tp, tp, rank):
        state = _torch_load(info.files[q], info.trust_checkpoint)
        if container not in state:
            other = [k for k in state if re.fullmatch(r"model\d+", str(k))]
            why = " (virtual-pipeline checkpoint: not supported)" if other else ""
            raise CheckpointError(f"{info.files[q]} has no {container!r} entry{why}; "
                                  f"top-level keys: {_sample(map(str, state))}")
        shards[q] = _canonical_state(state[container], info.files[q])

    first = shards[min(shards)]
    if not first and info.format == "deepspeed":
        raise CheckpointError(f"{info.files[min(shards)]} holds no module weights (a ZeRO stage 3 "
                              "checkpoint? consolidate it with DeepSpeed's zero_to_fp32.py first)")
    missing = set(target) - set(first)
    unexpected = set(first) - set(target)
    if missing or unexpected:
        raise _mismatch(f"{info.files[min(shards)]}", missing, unexpected,
                        [target[k] for k in missing], [first[k][1] for k in unexpected])
    for q, shard in shards.items():
        if set(shard) != set(first):
            raise CheckpointError(f"{info.files[q]} holds different keys than "
                                  f"{info.files[min(shards)]}: {_sample(set(shard) ^ set(first))}")

    version = info.checkpoint_version
    if version is None:
        version = 0 if info.format == "torch" else 3.0  # Megatron-LM's default for torch files
    stored = _args_dict(info.args) or {}
    heads = stored.get("num_attention_heads") or config.num_attention_heads

    out = {}
    for canon, key in target.items():
        pieces = {q: shard[canon][0] for q, shard in shards.items()}
        if version < 2.0 and any(p in first[canon][1] for p in _LEGACY_QKV):
            groups = _heads_and_groups(stored)[1] if stored else config.num_query_groups
            if groups not in (None, heads):
                raise CheckpointError(f"{key}: checkpoint_version {version} qkv layout with "
                                      "grouped-query attention is not supported")
            pieces = {q: _fix_legacy_qkv(t, version, heads // saved_tp) for q, t in pieces.items()}
        want = model_sd[key]
        part = _partitioning(key, params.get(key), config)
        got = pieces[min(pieces)]
        if part is None:
            if tuple(got.shape) != tuple(want.shape):
                raise CheckpointError(f"shape mismatch for {key}: checkpoint {tuple(got.shape)}, "
                                      f"model {tuple(want.shape)}")
            out[key] = got
            continue
        dim, stride = part
        saved_full = list(got.shape)
        saved_full[dim] *= saved_tp
        model_full = list(want.shape)
        model_full[dim] *= tp
        if saved_full != model_full or got.dim() != want.dim():
            hint = ""
            if canon in ("embedding.word_embeddings.weight", "output_layer.weight"):
                hint = " (padded vocabulary size differs: build the model with the saved padded_vocab_size)"
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint {tuple(saved_full)} (saved at TP {saved_tp}, "
                f"{tuple(got.shape)} per rank), model {tuple(model_full)} (TP {tp}, "
                f"{tuple(want.shape)} per rank){hint}")
        if got.size(dim) % stride or (got.size(dim) // stride * saved_tp) % tp:
            raise CheckpointError(f"{key}: {tuple(saved_full)} saved at TP {saved_tp} cannot be "
                                  f"resharded to TP {tp} (partition dim {dim}, stride {stride})")
        for q, t in pieces.items():
            if tuple(t.shape) != tuple(got.shape):
                raise CheckpointError(f"shape mismatch for {key}: {info.files[q]} has "
                                      f"{tuple(t.shape)}, {info.files[min(pieces)]} {tuple(got.shape)}")
        out[key] = _reshard(pieces, saved_tp, tp, rank, dim, stride)
    return out
