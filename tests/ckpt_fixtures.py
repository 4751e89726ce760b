"""Rank-side helpers that SAVE checkpoints the way real users have them (run via run_ranks).

Each `save_*` builds nothing: it saves the given stock megatron-core GPTModel. `make_checkpoint`
builds the stock model (local spec, fixed seed) at a TP size, saves it in one of FORMATS and
returns the reference: the model's own prompt logits and greedy tokens (`reference`).

FORMATS:
  torch       Megatron-LM legacy: iter_{:07d}/mp_rank_{tp:02d}/model_optim_rng.pt + tracker
  torch_dist  Megatron-LM dist_checkpointing: {'model': sharded_state_dict, 'args', ...} + tracker
              (the common state in common.pt under megatron-core 0.16, in the .distcp under 0.19)
  te          `torch` with the Transformer-Engine spec's key names and TE `_extra_state` blobs
  te_dist     `torch_dist` with TE-style extra-state objects (TE's storage keys equal the local ones)
  deepspeed   a real deepspeed.initialize(...) engine around the model, engine.save_checkpoint()
  legacy      Megatron-DeepSpeed layer names, nested as its state_dict_for_save_checkpoint, `release`
  legacy_v0   `legacy` with checkpoint_version 0 ([3, np, hn] qkv rows; multi-head models only)
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
from argparse import Namespace
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist

FORMATS = ("torch", "torch_dist", "te", "te_dist", "deepspeed", "legacy", "legacy_v0")
ITERATION = 10
PROMPT = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(7))
STEPS = 8


def setup(tp: int):
    from tests.cases_core import setup as core_setup

    core_setup(tp)


def build_stock(family: str, seed: int = 1234, vocab_size: int = 256,
                max_sequence_length: int = 4096, **cfg):
    from iso_megatron.megatron.models import build_gpt, model_config

    torch.manual_seed(seed)
    return build_gpt(model_config(family, **cfg), family=family, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length).eval()


def forward(model, ids):
    from iso_megatron import causal_mask

    s = ids.size(1)
    return model(ids, torch.arange(s)[None].expand_as(ids), causal_mask(s), runtime_gather_output=True)


@torch.no_grad()
def reference(model, steps: int = STEPS, prompt=None) -> dict:
    """Prompt logits (fp32, full vocab) and `steps` greedy tokens by full recompute
    (of `prompt`, [1, s] token ids; PROMPT by default)."""
    ids = (PROMPT if prompt is None else prompt).clone()
    logits = forward(model, ids).float()
    last, tokens = logits, []
    for _ in range(steps):
        nxt = last[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        ids = torch.cat([ids, nxt], 1)
        last = forward(model, ids)
    return dict(logits=logits, tokens=tokens)


def megatron_args(model, family: str, ckpt_format: str, vocab: int = 256,
                  max_position_embeddings: int = 4096) -> Namespace:
    """The args Namespace Megatron-LM would have stored for this model (its arg names)."""
    from megatron.core import parallel_state

    c = model.config
    gqa = c.num_query_groups is not None and c.num_query_groups != c.num_attention_heads
    return Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads, group_query_attention=gqa,
        num_query_groups=c.num_query_groups if gqa else 1, kv_channels=c.kv_channels,
        seq_length=max_position_embeddings, max_position_embeddings=max_position_embeddings,
        position_embedding_type="learned_absolute" if family == "gpt" else "rope",
        add_position_embedding=family == "gpt", use_rotary_position_embeddings=family != "gpt",
        rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False,
        normalization=c.normalization, norm_epsilon=c.layernorm_epsilon, apply_layernorm_1p=False,
        apply_residual_connection_post_layernorm=False, qk_layernorm=False,
        swiglu=c.gated_linear_unit, squared_relu=False, add_bias_linear=c.add_bias_linear,
        add_qkv_bias=c.add_qkv_bias, untie_embeddings_and_output_weights=family != "gpt",
        padded_vocab_size=vocab, vocab_size=None, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=1, num_experts=None, bf16=False, fp16=False,
        params_dtype=torch.float32, tokenizer_type="NullTokenizer", ckpt_format=ckpt_format,
        use_dist_ckpt=ckpt_format == "torch_dist", hidden_dropout=0.0, attention_dropout=0.0,
        transformer_impl="local", iteration=ITERATION, micro_batch_size=1, seed=1234)


def _rng_state():
    return [dict(random_rng_state=random.getstate(), np_rng_state=np.random.get_state(),
                 torch_rng_state=torch.get_rng_state())]


def _write_tracker(save_dir: str, text: str):
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(text)
    dist.barrier()


def _iter_dir(save_dir: str, release: bool) -> str:
    return os.path.join(save_dir, "release" if release else f"iter_{ITERATION:07d}")


def save_torch(model, family: str, save_dir: str, model_state=None, release: bool = False,
               checkpoint_version: float = 3.0):
    """Megatron-LM `--ckpt-format torch`: data-parallel rank 0 of each TP rank writes its file."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank() == 0:
        path = os.path.join(_iter_dir(save_dir, release),
                            f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}",
                            "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {"args": megatron_args(model, family, "torch"),
                 "checkpoint_version": checkpoint_version, "iteration": ITERATION,
                 "model": model.state_dict_for_save_checkpoint() if model_state is None else model_state,
                 "rng_state": _rng_state(), "num_floating_point_operations_so_far": 0}
        torch.save(state, path)
    dist.barrier()
    _write_tracker(save_dir, "release" if release else str(ITERATION))


def save_torch_dist(model, family: str, save_dir: str, te_extra_state: bool = False,
                    args: Namespace = None):
    """Megatron-LM `--ckpt-format torch_dist`: dist_checkpointing.save of the state dict whose
    'model' is the sharded state dict; args (`megatron_args` unless given)/iteration/version are
    its common state: in common.pt with megatron-core 0.16, in the .distcp files (the
    `common_state` entry, no common.pt) with 0.19."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    if te_extra_state:  # TE modules store fp8 metadata blobs as extra state, also in core attention
        for key in [k for k in sharded if k.endswith("linear_qkv._extra_state")]:
            obj = sharded[key]
            sharded[key] = dataclasses.replace(obj, data=io.BytesIO(b"te-fp8-meta"))
            attn = key.replace("linear_qkv._extra_state", "core_attention._extra_state")
            sharded[attn] = dataclasses.replace(
                obj, key=obj.key.replace("linear_qkv", "core_attention"), data=io.BytesIO(b"te"))
    path = _iter_dir(save_dir, False)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    if args is None:
        args = megatron_args(model, family, "torch_dist")
    state = {"args": args, "checkpoint_version": 3.0,
             "iteration": ITERATION, "model": sharded, "num_floating_point_operations_so_far": 0}
    dist_checkpointing.save(state, path)
    dist.barrier()
    _write_tracker(save_dir, str(ITERATION))


_TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
             "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}


def te_state(model) -> OrderedDict:
    """The model's state dict under the TE spec's names, with TE-like `_extra_state` blobs."""
    out = OrderedDict()
    for key, value in model.state_dict_for_save_checkpoint().items():
        head, _, rest = key.partition("decoder.layers.")
        if rest:
            num, _, name = rest.partition(".")
            if name in _TE_NAMES:
                key = f"decoder.layers.{num}.{_TE_NAMES[name]}"
            if name == "self_attention.linear_qkv._extra_state":
                out[f"decoder.layers.{num}.self_attention.core_attention._extra_state"] = io.BytesIO(b"te")
        out[key] = io.BytesIO(b"te-fp8-meta") if key.endswith("_extra_state") else value
    return out


_LEGACY_LAYER = {"input_layernorm.": "input_layernorm.",
                 "self_attention.linear_qkv.": "self_attention.query_key_value.",
                 "self_attention.linear_proj.": "self_attention.dense.",
                 "pre_mlp_layernorm.": "post_attention_layernorm.",
                 "mlp.linear_fc1.": "mlp.dense_h_to_4h.", "mlp.linear_fc2.": "mlp.dense_4h_to_h."}


def legacy_state(model, checkpoint_version: float = 3.0) -> dict:
    """Megatron-DeepSpeed's nested `state_dict_for_save_checkpoint` layout and names."""
    embedding, encoder, output = OrderedDict(), OrderedDict(), OrderedDict()
    heads = model.config.num_attention_heads // model.config.tensor_model_parallel_size
    for key, value in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        if key.startswith("embedding.word_embeddings."):
            embedding.setdefault("word_embeddings", OrderedDict())[key.split(".")[-1]] = value
        elif key.startswith("embedding.position_embeddings."):
            embedding.setdefault("position_embeddings", OrderedDict())[key.split(".")[-1]] = value
        elif key.startswith("decoder.final_layernorm."):
            encoder["final_layernorm." + key.split(".")[-1]] = value
        elif key.startswith("output_layer."):
            output[key.split(".")[-1]] = value
        else:
            num, name = key[len("decoder.layers."):].split(".", 1)
            old = next(o for o in _LEGACY_LAYER if name.startswith(o))
            if old == "self_attention.linear_qkv." and checkpoint_version == 0:
                shape = value.shape  # mcore [np, 3, hn] rows -> version 0 [3, np, hn]
                value = value.reshape(heads, 3, -1, *shape[1:]).transpose(0, 1).reshape(shape)
            encoder[f"layers.{num}.{_LEGACY_LAYER[old]}{name[len(old):]}"] = value
    lm = OrderedDict(embedding=embedding, encoder=encoder)
    if output:
        lm["output_layer"] = output
    return {"language_model": lm}


class MegatronMPU:
    """The `mpu` DeepSpeed asks for, over megatron-core's parallel_state (Megatron-DeepSpeed
    passes its own mpu module; megatron-core lacks the get_model_parallel_* names)."""

    def __getattr__(self, name):
        from megatron.core import parallel_state as ps

        alias = {"get_model_parallel_rank": ps.get_tensor_model_parallel_rank,
                 "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
                 "get_model_parallel_group": ps.get_tensor_model_parallel_group}
        if name in alias:
            return alias[name]
        if name.startswith(("get_data_parallel_", "get_tensor_model_parallel_",
                            "get_pipeline_model_parallel_")):
            return getattr(ps, name)
        raise AttributeError(name)


def save_deepspeed(model, save_dir: str, tag: str = f"global_step{ITERATION}"):
    """A real DeepSpeed engine (CPU accelerator, gloo) around the model, then save_checkpoint."""
    import deepspeed
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    engine, *_ = deepspeed.initialize(
        model=model, mpu=MegatronMPU(),
        config={"train_batch_size": dp, "train_micro_batch_size_per_gpu": 1})
    engine.save_checkpoint(save_dir, tag=tag)
    dist.barrier()
    return engine.module


def make_checkpoint(fmt: str, family: str, tp: int, save_dir: str, seed: int = 1234, **cfg) -> dict:
    """Build the stock model at TP `tp`, save it as `fmt` in `save_dir`; its reference output."""
    setup(tp)
    model = build_stock(family, seed, **cfg)
    if fmt == "torch":
        save_torch(model, family, save_dir)
    elif fmt == "torch_dist":
        save_torch_dist(model, family, save_dir)
    elif fmt == "te":
        save_torch(model, family, save_dir, model_state=te_state(model))
    elif fmt == "te_dist":
        save_torch_dist(model, family, save_dir, te_extra_state=True)
    elif fmt == "deepspeed":
        model = save_deepspeed(model, save_dir)
    elif fmt in ("legacy", "legacy_v0"):
        version = 0 if fmt == "legacy_v0" else 3.0
        save_torch(model, family, save_dir, model_state=legacy_state(model, version), release=True,
                   checkpoint_version=version)
    else:
        raise ValueError(f"unknown fixture format {fmt!r}")
    return reference(model)
