"""Megatron-LM's `--bf16` / `--fp16`: megatron-core's own `Float16Module` around a built model.

Megatron-LM builds the model with `params_dtype` bf16/fp16 (linears and word embeddings are made
in it), then wraps it in `Float16Module`, which casts the WHOLE module to half precision (also
what megatron-core builds in fp32 whatever params_dtype says: learned position embeddings and
torch norms), casts floating-point positional inputs to half on the first pipeline stage, and
returns the output as fp32 on the last. `float16_module` does exactly that, with megatron-core's
class; everything below it (ISO's block, `apply_iso`, checkpoint loading, `generate`) sees the
GPTModel as `wrapper.module`.
"""

from __future__ import annotations

import torch

_HALF = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_error(config) -> "str | None":
    """Why `config`'s precision flags and params_dtype disagree (Megatron-LM sets them
    together: --bf16 -> bf16=True, params_dtype=torch.bfloat16), or None."""
    bf16, fp16 = bool(getattr(config, "bf16", False)), bool(getattr(config, "fp16", False))
    dtype = getattr(config, "params_dtype", torch.float32)
    if bf16 and fp16:
        return "config.bf16 and config.fp16 are both set (--bf16 and --fp16 are mutually exclusive)"
    if bf16 and dtype != torch.bfloat16:
        return f"config.bf16 is set but config.params_dtype is {dtype} (want torch.bfloat16)"
    if fp16 and dtype != torch.float16:
        return f"config.fp16 is set but config.params_dtype is {dtype} (want torch.float16)"
    if not (bf16 or fp16) and dtype in _HALF:
        return (f"config.params_dtype is {dtype} but config.{_HALF[dtype]} is not set: "
                f"Megatron-LM's --{_HALF[dtype]} sets both")
    return None


def float16_module(model: torch.nn.Module, config):
    """megatron-core's `Float16Module(config, model)` when `config.bf16` or `config.fp16` (as
    Megatron-LM's get_model wraps it), else `model` unchanged; the wrapper takes the model's
    train/eval mode. A model that already is a Float16Module is returned as it is. Raises
    ValueError when the config's precision flags and params_dtype disagree. Load checkpoints
    into `model` (or `wrapper.module`): the keys are the GPTModel's own.
    """
    from megatron.core.transformer.module import Float16Module

    error = precision_error(config)
    if error:
        raise ValueError(f"float16_module: {error}")
    if isinstance(model, Float16Module):
        if (model.bf16, model.fp16) != (bool(config.bf16), bool(config.fp16)):
            raise ValueError(f"float16_module: the model is already wrapped for "
                             f"{'bf16' if model.bf16 else 'fp16'}, the config asks for "
                             f"{'bf16' if config.bf16 else 'fp16' if config.fp16 else 'fp32'}")
        return model
    if not (config.bf16 or config.fp16):
        return model
    return Float16Module(config, model).train(model.training)  # a new module starts in train mode
