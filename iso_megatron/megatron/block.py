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
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from .. import comm
from ..config import ISOConfig, tp_divisibility_error
from ..planner import Environment, PrefillPlan, chunk_boundaries, plan_prefill, stock
from ..schedule import run_prefill
from ..shape import ModelShape
from . import compat
from .layers import ChunkAttentionMixin, DeferredReduceMixin, ISOSelfAttention

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
            f"{layer.layer_number}; supported: megatron-core DotProductAttention (local spec), "
            "iso_megatron's SDPAAttention and TEDotProductAttention")
    for name, linear in (("self_attention.linear_proj", attn.linear_proj),
                         ("mlp.linear_fc2", getattr(layer.mlp, "linear_fc2", None))):
        if not isinstance(linear, DeferredReduceMixin):
            raise ValueError(f"ISO: layer {layer.layer_number} {name} is "
                             f"{type(linear).__name__}, not a row-parallel linear ISO can defer "
                             "(MoE and custom MLPs are not supported)")
        if not linear.skip_bias_add:
            raise ValueError(f"ISO: layer {layer.layer_number} {name} must have skip_bias_add=True")
    if getattr(layer.config, "flash_decode", False) and not isinstance(attn, ISOSelfAttention):
        raise ValueError(f"ISO: layer {layer.layer_number} uses flash_decode, which needs "
                         f"ISOSelfAttention (its chunks' RoPE), not {type(attn).__name__}")
    if type(layer.cross_attention).__name__ != "IdentityOp":
        raise ValueError(f"ISO: layer {layer.layer_number} has cross-attention (decoder-only only)")


# ---- deciding whether a forward is an ISO prefill -------------------------------------------

# (rotary_pos_cos / rotary_pos_sin come with flash_decode, handled by ISOSelfAttention)
_UNSUPPORTED_ARGS = ("packed_seq_params", "attention_bias", "context", "rotary_pos_cos_sin")


def plan_forward(iso: Optional[ISOConfig], config, training: bool, hidden_states, args,
                 group, layers=None, pipeline_stages: int = 1, stage_link=None) -> PrefillPlan:
    """The plan of this forward: what only Megatron knows here, then `planner.plan_prefill`
    (`pipeline_stages` > 1: this block is one stage of a chunked pipeline prefill, `stage_link`
    the measured link between stages, a `costmodel.P2PLink`).

    `layers` (the layers ISO would run) give split="auto" its calibration on the model's own
    layer and attention (`step_probe`, `attention_kind`); without them it calibrates on
    miniatures."""
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
    if getattr(config, "flash_decode", False) and ctx is None:
        # megatron turns RoPE into flash-decode's cos/sin form in any attention given a KV
        # cache, but the model computed the stock form for a forward without one; ISO's chunks
        # would need a private cache, so they would lose RoPE
        return stock("flash_decode without an inference context")
    if getattr(config, "fused_single_qkv_rope", False):
        # megatron fuses QKV+RoPE only for forwards without an inference context (and asserts
        # with one), while ISO's chunks attend through a KV cache; flash_decode is handled
        # (ISOSelfAttention) and changes only decode, which runs stock
        return stock("fused_single_qkv_rope: megatron runs it only without a KV cache")
    why = compat.unsupported_forward(config, args)
    if why:
        return stock(why)
    seq_len = hidden_states.size(0)
    mask = args.get("attention_mask")
    if mask is not None and tuple(mask.shape[-2:]) != (seq_len, seq_len):
        return stock("attention mask is not [.., s, s]")
    auto = bool(layers) and isinstance(iso.split, str) and iso.split == "auto"
    env = Environment(hidden_states.device, config.params_dtype, group,
                      step_probe(layers, hidden_states, args) if auto else None,
                      attention_kind(layers) if auto else None, stage_link)
    return plan_prefill(iso, ModelShape.from_megatron_config(config), seq_len, hidden_states.size(1),
                        comm.tp_size(group), env, pipeline_stages)


def attention_kind(layers) -> str:
    """What the calibration should time (`planner.Environment.attention`): "unfused" for the
    local spec's DotProductAttention (scores of the whole [chunk, keys] rectangle), "fused" for
    SDPAAttention and TE's (causal kernels that skip the masked blocks)."""
    from .attention import SDPAAttention

    core = layers[0].self_attention.core_attention
    unfused = isinstance(core, DotProductAttention) and not isinstance(core, SDPAAttention)
    return "unfused" if unfused else "fused"


class _NoReduce:
    """A reducer that starts nothing (the calibration's probe must not communicate)."""

    def __init__(self, group):
        pass

    def start(self, tensor):
        return self

    def wait(self):
        pass


def step_probe(layers, hidden_states, args, tokens: int = 128):
    """`probe(k)` for split="auto"'s calibration (`planner.Environment.step_probe`): the first
    of `layers` over the first `tokens` rows of this forward's `hidden_states`, run as an ISO
    prefill in k even chunks through the real chunk path (megatron's Python included); returns
    the number of chunks it ran (fewer for a prompt shorter than k). No collective (its reduces
    start nothing), K/V in a private cache (never the caller's), no autograd; the output is
    dropped. Building it costs a closure: it runs only when a calibration happens."""

    def probe(k: int) -> int:
        n = min(tokens, hidden_states.size(0))
        bounds = chunk_boundaries(n, min(k, n), "even", tile=1)
        with comm.use_reducer(_NoReduce), torch.no_grad():
            _prefill(layers[:1], hidden_states[:n], bounds, {**args, "inference_context": None})
        return len(bounds) - 1

    # the rows one call runs: the calibration's per-token term is measured on them
    probe.tokens, probe.batch = min(tokens, hidden_states.size(0)), hidden_states.size(1)
    return probe


def chunk_mask(mask, start: int, end: int, device, causal: bool = True):
    """Mask rows for queries [start, end) against keys [0, end); True = masked.

    The caller's mask sliced to the chunk (contiguous: fused masked-softmax kernels assume it),
    else the causal one when the attention needs it (`causal`), else None. Built per call and
    dropped after it, so a prefill never holds more mask than one chunk's.
    """
    if mask is not None:
        return mask[..., start:end, :end].contiguous()
    if not causal:
        return None
    return torch.ones(end - start, end, dtype=torch.bool, device=device).triu(start + 1)[None, None]


# ---- the chunk steps of megatron-core layers --------------------------------------------

class MegatronChunkOps:
    """The chunk steps of megatron-core TransformerLayers (what the stock layer does, per chunk).

    Attention for chunk c goes through megatron's static KV-cache path with the cache offset at
    the chunk's first token; the core attention knows it runs a later chunk (`chunk_causal`)
    and gets a mask only where it needs one. Without a caller's inference context a private one
    holds the K/V: one buffer pair, handed on to the next layer once a layer's last chunk has
    attended.
    """

    def __init__(self, layers, bounds, args, batch_size: int, device):
        self.layers, self.bounds, self.device = layers, bounds, device
        self.mask = args.get("attention_mask")
        self.ctx = args.get("inference_context")
        self.private_kv = self.ctx is None
        if self.private_kv:
            self.ctx = StaticInferenceContext(batch_size, bounds[-1])
        self.attn_kwargs = {k: args.get(k) for k in
                            ("rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin", "sequence_len_offset")}

    def attention(self, i, c, hidden):
        layer = self.layers[i]
        start, end = self.bounds[c], self.bounds[c + 1]
        mask = chunk_mask(self.mask, start, end, self.device,
                          causal=layer.self_attention.core_attention.needs_causal_mask)
        self.ctx.sequence_len_offset = start
        try:
            out = layer.self_attention(layer.input_layernorm(hidden), attention_mask=mask,
                                       inference_context=self.ctx, **self.attn_kwargs)
        finally:
            self.ctx.sequence_len_offset = 0  # as the caller left it (ISO runs only at offset 0)
        if self.private_kv and c == len(self.bounds) - 2:
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
                layer.self_attention.core_attention, layer.self_attention)]
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


def _prefill(layers, hidden_states, bounds, args, final=None, pipe=None):
    """The ISO prefill of `layers` over `hidden_states` [s, b, h]: the output [s, b, h], each
    chunk copied into it (after `final`, e.g. the final layernorm) and dropped, so at most one
    chunk's `final` output exists beside the chunks and the output (stock: the whole
    sequence's final-layernorm output beside its input). `pipe` (a pipeline stage's
    `pipeline.PipelineIO` for these bounds): the chunks arrive in `hidden_states` from the stage
    before, and leave for the next one, as the stage schedule says."""
    chunks = [hidden_states[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
    ops = MegatronChunkOps(layers, bounds, args, hidden_states.size(1), hidden_states.device)
    reducer = comm.make_reducer(_tp_group(layers))
    with iso_mode(layers):
        chunks = run_prefill(ops, len(layers), chunks, reducer, pipe=pipe)
    out = None
    for c in range(len(chunks)):
        chunk, chunks[c] = chunks[c], None
        if final is not None:
            chunk = final(chunk)
        if out is None:  # the dtype the layers (and `final`) produce, as stock's output has
            out = chunk.new_empty((hidden_states.size(0),) + tuple(chunk.shape[1:]))
        out[bounds[c]:bounds[c + 1]] = chunk
    return out


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
                            _tp_group([self]), [self])
        self.iso_plan = plan
        if plan.bounds is None:
            return super().forward(*args, **kwargs)
        if not self._warned_single and self.layer_number == 1:
            warnings.warn("ISO layers run inside a stock TransformerBlock overlap within each "
                          "layer only; call iso_megatron.apply_iso(model) for cross-layer overlap")
            self._warned_single = True
        return _prefill([self], hidden_states, plan.bounds, bound), bound.get("context")


class ISOTransformerBlock(TransformerBlock):
    """TransformerBlock whose prefill runs the ISO schedule across all its layers.

    `iso_plan` (a `planner.PrefillPlan`) records what the latest forward ran: chunk bounds,
    or None with the reason the stock path ran. Launchers, benchmarks and tests read it.
    """

    iso_config: Optional[ISOConfig] = None
    iso_plan: Optional[PrefillPlan] = None

    def forward(self, *args, pipeline=None, **kwargs):
        """`pipeline` (a `pipeline.PipelineIO`, passed by `pipeline.pipeline_forward` through
        GPTModel's extra_block_kwargs): this block is one stage of a pipeline and moves the
        prefill's hidden states itself — chunk by chunk under ISO, whole where it runs stock."""
        call = _BLOCK_FORWARD.bind(self, *args, **kwargs)
        bound = call.arguments
        bound["hidden_states"] = compat.unwrap(bound["hidden_states"])  # unwraps only once
        hidden_states = bound["hidden_states"] if self.pre_process else self.input_tensor
        if len(self.layers) == 0:
            plan = stock("no layers in this block")
        else:
            # split="auto" in a pipeline: planned on the first stage alone (every stage must cut
            # the same chunks), the plan handed to the others
            auto = pipeline is not None and self.iso_config is not None and self.iso_config.split == "auto"
            plan = error = link = None
            if auto and self.iso_config.enabled:  # every stage takes part in measuring the stage link
                link = pipeline.measure_link(self.config.hidden_size, pipeline.dtype(self.config),
                                             hidden_states.device)
            if not auto or pipeline.first:
                try:
                    plan = plan_forward(self.iso_config, self.config, self.training, hidden_states, bound,
                                        _tp_group(self.layers), list(self.layers),
                                        1 if pipeline is None else pipeline.stages, link)
                except Exception as e:  # the other stages wait for this plan: tell them, then raise
                    if not auto:
                        raise
                    error = f"{type(e).__name__}: {e}"
            if auto:
                plan, error = pipeline.first_stage_plan((plan, error))
                if error is not None:
                    raise RuntimeError(f"ISO split='auto' failed on the first pipeline stage: {error}")
        self.iso_plan = plan
        if plan.bounds is None:
            if pipeline is not None and not pipeline.first:
                pipeline.recv_whole()  # into self.input_tensor
            out = super().forward(*call.args[1:], **call.kwargs)
            if pipeline is not None and not pipeline.last:
                pipeline.send_whole(out)
            return out
        return _prefill(list(self.layers), hidden_states, plan.bounds, bound, self.final_layernorm,
                        None if pipeline is None else pipeline.with_bounds(plan.bounds))
