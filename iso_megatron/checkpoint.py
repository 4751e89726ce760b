"""Checkpoints as users have them, loaded into a megatron-core GPTModel (stock or ISO) at the
current tensor-parallel (TP) size, whatever TP they were saved at.

    info = find_checkpoint(load_dir)           # local: which format, which iteration, saved TP, args
    shape = checkpoint_args(load_dir, tp)      # local: Megatron-LM model args stored in it (or None)
    info = load_checkpoint(model, load_dir)    # collective over the world: every rank calls it

Formats:
- Megatron `torch_dist` (dist_checkpointing dir: metadata.json, common.pt with 'args', *.distcp):
  `dist_checkpointing.load(model.sharded_state_dict(), dir)`; megatron reshards.
- Megatron legacy `torch`: `iter_{:07d}|release/mp_rank_{tp:02d}/model_optim_rng.pt` with 'model',
  'args', 'checkpoint_version', 'iteration'; each rank reads the saved shards that overlap its own
  slice and merges/splits every TP-parallel tensor along its partition dimension.
- DeepSpeed engine `save_checkpoint()`: `latest` names the tag, `{tag}/mp_rank_{:02d}_model_states.pt`
  with the model under 'module' (Megatron-DeepSpeed also stores 'args' there); resharded as `torch`.
Key names: Transformer-Engine spec names (`linear_qkv.layer_norm_weight`, ...) and Megatron-DeepSpeed /
legacy Megatron-LM names (`language_model.encoder.layers.N.self_attention.query_key_value`, ...,
nested or flat, optionally prefixed `module.`) map to whatever names the built model uses.

Layouts assumed (megatron-core's, which Megatron-DeepSpeed shares for checkpoint_version >= 2):
linear_qkv rows are per query group [q heads of the group; k; v] and a TP rank holds a contiguous
run of whole groups, so TP resharding is plain chunking along dim 0. Gated linear_fc1 holds
[gate_r; up_r] per rank (stride 2). Vocab-parallel embedding/output rows are contiguous per rank.
checkpoint_version 0 / 1.0 (legacy per-rank [3, np, hn] / [np, hn, 3] qkv) is reordered as
Megatron-LM's `fix_query_key_value_ordering` does (multi-head attention only).

Errors are `CheckpointError` (a ValueError) or `CheckpointNotFoundError` (also a FileNotFoundError).
`load_checkpoint` raises on EVERY rank when any rank fails: after each local step the ranks all-reduce
a failure flag (gloo) and, on failure, all raise the failing rank's message. Checkpoint files are
pickles (as Megatron loads them): load only checkpoints you trust.
"""

from __future__ import annotations

import os
import pickle
import re
import types
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

FORMATS = ("torch", "torch_dist", "deepspeed")
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
DEEPSPEED_TRACKER = "latest"

# Model/parallel args that `checkpoint_args` returns (Megatron-LM names), when stored.
MODEL_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings",
    "position_embedding_type", "add_position_embedding", "use_rotary_position_embeddings",
    "rotary_base", "rotary_percent", "rotary_interleaved", "normalization", "norm_epsilon",
    "apply_layernorm_1p", "apply_residual_connection_post_layernorm", "qk_layernorm", "swiglu",
    "squared_relu", "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights",
    "padded_vocab_size", "vocab_size", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "num_experts", "bf16", "fp16", "params_dtype", "tokenizer_type",
    "tokenizer_model", "vocab_file", "merge_file", "ckpt_format", "hidden_dropout", "attention_dropout")


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
    args: Optional[Namespace] = None  # Megatron-LM args stored with the checkpoint
    checkpoint_version: Optional[float] = None
    files: list = field(default_factory=list)  # per saved TP rank (torch, deepspeed)


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint (local, no collectives)
# ---------------------------------------------------------------------------------------------

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
    if any(re.fullmatch(r"mp_rank_\d\d_\d\d\d(_\d\d\d)?", n) for n in names):
        raise CheckpointError(f"{directory} holds a pipeline/expert-parallel torch checkpoint "
                              "(mp_rank_XX_YYY): only pipeline-parallel size 1 is supported")
    if any(re.fullmatch(r"mp_rank_\d\d", n) for n in names):
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


def _shard_files(directory: str, fmt: str) -> list:
    if fmt == "torch":
        ranks = _ranked(directory, r"mp_rank_(\d\d)")
        files = {r: os.path.join(directory, n, "model_optim_rng.pt") for r, n in ranks.items()}
    else:
        ranks = _ranked(directory, r"mp_rank_(\d\d)_model_states\.pt")
        files = {r: os.path.join(directory, n) for r, n in ranks.items()}
    if sorted(files) != list(range(len(files))):
        raise CheckpointError(f"{directory}: TP shards {sorted(files)} are not 0..{len(files) - 1} "
                              "(incomplete checkpoint?)")
    for path in files.values():
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"checkpoint shard file {path} is missing")
    return [files[r] for r in range(len(files))]


class _LenientUnpickler(pickle.Unpickler):
    """Old Megatron checkpoints pickle classes of modules that no longer exist (loss scalers,
    `megatron.model` enums): stand-ins let the model weights load."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (), {"__module__": module, "__init__": lambda self, *a, **k: None,
                                   "__setstate__": lambda self, state: None})


_lenient_pickle = types.SimpleNamespace(Unpickler=_LenientUnpickler, load=pickle.load,
                                        __name__="pickle")


def _torch_load(path: str) -> dict:
    """torch.load of a Megatron/DeepSpeed file (pickled args): memory-mapped where possible."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint file {path} is missing")
    errors = []
    for kw in (dict(mmap=True), dict(), dict(pickle_module=_lenient_pickle)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, **kw)
            break
        except Exception as e:  # truncated zip, legacy non-zip file, missing pickled class
            errors.append(e)
    else:
        error = errors[1]  # the plain torch.load's
        raise CheckpointError(f"cannot read checkpoint file {path} (truncated or corrupt?): "
                              f"{_brief(error)}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(state).__name__}, not a dict")
    return state


def find_checkpoint(load_dir: str, ckpt_format: str = "auto") -> CheckpointInfo:
    """The checkpoint that `load_dir` names (Megatron tracker, DeepSpeed `latest`, or the
    iteration directory itself), its format, saved TP and stored args. Local: no collectives."""
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
                          tag=tag)
    if fmt == "torch_dist":
        from megatron.core import dist_checkpointing

        try:
            common = dist_checkpointing.load_common_state_dict(directory)
        except Exception as e:
            raise CheckpointError(f"cannot read {os.path.join(directory, 'common.pt')} (truncated or "
                                  f"corrupt?): {_brief(e)}") from e
        info.args = common.get("args")
        info.checkpoint_version = common.get("checkpoint_version")
        info.tp = getattr(info.args, "tensor_model_parallel_size", None)
        if info.iteration is None and isinstance(common.get("iteration"), int) and tag != "release":
            info.iteration = common["iteration"]
    else:
        info.files = _shard_files(directory, fmt)
        info.tp = len(info.files)
        first = _torch_load(info.files[0])
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
    return info


def _args_dict(args: Optional[Namespace]) -> Optional[dict]:
    if args is None:
        return None
    a = dict(vars(args))
    if "disable_bias_linear" in a and "add_bias_linear" not in a:  # as Megatron-LM converts it
        a["add_bias_linear"] = not a["disable_bias_linear"]
    if a.get("tensor_model_parallel_size") is None and a.get("model_parallel_size") is not None:
        a["tensor_model_parallel_size"] = a["model_parallel_size"]  # checkpoint_version < 3
    return {k: a[k] for k in MODEL_ARGS if k in a}


def _heads_and_groups(a: dict):
    heads = a.get("num_attention_heads")
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    return heads, groups


def check_tp(stored: Optional[dict], tp: int, where: str = "the checkpoint") -> None:
    """Raise when tensor-parallel size `tp` cannot hold the stored model (heads/groups)."""
    if not stored:
        return
    heads, groups = _heads_and_groups(stored)
    for name, value in (("num_attention_heads", heads), ("num_query_groups", groups)):
        if value is not None and value % tp:
            raise CheckpointError(
                f"{where} has {name}={value}, which tensor-model-parallel size {tp} does not "
                f"divide: it cannot be resharded to TP {tp} (use a TP size that divides {value})")


def checkpoint_args(load_dir: str, tensor_model_parallel_size: Optional[int] = None,
                    ckpt_format: str = "auto") -> Optional[dict]:
    """Model arguments stored in the checkpoint (Megatron-LM names, see MODEL_ARGS), or None
    when it stores none (plain DeepSpeed engine checkpoints). With `tensor_model_parallel_size`,
    also raise when that TP cannot hold the stored model. Local: no collectives."""
    info = find_checkpoint(load_dir, ckpt_format)
    stored = _args_dict(info.args)
    if tensor_model_parallel_size is not None:
        check_tp(stored, tensor_model_parallel_size, f"the checkpoint in {info.directory}")
    return stored


# ---------------------------------------------------------------------------------------------
# Key names
# ---------------------------------------------------------------------------------------------

_LEGACY_PREFIXES = (  # Megatron-DeepSpeed / legacy Megatron-LM -> megatron-core
    ("language_model.embedding.word_embeddings.", "embedding.word_embeddings."),
    ("language_model.embedding.position_embeddings.", "embedding.position_embeddings."),
    ("language_model.encoder.final_layernorm.", "decoder.final_layernorm."),
    ("language_model.encoder.final_norm.", "decoder.final_layernorm."),
    ("language_model.encoder.layers.", "decoder.layers."),
    ("language_model.transformer.final_layernorm.", "decoder.final_layernorm."),
    ("language_model.transformer.layers.", "decoder.layers."),
    ("language_model.output_layer.", "output_layer."),
)
_LAYER_RENAMES = {  # inside decoder.layers.N., to the local spec's names
    "self_attention.query_key_value.": "self_attention.linear_qkv.",
    "attention.query_key_value.": "self_attention.linear_qkv.",
    "self_attention.dense.": "self_attention.linear_proj.",
    "attention.dense.": "self_attention.linear_proj.",
    "post_attention_layernorm.": "pre_mlp_layernorm.",
    "mlp.dense_h_to_4h.": "mlp.linear_fc1.",
    "mlp.dense_4h_to_h.": "mlp.linear_fc2.",
    # Transformer-Engine spec: the norms live inside the fused norm+linear modules
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_LEGACY_QKV = ("self_attention.query_key_value.", "attention.query_key_value.")


def is_ignored_key(key: str) -> bool:
    """Keys that carry no weights: TE/mcore `_extra_state`, rotary `inv_freq` buffers."""
    return key.endswith("_extra_state") or key.endswith("inv_freq")


def canonical_name(key: str) -> str:
    """The megatron-core local-spec name of a checkpoint key in any supported naming."""
    while key.startswith("module."):
        key = key[len("module."):]
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    m = re.match(r"(decoder\.layers\.\d+\.)(.*)", key)
    if m:
        head, rest = m.groups()
        for old, new in _LAYER_RENAMES.items():
            if rest.startswith(old):
                return head + new + rest[len(old):]
    return key


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Nested legacy state dicts ({'language_model': {'encoder': {...}}}) to dotted keys."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _canonical_state(raw: dict, path: str) -> dict:
    """{canonical name: (tensor, original key)} of one saved shard's model state."""
    out = {}
    for key, value in _flatten(raw).items():
        if is_ignored_key(key) or not torch.is_tensor(value):
            continue
        name = canonical_name(key)
        if name in out:
            raise CheckpointError(f"{path}: keys {out[name][1]!r} and {key!r} both map to {name!r}")
        out[name] = (value, key)
    return out


# ---------------------------------------------------------------------------------------------
# Resharding legacy torch / DeepSpeed shards
# ---------------------------------------------------------------------------------------------

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


def _brief(error: BaseException) -> str:
    """`Type: first sentence` of an exception from torch/pickle (their messages run long)."""
    text = re.split(r"(?<=[.!?])\s", str(error).strip(), maxsplit=1)[0]
    return f"{type(error).__name__}: {text[:200]}"


def _sample(keys, n=5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _mismatch(what, missing, unexpected, missing_names, unexpected_names) -> CheckpointError:
    """The error for a checkpoint whose keys differ from the model's (names as the user sees them)."""
    parts = []
    if missing:
        parts.append(f"missing keys: {_sample(missing_names)}")
    if unexpected:
        parts.append(f"unexpected keys: {_sample(unexpected_names)}")
    return CheckpointError(f"{what} does not match the model: " + "; ".join(parts)
                           + _key_hint(missing, unexpected))


def _key_hint(missing, unexpected) -> str:
    if "output_layer.weight" in unexpected:
        return ("; the checkpoint has an untied output layer: build the model with "
                "--untie-embeddings-and-output-weights")
    if "output_layer.weight" in missing:
        return ("; the checkpoint ties the output layer to the embeddings: build the model without "
                "--untie-embeddings-and-output-weights")
    return ""


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
        state = _torch_load(info.files[q])
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


def _check_config(info: CheckpointInfo, config) -> None:
    """What shapes cannot show: heads, groups and head size must match the stored args."""
    stored = _args_dict(info.args)
    if not stored:
        return
    heads, groups = _heads_and_groups(stored)
    model_groups = config.num_query_groups or config.num_attention_heads
    pairs = (("num_layers", stored.get("num_layers"), config.num_layers),
             ("num_attention_heads", heads, config.num_attention_heads),
             ("num_query_groups", groups, model_groups),
             ("kv_channels", stored.get("kv_channels"), config.kv_channels))
    bad = [f"{n}={c} (model: {m})" for n, c, m in pairs if c is not None and m is not None and c != m]
    if bad:
        raise CheckpointError(f"the checkpoint in {info.directory} was saved with "
                              + ", ".join(bad) + ": set the model flags to match "
                              "(or use --use-checkpoint-args)")


# ---------------------------------------------------------------------------------------------
# torch_dist
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Every rank agrees
# ---------------------------------------------------------------------------------------------

_gloo_group = None


def _agreement_group():
    global _gloo_group
    if dist.get_backend() == "gloo":
        return None
    if _gloo_group is None:
        _gloo_group = dist.new_group(backend="gloo")
    return _gloo_group


def _describe(error: BaseException):
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
            raise (CheckpointNotFoundError if kind == "not_found" else CheckpointError)(msg) from error
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
    cls = CheckpointNotFoundError if kind == "not_found" else CheckpointError
    raise cls(f"{msg} [checkpoint load failed on {where}]") from error


def _load_into(model, state: dict, where: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_ignored_key(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where}: loading into the model left missing keys "
                              f"{_sample(missing)}, unexpected keys {_sample(result.unexpected_keys)}")


def load_checkpoint(model, load_dir: str, ckpt_format: str = "auto") -> CheckpointInfo:
    """Load the checkpoint in `load_dir` into a built megatron-core GPTModel (stock or ISO;
    DDP/Float16Module/DeepSpeed wrappers are unwrapped via `.module`) at the current
    tensor-parallel size of megatron's parallel_state, whatever TP it was saved at.

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
        info = find_checkpoint(load_dir, ckpt_format)
        check_tp(_args_dict(info.args), tp, f"the checkpoint in {info.directory}")
        if info.format == "torch_dist":
            request = _dist_request(model, info)
            _check_config(info, model.config)
        else:
            state = _resharded_state_dict(model, info, tp, rank)
            _check_config(info, model.config)
            _load_into(model, state, info.directory)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every failure must reach all ranks
        error = e
    _agree(error)

    if info.format == "torch_dist":
        from megatron.core import dist_checkpointing

        error = None
        try:
            loaded = dist_checkpointing.load(request, info.directory)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException  # noqa: BLE001
            error = CheckpointError(f"reading the torch_dist checkpoint in {info.directory} failed "
                                    f"(corrupt file?): {_dcp_message(e)}")
        if error is None:
            try:  # dist_checkpointing.load also returns the common state (args, iteration, ...)
                _load_into(model, {k: v for k, v in loaded.items() if k in request}, info.directory)
            except Exception as e:  # noqa: BLE001
                error = e
        _agree(error)
    return info
