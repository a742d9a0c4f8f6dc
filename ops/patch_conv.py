"""Non-overlapping patch convolutions (kernel size = stride, no padding) computed as one GEMM over the patches.

A patch embedding ``nn.Conv2d(in_chans, dim, kernel_size=p, stride=p)`` is a matrix product: every output pixel is
the dot product of one p x p patch (all input channels) with each filter. On an image (three input channels) cuDNN
runs it as an implicit-GEMM convolution that keeps the tensor cores poorly fed. Measured on an H200 (torch 2.11,
bf16 autocast, eager, batch 128 of 224 x 224 images, per call): 16 x 16 patches to 384 channels (Agent-DeiT-S) 900 us
as a convolution against 138 us as a patch copy plus one cuBLAS GEMM; to 192 channels (Agent-DeiT-T) 486 against
127; 4 x 4 patches to 96 channels (Agent-Swin-T) 354 against 168, to 64 (Agent-PVT-T) 306 against 136. Under
``torch.compile`` inductor chose the same slow convolution for Agent-DeiT-S's stem (835 us of its 6.38 ms a batch).
On CPU the two measured alike, so there the layer stays a convolution.

:class:`PatchConv2d` is an ``nn.Conv2d`` (same constructor, parameters and state-dict keys, so official checkpoints
load unchanged) whose CUDA forward gathers the patches into rows (B * H/p * W/p, C_in * p * p), in the compute dtype,
and multiplies them by the flattened weight. The result is the convolution's up to the order of float32
accumulation; it is returned in the convolution's shape (B, C_out, H/p, W/p) with channels-last strides, which the
usual next steps (``flatten(2).transpose(1, 2)`` to tokens, ``permute(0, 2, 3, 1)`` to a channels-last map) turn into
contiguous tensors without a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._amp import compute_dtype
from ._conv_layers import RewrittenConv2d, undilated_ungrouped_reason

__all__ = ["PatchConv2d", "as_patch_conv", "patch_conv_gemm"]


def _patch_conv_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` is not a non-overlapping patch convolution, or None when it is."""
    if conv.kernel_size != conv.stride:
        return f"kernel_size={conv.kernel_size} differs from stride={conv.stride}"
    if conv.padding not in ((0, 0), "valid"):
        return f"padding={conv.padding!r} (must be 0)"
    return undilated_ungrouped_reason(conv)


def patch_conv_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=kernel_size)`` computed as one GEMM over the patches.

    Args:
        x: (B, C_in, H, W) floating point, any strides; rows and columns past the last whole patch are dropped, as
            the convolution drops them.
        weight: (C_out, C_in, p_h, p_w).
        bias: (C_out,) or None.

    Returns:
        (B, C_out, H // p_h, W // p_w) with channels-last strides, in the dtype ``F.linear`` gives (the autocast
        dtype under autocast).
    """
    b, c, h, w = x.shape
    out_channels, _, p_h, p_w = weight.shape
    grid_h, grid_w = h // p_h, w // p_w
    if (grid_h * p_h, grid_w * p_w) != (h, w):
        x = x[:, :, :grid_h * p_h, :grid_w * p_w]
    # cast before gathering: the gather then moves half the bytes under autocast (a no-op cast otherwise)
    patches = x.to(compute_dtype(x)).reshape(b, c, grid_h, p_h, grid_w, p_w).permute(0, 2, 4, 1, 3, 5)
    rows = patches.reshape(b * grid_h * grid_w, c * p_h * p_w)
    y = F.linear(rows, weight.reshape(out_channels, -1), bias)
    return y.view(b, grid_h, grid_w, out_channels).permute(0, 3, 1, 2)


class PatchConv2d(RewrittenConv2d):
    """``nn.Conv2d`` for non-overlapping patches (kernel_size == stride, padding 0, dilation 1, groups 1) whose CUDA
    forward is :func:`patch_conv_gemm` (module docstring); elsewhere the convolution. Keeps autocast's weight copies
    between inference calls like :class:`zoo.ops.AutocastCachedConv2d`.

    ``x`` (B, C_in, H, W) → (B, C_out, H // p, W // p).
    """

    requirement = "a patch convolution has kernel_size == stride, padding 0, dilation 1 and groups 1"
    convertible = "non-overlapping patch convolutions can become PatchConv2d"
    reason_of = staticmethod(_patch_conv_reason)

    def check_extent(self, x: torch.Tensor) -> None:
        if x.shape[2] < self.kernel_size[0] or x.shape[3] < self.kernel_size[1]:
            raise ValueError(f"PatchConv2d: x of shape {tuple(x.shape)} is smaller than one patch "
                             f"{self.kernel_size}")

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return patch_conv_gemm(x, weight, bias)


def as_patch_conv(conv: nn.Conv2d) -> PatchConv2d:
    """Turn ``conv`` (an ``nn.Conv2d`` or its autocast-caching subclass, e.g. timm's ``PatchEmbed.proj``) into a
    :class:`PatchConv2d` in place (parameters, hooks and state-dict keys unchanged) and return it."""
    return PatchConv2d.convert(conv, "as_patch_conv")
