"""The ISO transformer block and layer: megatron-core's own, with a chunked, overlapped prefill.

`run_prefill` is the executor: it walks `schedule.prefill_schedule` and does, per step, what
the stock layer does for the whole sequence, on one chunk (`MegatronSteps`; the Hugging Face
path supplies its own steps to the same executor):
  attn compute   input_layernorm -> self_attention (linear_proj's reduce deferred)
  mlp compute    pre_mlp_layernorm -> mlp (linear_fc2's reduce deferred)
  reduce         start the all-reduce of that partial sum
  finish         wait for it, then the stock bias-dropout-add onto the residual

Anything ISO does not handle (training, TP 1, decode, short prompts, packed sequences,
dynamic batching, ...) runs the stock code unchanged: `plan_prefill` decides.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import List, Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from . import compat
from .comm import make_reducer
from .config import ISOConfig
from .layers import ChunkAttentionMixin, DeferredReduceMixin
from .schedule import prefill_schedule
from .split import TokenCost, chunk_boundaries

_BLOCK_FORWARD = inspect.signature(TransformerBlock.forward)
_LAYER_FORWARD = inspect.signature(TransformerLayer._forward_attention)


# ---- validation ---------------------------------------------------------------------------

def check_config(config, tp_size: int) -> None:
    """ValueError naming the problem if ISO cannot run this TransformerConfig at this TP size."""
    if getattr(config, "sequence_parallel", False):
        raise ValueError("ISO needs sequence_parallel=False: it overlaps the TP all-reduce, "
                         "which sequence parallelism replaces by reduce-scatter/all-gather")
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    if heads % tp_size:
        raise ValueError(f"num_attention_heads ({heads}) is not divisible by the "
                         f"tensor-parallel size ({tp_size})")
    if groups % tp_size and tp_size % groups:  # megatron replicates K/V heads when tp > groups
        raise ValueError(f"num_query_groups ({groups}) must be a multiple or divisor of the "
                         f"tensor-parallel size ({tp_size})")


def check_layer(layer: TransformerLayer) -> None:
    """ValueError naming the part of a built layer that ISO cannot run."""
    attn = getattr(layer, "self_attention", None)
    if attn is None or not hasattr(attn, "linear_proj"):
        raise ValueError(f"ISO: layer {layer.layer_number} has no self_attention.linear_proj")
    if not isinstance(attn.core_attention, ChunkAttentionMixin):
        raise ValueError(
            f"ISO: unsupported attention backend {type(attn.core_attention).__name__} in layer "
            f"{layer.layer_number}; supported: megatron-core DotProductAttention (local spec) "
            "and TEDotProductAttention")
    for name, linear in (("self_attention.linear_proj", attn.linear_proj),
                         ("mlp.linear_fc2", getattr(layer.mlp, "linear_fc2", None))):
        if not isinstance(linear, DeferredReduceMixin):
            raise ValueError(f"ISO: layer {layer.layer_number} {name} is "
                             f"{type(linear).__name__}, not a row-parallel linear ISO can defer "
                             "(MoE and custom MLPs are not supported)")
        if not linear.skip_bias_add:
            raise ValueError(f"ISO: layer {layer.layer_number} {name} must have skip_bias_add=True")
    if type(layer.cross_attention).__name__ != "IdentityOp":
        raise ValueError(f"ISO: layer {layer.layer_number} has cross-attention (decoder-only only)")


# ---- deciding whether a forward is an ISO prefill -------------------------------------------

def plan_prefill(iso: Optional[ISOConfig], config, training: bool, hidden_states, args) -> Optional[List[int]]:
    """Chunk boundaries when this forward should run the ISO schedule, else None (stock)."""
    if iso is None or not iso.enabled or training or iso.num_chunks < 2:
        return None
    if compat.tp_world_size() < 2:
        return None  # nothing to overlap
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return None  # autograd through deferred in-place reduces is not supported: stock path
    seq_len = hidden_states.size(0)
    if seq_len < max(iso.min_tokens, 2):
        return None
    ctx = args.get("inference_context")
    if ctx is None and args.get("inference_params") is not None:  # megatron's deprecated alias
        ctx = args["inference_context"] = args["inference_params"]
    if ctx is not None and not (ctx.is_static_batching() and not ctx.is_decode_only()
                                and ctx.sequence_len_offset == 0):
        return None  # decode steps, chunked continuation, dynamic batching: stock
    if any(args.get(k) is not None for k in
           ("packed_seq_params", "attention_bias", "context", "rotary_pos_cos", "rotary_pos_sin",
            "rotary_pos_cos_sin")):
        return None
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return None
    if getattr(config, "flash_decode", False) or getattr(config, "fused_single_qkv_rope", False):
        return None  # their static-context branches assume decode (one position's RoPE)
    mask = args.get("attention_mask")
    if mask is not None and tuple(mask.shape[-2:]) != (seq_len, seq_len):
        return None
    cost = TokenCost.from_dims(config.hidden_size, config.ffn_hidden_size,
                               config.kv_channels * (config.num_query_groups or config.num_attention_heads),
                               config.gated_linear_unit)
    if iso.split == "auto":
        from .autosplit import auto_boundaries

        bounds = auto_boundaries(config, seq_len, hidden_states.size(1), compat.tp_world_size(),
                                 iso.num_chunks, cost)
    else:
        bounds = chunk_boundaries(seq_len, iso.num_chunks, iso.split, cost)
    return bounds if bounds is not None and len(bounds) > 2 else None


def chunk_mask(mask, start: int, end: int, device):
    """Mask rows for queries [start, end) against keys [0, end); True = masked."""
    if mask is not None:  # contiguous: fused masked-softmax kernels assume it
        return mask[..., start:end, :end].contiguous()
    return torch.ones(end - start, end, dtype=torch.bool, device=device).triu(start + 1)[None, None]


# ---- the executor --------------------------------------------------------------------------

def run_prefill(steps, num_layers: int, chunks: List[torch.Tensor], reducer) -> List[torch.Tensor]:
    """Walk the ISO schedule. `steps` computes one layer part of one chunk (framework-specific):
      steps.attention(layer, chunk, hidden) -> (partial, bias)   reduce deferred
      steps.mlp(layer, chunk, hidden)       -> (partial, bias)   reduce deferred
      steps.finish(layer, part, partial, bias, residual) -> hidden
    `reducer.start(tensor)` begins an in-place all-reduce and returns a handle with `wait()`.
    Returns the output hidden states, chunk by chunk.
    """
    chunks = list(chunks)
    in_flight = {}  # (layer, part, chunk) -> [partial sum, bias, residual, reduce handle]
    try:
        for step in prefill_schedule(num_layers, len(chunks)):
            key, c = (step.layer, step.part, step.chunk), step.chunk
            if step.op == "compute":
                compute = steps.attention if step.part == "attn" else steps.mlp
                out, bias = compute(step.layer, c, chunks[c])
                in_flight[key] = [out, bias, chunks[c], None]
            elif step.op == "reduce":
                in_flight[key][3] = reducer.start(in_flight[key][0])
            else:  # finish
                out, bias, residual, handle = in_flight.pop(key)
                handle.wait()
                chunks[c] = steps.finish(step.layer, step.part, out, bias, residual)
    finally:
        for entry in in_flight.values():
            if entry[3] is not None:  # an exception mid-schedule: leave no reduce dangling
                entry[3].wait()
    return chunks


class MegatronSteps:
    """The chunk steps of megatron-core TransformerLayers (what the stock layer does, per chunk).

    Attention for chunk c goes through megatron's static KV-cache path with the cache offset at
    the chunk's first token, and an explicit mask (rows: the chunk's queries, columns: keys
    0..end). Without a caller's inference context a private one holds the K/V: one buffer pair,
    handed on to the next layer once a layer's last chunk has attended.
    """

    def __init__(self, layers, bounds, args, batch_size: int, device):
        self.layers, self.bounds = layers, bounds
        self.masks = [chunk_mask(args.get("attention_mask"), bounds[c], bounds[c + 1], device)
                      for c in range(len(bounds) - 1)]
        self.ctx = args.get("inference_context")
        self.private_kv = self.ctx is None
        if self.private_kv:
            self.ctx = StaticInferenceContext(batch_size, bounds[-1])
        self.attn_kwargs = {k: args.get(k) for k in
                            ("rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin", "sequence_len_offset")}

    def attention(self, i, c, hidden):
        layer = self.layers[i]
        self.ctx.sequence_len_offset = self.bounds[c]
        try:
            out = layer.self_attention(layer.input_layernorm(hidden), attention_mask=self.masks[c],
                                       inference_context=self.ctx, **self.attn_kwargs)
        finally:
            self.ctx.sequence_len_offset = 0  # as the caller left it (ISO runs only at offset 0)
        if self.private_kv and c == len(self.masks) - 1:
            # this layer's K/V are done with: the next layer overwrites the same buffers chunk
            # by chunk (it reads only positions its own earlier chunks wrote)
            kv = self.ctx.key_value_memory_dict.pop(layer.layer_number)
            if i + 1 < len(self.layers):
                self.ctx.key_value_memory_dict[self.layers[i + 1].layer_number] = kv
        return out

    def mlp(self, i, c, hidden):
        layer = self.layers[i]
        return layer.mlp(layer.pre_mlp_layernorm(hidden))

    def finish(self, i, part, out, bias, residual):
        layer = self.layers[i]
        bda = layer.self_attn_bda if part == "attn" else layer.mlp_bda
        with layer.bias_dropout_add_exec_handler():
            return bda(layer.training, layer.config.bias_dropout_fusion)(
                (out, bias), residual, layer.hidden_dropout)


@contextmanager
def iso_mode(layers):
    """Row-parallel reduces deferred and chunk-causal attention on, for one prefill."""
    modules = [m for layer in layers for m in
               (layer.self_attention.linear_proj, layer.mlp.linear_fc2,
                layer.self_attention.core_attention)]
    try:
        for m in modules:
            if isinstance(m, DeferredReduceMixin):
                m.defer_reduce = True
            else:
                m.chunk_causal = True
        yield
    finally:
        for m in modules:
            m.__dict__.pop("defer_reduce", None)
            m.__dict__.pop("chunk_causal", None)


def _prefill(layers, hidden_states, bounds, args):
    chunks = [hidden_states[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
    steps = MegatronSteps(layers, bounds, args, hidden_states.size(1), hidden_states.device)
    reducer = make_reducer(compat.tp_group(layers[0].self_attention.linear_proj))
    with iso_mode(layers):
        return run_prefill(steps, len(layers), chunks, reducer)


# ---- the modules ---------------------------------------------------------------------------

class ISOTransformerLayer(TransformerLayer):
    """TransformerLayer that checks, at build time, that ISO can run it.

    Called on its own by a stock TransformerBlock it runs the ISO schedule over itself
    (overlap within the layer only); inside an ISOTransformerBlock the block schedules all
    layers together, so the last chunk's MLP reduce overlaps the next layer's attention.
    """

    in_iso_block = False  # set by apply_iso: the block has already decided for this forward
    _warned_single = False

    def __init__(self, config, submodules, *args, iso_config: Optional[ISOConfig] = None, **kwargs):
        check_config(config, compat.tp_world_size())
        super().__init__(config, submodules, *args, **kwargs)
        check_layer(self)
        self.iso_config = iso_config if iso_config is not None else ISOConfig()

    def forward(self, *args, **kwargs):
        if self.in_iso_block or not self.iso_config.enabled or self.training:
            return super().forward(*args, **kwargs)
        bound = _LAYER_FORWARD.bind(self, *args, **{k: v for k, v in kwargs.items()
                                                    if k != "dynamic_inference_decode_only"}).arguments
        hidden_states = bound["hidden_states"]
        bounds = plan_prefill(self.iso_config, self.config, self.training, hidden_states, bound)
        if bounds is None:
            return super().forward(*args, **kwargs)
        if not self._warned_single and self.layer_number == 1:
            warnings.warn("ISO layers run inside a stock TransformerBlock overlap within each "
                          "layer only; call iso_megatron.apply_iso(model) for cross-layer overlap")
            self._warned_single = True
        chunks = _prefill([self], hidden_states, bounds, bound)
        return torch.cat(chunks, dim=0), bound.get("context")


class ISOTransformerBlock(TransformerBlock):
    """TransformerBlock whose prefill runs the ISO schedule across all its layers."""

    iso_config: Optional[ISOConfig] = None
    last_bounds: Optional[List[int]] = None  # chunk boundaries of the last forward; None = stock

    def forward(self, *args, **kwargs):
        call = _BLOCK_FORWARD.bind(self, *args, **kwargs)
        bound = call.arguments
        bound["hidden_states"] = compat.unwrap(bound["hidden_states"])  # unwraps only once
        hidden_states = bound["hidden_states"] if self.pre_process else self.input_tensor
        bounds = plan_prefill(self.iso_config, self.config, self.training, hidden_states, bound)
        if len(self.layers) == 0:
            bounds = None
        self.last_bounds = bounds
        if bounds is None:
            return super().forward(*call.args[1:], **call.kwargs)
        chunks = _prefill(list(self.layers), hidden_states, bounds, bound)
        if self.final_layernorm is not None:
            chunks = [self.final_layernorm(c) for c in chunks]
        return torch.cat(chunks, dim=0)
