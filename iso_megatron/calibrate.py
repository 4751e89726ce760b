"""split="auto": the machine calibrated ONCE per process, every prompt length planned from that.

Asked by `planner.plan_prefill` only (framework-neutral: the adapters pass the model shape and
the device / dtype / TP group in a `planner.Environment`).

At the first auto prefill of an environment (device, dtype, TP group, and the reducer in use:
an emulated link calibrates as itself), every rank of the TP group measures, on its device:
  - GEMM rate (one GEMM of the model's MLP shape) and memory bandwidth (one large copy), at
    the start and again at the end, the faster counting;
  - attention, of the kind the model runs (`Environment.attention`; where the adapter does not
    say: fused on CUDA, unfused on CPU):
      unfused  megatron's local core (baddbmm, mask, softmax, bmm), seconds per score on a
               fixed ladder of score-matrix sizes (`ATTN_LADDER`): the local DotProductAttention
               computes the whole [queries, keys] rectangle, and its cost per score grows once
               a head's scores spill out of cache (measured on CPU, 4 heads: 3.8 ns at 256x512,
               4-6 ns at 1024x1024, 7-8 ns at 1024x2048); the cost model interpolates the table;
      fused    torch's scaled_dot_product_attention, causal (the kernel of SDPAAttention, and
               the kind TE's and HF's sdpa attention run), seconds per causal (query, key)
               pair: it skips the masked blocks, so only the causal pairs cost; on CPU, where
               its diagonal blocks are computed whole, fitted at two lengths together with a
               cost per query (`_measure_attention_pairs`), which joins the per-token term;
  - the per-step overhead (one layer part of one chunk: launches, dispatch, the framework's
    Python): a layer run as `PROBE_CHUNKS` small chunks and as one chunk of the same rows,
    whose compute is nearly the same, so the difference is the fixed cost of the extra calls.
    The layer is the model's own where the adapter passes `Environment.step_probe` (megatron:
    `megatron.block.step_probe`), else a miniature of plain torch kernels (what a GPU launches
    per part; it leaves out the framework's Python, which on CPU is most of the cost: see
    `planner.Environment`). On the real layer the small chunks also re-read the weights, which
    the cost model charges per chunk already: on a GPU, where a 16-row GEMM of a large model is
    bound by its weight reads, the overhead then comes out high, so auto splits less, never
    more (the safe side);
  - the per-token term (`Calibration.token_s`, the cost model's `DeviceProfile.token_s`: per
    token of one layer part, what the GEMM and attention rooflines leave out: norms, RoPE,
    activations, residual adds, copies, and what the model's own kernels lose against the
    calibrated rates): on the model's layer where the adapter's probe names the rows it runs
    (`step_probe.tokens`, `.batch`): its one-chunk time less the rooflines and the two steps;
    else the slope of a model-shaped miniature of that elementwise work (`_elementwise_layer`).
    scripts/validate_costmodel.py checks the result against measured compute;
  - the link: all-reduces of `LINK_TOKENS` rows through the reducer ISO uses (latency and
    per-byte time, a straight line through the two).
The model's dims size the probes (a GEMM's rate depends on its shape), so they are part of
the cache key too, as is the attention kind. The step probe is not (an adapter builds a new
one per forward, over that forward's hidden states; it is called only when a calibration
happens), nor are the prompt length and the batch: every length is planned from this one
calibration by the cost model, in plain Python (plans cached per 1/8-octave bucket): no
collective, no torch operation, no host synchronisation once the environment is calibrated.

Limits. The fused kind is timed on one causal prompt on CUDA (`ATTN_PAIR_TOKENS`), on two on
CPU; an ISO chunk runs it as a past block and a diagonal block on CPU
(iso_megatron.megatron.attention), whose extra call is part of the per-chunk cost the step
probe measures only when the probe's layer has the model's attention (megatron: yes; the
miniature: no). Every rate is one figure for every size; checked against measured compute
(scripts/validate_costmodel.py, docs/costmodel_validation.md: the bench's model on the 2-core
CPU, 256-8192 tokens, stock and each ISO chunk within 8% at TP 1 and 12% at TP 2, with glibc's
allocator fixed; with its default, stock's large tensors fault their pages in afresh at every
prefill: stock then ran up to 15% above the model and 2-14% above ISO). Sliding-window or other masked forms are
not modelled (the adapters run them stock or as the unfused kind).

Agreement and failure. The ranks combine their figures with ONE all-reduce MAX over the TP
group (max is exact: every rank holds bit-identical figures, runs the same deterministic
search, and so picks the same split and issues the same collectives). That all-reduce also
carries each rank's status and its error message (one slot per rank), so a calibration that
fails on one rank raises on every rank, with that rank's message. The link's own all-reduces
come between the local measurements and the combination; the first one carries the failure
flag (a sum), so that after a local failure every rank skips the rest of the link probe alike
and no rank waits on a transfer its peer never starts. A failure inside the communication
library itself is left to the library (its errors and timeouts). A failed calibration is not
cached: the next auto prefill tries again, on every rank alike.

Never slower than stock, as predicted: a plan is used only when it is predicted at least
`MIN_GAIN` faster than the unsplit baseline at this exact length, and only from `min_tokens`
on (`costmodel.min_tokens_for` with the calibrated profiles), else None (stock path).
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import comm
from . import costmodel as cm
from .cli import time_ms
from .planner import ATTENTION_KINDS, Environment, PrefillPlan, chunk_boundaries, stock
from .shape import ModelShape, TokenCost

MIN_GAIN = 0.02          # predicted saving a plan must reach (covers what the model leaves out)
# A searched plan replaces the plain two-chunk split (even or balanced, whichever is predicted
# faster) only when predicted faster by this share of the baseline: below that the gain is within
# the model's error (measured on CPU: a small first chunk that shortens the pipeline's fill by
# 0.3% of the baseline, as predicted, ran 0.7-2.6% slower than even, link-bound).
SEARCH_MARGIN = 0.005

# (queries, keys) of the unfused attention probe (CPU): 64K to 2M scores per head. Larger
# rectangles cost what the last one costs per score (the table is clamped: measured 8.5 ns at
# 2M and 8.6 ns at 4M scores, fp32, 4 heads, out of cache by then), and the probe stays near a
# second on two busy cores in fp32.
ATTN_LADDER = ((256, 256), (512, 512), (512, 1024), (1024, 2048))
ATTN_MAX_HEADS = 8       # heads per probe: the cost per score is a per-head (cache) effect
ATTN_PAIR_TOKENS = 4096  # CUDA: the fused causal probe's length
# CPU: the fused kernel timed at two lengths (3 and 40 ms per head, fp32, one thread): seconds
# per causal pair and per query of one head, fitted (see `_measure_attention_pairs`)
ATTN_PAIR_TOKENS_CPU = (1024, 4096)
ATTN_PAIR_HEADS_CPU = (8, 2)  # heads of each (a per-head cost: the longer one with fewer heads)
LINK_TOKENS = (16, 2048)  # rows x hidden of the link probe's two all-reduces
PROBE_WIDTH = 64         # the miniature layer: weights of 64 x 64 stay in cache, re-reads are free
PROBE_ROWS = 16          # rows of one small chunk (and the keys each query sees)
PROBE_CHUNKS = 8         # small chunks against one chunk of PROBE_CHUNKS x PROBE_ROWS rows
PROBE_REPEATS = 15       # interleaved pairs; the fastest of each kind counts (load only adds time)
PROBE_MIN_REPEATS = 3    # ... but after PROBE_BUDGET_S, no more than this many (a large model
PROBE_BUDGET_S = 2.0     # on CPU: one real layer over 128 tokens takes tens of ms and more)
MESSAGE_BYTES = 512      # per-rank slot of the error message in the combining all-reduce
TOKEN_ROWS = (256, 1024)  # rows of the elementwise miniature (no probe of the model's layer)
GEMM_ROWS = 512  # rows of the rate probe's GEMM (its width: the model's MLP)
# CUDA: a 512-row GEMM is short enough that its launch shows (an H200 calibrated 628 TFLOP/s
# there, while the model's GEMMs ran at 783 over 8192 tokens: docs/gpu_results.md)
GEMM_ROWS_CUDA = 4096
TOKEN_ROWS_CUDA = (2048, 8192)  # ... on CUDA: enough rows that the kernels, not their launches, take the time


class Calibration(NamedTuple):
    gemm_tflops: float
    mem_bw_gbs: float
    attn_score_table: tuple  # unfused: ((scores per head, seconds per score), ...); fused: ()
    latency_us: float
    bus_bw_gbs: float
    step_overhead_s: float   # measured: one layer part of one chunk
    attn_pair_s: float = 0.0  # fused causal attention, seconds per pair of one head; 0: unfused
    token_s: float = 0.0      # measured: per token (x batch) of one layer part, what the rooflines omit
    host_async: bool = False  # CUDA: the host issues ahead (`costmodel.DeviceProfile.host_async`)

    def device(self):
        return cm.DeviceProfile("calibrated", self.gemm_tflops, self.mem_bw_gbs, "measured at first use",
                                step_overhead_s=self.step_overhead_s, attn_score_table=self.attn_score_table,
                                attn_pair_s=self.attn_pair_s, token_s=self.token_s, host_async=self.host_async)

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
    """Forget every calibration and plan (tests; benchmarks: before a new link is put in place)."""
    _calibrations.clear()
    _plans.clear()


def bucket_of(seq_len: int) -> int:
    """The representative length of seq_len's bucket: 8 buckets per octave (~9% apart)."""
    if seq_len <= 64:
        return int(seq_len)
    return int(math.ceil(2 ** (math.ceil(8 * math.log2(seq_len) - 1e-9) / 8)))


# ---------------------------------------------------------------- clocks

def _sync_of(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def _fastest_s(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Seconds of the fastest of `reps` calls after `warmup` untimed ones (a busy machine only
    adds time). CUDA: events on the current stream (gaps while the host launches count)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return max(min(times), 1e-9)


# ---------------------------------------------------------------- local measurements

def _measure_compute(shape: ModelShape, tp, device, dtype, sync=None) -> Tuple[float, float]:
    """(GEMM TFLOP/s at the model's MLP shape, copy bandwidth GB/s)."""
    h = shape.hidden
    n = max(1, shape.ffn_hidden // tp)
    m = GEMM_ROWS_CUDA if device.type == "cuda" else GEMM_ROWS
    a, b = torch.randn(m, h, device=device, dtype=dtype), torch.randn(h, n, device=device, dtype=dtype)
    gemm_s = _fastest_s(lambda: a @ b, device, reps=5)
    x = torch.empty(8 << 20, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    copy_s = _fastest_s(lambda: y.copy_(x), device, reps=5)
    return 2.0 * m * h * n / gemm_s / 1e12, 2 * x.numel() * 4 / copy_s / 1e9


def _measure_attention_table(shape: ModelShape, tp, device, dtype) -> tuple:
    """((scores per head, seconds per score), ...) of the unfused core on `ATTN_LADDER`."""
    heads = min(max(1, shape.num_heads // tp), ATTN_MAX_HEADS)
    d = shape.head_dim
    table = []
    for rows, keys in ATTN_LADDER:
        q = torch.randn(heads, rows, d, device=device, dtype=dtype)
        k = torch.randn(heads, d, keys, device=device, dtype=dtype)
        v = torch.randn(heads, keys, d, device=device, dtype=dtype)
        mask = torch.ones(rows, keys, dtype=torch.bool, device=device).triu(keys - rows + 1)
        out = torch.empty(heads, rows, keys, device=device, dtype=dtype)

        def core():
            s = torch.baddbmm(out, q, k, beta=0.0, alpha=1.0 / math.sqrt(d))
            s.masked_fill_(mask, -10000.0)
            return torch.bmm(torch.softmax(s, -1), v)

        table.append((float(rows * keys), _fastest_s(core, device, reps=2) / (heads * rows * keys)))
    # a larger score matrix never costs less per score (it only spills further out of cache):
    # a running max removes the noise of a busy machine from the table
    for i in range(1, len(table)):
        table[i] = (table[i][0], max(table[i][1], table[i - 1][1]))
    return tuple(table)


def _causal_seconds_per_head(heads: int, s: int, d: int, device, dtype, reps: int = 3) -> float:
    """Fastest seconds per head of torch's fused causal attention over a prompt of `s` (after
    one untimed call)."""
    q, k, v = (torch.randn(1, heads, s, d, device=device, dtype=dtype) for _ in range(3))
    return _fastest_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, reps=reps) / heads


def _measure_attention_pairs(shape: ModelShape, tp, device, dtype) -> Tuple[float, float]:
    """(seconds per causal (query, key) pair, seconds per query), one head, torch's fused attention.

    CUDA: one prompt of `ATTN_PAIR_TOKENS`, the rank's heads: time / pairs (no per-query term).
    CPU: the flash kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp) skips the blocks
    above the diagonal but computes the diagonal's blocks whole: 256 queries x 512 keys from 768
    queries on, so each query pays for about 256 keys beyond its causal ones. Per head and
    causal pair it measured (8 heads x 64, fp32, one thread) 6.3 ns at 1024 tokens, 4.7 at 4096,
    4.5 at 8192: one rate per pair does not fit every length. Timed at the two lengths of
    `ATTN_PAIR_TOKENS_CPU`, t(s) = pair * s(s+1)/2 + query * s is solved for both (4.0-4.2 ns
    per pair, ~1 us per query there). The per-query term is not a pair cost: it joins the
    per-token term (`_measure_token_cost`)."""
    heads, d = max(1, shape.num_heads // tp), shape.head_dim
    if device.type == "cuda":
        s = ATTN_PAIR_TOKENS
        return _causal_seconds_per_head(heads, s, d, device, dtype) / (s * (s + 1) / 2), 0.0
    (s1, s2), (h1, h2) = ATTN_PAIR_TOKENS_CPU, ATTN_PAIR_HEADS_CPU
    t1 = t2 = float("inf")
    for _ in range(3):  # interleaved: a burst of load slows both alike; the fastest of each counts
        t1 = min(t1, _causal_seconds_per_head(min(heads, h1), s1, d, device, dtype, reps=1))
        t2 = min(t2, _causal_seconds_per_head(min(heads, h2), s2, d, device, dtype, reps=1))
    p1, p2 = s1 * (s1 + 1) / 2, s2 * (s2 + 1) / 2
    per_query = (t1 * p2 - t2 * p1) / (s1 * p2 - s2 * p1)
    pair = (t2 - per_query * s2) / p2
    # a kernel computes at most the whole square: per query at most the pairs of half a row of
    # the shorter prompt. Outside that (load on one of the two), the longer one's rate alone
    if not (0 < per_query <= pair * s1 / 2):
        return t2 / p2, 0.0
    return pair, per_query


def _miniature_layer(device, dtype):
    """One transformer layer in miniature, as the kernels of its two parts: attention (norm,
    QKV, scores against a fixed set of keys, mask, softmax, PV, projection, residual) and MLP
    (norm, fc1, activation, fc2, residual). Every cost is proportional to the rows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = PROBE_WIDTH
    weight = lambda *s: (torch.randn(*s, generator=g) / math.sqrt(s[-1])).to(device=device, dtype=dtype)
    qkv, proj, fc1, fc2 = weight(3 * w, w), weight(w, w), weight(4 * w, w), weight(w, 4 * w)
    keys, values = weight(PROBE_ROWS, w), weight(PROBE_ROWS, w)
    mask = torch.ones(PROBE_CHUNKS * PROBE_ROWS, PROBE_ROWS, dtype=torch.bool, device=device).triu(1)

    def layer(x):
        h = F.layer_norm(x, (w,))
        q = F.linear(h, qkv)[:, :w]
        scores = torch.matmul(q, keys.t()).masked_fill_(mask[:x.size(0)], -10000.0)
        x = x + F.linear(torch.matmul(torch.softmax(scores, -1), values), proj)
        h = F.layer_norm(x, (w,))
        return x + F.linear(F.gelu(F.linear(h, fc1)), fc2)
    return layer


def _measure_step_overhead(device, dtype, step_probe=None) -> float:
    """Seconds of fixed cost per layer part per chunk (`_measure_probe`)."""
    return _measure_probe(device, dtype, step_probe)[0]


def _measure_probe(device, dtype, step_probe=None) -> Tuple[float, Optional[float]]:
    """(seconds of fixed cost per layer part per chunk, fastest seconds of the adapter's probe as
    ONE chunk, None where the miniature was measured).

    The fixed cost: (T(K small chunks) - T(1 chunk of the same rows)) / (K - 1) / 2 parts,
    fastest of interleaved repeats, clamped at 0. On the adapter's `step_probe` (one real layer)
    where given, else on `_miniature_layer`.

    `step_probe(k)` returns the number of chunks it ran (None: k): a prompt shorter than
    `PROBE_CHUNKS` tokens gives fewer; with fewer than 2 the miniature is measured instead."""
    chunks = PROBE_CHUNKS
    if step_probe is not None:
        ran = step_probe(PROBE_CHUNKS)  # also the warm-up of the small chunks
        chunks = PROBE_CHUNKS if ran is None else int(ran)
    on_probe = step_probe is not None and chunks >= 2
    if on_probe:
        one, many = (lambda: step_probe(1)), (lambda: step_probe(chunks))
        one()
    else:
        chunks = PROBE_CHUNKS
        layer = _miniature_layer(device, dtype)
        x = torch.randn(PROBE_CHUNKS * PROBE_ROWS, PROBE_WIDTH, device=device, dtype=dtype)
        pieces = list(x.split(PROBE_ROWS))
        one = lambda: layer(x)
        many = lambda: [layer(c) for c in pieces]
        one(), many()  # warm-up (allocator, kernels)
    t_one = t_many = float("inf")
    started = time.perf_counter()
    for i in range(PROBE_REPEATS):  # interleaved: a burst of load slows both alike
        if i >= PROBE_MIN_REPEATS and time.perf_counter() - started > PROBE_BUDGET_S:
            break
        t_one = min(t_one, _fastest_s(one, device, reps=1, warmup=0))
        t_many = min(t_many, _fastest_s(many, device, reps=1, warmup=0))
    return max((t_many - t_one) / (chunks - 1) / 2, 0.0), (t_one if on_probe else None)


def _probe_rows(step_probe) -> Optional[Tuple[int, int]]:
    """(tokens, batch) one call of the adapter's probe runs, where it says
    (`step_probe.tokens`, `step_probe.batch`, default 1); None where it does not."""
    tokens = getattr(step_probe, "tokens", None)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        return None
    batch = getattr(step_probe, "batch", 1)
    return tokens, batch if isinstance(batch, int) and batch >= 1 else 1


def _roofline_s(shape: ModelShape, tp, tokens: int, batch: int, dtype, tflops: float, bw: float,
                pair: float, table: tuple) -> float:
    """The cost model's GEMMs and attention for one layer (both parts) of ONE chunk of `tokens`
    x `batch`, from this rank's rates; no step overhead, no per-token term."""
    device = cm.DeviceProfile("probe", tflops, bw, attn_score_table=table, attn_pair_s=pair)
    costs = cm.chunk_costs(shape, device, cm.LinkProfile("none", 0.0, 1.0), tp, 0, tokens, batch,
                           _dtype_bytes(dtype))
    return sum(c.compute_s for c in costs.values())


def _elementwise_layer(shape: ModelShape, tp, device, dtype, rows: int):
    """The per-token work of one layer that neither a GEMM nor the attention kernel does, at the
    model's widths (this rank's share), over `rows` tokens, as plain torch kernels: two norms
    and two residual adds over the hidden size, RoPE (cos, sin, rotate-half) over the rank's
    query and key heads, the [s, heads, d] <-> [heads, s, d] copies of Q, K, V and the output,
    and the MLP's activation over the rank's FFN width (gated: silu(a) * b)."""
    h, d = shape.hidden, shape.head_dim
    heads, groups = max(1, shape.num_heads // tp), max(1, shape.num_query_groups // tp)
    ffn = max(1, shape.ffn_hidden // tp) * (2 if shape.gated else 1)
    g = torch.Generator(device="cpu").manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    x, q, k, v, up, freqs = t(rows, h), t(rows, heads, d), t(rows, groups, d), t(rows, groups, d), \
        t(rows, ffn), t(rows, 1, d)

    def rope(u):
        first, second = u.chunk(2, -1)
        return u * freqs.cos() + torch.cat((-second, first), -1) * freqs.sin()

    def layer():
        y = x + F.layer_norm(x, (h,))
        qh, kh, vh = (u.transpose(0, 1).contiguous() for u in (rope(q), rope(k), v))
        out = qh.transpose(0, 1).reshape(rows, heads * d)
        if shape.gated:
            a, b = up.chunk(2, -1)
            act = F.silu(a) * b
        else:
            act = F.gelu(up)
        return y + F.layer_norm(y, (h,)), kh, vh, out, act
    return layer


def _measure_elementwise(shape: ModelShape, tp, device, dtype) -> float:
    """Seconds per token of one layer part of `_elementwise_layer`: the slope between its two
    row counts (`TOKEN_ROWS`, CUDA: `TOKEN_ROWS_CUDA`), halved over the two parts; fastest of
    interleaved repeats."""
    counts = TOKEN_ROWS_CUDA if device.type == "cuda" else TOKEN_ROWS
    small, large = (_elementwise_layer(shape, tp, device, dtype, rows) for rows in counts)
    small(), large()  # warm-up
    t_small = t_large = float("inf")
    for _ in range(5):
        t_small = min(t_small, _fastest_s(small, device, reps=1, warmup=0))
        t_large = min(t_large, _fastest_s(large, device, reps=1, warmup=0))
    return max((t_large - t_small) / (counts[1] - counts[0]) / 2, 0.0)


def _measure_token_cost(shape: ModelShape, tp, device, dtype, step_probe, one_s: Optional[float],
                        step: float, tflops: float, bw: float, pair: float, per_query: float,
                        table: tuple) -> float:
    """Seconds per token (x batch) of one layer part for what the GEMM and attention rooflines
    leave out: norms, RoPE, activations, residual adds, copies, and what the model's kernels
    lose against the calibrated rates (a GEMM inside the layer, a flash kernel's partly masked
    blocks).

    On the adapter's layer, where its probe says how many rows it runs (`_probe_rows`): that
    layer as one chunk (`one_s`, timed with the step overhead) less what the cost model already
    charges it (two steps, `_roofline_s`), per token and part, clamped at 0. Elsewhere:
    `_elementwise_layer`'s slope. Either way plus the fused attention's per-query cost of long
    prompts (`_measure_attention_pairs`; the cost model has one per-token term for both parts,
    so half of it per part). The probe's 128 rows hold the kernel's per-query cost at that size
    (smaller blocks there: about half of it), which is so counted twice: +3% of a 1024-token
    layer on the 2-core CPU (8 heads), +1% at 8192 (docs/costmodel_validation.md).

    Not on CUDA: there the probe's 128 rows are issued slower than the GPU runs them (an H200:
    megatron's Python 1.4-2.1 ms per layer call, docs/gpu_results.md), so the one-chunk time is
    the host's and its rest is no per-token cost (read as one, it put the H200's predictions at
    1.9-2.7x the measured compute); the miniature at `TOKEN_ROWS_CUDA` is device-bound."""
    rows = _probe_rows(step_probe) if one_s is not None and device.type != "cuda" else None
    attention = per_query * max(1, shape.num_heads // tp) / 2
    if rows is not None:
        tokens, batch = rows
        rest = one_s - 2 * step - _roofline_s(shape, tp, tokens, batch, dtype, tflops, bw, pair, table)
        return max(rest / (2 * tokens * batch), 0.0) + attention
    return _measure_elementwise(shape, tp, device, dtype) + attention


def _measure_locally(shape: ModelShape, tp, device, dtype, attention: str,
                     step_probe=None) -> List[float]:
    """This rank's figures, in a fixed layout (the same length on every rank):
    [1/TFLOPS, 1/(GB/s), step overhead s, attention pair s, token s, score s of each ATTN_LADDER
    point (unfused attention only)]."""
    tflops, bw = _measure_compute(shape, tp, device, dtype, _sync_of(device))
    step, one_s = _measure_probe(device, dtype, step_probe)
    if attention == "fused":
        (pair, per_query), table = _measure_attention_pairs(shape, tp, device, dtype), ()
    else:
        pair, per_query, table = 0.0, 0.0, _measure_attention_table(shape, tp, device, dtype)
    # the rates once more, a second or so later, the faster counts: a burst of load during the
    # first few ms (measured: GEMM 57 instead of 77-79 GFLOP/s on the 2-core CPU) only adds time
    again = _measure_compute(shape, tp, device, dtype, _sync_of(device))
    tflops, bw = max(tflops, again[0]), max(bw, again[1])
    token = _measure_token_cost(shape, tp, device, dtype, step_probe, one_s, step, tflops, bw, pair,
                                per_query, table)
    return [1.0 / tflops, 1.0 / bw, step, pair, token] + [t for _, t in table]


def _figure_count(attention: str) -> int:
    return 5 + (0 if attention == "fused" else len(ATTN_LADDER))


def attention_kind(env: Environment) -> str:
    """The attention the calibration measures: the adapter's `Environment.attention`, else the
    device's usual kind (CUDA: fused kernels; CPU: megatron's local, unfused core)."""
    if env.attention is not None:
        if env.attention not in ATTENTION_KINDS:
            raise ValueError(f"Environment.attention must be one of {ATTENTION_KINDS} or None, "
                             f"got {env.attention!r}")
        return env.attention
    return "fused" if _device(env).type == "cuda" else "unfused"


# ---------------------------------------------------------------- the link and the agreement

def _probe_link(reducer, tensors, device, failed: bool) -> Tuple[bool, float, float]:
    """(some rank failed, latency s, seconds per byte) of all-reduces through `reducer`. The
    first transfer carries this rank's failure flag: its sum tells every rank alike whether
    to go on (it is then the small size's warm-up) or to stop here."""
    small, large = tensors
    small.view(-1)[0] = 1.0 if failed else 0.0
    reducer.start(small).wait()
    if small.view(-1)[0].item() > 0:
        return True, 0.0, 0.0
    # host clock around synchronisations: the transfer may run off the current stream (NCCL's,
    # the proxy's) or on the host (gloo)
    times = [max(min(time_ms(lambda t=t: reducer.start(t).wait(), 2, w, _sync_of(device))) / 1e3, 1e-9)
             for t, w in ((small, 0), (large, 1))]
    b1, b2 = (t.numel() * t.element_size() for t in tensors)
    per_byte = max((times[1] - times[0]) / (b2 - b1), 1e-15)
    return False, max(times[0] - b1 * per_byte, 0.0), per_byte


def _encode(message: str) -> torch.Tensor:
    data = message.encode("utf-8", errors="replace")[:MESSAGE_BYTES]
    slot = torch.zeros(MESSAGE_BYTES, dtype=torch.float64)
    slot[:len(data)] = torch.tensor(list(data), dtype=torch.float64)
    return slot


def _decode(slot: torch.Tensor) -> str:
    data = bytes(int(b) for b in slot.tolist() if b > 0)
    return data.decode("utf-8", errors="replace")


def _agree(figures: List[float], error: Optional[str], group, device) -> Tuple[List[float], Dict[int, str]]:
    """ONE all-reduce MAX over the group of [status, figures, one message slot per rank]:
    the slowest rank's figures (large times, small rates: the figures are all times) and every
    failed rank's message, identical on every rank."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    vec = torch.zeros(1 + len(figures) + size * MESSAGE_BYTES, dtype=torch.float64)
    vec[0] = 1.0 if error else 0.0
    vec[1:1 + len(figures)] = torch.tensor(figures, dtype=torch.float64)
    if error:
        start = 1 + len(figures) + rank * MESSAGE_BYTES
        vec[start:start + MESSAGE_BYTES] = _encode(error)
    on = vec.to(device) if device.type == "cuda" else vec
    dist.all_reduce(on, op=dist.ReduceOp.MAX, group=group)
    vec = on.cpu()
    slots = vec[1 + len(figures):].view(size, MESSAGE_BYTES)
    errors = {r: _decode(slots[r]) for r in range(size) if slots[r].any()}
    return vec[1:1 + len(figures)].tolist(), errors


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _calibration_key(shape: ModelShape, env: Environment, tp: int) -> tuple:
    dims = (shape.hidden, shape.ffn_hidden, shape.num_heads, shape.head_dim)
    # the reducer backend in use is part of the key: an emulated link calibrates as itself.
    # env.step_probe is not: a new probe object per forward finds the same calibration
    return (comm.reducer_key(), _device(env), env.dtype, env.group, tp, dims, attention_kind(env))


def _device(env: Environment) -> torch.device:
    # adapters pass the hidden states' torch.device: taken as it is, no torch call on the hot path
    return env.device if isinstance(env.device, torch.device) else torch.device(env.device)


def calibrate(shape: ModelShape, env: Environment, seq_len: Optional[int] = None,
              batch: Optional[int] = None, tp: Optional[int] = None) -> Calibration:
    """This machine's calibration: measured on the first call of an environment (collectively
    over the TP group, identical on every rank), then cached. `seq_len` and `batch` are
    accepted for older callers and not used: the calibration does not depend on them."""
    tp = comm.tp_size(env.group) if tp is None else tp
    key = _calibration_key(shape, env, tp)
    if key not in _calibrations:
        _calibrations[key] = _measure(shape, env, tp)
    return _calibrations[key]


def _measure(shape: ModelShape, env: Environment, tp: int) -> Calibration:
    device, dtype, group, attention = _device(env), env.dtype, env.group, attention_kind(env)
    linked = tp > 1 and group is not None
    # the flag transfer's tensor first, before anything that can fail: every rank must be able
    # to take part in it
    small = torch.zeros(LINK_TOKENS[0], shape.hidden, device=device, dtype=dtype) if linked else None
    error, large = None, None
    figures = [0.0] * _figure_count(attention)
    try:
        figures = _measure_locally(shape, tp, device, dtype, attention, env.step_probe)
        if linked:
            large = torch.zeros(LINK_TOKENS[1], shape.hidden, device=device, dtype=dtype)
    except Exception as e:  # reported on every rank by the combining all-reduce below
        error = _describe(e)
    latency, per_byte, failed_elsewhere = 0.0, 1e-15, False
    if linked:
        failed_elsewhere, latency, per_byte = _probe_link(comm.make_reducer(group), (small, large), device,
                                                          error is not None)
    combined = figures + [latency, per_byte]
    errors = {0: error} if error else {}
    if linked and _is_distributed(group):
        combined, errors = _agree(combined, error, group, device)
    elif failed_elsewhere and not errors:  # a link with no process group to carry the message
        errors = {-1: "failed on another rank of the link"}
    if errors:
        where = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
        raise RuntimeError(f"split='auto': calibration failed on {len(errors)} rank(s) ({where})")
    inv_tflops, inv_bw, step, pair, token, *rest = combined
    *scores, latency, per_byte = rest
    table = tuple((float(r * k), t) for (r, k), t in zip(ATTN_LADDER, scores))  # () when fused
    busbw = 2 * (tp - 1) / tp / per_byte / 1e9 if tp > 1 else float("inf")
    return Calibration(1.0 / inv_tflops, 1.0 / inv_bw, table, latency * 1e6, busbw, step, pair, token,
                       device.type == "cuda")


def _is_distributed(group) -> bool:
    import torch.distributed as dist

    return group is not None and dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------- plans from the calibration

def _dtype_bytes(dtype) -> int:
    return dtype.itemsize  # torch.dtype knows its size: no tensor, nothing on the device


def plan_for(shape: ModelShape, env: Environment, seq_len: int, batch: int, tp: int, max_chunks: int,
             calibration: Optional[Calibration] = None) -> AutoPlan:
    """The cached (or new) plan of seq_len's bucket, from the calibration (calibrating on the
    first call of the environment; later calls compute in plain Python only)."""
    cal = calibration or calibrate(shape, env, tp=tp)
    b = bucket_of(seq_len)
    key = (cal, b, batch, tp, max_chunks, shape)
    if key in _plans:
        return _plans[key]
    device, link = cal.device(), cal.link()
    dtype_bytes = _dtype_bytes(env.dtype)
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
    the first call of an environment is collective (calibration), every later one, whatever its
    length, is computed from the cached calibration without communicating.
    """
    if tp < 2 or max_chunks < 2 or seq_len < 2:
        return stock("auto: nothing to split")
    cal = calibrate(shape, env, tp=tp)
    plan = plan_for(shape, env, seq_len, batch, tp, max_chunks, calibration=cal)
    if plan.fractions is None:
        return PrefillPlan(None, "auto: no split predicted to pay", plan.predicted_ms, plan.baseline_ms)
    if plan.min_tokens is None or seq_len < plan.min_tokens:
        return PrefillPlan(None, f"auto: prompt shorter than the calibrated min_tokens={plan.min_tokens}",
                           plan.predicted_ms, plan.baseline_ms)
    bounds = chunk_boundaries(seq_len, len(plan.fractions), list(_normalised(plan.fractions)))
    # the exact length: the plan must still be predicted faster than stock
    p = cm.predict(shape, cal.device(), cal.link(), tp, seq_len, batch, boundaries=bounds,
                   dtype_bytes=_dtype_bytes(env.dtype))
    if not p.iso_ms <= p.baseline_ms * (1 - MIN_GAIN) or len(bounds) < 3:
        return PrefillPlan(None, "auto: split not predicted faster at this length", p.iso_ms, p.baseline_ms)
    return PrefillPlan(tuple(bounds), f"auto: {len(bounds) - 1} chunks predicted {p.iso_ms:.2f} ms "
                                      f"vs stock {p.baseline_ms:.2f} ms", p.iso_ms, p.baseline_ms)


# Chunks of a pipelined prompt average at least this many tokens at TP 1 (2 tensor-core tiles):
# below it the calibration's rates overstate what small chunks reach. Measured (launch/bench.py
# --pipeline-model-parallel-size 2, this repo's 2-core CPU): 256 tokens in 6 chunks of ~43 took
# 1.49x the compute of one chunk (calibrated model: far less), and the pipelined prompt 8.5% longer
# than stock PP; with this floor auto runs 256 tokens stock and cuts 512 in 4 (0.85 of stock PP;
# a 256-token floor left it 2 chunks, 0.95) and 768 in 6 (0.80). With TP > 1 ISO's overlap pays
# for smaller chunks (one 64-token tile, as auto without PP; measured with each stage standing in
# for TP 2 at M/C 0.5, docs/bench_cpu_pp_emulated.json: 256 tokens in 2 or 4 chunks 0.81 and 0.74
# of stock PP, in 8 of 32 tokens 0.86; auto took 4).
PIPELINE_MIN_CHUNK = 128
PIPELINE_MIN_CHUNK_TP = 64

# planned once per (calibration, stage layers, length): the search simulates every candidate
_best_pipeline_plan = lru_cache(maxsize=256)(cm.best_pipeline_plan)


def pipeline_auto_plan(shape: ModelShape, env: Environment, seq_len: int, batch: int, tp: int,
                       max_chunks: int, stages: int) -> PrefillPlan:
    """The plan of one stage of `stages` (chunked pipeline prefill): `costmodel.best_pipeline_plan`
    on this machine's calibration (collective over the TP group the first time), K up to
    `max_chunks`, stock unless predicted MIN_GAIN faster than stock PP. The point-to-point link
    between stages is `env.stage_link` (the Megatron block measures it), else taken to be as
    fast as the calibrated TP link. Every stage must cut the same chunks: the caller plans on
    the first stage and hands that plan to the others (the Megatron block does). Chunks average
    at least PIPELINE_MIN_CHUNK tokens at TP 1, PIPELINE_MIN_CHUNK_TP with TP > 1: shorter
    prompts run stock."""
    if max_chunks < 2 or seq_len < 2:
        return stock("auto: nothing to split")
    cal = calibrate(shape, env, tp=tp)
    per_stage = -(-shape.num_layers // stages)  # the busiest stage's layers (an even split rounded up)
    link = cal.link()
    p2p = env.stage_link or cm.P2PLink("as the TP link (assumed)", link.latency_us, link.bus_bw_gbs)
    counts = tuple(k for k in (2, 3, 4, 6, 8, 12, 16, 24, 32) if k <= max_chunks)
    plan = _best_pipeline_plan(shape, cal.device(), link, p2p, tp, (per_stage,) * stages, seq_len, batch,
                               counts, _dtype_bytes(env.dtype), MIN_GAIN,
                               min_chunk_tokens=PIPELINE_MIN_CHUNK if tp < 2 else PIPELINE_MIN_CHUNK_TP)
    over = f"stage link {p2p.name}: {p2p.latency_us:.0f} us + {p2p.bw_gbs:.3g} GB/s"
    if plan.num_chunks < 2:
        return PrefillPlan(None, f"auto: no chunked pipeline predicted to pay ({over})", plan.predicted_ms,
                           plan.baseline_ms)
    return PrefillPlan(tuple(plan.boundaries), f"auto: {plan.num_chunks} chunks through {stages} stages "
                       f"predicted {plan.predicted_ms:.2f} ms vs stock PP {plan.baseline_ms:.2f} ms ({over})",
                       plan.predicted_ms, plan.baseline_ms)


def _normalised(fractions):
    total = sum(fractions)
    return [f / total for f in fractions]
