"""Argument checks shared by the ops (cheap: they run on every attention call)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["broadcasts_to"]


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (trailing-aligned, sizes equal or 1).

    Plain Python on purpose: ``torch.broadcast_shapes`` costs ~35 us a call on a CPU host (symbolic-shape
    machinery), more than the attention kernel it guards at small sizes.
    """
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(reversed(tuple(shape)), reversed(tuple(target))))
