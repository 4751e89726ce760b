"""megatron-core version differences (0.16 on Python 3.11, 0.19 on 3.12), in one place."""

from __future__ import annotations

from megatron.core import parallel_state

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
