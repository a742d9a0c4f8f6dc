"""timm's classifier API, shared by the zoo backbones whose head is a Linear over an average pool."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PooledLinearHeadMixin"]


class PooledLinearHeadMixin:
    """``get_classifier`` / ``reset_classifier`` for a model with ``self.head = Linear(num_features, num_classes)``
    after a ``global_pool`` of ``"avg"`` (or ``""``: no pooling)."""

    head: nn.Module
    num_features: int

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0``: identity) and optionally the pooling (``'avg'`` or ``''``)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
