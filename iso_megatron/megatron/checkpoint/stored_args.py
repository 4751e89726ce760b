"""The Megatron-LM args stored with a checkpoint: the ones `checkpoint_args` returns, and the
checks they allow that tensor shapes cannot show (TP divisibility, heads, groups, head size)."""

from __future__ import annotations

from argparse import Namespace
from typing import Optional

from ...config import tp_divisibility_error
from ..args import CHECKPOINT_ARGS
from .find import CheckpointError, CheckpointInfo, find_checkpoint

# Stored args that `checkpoint_args` returns (Megatron-LM names), when stored: the model-shape
# flags --use-checkpoint-args takes (args.CHECKPOINT_ARGS), then the others worth reporting.
STORED_ARGS = CHECKPOINT_ARGS + (
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_interleaved",
    "apply_layernorm_1p", "squared_relu", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers", "num_experts", "params_dtype", "tokenizer_model", "vocab_file",
    "merge_file", "ckpt_format", "hidden_dropout", "attention_dropout")


def _args_dict(args: Optional[Namespace]) -> Optional[dict]:
    if args is None:
        return None
    a = dict(vars(args))
    if "disable_bias_linear" in a and "add_bias_linear" not in a:  # as Megatron-LM converts it
        a["add_bias_linear"] = not a["disable_bias_linear"]
    if a.get("tensor_model_parallel_size") is None and a.get("model_parallel_size") is not None:
        a["tensor_model_parallel_size"] = a["model_parallel_size"]  # checkpoint_version < 3
    return {k: a[k] for k in STORED_ARGS if k in a}


def _heads_and_groups(a: dict):
    heads = a.get("num_attention_heads")
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    return heads, groups


def check_tp(stored: Optional[dict], tp: int, where: str = "the checkpoint") -> None:
    """Raise when tensor-parallel size `tp` cannot hold the model the stored args describe, by
    Megatron's rule (`config.tp_divisibility_error`: the one ISO models are built under)."""
    if not stored:
        return
    heads, groups = _heads_and_groups(stored)
    if heads is None:  # no heads stored: nothing to check them against
        return
    error = tp_divisibility_error(heads, groups, tp)
    if error:
        saved = f"num_attention_heads={heads}"
        if groups not in (None, heads):
            saved += f", num_query_groups={groups}"
        raise CheckpointError(f"{where} was saved with {saved} (its stored args): it cannot be "
                              f"loaded at tensor-model-parallel size {tp}, since {error}")


def checkpoint_args(load_dir: str, tensor_model_parallel_size: Optional[int] = None,
                    ckpt_format: str = "auto", trust_checkpoint: bool = False) -> Optional[dict]:
    """Model arguments stored in the checkpoint (Megatron-LM names, see STORED_ARGS), or None
    when it stores none (plain DeepSpeed engine checkpoints). With `tensor_model_parallel_size`,
    also raise when that TP cannot hold the stored model. Local: no collectives. The pickle
    holding them is read with an allowlist unless `trust_checkpoint` (see find_checkpoint)."""
    info = find_checkpoint(load_dir, ckpt_format, trust_checkpoint)
    stored = _args_dict(info.args)
    if stored is not None and info.format == "torch":  # its files say how many stages it has
        stored["pipeline_model_parallel_size"] = info.pp
    if tensor_model_parallel_size is not None:
        check_tp(stored, tensor_model_parallel_size, f"the checkpoint in {info.directory}")
    return stored


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
