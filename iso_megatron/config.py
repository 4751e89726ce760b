"""ISOConfig: what the user sets, validated where it is made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .planner import validate_split

# Prompts shorter than this run the stock path. Below ~512 tokens the two half-size
# all-reduces of a split cost about as much as one full-size all-reduce (they are
# latency-bound: vLLM RFC #56126 measures 1.5-2x at small sizes), so there is nothing to
# hide; TokenWeave enables its split only from 1024. See README "Choosing min_tokens".
DEFAULT_MIN_TOKENS = 512


def tp_divisibility_error(heads: int, groups: Optional[int], tp: int) -> Optional[str]:
    """Megatron's rule for splitting attention over `tp` ranks, or None when it holds: heads
    divisible by tp; query groups a multiple of tp, or a divisor (K/V heads replicated)."""
    groups = groups or heads
    if heads % tp:
        return f"num_attention_heads ({heads}) is not divisible by the tensor-parallel size ({tp})"
    if groups % tp and tp % groups:
        return (f"num_query_groups ({groups}) must be a multiple or divisor of the "
                f"tensor-parallel size ({tp})")
    return None


@dataclass
class ISOConfig:
    """Intra-sequence overlap settings.

    num_chunks: chunks the prompt is split into (>= 1; 1 disables the split). Default: the
        number of explicit fractions, else 2 (the usual optimum: more chunks shrink the GEMMs and
        all-reduces below their efficient sizes, README "Choosing min_tokens").
    split: "even", "balanced" (equal compute per chunk), "auto" (cost model), or fractions.
    min_tokens: prompts with fewer tokens run the stock path. Default: DEFAULT_MIN_TOKENS for
        fixed splits; with split="auto" the cost model chooses the threshold itself.
    enabled: False restores stock behaviour everywhere.
    """

    num_chunks: Optional[int] = None
    split: Union[str, Sequence[float]] = "balanced"
    min_tokens: Optional[int] = None
    enabled: bool = True

    def __post_init__(self):
        try:
            validate_split(self.split)
        except ValueError as e:
            raise ValueError(f"ISOConfig.split: {e}") from None
        if not isinstance(self.split, str):
            self.split = tuple(float(f) for f in self.split)
            if self.num_chunks is None:
                self.num_chunks = len(self.split)
        if self.num_chunks is None:
            self.num_chunks = 2
        if isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int):
            raise ValueError(f"ISOConfig.num_chunks must be an int, got {self.num_chunks!r}")
        if self.num_chunks < 1:
            raise ValueError(f"ISOConfig.num_chunks must be >= 1, got {self.num_chunks}")
        if not isinstance(self.split, str) and len(self.split) != self.num_chunks:
            raise ValueError(
                f"ISOConfig.split has {len(self.split)} fractions but num_chunks is {self.num_chunks}")
        if self.min_tokens is None:
            self.min_tokens = 0 if self.split == "auto" else DEFAULT_MIN_TOKENS
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"ISOConfig.min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"ISOConfig.enabled must be a bool, got {self.enabled!r}")
