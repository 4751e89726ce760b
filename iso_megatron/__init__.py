"""iso-megatron: intra-sequence overlap (ISO) of tensor-parallel all-reduces in prefill.

    from iso_megatron import ISOConfig, apply_iso, get_gpt_layer_iso_spec
    model = apply_iso(model)                       # a built megatron-core GPTModel, in place
    spec = get_gpt_layer_iso_spec()                # or build with the ISO layer spec
"""

from .api import apply_iso, get_gpt_layer_iso_spec
from .config import DEFAULT_MIN_TOKENS, ISOConfig
from .cpu import apply_cpu_shims, causal_mask
from .transformer import ISOTransformerBlock, ISOTransformerLayer, check_config

__all__ = ["ISOConfig", "DEFAULT_MIN_TOKENS", "apply_iso", "get_gpt_layer_iso_spec",
           "apply_cpu_shims", "causal_mask", "check_config",
           "ISOTransformerBlock", "ISOTransformerLayer"]
