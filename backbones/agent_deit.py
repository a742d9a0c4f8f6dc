"""Agent-DeiT: DeiT with agent attention (Han et al., ECCV 2024), LeapLabTHU/Agent-Attention ``agent_deit.py``.

The first ``agent_layer`` blocks (all of them for T/S, four for B) replace softmax attention with agent attention:
``A`` agents average-pooled from the patch queries, agent biases (including the class-token biases
``ac_bias``/``ca_bias``), agent attention, and a depthwise 3x3 conv of the patch values added to the patch
outputs, all in :func:`zoo.ops.pooled_agent_attention`. The other blocks are plain DeiT blocks. State-dict keys
equal the official ones.

The biases and the position embedding are sized for the construction ``img_size``; another input size (a multiple
of the patch size) interpolates both bilinearly to the actual patch grid, as the official dense-prediction
backbones do for the biases.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices

from zoo.ops import Mlp, as_patch_conv, downsampled_attention, pooled_agent_attention
from zoo.ops.autocast_cache import autocast_weights, one_cast_per_forward
from zoo.ops.depthwise_conv import channels_innermost
from zoo.registry import build_zoo_model, register_variants

from ._layers import DeferredSumBlock, check_images, init_linears, projection_norm, run_blocks, unless_identity
from ._agent_common import (FAMILY, agent_biases, agent_cfg, agent_grid, as_int_list, init_agent_biases,
                            register_official_builder, to_2tuple)

__all__ = ["AgentVisionTransformer", "AgentAttention", "AgentBlock", "Attention", "Block"]

# Official agent count per block: block i uses agent_num[_AGENT_STAGE[i // 2]] (blocks 0-1 -> stage 0, ...).
# The official table stops at 12 blocks (KeyError beyond); deeper models keep the last stage's count.
_AGENT_STAGE = (0, 1, 2, 2, 2, 3)


class AgentAttention(nn.Module):
    """Agent attention over a class token plus an (H, W) patch grid."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., agent_num: int = 49, grid_size: tuple[int, int] = (14, 14)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5  # the official code ignores any qk_scale here
        self.agent_num = agent_num
        self.agent_grid = agent_grid(agent_num)
        self.grid_size = tuple(grid_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        init_agent_biases(self, num_heads, agent_num, self.grid_size, self.grid_size, cls_token=True)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 1 + H*W, C) -> (B, 1 + H*W, C); ``grid`` is (H, W), the construction grid when None."""
        b, n, c = x.shape
        grid = tuple(grid) if grid is not None else self.grid_size
        layers = self._modules  # (``self.qkv`` goes through nn.Module.__getattr__, which eager calls pay for)
        # one head split for q, k and v (each a (B, N, heads, d) view): fewer ops, and eager inference is host-bound
        qkv = layers["qkv"](x)
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        agent_bias, query_bias = agent_biases(self, grid, grid)
        conv_weight, conv_bias = autocast_weights(layers["dwc"], channels_innermost)
        # agents pooled from the patch queries, and the values' depthwise conv on the patch tokens only, as official:
        # the class token is neither pooled nor gets a conv term
        out = pooled_agent_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid=grid, agent_grid=self.agent_grid,
            prefix=1, scale=self.scale, agent_bias=agent_bias, query_bias=query_bias,
            conv_weight=conv_weight, conv_bias=conv_bias,
            dropout_p=self.attn_drop if self.training else 0.0, qkv=qkv)
        return unless_identity(layers["proj_drop"], layers["proj"](out.transpose(1, 2).reshape(b, n, c)))


class Attention(nn.Module):
    """Plain multi-head self-attention of the non-agent DeiT blocks (official ``deit.Attention``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); ``grid`` is unused (same call as :class:`AgentAttention`)."""
        qkv = self.qkv(x)
        q, k, v = qkv.chunk(3, dim=-1)
        # Global attention = the downsampled-attention op with no reduction (keys are all tokens); qkv: training's
        # backward then writes the projection's gradient in one buffer.
        out = downsampled_attention(q, k, v, num_heads=self.num_heads,
                                    dropout_p=self.attn_drop if self.training else 0.0, qkv=qkv)
        return self.proj_drop(self.proj(out))


class Block(DeferredSumBlock):
    """Pre-norm transformer block; agent attention (official ``AgentBlock``) or plain attention (``deit.Block``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer: Callable[..., nn.Module] = nn.GELU,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, agent_num: int | None = 49,
                 grid_size: tuple[int, int] = (14, 14)):
        super().__init__()
        self.norm1 = projection_norm(norm_layer, dim)
        if agent_num is None:
            self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        else:
            self.attn = AgentAttention(dim, num_heads, qkv_bias, attn_drop, drop, agent_num, grid_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = projection_norm(norm_layer, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)


AgentBlock = Block  # the official name of the agent variant


class AgentVisionTransformer(nn.Module):
    """Agent-DeiT (official class ``VisionTransformer`` in ``agent_deit.py``), with timm's backbone interface.

    Args:
        img_size: construction input size; sizes the position embedding and the agent biases.
        patch_size: patch size (the feature stride).
        in_chans: input channels.
        num_classes: classifier size (0: no classifier).
        global_pool: ``'token'`` (class token, official), ``'avg'`` (mean of patch tokens) or ``''``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer width, depth, heads, MLP ratio, qkv bias.
        drop_rate: dropout after the position embedding, in the MLPs/projections and before the head.
        attn_drop_rate: dropout on the attention maps.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        norm_layer: norm constructor; LayerNorm(eps=1e-6) when None.
        act_layer: MLP activation; GELU when None.
        agent_num: agents per "stage" (4 entries: blocks 0-1, 2-3, 4-9, 10-11); ints, digit strings or ``'49-49-..'``.
        agent_layer: the first ``agent_layer`` blocks use agent attention (all when <= 0).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 norm_layer: Callable[..., nn.Module] | None = None, act_layer: Callable[..., nn.Module] | None = None,
                 agent_num: Any = (49, 49, 49, 49), agent_layer: int = -1):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        img_size = to_2tuple(img_size, "img_size")
        norm_layer = norm_layer or functools.partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        agent_nums = as_int_list(agent_num, max(_AGENT_STAGE) + 1, "agent_num")
        agent_layer = depth if agent_layer <= 0 else min(agent_layer, depth)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        as_patch_conv(self.patch_embed.proj)  # one GEMM over the patches on CUDA (zoo.ops.patch_conv)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: works under a meta device
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], act_layer, norm_layer,
                  agent_nums[_AGENT_STAGE[min(i // 2, len(_AGENT_STAGE) - 1)]] if i < agent_layer else None, grid)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        # The official DeiT init: truncated normal 0.02 for embeddings and linears, zero biases, unit norms.
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        init_linears(self)

    # --- timm interface -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters the official optimizer excludes from weight decay."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm's ViT grouping)."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0``: none) and optionally the pooling."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward --------------------------------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of patch_size={p}; Agent-DeiT accepts any "
                             f"multiple of {p} (constructed for {tuple(self.patch_embed.img_size)})")
        return h // p, w // p

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if tuple(grid) != tuple(self.patch_embed.grid_size):
            # Bilinear, as the official resize_pos_embed does when loading at another size.
            patch_pos = pos[:, 1:].reshape(1, *self.patch_embed.grid_size, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def _block(self, blk: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid, use_reentrant=False)
        return blk(x, grid)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_images(x, "Agent-DeiT")
        grid = self._grid(x)
        return self._pos_embed(self.patch_embed(x), grid), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, 1 + H/p * W/p, embed_dim) normalised tokens (class token first)."""
        x, grid = self._embed(x)
        return self.norm(run_blocks(self.blocks, x, grid, checkpointing=self.grad_checkpointing))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + N, C) tokens -> (B, num_classes) logits, or the pooled (B, C) with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    @one_cast_per_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    @one_cast_per_forward
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prefix_tokens: bool = False):
        """Block outputs for dense tasks (timm's ViT contract).

        Args:
            x: (B, C, H, W) images.
            indices: last n blocks if int, these block indices if a list, all if None.
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last requested block.
            output_fmt: ``'NCHW'`` (B, C, H/p, W/p) or ``'NLC'`` (B, H/p*W/p, C), class token removed.
            intermediates_only: return only the list of intermediates.
            return_prefix_tokens: pair each intermediate with its (B, 1, C) class token.

        Returns:
            The intermediates, or (final normalised tokens, intermediates).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        b = x.shape[0]
        x, grid = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        feats = []
        for i, blk in enumerate(blocks):
            x = self._block(blk, x, grid)
            if i in take:
                feats.append(self.norm(x) if norm else x)
        prefix = [f[:, :1] for f in feats]
        feats = [f[:, 1:] for f in feats]
        if output_fmt == "NCHW":
            feats = [f.reshape(b, *grid, f.shape[-1]).permute(0, 3, 1, 2).contiguous() for f in feats]
        if return_prefix_tokens:
            feats = list(zip(feats, prefix))
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last requested one (and the norm/head); returns the kept indices."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# ----------------------------------------------------------------------------------------------------------------
# Variants (official factories agent_deit_{tiny,small,base} with the README configs) and pretrained configs.

VARIANTS: dict[str, dict[str, Any]] = {
    "agent_deit_tiny": dict(embed_dim=192, depth=12, num_heads=3, agent_num=(49, 49, 49, 49)),
    "agent_deit_small": dict(embed_dim=384, depth=12, num_heads=6, agent_num=(49, 49, 49, 49)),
    "agent_deit_small_448": dict(img_size=448, embed_dim=384, depth=12, num_heads=6, agent_num=(49, 49, 49, 49)),
    "agent_deit_base": dict(embed_dim=768, depth=12, num_heads=12, agent_num=(81, 81, 81, 81), agent_layer=4),
}

def _cfg(file_id: str, **kwargs: Any) -> dict[str, Any]:
    return agent_cfg(file_id, "patch_embed.proj", pool_size=None, **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_deit_tiny.in1k": _cfg("57e0904221824ee7b7af"),
    "agent_deit_small.in1k": _cfg("fdd43304372541db8ea7"),
    "agent_deit_small_448.in1k": _cfg("a228f86241c445f1969b", input_size=(3, 448, 448)),
    "agent_deit_base.in1k": _cfg("5115f15fdd7e4ab58fbc"),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_zoo_model(AgentVisionTransformer, variant, pretrained, family=FAMILY,
                           feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


register_variants(FAMILY, __name__, VARIANTS, _create)


# ----------------------------------------------------------------------------------------------------------------
# Official constructor -> zoo model.

def _from_official(kwargs: dict[str, Any]) -> AgentVisionTransformer:
    """Build from the official ``VisionTransformer(**kwargs)`` of ``agent_deit.py`` (objects already resolved)."""
    kw = dict(kwargs)
    if kw.pop("representation_size", None) is not None:
        raise ValueError("representation_size must be None: no released Agent-DeiT has a pre-logits layer")
    if kw.pop("distilled", False):
        raise ValueError("distilled must be False: no released Agent-DeiT has a distillation token")
    embed_layer = kw.pop("embed_layer", None)
    if embed_layer is not None and embed_layer is not PatchEmbed:
        raise ValueError(f"embed_layer must be timm's PatchEmbed, got {embed_layer!r}")
    weight_init = kw.pop("weight_init", "")
    if weight_init != "":
        raise ValueError(f"weight_init must be '' (the official default), got {weight_init!r}")
    return AgentVisionTransformer(**kw)


register_official_builder("VisionTransformer", _from_official)
