"""timm's classifier API and head, shared by the zoo backbones whose head is a Linear over an average pool."""
from __future__ import annotations

import torch
from torch import nn

from zoo.ops.autocast_cache import one_cast_per_forward

__all__ = ["PooledLinearHeadMixin"]


class PooledLinearHeadMixin:
    """``forward_head`` / ``forward`` / ``get_classifier`` / ``reset_classifier`` for a model with
    ``self.head = Linear(num_features, num_classes)`` after a ``global_pool`` of ``"avg"`` (or ``""``: no pooling)
    and an optional ``self.head_drop``.

    ``pool_dims`` are the spatial dims of the ``forward_features`` map: (2, 3) for NCHW, (1, 2) for NHWC.
    """

    head: nn.Module
    num_features: int
    pool_dims: tuple[int, ...] = (2, 3)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The ``forward_features`` map -> (B, num_classes) logits, or the pooled (B, C) with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=self.pool_dims)
        head_drop = getattr(self, "head_drop", None)
        if head_drop is not None:
            x = head_drop(x)
        return x if pre_logits else self.head(x)

    @one_cast_per_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) images -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

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
