"""Key names: Transformer-Engine spec names (`linear_qkv.layer_norm_weight`, ...) and
Megatron-DeepSpeed / legacy Megatron-LM names (`language_model.encoder.layers.N.self_attention.
query_key_value`, ..., nested or flat, optionally prefixed `module.`) map to one canonical name,
megatron-core's local-spec one; keys that carry no weights are ignored. Also the error for a
checkpoint whose keys differ from the model's."""

from __future__ import annotations

import re

import torch

from .find import CheckpointError

_LEGACY_PREFIXES = (  # Megatron-DeepSpeed / legacy Megatron-LM -> megatron-core
    ("language_model.embedding.word_embeddings.", "embedding.word_embeddings."),
    ("language_model.embedding.position_embeddings.", "embedding.position_embeddings."),
    ("language_model.encoder.final_layernorm.", "decoder.final_layernorm."),
    ("language_model.encoder.final_norm.", "decoder.final_layernorm."),
    ("language_model.encoder.layers.", "decoder.layers."),
    ("language_model.transformer.final_layernorm.", "decoder.final_layernorm."),
    ("language_model.transformer.layers.", "decoder.layers."),
    ("language_model.output_layer.", "output_layer."),
    # legacy Megatron-LM, tied embeddings at PP > 1: the last stage's copy of the word embeddings
    ("word_embeddings_for_head.", "output_layer."),
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
