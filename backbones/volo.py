"""VOLO: Vision Outlooker (Yuan, Hou, Jiang, Feng, Yan; TPAMI 2022, arXiv 2106.13112).

A conv stem (stride 8) feeds a stage of *Outlookers* (outlook attention: every 3x3 window predicts its own 9x9
attention matrix from its pooled features, see :func:`zoo.ops.outlook_attention`), a 2x2 patch merge (stride 16),
three stages of plain Transformer blocks, two CaiT class-attention blocks on a class token, and a token-labeling
auxiliary head: the evaluation logits are ``head(cls) + 0.5 * max_over_tokens(aux_head(tokens))``.

timm already registers VOLO under the official names (``volo_d1_224``, ...), so the zoo's models are named
``zoo_volo_d1_224`` ... ``zoo_volo_d5_512``. State-dict keys are the official (and timm) keys, so official release
files and timm checkpoints load unchanged.

Feature levels (``features_only=True``; ``forward_intermediates``), for the released configurations:

    level 0: outlooker stage output  (network.0)   stride 8,  embed_dims[0] channels
    level 1: first transformer stage (network.2)   stride 16, embed_dims[1] channels  (position embedding added)
    level 2: second transformer stage (network.3)  stride 16, embed_dims[2] channels
    level 3: third transformer stage (network.4)   stride 16, embed_dims[3] channels
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo import convert, registry
from zoo.ops import Mlp, SpaceToDepthConv2d, downsampled_attention, one_cast_per_forward, outlook_attention, split_qkv
from zoo.ops.block_graphs import run_block

from ._layers import (BlockSequence, ChannelsLastSequential, DeferredSumBlock, add_norm, check_images, init_linears,
                      projection_norm, unless_identity)

__all__ = ["VOLO", "OutlookAttention", "Outlooker", "Transformer", "ClassBlock"]

_FAMILY = "volo"


# ----------------------------------------------------------------------------------------------------------------
# blocks


def window_means(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The mean of each ``stride x stride`` window of a channels-last map, (B, H, W, C) -> (B, ceil(H/s), ceil(W/s),
    C): the official ``AvgPool2d(stride, stride, ceil_mode=True)`` (a part window past the edge averages its
    in-bounds values).

    Where the windows tile the map, a mean over a (B, H/s, s, W/s, s, C) view: PyTorch's channels-last average pool
    is far from memory bandwidth, its backward most (H100, bf16, VOLO-D2's (64, 28, 28, 256) at stride 2 in a
    training step: about 80 us forward and 230 backward a call), and the two agree up to the order of each window's
    sum.
    """
    if stride == 1:
        return x
    b, h, w, c = x.shape
    if h % stride or w % stride:
        return F.avg_pool2d(x.permute(0, 3, 1, 2), stride, stride, ceil_mode=True).permute(0, 2, 3, 1)
    return x.reshape(b, h // stride, stride, w // stride, stride, c).mean((2, 4))


class OutlookAttention(nn.Module):
    """Outlook attention on channels-last tokens: values and pooled-window logits, then :func:`outlook_attention`."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 1,
                 qkv_bias: bool = False, qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * num_heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        layers = self._modules  # (``self.v`` goes through nn.Module.__getattr__, which eager calls pay for)
        v = layers["v"](x)
        # one k^4-per-head logit vector per window, predicted from the window's average (a stride x stride pool)
        logits = layers["attn"](window_means(x, self.stride))
        x = outlook_attention(v, logits, self.num_heads, self.kernel_size, self.stride, self.padding,
                              scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        return unless_identity(layers["proj_drop"], layers["proj"](x))


class _PreNormBlock(DeferredSumBlock):
    """Pre-norm residual block: the given attention, then an MLP. Tokens (B, H, W, C).

    Keys ``norm1``, ``attn``, ``norm2``, ``mlp`` (the official blocks' names).
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float,
                 act_layer: Callable[..., nn.Module], norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.norm1 = projection_norm(norm_layer, dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = projection_norm(norm_layer, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)


class Outlooker(_PreNormBlock):
    """Outlook-attention block (stage 1)."""

    def __init__(self, dim: int, kernel_size: int, padding: int, stride: int = 1, num_heads: int = 1,
                 mlp_ratio: float = 3.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable[..., nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 qkv_bias: bool = False, qk_scale: float | None = None):
        attn = OutlookAttention(dim, num_heads, kernel_size=kernel_size, padding=padding, stride=stride,
                                qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop)
        super().__init__(dim, attn, mlp_ratio, drop_path, act_layer, norm_layer)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens of a (B, H, W, C) map."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, height, width, channels = x.shape
        layers = self._modules  # (``self.qkv`` goes through nn.Module.__getattr__, which eager calls pay for)
        qkv = layers["qkv"](x).reshape(b, height * width, 3 * channels)
        q, k, v = split_qkv(qkv, self.num_heads)
        # qkv: training's backward then writes the projection's gradient in one buffer
        x = downsampled_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale,
                                  qkv=qkv)
        x = x.transpose(1, 2).reshape(b, height, width, channels)
        return unless_identity(layers["proj_drop"], layers["proj"](x))


class Transformer(_PreNormBlock):
    """Self-attention block (stages 2-4)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable[..., nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop)
        super().__init__(dim, attn, mlp_ratio, drop_path, act_layer, norm_layer)


class ClassAttention(nn.Module):
    """CaiT class attention: the class token (first token) attends to every token, itself included."""

    def __init__(self, dim: int, num_heads: int = 8, head_dim: int | None = None, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.attn_drop = attn_drop
        inner = self.head_dim * num_heads
        self.kv = nn.Linear(dim, inner * 2, bias=qkv_bias)
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens, class token first -> (B, 1, C) class-token update."""
        b, n, _ = x.shape
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q(x[:, :1]).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        cls = downsampled_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        cls = cls.transpose(1, 2).reshape(b, 1, self.head_dim * self.num_heads)
        return unless_identity(self.proj_drop, self.proj(cls))


class ClassBlock(nn.Module):
    """Class-attention block: only the class token is updated; the other tokens pass through."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: Callable[..., nn.Module] = nn.GELU,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = projection_norm(norm_layer, dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                   attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = projection_norm(norm_layer, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        layers = self._modules  # (``self.attn`` goes through nn.Module.__getattr__, which eager calls pay for)
        drop_path = layers["drop_path"]
        cls, h = add_norm(layers["norm2"], x[:, :1], unless_identity(drop_path, layers["attn"](layers["norm1"](x))))
        cls = cls + unless_identity(drop_path, layers["mlp"](h))
        return torch.cat([cls, x[:, 1:]], dim=1)


class PatchEmbed(nn.Module):
    """Conv stem: 7x7/2 conv + two 3x3 convs (each BN-ReLU), then a (patch/2)-strided patch projection."""

    def __init__(self, patch_size: int = 8, in_chans: int = 3, hidden_dim: int = 64, embed_dim: int = 384):
        super().__init__()
        if patch_size not in (4, 8, 16):
            raise ValueError(f"patch_size must be 4, 8 or 16, got {patch_size}")
        self.conv = ChannelsLastSequential(  # the 7x7/2 conv on the image folded to 4x4/1 (zoo.ops.space_to_depth)
            SpaceToDepthConv2d(in_chans, hidden_dim, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, embed_dim, patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dim, H / patch_size, W / patch_size)."""
        return self.proj(self.conv(x))


class Downsample(nn.Module):
    """Patch merge between stages: a strided conv on channels-last tokens."""

    def __init__(self, in_dim: int, out_dim: int, patch_size: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H / p, W / p, C_out)."""
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------------
# model


def _per_stage(value: float | Sequence[float], n: int, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} must be a number or one value per stage ({n}), got {value}")
    return value


def _block_drop_rates(layers: Sequence[int], stage: int, drop_path_rate: float) -> list[float]:
    """Stochastic-depth rate of each block of a stage: linear in the block's global index, as the official code."""
    total = max(sum(layers) - 1, 1)
    start = sum(layers[:stage])
    return [drop_path_rate * (start + i) / total for i in range(layers[stage])]


class VOLO(nn.Module):
    """Vision Outlooker.

    Args:
        layers: blocks per stage (4 stages in the releases).
        img_size: input size; it fixes the position embedding grid (``img_size / patch_size / pooling_scale``).
        in_chans: input channels.
        num_classes: classes of ``head`` and ``aux_head``; 0 for no classifier.
        global_pool: ``"token"`` (class token, the official head), ``"avg"`` (mean of the patch tokens) or ``""``.
        patch_size: stem stride (4, 8 or 16).
        stem_hidden_dim: stem conv width (64; 128 for D5).
        embed_dims, num_heads: per stage.
        downsamples: per stage, whether a 2x2 patch merge follows it.
        outlook_attention: per stage, Outlooker blocks (True) or Transformer blocks (False).
        mlp_ratios: MLP expansion, one number or one per stage.
        qkv_bias, qk_scale: attention projection bias and logit scale (``head_dim ** -0.5`` when None).
        drop_rate: dropout on the pooled features before the head.
        pos_drop_rate: dropout after adding the position embedding (the official ``drop_rate``).
        attn_drop_rate, drop_path_rate: attention dropout and stochastic depth. As in the official code (and timm),
            Outlooker blocks get no stochastic depth; Transformer blocks get the linear schedule.
        norm_layer: token norm (nn.LayerNorm, eps 1e-5, in the releases).
        post_layers: class-attention blocks (``("ca", "ca")``) or None for no class token.
        use_aux_head: token-labeling head (the official ``return_dense``).
        use_mix_token: MixToken in :meth:`forward_train` (the official ``mix_token``).
        pooling_scale: total downsampling after the stem (sets the position embedding grid).
        out_kernel, out_stride, out_padding: outlook attention window, stride and padding.
        dynamic_img_size: accept inputs of other sizes by bicubic resizing of the position embedding (the official
            code only does this once, when loading a checkpoint into a model of another size).
    """

    def __init__(self, layers: Sequence[int], img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", patch_size: int = 8, stem_hidden_dim: int = 64,
                 embed_dims: Sequence[int] = (384, 384, 384, 384), num_heads: Sequence[int] = (12, 12, 12, 12),
                 downsamples: Sequence[bool] = (True, False, False, False),
                 outlook_attention: Sequence[bool] = (True, False, False, False),
                 mlp_ratios: float | Sequence[float] = 3.0, qkv_bias: bool = False, qk_scale: float | None = None,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 post_layers: Sequence[str] | None = ("ca", "ca"), use_aux_head: bool = True,
                 use_mix_token: bool = False, pooling_scale: int = 2, out_kernel: int = 3, out_stride: int = 2,
                 out_padding: int = 1, dynamic_img_size: bool = False):
        super().__init__()
        n = len(layers)
        for name, value in (("embed_dims", embed_dims), ("num_heads", num_heads), ("downsamples", downsamples),
                            ("outlook_attention", outlook_attention)):
            if len(value) != n:
                raise ValueError(f"{name} must have one entry per stage ({n}), got {tuple(value)}")
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not post_layers:
            raise ValueError("global_pool='token' needs the class token: give post_layers (e.g. ('ca', 'ca')) or "
                             "use global_pool='avg'")
        if downsamples[-1]:
            raise ValueError("downsamples[-1] must be False (there is no stage after the last one)")
        mlp_ratios = _per_stage(mlp_ratios, n, "mlp_ratios")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.pooling_scale = pooling_scale
        self.dynamic_img_size = dynamic_img_size
        self.use_aux_head = use_aux_head
        self.mix_token = use_mix_token
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, stem_hidden_dim, embed_dims[0])
        grid = (self.img_size[0] // patch_size // pooling_scale, self.img_size[1] // patch_size // pooling_scale)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dims[-1]))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        network: list[nn.Module] = []
        self.stage_ends: list[int] = []
        self.feature_info: list[dict[str, Any]] = []
        reduction = patch_size
        for i in range(n):
            network.append(self._make_stage(i, layers, embed_dims, num_heads, outlook_attention[i], mlp_ratios[i],
                                            qkv_bias, qk_scale, attn_drop_rate, drop_path_rate, norm_layer,
                                            out_kernel, out_stride, out_padding))
            self.stage_ends.append(len(network) - 1)
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction,
                                          module=f"network.{len(network) - 1}"))
            if downsamples[i]:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], 2))
                reduction *= 2
        self.network = nn.ModuleList(network)

        self.post_network = None
        self.cls_token = None
        if post_layers:
            for kind in post_layers:
                if kind != "ca":
                    raise ValueError(f"post_layers entries must be 'ca' (class attention), got {kind!r}")
            self.post_network = nn.ModuleList([
                ClassBlock(embed_dims[-1], num_heads[-1], mlp_ratio=mlp_ratios[-1], qkv_bias=qkv_bias,
                           qk_scale=qk_scale, attn_drop=attn_drop_rate, norm_layer=norm_layer)
                for _ in post_layers])
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))

        self.aux_head = nn.Linear(self.num_features, num_classes) if use_aux_head and num_classes > 0 else None
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @staticmethod
    def _make_stage(i, layers, embed_dims, num_heads, outlook, mlp_ratio, qkv_bias, qk_scale, attn_drop_rate,
                    drop_path_rate, norm_layer, out_kernel, out_stride, out_padding) -> BlockSequence:
        if outlook:
            # the official code passes no drop_path_rate to the outlooker stage: its blocks never drop
            return BlockSequence(*[
                Outlooker(embed_dims[i], out_kernel, out_padding, stride=out_stride, num_heads=num_heads[i],
                          mlp_ratio=mlp_ratio, attn_drop=attn_drop_rate, norm_layer=norm_layer, qkv_bias=qkv_bias,
                          qk_scale=qk_scale)
                for _ in range(layers[i])])
        return BlockSequence(*[
            Transformer(embed_dims[i], num_heads[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                        attn_drop=attn_drop_rate, drop_path=dpr, norm_layer=norm_layer)
            for dpr in _block_drop_rates(layers, i, drop_path_rate)])

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        init_linears(self)

    # ---- timm interface ---------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (stem, network blocks, class blocks + norm)."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^network\.(\d+)\.(\d+)", None), (r"^network\.(\d+)", (0,))],
            blocks2=[(r"^cls_token", (0,)), (r"^post_network\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage and class block in the backward pass instead of storing activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The class-token classifier."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace ``head`` (and ``aux_head``) with fresh ``num_classes``-way classifiers (0 removes them)."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs the class token, which this model does not have")
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.patch_embed.proj.weight
        dd = dict(device=like.device, dtype=like.dtype)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.aux_head = (nn.Linear(self.num_features, num_classes, **dd)
                         if self.use_aux_head and num_classes > 0 else None)
        self.head.train(self.training)
        if self.aux_head is not None:
            self.aux_head.train(self.training)

    # ---- forward ----------------------------------------------------------------------------------------------

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add the position embedding to (B, H, W, C) tokens, resizing it when allowed."""
        grid = tuple(self.pos_embed.shape[1:3])
        if tuple(x.shape[1:3]) == grid:
            return unless_identity(self.pos_drop, x + self.pos_embed)
        if not self.dynamic_img_size:
            stride = self.patch_size * self.pooling_scale
            size = (x.shape[1] * stride, x.shape[2] * stride)
            raise ValueError(f"input of about {size[0]}x{size[1]} pixels does not fit img_size={self.img_size}: the "
                             f"position embedding is {grid[0]}x{grid[1]}, the tokens are "
                             f"{x.shape[1]}x{x.shape[2]}; build the model with img_size={size} or "
                             "dynamic_img_size=True")
        pos = F.interpolate(self.pos_embed.permute(0, 3, 1, 2), size=tuple(x.shape[1:3]), mode="bicubic",
                            align_corners=False)
        return unless_identity(self.pos_drop, x + pos.permute(0, 2, 3, 1))

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return run_block(block, block, x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stem output (B, H, W, C0) -> tokens of the last stage (B, N, C)."""
        for idx, block in enumerate(self.network):
            if idx == 2:  # the official code adds the position embedding before network[2] (after the merge)
                x = self._pos_embed(x)
            x = self._run(block, x)
        return x.flatten(1, 2)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and run the class-attention blocks: (B, N, C) -> (B, 1 + N, C)."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.post_network:
            x = self._run(block, x)
        return x

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "VOLO")
        return self.patch_embed(x).permute(0, 2, 3, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> normed tokens (B, 1 + N, C) (class token first; (B, N, C) without one)."""
        x = self.forward_tokens(self._embed(x))
        if self.post_network is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self._num_prefix_tokens:].mean(dim=1)
        return x

    @property
    def _num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1 + N, C) -> logits (B, num_classes), or the pooled (B, C) features with ``pre_logits``.

        With the token-labeling head and class-token pooling the logits are
        ``head(cls) + 0.5 * max_over_tokens(aux_head(tokens))``, the official evaluation output.
        """
        pooled = self.head_drop(self._pool(x))
        if pre_logits:
            return pooled
        logits = self.head(pooled)
        if self.aux_head is not None and self.global_pool == "token":
            logits = logits + 0.5 * self.aux_head(x[:, 1:]).amax(dim=1)
        return logits

    @one_cast_per_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> logits (B, num_classes) (the official evaluation output, in any mode)."""
        return self.forward_head(self.forward_features(x))

    @one_cast_per_forward
    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
        """The official token-labeling training forward.

        Returns ``(cls_logits (B, classes), aux_logits (B, N, classes), box)``. With ``use_mix_token`` in training
        mode, a random box of the stride-16 token grid (``box = (row0, col0, row1, col1)``) is swapped between each
        image and the batch-reversed one before the blocks, and swapped back in ``aux_logits``, so that dense
        targets stay aligned; otherwise ``box = (0, 0, 0, 0)``.
        """
        if self.aux_head is None or self.global_pool != "token":
            raise RuntimeError("forward_train needs the class token and the token-labeling head (use_aux_head=True, "
                               "num_classes > 0, global_pool='token')")
        x = self._embed(x)
        rows, cols = x.shape[1] // self.pooling_scale, x.shape[2] // self.pooling_scale  # the final token grid
        box = (0, 0, 0, 0)
        if self.mix_token and self.training:
            box = self._random_box(rows, cols)
            x = _swap_box(x, tuple(c * self.pooling_scale for c in box))
        x = self.norm(self.forward_cls(self.forward_tokens(x)))
        cls_logits = self.head(self.head_drop(x[:, 0]))
        aux = self.aux_head(x[:, 1:])
        if box != (0, 0, 0, 0):
            aux = _swap_box(aux.unflatten(1, (rows, cols)), box).flatten(1, 2)
        return cls_logits, aux, box

    @staticmethod
    def _random_box(rows: int, cols: int) -> tuple[int, int, int, int]:
        """The official MixToken box: side fraction sqrt(1 - lam), lam ~ Beta(1, 1), centre uniform, clipped."""
        lam = float(torch.rand(()))
        cut = math.sqrt(1.0 - lam)
        cut_r, cut_c = int(rows * cut), int(cols * cut)
        cr, cc = int(torch.randint(rows, ())), int(torch.randint(cols, ()))
        clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
        return clip(cr - cut_r // 2, rows), clip(cc - cut_c // 2, cols), clip(cr + cut_r // 2, rows), \
            clip(cc + cut_c // 2, cols)

    # ---- features ---------------------------------------------------------------------------------------------

    @one_cast_per_forward
    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-level feature maps (B, C_i, H / r_i, W / r_i) (see the module docstring for the levels).

        Args:
            indices: levels to return: the last ``n`` if an int, all if None, else the listed ones.
            norm: apply the final norm to levels of ``num_features`` channels after the position embedding.
            stop_early: stop after the last requested level.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the list of maps; else ``(final normed tokens, maps)``.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_blocks = {self.stage_ends[i] for i in take}
        last_block = self.stage_ends[max_index]
        x = self._embed(x)
        network = self.network[:last_block + 1] if stop_early or intermediates_only else self.network
        maps = []
        for idx, block in enumerate(network):
            if idx == 2:
                x = self._pos_embed(x)
            x = self._run(block, x)
            if idx in take_blocks:
                y = self.norm(x) if norm and idx >= 2 and x.shape[-1] == self.num_features else x
                maps.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return maps
        if len(network) < len(self.network):
            return x, maps
        x = x.flatten(1, 2)
        if self.post_network is not None:
            x = self.forward_cls(x)
        return self.norm(x), maps

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks (and head) not needed to compute the requested levels; returns the level indices."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        last_block = self.stage_ends[max_index]
        truncated = last_block < len(self.network) - 1
        self.network = self.network[:last_block + 1]
        if last_block < 2:  # no position embedding, and the final norm's width no longer applies
            self.pos_embed = None
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or truncated:
            self.post_network = None
            self.cls_token = None
            self.use_aux_head = False
            self.global_pool = "avg" if self.global_pool == "token" else self.global_pool
            self.reset_classifier(0)
        return take


def _swap_box(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Replace a (row0, col0, row1, col1) box of (B, H, W, C) tokens by the same box of the batch-reversed tokens."""
    r0, c0, r1, c1 = box
    out = x.clone()
    out[:, r0:r1, c0:c1] = x.flip(0)[:, r0:r1, c0:c1]
    return out


# ----------------------------------------------------------------------------------------------------------------
# official constructor and checkpoints

# the official VOLO.__init__ defaults (sail-sg/volo models/volo.py)
_OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    img_size=224, in_chans=3, num_classes=1000, patch_size=8, stem_hidden_dim=64, embed_dims=None, num_heads=None,
    downsamples=None, outlook_attention=None, mlp_ratios=None, qkv_bias=False, qk_scale=None, drop_rate=0.0,
    attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, post_layers=None, return_mean=False,
    return_dense=True, mix_token=True, pooling_scale=2, out_kernel=3, out_stride=2, out_padding=1)

_SAME_NAME = ("layers", "img_size", "in_chans", "num_classes", "patch_size", "stem_hidden_dim", "embed_dims",
              "num_heads", "downsamples", "outlook_attention", "mlp_ratios", "qkv_bias", "qk_scale",
              "attn_drop_rate", "drop_path_rate", "norm_layer", "post_layers", "pooling_scale", "out_kernel",
              "out_stride", "out_padding")


def official_to_zoo_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map the official ``VOLO(**kwargs)`` arguments onto :class:`VOLO`'s (official defaults filled in)."""
    unknown = sorted(set(kwargs) - set(_OFFICIAL_DEFAULTS) - {"layers"})
    if unknown:
        raise ValueError(f"unknown official VOLO kwargs {unknown}; accepted: {['layers', *_OFFICIAL_DEFAULTS]}")
    if "layers" not in kwargs:
        raise ValueError("official VOLO kwargs need 'layers'")
    full = dict(_OFFICIAL_DEFAULTS, **kwargs)
    for name in ("embed_dims", "num_heads", "downsamples", "outlook_attention", "mlp_ratios"):
        if full[name] is None:
            raise ValueError(f"official VOLO kwarg {name!r} is required (the official class fails without it)")
    if full["return_mean"] and full["return_dense"]:
        raise ValueError("official VOLO kwargs return_mean=True and return_dense=True conflict (the official class "
                         "asserts the same)")
    if not full["return_mean"] and not full["post_layers"]:
        raise ValueError("official VOLO without post_layers and return_mean=False classifies its first patch token; "
                         "that configuration is not supported")
    out = {k: full[k] for k in _SAME_NAME}
    out.update(global_pool="avg" if full["return_mean"] else "token", use_aux_head=bool(full["return_dense"]),
               use_mix_token=bool(full["mix_token"]), pos_drop_rate=full["drop_rate"])
    return out


def _build_official(cls_name: str, kwargs: dict[str, Any]) -> nn.Module:
    return VOLO(**official_to_zoo_kwargs(kwargs))


def resize_pos_embed_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize a checkpoint's ``pos_embed`` (1, H, W, C) to the model's grid, bicubic, as the official loader does.

    Lets a 224 checkpoint initialise a 384 model (fine-tuning at another resolution).
    """
    pos = state_dict.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape or pos.ndim != 4 or pos.shape[-1] != own.shape[-1]:
        return state_dict
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=tuple(own.shape[1:3]), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1).to(pos.dtype)
    return {**state_dict, "pos_embed": resized}


convert.register_converter(_FAMILY, convert.FamilyConverter(
    key_map=lambda sd: dict(sd),  # zoo keys are the official (and timm) keys
    build_official=_build_official,
    official_classes=("VOLO",),
    fit_to_model=resize_pos_embed_to_model,
))


# ----------------------------------------------------------------------------------------------------------------
# variants

registry.register_family(
    _FAMILY,
    paper="VOLO: Vision Outlooker for Visual Recognition",
    paper_url="https://arxiv.org/abs/2106.13112",
    code_url="https://github.com/sail-sg/volo",
    license="apache-2.0",
)

_D1 = dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12))
_D2 = dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D3 = dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D4 = dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16))
_D5 = dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16), mlp_ratios=4.0,
           stem_hidden_dim=128)

# name: (architecture, resolution, official release file, crop_pct). crop_pct follows timm's validated cfgs (the
# official default_cfgs use 0.96 for D1-D3 and 1.15 for D4-D5 at every resolution).
_RELEASES = {
    "zoo_volo_d1_224": (_D1, 224, "d1_224_84.2.pth.tar", 0.96),
    "zoo_volo_d1_384": (_D1, 384, "d1_384_85.2.pth.tar", 1.0),
    "zoo_volo_d2_224": (_D2, 224, "d2_224_85.2.pth.tar", 0.96),
    "zoo_volo_d2_384": (_D2, 384, "d2_384_86.0.pth.tar", 1.0),
    "zoo_volo_d3_224": (_D3, 224, "d3_224_85.4.pth.tar", 0.96),
    "zoo_volo_d3_448": (_D3, 448, "d3_448_86.3.pth.tar", 1.0),
    "zoo_volo_d4_224": (_D4, 224, "d4_224_85.7.pth.tar", 0.96),
    "zoo_volo_d4_448": (_D4, 448, "d4_448_86.79.pth.tar", 1.15),
    "zoo_volo_d5_224": (_D5, 224, "d5_224_86.10.pth.tar", 0.96),
    "zoo_volo_d5_448": (_D5, 448, "d5_448_87.0.pth.tar", 1.15),
    "zoo_volo_d5_512": (_D5, 512, "d5_512_87.07.pth.tar", 1.15),
}

VARIANTS: dict[str, dict[str, Any]] = {name: dict(arch, img_size=res) for name, (arch, res, _, _) in _RELEASES.items()}

_RELEASE_URL = "https://github.com/sail-sg/volo/releases/download/volo_1/"


def _cfg(res: int, crop_pct: float, **source: str) -> dict[str, Any]:
    return dict(
        **source, num_classes=1000, input_size=(3, res, res), pool_size=None, crop_pct=crop_pct,
        interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.conv.0", classifier=("head", "aux_head"), license="apache-2.0",
        paper_ids="arXiv:2106.13112", paper_name="VOLO: Vision Outlooker for Visual Recognition",
        origin_url="https://github.com/sail-sg/volo",
    )


# Tags: "sail_in1k" is the authors' release file (the default); "sail_in1k_timm" is timm's copy of the same weights
# on the Hugging Face hub (model.safetensors). Both are in the weights manifest.
default_cfgs = generate_default_cfgs({
    **{f"{name}.sail_in1k": _cfg(res, crop, url=_RELEASE_URL + file)
       for name, (_, res, file, crop) in _RELEASES.items()},
    **{f"{name}.sail_in1k_timm": _cfg(res, crop, hf_hub_id=f"timm/{name.removeprefix('zoo_')}.sail_in1k")
       for name, (_, res, _, crop) in _RELEASES.items()},
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VOLO:
    return registry.build_zoo_model(VOLO, variant, pretrained, family=_FAMILY,
                                    feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


registry.register_variants(_FAMILY, __name__, VARIANTS, _create)
