"""ISO for Hugging Face decoder models under DeepSpeed AutoTP (no kernel injection).

AutoTP turns each decoder layer's row-parallel linears (attention output projection, MLP down
projection) into DeepSpeed `LinearAllreduce` modules whose all-reduce is synchronous. ISO swaps
classes only (no parameter added or renamed, the same state-dict keys):

  - the two linears -> `ISOLinearAllreduce`: with `defer_reduce` on, forward returns the rank's
    partial sum only; the schedule starts the all-reduce (async) and adds the bias after it,
    exactly as the stock forward does;
  - the stack's ModuleList -> `ISODecoderLayers`; the module that owns it (LlamaModel,
    OPTDecoder, ...) keeps its class (transformers keys its output-capture registry on the class
    name) and gets a forward pre-hook and an always-called forward hook that open and close the
    list's forward scope. Inside it, the model's own layer loop (`for layer in self.layers[...]`)
    receives ONE entry in place of layer 0: called like layer 0, it is the single entry point
    of the forward. It asks the
    planner (`ISOStack.plan`); for an ISO prefill it runs every layer with the ISO schedule
    (`schedule.run_prefill`, the same executor as the Megatron path, over `HFChunkOps`) and the
    loop ends; otherwise it runs layer 0 stock and the loop goes on with layers 1..N-1.

Per chunk, the layer's own attention module runs on the chunk's queries with the chunk's RoPE
(cos/sin rows) and position ids, appends the chunk's K/V to the HF cache (a private DynamicCache
when the caller has none), and attends over keys 0..end with the model's own 4-D mask sliced to
[chunk rows, :end] (padding included); where the model relied on sdpa's `is_causal` (no mask),
a later chunk gets `BottomRightCausal`, which sdpa runs as bottom-right causal attention without
building a mask. So the cache comes out as the stock prefill's and `generate()` continues on the
stock path.

Everything else runs the stock code (`ISOStack.plan` decides, with `planner.plan_prefill` for
the split, `auto` included): TP 1, training, autograd, decode (one token or a non-empty cache),
prompts shorter than `min_tokens`, caches other than DynamicCache, prompts reaching a sliding
window, flash/flex attention, output_attentions / output_hidden_states. What the latest forward
ran is recorded in ONE place: `ISOStack.iso_plan` (`iso_stacks(model)`), a `planner.PrefillPlan`.

Families (`FAMILIES`): Llama, Mistral, Qwen2 (RMSNorm, SwiGLU, RoPE, GQA), OPT (LayerNorm,
biases, pre- or post-LN), GPT-NeoX / Pythia (use_parallel_residual True or False), GPT-J, Falcon
(the 7B layout with parallel_attn, new_decoder_architecture, or sequential) and Phi (partial
RoPE, biases). Parallel-residual layers (attention and MLP read the same input and land on the
same residual: Pythia, GPT-J, Falcon, Phi) run `schedule.schedule_for(..., parallel_residual=True)`: per layer
chunk, the attention and MLP partial sums are added locally and reduced ONCE (both biases after
the reduce, as each LinearAllreduce adds its own), half the all-reduces of stock AutoTP.
Refused with a ValueError (stock AutoTP itself is wrong or ISO cannot follow): Falcon's
multi-query fused QKV in the 7B layout (AutoTP splits it as if every head had its own K/V and the
forward fails) and Falcon with ALiBi.

Padded batches (left padding + attention_mask, as generate() passes them) run ISO: the model's
own 4-D mask is sliced per chunk, so every real position equals stock.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from deepspeed.module_inject.layers import LinearAllreduce, add_bias

from iso_megatron import comm
from iso_megatron.classes import swap_classes
from iso_megatron.config import ISOConfig
from iso_megatron.planner import Environment, PrefillPlan, plan_prefill, stock
from iso_megatron.schedule import MERGED, run_prefill
from iso_megatron.shape import ModelShape

logger = logging.getLogger(__name__)


# ---- the row-parallel linear ----------------------------------------------------------------

class ISOLinearAllreduce(LinearAllreduce):
    """AutoTP's LinearAllreduce with a deferrable all-reduce; the stock module when not deferring."""

    defer_reduce = False  # set per instance around an ISO prefill

    def forward(self, input):
        if not self.defer_reduce:
            return super().forward(input)
        # The stock forward's local GEMM, without its reduce and bias (added after the reduce).
        out = torch.matmul(input, self.weight.transpose(-1, -2))
        return out if out.is_contiguous() else out.contiguous()


@contextmanager
def deferred(linears):
    try:
        for m in linears:
            m.defer_reduce = True
        yield
    finally:
        for m in linears:
            m.__dict__.pop("defer_reduce", None)


# ---- model families: what one HF decoder layer does, per part ---------------------------------

class Family:
    """What one HF decoder layer does, per part (the defaults: a sequential pre-norm layer).

    A sequential layer runs `attention`, `finish("attn")`, `mlp`, `finish("mlp")`. A
    parallel-residual layer (`parallel(layer)`: attention and MLP read the same input and land
    on the same residual) runs `parallel_parts` (both partial sums of one input) and
    `finish(MERGED)` (their one reduced sum, biases added, onto the residual).
    """

    name = "?"
    classes: tuple = ()
    passes_use_cache = True  # the stock layer hands use_cache on to its attention
    gated = False            # SwiGLU: two fc1-sized GEMMs (ModelShape.from_hf_config)
    paths: tuple = ()        # attributes `check` requires of every layer

    @staticmethod
    def attn_module(layer):
        return layer.self_attn

    @classmethod
    def check(cls, layer):
        for path in cls.paths:
            _get(layer, path)

    @staticmethod
    def refuse(layer) -> Optional[str]:
        """Why ISO must not run on this layer (stock DeepSpeed itself is wrong there), or None."""
        return None

    @staticmethod
    def parallel(layer) -> bool:
        return False

    @staticmethod
    def output(hidden):
        """The layer's return value as the model's loop expects it."""
        return hidden

    @staticmethod
    def shape_fields(config) -> dict:
        """ModelShape fields the generic reader (`ModelShape.from_hf_config`) gets wrong."""
        return {}


class LlamaFamily(Family):
    """Llama, Mistral, Qwen2: pre-RMSNorm, attention with RoPE (GQA), SwiGLU MLP."""

    name = "llama"
    classes = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
    gated = True
    paths = ("input_layernorm", "self_attn", "self_attn.o_proj", "post_attention_layernorm", "mlp",
             "mlp.down_proj")

    @staticmethod
    def attn_linear(layer):
        return layer.self_attn.o_proj

    @staticmethod
    def mlp_linear(layer):
        return layer.mlp.down_proj

    @staticmethod
    def attention(layer, hidden, kwargs):
        return layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)[0]

    @staticmethod
    def mlp(layer, hidden):
        return layer.mlp(layer.post_attention_layernorm(hidden))

    @staticmethod
    def finish(layer, part, out, residual):
        return residual + out


class OPTFamily(Family):
    """OPT: LayerNorm (before or after, per do_layer_norm_before), biases, fc1-act-fc2 MLP."""

    name = "opt"
    classes = ("OPTDecoderLayer",)
    passes_use_cache = False
    paths = ("self_attn_layer_norm", "self_attn", "self_attn.out_proj", "fc1", "fc2",
             "final_layer_norm", "activation_fn", "do_layer_norm_before", "dropout")

    @staticmethod
    def attn_linear(layer):
        return layer.self_attn.out_proj

    @staticmethod
    def mlp_linear(layer):
        return layer.fc2

    @staticmethod
    def attention(layer, hidden, kwargs):
        x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        return layer.self_attn(hidden_states=x, **kwargs)[0]

    @staticmethod
    def mlp(layer, hidden):
        x = hidden.reshape(-1, hidden.size(-1))
        if layer.do_layer_norm_before:
            x = layer.final_layer_norm(x)
        return layer.fc2(layer.activation_fn(layer.fc1(x)))

    @staticmethod
    def finish(layer, part, out, residual):
        out = F.dropout(out, p=layer.dropout, training=layer.training)
        if part == "attn":
            hidden = residual + out
            return hidden if layer.do_layer_norm_before else layer.self_attn_layer_norm(hidden)
        hidden = (residual.reshape(-1, residual.size(-1)) + out).view(residual.shape)
        return hidden if layer.do_layer_norm_before else layer.final_layer_norm(hidden)


class GPTNeoXFamily(Family):
    """GPT-NeoX / Pythia: two LayerNorms, fused QKV with partial RoPE, biases, gelu MLP;
    parallel residual where `use_parallel_residual` (the Pythia default), else sequential."""

    name = "gpt_neox"
    classes = ("GPTNeoXLayer",)
    paths = ("input_layernorm", "post_attention_layernorm", "attention", "attention.dense", "mlp",
             "mlp.dense_4h_to_h", "use_parallel_residual", "post_attention_dropout", "post_mlp_dropout")

    @staticmethod
    def attn_module(layer):
        return layer.attention

    @staticmethod
    def attn_linear(layer):
        return layer.attention.dense

    @staticmethod
    def mlp_linear(layer):
        return layer.mlp.dense_4h_to_h

    @staticmethod
    def parallel(layer) -> bool:
        return bool(layer.use_parallel_residual)

    @staticmethod
    def attention(layer, hidden, kwargs):
        return layer.attention(layer.input_layernorm(hidden), **kwargs)[0]

    @staticmethod
    def mlp(layer, hidden):
        return layer.mlp(layer.post_attention_layernorm(hidden))

    @classmethod
    def parallel_parts(cls, layer, hidden, kwargs):
        return cls.attention(layer, hidden, kwargs), cls.mlp(layer, hidden)

    @staticmethod
    def finish(layer, part, out, residual):
        if part == "attn":
            return residual + layer.post_attention_dropout(out)
        if part == "mlp":
            return residual + layer.post_mlp_dropout(out)
        return residual + out  # MERGED (eval only: ISO steps aside in training)


class GPTJFamily(Family):
    """GPT-J: one LayerNorm feeding attention (partial RoPE, no biases) and MLP (biases) in
    parallel."""

    name = "gptj"
    classes = ("GPTJBlock",)
    paths = ("ln_1", "attn", "attn.out_proj", "mlp", "mlp.fc_out")

    @staticmethod
    def attn_module(layer):
        return layer.attn

    @staticmethod
    def attn_linear(layer):
        return layer.attn.out_proj

    @staticmethod
    def mlp_linear(layer):
        return layer.mlp.fc_out

    @staticmethod
    def parallel(layer) -> bool:
        return True

    @staticmethod
    def parallel_parts(layer, hidden, kwargs):
        x = layer.ln_1(hidden)
        return layer.attn(hidden_states=x, **kwargs)[0], layer.mlp(x)

    @staticmethod
    def finish(layer, part, out, residual):
        return residual + out

    @staticmethod
    def shape_fields(config) -> dict:
        inner = getattr(config, "n_inner", None)
        return {"ffn_hidden": inner or 4 * config.hidden_size}


class FalconFamily(Family):
    """Falcon with RoPE: parallel attention/MLP (one LayerNorm, or `ln_attn`/`ln_mlp` in
    new_decoder_architecture, Falcon-40B/180B) or sequential (parallel_attn False). The layer
    returns (hidden, attention weights). Refused: multi-query in the 7B layout (stock AutoTP
    splits its fused QKV wrongly) and ALiBi."""

    name = "falcon"
    classes = ("FalconDecoderLayer",)
    paths = ("self_attention", "self_attention.dense", "mlp", "mlp.dense_4h_to_h", "config")

    @staticmethod
    def attn_module(layer):
        return layer.self_attention

    @staticmethod
    def attn_linear(layer):
        return layer.self_attention.dense

    @staticmethod
    def mlp_linear(layer):
        return layer.mlp.dense_4h_to_h

    @staticmethod
    def refuse(layer) -> Optional[str]:
        cfg = layer.config
        if cfg.multi_query and not cfg.new_decoder_architecture:
            return ("Falcon's multi-query fused QKV in the Falcon-7B layout (multi_query=True, "
                    "new_decoder_architecture=False): stock DeepSpeed AutoTP splits it across ranks as if "
                    "every head had its own K/V and the forward fails, so ISO does not run it")
        if cfg.alibi:
            return "Falcon with ALiBi (alibi=True): not supported by ISO"
        return None

    @staticmethod
    def parallel(layer) -> bool:
        return bool(layer.config.new_decoder_architecture or layer.config.parallel_attn)

    @staticmethod
    def _two_norms(layer) -> bool:
        return bool(layer.config.new_decoder_architecture and layer.config.num_ln_in_parallel_attn == 2)

    @staticmethod
    def _attend(layer, x, kwargs):
        return layer.self_attention(x, **kwargs)[0]

    @classmethod
    def parallel_parts(cls, layer, hidden, kwargs):
        if cls._two_norms(layer):
            return cls._attend(layer, layer.ln_attn(hidden), kwargs), layer.mlp(layer.ln_mlp(hidden))
        x = layer.input_layernorm(hidden)
        return cls._attend(layer, x, kwargs), layer.mlp(x)

    @classmethod
    def attention(cls, layer, hidden, kwargs):  # sequential (parallel_attn False)
        return cls._attend(layer, layer.input_layernorm(hidden), kwargs)

    @staticmethod
    def mlp(layer, hidden):
        return layer.mlp(layer.post_attention_layernorm(hidden))

    @staticmethod
    def finish(layer, part, out, residual):
        p = layer.config.attention_dropout if part == "attn" else layer.config.hidden_dropout
        return residual + F.dropout(out, p=p, training=layer.training)  # dropout_add, as stock

    @staticmethod
    def output(hidden):
        return hidden, None

    @staticmethod
    def shape_fields(config) -> dict:
        kv = config.num_kv_heads if config.new_decoder_architecture else (
            1 if config.multi_query else config.num_attention_heads)
        return {"num_query_groups": kv, "ffn_hidden": config.ffn_hidden_size or 4 * config.hidden_size}


class PhiFamily(Family):
    """Phi (phi-1, phi-1.5, phi-2): one LayerNorm feeding attention (partial RoPE, biases,
    optional q/k LayerNorm) and MLP (biases) in parallel."""

    name = "phi"
    classes = ("PhiDecoderLayer",)
    paths = ("input_layernorm", "self_attn", "self_attn.dense", "mlp", "mlp.fc2", "resid_dropout")

    @staticmethod
    def attn_linear(layer):
        return layer.self_attn.dense

    @staticmethod
    def mlp_linear(layer):
        return layer.mlp.fc2

    @staticmethod
    def parallel(layer) -> bool:
        return True

    @staticmethod
    def parallel_parts(layer, hidden, kwargs):
        x = layer.input_layernorm(hidden)
        return layer.self_attn(hidden_states=x, **kwargs)[0], layer.mlp(x)

    @staticmethod
    def finish(layer, part, out, residual):
        return residual + out


FAMILIES = (LlamaFamily, OPTFamily, GPTNeoXFamily, GPTJFamily, FalconFamily, PhiFamily)
SUPPORTED = tuple(c for fam in FAMILIES for c in fam.classes)


def _get(obj, path):
    for name in path.split("."):
        if not hasattr(obj, name):
            raise ValueError(f"ISO: {type(obj).__name__} has no {name!r} (expected {path})")
        obj = getattr(obj, name)
    return obj


def family_of(layer):
    """The family adapter of a (stock or ISO) HF decoder layer, or None."""
    for cls in type(layer).__mro__:
        for fam in FAMILIES:
            if cls.__name__ in fam.classes:
                return fam
    return None


# ---- the chunk steps ----------------------------------------------------------------------

_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")  # per family / version
_CONSUMED = ("attention_mask", "position_embeddings", "position_ids", "use_cache") + _CACHE_NAMES
_PACKED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _chunk_mask(mask, start: int, end: int):
    """Rows [start, end) of the prefill's mask over keys [0, end), in the mask's own format.

    Without a mask (sdpa attention, no padding: the model relies on sdpa's `is_causal`), chunk
    0 is a square causal block (`is_causal`, as stock) and a later chunk gets `BottomRightCausal`:
    sdpa's `is_causal` is top-left aligned (and HF would crop the keys), while this marker runs
    bottom-right causal attention with no mask built (fused kernels on CUDA, the CPU flash
    kernel's causal and unmasked forms merged by log-sum-exp on CPU).
    """
    if mask is not None:
        return mask[..., start:end, :end]
    if start == 0:
        return None
    from iso_megatron.sdpa import BottomRightCausal

    return BottomRightCausal(end - start, end)


class HFChunkOps:
    """The chunk steps of HF decoder layers, for `schedule.run_prefill`."""

    def __init__(self, stack: "ISOStack", bounds: List[int], kwargs: Dict):
        self.fam, self.layers, self.bounds = stack.family, stack.layers, bounds
        cache = _cache_arg(kwargs)
        self.private = cache is None
        if self.private:
            from transformers import DynamicCache

            cache = DynamicCache()
        mask = kwargs.get("attention_mask")
        pos_emb = kwargs.get("position_embeddings")
        pos_ids = kwargs.get("position_ids")
        extra = {k: v for k, v in kwargs.items() if k not in _CONSUMED}
        if self.fam.passes_use_cache and "use_cache" in kwargs:
            extra["use_cache"] = kwargs["use_cache"]
        self.chunk_kwargs = []
        for c in range(len(bounds) - 1):
            a, b = bounds[c], bounds[c + 1]
            kw = dict(extra, attention_mask=_chunk_mask(mask, a, b))
            kw[stack.cache_name] = cache
            if pos_ids is not None:
                kw["position_ids"] = pos_ids[..., a:b]
            if pos_emb is not None:
                kw["position_embeddings"] = tuple(t[:, a:b] for t in pos_emb)
            self.chunk_kwargs.append(kw)
        self.cache = cache

    def attention(self, i, c, hidden):
        layer = self.layers[i]
        out = self.fam.attention(layer, hidden, self.chunk_kwargs[c])
        self._attended(layer, c)
        return out, self.fam.attn_linear(layer).bias

    def mlp(self, i, c, hidden):
        layer = self.layers[i]
        return self.fam.mlp(layer, hidden), self.fam.mlp_linear(layer).bias

    def attention_mlp(self, i, c, hidden):
        """Parallel residual: both partial sums of the chunk, added here (one reduce carries
        them); both biases come after the reduce, as each LinearAllreduce adds its own."""
        layer = self.layers[i]
        attn, mlp = self.fam.parallel_parts(layer, hidden, self.chunk_kwargs[c])
        self._attended(layer, c)
        return attn.add_(mlp), (self.fam.attn_linear(layer).bias, self.fam.mlp_linear(layer).bias)

    def finish(self, i, part, out, bias, residual):
        for b in (bias if part == MERGED else (bias,)):
            out = add_bias(out, b)  # as LinearAllreduce does after its reduce
        return self.fam.finish(self.layers[i], part, out, residual)

    def _attended(self, layer, c):
        if self.private and c == len(self.chunk_kwargs) - 1:
            self._drop(self.fam.attn_module(layer).layer_idx)  # one layer's K/V alive at a time

    def _drop(self, idx):
        try:
            layer = self.cache.layers[idx]
            layer.keys = layer.values = None
            layer.is_initialized = False
        except (AttributeError, IndexError):
            pass


def _cache_arg(kwargs):
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _output_capture_active() -> bool:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return False
    try:
        return bool(_active_collector.get())
    except LookupError:
        return False


# ---- the stack ----------------------------------------------------------------------------

class ISOStack:
    """One decoder stack under ISO: its layers, their deferrable linears, the config.

    A plain object (not an nn.Module), kept in the stack list's __dict__: no state-dict entry.
    `iso_plan` records what the latest forward ran (None before the first).
    """

    def __init__(self, layers, family, iso_config: ISOConfig):
        self.layers, self.family, self.iso_config = list(layers), family, iso_config
        self.linears = [lin for layer in self.layers
                        for lin in (family.attn_linear(layer), family.mlp_linear(layer))]
        attn = family.attn_module(self.layers[0])
        self.config = getattr(attn, "config", None)
        params = inspect.signature(type(attn).forward).parameters
        self.cache_name = next((n for n in _CACHE_NAMES if n in params), "cache")
        # parallel residual: attention and MLP of a layer chunk share ONE reduce
        self.parallel = family.parallel(self.layers[0])
        shape = ModelShape.from_hf_config(self.config, family.gated, name=family.name)
        shape = dataclasses.replace(shape, **family.shape_fields(self.config))
        self.shape = dataclasses.replace(shape, parallel_residual=self.parallel)
        self.iso_plan: Optional[PrefillPlan] = None

    # -- deciding -----------------------------------------------------------------------------
    def plan(self, hidden, args, kwargs, training: bool) -> PrefillPlan:
        """What layer 0's call in this forward runs: what only HF knows, then the planner."""
        iso = self.iso_config
        if iso is None or not iso.enabled:
            return stock("ISO disabled")
        if training or args:
            return stock("training" if training else "positional layer arguments")
        if hidden.dim() != 3 or (torch.is_grad_enabled() and hidden.requires_grad):
            return stock("autograd or unexpected hidden-state shape")
        seq_len = hidden.size(1)
        lin = self.linears[0]
        if lin.mp_group is None or any(m.defer_collectives_to_compiler for m in self.linears):
            return stock("no tensor-parallel group, or collectives deferred to the compiler")
        if kwargs.get("output_attentions") or _output_capture_active():
            return stock("output_attentions / captured outputs")
        if any(kwargs.get(k) is not None for k in _PACKED):
            return stock("packed sequences")
        impl = getattr(self.config, "_attn_implementation", None)
        mask = kwargs.get("attention_mask")
        if impl not in ("sdpa", "eager"):
            return stock(f"attention implementation {impl!r}")
        if mask is None:
            if impl != "sdpa":
                return stock("eager attention without a mask")
        elif not (torch.is_tensor(mask) and mask.dim() == 4
                  and tuple(mask.shape[-2:]) == (seq_len, seq_len)):
            return stock("mask is not a [b, h, s, s] tensor (BlockMask, pre-filled cache, ...)")
        window = self._sliding_window()
        if window is not None and seq_len >= window:
            return stock(f"prompt reaches the sliding window ({window})")
        cache = _cache_arg(kwargs)
        if cache is not None and not self._fresh_dynamic_cache(cache):
            return stock("cache is not a fresh DynamicCache (decode or another cache type)")
        # sdpa without a mask runs fused causal kernels (BottomRightCausal for later chunks);
        # with a mask, and eager attention, compute the whole masked rectangle
        env = Environment(hidden.device, hidden.dtype, lin.mp_group,
                          attention="fused" if impl == "sdpa" and mask is None else "unfused")
        return plan_prefill(iso, self.shape, seq_len, hidden.size(0), comm.tp_size(lin.mp_group), env)

    def _sliding_window(self):
        cfg = self.config
        windows = [getattr(self.family.attn_module(layer), "sliding_window", None) for layer in self.layers]
        if self.family is LlamaFamily and getattr(cfg, "use_sliding_window", True):
            windows.append(getattr(cfg, "sliding_window", None))
        windows = [w for w in windows if isinstance(w, int) and w > 0]
        return min(windows) if windows else None

    @staticmethod
    def _fresh_dynamic_cache(cache) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
            return False
        if any(not isinstance(layer, DynamicLayer) for layer in cache.layers):
            return False
        return cache.get_seq_length() == 0

    # -- running --------------------------------------------------------------------------------
    def run_first_layer(self, hidden, args, kwargs, training: bool):
        """Layer 0's call in the model's loop: (output, True) when the ISO schedule ran every
        layer, (layer 0's stock output, False) otherwise."""
        plan = self.plan(hidden, args, kwargs, training)
        self.iso_plan = plan
        if plan.bounds is None:
            return self.layers[0](hidden, *args, **kwargs), False
        bounds = plan.bounds
        chunks = [hidden[:, bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
        ops = HFChunkOps(self, bounds, kwargs)
        reducer = comm.make_reducer(self.linears[0].mp_group)
        with deferred(self.linears):
            chunks = run_prefill(ops, len(self.layers), chunks, reducer, parallel_residual=self.parallel)
        # one output, each chunk copied in and dropped (the layers' dtype, as torch.cat's)
        out = chunks[0].new_empty(hidden.shape[:1] + (bounds[-1],) + tuple(chunks[0].shape[2:]))
        for c in range(len(chunks)):
            out[:, bounds[c]:bounds[c + 1]], chunks[c] = chunks[c], None
        return self.family.output(out), True


class _StackEntry:
    """What the model's layer loop receives in place of layer 0 within a forward scope."""

    def __init__(self, stack: ISOStack, layer0):
        self.stack, self.layer0, self.ran_all = stack, layer0, False

    def __call__(self, hidden_states, *args, **kwargs):
        out, self.ran_all = self.stack.run_first_layer(hidden_states, args, kwargs, self.layer0.training)
        return out

    def __getattr__(self, name):  # the loop may read layer attributes (e.g. attention_type)
        return getattr(self.layer0, name)


class ISODecoderLayers(torch.nn.ModuleList):
    """The stack's ModuleList under ISO: the same modules and keys, no parameters of its own.

    Outside a forward scope it iterates as stock. Inside one (the owner's forward, by hooks),
    iterating from its first layer yields a `_StackEntry` for layer 0, then, unless that entry
    ran the whole stack, the remaining layers.
    """

    _iso_stack: Optional[ISOStack] = None
    _in_forward = False

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if isinstance(idx, slice) and isinstance(out, ISODecoderLayers):  # self.layers[:n]
            out.__dict__.update(_iso_stack=self._iso_stack, _in_forward=self._in_forward)
        return out

    def __iter__(self):
        layers = list(self._modules.values())
        stack = self._iso_stack
        if not (self._in_forward and stack is not None and layers and layers[0] is stack.layers[0]):
            yield from layers
            return
        entry = _StackEntry(stack, layers[0])
        yield entry
        yield from layers[len(stack.layers) if entry.ran_all else 1:]

    def _open_scope(self, *_):
        self.__dict__["_in_forward"] = True

    def _close_scope(self, *_):
        self.__dict__.pop("_in_forward", None)

    def attach(self, stack: ISOStack, owner: torch.nn.Module) -> None:
        """Serve `stack`; the forward scope opens and closes with every forward of `owner`."""
        self.detach()
        self.__dict__["_iso_stack"] = stack
        self.__dict__["_iso_hooks"] = (owner.register_forward_pre_hook(self._open_scope),
                                       owner.register_forward_hook(self._close_scope, always_call=True))

    def detach(self) -> None:
        for hook in self.__dict__.pop("_iso_hooks", ()):
            hook.remove()
        self.__dict__.pop("_iso_stack", None)
        self._close_scope()


# ---- applying -----------------------------------------------------------------------------

def decoder_stacks(model):
    """[(owner module, ModuleList of decoder layers, family)] of the supported HF families in
    `model`."""
    stacks = []
    for owner in model.modules():
        for m in owner.children():
            if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
                fams = {family_of(layer) for layer in m}
                if len(fams) == 1 and None not in fams:
                    stacks.append((owner, m, fams.pop()))
    return stacks


def is_iso(model) -> bool:
    return any(isinstance(m, ISOLinearAllreduce) for m in model.modules())


def _remove(module) -> None:
    for m in module.modules():
        if type(m) is ISODecoderLayers:
            m.detach()
            m.__class__ = torch.nn.ModuleList
        elif type(m) is ISOLinearAllreduce:
            m.__class__ = LinearAllreduce
            m.__dict__.pop("defer_reduce", None)


def apply_iso_hf(model, iso_config: Optional[ISOConfig] = None):
    """Convert an HF causal LM (after DeepSpeed AutoTP) to ISO in place and return it.

    `model` may be the DeepSpeed InferenceEngine or its `.module`. Only classes change (the
    stack's owner and ModuleList, the two LinearAllreduce modules per layer);
    `apply_iso_hf(model, ISOConfig(enabled=False))` puts the stock classes back, and calling it
    again with another ISOConfig reconfigures. With no LinearAllreduce in the layers
    (tensor-parallel size 1) there is nothing to overlap and the model stays stock. ValueError
    names what ISO cannot run (kernel injection, other families).
    """
    module = getattr(model, "module", model)  # a DeepSpeed InferenceEngine holds the model in .module
    iso_config = ISOConfig() if iso_config is None else iso_config
    if not isinstance(iso_config, ISOConfig):
        raise TypeError(f"iso_config must be an ISOConfig, got {type(iso_config).__name__}")

    if not iso_config.enabled:
        _remove(module)
        return model

    stacks = decoder_stacks(module)
    if not stacks:
        kinds = sorted({type(m).__name__ for m in module.modules() if "Layer" in type(m).__name__})[:6]
        raise ValueError(
            f"ISO: no supported decoder layers in {type(module).__name__} (found {kinds}); supported: "
            f"{', '.join(SUPPORTED)} under DeepSpeed AutoTP without kernel injection")

    # Check everything before changing anything: a model is converted whole or not at all.
    plans = []
    for owner, layers, fam in stacks:
        cfg = getattr(fam.attn_module(layers[0]), "config", None)
        n = getattr(cfg, "num_hidden_layers", None)
        layer_list = list(layers)[:n] if isinstance(n, int) and 0 < n <= len(layers) else list(layers)
        types = set(getattr(cfg, "layer_types", None) or [])
        if len(types) > 1:
            raise ValueError(f"ISO: mixed attention layer types {sorted(types)} (e.g. Qwen2 with "
                             "use_sliding_window and max_window_layers) are not supported")
        linears = []
        for layer in layer_list:
            fam.check(layer)
            refused = fam.refuse(layer)
            if refused:
                raise ValueError(f"ISO: {refused}")
            if fam.parallel(layer) != fam.parallel(layer_list[0]):
                raise ValueError(f"ISO: {fam.name} layers mix parallel and sequential residuals")
            linears += [fam.attn_linear(layer), fam.mlp_linear(layer)]
        kinds = {type(lin) in (LinearAllreduce, ISOLinearAllreduce) for lin in linears}
        if kinds == {False}:
            if all(isinstance(lin, torch.nn.Linear) for lin in linears):
                logger.info("ISO: %s has no AutoTP LinearAllreduce (tensor-parallel size 1): "
                            "nothing to overlap, stock path", type(module).__name__)
                continue
            raise ValueError(f"ISO: {fam.name} row-parallel linears are "
                             f"{sorted({type(lin).__name__ for lin in linears})}, not AutoTP's LinearAllreduce")
        if kinds != {True}:
            raise ValueError("ISO: some decoder layers have AutoTP LinearAllreduce and some do not")
        if type(layers) not in (torch.nn.ModuleList, ISODecoderLayers):
            raise ValueError(f"ISO: the decoder layers are held in a {type(layers).__name__}, "
                             "not a torch.nn.ModuleList")
        plans.append((owner, layers, layer_list, fam, linears))

    swaps = []
    for owner, layers, layer_list, fam, linears in plans:
        swaps += [(lin, ISOLinearAllreduce) for lin in linears] + [(layers, ISODecoderLayers)]
    swap_classes(swaps)
    for owner, layers, layer_list, fam, linears in plans:
        layers.attach(ISOStack(layer_list, fam, iso_config), owner)
    return model


def iso_stacks(model):
    """The ISOStack objects of a converted model: their `iso_plan` says what the latest
    forward ran."""
    module = getattr(model, "module", model)
    return [m._iso_stack for m in module.modules()
            if type(m) is ISODecoderLayers and m._iso_stack is not None]
