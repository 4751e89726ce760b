"""split="auto": chunk count and boundaries chosen from the cost model, calibrated on this machine.

Asked by `planner.plan_prefill` only (framework-neutral: the adapters pass the model shape and
the device / dtype / TP group in a `planner.Environment`).

At the first ISO prefill of a prompt-length bucket, every rank of the tensor-parallel group
measures, on its own device and through the reducer ISO will really use (`comm.make_reducer`,
so an emulated link is measured as such):
  - one GEMM of the model's MLP shape (matmul rate) and one large copy (memory bandwidth);
  - on CPU only, megatron's unfused attention core (baddbmm, mask, softmax, bmm) on the
    rectangles of this bucket's prefill (half x half, half x whole, whole x whole; rows at most
    2048): the local DotProductAttention computes the whole [queries, keys] rectangle, which a
    causal-pair roofline underestimates ~2x on CPU, and its cost per score grows once a head's
    scores spill out of cache (measured, 4 heads: 3.8 ns at 256x512, 4-6 ns at 1024x1024,
    7-8 ns at 1024x2048); the cost model interpolates this table. On CUDA the fused kernels'
    causal roofline is kept;
  - two all-reduces (a small and a large one): link latency and bus bandwidth.
The ranks' figures are combined with an all-reduce MAX over the TP group (max is exact, so every
rank holds bit-identical inputs) and every rank then runs the same deterministic search,
`costmodel.best_plan` over K = 1..max_chunks: the plans, and so the collectives of the
schedule, are identical on all ranks. Plans are cached per bucket (1/8 octave of prompt length)
as fractions and scaled to the exact length.

Never slower than stock, as predicted: a plan is used only when it is predicted at least
`MIN_GAIN` faster than the unsplit baseline at this exact length, and only from `min_tokens`
on (`costmodel.min_tokens_for` with the calibrated profiles), else None (stock path).
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import torch

from . import comm
from . import costmodel as cm
from .cli import time_ms
from .planner import Environment, PrefillPlan, chunk_boundaries, stock
from .shape import ModelShape, TokenCost

MIN_GAIN = 0.02          # predicted saving a plan must reach (covers what the model leaves out)
# A searched plan replaces the plain two-chunk split (even or balanced, whichever is predicted
# faster) only when predicted faster by this share of the baseline: below that the gain is within
# the model's error (measured on CPU: a small first chunk that shortens the pipeline's fill by
# 0.3% of the baseline, as predicted, ran 0.7-2.6% slower than even, link-bound).
SEARCH_MARGIN = 0.005
CPU_STEP_OVERHEAD_S = 4e-4  # per layer part per chunk on CPU (megatron module calls; measured)
CUDA_STEP_OVERHEAD_S = 5e-5  # per layer part per chunk on CUDA (a few kernel launches)
_SMALL_TOKENS = 16


class Calibration(NamedTuple):
    gemm_tflops: float
    mem_bw_gbs: float
    attn_score_table: tuple  # ((scores per head, seconds per score), ...); () on CUDA (fused)
    latency_us: float
    bus_bw_gbs: float
    step_overhead_s: float

    def device(self):
        return cm.DeviceProfile("calibrated", self.gemm_tflops, self.mem_bw_gbs, "measured at first use",
                             step_overhead_s=self.step_overhead_s, attn_score_table=self.attn_score_table)

    def link(self):
        return cm.LinkProfile("calibrated", self.latency_us, self.bus_bw_gbs, "measured at first use")


class AutoPlan(NamedTuple):
    bucket: int
    fractions: Optional[tuple]  # None: stock
    predicted_ms: float
    baseline_ms: float
    min_tokens: Optional[int]


_calibrations: Dict[tuple, Calibration] = {}
_plans: Dict[tuple, AutoPlan] = {}


def clear_cache() -> None:
    """Forget every calibration and plan (benchmarks: before a new link is put in place)."""
    _calibrations.clear()
    _plans.clear()


def bucket_of(seq_len: int) -> int:
    """The representative length of seq_len's bucket: 8 buckets per octave (~9% apart)."""
    if seq_len <= 64:
        return int(seq_len)
    return int(math.ceil(2 ** (math.ceil(8 * math.log2(seq_len) - 1e-9) / 8)))


def _timed(fn, reps: int = 2, sync=None) -> float:
    """Seconds of the fastest of `reps` calls after one warm-up (a busy machine only adds time)."""
    return max(min(time_ms(fn, reps, warmup=1, sync=sync)) / 1e3, 1e-9)


def _measure_compute(shape: ModelShape, tp, device, dtype, sync):
    h = shape.hidden
    n = max(1, shape.ffn_hidden // tp)
    m = 512
    a, b = torch.randn(m, h, device=device, dtype=dtype), torch.randn(h, n, device=device, dtype=dtype)
    gemm_s = _timed(lambda: a @ b, reps=5, sync=sync)
    x = torch.empty(8 << 20, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    copy_s = _timed(lambda: y.copy_(x), reps=5, sync=sync)
    return 2.0 * m * h * n / gemm_s / 1e12, 2 * x.numel() * 4 / copy_s / 1e9


def _measure_attention(shape: ModelShape, tp, seq_len, device, dtype):
    """((scores per head, seconds per score), ...) of the unfused core on the rectangles a
    prefill of seq_len meets: a half chunk, the last chunk of two, the whole square."""
    heads = max(1, shape.num_heads // tp)
    d = shape.head_dim
    half = max(seq_len // 2, 8)
    shapes = dict.fromkeys([(half, half), (min(half, 2048), seq_len), (min(seq_len, 2048), seq_len)])
    table = []
    for rows, keys in shapes:
        q = torch.randn(heads, rows, d, device=device, dtype=dtype)
        k = torch.randn(heads, d, keys, device=device, dtype=dtype)
        v = torch.randn(heads, keys, d, device=device, dtype=dtype)
        mask = torch.ones(rows, keys, dtype=torch.bool, device=device).triu(keys - rows + 1)
        out = torch.empty(heads, rows, keys, device=device, dtype=dtype)

        def core():
            s = torch.baddbmm(out, q, k, beta=0.0, alpha=1.0 / math.sqrt(d))
            s.masked_fill_(mask, -10000.0)
            return torch.bmm(torch.softmax(s, -1), v)

        table.append((float(rows * keys), _timed(core, reps=2) / (heads * rows * keys)))
    table.sort()
    # a larger score matrix never costs less per score (it only spills further out of cache):
    # a running max removes the noise of a busy machine from the table
    for i in range(1, len(table)):
        table[i] = (table[i][0], max(table[i][1], table[i - 1][1]))
    return tuple(table)


def _measure_link(shape: ModelShape, batch, seq_len, device, dtype, group):
    """(latency s, seconds per byte) of one all-reduce through the reducer ISO uses."""
    reducer = comm.make_reducer(group)
    h = shape.hidden
    sizes = (_SMALL_TOKENS * batch, max(seq_len // 2, 2 * _SMALL_TOKENS) * batch)
    times = []
    for tokens in sizes:
        t = torch.zeros(tokens, h, device=device, dtype=dtype)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        times.append(_timed(lambda: reducer.start(t).wait(), reps=3, sync=sync))
    esize = torch.tensor([], dtype=dtype).element_size()
    b1, b2 = sizes[0] * h * esize, sizes[1] * h * esize
    per_byte = max((times[1] - times[0]) / (b2 - b1), 1e-15)
    latency = max(times[0] - b1 * per_byte, 0.0)
    return latency, per_byte


def calibrate(shape: ModelShape, env: Environment, seq_len: int, batch: int, tp: int) -> Calibration:
    """Measure this machine (collectively over the TP group, identical result on every rank)."""
    device, group, dtype = torch.device(env.device), env.group, env.dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    dims = (shape.hidden, shape.ffn_hidden, shape.num_heads, shape.num_query_groups, shape.head_dim,
            str(dtype))
    # the reducer backend in use is part of the key: an emulated link calibrates as itself
    base_key = (comm.reducer_key(), device.type, dims, tp, batch)
    key = base_key + (bucket_of(seq_len),)
    if key in _calibrations:
        return _calibrations[key]
    tflops, bw = _measure_compute(shape, tp, device, dtype, sync)
    if device.type == "cpu":
        table = _measure_attention(shape, tp, bucket_of(seq_len), device, dtype)
        step = CPU_STEP_OVERHEAD_S
    else:
        table, step = (), CUDA_STEP_OVERHEAD_S
    if tp > 1 and group is not None:
        latency, per_byte = _measure_link(shape, batch, bucket_of(seq_len), device, dtype, group)
    else:
        latency, per_byte = 0.0, 1e-15
    # Slowest rank's figures, identical on every rank: slow = large time, small rate.
    figures = torch.tensor([1.0 / tflops, 1.0 / bw, latency, per_byte] + [t for _, t in table],
                           dtype=torch.float64)
    if tp > 1 and group is not None:
        import torch.distributed as dist

        dev_fig = figures.to(device) if device.type == "cuda" else figures
        dist.all_reduce(dev_fig, op=dist.ReduceOp.MAX, group=group)
        figures = dev_fig.cpu()
    inv_tflops, inv_bw, latency, per_byte, *score_s = figures.tolist()
    table = tuple((n, t) for (n, _), t in zip(table, score_s))
    busbw = 2 * (tp - 1) / tp / per_byte / 1e9 if tp > 1 else float("inf")
    cal = Calibration(1.0 / inv_tflops, 1.0 / inv_bw, table, latency * 1e6, busbw, step)
    _calibrations[key] = cal
    return cal


def plan_for(shape: ModelShape, env: Environment, seq_len: int, batch: int, tp: int, max_chunks: int,
             calibration: Optional[Calibration] = None) -> AutoPlan:
    """The cached (or new) plan of seq_len's bucket. Collective on first use of a bucket."""
    cal = calibration or calibrate(shape, env, seq_len, batch, tp)
    b = bucket_of(seq_len)
    key = (cal, b, batch, tp, max_chunks, shape)
    if key in _plans:
        return _plans[key]
    device, link = cal.device(), cal.link()
    dtype_bytes = torch.tensor([], dtype=env.dtype).element_size()
    grid = tuple(sorted({64 * 2 ** i for i in range(9)} | {b}))
    min_tokens = cm.min_tokens_for(shape, device, link, tp, batch, grid=tuple(g for g in grid if g <= max(b, 64)),
                                   min_gain=MIN_GAIN, max_chunks=max_chunks) if tp > 1 else None
    plan = cm.best_plan(shape, device, link, tp, b, batch, max_chunks, dtype_bytes)
    if plan.num_chunks > 1:
        simple = min([(cm.predict(shape, device, link, tp, b, batch, num_chunks=2, split=sp, dtype_bytes=dtype_bytes),
                       sp) for sp in ("even", "balanced")], key=lambda x: x[0].iso_ms)
        if plan.predicted_ms > simple[0].iso_ms - SEARCH_MARGIN * plan.baseline_ms:
            bounds = chunk_boundaries(b, 2, simple[1], TokenCost.from_shape(shape))
            plan = cm.Plan(2, bounds, simple[0].iso_ms, plan.baseline_ms)
    fractions = None
    if plan.num_chunks > 1 and plan.predicted_ms <= plan.baseline_ms * (1 - MIN_GAIN):
        fractions = tuple((e - s) / b for s, e in zip(plan.boundaries, plan.boundaries[1:]))
    result = AutoPlan(b, fractions, plan.predicted_ms, plan.baseline_ms, min_tokens)
    _plans[key] = result
    return result


def auto_plan(shape: ModelShape, env: Environment, seq_len: int, batch: int, tp: int,
              max_chunks: int) -> PrefillPlan:
    """The plan for this prefill: a split predicted at least MIN_GAIN faster than stock, else
    the stock path (with the reason).

    Called through `planner.plan_prefill` on every rank of the TP group with the same arguments;
    the first call of a bucket is collective (calibration), later ones are cache hits.
    """
    if tp < 2 or max_chunks < 2 or seq_len < 2:
        return stock("auto: nothing to split")
    plan = plan_for(shape, env, seq_len, batch, tp, max_chunks)
    if plan.fractions is None:
        return PrefillPlan(None, "auto: no split predicted to pay", plan.predicted_ms, plan.baseline_ms)
    if plan.min_tokens is None or seq_len < plan.min_tokens:
        return PrefillPlan(None, f"auto: prompt shorter than the calibrated min_tokens={plan.min_tokens}",
                           plan.predicted_ms, plan.baseline_ms)
    bounds = chunk_boundaries(seq_len, len(plan.fractions), list(_normalised(plan.fractions)))
    # the exact length: the plan must still be predicted faster than stock
    cal = calibrate(shape, env, seq_len, batch, tp)
    dtype_bytes = torch.tensor([], dtype=env.dtype).element_size()
    p = cm.predict(shape, cal.device(), cal.link(), tp, seq_len, batch, boundaries=bounds, dtype_bytes=dtype_bytes)
    if not p.iso_ms <= p.baseline_ms * (1 - MIN_GAIN) or len(bounds) < 3:
        return PrefillPlan(None, "auto: split not predicted faster at this length", p.iso_ms, p.baseline_ms)
    return PrefillPlan(tuple(bounds), f"auto: {len(bounds) - 1} chunks predicted {p.iso_ms:.2f} ms "
                                      f"vs stock {p.baseline_ms:.2f} ms", p.iso_ms, p.baseline_ms)


def _normalised(fractions):
    total = sum(fractions)
    return [f / total for f in fractions]
