"""The ISO transformer block and layer: megatron-core's own, with a chunked, overlapped prefill.

The executor (`schedule.run_prefill`) walks the schedule; `MegatronChunkOps` does, per step,
what the stock layer does for the whole sequence, on one chunk:
  attn compute   input_layernorm -> self_attention (linear_proj's reduce deferred)
  mlp compute    pre_mlp_layernorm -> mlp (linear_fc2's reduce deferred)
  reduce         start the all-reduce of that partial sum
  finish         wait for it, then the stock bias-dropout-add onto the residual

Anything ISO does not handle (training, TP 1, decode, short prompts, packed sequences,
dynamic batching, ...) runs the stock code unchanged: `plan_forward` checks what only Megatron
knows, `planner.plan_prefill` the rest. What a forward ran is recorded in ONE place: the block's
(or, used alone, the layer's) `iso_plan`, a `planner.PrefillPlan` (bounds None = stock).
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from .. import comm
from ..config import ISOConfig, tp_divisibility_error
from ..planner import Environment, PrefillPlan, plan_prefill, stock
from ..schedule import run_prefill
from ..shape import ModelShape
from . import compat
from .layers import ChunkAttentionMixin, DeferredReduceMixin

_BLOCK_FORWARD = inspect.signature(TransformerBlock.forward)
_LAYER_FORWARD = inspect.signature(TransformerLayer._forward_attention)


# ---- validation ---------------------------------------------------------------------------

def check_config(config, tp_size: int) -> None:
    """ValueError naming the problem if ISO cannot run this TransformerConfig at this TP size."""
    if getattr(config, "sequence_parallel", False):
        raise ValueError("ISO needs sequence_parallel=False: it overlaps the TP all-reduce, "
                         "which sequence parallelism replaces by reduce-scatter/all-gather")
    error = tp_divisibility_error(config.num_attention_heads, config.num_query_groups, tp_size)
    if error:
        raise ValueError(error)


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

_UNSUPPORTED_ARGS = ("packed_seq_params", "attention_bias", "context", "rotary_pos_cos",
                     "rotary_pos_sin", "rotary_pos_cos_sin")


def plan_forward(iso: Optional[ISOConfig], config, training: bool, hidden_states, args,
                 group) -> PrefillPlan:
    """The plan of this forward: what only Megatron knows here, then `planner.plan_prefill`."""
    if iso is None or not iso.enabled:
        return stock("ISO disabled")
    if training:
        return stock("training")
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return stock("autograd: deferred in-place reduces are not differentiable here")
    ctx = args.get("inference_context")
    if ctx is None and args.get("inference_params") is not None:  # megatron's deprecated alias
        ctx = args["inference_context"] = args["inference_params"]
    if ctx is not None and not (ctx.is_static_batching() and not ctx.is_decode_only()
                                and ctx.sequence_len_offset == 0):
        return stock("decode step, continued prefill or dynamic batching")
    unsupported = [k for k in _UNSUPPORTED_ARGS if args.get(k) is not None]
    if unsupported:
        return stock(f"forward argument {unsupported[0]} is not supported by ISO")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return stock("fp8/fp4")
    if getattr(config, "flash_decode", False) or getattr(config, "fused_single_qkv_rope", False):
        return stock("flash_decode / fused_single_qkv_rope")  # their static-context branches assume decode
    why = compat.unsupported_forward(config, args)
    if why:
        return stock(why)
    seq_len = hidden_states.size(0)
    mask = args.get("attention_mask")
    if mask is not None and tuple(mask.shape[-2:]) != (seq_len, seq_len):
        return stock("attention mask is not [.., s, s]")
    env = Environment(hidden_states.device, config.params_dtype, group)
    return plan_prefill(iso, ModelShape.from_megatron_config(config), seq_len, hidden_states.size(1),
                        comm.tp_size(group), env)


def chunk_mask(mask, start: int, end: int, device):
    """Mask rows for queries [start, end) against keys [0, end); True = masked."""
    if mask is not None:  # contiguous: fused masked-softmax kernels assume it
        return mask[..., start:end, :end].contiguous()
    return torch.ones(end - start, end, dtype=torch.bool, device=device).triu(start + 1)[None, None]


# ---- the chunk steps of megatron-core layers --------------------------------------------

class MegatronChunkOps:
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


def _tp_group(layers):
    return compat.tp_group(layers[0].self_attention.linear_proj)


def _prefill(layers, hidden_states, bounds, args):
    chunks = [hidden_states[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
    ops = MegatronChunkOps(layers, bounds, args, hidden_states.size(1), hidden_states.device)
    reducer = comm.make_reducer(_tp_group(layers))
    with iso_mode(layers):
        return run_prefill(ops, len(layers), chunks, reducer)


# ---- the modules ---------------------------------------------------------------------------

class ISOTransformerLayer(TransformerLayer):
    """TransformerLayer that checks, at build time, that ISO can run it.

    Called on its own by a stock TransformerBlock it runs the ISO schedule over itself
    (overlap within the layer only); inside an ISOTransformerBlock the block schedules all
    layers together, so the last chunk's MLP reduce overlaps the next layer's attention.
    """

    in_iso_block = False  # set by apply_iso: the block has already decided for this forward
    iso_plan: Optional[PrefillPlan] = None  # used alone: what the latest forward ran
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
        plan = plan_forward(self.iso_config, self.config, self.training, hidden_states, bound,
                            _tp_group([self]))
        self.iso_plan = plan
        if plan.bounds is None:
            return super().forward(*args, **kwargs)
        if not self._warned_single and self.layer_number == 1:
            warnings.warn("ISO layers run inside a stock TransformerBlock overlap within each "
                          "layer only; call iso_megatron.apply_iso(model) for cross-layer overlap")
            self._warned_single = True
        chunks = _prefill([self], hidden_states, plan.bounds, bound)
        return torch.cat(chunks, dim=0), bound.get("context")


class ISOTransformerBlock(TransformerBlock):
    """TransformerBlock whose prefill runs the ISO schedule across all its layers.

    `iso_plan` (a `planner.PrefillPlan`) records what the latest forward ran: chunk bounds,
    or None with the reason the stock path ran. Launchers, benchmarks and tests read it.
    """

    iso_config: Optional[ISOConfig] = None
    iso_plan: Optional[PrefillPlan] = None

    def forward(self, *args, **kwargs):
        call = _BLOCK_FORWARD.bind(self, *args, **kwargs)
        bound = call.arguments
        bound["hidden_states"] = compat.unwrap(bound["hidden_states"])  # unwraps only once
        hidden_states = bound["hidden_states"] if self.pre_process else self.input_tensor
        if len(self.layers) == 0:
            plan = stock("no layers in this block")
        else:
            plan = plan_forward(self.iso_config, self.config, self.training, hidden_states, bound,
                                _tp_group(self.layers))
        self.iso_plan = plan
        if plan.bounds is None:
            return super().forward(*call.args[1:], **call.kwargs)
        chunks = _prefill(list(self.layers), hidden_states, plan.bounds, bound)
        if self.final_layernorm is not None:
            chunks = [self.final_layernorm(c) for c in chunks]
        return torch.cat(chunks, dim=0)
