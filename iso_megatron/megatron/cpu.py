"""What megatron-core needs to run a GPTModel on a machine without CUDA, in one place.

Applied only when CUDA is absent (`apply_cpu_shims()` is a no-op otherwise), by tests and
launchers before they build a model. Each shim answers one failure measured on a CPU machine:
- megatron allocates with `device=torch.cuda.current_device()` (RoPE, the global memory buffer
  of DotProductAttention, the KV cache): answer the CPU instead;
- `torch.cuda.synchronize()` in dist_checkpointing.save: a no-op;
- attention forks the CUDA RNG tracker even at dropout 0: megatron's own inference tracker
  (whose fork does nothing) replaces it.
- a pipeline-parallel model with tied embeddings moves both copies with `.cuda()` while it is
  built (megatron-core's LanguageModule, to sync them across the first and last stage):
  `tensor_cuda_on_cpu()` around that build only.
Models must also be built with `use_cpu_initialization=True` and given an explicit causal mask
(the default mask is made with device="cuda"): `causal_mask(s)`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_applied = False


def apply_cpu_shims() -> bool:
    """Patch torch/megatron for CPU-only use. Returns True when it (already) applied them."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda *args, **kwargs: None
        _applied = True
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return True


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's causal mask: bool [1, 1, s, s], True = masked (a key after the query)."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


@contextmanager
def tensor_cuda_on_cpu(active: bool = True):
    """`Tensor.cuda()` returns the tensor itself for the duration of the block (see above)."""
    if not active or torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved
