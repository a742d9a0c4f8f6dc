"""Autocast state, safely for any device type."""
from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "compute_dtype"]

_AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast recasts (never float64)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The compute dtype autocast uses on ``device_type`` right now, or None when it is off there.

    ``torch.is_autocast_enabled`` raises for device types autocast does not know (``meta`` among them: models
    run there for shape inference), which count as off here.
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def compute_dtype(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype an autocast-eligible layer (linear, conv) computes ``x`` in right now: the autocast dtype of x's device
    when autocast is on there and x is float32/float16/bfloat16, else x's own dtype. With ``dtype``, the same rule for
    a tensor of that dtype on x's device (a result not made yet, such as a sum)."""
    dtype = x.dtype if dtype is None else dtype
    amp = autocast_dtype("cuda" if x.is_cuda else x.device.type)  # (is_cuda: a fraction of x.device's host time)
    return amp if amp is not None and dtype in _AUTOCAST_INPUTS else dtype
