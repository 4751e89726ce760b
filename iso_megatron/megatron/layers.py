"""Row-parallel linears whose all-reduce can be deferred to the ISO schedule.

Subclasses of megatron-core's own classes: no parameter added or renamed, so every state-dict
key and checkpoint stays as it is. With `defer_reduce` off they ARE the stock module. With it
on, forward returns the rank's partial sum and the bias (skip_bias_add, as stock for
`linear_proj` and `linear_fc2`); the schedule starts the all-reduce and adds the bias after it.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb_with_cos_sin
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class DeferredReduceMixin:
    defer_reduce = False  # set per instance by the ISO block around a prefill

    def forward(self, input_, *args, **kwargs):
        if not self.defer_reduce:
            return super().forward(input_, *args, **kwargs)
        # The local GEMM of the stock forward, without the reduce that follows it. TE keeps a
        # zero-length `bias` when the layer has none; it returns bias only when te_return_bias.
        bias = self.bias if getattr(self, "te_return_bias", True) else None
        if bias is not None and bias.numel() == 0:
            bias = None
        return F.linear(input_, self.weight), bias


class ISORowParallelLinear(DeferredReduceMixin, RowParallelLinear):
    """RowParallelLinear with a deferrable all-reduce."""


class ChunkAttentionMixin:
    """Core attention that can be told it runs a later chunk of a causal prefill.

    Stock attention switches to `no_mask` once the KV cache offset is > 0 (it assumes decode),
    so the ISO block sets `chunk_causal` around a prefill. The local DotProductAttention then
    gets an explicit mask per chunk (rows = the chunk's queries, columns = keys 0..end); TE's
    fused kernels and the SDPA attention use the bottom-right-aligned causal form instead.
    """

    chunk_causal = False
    # Whether causal attention needs an explicit causal mask from its caller (the local
    # DotProductAttention on CPU: megatron's default mask is made on CUDA). Backends that make
    # the causal form themselves, bottom-right for a chunk (TE, iso_megatron.megatron.attention),
    # don't: the ISO block then builds no chunk mask, and generate passes the prompt none.
    needs_causal_mask = True


class ISODotProductAttention(ChunkAttentionMixin, DotProductAttention):
    """DotProductAttention; for a chunk its softmax treats the mask as a general one.

    A `causal` softmax assumes a square score matrix (its fused kernel asserts sq == sk); a
    later chunk's scores are [chunk, keys so far], so the explicit mask is applied as `padding`.
    """

    def forward(self, *args, **kwargs):
        if not self.chunk_causal:
            return super().forward(*args, **kwargs)
        softmax = self.scale_mask_softmax
        stock_type, softmax.attn_mask_type = softmax.attn_mask_type, AttnMaskType.padding
        try:
            return super().forward(*args, **kwargs)
        finally:
            softmax.attn_mask_type = stock_type


class ISOSelfAttention(SelfAttention):
    """SelfAttention whose flash-decode RoPE knows the positions of a later ISO chunk.

    With `flash_decode`, megatron rotates queries and keys with precomputed cos/sin before it
    stores the keys (its decode kernel expects rotated keys in the cache), and it reads a KV
    cache offset > 0 as decode: one position, the last. A later chunk has many: rotate them
    here with the same function on the chunk's rows [start, end), then let the stock code store
    them with nothing left to rotate. Everything else is the stock method.
    """

    chunk_causal = False  # set by the ISO block around a prefill

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, *args, **kwargs):
        start = inference_context.sequence_len_offset if inference_context is not None else 0
        if self.chunk_causal and self.config.flash_decode and start and rotary_pos_cos is not None:
            end = start + key.size(0)
            cos, sin = rotary_pos_cos[start:end], rotary_pos_sin[start:end]
            interleaved = self.config.rotary_interleaved
            query = apply_rotary_pos_emb_with_cos_sin(query, cos, sin, rotary_interleaved=interleaved)
            key = apply_rotary_pos_emb_with_cos_sin(key, cos, sin, rotary_interleaved=interleaved)
            rotary_pos_cos = rotary_pos_sin = None
        return super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
            *args, **kwargs)


@functools.lru_cache(maxsize=None)
def te_classes():
    """{stock TE class: ISO subclass} where Transformer Engine imports, else {}."""
    try:
        from megatron.core.extensions.transformer_engine import (
            HAVE_TE,
            TEDotProductAttention,
            TERowParallelLinear,
        )
    except (ImportError, RuntimeError):
        return {}
    if not HAVE_TE:  # megatron defines placeholders then
        return {}

    class ISOTERowParallelLinear(DeferredReduceMixin, TERowParallelLinear):
        """TERowParallelLinear with a deferrable all-reduce (bf16/fp16/fp32 weights, no FP8)."""

    class ISOTEDotProductAttention(ChunkAttentionMixin, TEDotProductAttention):
        needs_causal_mask = False

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            if self.chunk_causal:
                kwargs["attn_mask_type"] = AttnMaskType.causal_bottom_right
                attention_mask = None
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    return {TERowParallelLinear: ISOTERowParallelLinear,
            TEDotProductAttention: ISOTEDotProductAttention}


def iso_classes():
    """{stock class: ISO subclass} for every module ISO replaces below the layer."""
    return {RowParallelLinear: ISORowParallelLinear, SelfAttention: ISOSelfAttention,
            DotProductAttention: ISODotProductAttention, **te_classes()}
