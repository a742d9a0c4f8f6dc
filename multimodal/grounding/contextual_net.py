"""ConTEXTual Net 3D: a 3D residual U-Net whose skip connections and bottleneck are gated by report tokens.

Structure of the official ``ContextUNETR`` (zhuemann/ConTEXTual_Net_3D_Visual_Grounding @ aacd29d1,
``models/LLMSeg_conTEXTual_net_attention.py``), rebuilt from the MONAI blocks it uses (no MONAI dependency; the
module and parameter names are MONAI's, so official checkpoints load with :func:`official_state_dict`):

* encoders ``encoder1, encoder2, encoder3, encoder4, encoder10``: MONAI ``UnetrBasicBlock(res_block=True)`` =
  ``UnetResBlock``, each **stride 2** (kernel 3): in -> F, F -> F, F -> 2F, 2F -> 4F, 4F -> 8F; the input therefore
  needs every spatial size divisible by 32. ``UnetResBlock``: conv(k, stride) - norm - LeakyReLU(0.01) - conv(k) -
  norm, plus a 1x1x1 strided conv + norm on the residual, sum, LeakyReLU. Convolutions have no bias; the norm is
  MONAI's ``"instance"``: ``InstanceNorm3d`` without affine parameters.
* **language gating at 5 scales** (``lang_proj1..5``, ``lang_att1..5``): token embeddings ``(B, L, text_dim)`` are
  projected to the scale's width (8F, 4F, 2F, F, F for the bottleneck, enc3, enc2, enc1, enc0); a one-head
  cross-attention with the **voxels as queries** and the projected tokens as keys and values gives ``att``; the
  feature map becomes ``vision * tanh(att)``. No key-padding mask is applied (padding positions are attended, as
  officially; ``mask_padding_tokens=True`` masks them).
* decoders ``decoder4..1`` (``ContextUnetrUpBlock``): a 2x2x2 stride-2 transposed conv (no bias), concatenation
  with the gated skip, then ``UnetResBlock`` (decoder4) or ``UnetBasicBlock`` (conv-norm-LeakyReLU twice,
  decoders 3-1); ``out`` (``UnetOutUpBlock``) is one more 2x2x2 stride-2 transposed conv to ``out_channels``
  logits at the input resolution (no final 1x1 conv).

The official feature size is 48 (the language projections are 384, 192, 96, 48, 48 wide) and the text encoder is
Llama-2-7B (``text_dim`` 4096). The cross-attention runs through :func:`zoo.ops.cross_attention`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.ops import cross_attention

__all__ = ["OFFICIAL_FEATURE_SIZE", "OFFICIAL_TEXT_DIM", "ContextualNet3D", "LanguageGate", "official_state_dict"]

OFFICIAL_FEATURE_SIZE = 48
OFFICIAL_TEXT_DIM = 4096
_DOWNSAMPLING = 32  # five stride-2 encoders
Norm = Literal["instance", "batch"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels)  # MONAI "instance": affine=False, no running stats
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"norm={kind!r}; accepted: 'instance' (official), 'batch'")


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, transposed: bool = False) -> nn.Sequential:
    """A bias-free conv wrapped like MONAI's ``Convolution`` (parameters under ``.conv``), MONAI padding rules."""
    padding = (kernel - stride + 1) // 2
    if transposed:
        layer = nn.ConvTranspose3d(in_ch, out_ch, kernel, stride, padding, output_padding=2 * padding + stride - kernel,
                                   bias=False)
    else:
        layer = nn.Conv3d(in_ch, out_ch, kernel, stride, padding, bias=False)
    return nn.Sequential(OrderedDict(conv=layer))


class ResidualBlock(nn.Module):
    """MONAI ``UnetResBlock``: ``(B, in, *S) -> (B, out, *S / stride)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, norm: Norm = "instance") -> None:
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, kernel, stride)
        self.conv2 = _conv(out_ch, out_ch, kernel, 1)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = _norm(norm, out_ch)
        self.norm2 = _norm(norm, out_ch)
        if in_ch != out_ch or stride != 1:
            self.conv3 = _conv(in_ch, out_ch, 1, stride)
            self.norm3 = _norm(norm, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
        residual = self.norm3(self.conv3(x)) if hasattr(self, "conv3") else x
        return self.lrelu(out + residual)


class BasicBlock(nn.Module):
    """MONAI ``UnetBasicBlock``: conv - norm - LeakyReLU, twice; ``(B, in, *S) -> (B, out, *S / stride)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, norm: Norm = "instance") -> None:
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, kernel, stride)
        self.conv2 = _conv(out_ch, out_ch, kernel, 1)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = _norm(norm, out_ch)
        self.norm2 = _norm(norm, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x))))))


class EncoderBlock(nn.Module):
    """MONAI ``UnetrBasicBlock(res_block=True)``: a stride-2 :class:`ResidualBlock` held as ``.layer``."""

    def __init__(self, in_ch: int, out_ch: int, norm: Norm = "instance") -> None:
        super().__init__()
        self.layer = ResidualBlock(in_ch, out_ch, kernel=3, stride=2, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UpBlock(nn.Module):
    """``ContextUnetrUpBlock``: 2x upsampling (transposed conv), concat with the skip, residual or basic block."""

    def __init__(self, in_ch: int, out_ch: int, residual: bool, norm: Norm = "instance") -> None:
        super().__init__()
        self.transp_conv = _conv(in_ch, out_ch, 2, 2, transposed=True)
        block = ResidualBlock if residual else BasicBlock
        self.conv_block = block(2 * out_ch, out_ch, kernel=3, stride=1, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``x`` (B, in, *S) and ``skip`` (B, out, *2S) -> (B, out, *2S)."""
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class OutUpBlock(nn.Module):
    """``UnetOutUpBlock``: one 2x2x2 stride-2 transposed conv to the output logits."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.transp_conv = _conv(in_ch, out_ch, 2, 2, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transp_conv(x)


class VoxelTokenAttention(nn.Module):
    """One-head cross-attention, voxels (queries) reading projected tokens (keys = values).

    Parameters are named and initialised as ``nn.MultiheadAttention(dim, num_heads=1)`` (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), whose computation it reproduces (scale ``dim ** -0.5``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, voxels: torch.Tensor, tokens: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``voxels`` (B, N, dim), ``tokens`` (B, L, dim), ``token_mask`` (B, L) bool (True = attend) or None
        -> (B, N, dim)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(voxels, w_q, b_q).unsqueeze(1)  # one head: (B, 1, N, dim)
        k = F.linear(tokens, w_k, b_k).unsqueeze(1)
        v = F.linear(tokens, w_v, b_v).unsqueeze(1)
        bias = None
        if token_mask is not None:
            bias = torch.zeros(token_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~token_mask.bool(), float("-inf"))[:, None, None, :]
        out, _ = cross_attention(q, k, v_k=v, bias=bias, scale=1.0 / math.sqrt(self.dim))
        return self.out_proj(out.squeeze(1))


class LanguageGate(nn.Module):
    """``LangCrossAtt``: ``vision * tanh(attention(voxels -> tokens))``, shape-preserving on (B, C, *S)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.multihead_attn = VoxelTokenAttention(dim)

    def forward(self, tokens: torch.Tensor, vision: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (B, L, C) already projected to C, ``vision`` (B, C, *S) -> gated (B, C, *S)."""
        voxels = vision.flatten(2).transpose(1, 2)  # (B, N, C), voxels in C order of (D, H, W)
        gate = torch.tanh(self.multihead_attn(voxels, tokens, token_mask))
        return (voxels * gate).transpose(1, 2).reshape(vision.shape)


class ContextualNet3D(nn.Module):
    """ConTEXTual Net 3D (see the module docstring): ``(B, in_channels, D, H, W)`` + token embeddings ->
    ``(B, out_channels, D, H, W)`` logits.

    Args:
        in_channels: image channels (official: CT and PET, 2).
        out_channels: classes (official: background and lesion, 2; softmax).
        feature_size: F, the width of the first encoder (official 48).
        text_dim: width of the token embeddings (official 4096, Llama-2-7B).
        norm: ``"instance"`` (official) or ``"batch"``. Instance norm needs more than one voxel per channel in
            training, so the bottleneck (input / 32) must hold at least 2 voxels, e.g. inputs of 32x32x64.
        mask_padding_tokens: hide padding tokens from the cross-attention (the official model attends to them).
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 2, feature_size: int = OFFICIAL_FEATURE_SIZE,
                 text_dim: int = OFFICIAL_TEXT_DIM, norm: Norm = "instance", mask_padding_tokens: bool = False) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("feature_size", feature_size), ("text_dim", text_dim)):
            if int(value) < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        f = feature_size
        self.feature_size, self.text_dim, self.mask_padding_tokens, self.norm = f, text_dim, mask_padding_tokens, norm
        self.encoder1 = EncoderBlock(in_channels, f, norm)
        self.encoder2 = EncoderBlock(f, f, norm)
        self.encoder3 = EncoderBlock(f, 2 * f, norm)
        self.encoder4 = EncoderBlock(2 * f, 4 * f, norm)
        self.encoder10 = EncoderBlock(4 * f, 8 * f, norm)
        self.decoder4 = UpBlock(8 * f, 4 * f, residual=True, norm=norm)
        self.decoder3 = UpBlock(4 * f, 2 * f, residual=False, norm=norm)
        self.decoder2 = UpBlock(2 * f, f, residual=False, norm=norm)
        self.decoder1 = UpBlock(f, f, residual=False, norm=norm)
        self.out = OutUpBlock(f, out_channels)
        # scale n gates: 1 bottleneck (8F), 2 enc3 (4F), 3 enc2 (2F), 4 enc1 (F), 5 enc0 (F)
        for n, width in enumerate((8 * f, 4 * f, 2 * f, f, f), start=1):
            setattr(self, f"lang_att{n}", LanguageGate(width))
            setattr(self, f"lang_proj{n}", nn.Linear(text_dim, width))

    def _check_inputs(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        if x.ndim != 5 or any(s % _DOWNSAMPLING for s in x.shape[2:]):
            raise ValueError(f"x must be (B, C, D, H, W) with D, H, W divisible by {_DOWNSAMPLING}, "
                             f"got {tuple(x.shape)}")
        if self.norm == "instance" and math.prod(s // _DOWNSAMPLING for s in x.shape[2:]) < 2:
            raise ValueError(f"x of spatial size {tuple(x.shape[2:])} leaves one bottleneck voxel (size / 32), which "
                             "instance norm cannot normalise; use at least 2, e.g. 32x32x64")
        if tokens.ndim != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != self.text_dim:
            raise ValueError(f"tokens must be (B={x.shape[0]}, L, text_dim={self.text_dim}), got {tuple(tokens.shape)}")
        if token_mask is not None and tuple(token_mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"token_mask must be (B, L)={tuple(tokens.shape[:2])}, got {tuple(token_mask.shape)}")

    def _gate(self, n: int, tokens: torch.Tensor, vision: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return getattr(self, f"lang_att{n}")(getattr(self, f"lang_proj{n}")(tokens), vision, mask)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Segmentation logits.

        Args:
            x: (B, in_channels, D, H, W) image, each spatial size divisible by 32.
            tokens: (B, L, text_dim) token embeddings of the report sentence.
            token_mask: (B, L) bool, True on real tokens; used only with ``mask_padding_tokens``.

        Returns:
            (B, out_channels, D, H, W) logits.
        """
        self._check_inputs(x, tokens, token_mask)
        tokens = tokens.to(x.dtype)
        mask = token_mask if self.mask_padding_tokens else None
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(enc0)
        enc2 = self.encoder3(enc1)
        enc3 = self.encoder4(enc2)
        bottleneck = self.encoder10(enc3)
        dec = self.decoder4(self._gate(1, tokens, bottleneck, mask), self._gate(2, tokens, enc3, mask))
        dec = self.decoder3(dec, self._gate(3, tokens, enc2, mask))
        dec = self.decoder2(dec, self._gate(4, tokens, enc1, mask))
        dec = self.decoder1(dec, self._gate(5, tokens, enc0, mask))
        return self.out(dec)


_OFFICIAL_UNUSED_PREFIXES = ("llama_model.", "text_encoder.", "txt2vis.", "attn_transformer.", "contexts")


def official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official ``ContextUNETR`` state dict as :class:`ContextualNet3D` keys: strips a DDP ``module.`` prefix and
    drops the frozen LLaMA and the unused context path (``txt2vis``, ``attn_transformer``, ``text_encoder``,
    ``contexts``). Load the result with ``strict=True``."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if not key.startswith(_OFFICIAL_UNUSED_PREFIXES):
            out[key] = value
    return out
