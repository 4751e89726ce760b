"""iso-megatron: intra-sequence overlap (ISO) of tensor-parallel all-reduces in prefill.

    from iso_megatron import ISOConfig, apply_iso, get_gpt_layer_iso_spec
    model = apply_iso(model)                       # a built megatron-core GPTModel, in place
    spec = get_gpt_layer_iso_spec()                # or build with the ISO layer spec

Layout: this package's top-level modules are the framework-neutral core (config, schedule and
executor, planner, calibrate, costmodel, shape, comm, emulated and proxy links, cli, runtime);
`iso_megatron.megatron` is the
Megatron-core adapter; `iso_megatron.patches` holds host-framework glue (DeepSpeed, HF AutoTP).
The Megatron names below are imported on first use, so importing the core imports no framework.
"""

from .config import DEFAULT_MIN_TOKENS, ISOConfig

_MEGATRON = {"apply_iso": "api", "get_gpt_layer_iso_spec": "api", "apply_cpu_shims": "cpu",
             "causal_mask": "cpu", "check_config": "block", "ISOTransformerBlock": "block",
             "ISOTransformerLayer": "block"}

__all__ = ["ISOConfig", "DEFAULT_MIN_TOKENS", *_MEGATRON]


def __getattr__(name):
    if name in _MEGATRON:
        import importlib

        return getattr(importlib.import_module(f".megatron.{_MEGATRON[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
