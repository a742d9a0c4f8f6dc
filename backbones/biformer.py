"""BiFormer: vision transformers with bi-level routing attention (Zhu et al., CVPR 2023).

One class, :class:`BiFormer`, covers the three official layouts (``layout=``):

- ``"biformer"`` (official ``models/biformer.py`` ``BiFormer``; BiFormer-T/S/B): overlapping two-conv stem,
  Conv3x3/2 + BN downsampling, blocks with a depthwise-conv position embedding and the *legacy* NHWC routing
  attention (``ops/bra_legacy.py``).
- ``"stl"`` (``BiFormerSTL``, the Swin-Tiny layout): Conv4x4/4 + norm stem, norm + Conv2x2/2 merging, the same
  legacy routing attention, no position embedding.
- ``"stl_nchw"`` (``nchwBiFormerSTL``): the Swin-Tiny layout with the refactored NCHW routing attention
  (``ops/bra_nchw.py``): 1x1-conv projections, region size ``H // n_win`` instead of ``n_win`` regions,
  padding after the projection and exclusive region pooling, LayerNorm2d block norms.

Parameter names equal the official ones, so official checkpoints load without renaming. Numerics follow the
official code, including its quirks: routing attention scales by the full qk width (``qk_dim ** -0.5``), stage-3
global attention has a fixed 8 heads, the legacy global attention adds its LePE of the attention *input*, the
position-embedding conv uses ``padding=1`` whatever its kernel, and ``auto_pad=True`` (legacy layouts, for dense
prediction at any input size) zero-pads the normalised tokens before the qkv projection and crops after ``wo``.

All attention goes through :func:`zoo.ops.routing_attention` (routing stages) and
:func:`zoo.ops.downsampled_attention` over all tokens (the 7x7 global stage).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, get_norm_layer
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._layers import ChannelsLastSequential, add_norm, check_images, init_linears, projection_norm, unless_identity
from ._heads import PooledLinearHeadMixin
from zoo.convert import FamilyConverter, register_converter
from zoo.ops import SequentialMlp, depthwise_conv, downsampled_attention, routing_attention
from zoo.ops.autocast_cache import autocast_weights, one_cast_per_forward
from zoo.ops.block_graphs import run_block
from zoo.ops.depthwise_conv import channels_innermost
from zoo.registry import build_zoo_model, register_family, register_variants

__all__ = ["BiFormer", "BiLevelRoutingAttention", "NCHWRoutingAttention", "AttentionLePE", "NCHWAttentionLePE"]

FAMILY = "biformer"
LAYOUTS = ("biformer", "stl", "stl_nchw")

register_family(
    FAMILY,
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR 2023)",
    paper_url="https://arxiv.org/abs/2303.08810",
    code_url="https://github.com/rayleizhu/BiFormer",
    license="MIT",
)


# ----------------------------------------------------------------------------------------------------------------
# Attention layers

class _QKVLinear(nn.Module):
    """One Linear giving q and k (``qk_dim`` each) and v (``dim``); a module so the key is ``attn.qkv.qkv``."""

    def __init__(self, dim: int, qk_dim: int):
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., dim) -> q (..., qk_dim), k (..., qk_dim), v (..., dim)."""
        # (the layer from the module dict: ``self.qkv`` goes through nn.Module.__getattr__, which eager calls pay for)
        return self._modules["qkv"](x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)


def _lepe_conv(dim: int, kernel: int) -> nn.Conv2d | None:
    """Depthwise conv of the locally-enhanced positional encoding (None when ``kernel`` is 0)."""
    return nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim) if kernel > 0 else None


class BiLevelRoutingAttention(nn.Module):
    """Legacy bi-level routing attention on NHWC tokens (official ``ops/bra_legacy.py``, identity kv path).

    A fixed ``n_win x n_win`` grid of regions (region size ``H / n_win``); q/k/v from one Linear; LePE on v
    re-assembled to the whole (padded) map; ``wo`` after adding the LePE.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, qk_dim: int | None = None,
                 qk_scale: float | None = None, topk: int = 4, side_dwconv: int = 5, auto_pad: bool = False,
                 param_attention: str = "qkvo"):
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by num_heads={num_heads}")
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention must be 'qkvo' or 'qkv', got {param_attention!r}")
        self.num_heads, self.n_win, self.topk, self.auto_pad = num_heads, n_win, topk, auto_pad
        self.scale = qk_scale or self.qk_dim ** -0.5  # full qk width, as the official code (router and attention)
        self.lepe = _lepe_conv(dim, side_dwconv)
        self.qkv = _QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) normalised tokens -> (B, H, W, C)."""
        _, h, w, _ = x.shape
        x = self._pad_to_grid(x)
        hp, wp = x.shape[1:3]
        layers = self._modules  # (nn.Module.__getattr__ costs eager calls host time; no LePE: a plain None)
        q, k, v = layers["qkv"](x)
        out = routing_attention(q, k, v, num_heads=self.num_heads, region_size=(hp // self.n_win, wp // self.n_win),
                                topk=self.topk, scale=self.scale, routing_scale=self.scale, layout="nhwc")
        lepe = layers.get("lepe")
        if lepe is not None:
            out = depthwise_conv(v, *autocast_weights(lepe, channels_innermost), residual=out)
        return layers["wo"](out)[:, :h, :w]

    def _pad_to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the tokens (before projection: padded tokens become the qkv bias) to a multiple of n_win."""
        _, h, w, _ = x.shape
        pad_h, pad_w = -h % self.n_win, -w % self.n_win
        if not (pad_h or pad_w):
            return x
        if not self.auto_pad:
            raise ValueError(f"BiFormer routing attention needs feature maps divisible by n_win={self.n_win}, got "
                             f"{h}x{w}; use an input size that is a multiple of {4 * 4 * self.n_win} or build the "
                             "model with auto_pad=True")
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


class NCHWRoutingAttention(nn.Module):
    """Refactored bi-level routing attention on NCHW maps (official ``ops/bra_nchw.py`` ``nchwBRA``).

    Region size ``(H // n_win, W // n_win)``, so maps that do not divide give more than ``n_win^2`` regions;
    q/k/v are zero-padded after the 1x1-conv projection; routing is unscaled; LePE on the unpadded v.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, qk_scale: float | None = None, topk: int = 4,
                 side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads={num_heads}")
        self.num_heads, self.n_win, self.topk = num_heads, n_win, topk
        self.scale = qk_scale or dim ** -0.5  # full width: "to be consistent with old models" (official comment)
        self.lepe = _lepe_conv(dim, side_dwconv)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, kernel_size=1)
        self.output_linear = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised map -> (B, C, H, W)."""
        h, w = x.shape[-2:]
        if h < self.n_win or w < self.n_win:
            raise ValueError(f"nchw routing attention needs feature maps of at least n_win={self.n_win} per side, "
                             f"got {h}x{w}")
        q, k, v = self.qkv_linear(x).chunk(3, dim=1)
        out = routing_attention(q, k, v, num_heads=self.num_heads, region_size=(h // self.n_win, w // self.n_win),
                                topk=self.topk, scale=self.scale, layout="nchw")
        if self.lepe is not None:
            out = out + self.lepe(v)
        return self.output_linear(out)


def _global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full softmax attention with the head-width scale: (B, heads, N, d) x3 -> (B, heads, N, d).

    ``downsampled_attention`` is the zoo's attention of every query over a given key set; here the key set is
    simply every token of the (7x7) map.
    """
    return downsampled_attention(q, k, v)


class AttentionLePE(nn.Module):
    """Global multi-head attention on NHWC tokens (official ``AttentionLePE``/``Attention``, stage 3).

    ``lepe=True``: adds a depthwise conv of the attention *input* (not of v), as the official code does.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, lepe: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = _lepe_conv(dim, side_dwconv) if lepe else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        layers = self._modules  # (nn.Module.__getattr__ costs eager calls host time; no LePE: a plain None)
        q, k, v = layers["qkv"](x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = _global_attention(q, k, v).transpose(1, 2).reshape(b, h, w, c)
        lepe = layers.get("lepe")
        if lepe is not None:
            out = depthwise_conv(x, *autocast_weights(lepe, channels_innermost), residual=out)
        return layers["proj"](out)


class NCHWAttentionLePE(nn.Module):
    """Global multi-head attention on NCHW maps with LePE of v (official ``nchwAttentionLePE``, stage 3)."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=False)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.lepe = _lepe_conv(dim, side_dwconv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q_, k_, v_ = (t.reshape(b, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2) for t in (q, k, v))
        out = _global_attention(q_, k_, v_).transpose(-1, -2).reshape(b, c, h, w)
        if self.lepe is not None:
            out = out + self.lepe(v)
        return self.proj(out)


# ----------------------------------------------------------------------------------------------------------------
# Blocks and stages

class _DWConvNHWC(nn.Module):
    """Depthwise 3x3 conv on NHWC tokens (the optional MLP conv, official ``DWConv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Transformer block on NHWC tokens (legacy layouts): [pos-embed conv] + attention + MLP, pre- or post-norm.

    ``mlp_slot`` keeps the official BiFormer MLP's middle entry (an Identity or the DW conv), so its keys are
    ``mlp.0``/``mlp.3``; the STL MLP has no slot (``mlp.0``/``mlp.2``).
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, pos_embed_kernel: int = 0,
                 mlp_slot: bool = False, mlp_dwconv: bool = False, layer_scale_init_value: float = -1.0,
                 pre_norm: bool = True, drop_path: float = 0.0):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        # padding=1 whatever the kernel size, as the official code (same size only for kernel 3)
        self.pos_embed = (nn.Conv2d(dim, dim, pos_embed_kernel, padding=1, groups=dim) if pos_embed_kernel > 0
                          else None)
        # pre-norm: the norms feed projections only (zoo's faster LayerNorm); post-norm: they emit the residual stream
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = projection_norm(norm, dim) if pre_norm else norm(dim)
        self.attn = attn
        self.norm2 = projection_norm(norm, dim) if pre_norm else norm(dim)
        middle = [_DWConvNHWC(hidden) if mlp_dwconv else nn.Identity()] if mlp_slot else []
        self.mlp = SequentialMlp(nn.Linear(dim, hidden), *middle, nn.GELU(), nn.Linear(hidden, dim))
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None
        self.pre_norm = pre_norm
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _scaled(self, x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return unless_identity(self._modules["drop_path"], x if gamma is None else gamma * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        # the submodules from their dict (``self.attn`` goes through nn.Module.__getattr__, which eager calls pay
        # for); a block without a position conv has it as a plain None attribute
        layers = self._modules
        pos_embed, norm1, attn, norm2, mlp = (layers.get("pos_embed"), layers["norm1"], layers["attn"],
                                              layers["norm2"], layers["mlp"])
        if pos_embed is not None and pos_embed.kernel_size[0] == 3:  # same-size: K // 2 == 1
            x = depthwise_conv(x, *autocast_weights(pos_embed, channels_innermost), residual=x)
        elif pos_embed is not None:
            x = x + pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.pre_norm:
            x, h = add_norm(norm2, x, self._scaled(attn(norm1(x)), self.gamma1))
            return x + self._scaled(mlp(h), self.gamma2)
        x = norm1(x + self._scaled(attn(x), self.gamma1))
        return norm2(x + self._scaled(mlp(x), self.gamma2))


class NCHWBlock(nn.Module):
    """Pre-norm transformer block on NCHW maps (``stl_nchw``): LayerNorm2d (eps 1e-6), attention, 1x1-conv MLP."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = x + unless_identity(self.drop_path, self.attn(self.norm1(x)))
        return x + unless_identity(self.drop_path, self.mlp(self.norm2(x)))


def _run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, tokens_last: bool, grad_ckpt: bool) -> torch.Tensor:
    """Run blocks on an NCHW map; ``tokens_last`` blocks see NHWC tokens."""
    if tokens_last:
        # one copy per stage: the blocks' LayerNorms, linears and residual adds then all see dense NHWC tokens, and
        # their depthwise convs channels-last maps (a permuted NCHW map costs copies in every block)
        x = x.permute(0, 2, 3, 1).contiguous()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if grad_ckpt and not torch.jit.is_scripting() else \
            run_block(block, block, x)
    return x.permute(0, 3, 1, 2) if tokens_last else x


class SequentialStage(nn.Sequential):
    """Stage whose blocks are its direct children (BiFormer layout: keys ``stages.i.j``). NCHW in and out."""

    def __init__(self, blocks: Sequence[nn.Module], tokens_last: bool = True):
        super().__init__(*blocks)
        self.tokens_last, self.grad_checkpointing = tokens_last, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return _run_blocks(list(self), x, self.tokens_last, self.grad_checkpointing)


class BlocksStage(nn.Module):
    """Stage holding ``blocks`` (STL layouts: keys ``stages.i.blocks.j``). NCHW in and out."""

    def __init__(self, blocks: Sequence[nn.Module], tokens_last: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.tokens_last, self.grad_checkpointing = tokens_last, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return _run_blocks(self.blocks, x, self.tokens_last, self.grad_checkpointing)


# ----------------------------------------------------------------------------------------------------------------
# The model

def _per_stage(value: Any, name: str, kind: type | tuple[type, ...] = (int, float)) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 4
    if len(values) != 4 or not all(isinstance(v, kind) for v in values):
        raise ValueError(f"{name} must be one value or 4 values (one per stage), got {value!r}")
    return values


def _resolve_norm(norm_layer: str | Callable[..., nn.Module] | None, default: str) -> Callable[..., nn.Module]:
    if norm_layer is None:
        norm_layer = default
    if isinstance(norm_layer, str):
        try:
            return get_norm_layer(norm_layer)
        except (AssertionError, KeyError, ValueError) as e:
            raise ValueError(f"norm_layer={norm_layer!r} is not a timm norm layer name "
                             "(e.g. 'batchnorm2d', 'layernorm2d')") from e
    if not callable(norm_layer):
        raise ValueError(f"norm_layer must be a name or a callable(num_channels), got {norm_layer!r}")
    return norm_layer


class BiFormer(PooledLinearHeadMixin, nn.Module):
    """BiFormer backbone and classifier (all three official layouts, see the module docstring).

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        layout: ``"biformer"``, ``"stl"`` or ``"stl_nchw"``.
        in_chans, num_classes, global_pool: timm's meaning (``global_pool`` ``"avg"`` or ``""``).
        head_dim: channels per head of the routing attention (heads = ``qk_dim // head_dim``).
        qk_dims: q/k channels of the legacy routing attention per stage (default ``embed_dims``).
        qk_scale: routing-attention scale; default ``qk_dim ** -0.5`` (the full width, as the official code).
        mlp_ratios: MLP hidden width per stage, as a multiple of the stage width.
        n_win: regions per side (legacy) or ``H // n_win`` region size (nchw); one value or one per stage.
        topks: per stage, ``> 0`` routing attention with that many regions, ``-1`` global attention
            (legacy: without LePE; nchw: with LePE of v), ``-2`` global attention with LePE (legacy only).
        side_dwconv: LePE kernel size (0: none).
        before_attn_dwconv: kernel of the block's depthwise-conv position embedding (0: none; ``"biformer"``).
        global_heads: heads of the global-attention stages (the official code fixes 8).
        auto_pad: legacy routing attention pads the tokens to a multiple of ``n_win`` (any input size).
        layer_scale_init_value, pre_norm, mlp_dwconv, param_attention: official BiFormer block options
            (legacy layouts).
        norm_layer: stem/downsample/final norm (name or class); default BatchNorm2d (``"biformer"``) or
            LayerNorm2d (STL layouts, the official class default; the released STL models use BatchNorm2d).
        pre_head_norm_layer: final norm if different from ``norm_layer``.
        drop_rate: dropout before the classifier; drop_path_rate: stochastic depth, linear over blocks.
        extra_norms: add the official dense-prediction backbone's per-stage output norms (``BiFormer_mm``:
            ``extra_norms.{0..3}``, LayerNorm2d eps 1e-6), applied to every stage output that
            :meth:`forward_intermediates` (and so ``features_only``) returns; the classification path is unchanged.
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 8, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 layout: str = "biformer", in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 head_dim: int = 32, qk_dims: Sequence[int | None] | None = None, qk_scale: float | None = None,
                 mlp_ratios: float | Sequence[float] = 3, n_win: int | Sequence[int] = 7,
                 topks: Sequence[int] = (1, 4, 16, -2), side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 global_heads: int = 8, auto_pad: bool = False, layer_scale_init_value: float = -1.0,
                 pre_norm: bool = True, mlp_dwconv: bool = False, param_attention: str = "qkvo",
                 norm_layer: str | Callable[..., nn.Module] | None = None,
                 pre_head_norm_layer: str | Callable[..., nn.Module] | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, extra_norms: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        depths = _per_stage(depths, "depths", int)
        embed_dims = _per_stage(embed_dims, "embed_dims", int)
        qk_dims = tuple(q or d for q, d in zip(_per_stage(qk_dims or embed_dims, "qk_dims", (int, type(None))),
                                               embed_dims))
        self.layout = layout
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = embed_dims
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        norm = _resolve_norm(norm_layer, "batchnorm2d" if layout == "biformer" else "layernorm2d")
        if layout == "stl_nchw":
            self._check_nchw_options(before_attn_dwconv, layer_scale_init_value, pre_norm, mlp_dwconv,
                                     param_attention, qk_dims, embed_dims)

        self.downsample_layers = nn.ModuleList(
            [self._stem(layout, in_chans, embed_dims[0], norm)]
            + [self._downsample(layout, embed_dims[i], embed_dims[i + 1], norm) for i in range(3)])

        block_args = dict(head_dim=head_dim, qk_scale=qk_scale, n_win=_per_stage(n_win, "n_win", int),
                          topks=_per_stage(topks, "topks", int), mlp_ratios=_per_stage(mlp_ratios, "mlp_ratios"),
                          side_dwconv=side_dwconv, global_heads=global_heads, auto_pad=auto_pad,
                          param_attention=param_attention, before_attn_dwconv=before_attn_dwconv,
                          layer_scale_init_value=layer_scale_init_value, pre_norm=pre_norm, mlp_dwconv=mlp_dwconv)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(4):
            rates = drop_paths[sum(depths[:i]):sum(depths[:i + 1])]
            blocks = [self._block(i, embed_dims[i], qk_dims[i], rate, **block_args) for rate in rates]
            self.stages.append(SequentialStage(blocks) if layout == "biformer"
                               else BlocksStage(blocks, tokens_last=layout == "stl"))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))

        if extra_norms:  # the official detection/segmentation backbone normalises each stage output for FPNs
            self.extra_norms = nn.ModuleList(LayerNorm2d(d, eps=1e-6) for d in embed_dims)
        head_norm = norm if pre_head_norm_layer is None else _resolve_norm(pre_head_norm_layer, "")
        self.norm = head_norm(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        init_linears(self)  # convs keep PyTorch's default, as in the official code

    # -- construction ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_nchw_options(before_attn_dwconv, layer_scale_init_value, pre_norm, mlp_dwconv, param_attention,
                            qk_dims, embed_dims) -> None:
        unsupported = dict(before_attn_dwconv=(before_attn_dwconv, 0), layer_scale_init_value=(
            layer_scale_init_value > 0, False), pre_norm=(pre_norm, True), mlp_dwconv=(mlp_dwconv, False),
            param_attention=(param_attention, "qkvo"), qk_dims=(qk_dims, embed_dims))
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ValueError(f"layout='stl_nchw' does not support {name}={value!r} (accepted: {wanted!r})")

    @staticmethod
    def _stem(layout: str, in_chans: int, dim: int, norm: Callable[..., nn.Module]) -> nn.Sequential:
        if layout == "biformer":  # overlapping two-conv stem (UniFormer style), stride 4
            return ChannelsLastSequential(nn.Conv2d(in_chans, dim // 2, 3, 2, 1), norm(dim // 2), nn.GELU(),
                                          nn.Conv2d(dim // 2, dim, 3, 2, 1), norm(dim))
        return ChannelsLastSequential(nn.Conv2d(in_chans, dim, 4, 4), norm(dim))  # Swin-style patchify

    @staticmethod
    def _downsample(layout: str, dim: int, out_dim: int, norm: Callable[..., nn.Module]) -> nn.Sequential:
        if layout == "biformer":
            return nn.Sequential(nn.Conv2d(dim, out_dim, 3, 2, 1), norm(out_dim))
        return nn.Sequential(norm(dim), nn.Conv2d(dim, out_dim, 2, 2))

    def _block(self, stage: int, dim: int, qk_dim: int, drop_path: float, *, head_dim: int,
               qk_scale: float | None, n_win: tuple, topks: tuple, mlp_ratios: tuple, side_dwconv: int,
               global_heads: int, auto_pad: bool, param_attention: str, before_attn_dwconv: int,
               layer_scale_init_value: float, pre_norm: bool, mlp_dwconv: bool) -> nn.Module:
        topk, nchw = topks[stage], self.layout == "stl_nchw"
        if topk > 0:
            heads = qk_dim // head_dim
            attn = NCHWRoutingAttention(dim, heads, n_win[stage], qk_scale, topk, side_dwconv) if nchw else \
                BiLevelRoutingAttention(dim, heads, n_win[stage], qk_dim, qk_scale, topk, side_dwconv, auto_pad,
                                        param_attention)
        elif topk == -1:
            attn = NCHWAttentionLePE(dim, global_heads, side_dwconv) if nchw else \
                AttentionLePE(dim, global_heads, side_dwconv, lepe=False)
        elif topk == -2 and not nchw:
            attn = AttentionLePE(dim, global_heads, side_dwconv)
        else:
            accepted = "> 0 or -1" if nchw else "> 0, -1 or -2"
            raise ValueError(f"topks[{stage}]={topk} is not supported for layout={self.layout!r} (accepted: "
                             f"{accepted}; the conv pseudo-attention ablation, topk=0, is not ported)")
        if nchw:
            return NCHWBlock(dim, attn, mlp_ratios[stage], drop_path)
        legacy = self.layout == "biformer"
        return Block(dim, attn, mlp_ratios[stage], pos_embed_kernel=before_attn_dwconv if legacy else 0,
                     mlp_slot=legacy, mlp_dwconv=mlp_dwconv, layer_scale_init_value=layer_scale_init_value,
                     pre_norm=pre_norm, drop_path=drop_path)

    # -- timm interface ----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (none beyond timm's 1-d rule, as in official training)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay: stem, then (downsample + blocks) per stage, then norm."""
        return dict(
            stem=r"^downsample_layers\.0\.",
            blocks=r"^(?:downsample_layers|stages)\.(\d+)" if coarse else [
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^stages\.(\d+)\.(?:blocks\.)?(\d+)", None),
                (r"^norm\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward instead of storing its activations."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @one_cast_per_forward
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW, strides 4/8/16/32) and optionally the final features.

        Args:
            x: (B, in_chans, H, W) images.
            indices: stages to return: the last n if int, all if None, else the listed ones.
            norm: apply the final norm to the last stage's output when it is returned (models built with
                ``extra_norms`` apply their per-stage norm to every returned output instead).
            stop_early: stop after the last requested stage.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of stage outputs.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_images(x, "BiFormer")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        num_stages = max_index + 1 if stop_early else len(self.stages)
        intermediates = []
        for i in range(num_stages):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take_indices:
                if hasattr(self, "extra_norms"):
                    intermediates.append(self.extra_norms[i](x))
                else:
                    intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if num_stages == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm/head) not needed for the given intermediates; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if hasattr(self, "extra_norms"):
            self.extra_norms = self.extra_norms[:max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head or max_index < 3:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C_3, H/32, W/32), after the final norm."""
        check_images(x, "BiFormer")
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x)



# ----------------------------------------------------------------------------------------------------------------
# Variants (as data), pretrained configs, registration

_BIFORMER = dict(layout="biformer", mlp_ratios=3, n_win=7, topks=(1, 4, 16, -2), head_dim=32, side_dwconv=5,
                 before_attn_dwconv=3)
_STL = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratios=4, n_win=7, head_dim=32, side_dwconv=5,
            before_attn_dwconv=0, norm_layer="batchnorm2d")

VARIANTS: dict[str, dict[str, Any]] = {
    "biformer_tiny": dict(_BIFORMER, depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512)),
    "biformer_small": dict(_BIFORMER, depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512)),
    "biformer_base": dict(_BIFORMER, depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768)),
    "biformer_stl": dict(_STL, layout="stl", topks=(1, 4, 16, -2)),
    "biformer_stl_nchw": dict(_STL, layout="stl_nchw", topks=(1, 4, 16, -1)),
}

_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/{}/root/content"


def _cfg(share: str, top1: float, **kwargs: Any) -> dict[str, Any]:
    # crop_pct 0.875: the official evaluation resizes to 256 and center-crops 224 (datasets.py build_transform)
    return dict(url=_ONEDRIVE.format(share), num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="downsample_layers.0.0", classifier="head", license="mit",
                paper_ids="arXiv:2303.08810", paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention",
                origin_url="https://github.com/rayleizhu/BiFormer", notes=(f"ImageNet-1k top-1 {top1}",), **kwargs)


default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg("s!AkBbczdRlZvChHEOoGkgwgQzEDlM", 81.4),
    "biformer_small.in1k": _cfg("s!AkBbczdRlZvChHDyM-x9KWRBZ832", 83.8),
    "biformer_base.in1k": _cfg("s!AkBbczdRlZvChHI_XPhoadjaNxtO", 84.3),
    "biformer_stl.in1k": _cfg("s!AkBbczdRlZvChSf-m7ujkvx9lIQ1", 82.7),
    "biformer_stl_nchw.in1k": _cfg("s!AkBbczdRlZvChWYrKbWbMgqd2Ai0", 82.7),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    return build_zoo_model(BiFormer, variant, pretrained, family=FAMILY,
                           feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


register_variants(FAMILY, __name__, VARIANTS, _create)


# ----------------------------------------------------------------------------------------------------------------
# Official constructors -> BiFormer (keys are already identical: the key map is the identity)

_OFFICIAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "BiFormer": dict(
        depth=[3, 4, 8, 3], in_chans=3, num_classes=1000, embed_dim=[64, 128, 320, 512], head_dim=64,
        qk_scale=None, representation_size=None, drop_path_rate=0.0, drop_rate=0.0, use_checkpoint_stages=[],
        n_win=7, kv_downsample_mode="ada_avgpool", kv_per_wins=[2, 2, -1, -1], topks=[8, 8, -1, -1],
        side_dwconv=5, layer_scale_init_value=-1, qk_dims=[None, None, None, None], param_routing=False,
        diff_routing=False, soft_routing=False, pre_norm=True, pe=None, pe_stages=[0], before_attn_dwconv=3,
        auto_pad=False, kv_downsample_kernels=[4, 2, 1, 1], kv_downsample_ratios=[4, 2, 1, 1],
        mlp_ratios=[4, 4, 4, 4], param_attention="qkvo", mlp_dwconv=False),
    "BiFormerSTL": dict(
        in_chans=3, num_classes=1000, depth=[2, 2, 6, 2], embed_dim=[96, 192, 384, 768], head_dim=32,
        qk_scale=None, drop_path_rate=0.0, drop_rate=0.0, use_checkpoint_stages=[], mlp_ratios=[4, 4, 4, 4],
        norm_layer=LayerNorm2d, pre_head_norm_layer=None, n_wins=(7, 7, 7, 7), topks=(1, 4, 16, -2),
        side_dwconv=5),
}
_OFFICIAL_DEFAULTS["nchwBiFormerSTL"] = dict(_OFFICIAL_DEFAULTS["BiFormerSTL"])
_OFFICIAL_LAYOUT = {"BiFormer": "biformer", "BiFormerSTL": "stl", "nchwBiFormerSTL": "stl_nchw"}


def _official_biformer_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Official ``BiFormer`` kwargs -> zoo kwargs; refuses the options no released model uses and we do not port."""
    unsupported = dict(kv_downsample_mode=("identity",), param_routing=(False,), diff_routing=(False,),
                       soft_routing=(False,), representation_size=(None, 0), pe=(None, "none"))
    for name, accepted in unsupported.items():
        if kw[name] not in accepted:
            raise ValueError(f"official BiFormer kwarg {name}={kw[name]!r} is not supported (accepted: "
                             f"{list(accepted)}); every released model uses {accepted[0]!r}")
    return dict(layout="biformer", depths=kw["depth"], embed_dims=kw["embed_dim"], in_chans=kw["in_chans"],
                num_classes=kw["num_classes"], head_dim=kw["head_dim"], qk_dims=kw["qk_dims"],
                qk_scale=kw["qk_scale"], mlp_ratios=kw["mlp_ratios"], n_win=kw["n_win"], topks=kw["topks"],
                side_dwconv=kw["side_dwconv"], before_attn_dwconv=kw["before_attn_dwconv"], auto_pad=kw["auto_pad"],
                layer_scale_init_value=kw["layer_scale_init_value"], pre_norm=kw["pre_norm"],
                mlp_dwconv=kw["mlp_dwconv"], param_attention=kw["param_attention"],
                drop_path_rate=kw["drop_path_rate"])  # drop_rate: accepted and unused by the official class


def _official_stl_kwargs(kw: dict[str, Any], layout: str) -> dict[str, Any]:
    """Official ``BiFormerSTL``/``nchwBiFormerSTL`` kwargs -> zoo kwargs.

    ``qk_scale`` and ``drop_rate`` are accepted and ignored, as in the official classes (BasicLayer never passes
    ``qk_scale`` to its blocks; ``drop_rate`` is never used).
    """
    return dict(layout=layout, depths=kw["depth"], embed_dims=kw["embed_dim"], in_chans=kw["in_chans"],
                num_classes=kw["num_classes"], head_dim=kw["head_dim"], mlp_ratios=kw["mlp_ratios"],
                n_win=tuple(kw["n_wins"]), topks=tuple(kw["topks"]), side_dwconv=kw["side_dwconv"],
                before_attn_dwconv=0, norm_layer=kw["norm_layer"], pre_head_norm_layer=kw["pre_head_norm_layer"],
                drop_path_rate=kw["drop_path_rate"])


def build_from_official(cls: str, kwargs: dict[str, Any]) -> BiFormer:
    """Build the :class:`BiFormer` equivalent to an official ``BiFormer``/``BiFormerSTL``/``nchwBiFormerSTL``."""
    if cls not in _OFFICIAL_DEFAULTS:
        raise ValueError(f"cls={cls!r} is not an official BiFormer class; accepted: {list(_OFFICIAL_DEFAULTS)}")
    unknown = sorted(set(kwargs) - set(_OFFICIAL_DEFAULTS[cls]))
    if unknown:
        raise ValueError(f"unknown {cls} kwargs {unknown}; accepted: {sorted(_OFFICIAL_DEFAULTS[cls])}")
    kw = dict(_OFFICIAL_DEFAULTS[cls], **kwargs)
    zoo_kwargs = _official_biformer_kwargs(kw) if cls == "BiFormer" else _official_stl_kwargs(kw, _OFFICIAL_LAYOUT[cls])
    model = BiFormer(**zoo_kwargs)
    for i in kw["use_checkpoint_stages"]:  # the official fairscale checkpoint_wrapper of those stages
        model.stages[i].grad_checkpointing = True
    return model


register_converter(FAMILY, FamilyConverter(build_official=build_from_official,
                                           official_classes=tuple(_OFFICIAL_DEFAULTS)))
