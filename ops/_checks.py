"""Argument checks shared by the ops (cheap: they run on every attention call)."""
from __future__ import annotations

from typing import Sequence

import torch

from ._amp import autocast_dtype

__all__ = ["broadcasts_to", "check_float_tensors"]


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (trailing-aligned, sizes equal or 1).

    Plain Python on purpose: ``torch.broadcast_shapes`` costs ~35 us a call on a CPU host (symbolic-shape
    machinery), more than the attention kernel it guards at small sizes.
    """
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(reversed(tuple(shape)), reversed(tuple(target))))


def check_float_tensors(op: str, same_dtype: bool = True, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every given tensor (None ones are skipped) is floating point and, with
    ``same_dtype`` and autocast off on their device, all share one dtype (under autocast the reference backends'
    matmuls cast mixed operands, and the SDPA backends decline them). Call after the shape checks, which establish
    that they are tensors.

    Example: ``check_float_tensors("window_attention", q=q, k=k, v=v)``.
    """
    given = {name: t for name, t in tensors.items() if t is not None}
    listed = ", ".join(f"{name}={t.dtype}" for name, t in given.items())
    if not all(t.is_floating_point() for t in given.values()):
        raise ValueError(f"{op}: {', '.join(given)} must be floating-point tensors, got {listed}")
    if same_dtype and len({t.dtype for t in given.values()}) > 1 \
            and autocast_dtype(next(iter(given.values())).device.type) is None:
        raise ValueError(f"{op}: {', '.join(given)} must share one dtype outside torch.autocast, got {listed}; "
                         "cast them to one dtype")
