"""How to split THIS prompt: the one place the Megatron and the Hugging Face adapters ask.

`plan_prefill` answers with a `PrefillPlan`: the chunk boundaries, or None for the stock path,
and why. Splits: `even`, `balanced`, explicit fractions, or `auto` (the cost model calibrated on
the running machine, `iso_megatron.calibrate`); `min_tokens` and TP 1 step aside.

Boundaries are whole tokens, strictly increasing, so no chunk is empty. `balanced` equalises
each chunk's compute: the linear layers cost `linear` per token, causal attention costs
`attn_pair` per (query, key) pair, and the queries of tokens [0, t) see t(t+1)/2 pairs. So the
cumulative cost of the first t tokens is F(t) = linear*t + attn_pair*t(t+1)/2, and boundary i
solves F(b_i) = i/K * F(s): chunk 0 gets more than 1/K of the tokens, more so for long prompts.

Tiles. Every split (even, balanced, fractions, and auto, which is planned through here) ends in
`chunk_boundaries`, the one place that rounds: the inner boundaries go to the nearest multiple
of `TILE_TOKENS` (64, a tensor-core tile: the rows of a GEMM tile and a flash-attention query
block), so that only the last chunk has a partial tile. Only where every chunk has at least
`ROUND_MIN_TILES` tiles (256 tokens), before and after rounding: a boundary then moves by at
most half a tile, 1/8 of either neighbour, so the split stays close to the one asked for;
shorter prompts keep their exact split (rounding a 160-token even split would make it 64/96).
Rounding never merges chunks (each keeps >= 256 tokens) and keeps the first 0 and the last s.
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

from .shape import ModelShape, TokenCost

Split = Union[str, Sequence[float]]

TILE_TOKENS = 64      # chunk boundaries land on multiples of this where the prompt is long enough
ROUND_MIN_TILES = 4   # ... namely where every chunk keeps at least this many tiles


class PrefillPlan(NamedTuple):
    """What one prefill forward ran: `bounds` (token offsets [0, ..., s]) or None for the
    stock path, and `reason`. The adapters record the latest one (`iso_plan`) for launchers,
    benchmarks and tests to read."""

    bounds: Optional[Tuple[int, ...]]
    reason: str
    predicted_ms: Optional[float] = None  # split="auto": the cost model's ISO prediction
    baseline_ms: Optional[float] = None   # split="auto": ... and its stock prediction

    @property
    def num_chunks(self) -> int:
        return 1 if self.bounds is None else len(self.bounds) - 1


def stock(reason: str) -> PrefillPlan:
    return PrefillPlan(None, reason)


ATTENTION_KINDS = ("fused", "unfused")


class Environment(NamedTuple):
    """Where a prefill runs, for split="auto" to measure: torch device, dtype, TP group.

    `step_probe`, optional: `step_probe(k)` runs one of the model's layers over a fixed part of
    the prompt in k equal chunks, through the adapter's own chunk path, without communicating,
    and returns the number of chunks it ran (fewer for a prompt shorter than k tokens; None: k);
    its attributes `tokens` and `batch`, where set, are the rows one call runs. The calibration
    then measures the fixed cost per chunk on the real code (the framework's Python included:
    0.3-0.8 ms per layer part for megatron-core on this repo's CPU, against 32 us for the
    kernels alone) and, given the rows, the per-token work the rooflines leave out; without a
    probe, both on a miniature layer of plain torch kernels. It is called
    only when a calibration happens (an adapter may build one per forward: building it must
    cost nothing) and is not part of the calibration's identity.

    `attention`, optional: the core attention the model runs, which the calibration times:
    "fused" (a causal kernel that skips the masked blocks: torch's scaled_dot_product_attention,
    TE, flash) or "unfused" (scores of the whole [queries, keys] rectangle, masked, softmax:
    megatron's local DotProductAttention, HF's eager attention). None: the device's usual kind
    (CUDA fused, CPU unfused).

    `stage_link`, optional: the measured link between pipeline stages (a `costmodel.P2PLink`)
    for a chunked pipeline prefill to plan with; None: taken to be as fast as the TP link.
    """

    device: object
    dtype: object
    group: object
    step_probe: Optional[Callable[[int], object]] = None
    attention: Optional[str] = None
    stage_link: Optional[object] = None


def plan_prefill(iso, shape: ModelShape, seq_len: int, batch: int, tp: int,
                 env: Optional[Environment] = None, pipeline_stages: int = 1) -> PrefillPlan:
    """The plan for a prefill of `seq_len` tokens (x `batch`) at tensor-parallel size `tp`, in
    one of `pipeline_stages` stages (chunks pipeline between stages even at TP 1).

    `iso` is an ISOConfig (None: stock). The adapters call this only after their own checks
    (training, decode, masks, ...) passed. split="auto" needs `env`; its first call in an
    environment is collective over the TP group (the one calibration, `iso_megatron.calibrate`:
    every rank calls it with the same arguments), later calls do not communicate.
    """
    if iso is None or not iso.enabled:
        return stock("ISO disabled")
    if iso.num_chunks < 2:
        return stock("num_chunks=1")
    if tp < 2 and pipeline_stages < 2:
        return stock("tensor-parallel size 1: nothing to overlap")
    if seq_len < max(iso.min_tokens, 2):
        return stock(f"prompt of {seq_len} tokens is shorter than min_tokens={iso.min_tokens}")
    from .comm import stand_in_factor  # torch.distributed: only once a plan is made

    # a process standing in for its TP group computes the whole model: plan as one rank of a
    # model that much wider (at TP 1 of a real group, factor 1: the shape as it is)
    shape = shape.widened(stand_in_factor(env.group if env is not None else None))
    if iso.split == "auto":
        if env is None:
            raise ValueError("split='auto' needs the device, dtype and TP group to calibrate on")
        from .calibrate import auto_plan, pipeline_auto_plan

        if pipeline_stages > 1:
            return pipeline_auto_plan(shape, env, seq_len, batch, tp, iso.num_chunks, pipeline_stages)
        return auto_plan(shape, env, seq_len, batch, tp, iso.num_chunks)
    bounds = chunk_boundaries(seq_len, iso.num_chunks, iso.split, TokenCost.from_shape(shape))
    if len(bounds) <= 2:
        return stock(f"prompt of {seq_len} tokens is too short to split")
    split = iso.split if isinstance(iso.split, str) else "fractions"
    return PrefillPlan(tuple(bounds), f"{split} split into {len(bounds) - 1} chunks")


def _cumulative(t: float, cost: TokenCost) -> float:
    return cost.linear * t + cost.attn_pair * t * (t + 1) / 2


def _inverse(target: float, cost: TokenCost) -> float:
    # solve linear*t + attn_pair*(t^2 + t)/2 = target for t >= 0
    a, b = cost.attn_pair / 2, cost.linear + cost.attn_pair / 2
    if a == 0:
        return target / b
    return (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)


def validate_split(split: Split) -> None:
    """Raise ValueError naming the problem if `split` is not a usable split policy."""
    if isinstance(split, str):
        if split not in ("even", "balanced", "auto"):
            raise ValueError(f"split must be 'even', 'balanced', 'auto' or a sequence of fractions, got {split!r}")
        return
    try:
        fractions = [float(f) for f in split]
    except (TypeError, ValueError):
        raise ValueError(f"split fractions must be numbers, got {split!r}") from None
    if len(fractions) < 1:
        raise ValueError("split fractions must not be empty")
    if any(not (f > 0) or math.isinf(f) for f in fractions):
        raise ValueError(f"split fractions must all be > 0, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions):.6g})")


def chunk_boundaries(seq_len: int, num_chunks: int, split: Split = "even",
                     cost: TokenCost = TokenCost(1.0, 0.0), tile: int = TILE_TOKENS) -> List[int]:
    """Token offsets [0, b_1, ..., seq_len] of the chunks, rounded to `tile` tokens where the
    prompt is long enough (`round_to_tiles`; tile=1: the exact split).

    Fewer than `num_chunks` chunks come back when the sequence is shorter than that (a chunk
    is never empty); explicit fractions fix the number of chunks themselves.
    """
    validate_split(split)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be an int >= 1, got {tile!r}")
    return round_to_tiles(_exact_boundaries(seq_len, num_chunks, split, cost), tile)


def round_to_tiles(bounds: Sequence[int], tile: int = TILE_TOKENS) -> List[int]:
    """`bounds` with the inner boundaries at the nearest multiple of `tile` (halves round up),
    where every chunk has at least ROUND_MIN_TILES tiles before and after; else unchanged."""
    bounds = list(bounds)
    rounded = [bounds[0]] + [(b + tile // 2) // tile * tile for b in bounds[1:-1]] + [bounds[-1]]
    least = ROUND_MIN_TILES * tile
    if all(e - s >= least for b in (bounds, rounded) for s, e in zip(b, b[1:])):
        return rounded
    return bounds


def _exact_boundaries(seq_len: int, num_chunks: int, split: Split, cost: TokenCost) -> List[int]:
    if not isinstance(split, str):
        fractions = [float(f) for f in split]
        cuts = [sum(fractions[:i]) for i in range(1, len(fractions))]
        points = [c * seq_len for c in cuts]
    else:
        k = min(num_chunks, seq_len)
        if split == "even":
            points = [i * seq_len / k for i in range(1, k)]
        else:  # balanced
            if split == "auto":
                raise ValueError("chunk_boundaries: split='auto' is planned by plan_prefill")
            total = _cumulative(seq_len, cost)
            points = [_inverse(i * total / k, cost) for i in range(1, k)]
    bounds = [0]
    n_cuts = len(points)
    for i, p in enumerate(points):
        # whole tokens, at least one per chunk on both sides of every cut
        lo, hi = bounds[-1] + 1, seq_len - (n_cuts - i)
        if lo > hi:
            break
        bounds.append(min(max(int(round(p)), lo), hi))
    bounds.append(seq_len)
    return bounds
