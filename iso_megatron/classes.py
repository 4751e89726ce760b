"""Converting built modules in place: swap classes, check, roll back on failure.

Shared by `apply_iso` (Megatron) and `apply_iso_hf` (Hugging Face under DeepSpeed AutoTP): a
model is converted whole or not at all, and no parameter is touched (only `__class__` changes).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple


def swap_classes(swaps: Iterable[Tuple[object, type]], check: Optional[Callable[[], None]] = None) -> None:
    """Set `m.__class__ = cls` for every (m, cls); if `check()` then raises, every class is put
    back as it was and the exception propagates."""
    swaps = list(swaps)
    original = [(m, type(m)) for m, _ in swaps]
    for m, cls in swaps:
        m.__class__ = cls
    try:
        if check is not None:
            check()
    except BaseException:
        for m, cls in original:
            m.__class__ = cls
        raise
