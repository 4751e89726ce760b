"""The Megatron-core adapter: ISO block/layer, deferred-reduce and chunk-attention subclasses,
`apply_iso` / the ISO layer spec, and what the launcher needs (Megatron-LM arguments,
checkpoint loading, generation, CPU shims, version differences)."""

from .api import apply_iso, get_gpt_layer_iso_spec
from .block import ISOTransformerBlock, ISOTransformerLayer, check_config
from .cpu import apply_cpu_shims, causal_mask

__all__ = ["apply_iso", "get_gpt_layer_iso_spec", "ISOTransformerBlock", "ISOTransformerLayer",
           "check_config", "apply_cpu_shims", "causal_mask"]
