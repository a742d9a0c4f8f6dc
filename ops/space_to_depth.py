"""Strided convolutions on few-channel images computed as stride-1 convolutions over a space-to-depth input.

A convolution with stride s reads each s x s block of input pixels with s x s phases of its kernel. Folding every
s x s block of the (zero-padded) input into the channels (``pixel_unshuffle``) and the kernel likewise (zero-padded
to a multiple of s, each phase's taps into the channels) turns it into a stride-1 convolution with s * s times the
input channels and a kernel ceil(k / s) wide::

    conv2d(x, w, stride=s, padding=p) == conv2d(space_to_depth(pad(x)), fold(w), stride=1)

The sum is over the same products (plus products with the zero taps), so the result is the convolution's up to the
order of float32 accumulation. Why: cuDNN runs a strided convolution on a three-channel image poorly. VOLO's stem
(7x7, stride 2, 3 -> 64 channels; H200, torch 2.11, bf16 autocast, batch 128 of 224 x 224 images, kernel time per
call including the layout copies from the NCHW float32 image) took 986 us as a channels-last convolution (1,298 NCHW)
and 606 us as a 4x4 stride-1 convolution over 12 channels; forward and backward 2,545 against 1,915 us. Agent-CSwin's
stem (7x7, stride 4, 3 -> 64, as a 2x2 convolution over 48 channels): 287 against 483 us channels-last (494 NCHW),
forward and backward 690 against 1,051. Padding the
image to 4 or 8 channels instead measured no faster (1,037 / 1,117 us), and BiFormer's 3x3 stride-2 stem conv (3 ->
32) was fastest as it is (NCHW 237 us against 383 folded), so :class:`SpaceToDepthConv2d` is for the layers where
it measured faster; on CPU the two measured alike and the layer stays a convolution there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._amp import compute_dtype
from ._conv_layers import RewrittenConv2d, undilated_ungrouped_reason

__all__ = ["SpaceToDepthConv2d", "as_space_to_depth_conv", "space_to_depth_conv"]


def _fold_kernel(weight: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """(C_out, C_in, k_h, k_w) -> (C_out, C_in * s_h * s_w, ceil(k_h / s_h), ceil(k_w / s_w)): the kernel
    zero-padded to whole s x s blocks, each block phase's taps moved into the channels (channel c * s_h * s_w +
    phase_row * s_w + phase_col, the order :func:`_space_to_depth` gives the input's)."""
    out_c, in_c, k_h, k_w = weight.shape
    s_h, s_w = stride
    q_h, q_w = -(-k_h // s_h), -(-k_w // s_w)
    padded = F.pad(weight, (0, q_w * s_w - k_w, 0, q_h * s_h - k_h))
    blocks = padded.reshape(out_c, in_c, q_h, s_h, q_w, s_w).permute(0, 1, 3, 5, 2, 4)
    return blocks.reshape(out_c, in_c * s_h * s_w, q_h, q_w)


def _space_to_depth(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * s_h * s_w, H', W') channels-last, in the compute dtype: x zero-padded by ``padding``
    before and to whole s x s blocks covering every tap after (rows the strided convolution never reads cropped),
    each block's pixels in the channels."""
    b, c, h, w = x.shape
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = kernel, stride, padding
    out_h, out_w = (h + 2 * p_h - k_h) // s_h + 1, (w + 2 * p_w - k_w) // s_w + 1
    blocks_h, blocks_w = out_h - 1 + -(-k_h // s_h), out_w - 1 + -(-k_w // s_w)
    # negative trailing padding crops: the convolution drops the last rows when (H + 2p - k) % s != 0
    padded = F.pad(x, (p_w, blocks_w * s_w - w - p_w, p_h, blocks_h * s_h - h - p_h))
    blocks = padded.reshape(b, c, blocks_h, s_h, blocks_w, s_w).permute(0, 2, 4, 1, 3, 5)
    # one copy gathers the blocks and casts (under autocast the convolution's input cast, on half the bytes after)
    folded = torch.empty((b, blocks_h, blocks_w, c * s_h * s_w), dtype=compute_dtype(x), device=x.device)
    folded.view(b, blocks_h, blocks_w, c, s_h, s_w).copy_(blocks)
    return folded.permute(0, 3, 1, 2)


def space_to_depth_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` as a stride-1 convolution over the space-to-depth input.

    Args:
        x: (B, C_in, H, W) floating point, any strides, H + 2 * padding >= k_h (likewise W).
        weight: (C_out, C_in, k_h, k_w); bias: (C_out,) or None.
        stride, padding: (rows, cols) of the convolution (zero padding, dilation 1, groups 1).

    Returns:
        (B, C_out, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1) with channels-last strides, in the convolution's
        dtype (the autocast dtype under autocast).
    """
    folded = _space_to_depth(x, tuple(weight.shape[-2:]), stride, padding)
    return F.conv2d(folded, _fold_kernel(weight, stride).to(memory_format=torch.channels_last), bias)


def _space_to_depth_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot be computed by :func:`space_to_depth_conv`, or None when it can."""
    if conv.stride == (1, 1):
        return "stride=(1, 1) (nothing to fold)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (give the padding as ints)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (must be 'zeros')"
    return undilated_ungrouped_reason(conv)


class SpaceToDepthConv2d(RewrittenConv2d):
    """``nn.Conv2d`` (stride > 1, zero padding given as ints, dilation 1, groups 1) whose CUDA forward is
    :func:`space_to_depth_conv` (module docstring: for few-channel images), reading ``x`` in any layout; elsewhere
    the convolution. Same constructor, parameters and state-dict keys; keeps autocast's weight copies between
    inference calls like :class:`zoo.ops.AutocastCachedConv2d`.

    ``x`` (B, C_in, H, W) → (B, C_out, H_out, W_out) as the convolution gives it (channels-last strides on CUDA).
    """

    requirement = "it folds a strided, zero-padded, undilated, ungrouped convolution"
    convertible = "strided, zero-padded, undilated, ungrouped convolutions fold"
    reason_of = staticmethod(_space_to_depth_reason)

    def check_extent(self, x: torch.Tensor) -> None:
        for size, k, p in zip(x.shape[-2:], self.kernel_size, self.padding):
            if size + 2 * p < k:
                raise ValueError(f"SpaceToDepthConv2d: x of shape {tuple(x.shape)} padded by {self.padding} is "
                                 f"smaller than the kernel {self.kernel_size}")

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return space_to_depth_conv(x, weight, bias, self.stride, self.padding)


def as_space_to_depth_conv(conv: nn.Conv2d) -> SpaceToDepthConv2d:
    """Turn ``conv`` (an ``nn.Conv2d`` or its autocast-caching subclass) into a :class:`SpaceToDepthConv2d` in
    place (parameters, hooks and state-dict keys unchanged) and return it."""
    return SpaceToDepthConv2d.convert(conv, "as_space_to_depth_conv")
