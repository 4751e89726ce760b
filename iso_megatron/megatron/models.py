"""Small megatron-core GPTModels of the two families ISO is tested on, built the stock way.

"gpt"   GPT-2 style: LayerNorm, GELU, biases, learned absolute positions.
"llama" Llama style: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases.
The launcher's embedded default model and the tests use these; real checkpoints use their
own shapes through the same `GPTModel` constructor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

FAMILIES = ("gpt", "llama")


def model_config(family: str = "llama", num_layers: int = 2, hidden_size: int = 64,
                 num_attention_heads: int = 8, num_query_groups: int = 4,
                 ffn_hidden_size: int = 160, params_dtype=torch.float32, **overrides) -> TransformerConfig:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    from .compat import tp_world_size

    common = dict(tensor_model_parallel_size=tp_world_size(), num_layers=num_layers, hidden_size=hidden_size,
                  num_attention_heads=num_attention_heads, ffn_hidden_size=ffn_hidden_size,
                  hidden_dropout=0.0, attention_dropout=0.0, params_dtype=params_dtype,
                  bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
                  use_cpu_initialization=not torch.cuda.is_available(),
                  bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                  gradient_accumulation_fusion=False, persist_layer_norm=False)
    if family == "gpt":
        fam = dict(normalization="LayerNorm", add_bias_linear=True, add_qkv_bias=True,
                   activation_func=F.gelu, gated_linear_unit=False, num_query_groups=None)
    else:
        fam = dict(normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=False,
                   activation_func=F.silu, gated_linear_unit=True, num_query_groups=num_query_groups)
    return TransformerConfig(**{**common, **fam, **overrides})


ATTENTIONS = ("local", "sdpa")


def build_gpt(config: TransformerConfig, layer_spec=None, vocab_size: int = 256,
              max_sequence_length: int = 4096, family: str = "llama", attention: str = "local",
              **kwargs) -> GPTModel:
    """A GPTModel of `family` with megatron's own constructor (stock local spec by default).

    `attention`: "local" keeps the spec's core attention (the local spec's DotProductAttention);
    "sdpa" swaps in SDPAAttention (torch's fused kernels; same state dict). Other keyword
    arguments go to GPTModel (e.g. rope_scaling=True, rope_scaling_factor=8.0).
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTIONS}")
    if layer_spec is None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer_spec = get_gpt_layer_local_spec(
            normalization=config.normalization)
    if attention == "sdpa":
        from .attention import sdpa_layer_spec

        layer_spec = sdpa_layer_spec(layer_spec)
    pos = "learned_absolute" if family == "gpt" else "rope"
    kwargs.setdefault("share_embeddings_and_output_weights", family == "gpt")
    return GPTModel(config, layer_spec, vocab_size=vocab_size,
                    max_sequence_length=max_sequence_length, position_embedding_type=pos, **kwargs)
