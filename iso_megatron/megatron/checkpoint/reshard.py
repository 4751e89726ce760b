"""Resharding Megatron `torch` / DeepSpeed shards to the current (TP, PP): each rank reads the
saved pipeline stages that hold its layers (Megatron-LM's mp_rank_XX_YYY: each stage numbers its
layers from 0; megatron-core's get_transformer_layer_offset over the stored args says where they
sit in the model), only the saved TP shards that overlap its own slice, and merges/splits every
TP-parallel tensor along its partition dimension. Tied embeddings: the last stage's output layer
is the word embeddings (the saved last stage's copy, else the first stage's embedding).

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


def _stage_layout(info: CheckpointInfo, config) -> list:
    """[(first global layer, number of layers)] of each saved pipeline stage, from the stored
    args by megatron-core's own `get_transformer_layer_offset` (uneven first/last stages and the
    embedding/loss accounting as Megatron-LM stores them)."""
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    stored = vars(info.args) if info.args is not None else {}
    num_layers = stored.get("num_layers") or config.num_layers
    if info.pp == 1:
        return [(0, num_layers)]
    where = f"the pipeline-parallel checkpoint in {info.directory}"
    if stored.get("pipeline_model_parallel_layout"):
        raise CheckpointError(f"{where} was saved with --pipeline-model-parallel-layout: not supported")
    if (stored.get("virtual_pipeline_model_parallel_size") or 1) > 1:
        raise CheckpointError(f"{where} was saved with virtual pipeline stages: not supported")
    saved = SimpleNamespace(  # the TransformerConfig fields the offset reads, at the saved PP
        num_layers=num_layers, pipeline_model_parallel_size=info.pp,
        pipeline_model_parallel_layout=None, virtual_pipeline_model_parallel_size=None,
        num_layers_in_first_pipeline_stage=stored.get("decoder_first_pipeline_num_layers"),
        num_layers_in_last_pipeline_stage=stored.get("decoder_last_pipeline_num_layers"),
        account_for_embedding_in_pipeline_split=bool(stored.get("account_for_embedding_in_pipeline_split")),
        account_for_loss_in_pipeline_split=bool(stored.get("account_for_loss_in_pipeline_split")))
    starts = [get_transformer_layer_offset(saved, pp_rank=p) for p in range(info.pp)] + [num_layers]
    layout = [(starts[p], starts[p + 1] - starts[p]) for p in range(info.pp)]
    if any(n < 0 for _, n in layout):
        raise CheckpointError(f"{where}: its stored args (num_layers={num_layers}, "
                              f"{_layout_args(stored)}) give stages of {[n for _, n in layout]} layers")
    return layout


def _layout_args(stored: dict) -> str:
    names = ("pipeline_model_parallel_size", "decoder_first_pipeline_num_layers",
             "decoder_last_pipeline_num_layers")
    return ", ".join(f"{n}={stored[n]}" for n in names if stored.get(n) is not None) or "no layout args"


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


def _model_names(model) -> dict:
    """{canonical name with GLOBAL layer numbers: the model's own key}: a stage's layers are
    numbered from 0 in its state dict; megatron-core's `layer_number` is the global one (1-based)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    out = {}
    for key in model.state_dict():
        if is_ignored_key(key):
            continue
        canon = canonical_name(key)
        m = _LAYER.fullmatch(canon)
        if m and layers is not None:
            canon = f"decoder.layers.{layers[int(m.group(1))].layer_number - 1}.{m.group(2)}"
        out[canon] = key
    return out


def _read_stage(info: CheckpointInfo, stage: int, tp_ranks, layout) -> dict:
    """{saved TP rank: {canonical name with global layer numbers: (tensor, original key)}} of one
    saved stage, its layers checked against the stored layout."""
    container = "model" if info.format == "torch" else "module"
    start, count = layout[stage]
    shards = {}
    for q in tp_ranks:
        path = info.stage_files[stage][q]
        state = _torch_load(path, info.trust_checkpoint)
        if container not in state:
            other = [k for k in state if re.fullmatch(r"model\d+", str(k))]
            why = " (virtual-pipeline checkpoint: not supported)" if other else ""
            raise CheckpointError(f"{path} has no {container!r} entry{why}; "
                                  f"top-level keys: {_sample(map(str, state))}")
        local = _canonical_state(state[container], path)
        held = {int(m.group(1)) for m in map(_LAYER.fullmatch, local) if m}
        if held and held != set(range(count)):
            raise CheckpointError(
                f"{path} holds layers {_span(held)} of pipeline stage {stage}, but the stored "
                f"pipeline layout ({_layout_args(vars(info.args)) if info.args else 'no args'}, "
                f"num_layers={sum(n for _, n in layout)}) gives that stage {count} layer"
                f"{'s' if count != 1 else ''}: the stored layout does not match the files")
        shards[q] = {_globalised(name, start): v for name, v in local.items()}
    first = shards[min(shards)]
    for q, shard in shards.items():
        if set(shard) != set(first):
            raise CheckpointError(f"{info.stage_files[stage][q]} holds different keys than "
                                  f"{info.stage_files[stage][min(shards)]}: {_sample(set(shard) ^ set(first))}")
    return shards


def _span(layers) -> str:
    layers = sorted(layers)
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def _globalised(name: str, start: int) -> str:
    m = _LAYER.fullmatch(name)
    return f"decoder.layers.{int(m.group(1)) + start}.{m.group(2)}" if m else name


def _in_stage(name: str, model, layers: set) -> bool:
    """A checkpoint key this pipeline stage holds: its layers, the embedding on the first stage,
    the final norm and output layer on the last."""
    m = _LAYER.fullmatch(name)
    if m:
        return int(m.group(1)) in layers
    if name.startswith("embedding."):
        return getattr(model, "pre_process", True)
    return getattr(model, "post_process", True)


def _saved_view(model, info: CheckpointInfo, tp: int, rank: int, target: dict) -> dict:
    """{canonical global name: {saved TP rank: (tensor, original key, file)}} of the saved stages
    that hold this rank's part: merged over the saved pipeline stages, ready to slice for TP."""
    layout = _stage_layout(info, model.config)
    if sum(n for _, n in layout) != model.config.num_layers:
        raise CheckpointError(f"the checkpoint in {info.directory} holds "
                              f"{sum(n for _, n in layout)} layers, the model {model.config.num_layers}")
    layers = {int(m.group(1)) for m in map(_LAYER.fullmatch, target) if m}
    stages = {p for p, (start, n) in enumerate(layout) if layers & set(range(start, start + n))}
    if getattr(model, "pre_process", True):
        stages.add(0)
    if getattr(model, "post_process", True):
        stages.add(info.pp - 1)
    ranks = _needed_ranks(info.tp, tp, rank)
    view = {}
    for stage in sorted(stages):
        for q, shard in _read_stage(info, stage, ranks, layout).items():
            for name, (tensor, key) in shard.items():
                view.setdefault(name, {})[q] = (tensor, key, info.stage_files[stage][q])
    if "output_layer.weight" in target and "output_layer.weight" not in view and \
            getattr(model, "share_embeddings_and_output_weights", False) and \
            "embedding.word_embeddings.weight" not in view:
        # the last stage of a tied model; the checkpoint has no copy there: the first stage's
        for q, shard in _read_stage(info, 0, ranks, layout).items():
            if "embedding.word_embeddings.weight" in shard:
                tensor, key = shard["embedding.word_embeddings.weight"]
                view.setdefault("embedding.word_embeddings.weight", {})[q] = (tensor, key, info.stage_files[0][q])
    return view


def _tied_copy(info: CheckpointInfo, model, view: dict) -> bool:
    """The saved last stage's `output_layer.weight` is the copy of the word embeddings that
    Megatron-LM keeps there for a tied model at PP > 1 (legacy: `word_embeddings_for_head`)."""
    if info.pp == 1 or "output_layer.weight" not in view:
        return False
    stored = _args_dict(info.args) or {}
    return not stored.get("untie_embeddings_and_output_weights", False) and \
        getattr(model, "share_embeddings_and_output_weights", False)


def _resharded_state_dict(model, info: CheckpointInfo, tp: int, rank: int) -> dict:
    """This rank's state dict for `model` (its own key names) from torch/DeepSpeed shards saved
    at any (TP, PP): the saved stages holding this rank's layers are merged (local layer numbers
    made global), then every TP-parallel tensor is sliced for this rank."""
    saved_tp = info.tp
    config = model.config
    model_sd = model.state_dict()
    params = dict(model.named_parameters())
    target = _model_names(model)
    view = _saved_view(model, info, tp, rank, target)
    if not view and info.format == "deepspeed":
        raise CheckpointError(f"{info.files[0]} holds no module weights (a ZeRO stage 3 "
                              "checkpoint? consolidate it with DeepSpeed's zero_to_fp32.py first)")
    if "output_layer.weight" in target and "output_layer.weight" not in view and \
            getattr(model, "share_embeddings_and_output_weights", False) and \
            "embedding.word_embeddings.weight" in view:  # tied: the last stage's copy
        view["output_layer.weight"] = view["embedding.word_embeddings.weight"]
    layers = {int(m.group(1)) for m in map(_LAYER.fullmatch, target) if m}
    mine = {name for name in view if _in_stage(name, model, layers)}
    if _tied_copy(info, model, view) and "output_layer.weight" not in target:
        mine.discard("output_layer.weight")
    missing = set(target) - set(view)
    unexpected = mine - set(target)
    if missing or unexpected:
        what = info.files[0] if len(info.files) == 1 or info.pp == 1 else info.directory
        raise _mismatch(f"{what}", missing, unexpected, [target[k] for k in missing],
                        [next(iter(view[k].values()))[1] for k in unexpected])

    version = info.checkpoint_version
    if version is None:
        version = 0 if info.format == "torch" else 3.0  # Megatron-LM's default for torch files
    stored = _args_dict(info.args) or {}
    heads = stored.get("num_attention_heads") or config.num_attention_heads

    out = {}
    for canon, key in target.items():
        saved = view[canon]
        pieces = {q: t for q, (t, _, _) in saved.items()}
        files = {q: f for q, (_, _, f) in saved.items()}
        if version < 2.0 and any(p in next(iter(saved.values()))[1] for p in _LEGACY_QKV):
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
                raise CheckpointError(f"shape mismatch for {key}: {files[q]} has "
                                      f"{tuple(t.shape)}, {files[min(pieces)]} {tuple(got.shape)}")
        out[key] = _reshard(pieces, saved_tp, tp, rank, dim, stride)
    return out
