"""ISO for Hugging Face decoder models under DeepSpeed AutoTP (no kernel injection).

AutoTP turns each decoder layer's row-parallel linears (attention output projection, MLP down
projection) into DeepSpeed `LinearAllreduce` modules whose all-reduce is synchronous. ISO:

  - swaps those modules' class to `ISOLinearAllreduce` (no parameter added or renamed): with
    `defer_reduce` on, forward returns the rank's partial sum only; the schedule starts the
    all-reduce (async) and adds the bias after it, exactly as the stock forward does;
  - swaps each decoder layer's class to an ISO subclass. In a prefill the stack's FIRST layer runs
    the whole stack with the ISO schedule (`transformer.run_prefill`, the same executor as the
    Megatron path) over `HFSteps`, the chunk steps of the HF layers; the model's loop then hands
    that result through the remaining layers untouched (they recognise it by identity).

Per chunk, the layer's own attention module runs on the chunk's queries with the chunk's RoPE
(cos/sin rows) and position ids, appends the chunk's K/V to the HF cache (a private DynamicCache
when the caller has none), and attends over keys 0..end with the model's own 4-D mask sliced to
[chunk rows, :end] (padding included); where the model relied on sdpa's `is_causal`, an explicit
bottom-right causal mask is given. So the cache comes out as the stock prefill's and `generate()`
continues on the stock path.

Everything else runs the stock code (`ISOStack.plan` decides): TP 1, training, autograd, decode (one
token or a non-empty cache), prompts shorter than `min_tokens`, caches other than DynamicCache,
prompts reaching a sliding window, flash/flex attention, output_attentions / output_hidden_states.

Families: Llama, Mistral, Qwen2 (RMSNorm, SwiGLU, RoPE, GQA) and OPT (LayerNorm, biases, pre- or
post-LN).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from deepspeed.module_inject.layers import LinearAllreduce, add_bias

from .comm import make_reducer
from .config import ISOConfig
from .split import TokenCost, chunk_boundaries
from .transformer import run_prefill

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

class LlamaFamily:
    """Llama, Mistral, Qwen2: pre-RMSNorm, attention with RoPE (GQA), SwiGLU MLP."""

    name = "llama"
    classes = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
    passes_use_cache = True  # the stock layer hands use_cache on to its attention

    @staticmethod
    def attn_linear(layer):
        return layer.self_attn.o_proj

    @staticmethod
    def mlp_linear(layer):
        return layer.mlp.down_proj

    @staticmethod
    def check(layer):
        for path in ("input_layernorm", "self_attn", "self_attn.o_proj", "post_attention_layernorm",
                     "mlp", "mlp.down_proj"):
            _get(layer, path)

    @staticmethod
    def attention(layer, hidden, kwargs):
        return layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)[0]

    @staticmethod
    def mlp(layer, hidden):
        return layer.mlp(layer.post_attention_layernorm(hidden))

    @staticmethod
    def finish(layer, part, out, residual):
        return residual + out

    @staticmethod
    def cost(config) -> TokenCost:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        return TokenCost.from_dims(config.hidden_size, config.intermediate_size, kv, True)


class OPTFamily:
    """OPT: LayerNorm (before or after, per do_layer_norm_before), biases, fc1-act-fc2 MLP."""

    name = "opt"
    classes = ("OPTDecoderLayer",)
    passes_use_cache = False

    @staticmethod
    def attn_linear(layer):
        return layer.self_attn.out_proj

    @staticmethod
    def mlp_linear(layer):
        return layer.fc2

    @staticmethod
    def check(layer):
        for path in ("self_attn_layer_norm", "self_attn", "self_attn.out_proj", "fc1", "fc2",
                     "final_layer_norm", "activation_fn", "do_layer_norm_before", "dropout"):
            _get(layer, path)

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

    @staticmethod
    def cost(config) -> TokenCost:
        return TokenCost.from_dims(config.hidden_size, config.ffn_dim, config.hidden_size, False)


FAMILIES = (LlamaFamily, OPTFamily)
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

_CONSUMED = ("attention_mask", "position_embeddings", "position_ids", "cache", "past_key_values",
             "past_key_value", "use_cache")
_PACKED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _chunk_mask(mask, start: int, end: int, device):
    """Rows [start, end) of the prefill's mask over keys [0, end), in the mask's own format."""
    if mask is not None:
        return mask[..., start:end, :end]
    if start == 0:
        return None  # chunk 0 is a square causal block: sdpa's is_causal, as stock
    # sdpa's is_causal is top-left aligned: give later chunks an explicit mask (True = attend)
    return torch.ones(end - start, end, dtype=torch.bool, device=device).tril(start)[None, None]


class HFSteps:
    """The chunk steps of HF decoder layers, for `transformer.run_prefill`."""

    def __init__(self, stack: "ISOStack", bounds: List[int], kwargs: Dict, device):
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
            kw = dict(extra, attention_mask=_chunk_mask(mask, a, b, device))
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
        if self.private and c == len(self.chunk_kwargs) - 1:
            self._drop(layer.self_attn.layer_idx)  # one layer's K/V alive at a time
        return out, self.fam.attn_linear(layer).bias

    def mlp(self, i, c, hidden):
        layer = self.layers[i]
        return self.fam.mlp(layer, hidden), self.fam.mlp_linear(layer).bias

    def finish(self, i, part, out, bias, residual):
        out = add_bias(out, bias)  # as LinearAllreduce does after its reduce
        return self.fam.finish(self.layers[i], part, out, residual)

    def _drop(self, idx):
        try:
            layer = self.cache.layers[idx]
            layer.keys = layer.values = None
            layer.is_initialized = False
        except (AttributeError, IndexError):
            pass


def _cache_arg(kwargs):
    for name in ("cache", "past_key_values", "past_key_value"):
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

    A plain object (not an nn.Module), kept in each layer's __dict__: no state-dict entry.
    """

    def __init__(self, layers, family, iso_config: ISOConfig):
        self.layers, self.family, self.iso_config = list(layers), family, iso_config
        self.linears = [lin for layer in self.layers
                        for lin in (family.attn_linear(layer), family.mlp_linear(layer))]
        attn = self.layers[0].self_attn
        self.config = getattr(attn, "config", None)
        params = inspect.signature(type(attn).forward).parameters
        self.cache_name = next((n for n in ("cache", "past_key_values", "past_key_value") if n in params),
                               "cache")
        self.pending = None  # (output tensor, index of the next layer to hand it through)
        self.runs = 0  # ISO prefills run (for tests and launchers)

    # -- deciding -----------------------------------------------------------------------------
    def plan(self, hidden, args, kwargs, training: bool) -> Optional[List[int]]:
        """Chunk boundaries when this layer-0 call should run the ISO prefill, else None (stock)."""
        iso = self.iso_config
        if iso is None or not iso.enabled or iso.num_chunks < 2 or training or args:
            return None
        if hidden.dim() != 3 or (torch.is_grad_enabled() and hidden.requires_grad):
            return None
        seq_len = hidden.size(1)
        if seq_len < max(iso.min_tokens, 2):
            return None
        lin = self.linears[0]
        if lin.mp_group is None or lin.tp_world_size < 2 or any(
                m.defer_collectives_to_compiler for m in self.linears):
            return None
        if kwargs.get("output_attentions") or _output_capture_active():
            return None
        if any(kwargs.get(k) is not None for k in _PACKED):
            return None
        impl = getattr(self.config, "_attn_implementation", None)
        mask = kwargs.get("attention_mask")
        if impl not in ("sdpa", "eager"):
            return None
        if mask is None:
            if impl != "sdpa":
                return None
        elif not (torch.is_tensor(mask) and mask.dim() == 4
                  and tuple(mask.shape[-2:]) == (seq_len, seq_len)):
            return None  # BlockMask, per-layer dicts, masks over a pre-filled cache: stock
        window = self._sliding_window()
        if window is not None and seq_len >= window:
            return None
        cache = _cache_arg(kwargs)
        if cache is not None and not self._fresh_dynamic_cache(cache):
            return None
        bounds = chunk_boundaries(seq_len, iso.num_chunks,
                                  "balanced" if iso.split == "auto" else iso.split,
                                  self.family.cost(self.config))
        return bounds if len(bounds) > 2 else None

    def _sliding_window(self):
        cfg = self.config
        windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.layers]
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
    def prefill(self, hidden, bounds, kwargs):
        chunks = [hidden[:, bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
        steps = HFSteps(self, bounds, kwargs, hidden.device)
        reducer = make_reducer(self.linears[0].mp_group)
        with deferred(self.linears):
            out = run_prefill(steps, len(self.layers), chunks, reducer)
        self.runs += 1
        return torch.cat(out, dim=1)


class ISODecoderLayerMixin:
    """Forward of an HF decoder layer under ISO (mixed in front of the stock layer class)."""

    def forward(self, hidden_states, *args, **kwargs):
        stack = self.__dict__.get("_iso_stack")
        if stack is not None:
            pending = stack.pending
            if pending is not None and pending[0] is hidden_states and stack.layers[pending[1]] is self:
                # an ISO prefill by the stack's first layer already ran this layer
                nxt = pending[1] + 1
                stack.pending = (hidden_states, nxt) if nxt < len(stack.layers) else None
                return hidden_states
            if self is stack.layers[0]:
                stack.pending = None
                bounds = stack.plan(hidden_states, args, kwargs, self.training)
                if bounds is not None:
                    out = stack.prefill(hidden_states, bounds, kwargs)
                    if len(stack.layers) > 1:
                        stack.pending = (out, 1)
                    return out
        return super().forward(hidden_states, *args, **kwargs)


_ISO_LAYER_CLASSES: Dict[type, type] = {}


def iso_layer_class(cls):
    if issubclass(cls, ISODecoderLayerMixin):
        return cls
    if cls not in _ISO_LAYER_CLASSES:
        _ISO_LAYER_CLASSES[cls] = type(f"ISO{cls.__name__}", (ISODecoderLayerMixin, cls),
                                       {"__module__": __name__, "__qualname__": f"ISO{cls.__name__}"})
    return _ISO_LAYER_CLASSES[cls]


def _stock_layer_class(cls):
    for base in cls.__mro__[1:]:
        if not issubclass(base, ISODecoderLayerMixin):
            return base
    return cls  # pragma: no cover


# ---- applying -----------------------------------------------------------------------------

def decoder_stacks(model):
    """[(ModuleList of decoder layers, family)] of the supported HF families in `model`."""
    stacks = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            fams = {family_of(layer) for layer in m}
            if len(fams) == 1 and None not in fams:
                stacks.append((m, fams.pop()))
    return stacks


def is_iso(model) -> bool:
    return any(isinstance(m, ISOLinearAllreduce) for m in model.modules())


def apply_iso_hf(model, iso_config: Optional[ISOConfig] = None):
    """Convert an HF causal LM (after DeepSpeed AutoTP) to ISO in place and return it.

    `model` may be the DeepSpeed InferenceEngine or its `.module`. Only classes change (decoder
    layers, their two LinearAllreduce modules); `apply_iso_hf(model, ISOConfig(enabled=False))` puts
    the stock classes back, and calling it again with another ISOConfig reconfigures. With no
    LinearAllreduce in the layers (tensor-parallel size 1) there is nothing to overlap and the
    model stays stock. ValueError names what ISO cannot run (kernel injection, other families).
    """
    module = getattr(model, "module", model)  # a DeepSpeed InferenceEngine holds the model in .module
    iso_config = ISOConfig() if iso_config is None else iso_config
    if not isinstance(iso_config, ISOConfig):
        raise TypeError(f"iso_config must be an ISOConfig, got {type(iso_config).__name__}")

    if not iso_config.enabled:
        for m in module.modules():
            if isinstance(m, ISODecoderLayerMixin):
                m.__class__ = _stock_layer_class(type(m))
                m.__dict__.pop("_iso_stack", None)
            elif type(m) is ISOLinearAllreduce:
                m.__class__ = LinearAllreduce
                m.__dict__.pop("defer_reduce", None)
        return model

    stacks = decoder_stacks(module)
    if not stacks:
        kinds = sorted({type(m).__name__ for m in module.modules() if "Layer" in type(m).__name__})[:6]
        raise ValueError(
            f"ISO: no supported decoder layers in {type(module).__name__} (found {kinds}); supported: "
            f"{', '.join(SUPPORTED)} under DeepSpeed AutoTP without kernel injection")

    # Check everything before changing anything: a model is converted whole or not at all.
    plans = []
    for layers, fam in stacks:
        cfg = getattr(layers[0].self_attn, "config", None)
        n = getattr(cfg, "num_hidden_layers", None)
        layer_list = list(layers)[:n] if isinstance(n, int) and 0 < n <= len(layers) else list(layers)
        types = set(getattr(cfg, "layer_types", None) or [])
        if len(types) > 1:
            raise ValueError(f"ISO: mixed attention layer types {sorted(types)} (e.g. Qwen2 with "
                             "use_sliding_window and max_window_layers) are not supported")
        linears = []
        for layer in layer_list:
            fam.check(layer)
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
        plans.append((layer_list, fam, linears))

    for layer_list, fam, linears in plans:
        stack = ISOStack(layer_list, fam, iso_config)
        for lin in linears:
            lin.__class__ = ISOLinearAllreduce
        for layer in layer_list:
            layer.__class__ = iso_layer_class(type(layer))
            layer.__dict__["_iso_stack"] = stack
    return model


def iso_stacks(model) -> List[ISOStack]:
    """The ISOStack objects of a converted model (tests and launchers read `runs`)."""
    module = getattr(model, "module", model)
    seen = []
    for m in module.modules():
        stack = m.__dict__.get("_iso_stack")
        if stack is not None and all(stack is not s for s in seen):
            seen.append(stack)
    return seen
