"""How to split THIS prompt: the one place the Megatron and the Hugging Face adapters ask.

`plan_prefill` answers with a `PrefillPlan`: the chunk boundaries, or None for the stock path,
and why. Splits: `even`, `balanced`, explicit fractions, or `auto` (the cost model calibrated on
the running machine, `iso_megatron.calibrate`); `min_tokens` and TP 1 step aside.

Boundaries are whole tokens, strictly increasing, so no chunk is empty. `balanced` equalises
each chunk's compute: the linear layers cost `linear` per token, causal attention costs
`attn_pair` per (query, key) pair, and the queries of tokens [0, t) see t(t+1)/2 pairs. So the
cumulative cost of the first t tokens is F(t) = linear*t + attn_pair*t(t+1)/2, and boundary i
solves F(b_i) = i/K * F(s): chunk 0 gets more than 1/K of the tokens, more so for long prompts.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

from .shape import ModelShape, TokenCost

Split = Union[str, Sequence[float]]


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


class Environment(NamedTuple):
    """Where a prefill runs, for split="auto" to measure: torch device, dtype, TP group."""

    device: object
    dtype: object
    group: object


def plan_prefill(iso, shape: ModelShape, seq_len: int, batch: int, tp: int,
                 env: Optional[Environment] = None) -> PrefillPlan:
    """The plan for a prefill of `seq_len` tokens (x `batch`) at tensor-parallel size `tp`.

    `iso` is an ISOConfig (None: stock). The adapters call this only after their own checks
    (training, decode, masks, ...) passed. split="auto" needs `env` and is collective over the
    TP group on first use of a length bucket (every rank calls it with the same arguments).
    """
    if iso is None or not iso.enabled:
        return stock("ISO disabled")
    if iso.num_chunks < 2:
        return stock("num_chunks=1")
    if tp < 2:
        return stock("tensor-parallel size 1: nothing to overlap")
    if seq_len < max(iso.min_tokens, 2):
        return stock(f"prompt of {seq_len} tokens is shorter than min_tokens={iso.min_tokens}")
    if iso.split == "auto":
        if env is None:
            raise ValueError("split='auto' needs the device, dtype and TP group to calibrate on")
        from .calibrate import auto_plan

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
                     cost: TokenCost = TokenCost(1.0, 0.0)) -> List[int]:
    """Token offsets [0, b_1, ..., seq_len] of the chunks.

    Fewer than `num_chunks` chunks come back when the sequence is shorter than that (a chunk
    is never empty); explicit fractions fix the number of chunks themselves.
    """
    validate_split(split)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
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
