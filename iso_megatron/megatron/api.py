"""Applying ISO to a model: by layer spec (before building) or in place (after)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..classes import swap_classes
from ..config import ISOConfig
from . import compat
from .layers import iso_classes
from .block import ISOTransformerBlock, ISOTransformerLayer, check_config, check_layer


def _swap_spec(obj, mapping):
    """Copy of a spec tree with every class in `mapping` replaced; everything else kept."""
    if isinstance(obj, ModuleSpec):
        return dataclasses.replace(obj, module=mapping.get(obj.module, obj.module),
                                   submodules=_swap_spec(obj.submodules, mapping))
    if isinstance(obj, type):
        return mapping.get(obj, obj)
    if isinstance(obj, functools.partial):
        return functools.partial(_swap_spec(obj.func, mapping),
                                 *[_swap_spec(a, mapping) for a in obj.args],
                                 **{k: _swap_spec(v, mapping) for k, v in obj.keywords.items()})
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _swap_spec(getattr(obj, f.name), mapping)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def get_gpt_layer_iso_spec(base_spec: Optional[ModuleSpec] = None,
                           iso_config: Optional[ISOConfig] = None) -> ModuleSpec:
    """The ISO variant of a GPT layer spec (default: `get_gpt_layer_local_spec()`).

    Same submodules, same parameter names and state-dict keys; only classes change:
    TransformerLayer -> ISOTransformerLayer, SelfAttention -> ISOSelfAttention (flash_decode's
    RoPE per chunk), row-parallel linears -> their deferred-reduce subclasses, core attention ->
    its chunk-aware subclass. Unsupported parts (MoE, MLA, an
    unknown attention backend) raise a ValueError naming them when the model is built.
    """
    if base_spec is None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        base_spec = get_gpt_layer_local_spec()
    if not isinstance(base_spec, ModuleSpec) or not (
            isinstance(base_spec.module, type) and issubclass(base_spec.module, TransformerLayer)):
        raise ValueError(f"get_gpt_layer_iso_spec needs a TransformerLayer ModuleSpec, got {base_spec!r}")
    spec = _swap_spec(base_spec, {TransformerLayer: ISOTransformerLayer, **iso_classes()})
    return dataclasses.replace(spec, params={**spec.params, "iso_config": iso_config or ISOConfig()})


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def apply_iso(model, iso_config: Optional[ISOConfig] = None):
    """Convert a built megatron-core model (GPTModel, or any module holding TransformerBlocks)
    to ISO in place and return it. No parameter is copied, added or renamed: only the classes
    of the block, its layers, their self-attention, row-parallel linears and core attention
    change.
    `apply_iso(model, ISOConfig(enabled=False))` puts the stock classes back. `model` may be
    wrapped (megatron-core's Float16Module for bf16/fp16, DeepSpeed's engine): the blocks are
    found inside, and wrapping before or after `apply_iso` gives the same model.
    """
    iso_config = ISOConfig() if iso_config is None else iso_config
    if not isinstance(iso_config, ISOConfig):
        raise TypeError(f"iso_config must be an ISOConfig, got {type(iso_config).__name__}")
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"apply_iso: no megatron-core TransformerBlock in {type(model).__name__}")
    to_iso = {TransformerBlock: ISOTransformerBlock, TransformerLayer: ISOTransformerLayer,
              **iso_classes()}
    to_stock = {iso: stock for stock, iso in to_iso.items()}

    if not iso_config.enabled:
        for m in model.modules():
            if type(m) in to_stock:
                m.__class__ = to_stock[type(m)]
                for attr in ("in_iso_block", "iso_plan", "iso_config"):  # ISO state goes with ISO
                    m.__dict__.pop(attr, None)
        return model

    # Check everything before changing anything: a model is converted whole or not at all.
    swaps = []
    for block in blocks:
        check_config(block.config, compat.tp_world_size())
        swaps.append((block, ISOTransformerBlock))
        for layer in block.layers:
            if type(layer) not in (TransformerLayer, ISOTransformerLayer):
                raise ValueError(f"apply_iso: layer class {type(layer).__name__} is not a stock "
                                 "TransformerLayer (MoE/hybrid/custom layers are not supported)")
            swaps.append((layer, ISOTransformerLayer))
            for m in (layer.self_attention, layer.self_attention.linear_proj,
                      layer.self_attention.core_attention, getattr(layer.mlp, "linear_fc2", None)):
                if type(m) in to_iso:
                    swaps.append((m, to_iso[type(m)]))
    def check_layers():
        for block in blocks:
            for layer in block.layers:
                check_layer(layer)

    swap_classes(swaps, check_layers)
    for block in blocks:
        block.iso_config = iso_config
        for layer in block.layers:
            layer.iso_config = iso_config
            layer.in_iso_block = True
    return model
