"""Fused core attention for megatron-core's local spec, without Transformer Engine.

`SDPAAttention` replaces the local spec's `DotProductAttention` (`sdpa_layer_spec`). It is that
class (same constructor, no parameter, no buffer: the state dict and checkpoints are unchanged)
with a forward on torch's `scaled_dot_product_attention`: cuDNN / flash / memory-efficient
kernels on CUDA, the flash kernel on CPU. Nothing of size [s, s] is built on its hot paths.

What runs, for query [sq, b, np, hn] and key/value [sk, b, ng, hn]:
  full prompt     causal mask type, sq == sk, no mask: `is_causal`
  decode          sq == 1 (megatron's `no_mask` once the KV cache offset is > 0): no mask; a
                  mask row the caller gives is applied as it is
  ISO chunk       `chunk_causal` (set by the ISO block): the queries are the LAST sq of the sk
                  positions, causal aligned bottom-right, run as a past block (keys [0, sk - sq),
                  no mask) and a diagonal block (`is_causal`) merged by their log-sum-exps in
                  fp32, on the CPU flash kernel or CUDA's cuDNN attention (K/V not grouped):
                  the kernels that run a whole causal prompt, neither of which skips blocks in
                  a bottom-right form; elsewhere (fp32 or grouped K/V on CUDA) torch's
                  `causal_lower_right` on flash / memory-efficient kernels (iso_megatron/sdpa.py
                  `chunk_path`; chunk vs whole-prompt times: scripts/attention_timing.py).
  any other mask  SDPA with a boolean mask (correct, not fused: the mask is materialised).
Masks follow Megatron's convention, True = masked. A mask given with the causal form (chunk
or full prompt) means "causal AND not masked" and takes the masked path: a mask's values are
never inspected, since reading them back would synchronise the host with the device on every
call. So give a causal prompt NO mask (generate.prefill_mask does; so does the ISO block for
its chunks). Rows whose every key is masked come out as Megatron's masked_fill(-10000) makes
them: the mean of all values.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from ..sdpa import bottom_right_causal_mask, causal_attention, grouped_sdpa, masked_attention
from .layers import ChunkAttentionMixin


# ---- the module ------------------------------------------------------------------------------

class SDPAAttention(ChunkAttentionMixin, DotProductAttention):
    """Megatron-core's DotProductAttention computed by torch's fused SDPA kernels.

    Drop-in `core_attention` of the local spec (constructor, attributes and state dict are
    DotProductAttention's), for stock use and under ISO. It makes the causal form itself
    (bottom-right for an ISO chunk), so it needs no causal mask from its caller
    (`needs_causal_mask = False`: the ISO block builds no chunk mask, generate passes none).
    """

    needs_causal_mask = False

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAAttention: softmax_type={config.softmax_type!r} is not supported "
                             "(its softmax offset has no SDPA form); use DotProductAttention")
        if is_layer_window_attention(getattr(config, "window_size", None),
                                     getattr(config, "window_attn_skip_freq", None), layer_number):
            raise ValueError(f"SDPAAttention: sliding-window attention (window_size="
                             f"{config.window_size}) is not supported; use DotProductAttention")
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        # DotProductAttention divides softmax_scale by the layer number under
        # apply_query_key_layer_scaling and its softmax multiplies it back: the net scale is this
        self.sdpa_scale = (self.hidden_size_per_attention_head ** -0.5 if softmax_scale is None
                           else softmax_scale)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("SDPAAttention: packed sequences (packed_seq_params) are not supported; "
                             "use TEDotProductAttention")
        if attention_bias is not None:
            raise ValueError("SDPAAttention: attention_bias is not supported")
        sq, b, heads, _ = query.shape
        sk = key.size(0)
        if key.size(2) == 0 or heads % key.size(2):
            raise ValueError(f"SDPAAttention: {heads} query heads cannot share {key.size(2)} K/V groups")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = self.chunk_causal or (mask_type == AttnMaskType.causal and sq == sk)
        if not causal and mask_type == AttnMaskType.causal and sq > 1 and attention_mask is None:
            raise ValueError(f"SDPAAttention: causal attention of {sq} queries over {sk} keys "
                             "outside an ISO chunk needs an explicit mask (as DotProductAttention)")
        masked = self._check_mask(attention_mask, b, heads, sq, sk)
        if masked is not None and causal:
            masked = masked | bottom_right_causal_mask(sq, sk, masked.device)

        # [s, b, heads, hn] -> [b, heads, s, hn] (views)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.attention_dropout.p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            if masked is not None:
                out = masked_attention(q, k, v, masked, self.sdpa_scale, dropout_p)
            elif causal:
                out = causal_attention(q, k, v, self.sdpa_scale, dropout_p)
            else:
                out = grouped_sdpa(q, k, v, dropout_p=dropout_p, scale=self.sdpa_scale)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    @staticmethod
    def _check_mask(mask, b: int, heads: int, sq: int, sk: int):
        if mask is None:
            return None
        if mask.dtype != torch.bool:
            raise ValueError(f"SDPAAttention: attention_mask must be bool (True = masked), got {mask.dtype}")
        shape = tuple(mask.shape)
        if (len(shape) != 4 or shape[2:] != (sq, sk) or shape[0] not in (1, b)
                or shape[1] not in (1, heads)):
            raise ValueError(f"SDPAAttention: attention_mask of shape {shape} does not broadcast to "
                             f"[b={b}, heads={heads}, sq={sq}, sk={sk}]")
        return mask

    def _dropout_rng(self, dropout_p: float):
        """As DotProductAttention: dropout under the model-parallel RNG tracker."""
        if dropout_p and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return nullcontext()


def sdpa_layer_spec(base_spec=None):
    """Copy of a local GPT layer spec with core attention DotProductAttention -> SDPAAttention
    (default: `get_gpt_layer_local_spec()`); everything else, state-dict keys included, kept."""
    from .api import _swap_spec
    from .layers import ISODotProductAttention

    if base_spec is None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        base_spec = get_gpt_layer_local_spec()
    mapping = {DotProductAttention: SDPAAttention, ISODotProductAttention: SDPAAttention}
    spec = _swap_spec(base_spec, mapping)
    if not _holds(spec, SDPAAttention):
        raise ValueError("sdpa_layer_spec: the spec has no DotProductAttention core attention "
                         "(SDPAAttention replaces the local spec's; TE specs keep TE's)")
    return spec


def _holds(obj, cls) -> bool:
    """Whether a spec tree names `cls` anywhere."""
    import dataclasses
    import functools

    from megatron.core.transformer.spec_utils import ModuleSpec

    if obj is cls:
        return True
    if isinstance(obj, ModuleSpec):
        return _holds(obj.module, cls) or _holds(obj.submodules, cls)
    if isinstance(obj, functools.partial):
        return _holds(obj.func, cls)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_holds(getattr(obj, f.name), cls) for f in dataclasses.fields(obj))
    return False
