"""Cost model: predicts prefill time with and without ISO by simulating the same schedule.

Per layer and per tensor-parallel rank, a chunk of tokens [start, end) costs
  attn = qkv GEMM + causal attention core (queries start..end-1 against keys 0..end-1) + proj GEMM
  mlp  = fc1 GEMM (two of them when gated) + fc2 GEMM
  AR   = ring all-reduce of the chunk's partial sum, (end-start)*batch*hidden*dtype_bytes bytes,
         latency + bytes * 2(n-1)/n / bus_bw  (NCCL-tests' "busbw" convention; n = 1: no AR)
Each GEMM is a roofline, max(flops / matmul rate, bytes / memory bandwidth), with its weights read
once per chunk: this is why tiny chunks cost more than they hide. Each compute step (one part of
one chunk) also pays the device's `token_s` per token (norms, RoPE, elementwise and per-op
work the rooflines leave out; 0 for the datasheet GPU profiles) and its `step_overhead_s`, the
host's time to issue the step: added where the host waits for each kernel (CPU), and where the
host issues ahead of the device (`host_async`: CUDA) the step takes the longer of the two, the
host's issue or the device's work. The embedding / output layer is left out (the same with and
without ISO).

Boundaries come from `planner.chunk_boundaries` (rounded to 64-token tiles where the prompt is
long enough), so a prediction is of the chunks that run.

`simulate` runs the executor's schedule (`schedule.prefill_schedule`; for parallel-residual
models its `parts=(MERGED,)` form, whose one `MERGED` step per layer chunk costs the attention
and MLP computes and ONE all-reduce) on two resources, the compute stream and the link.
A model is parallel-residual where its shape says so (`ModelShape.parallel_residual`; the
presets are sequential); the baseline is always
stock's sequential schedule (stock AutoTP reduces attention and MLP separately).
While an all-reduce is in flight, compute runs at (1 - s) of its speed, s = the device's
`contention` (NCCL's kernels hold SMs of their own; see DEVICES for the cited values); s = 0:
the two resources do not slow each other down. Times are seconds inside, ms in results.

Model presets (`MODELS`) are published configurations, each with its source in `MODEL_SOURCES`.

Benchmark profiles (`launch/bench.py --profiles`) are parsed here too, since a GPU profile is
the cost model's prediction for that GPU: `parse_profile` ("ratio:R" or
"gpu:<device>/<model>/tp<N>", e.g. "gpu:4090/opt-30b/tp4"), `profile_ratio` (the M/C ratio and
latency share it asks for), `link_for_profile` (the emulated link's model reproducing it on the
machine at hand).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .schedule import MERGED, PARTS, Step, schedule_for, stage_schedule
from .planner import Split, chunk_boundaries
from .shape import ModelShape, TokenCost

GEMM_EFFICIENCY = 0.80  # achievable / datasheet dense tensor rate for large cuBLAS GEMMs
MEM_EFFICIENCY = 0.85   # achievable / datasheet DRAM bandwidth (streaming reads)


def check_contention(contention: float) -> float:
    if not 0.0 <= contention < 1.0:
        raise ValueError(f"contention s must be in [0, 1): compute runs at (1 - s) of its speed "
                         f"while an all-reduce is in flight, got {contention!r}")
    return float(contention)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    matmul_tflops: float  # achievable dense GEMM rate in the model's dtype
    mem_bw_gbs: float     # achievable DRAM bandwidth
    source: str = ""
    # Unfused attention (megatron's local DotProductAttention: QK^T, mask, softmax and PV over the
    # whole [queries, keys] rectangle, masked pairs included): seconds per score element of one
    # head, at key length k: attn_score_s + attn_score_s_per_key * k. 0 and 0 (the default): a
    # fused causal kernel (flash / TE), a roofline over the causal pairs only.
    attn_score_s: float = 0.0
    attn_score_s_per_key: float = 0.0
    # Measured instead: ((scores per head, i.e. queries x keys, seconds per score), ...) rising;
    # interpolated in log(scores) and clamped at the ends. The cost per score grows once a head's
    # score matrix spills out of cache. Wins over the two fields above when given.
    attn_score_table: Tuple[Tuple[float, float], ...] = ()
    # Fixed cost of one compute step (one layer part of one chunk): launches, Python, syncs.
    step_overhead_s: float = 0.0
    # Fused causal attention, measured (calibrate: torch's scaled_dot_product_attention on
    # CUDA): seconds per causal (query, key) pair of one head; the roofline when larger. 0: the
    # roofline alone.
    attn_pair_s: float = 0.0
    # Seconds per token of one compute step (one layer part of one chunk) for what the GEMM and
    # attention rooflines leave out: norms, RoPE, activations, residual adds, per-op work.
    token_s: float = 0.0
    # s: while an all-reduce is in flight, compute runs at (1 - s) of its speed (0 <= s < 1).
    contention: float = 0.0
    contention_source: str = ""
    # The host issues kernels ahead of the device (CUDA streams): a compute step costs
    # max(step_overhead_s, the device's work) instead of their sum. Measured on an H200
    # (docs/gpu_results.md, 4 layers of 4096 hidden): at 1024 tokens the host took about 5.5 ms
    # to issue what the GPU ran in 3.3 ms, and the forward about 4.7 ms, far from the 8.8 of
    # the sum (the two figures come from different runs).
    host_async: bool = False

    def __post_init__(self):
        check_contention(self.contention)
        if not self.token_s >= 0:
            raise ValueError(f"token_s must be >= 0 seconds per token, got {self.token_s!r}")

    @classmethod
    def from_measurement(cls, name: str, gemm_flops: float, gemm_s: float, mem_bw_gbs: float,
                         source: str = "measured") -> "DeviceProfile":
        """A profile calibrated from one timed large GEMM (flops, seconds) and a bandwidth."""
        return cls(name, gemm_flops / gemm_s / 1e12, mem_bw_gbs, source)


@dataclass(frozen=True)
class LinkProfile:
    name: str
    latency_us: float  # fixed cost of one all-reduce
    bus_bw_gbs: float  # achievable all-reduce bus bandwidth (NCCL-tests busbw)
    source: str = ""

    @classmethod
    def from_measurement(cls, name: str, nbytes: float, seconds: float, tp: int,
                         latency_us: float = 0.0, source: str = "measured") -> "LinkProfile":
        """A profile calibrated from one timed all-reduce of `nbytes` over `tp` ranks."""
        busbw = nbytes * 2 * (tp - 1) / tp / (seconds - latency_us * 1e-6)
        return cls(name, latency_us, busbw / 1e9, source)

    @classmethod
    def from_per_byte(cls, name: str, latency_s: float, per_byte_s: float, tp: int,
                      source: str = "") -> "LinkProfile":
        """The profile whose all-reduce of b bytes over `tp` ranks takes latency_s + b * per_byte_s
        (an emulated link's `LinkModel`), in the busbw convention of `allreduce_time`."""
        busbw = 2 * (tp - 1) / tp / per_byte_s if per_byte_s > 0 else float("inf")
        return cls(name, latency_s * 1e6, busbw / 1e9, source)


# Contention s = the share of the SMs NCCL's all-reduce kernels hold while in flight: one CTA per
# channel, and "NCCL CTAs won't share an SM with compute kernels" (NCCL maintainer, NVIDIA/nccl#689).
# Prefill GEMMs at 1k-8k tokens are compute-bound, so losing k of N SMs slows them by about k / N.
# Left out: the all-reduce's DRAM traffic (~3x busbw, NVIDIA/nccl#1428), which slows memory-bound
# kernels too; there an A100 GEMM overlapped with an all-gather took 2.08 instead of 1.18 ms.
CONTENTION_4090 = 2 / 128
CONTENTION_A800 = 16 / 108
CONTENTION_H100 = 16 / 132

DEVICES: Dict[str, DeviceProfile] = {
    "4090": DeviceProfile("RTX 4090", 165.2 * GEMM_EFFICIENCY, 1008 * MEM_EFFICIENCY,
                          "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090: 165.2 TFLOPS dense "
                          "BF16 tensor with FP32 accumulate, 1008 GB/s GDDR6X)",
                          contention=CONTENTION_4090,
                          contention_source="2 NCCL channels (CTAs) of 128 SMs: NCCL on a PCIe system "
                          "'should just launch 2 SMs' (NVIDIA/nccl#689); NCCL logs of SHM all-reduces show "
                          "channels 00-01 only (NVIDIA/nccl#1817); RTX 4090: 128 SMs (Ada whitepaper)"),
    "a800": DeviceProfile("A800 SXM 80GB", 312 * GEMM_EFFICIENCY, 2039 * MEM_EFFICIENCY,
                          "NVIDIA A800 / A100 80GB SXM datasheet (312 TFLOPS dense BF16, 2039 GB/s HBM2e)",
                          contention=CONTENTION_A800,
                          contention_source="16 NCCL CTAs of 108 SMs: a DGX A100 all-reduce runs 24 CTAs, "
                          "2 per NVLink over 12 NVLinks (NVIDIA/nccl#1225); the A800 has 8 NVLinks (400 of "
                          "the A100's 600 GB/s), so 16 at the same 2 per link (assumed); A100/A800: 108 SMs"),
    "h100": DeviceProfile("H100 SXM", 989 * GEMM_EFFICIENCY, 3350 * MEM_EFFICIENCY,
                          "NVIDIA H100 datasheet, SXM5 (989 TFLOPS dense BF16, 3.35 TB/s HBM3)",
                          contention=CONTENTION_H100,
                          contention_source="16 NCCL CTAs of 132 SMs: NVLS all-reduce on Hopper uses "
                          "NVLS_NCHANNELS_SM90 = 16 channels (NVIDIA/nccl src/transport/nvls.cc); H100 SXM5: "
                          "132 SMs"),
}

LINKS: Dict[str, LinkProfile] = {
    "4090": LinkProfile("PCIe 4.0 x16, no P2P", 40.0, 11.0,
                        "PCIe 4.0 x16 = 32 GB/s per direction; GeForce has no P2P, so NCCL stages "
                        "through host memory (SHM): all-reduce busbw ~10-12 GB/s, latency tens of us "
                        "(nccl-tests all_reduce_perf reports, e.g. NVIDIA/nccl-tests#307)"),
    "a800": LinkProfile("NVLink 3, 400 GB/s (A800)", 15.0, 160.0,
                        "A800 SXM datasheet: NVLink 400 GB/s bidirectional (A100: 600); all-reduce "
                        "busbw ~150-200 GB/s achievable (A100 reaches ~230 in nccl-tests)"),
    "h100": LinkProfile("NVLink 4, 900 GB/s", 15.0, 400.0,
                        "H100 SXM datasheet: NVLink 900 GB/s bidirectional; nccl-tests all-reduce "
                        "busbw ~350-450 GB/s within one HGX node"),
}

MACHINES: Dict[str, Tuple[DeviceProfile, LinkProfile]] = {k: (DEVICES[k], LINKS[k]) for k in DEVICES}


# Published configurations. Only the fields below matter to the cost model (the MLP's activation
# only through `gated`); norms, biases and position embeddings are left out of `params()`.
MODELS: Dict[str, ModelShape] = {
    "opt-30b": ModelShape("OPT-30B", 48, 7168, 56, 56, 28672, False, 50272),
    "llama-33b": ModelShape("LLaMA-33B", 60, 6656, 52, 52, 17920, True, 32000),
    "llama-2-70b": ModelShape("Llama-2-70B", 80, 8192, 64, 8, 28672, True, 32000),
    "llama-3-8b": ModelShape("Llama-3-8B", 32, 4096, 32, 8, 14336, True, 128256),
    "llama-3-70b": ModelShape("Llama-3-70B", 80, 8192, 64, 8, 28672, True, 128256),
    "llama-3.1-405b": ModelShape("Llama-3.1-405B", 126, 16384, 128, 8, 53248, True, 128256),
}

MODEL_SOURCES: Dict[str, str] = {
    "opt-30b": "Hugging Face facebook/opt-30b config.json: num_hidden_layers 48, hidden_size 7168, "
               "num_attention_heads 56, ffn_dim 28672, activation_function relu (an ungated MLP), "
               "vocab_size 50272; OPT paper (Zhang et al. 2022, arXiv 2205.01068) Table 1",
    "llama-33b": "LLaMA paper (Touvron et al. 2023, arXiv 2302.13971) Table 2, the '33B' (32.5B "
                 "parameters; 'LLaMA-30B' on Hugging Face): 60 layers, dimension 6656, 52 heads, SwiGLU; "
                 "huggyllama/llama-30b config.json: intermediate_size 17920, vocab_size 32000",
    "llama-2-70b": "Hugging Face meta-llama/Llama-2-70b-hf config.json: num_hidden_layers 80, hidden_size "
                   "8192, num_attention_heads 64, num_key_value_heads 8, intermediate_size 28672 (SwiGLU), "
                   "vocab_size 32000",
    "llama-3-8b": "Hugging Face meta-llama/Meta-Llama-3-8B config.json: num_hidden_layers 32, hidden_size "
                  "4096, num_attention_heads 32, num_key_value_heads 8, intermediate_size 14336 (SwiGLU), "
                  "vocab_size 128256",
    "llama-3-70b": "Hugging Face meta-llama/Meta-Llama-3-70B config.json: num_hidden_layers 80, hidden_size "
                   "8192, num_attention_heads 64, num_key_value_heads 8, intermediate_size 28672 (SwiGLU), "
                   "vocab_size 128256",
    "llama-3.1-405b": "Hugging Face meta-llama/Llama-3.1-405B config.json: num_hidden_layers 126, hidden_size "
                      "16384, num_attention_heads 128, num_key_value_heads 8, intermediate_size 53248 (SwiGLU), "
                      "vocab_size 128256; the Llama 3 paper (Llama Team 2024, arXiv 2407.21783) Table 3: 126 "
                      "layers, model dimension 16,384, FFN dimension 53,248, 128 heads, 8 key/value heads",
}

# Old profile names: "70b" was Llama-2-70B all along. "30b" mixed LLaMA-33B's dimensions with an
# ungated MLP and OPT's vocabulary (neither model), so it is refused with the two real ones named.
MODEL_ALIASES: Dict[str, str] = {"70b": "llama-2-70b"}
REMOVED_MODELS: Dict[str, str] = {
    "30b": "model '30b' was removed: it mixed LLaMA-33B's dimensions with an ungated MLP and OPT's "
           "vocabulary, neither model; use 'opt-30b' (OPT-30B) or 'llama-33b' (LLaMA-33B, a.k.a. LLaMA-30B)",
}


def model_preset(name: str) -> ModelShape:
    """The preset called `name` (case-insensitive; aliases resolved); ValueError if unknown."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    key = name.strip().lower()
    if key in REMOVED_MODELS:
        raise ValueError(REMOVED_MODELS[key])
    key = MODEL_ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} (aliases: {MODEL_ALIASES})")
    return MODELS[key]


def token_cost(model: ModelShape) -> TokenCost:
    """The relative per-token / per-pair compute the planner uses for balanced boundaries."""
    return TokenCost.from_shape(model)


# ---------------------------------------------------------------- per-chunk costs

class PartCost(NamedTuple):
    compute_s: float  # compute of the part up to its partial sum
    comm_s: float     # the all-reduce of that partial sum
    # the compute stream's own time for that all-reduce: at its start (after the part's
    # compute, while the link already carries it) and at its wait (before the wait can end):
    # e.g. the emulated link's real data movement on a CPU core (launch/bench.py); not slowed
    # by contention here (the emulation counts it as compute beside the transfer: a little more)
    start_s: float = 0.0
    wait_s: float = 0.0


def _roofline(flops: float, nbytes: float, device: DeviceProfile) -> float:
    return max(flops / (device.matmul_tflops * 1e12), nbytes / (device.mem_bw_gbs * 1e9))


def gemm_time(m: int, k: int, n: float, device: DeviceProfile, dtype_bytes: int = 2) -> float:
    """[m, k] x [k, n]: reads both operands (weights once), writes the output."""
    return _roofline(2.0 * m * k * n, (m * k + k * n + m * n) * dtype_bytes, device)


def allreduce_time(nbytes: float, link: LinkProfile, tp: int) -> float:
    if tp <= 1 or nbytes <= 0:
        return 0.0
    return link.latency_us * 1e-6 + nbytes * 2 * (tp - 1) / tp / (link.bus_bw_gbs * 1e9)


def score_seconds(table: Sequence[Tuple[float, float]], scores: float) -> float:
    """Seconds per attention score for a head's score matrix of `scores` entries (see
    DeviceProfile.attn_score_table): log-linear interpolation, clamped at both ends."""
    import math

    pts = sorted(table)
    if scores <= pts[0][0]:
        return pts[0][1]
    if scores >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= scores <= x1:
            if x1 == x0:
                return y1
            w = (math.log(scores) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return pts[-1][1]


def chunk_costs(model: ModelShape, device: DeviceProfile, link: LinkProfile, tp: int, start: int,
                end: int, batch: int = 1, dtype_bytes: int = 2) -> Dict[str, PartCost]:
    """Per-layer, per-rank cost of the chunk [start, end): {"attn": PartCost, "mlp": PartCost}."""
    m, h, d = (end - start) * batch, model.hidden, model.head_dim
    heads, groups = model.num_heads / tp, model.num_query_groups / tp
    pairs = (end * (end + 1) - start * (start + 1)) / 2  # causal (query, key) pairs
    core_bytes = batch * (2 * (end - start) * heads + 2 * end * groups) * d * dtype_bytes  # Q,O; K,V
    if device.attn_score_table:  # unfused, measured: the whole rectangle
        core = score_seconds(device.attn_score_table, (end - start) * end) * heads * batch * (end - start) * end
    elif device.attn_score_s > 0 or device.attn_score_s_per_key > 0:  # unfused: the whole rectangle
        per_score = max(device.attn_score_s + device.attn_score_s_per_key * end, 0.0)
        core = per_score * heads * batch * (end - start) * end
    else:
        core = _roofline(4.0 * d * pairs * heads * batch, core_bytes, device)  # QK^T + PV, flash-style
        core = max(core, device.attn_pair_s * pairs * heads * batch)
    attn = (gemm_time(m, h, (model.q_hidden + 2 * model.kv_hidden) / tp, device, dtype_bytes) + core
            + gemm_time(m, model.q_hidden / tp, h, device, dtype_bytes))
    fc1 = gemm_time(m, h, model.ffn_hidden / tp, device, dtype_bytes)
    mlp = fc1 * (2 if model.gated else 1) + gemm_time(m, model.ffn_hidden / tp, h, device, dtype_bytes)
    ar = allreduce_time(m * h * dtype_bytes, link, tp)
    token = device.token_s * m  # m = tokens x batch
    if device.host_async:  # the host's issue hides behind the device's work, or the reverse
        step = lambda work: max(device.step_overhead_s, work + token)
    else:
        step = lambda work: work + token + device.step_overhead_s
    return {"attn": PartCost(step(attn), ar), "mlp": PartCost(step(mlp), ar)}


def step_costs(model: ModelShape, device: DeviceProfile, link: LinkProfile, tp: int,
               boundaries: Sequence[int], batch: int = 1, dtype_bytes: int = 2) -> Dict[Tuple[str, int], PartCost]:
    """{(part, chunk): PartCost} for chunks given by token `boundaries` (same for every layer)."""
    costs = {}
    for c, (s, e) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        for part, cost in chunk_costs(model, device, link, tp, s, e, batch, dtype_bytes).items():
            costs[(part, c)] = cost
    return costs


# ---------------------------------------------------------------- simulation

def _slowed_finish(start: float, work: float, busy: List[Tuple[float, float]], first: int,
                   rate: float) -> Tuple[float, int]:
    """When compute of `work` seconds (at full speed) begun at `start` ends, progressing at `rate`
    inside the link's busy intervals `busy` (sorted, disjoint) and at 1 outside; and the index of
    the first interval still ending after `start` (compute only moves forward: earlier ones are
    never looked at again)."""
    t, i = start, first
    while i < len(busy) and busy[i][1] <= t:
        i += 1
    first = i
    while work > 0.0:
        if i == len(busy):
            return t + work, first
        a, b = busy[i]
        if t < a:  # free stretch before the next transfer
            if work <= a - t:
                return t + work, first
            work -= a - t
            t = a
        done = (b - t) * rate  # work done in the rest of this transfer
        if work <= done:
            return t + work / rate, first
        work -= done
        t = b
        i += 1
    return t, first


def part_cost(step_costs: Mapping[Tuple[str, int], PartCost], part: str, chunk: int) -> PartCost:
    """The cost of one step's part of one chunk: a `MERGED` part (parallel residual) not given
    on its own computes attention and MLP and does ONE all-reduce of the same size as either's."""
    key = (part, chunk)
    if part != MERGED or key in step_costs:
        return step_costs[key]
    attn, mlp = step_costs[("attn", chunk)], step_costs[("mlp", chunk)]
    return PartCost(attn.compute_s + mlp.compute_s, attn.comm_s, attn.start_s, attn.wait_s)


def simulate(schedule_steps: Sequence[Step], step_costs: Mapping[Tuple[str, int], PartCost],
             contention: float = 0.0) -> float:
    """Seconds to run the steps on one compute stream and one link (transfers queue in order).

    compute: runs after the previous compute; at (1 - contention) of its speed while a transfer
    is on the link, at full speed otherwise (piecewise in time). reduce: starts when its compute
    is done and the link is free; the compute stream then spends its `start_s`. finish: the
    compute stream spends the reduce's `wait_s`, then waits until that all-reduce is done.
    Transfers are not slowed by compute. Every transfer a compute can overlap is known when that
    compute is simulated: a reduce listed later starts after its own compute, so after this one.
    """
    return simulate_stage(schedule_steps, step_costs, contention)[0]


def simulate_stage(schedule_steps: Sequence[Step], step_costs: Mapping[Tuple[str, int], PartCost],
                   contention: float = 0.0, arrivals: Optional[Mapping[int, float]] = None,
                   send_s: Optional[Mapping[int, float]] = None) -> Tuple[float, Dict[int, float]]:
    """`simulate` for one pipeline stage (schedule.stage_schedule): `arrive` of chunk c waits
    until `arrivals[c]` (when the stage before delivered it); `send` of chunk c starts when the
    chunk is ready and the stage's outgoing point-to-point link is free, and takes `send_s[c]`.
    Returns (when the stage is done, {chunk: when it arrives at the next stage})."""
    rate = 1.0 - check_contention(contention)
    compute_free = link_free = p2p_free = 0.0
    computed: Dict[tuple, float] = {}
    reduced: Dict[tuple, float] = {}
    delivered: Dict[int, float] = {}
    busy: List[Tuple[float, float]] = []  # the link's transfers, in time order
    first = 0
    for s in schedule_steps:
        key = (s.layer, s.part, s.chunk)
        if s.op == "compute":
            work = part_cost(step_costs, s.part, s.chunk).compute_s
            if rate == 1.0:
                compute_free += work
            else:
                compute_free, first = _slowed_finish(compute_free, work, busy, first, rate)
            computed[key] = compute_free
        elif s.op == "reduce":
            cost = part_cost(step_costs, s.part, s.chunk)
            start = max(computed[key], link_free)
            link_free = start + cost.comm_s
            if link_free > start:
                busy.append((start, link_free))
            reduced[key] = link_free
            compute_free += cost.start_s
        elif s.op == "finish":
            compute_free = max(compute_free + part_cost(step_costs, s.part, s.chunk).wait_s, reduced[key])
        elif s.op == "arrive":
            compute_free = max(compute_free, arrivals[s.chunk])
        elif s.op == "send":  # the point-to-point link is the stages', not the TP group's
            p2p_free = max(compute_free, p2p_free) + send_s[s.chunk]
            delivered[s.chunk] = p2p_free
        elif s.op not in ("recv", "sent"):  # recv: posted ahead; sent: waits on nothing later
            raise ValueError(f"unknown step op {s.op!r}")
    return max(compute_free, link_free, p2p_free), delivered


def simulate_pipeline(stages: Sequence[Sequence[Step]], stage_costs: Sequence[Mapping[Tuple[str, int], PartCost]],
                      send_s: Mapping[int, float], contention: float = 0.0) -> float:
    """Seconds until the last stage is done (time to first token, without the first stage's
    embedding and the last stage's output layer): the stages in order, each fed the chunk
    arrival times of the one before (prefill only flows forward). `send_s[c]`: the transfer of
    chunk c between two stages."""
    arrivals: Optional[Dict[int, float]] = None
    end = 0.0
    for steps, costs in zip(stages, stage_costs):
        end, arrivals = simulate_stage(steps, costs, contention, arrivals, send_s)
    return end


@lru_cache(maxsize=64)
def _schedule(num_layers: int, num_chunks: int, parallel_residual: bool = False) -> Tuple[Step, ...]:
    return tuple(schedule_for(num_layers, num_chunks, parallel_residual))


def is_parallel_residual(model: ModelShape) -> bool:
    return model.parallel_residual


def _time(model, device, link, tp, boundaries, batch, dtype_bytes, stock: bool = False) -> float:
    """ISO's schedule over `boundaries`, or with stock=True stock's (sequential, one chunk)."""
    if stock:
        boundaries = [boundaries[0], boundaries[-1]]
    costs = step_costs(model, device, link, tp, boundaries, batch, dtype_bytes)
    merged = is_parallel_residual(model) and not stock
    return simulate(_schedule(model.num_layers, len(boundaries) - 1, merged), costs, device.contention)


# ---------------------------------------------------------------- predictions and plans

class Prediction(NamedTuple):
    baseline_ms: float  # stock: one chunk, every all-reduce waited at once (= sum C + sum M)
    iso_ms: float       # the ISO schedule with the given boundaries
    compute_ms: float   # all compute of the ISO chunks, no communication
    comm_ms: float      # all all-reduces of the ISO chunks
    ideal_ms: float     # lower bound: max(compute_ms, comm_ms) over the whole prefill (at s = 0)


class Plan(NamedTuple):
    num_chunks: int
    boundaries: List[int]
    predicted_ms: float
    baseline_ms: float


def predict(model: ModelShape, device: DeviceProfile, link: LinkProfile, tp: int, seq_len: int,
            batch: int = 1, boundaries: Optional[Sequence[int]] = None, num_chunks: int = 2,
            split: Split = "balanced", dtype_bytes: int = 2) -> Prediction:
    """Baseline and ISO prefill times; `boundaries` win over `num_chunks`/`split` ("auto" = best_plan).
    ISO's compute runs at (1 - device.contention) of its speed while an all-reduce is in flight;
    the baseline overlaps nothing, so contention does not change it."""
    if boundaries is None:
        if split == "auto":
            boundaries = best_plan(model, device, link, tp, seq_len, batch, num_chunks, dtype_bytes).boundaries
        else:
            boundaries = chunk_boundaries(seq_len, num_chunks, split, token_cost(model))
    boundaries = list(boundaries)
    if boundaries[0] != 0 or boundaries[-1] != seq_len or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must rise strictly from 0 to seq_len={seq_len}, got {boundaries}")
    costs = step_costs(model, device, link, tp, boundaries, batch, dtype_bytes)
    merged = is_parallel_residual(model)
    iso = simulate(_schedule(model.num_layers, len(boundaries) - 1, merged), costs, device.contention)
    base = _time(model, device, link, tp, [0, seq_len], batch, dtype_bytes, stock=True)
    compute = model.num_layers * sum(c.compute_s for c in costs.values())
    comm = model.num_layers * sum(c.comm_s for (part, _), c in costs.items() if not (merged and part == "mlp"))
    return Prediction(base * 1e3, iso * 1e3, compute * 1e3, comm * 1e3, max(compute, comm) * 1e3)


def _first_then_balanced(seq_len: int, k: int, first: float, cost: TokenCost) -> List[int]:
    """Chunk 0 gets `first` of the tokens; the rest split into k-1 chunks of equal compute."""
    a, b = cost.attn_pair / 2, cost.linear + cost.attn_pair / 2
    f = lambda t: b * t + a * t * t  # cumulative cost of the first t tokens
    inv = lambda y: y / b if a == 0 else (-b + (b * b + 4 * a * y) ** 0.5) / (2 * a)
    t0 = first * seq_len
    points = [0.0, t0] + [inv(f(t0) + i / (k - 1) * (f(seq_len) - f(t0))) for i in range(1, k - 1)] + [float(seq_len)]
    fractions = [(q - p) / seq_len for p, q in zip(points, points[1:])]
    return chunk_boundaries(seq_len, k, fractions)


def best_plan(model: ModelShape, device: DeviceProfile, link: LinkProfile, tp: int, seq_len: int,
              batch: int = 1, max_chunks: int = 4, dtype_bytes: int = 2, chunk_margin: float = 0.002) -> Plan:
    """Fastest predicted plan over K = 1..max_chunks and the first boundary (rest balanced).

    Returns K = 1 (no split) unless some split is predicted faster than the baseline. Each extra
    chunk must save another `chunk_margin` of the baseline, for the per-chunk costs the model
    leaves out (kernel launches, stream syncs); ties go to fewer chunks.
    """
    run = lambda bounds: _time(model, device, link, tp, bounds, batch, dtype_bytes)
    base = _time(model, device, link, tp, [0, seq_len], batch, dtype_bytes, stock=True)
    best = Plan(1, [0, seq_len], base * 1e3, base * 1e3)
    tc = token_cost(model)
    for k in range(2, min(max_chunks, seq_len) + 1):
        seen: Dict[tuple, float] = {}

        def try_first(x: float) -> float:
            bounds = tuple(_first_then_balanced(seq_len, k, x, tc))
            if len(bounds) - 1 == k and bounds not in seen:
                seen[bounds] = run(list(bounds))
            return seen.get(bounds, float("inf"))

        for split in ("even", "balanced"):
            bounds = tuple(chunk_boundaries(seq_len, k, split, tc))
            if len(bounds) - 1 == k:
                seen.setdefault(bounds, run(list(bounds)))
        coarse = [i / 40 for i in range(1, 40)]
        x0 = min(coarse, key=try_first)
        for i in range(-10, 11):  # refine around the coarse optimum
            if 0 < x0 + i / 400 < 1:
                try_first(x0 + i / 400)
        bounds, t = min(seen.items(), key=lambda kv: kv[1])
        if t < base * (1 - 1e-9) and t * 1e3 < best.predicted_ms - chunk_margin * base * 1e3:
            best = Plan(k, list(bounds), t * 1e3, base * 1e3)
    return best


# The grid points are the same for every prompt length planned on one calibration
# (calibrate.plan_for asks once per length bucket): their plans are searched once.
_best_plan_of_grid = lru_cache(maxsize=1024)(best_plan)


def min_tokens_for(model: ModelShape, device: DeviceProfile, link: LinkProfile, tp: int, batch: int = 1,
                   grid: Sequence[int] = tuple(64 * 2 ** i for i in range(9)), min_gain: float = 0.01,
                   max_chunks: int = 4) -> Optional[int]:
    """Smallest prompt length in `grid` from which on (every longer grid point too) the best plan
    beats the baseline by at least `min_gain`; None if even the longest does not."""
    answer = None
    for n in sorted(grid, reverse=True):
        plan = _best_plan_of_grid(model, device, link, tp, n, batch, max_chunks)
        if plan.predicted_ms > plan.baseline_ms * (1 - min_gain):
            break
        answer = n
    return answer


def ratio_profile(model: ModelShape, device: DeviceProfile, link: LinkProfile, tp: int, seq_len: int,
                  batch: int = 1, part: Optional[str] = None, dtype_bytes: int = 2) -> float:
    """Communication / compute ratio M / C of the unsplit prompt, per layer (or of one part)."""
    costs = chunk_costs(model, device, link, tp, 0, seq_len, batch, dtype_bytes)
    parts = PARTS if part is None else (part,)
    if any(p not in costs for p in parts):
        raise ValueError(f"part must be one of {PARTS} or None, got {part!r}")
    return sum(costs[p].comm_s for p in parts) / sum(costs[p].compute_s for p in parts)


# ---------------------------------------------------------------- pipeline parallelism

@dataclass(frozen=True)
class P2PLink:
    """The point-to-point link between two pipeline stages (one GPU to its peer in the next
    stage): one transfer of b bytes takes latency_us + b / bw."""
    name: str
    latency_us: float
    bw_gbs: float
    source: str = ""

    def seconds(self, nbytes: float) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bw_gbs * 1e9)


# Inter-node links between pipeline stages, one GPU to its peer on the next node. A DGX H100 /
# HGX H100 node has one single-port ConnectX-7 per GPU for the compute fabric (rail-optimized:
# TP rank r of one stage sends to TP rank r of the next over its own NIC, so the 8 ranks' sends
# do not share a link).
IB_NDR_EFFICIENCY = 0.92  # achievable / line rate: NCCL's maintainers expect 46-48 GB/s per NDR NIC
P2P_LINKS: Dict[str, P2PLink] = {
    "ib-ndr": P2PLink("InfiniBand NDR 400 Gb/s, one ConnectX-7 per GPU", 20.0, 400 / 8 * IB_NDR_EFFICIENCY,
                      "DGX H100/H200: 'Four OSFP ports serving eight single-port NVIDIA ConnectX-7 VPI ... up to "
                      "400 Gb/s InfiniBand/Ethernet' (NVIDIA DGX BasePOD reference architecture, Core Components; "
                      "the DGX H100 User Guide's network-module table pairs each ConnectX-7 with one GPU); "
                      "400 Gb/s = 50 GB/s per direction; achievable 46 GB/s (0.92, the low end of 'For NDR @ "
                      "400Gbps you should see 46-48GB/s per NIC', NCCL maintainer in NVIDIA/nccl-tests#290; "
                      "cf. 24 GB/s peak per 200G HDR NIC, NVIDIA/nccl-tests#119); latency 20 us assumed: NCCL "
                      "send/recv of small messages between two nodes measures tens of us in nccl-tests "
                      "(31-34 us at 256 B-8 KB, NVIDIA/nccl-tests#214), the IB fabric itself a few us"),
}


def stage_layers(num_layers: int, stages: int, first: Optional[int] = None,
                 last: Optional[int] = None) -> List[int]:
    """Layers per stage as megatron-core splits them: `first` / `last` (its
    --decoder-first/last-pipeline-num-layers) where given, the rest evenly."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    fixed = [n for n in (first, last) if n is not None]
    middle = stages - len(fixed)
    rest = num_layers - sum(fixed)
    if stages == 1 or middle < 0 or rest < 0 or (middle and (rest % middle or rest < middle)) or (not middle and rest):
        if stages == 1 and not fixed:
            return [num_layers]
        raise ValueError(f"{num_layers} layers do not split over {stages} stages "
                         f"(first {first}, last {last})")
    each = rest // middle if middle else 0
    return ([first] if first is not None else []) + [each] * middle + ([last] if last is not None else [])


class PipelinePrediction(NamedTuple):
    stock_ms: float    # stock PP: the whole prompt through the stages one after another
    chunked_ms: float  # the chunks pipelined, each stage's TP all-reduces waited at once
    iso_ms: float      # the chunks pipelined, each stage overlapping its all-reduces (ISO)
    bound_ms: float    # ISO's schedule with every all-reduce hidden (perfect overlap)


def _synchronous(costs: Mapping[Tuple[str, int], PartCost]) -> Dict[Tuple[str, int], PartCost]:
    # each all-reduce waited for right after its compute: on the compute stream, nothing to overlap
    return {k: PartCost(c.compute_s + c.comm_s, 0.0) for k, c in costs.items()}


def _hidden(costs: Mapping[Tuple[str, int], PartCost]) -> Dict[Tuple[str, int], PartCost]:
    return {k: PartCost(c.compute_s, 0.0) for k, c in costs.items()}


def predict_pipeline(model: ModelShape, device: DeviceProfile, link: LinkProfile, p2p: P2PLink,
                     tp: int, layers: Sequence[int], seq_len: int, boundaries: Sequence[int],
                     batch: int = 1, dtype_bytes: int = 2) -> PipelinePrediction:
    """Time to first token of one prompt through stages of `layers` layers each (prefill only,
    embedding and output layer left out), by `simulate_pipeline` over each stage's
    `schedule.stage_schedule`: stock (one chunk), chunked without and with ISO inside the stages,
    and the bound (ISO's steps with every TP all-reduce hidden; the chunks' point-to-point
    transfers still delay the next stage). Chunk c's transfer carries its tokens' hidden states."""
    boundaries = list(boundaries)
    if boundaries[0] != 0 or boundaries[-1] != seq_len or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must rise strictly from 0 to seq_len={seq_len}, got {boundaries}")
    if not layers or any(n < 1 for n in layers):
        raise ValueError(f"every stage needs at least one layer, got {list(layers)}")
    merged, last = is_parallel_residual(model), len(layers) - 1

    def run(bounds, make_costs, iso_parts, contention=0.0):
        k = len(bounds) - 1
        costs = make_costs(step_costs(model, device, link, tp, bounds, batch, dtype_bytes))
        steps = [stage_schedule(n, k, i == 0, i == last, merged and iso_parts) for i, n in enumerate(layers)]
        send = {c: p2p.seconds((e - b) * batch * model.hidden * dtype_bytes)
                for c, (b, e) in enumerate(zip(bounds, bounds[1:]))}
        return simulate_pipeline(steps, [costs] * len(layers), send, contention) * 1e3

    # only ISO has all-reduces in flight beside compute: the others wait for each (or hide none)
    return PipelinePrediction(run([0, seq_len], _synchronous, False), run(boundaries, _synchronous, False),
                              run(boundaries, dict, True, device.contention), run(boundaries, _hidden, True))


def best_pipeline_plan(model: ModelShape, device: DeviceProfile, link: LinkProfile, p2p: P2PLink,
                       tp: int, layers: Sequence[int], seq_len: int, batch: int = 1,
                       chunk_counts: Sequence[int] = (2, 3, 4, 6, 8, 12, 16, 24, 32), dtype_bytes: int = 2,
                       min_gain: float = 0.02, chunk_margin: float = 0.002, min_chunk_tokens: int = 1) -> Plan:
    """Fastest predicted chunked pipeline prefill (ISO inside the stages where TP > 1) over
    `chunk_counts`, each with equal-time chunks (`balanced`: every chunk the same compute on
    every stage, attention growing with its prefix) or a smaller first chunk (it fills the
    pipeline sooner) and the rest equal-time. K = 1 (stock) unless a plan is predicted at
    least `min_gain` faster than stock PP. Each extra chunk must save another `chunk_margin` of
    stock's time, for the per-chunk costs the model leaves out (as `best_plan`); no K whose
    average chunk is shorter than `min_chunk_tokens` is tried."""
    tc = token_cost(model)
    iso = lambda bounds: predict_pipeline(model, device, link, p2p, tp, layers, seq_len, bounds,
                                          batch, dtype_bytes).iso_ms
    base = predict_pipeline(model, device, link, p2p, tp, layers, seq_len, [0, seq_len], batch,
                            dtype_bytes).stock_ms
    best = Plan(1, [0, seq_len], base, base)
    for k in sorted(chunk_counts):
        if k < 2 or k > seq_len or seq_len < k * min_chunk_tokens:
            continue
        candidates = {tuple(chunk_boundaries(seq_len, k, "balanced", tc))}
        candidates |= {tuple(_first_then_balanced(seq_len, k, x, tc)) for x in (0.5 / k, 0.75 / k)}
        for bounds in candidates:
            if len(bounds) - 1 != k:
                continue
            t = iso(list(bounds))
            if t < best.predicted_ms - chunk_margin * base * (k - best.num_chunks):
                best = Plan(k, list(bounds), t, base)
    if best.predicted_ms > base * (1 - min_gain):
        return Plan(1, [0, seq_len], base, base)
    return best


# ---------------------------------------------------------------- benchmark profiles

def parse_gpu_profile(spec: str) -> Tuple[DeviceProfile, LinkProfile, ModelShape, int]:
    """"gpu:<device>/<model>/tp<N>", e.g. "gpu:4090/opt-30b/tp4" -> (device, link, model, tp)."""
    m = re.fullmatch(r"gpu:([^/]+)/([^/]+)/tp(\d+)", spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"GPU profile must look like 'gpu:<device>/<model>/tp<N>' "
                         f"(e.g. 'gpu:4090/opt-30b/tp4'), got {spec!r}")
    dev, model, tp = m.group(1).lower(), m.group(2).lower(), int(m.group(3))
    if dev not in MACHINES:
        raise ValueError(f"unknown device {dev!r} in {spec!r}; known: {sorted(MACHINES)}")
    try:
        shape = model_preset(model)
    except ValueError as e:
        raise ValueError(f"{e} (in {spec!r})") from None
    if tp < 1:
        raise ValueError(f"tp must be >= 1 in {spec!r}")
    return MACHINES[dev][0], MACHINES[dev][1], shape, tp


def parse_profile(spec: str) -> Tuple[str, object]:
    """"ratio:R" -> ("ratio", R); "gpu:<device>/<model>/tp<N>" -> ("gpu", spec) (validated)."""
    spec = spec.strip()
    if spec.startswith("ratio:"):
        try:
            r = float(spec[len("ratio:"):])
        except ValueError:
            raise ValueError(f"bad ratio profile {spec!r}: want ratio:<float>") from None
        if not r >= 0:
            raise ValueError(f"ratio must be >= 0 in {spec!r}")
        return "ratio", r
    if spec.startswith("gpu:"):
        parse_gpu_profile(spec)
        return "gpu", spec
    raise ValueError(f"unknown profile {spec!r}: want ratio:<R> or gpu:<device>/<model>/tp<N>")


def profile_ratio(spec: str, seq_len: int, batch: int = 1) -> Tuple[float, float]:
    """(M/C ratio, latency share of one unsplit-prompt all-reduce) that `spec` asks for.

    ratio:R -> (R, 0). gpu:<device>/<model>/tp<N> -> `ratio_profile` for that GPU, model and TP
    at `seq_len` (bf16), and the share of the link's fixed latency in one all-reduce of the
    whole prompt there, so that chunked all-reduces scale as they would on that GPU link.
    """
    kind, value = parse_profile(spec)
    if kind == "ratio":
        return value, 0.0
    device, link, model, tp = parse_gpu_profile(value)
    ratio = ratio_profile(model, device, link, tp, seq_len, batch)
    full = allreduce_time(seq_len * batch * model.hidden * 2, link, tp)
    latency = link.latency_us * 1e-6 if tp > 1 else 0.0
    return ratio, (latency / full if full > 0 else 0.0)


def link_for_profile(spec: str, seq_len: int, batch: int, compute_s: float, num_layers: int,
                     hidden: int, dtype_bytes: int):
    """The emulated link's `LinkModel` reproducing `spec` on a model whose unsplit prefill
    computes in `compute_s` (measured with communication skipped) and does 2 all-reduces per
    layer of seq_len x batch x hidden elements of `dtype_bytes`."""
    from .emulated import LinkModel

    ratio, latency_share = profile_ratio(spec, seq_len, batch)
    return LinkModel.for_ratio(ratio, compute_s, 2 * num_layers,
                               seq_len * batch * hidden * dtype_bytes, latency_share)
