"""What runs inside test ranks (started by tests.harness.run_ranks): set-up, tolerances, spies.

Every `tests/cases_*.py` module takes these from here instead of keeping its own copy.
"""

from __future__ import annotations

import torch

# fp32, ISO vs stock with identical weights: only the summation order of the all-reduces and
# of the chunked GEMMs differs, ~1e-7 relative in practice; 1e-5 leaves two orders of margin.
FP32_REL_TOL = 1e-5


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def value_errors(cases) -> dict:
    """{name: the ValueError message `make()` raised, or None} for {name: make}."""
    messages = {}
    for name, make in cases.items():
        try:
            make()
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


def setup_megatron(tp: int, seed: int = 1234) -> None:
    """CPU shims, a fresh Megatron parallel state at tensor-parallel size `tp`, the seed."""
    from megatron.core import parallel_state

    from iso_megatron import apply_cpu_shims

    apply_cpu_shims()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(seed)


class AllReduceSpy:
    """Records every torch.distributed all-reduce while active (and DeepSpeed's synchronous
    `inference_all_reduce` where DeepSpeed is imported), as events in call order:
      ("issue", i)  async all-reduce i started (ISO's deferred reduces)
      ("sync", i)   synchronous all-reduce i (stock's)
      ("wait", i)   the handle of async all-reduce i waited for
    """

    def __enter__(self):
        import sys

        import torch.distributed as dist

        self.events = []
        self._dist, self._real = dist, dist.all_reduce
        spy = self

        class Handle:
            def __init__(self, work, i):
                self.work, self.i = work, i

            def wait(self, *args, **kwargs):
                spy.events.append(("wait", self.i))
                return self.work.wait(*args, **kwargs)

        self._nested = False  # inside DeepSpeed's all-reduce: already counted there

        def all_reduce(tensor, *args, async_op=False, **kwargs):
            work = spy._real(tensor, *args, async_op=async_op, **kwargs)
            if spy._nested:
                return work
            i = sum(e[0] in ("issue", "sync") for e in spy.events)
            spy.events.append(("issue" if async_op else "sync", i))
            return Handle(work, i) if async_op else work

        dist.all_reduce = all_reduce
        self._ds = None
        if "deepspeed" in sys.modules:
            import deepspeed.comm as ds_comm

            self._ds, self._real_ds = ds_comm, ds_comm.inference_all_reduce

            def inference_all_reduce(*args, **kwargs):
                i = sum(e[0] in ("issue", "sync") for e in spy.events)
                spy.events.append(("sync", i))
                spy._nested = True
                try:
                    return spy._real_ds(*args, **kwargs)
                finally:
                    spy._nested = False

            ds_comm.inference_all_reduce = inference_all_reduce
        return self

    def __exit__(self, *exc):
        self._dist.all_reduce = self._real
        if self._ds is not None:
            self._ds.inference_all_reduce = self._real_ds

    @property
    def async_ops(self) -> int:
        return sum(e[0] == "issue" for e in self.events)

    @property
    def sync_ops(self) -> int:
        return sum(e[0] == "sync" for e in self.events)
