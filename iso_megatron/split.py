"""Chunk boundaries along the sequence: `even`, `balanced`, or explicit fractions.

Boundaries are whole tokens, strictly increasing, so no chunk is empty. `balanced` equalises
each chunk's compute: the linear layers cost `linear` per token, causal attention costs
`attn_pair` per (query, key) pair, and the queries of tokens [0, t) see t(t+1)/2 pairs. So the
cumulative cost of the first t tokens is F(t) = linear*t + attn_pair*t(t+1)/2, and boundary i
solves F(b_i) = i/K * F(s): chunk 0 gets more than 1/K of the tokens, more so for long prompts.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Union

Split = Union[str, Sequence[float]]


class TokenCost(NamedTuple):
    """Relative compute of one token through the linear layers, and of one attention pair."""

    linear: float
    attn_pair: float

    @classmethod
    def from_dims(cls, hidden: int, ffn_hidden: int, kv_hidden: int, gated: bool) -> "TokenCost":
        # FLOPs per token of one layer: qkv, proj, fc1 (x2 when gated), fc2; per (q, k) pair:
        # QK^T and PV over `hidden` channels. TP divides both alike, so it cancels.
        linear = 2 * (hidden * (hidden + 2 * kv_hidden) + hidden * hidden
                      + hidden * ffn_hidden * (2 if gated else 1) + ffn_hidden * hidden)
        return cls(float(linear), float(4 * hidden))


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
        else:  # balanced (auto without a plan falls back to balanced)
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
