"""Autocast state, safely for any device type."""
from __future__ import annotations

import torch

__all__ = ["autocast_dtype"]


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
