"""The base of the convolution layers that compute another way on CUDA (:mod:`zoo.ops.patch_conv`,
:mod:`zoo.ops.space_to_depth`): which calls they take, their construction and input checks, in-place conversion."""
from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from .autocast_cache import AutocastCachedConv2d, autocast_weights

C = TypeVar("C", bound="RewrittenConv2d")


def undilated_ungrouped_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` is not undilated and ungrouped (what both rewritten computations need), or None."""
    if conv.dilation != (1, 1):
        return f"dilation={conv.dilation} (must be 1)"
    if conv.groups != 1:
        return f"groups={conv.groups} (must be 1)"
    return None


class RewrittenConv2d(AutocastCachedConv2d):
    """An ``nn.Conv2d`` (same constructor, parameters and state-dict keys; keeps autocast's weight copies between
    inference calls like :class:`zoo.ops.AutocastCachedConv2d`) that subclasses compute another way on CUDA.

    Subclasses set ``requirement`` (which convolutions qualify, for the constructor's error) and ``convertible``
    (likewise, for the converter's) and define ``reason_of(conv)``: why ``conv`` does not qualify, None when it does;
    ``check_extent(x)``: raise where ``x`` is too small for the other computation; ``compute(x, weight, bias)``: the
    other computation, given the (autocast-cached) weight and bias.
    """

    requirement = ""
    convertible = ""

    @staticmethod
    def reason_of(conv: nn.Conv2d) -> str | None:
        raise NotImplementedError

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        reason = self.reason_of(self)
        if reason is not None:
            raise ValueError(f"{type(self).__name__}: {reason}; {self.requirement} (use nn.Conv2d for others)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rewrites(x):
            return super().forward(x)
        self.check_in_channels(x)
        self.check_extent(x)
        return self.compute(x, *autocast_weights(self))

    def check_extent(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def rewrites(self, x: torch.Tensor) -> bool:
        """Whether this call takes the other computation: a batched CUDA input (where it measured faster). Such a
        call reads ``x`` in any layout and returns channels-last strides, so callers need not convert first."""
        return isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_cuda

    def check_in_channels(self, x: torch.Tensor) -> None:
        """Raise the convolution's own error for ``x`` (B, C, H, W) without ``in_channels`` channels, which the
        other computation would report as a shape mismatch or not at all."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: x must have in_channels={self.in_channels} channels (dim 1), "
                             f"got shape {tuple(x.shape)}")

    @classmethod
    def convert(cls: type[C], conv: nn.Conv2d, caller: str) -> C:
        """Turn ``conv`` (an ``nn.Conv2d``, its autocast-caching subclass or already ``cls``) into ``cls`` in place
        (parameters, hooks and state-dict keys unchanged) and return it; ``caller`` names the public converter in
        errors."""
        if type(conv) not in (nn.Conv2d, AutocastCachedConv2d, cls):
            raise TypeError(f"{caller}: conv must be an nn.Conv2d, got {type(conv).__name__}")
        reason = cls.reason_of(conv)
        if reason is not None:
            raise ValueError(f"{caller}: {reason}; only {cls.convertible}")
        conv.__class__ = cls
        return conv
