"""megatron-core version differences, in one place: 0.16.1 and 0.19.2 are tested (CI runs the
suite in both; tests/test_compat.py has a test per difference, on the version it concerns).

  difference                                         handled by
  0.13+: the block gets a WrappedTensor in inference  unwrap
  0.16+: a linear keeps its TP group on the module   tp_group
  0.19: StaticInferenceContext keeps "materialize     full_prefill_logits (generate.py): prefill
        only the last token's logits" in its            logits are [s, vocab] whether or not
        InferenceConfig (default True), honoured        megatron's process-wide InferenceMode is on
        whenever InferenceMode is active
  0.19: TransformerBlock.forward(extract_layer_       unsupported_forward: ISO steps aside (stock
        indices=...) returns (hidden, intermediates)    returns the tuple)
  0.19: fused_residual_rmsnorm: TE norms return       unsupported_forward: ISO steps aside
        (out, residual)
  0.19: GTP weight rematerialisation shards the      unsupported_forward: ISO steps aside (the
        row-parallel weight further                     deferred GEMM would use a shard)
  0.19: the MLP is built via MLP.as_mlp_submodule     layers.py / block.py take **kwargs
        and linears take name=
  0.19: torch_dist keeps the common state (args)     checkpoint/torch_dist.py read_common_state
        inside the .distcp files, no common.pt          (either layout, either version); 0.16's own
                                                        load reads common.pt only: checkpoint/load.py
                                                        hands it the state (dist_load_reads_common_
                                                        from_distcp); tests/test_ckpt_versions.py
"""

from __future__ import annotations

import importlib.metadata

from megatron.core import parallel_state

MEGATRON_CORE_VERSION = tuple(int(p) for p in importlib.metadata.version("megatron-core").split(".")[:2])

try:  # megatron-core >= 0.13 passes WrappedTensor into the block during inference
    from megatron.core.utils import WrappedTensor
except ImportError:  # pragma: no cover - older megatron-core
    WrappedTensor = ()


def unwrap(hidden_states):
    return hidden_states.unwrap() if WrappedTensor and isinstance(hidden_states, WrappedTensor) else hidden_states


def tp_world_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group(linear):
    """The TP process group of a row-parallel linear (0.16+ keep it on the module)."""
    group = getattr(linear, "tp_group", None)
    return group if group is not None else parallel_state.get_tensor_model_parallel_group()


def full_prefill_logits(ctx) -> None:
    """Make a static inference context's prefill return logits for every prompt position."""
    ctx.materialize_only_last_token_logits = False  # <= 0.16 read the context's attribute
    config = getattr(ctx, "config", None)  # 0.19 reads ctx.config.materialize_only_last_token_logits
    if config is not None and hasattr(config, "materialize_only_last_token_logits"):
        config.materialize_only_last_token_logits = False


def unsupported_forward(config, args) -> "str | None":
    """Why ISO must leave this forward to the stock code (a 0.19 option it does not run), or None."""
    if args.get("extract_layer_indices"):
        return "extract_layer_indices (stock returns the intermediate hidden states)"
    if getattr(config, "fused_residual_rmsnorm", False):
        return "fused_residual_rmsnorm (the norms return (out, residual))"
    if (getattr(config, "gtp_weight_remat_size", None) or 1) > 1:
        return "GTP weight rematerialisation (the row-parallel weight is sharded further)"
    return None


def dist_load_reads_common_from_distcp() -> bool:
    """Whether `dist_checkpointing.load` finds a torch_dist checkpoint's common state (args,
    iteration) by itself in either layout: in common.pt (as megatron-core 0.16 writes it) or in the
    `common_state` entry of the .distcp files (as 0.19 writes it). 0.19's `load` does, and has no
    `common_strategy` parameter; 0.16's reads common.pt only, through its `common_strategy`."""
    import inspect

    from megatron.core import dist_checkpointing

    return "common_strategy" not in inspect.signature(dist_checkpointing.load).parameters
