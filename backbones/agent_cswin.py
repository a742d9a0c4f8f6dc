"""Agent-CSwin: CSWin Transformer with agent attention (Han et al., ECCV 2024), LeapLabTHU/Agent-Attention
``agent_cswin.py``.

Each block projects q, k, v once and runs one global branch, or two cross-shaped branches on the two channel
halves (half the heads each): column stripes ``(H, split)`` and row stripes ``(split, W)``. ``attn_type`` has one
letter per stage: ``A`` agent attention with stripe width ``la_split_size`` (the released models use the full stage
size: one global branch), ``B`` CSWin's stripe attention with LePE and width ``split_size``; the last stage is
always one global branch. ``M`` + digits mixes them as in Agent-Swin.

Stripe attention runs through :func:`zoo.ops.window_attention` (rectangular windows) and agent attention through
:func:`zoo.ops.agent_attention`; both add the depthwise 3x3 conv of the values computed per window (``get_v``,
CSWin's LePE) through :func:`zoo.ops.depthwise_conv`. State-dict keys equal the official ones.

Other input sizes work as in the official dense-prediction backbones: agent biases are bilinearly resized to the
actual window size (Agent-Swin's detection backbone), stripes that do not divide the map zero-pad q, k, v
symmetrically and crop the output (CSWin's segmentation backbone).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices

from ._layers import (DeferredSumBlock, add_norm, channels_last_intermediates, check_images, init_linears, norm_of_sum,
                      projection_norm, run_blocks, unless_identity)
from ._heads import PooledLinearHeadMixin
from zoo.ops import Mlp, SpaceToDepthConv2d, agent_attention, depthwise_conv, window_attention
from zoo.ops.autocast_cache import autocast_weights, one_cast_per_forward
from zoo.ops.depthwise_conv import channels_innermost
from zoo.ops.window import window_partition, window_reverse
from zoo.registry import build_zoo_model, register_variants

from ._agent_common import (AGENT_BIAS_NAMES, FAMILY, agent_biases, agent_cfg, agent_grid, as_int_list,
                            init_agent_biases, pool_agent_tokens, register_official_builder, to_2tuple)
from .agent_swin import parse_attn_types

__all__ = ["AgentCSWinTransformer", "CSWinBlock", "LePEAttention", "AgentAttention", "MergeBlock"]

# Branch index as in the official code: -1 global, 0 column stripes (H, split), 1 row stripes (split, W).
_GLOBAL, _COLUMNS, _ROWS = -1, 0, 1


def _branch_window(idx: int, size: tuple[int, int], split: int) -> tuple[int, int]:
    h, w = size
    return {_GLOBAL: (h, w), _COLUMNS: (h, split), _ROWS: (split, w)}[idx]


def _pad_centered(x: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, H, W, C) symmetrically to multiples of ``window``; returns the map and the (top, left) pad."""
    h, w = x.shape[1:3]
    pad_h, pad_w = -h % window[0], -w % window[1]
    if not (pad_h or pad_w):
        return x, (0, 0)
    top, left = pad_h // 2, pad_w // 2
    return F.pad(x, (0, 0, left, pad_w - left, top, pad_h - top)), (top, left)


class _Branch(nn.Module):
    """What both branch kinds share: the window geometry and the per-window LePE conv ``get_v``."""

    def __init__(self, dim: int, resolution: tuple[int, int], idx: int, split_size: int, num_heads: int):
        super().__init__()
        if idx not in (_GLOBAL, _COLUMNS, _ROWS):
            raise ValueError(f"idx must be -1 (global), 0 (columns) or 1 (rows), got {idx!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.idx, self.split_size = idx, split_size
        self.window_size = _branch_window(idx, tuple(resolution), split_size)  # at the construction size
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def lepe(self, v: torch.Tensor, window: tuple[int, int], residual: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise conv of the values inside each window (zero padding at window borders), plus ``residual`` when
        given (added by the conv's kernel): v, residual (B, H, W, C) -> (B, H, W, C)."""
        h, w = v.shape[1:3]
        windows = None if residual is None else window_partition(residual, window)
        get_v = self._modules["get_v"]  # (``self.get_v`` goes through nn.Module.__getattr__: eager calls pay)
        conv = depthwise_conv(window_partition(v, window), *autocast_weights(get_v, channels_innermost),
                              residual=windows)
        return window_reverse(conv, window, h, w)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, W, C) -> (B, H, W, C): the attention output plus the LePE term."""
        h, w = q.shape[1:3]
        window = _branch_window(self.idx, (h, w), self.split_size)
        (q, (top, left)), (k, _), (v, _) = (_pad_centered(t, window) for t in (q, k, v))
        out = self.attend(q, k, v, window)
        if window[1] == out.shape[2]:
            # row stripes or the whole map: the windows are views of the output, so the conv's kernel adds it (one
            # launch fewer, and no add node in training)
            out = self.lepe(v, window, residual=out)
        else:  # column stripes: their windows of the output would be a copy, which costs what the add does
            out = out + self.lepe(v, window)
        return out[:, top:top + h, left:left + w]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


class LePEAttention(_Branch):
    """CSWin stripe attention with locally-enhanced positional encoding (official ``LePEAttention``)."""

    def __init__(self, dim: int, resolution: tuple[int, int], idx: int, split_size: int = 7, num_heads: int = 8,
                 attn_drop: float = 0., qk_scale: float | None = None):
        super().__init__(dim, resolution, idx, split_size, num_heads)
        self.scale = qk_scale or self.head_dim ** -0.5
        self.attn_drop = attn_drop

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """Softmax attention within each ``window`` stripe: q, k, v (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, heads, H, W, d)
            return t.view(b, h, w, self.num_heads, self.head_dim).permute(0, 3, 1, 2, 4)

        out = window_attention(heads(q), heads(k), heads(v), window, scale=self.scale,
                               dropout_p=self.attn_drop if self.training else 0.0)
        return out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)


class AgentAttention(_Branch):
    """Agent attention inside each stripe/window (official ``AgentAttention`` of ``agent_cswin.py``).

    The agent biases are sized for the construction window; another window size resizes them bilinearly.
    """

    def __init__(self, dim: int, resolution: tuple[int, int], idx: int, split_size: int = 7, num_heads: int = 8,
                 attn_drop: float = 0., agent_num: int = 49):
        super().__init__(dim, resolution, idx, split_size, num_heads)
        self.scale = self.head_dim ** -0.5  # the official code ignores qk_scale here
        self.attn_drop = attn_drop
        self.agent_num = agent_num
        self.agent_grid = agent_grid(agent_num)
        init_agent_biases(self, num_heads, agent_num, self.window_size, self.window_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """Agent attention within each ``window`` stripe: q, k, v (B, H, W, C) -> (B, H, W, C)."""
        h, w, c = q.shape[1:]
        n = window[0] * window[1]
        qw, kw, vw = (window_partition(t, window).reshape(-1, n, c) for t in (q, k, v))
        agents = pool_agent_tokens(qw, window, self.agent_grid)
        agent_bias, query_bias = agent_biases(self, window, window)
        out = agent_attention(
            self._heads(qw), self._heads(kw), self._heads(vw), self._heads(agents), scale=self.scale,
            agent_bias=agent_bias, query_bias=query_bias, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(-1, *window, c)
        return window_reverse(out, window, h, w)


class CSWinBlock(DeferredSumBlock):
    """Pre-norm CSWin block: shared qkv, one global or two stripe branches, projection, MLP (official keys)."""

    def __init__(self, dim: int, reso: tuple[int, int], num_heads: int, split_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = False, qk_scale: float | None = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer: Callable[..., nn.Module] = nn.GELU,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, last_stage: bool = False,
                 agent_num: int = 49, attn_type: str = "A"):
        super().__init__()
        if attn_type not in ("A", "B"):
            raise ValueError(f"attn_type must be 'A' (agent) or 'B' (LePE stripes), got {attn_type!r}")
        reso = tuple(reso)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = projection_norm(norm_layer, dim)
        # A stripe as wide as the stage is one global branch (official: resolution == split_size).
        last_stage = last_stage or split_size >= max(reso)
        self.branch_num = 1 if last_stage else 2
        self.proj = nn.Linear(dim, dim)
        if last_stage:
            specs = [(dim, num_heads, _GLOBAL)]
        else:
            specs = [(dim // 2, num_heads // 2, idx) for idx in (_COLUMNS, _ROWS)]
        if attn_type == "A":
            self.attns = nn.ModuleList([AgentAttention(d, reso, idx, split_size, h, attn_drop, agent_num)
                                        for d, h, idx in specs])
        else:
            self.attns = nn.ModuleList([LePEAttention(d, reso, idx, split_size, h, attn_drop, qk_scale)
                                        for d, h, idx in specs])
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, act_layer=act_layer, drop=drop)
        self.norm2 = projection_norm(norm_layer, dim)

    def forward_deferred(self, x: torch.Tensor, branch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x + branch`` (on ``x`` when ``branch`` is None), (B, H, W, C): ``(x', branch')``, whose
        sum is its output (see :class:`~zoo.backbones._layers.DeferredSumBlock`)."""
        b, h, w, c = x.shape
        layers = self._modules  # (``self.qkv`` goes through nn.Module.__getattr__, which eager calls pay for)
        attns, drop_path = layers["attns"], layers["drop_path"]
        x, normed = norm_of_sum(layers["norm1"], x, branch)
        q, k, v = layers["qkv"](normed).view(b, h, w, 3, c).unbind(3)
        if self.branch_num == 2:
            half = c // 2
            out = torch.cat([attns[0](q[..., :half], k[..., :half], v[..., :half]),
                             attns[1](q[..., half:], k[..., half:], v[..., half:])], dim=-1)
        else:
            out = attns[0](q, k, v)
        # The official block has a proj_drop module but never applies it; neither do we.
        x, h = add_norm(layers["norm2"], x, unless_identity(drop_path, layers["proj"](out)))
        return x, unless_identity(drop_path, layers["mlp"](h))


class MergeBlock(nn.Module):
    """3x3 stride-2 conv + LayerNorm between stages (official ``Merge_Block``; its norm is always nn.LayerNorm)."""

    def __init__(self, dim: int, dim_out: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)."""
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class _ToChannelsLast(nn.Module):
    """(B, C, H, W) -> (B, H, W, C); sits where the official stem has its ``Rearrange`` (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------------
# Model

class AgentCSWinTransformer(PooledLinearHeadMixin, nn.Module):
    """Agent-CSwin (official ``CSWinTransformer`` of ``agent_cswin.py``), with timm's backbone interface.

    Args:
        img_size: construction input size; sizes the global/stripe windows and the agent biases.
        in_chans: input channels.
        num_classes: classifier size (0: no classifier).
        global_pool: ``'avg'`` (official) or ``''``.
        embed_dim: channels of stage 1 (doubled per stage).
        depth, num_heads: blocks and heads per stage.
        split_size: stripe width of the LePE (``B``) blocks per stage.
        la_split_size: stripe width of the agent (``A``) blocks per stage, e.g. ``'56-28-14-7'`` (global at 224).
        mlp_ratio, qkv_bias: MLP expansion, qkv bias.
        qk_scale: LePE logit scale override (agent attention always uses head_dim ** -0.5).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (linear).
        norm_layer: block and final norm constructor (nn.LayerNorm); stem and merge norms are always nn.LayerNorm.
        agent_num: agents per stage (perfect squares), e.g. ``(9, 16, 49, 49)`` or ``'9-16-49-49'``.
        attn_type: per-stage attention, e.g. ``'AABB'`` (``M`` + digits mixes, as in Agent-Swin).
    """

    pool_dims = (1, 2)  # forward_features gives a channels-last map

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dim: int = 96, depth: tuple[int, ...] = (2, 2, 6, 2),
                 split_size: Any = (1, 2, 7, 7), la_split_size: Any = "1-2-7-7",
                 num_heads: tuple[int, ...] = (2, 4, 8, 16), mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., norm_layer: Callable[..., nn.Module] | None = None,
                 agent_num: Any = (49, 49, 49, 49), attn_type: str = "AAAA"):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if len(depth) != 4 or len(num_heads) != 4:
            raise ValueError(f"depth and num_heads need 4 stages, got depth={list(depth)}, "
                             f"num_heads={list(num_heads)}")
        img_size = to_2tuple(img_size, "img_size")
        norm_layer = norm_layer or nn.LayerNorm
        splits = as_int_list(split_size, 4, "split_size")
        la_splits = as_int_list(la_split_size, 4, "la_split_size")
        agent_nums = as_int_list(agent_num, 4, "agent_num")
        attn_types = parse_attn_types(attn_type, depth)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = embed_dim * 8
        self.grad_checkpointing = False
        self._num_stages = 4  # fewer after prune_intermediate_layers

        # the 7x7/4 conv on the image folded to 2x2/1 over its 4x4 blocks (zoo.ops.space_to_depth)
        self.stage1_conv_embed = nn.Sequential(SpaceToDepthConv2d(in_chans, embed_dim, 7, 4, 2), _ToChannelsLast(),
                                               nn.LayerNorm(embed_dim))
        dpr = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()  # also under a meta device
        self.feature_info = []
        dim = embed_dim
        for i in range(4):
            if i > 0:
                setattr(self, f"merge{i}", MergeBlock(dim, dim * 2))
                dim *= 2
            reso = (img_size[0] // 2 ** (i + 2), img_size[1] // 2 ** (i + 2))
            start = sum(depth[:i])
            blocks = [CSWinBlock(dim, reso, num_heads[i], la_splits[i] if kind == "A" else splits[i], mlp_ratio,
                                 qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[start + j],
                                 norm_layer=norm_layer, last_stage=i == 3, agent_num=agent_nums[i], attn_type=kind)
                      for j, kind in enumerate(attn_types[i])]
            setattr(self, f"stage{i + 1}", nn.ModuleList(blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stage{i + 1}"))
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        init_linears(self)  # convs keep PyTorch's default, as in the official code

    # --- timm interface -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The agent position biases, kept out of weight decay."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in AGENT_BIAS_NAMES}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (stem, blocks in order, final norm)."""
        return dict(
            stem=r"^stage1_conv_embed",
            # (99999,) is timm's "join the previous group": coarse groups are a stage with the merge after it.
            blocks=[(r"^stage(\d+)\.", None), (r"^merge(\d+)", (99999,)), (r"^norm", (99999,))] if coarse else [
                (r"^stage(\d+)\.(\d+)", None),
                (r"^merge(\d+)", (99998,)),  # merge k follows stage k's blocks
                (r"^norm", (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save memory."""
        self.grad_checkpointing = enable

    # --- forward --------------------------------------------------------------------------------------------------
    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Merge (stages 2-4) and blocks of stage ``i`` (0-based) on a (B, H, W, C) map."""
        if i == 0:
            check_images(x, "Agent-CSWin", 32, "total stride")
            x = self.stage1_conv_embed(x)
        else:
            x = getattr(self, f"merge{i}")(x)
        return run_blocks(getattr(self, f"stage{i + 1}"), x, checkpointing=self.grad_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, H/32, W/32, num_features) normalised channels-last map."""
        for i in range(self._num_stages):
            x = self._stage(i, x)
        return self.norm(x)

    @one_cast_per_forward
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense tasks (timm's contract; the arguments are
        :func:`zoo.backbones._layers.channels_last_intermediates`'s)."""
        return channels_last_intermediates(self._stage, self._num_stages, self.norm, x, indices, norm, stop_early,
                                           output_fmt, intermediates_only)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and merges) after the last requested one, the norm and the head; returns the kept
        indices."""
        take, max_index = feature_take_indices(self._num_stages, indices)
        for i in range(max_index + 1, 4):
            setattr(self, f"merge{i}", None)
            setattr(self, f"stage{i + 1}", nn.ModuleList())
        self._num_stages = max_index + 1
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# ----------------------------------------------------------------------------------------------------------------
# Variants (official factories Agent_CSWin_*, README configs cfgs/agent_cswin_*.yaml) and pretrained configs.

_COMMON = dict(mlp_ratio=4., qkv_bias=True, agent_num=(9, 16, 49, 49), attn_type="AABB")
VARIANTS: dict[str, dict[str, Any]] = {
    "agent_cswin_t": dict(_COMMON, embed_dim=64, depth=(2, 4, 18, 1), split_size=(1, 2, 7, 7),
                          la_split_size=(56, 28, 14, 7), num_heads=(2, 4, 8, 16), drop_path_rate=0.2),
    "agent_cswin_s": dict(_COMMON, embed_dim=64, depth=(3, 6, 29, 2), split_size=(1, 2, 7, 7),
                          la_split_size=(56, 28, 14, 7), num_heads=(2, 4, 8, 16), drop_path_rate=0.4),
    "agent_cswin_b": dict(_COMMON, embed_dim=96, depth=(3, 6, 29, 2), split_size=(1, 2, 7, 7),
                          la_split_size=(56, 28, 14, 7), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "agent_cswin_b_384": dict(_COMMON, img_size=384, embed_dim=96, depth=(3, 6, 29, 2), split_size=(1, 2, 12, 12),
                              la_split_size=(96, 48, 24, 12), num_heads=(4, 8, 16, 32), drop_path_rate=0.7),
}

def _cfg(file_id: str, **kwargs: Any) -> dict[str, Any]:
    return agent_cfg(file_id, "stage1_conv_embed.0", **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_cswin_t.in1k": _cfg("8c562a74441e46d5902b"),
    "agent_cswin_s.in1k": _cfg("30eb8af675bc4b7a8747"),
    "agent_cswin_b.in1k": _cfg("c8035b0839b2410c8c9f"),
    "agent_cswin_b_384.in1k": _cfg("1239be0df44b47719432", input_size=(3, 384, 384), pool_size=(12, 12)),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentCSWinTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_zoo_model(AgentCSWinTransformer, variant, pretrained, family=FAMILY,
                           feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


register_variants(FAMILY, __name__, VARIANTS, _create)


# ----------------------------------------------------------------------------------------------------------------
# Official constructor -> zoo model.

def _from_official(kwargs: dict[str, Any]) -> AgentCSWinTransformer:
    """Build from the official ``CSWinTransformer(**kwargs)`` of ``agent_cswin.py`` (objects already resolved)."""
    kw = dict(kwargs)
    kw.pop("patch_size", None)  # the official class ignores it: the stem is always a 7x7 stride-4 conv
    if kw.pop("hybrid_backbone", None) is not None:
        raise ValueError("hybrid_backbone must be None: the official class never uses it")
    use_checkpoint = bool(kw.pop("use_chk", False))
    model = AgentCSWinTransformer(**kw)
    model.set_grad_checkpointing(use_checkpoint)
    return model


register_official_builder("CSWinTransformer", _from_official)
