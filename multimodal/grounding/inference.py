"""Sliding-window inference over whole PET/CT volumes (the official segmenter validates with MONAI's
``SlidingWindowInferer``: windows of the training ``roi_size``, 25 % overlap, overlapping logits averaged)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import product

import torch

__all__ = ["sliding_window_logits"]


def _starts(size: int, window: int, overlap: float) -> list[int]:
    """Window start positions covering ``size`` with the given overlap; the last window ends at the border."""
    if window >= size:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, size - window, step))
    return starts + [size - window]


def sliding_window_logits(fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                          roi_size: Sequence[int], overlap: float = 0.25) -> torch.Tensor:
    """Apply ``fn`` to overlapping windows of ``image`` and average the outputs where windows overlap.

    Args:
        fn: (B, C, *roi) -> (B, K, *roi), e.g. ``lambda w: net(w, tokens, mask)``.
        image: (B, C, D, H, W); each spatial size at least the window's (pad first).
        roi_size: window size (D, H, W); sizes larger than the image are clipped to it.
        overlap: fraction of a window shared with its neighbour, in [0, 1).

    Returns:
        (B, K, D, H, W) averaged outputs.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap!r} must be in [0, 1)")
    spatial = image.shape[2:]
    window = [min(int(r), int(s)) for r, s in zip(roi_size, spatial)]
    total = count = None
    for corner in product(*(_starts(s, w, overlap) for s, w in zip(spatial, window))):
        region = (Ellipsis, *(slice(c, c + w) for c, w in zip(corner, window)))
        out = fn(image[region])
        if total is None:
            total = image.new_zeros((image.shape[0], out.shape[1], *spatial), dtype=out.dtype)
            count = image.new_zeros(spatial, dtype=out.dtype)
        total[region] += out
        count[region[1:]] += 1
    return total / count
