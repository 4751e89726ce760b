"""split="auto": chunk count and boundaries chosen from the cost model (placeholder: balanced)."""

from __future__ import annotations

from typing import List, Optional

from .split import TokenCost, chunk_boundaries


def auto_boundaries(config, seq_len: int, batch: int, tp: int, max_chunks: int,
                    cost: TokenCost) -> Optional[List[int]]:
    """Boundaries for this prefill, or None to run the stock path."""
    return chunk_boundaries(seq_len, max_chunks, "balanced", cost)
