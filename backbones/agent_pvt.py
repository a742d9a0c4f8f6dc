"""Agent-PVT: PVT with agent attention (Han et al., ECCV 2024), LeapLabTHU/Agent-Attention ``agent_pvt.py``.

Four stages of (patch embedding + LayerNorm, absolute position embedding, blocks). In an agent block (``'A'`` in
``attn_type``, every stage of the released models) the queries are average-pooled into ``A`` agents, the keys and
values optionally come from a spatially reduced map (``agent_sr_ratios``, 1 in the releases), attention goes through
:func:`zoo.ops.agent_attention` with the agent biases, and a depthwise 3x3 conv of the values is added (all three in
:func:`zoo.ops.pooled_agent_attention` where the keys are the tokens themselves). ``'B'``
blocks are PVT's spatial-reduction attention (:func:`zoo.ops.downsampled_attention`). There is no final norm: the
head sees the mean of the stage-4 tokens. State-dict keys equal the official ones.

Biases and position embeddings are sized for the construction ``img_size``; other input sizes interpolate both
bilinearly to the actual feature sizes, as the official detection/segmentation backbones do.
``agent_shapes`` reproduces their ``downstream_agent_shape`` (more agents per stage, biases resized on the agent
axis).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices

from ._layers import DeferredSumBlock, check_images, init_linears, projection_norm, run_blocks, unless_identity
from ._heads import PooledLinearHeadMixin
from zoo.ops import (Mlp, agent_attention, as_patch_conv, depthwise_conv, downsampled_attention,
                     pooled_agent_attention)
from zoo.ops._amp import autocast_dtype
from zoo.ops._cache import derived_cache, register_parameter_cache
from zoo.ops.autocast_cache import autocast_weights, one_cast_per_forward
from zoo.ops.depthwise_conv import channels_innermost
from zoo.registry import build_zoo_model, register_variants

from ._agent_common import (FAMILY, agent_biases, agent_cfg, agent_grid, as_int_list, init_agent_biases,
                            pool_agent_tokens, register_official_builder, to_2tuple)

__all__ = ["AgentPyramidVisionTransformer", "AgentAttention", "SpatialReductionAttention", "AgentPVTBlock",
           "PatchEmbed"]


# the concatenated q / kv weights of an sr-1 agent block, kept between eager inference calls
_FUSED_PROJECTION = register_parameter_cache("_zoo_fused_projection")


def _reduce(module: nn.Module, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens for the keys/values: ``x`` itself, or the sr-conv reduced and normalised map; returns them and their
    grid."""
    if module.sr_ratio == 1:
        return x, size
    b, _, c = x.shape
    reduced = module.sr(x.transpose(1, 2).reshape(b, c, *size))
    return module.norm(reduced.flatten(2).transpose(1, 2)), tuple(reduced.shape[-2:])


class SpatialReductionAttention(nn.Module):
    """PVT attention over an ``sr_ratio``-reduced key/value map (official ``Attention``, the ``'B'`` blocks)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) tokens on an (H, W) grid -> (B, H*W, C)."""
        k, v = self.kv(_reduce(self, x, tuple(size))[0]).chunk(2, dim=-1)
        out = downsampled_attention(self.q(x), k, v, num_heads=self.num_heads,
                                    dropout_p=self.attn_drop if self.training else 0.0)
        return unless_identity(self.proj_drop, self.proj(out))


class AgentAttention(nn.Module):
    """Agent attention on an (H, W) token grid, keys/values optionally from an ``sr_ratio``-reduced grid."""

    def __init__(self, dim: int, grid_size: tuple[int, int], num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., sr_ratio: int = 1, agent_num: int = 49,
                 agent_shape: tuple[int, int] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5  # the official code ignores qk_scale in agent attention
        self.grid_size = tuple(grid_size)
        self.sr_ratio = sr_ratio
        self.agent_num = agent_num
        self.agent_grid = agent_grid(agent_num)
        # Dense-prediction agent count (official downstream_agent_shape); None keeps the trained grid.
        self.agent_shape = tuple(agent_shape) if agent_shape is not None else None
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, whatever the block norm is (official)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        key_size = (self.grid_size[0] // sr_ratio, self.grid_size[1] // sr_ratio)
        init_agent_biases(self, num_heads, agent_num, key_size, self.grid_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _separate_projections(self, x: torch.Tensor, size: tuple[int, int]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], None]:
        """q (B, N, C) from ``x``; k, v (B, M, C) from its reduced map (or ``x``), that map's grid and None."""
        kv_tokens, kv_size = _reduce(self, x, size)
        k, v = self.kv(kv_tokens).chunk(2, dim=-1)
        return self.q(x), k, v, kv_size, None

    def _projections(self, x: torch.Tensor, size: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """q, k, v, the keys' grid, and in traced calls the (B, N, 3C) projection q, k and v are chunks of (the
        pooled op's ``qkv=``, which only a traced training step uses), else None (``_separate_projections``). Where the
        keys are the tokens themselves (``sr_ratio`` 1, the releases), q and kv come from one GEMM over the
        concatenated weights: one read of ``x`` and one launch, and in traced training one input-gradient and one
        weight-gradient GEMM backward in place of two each. Traced, the weights are concatenated in the graph (the
        model's one cast's copies, or float32 weights that autocast casts as one); eager calls without autograd keep
        the concatenation (``_fused_weights``); eager training calls keep the two layers (their cached autocast
        copies, fewer host ops than a concatenation each call)."""
        if self.sr_ratio > 1:
            return self._separate_projections(x, size)
        if torch.compiler.is_compiling():
            qkv = F.linear(x, *self._concatenated_weights())
            return *qkv.chunk(3, dim=-1), size, qkv
        fused = self._fused_weights() if not torch.is_grad_enabled() else None
        if fused is None:
            return self._separate_projections(x, size)
        return *F.linear(x, *fused).chunk(3, dim=-1), size, None

    def _concatenated_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(3C, C) weight and (3C,) bias (or None) of q and kv as autocast consumes them (the cast copies)."""
        (q_weight, q_bias), (kv_weight, kv_bias) = autocast_weights(self.q), autocast_weights(self.kv)
        bias = None if q_bias is None else torch.cat([q_bias, kv_bias])
        return torch.cat([q_weight, kv_weight]), bias

    def _fused_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``_concatenated_weights`` kept between eager calls without autograd while the q and kv parameters are
        unchanged (per autocast compute dtype; see :func:`zoo.ops._cache.derived_cache`), or None where they
        cannot be cached (inference-mode parameters, ``torch.func`` transforms)."""
        # (the layers from the module dict: ``self.q`` goes through nn.Module.__getattr__, which eager calls pay for)
        q, kv = self._modules["q"], self._modules["kv"]
        sources = tuple(t for t in (q.weight, q.bias, kv.weight, kv.bias) if t is not None)
        entries = derived_cache(self, sources, _FUSED_PROJECTION)
        if entries is None:
            return None
        compute = autocast_dtype(sources[0].device.type)
        if compute not in entries:
            entries[compute] = self._concatenated_weights()
        return entries[compute]

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) tokens on an (H, W) grid -> (B, H*W, C)."""
        b, n, c = x.shape
        size = tuple(size)
        q, k, v, kv_size, qkv = self._projections(x, size)
        agents_grid = self.agent_shape or self.agent_grid
        agent_bias, query_bias = agent_biases(self, kv_size, size, agents=agents_grid)
        dropout_p = self.attn_drop if self.training else 0.0
        layers = self._modules  # (nn.Module.__getattr__ costs eager calls host time)
        conv_weight, conv_bias = autocast_weights(layers["dwc"], channels_innermost)
        if kv_size == size:
            # keys on the query grid (sr_ratio 1, the releases): pooling, attention and the values' conv in one op,
            # one launch at the 14x14 and 7x7 stages (fewer host calls; eager inference is host-bound); qkv (traced
            # calls) gets a traced training step its gradient in one buffer
            out = pooled_agent_attention(
                self._heads(q), self._heads(k), self._heads(v), grid=size, agent_grid=agents_grid, scale=self.scale,
                agent_bias=agent_bias, query_bias=query_bias, conv_weight=conv_weight, conv_bias=conv_bias,
                dropout_p=dropout_p, qkv=qkv)
            return unless_identity(layers["proj_drop"], layers["proj"](out.transpose(1, 2).reshape(b, n, c)))
        agents = pool_agent_tokens(q, size, agents_grid)
        out = agent_attention(self._heads(q), self._heads(k), self._heads(v), self._heads(agents), scale=self.scale,
                              agent_bias=agent_bias, query_bias=query_bias, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(b, *size, c)
        # the values' depthwise conv, on the values bilinearly upsampled to the query grid (official)
        out = depthwise_conv(v.view(b, *kv_size, c), conv_weight, conv_bias, residual=out, size=size)
        return unless_identity(self.proj_drop, self.proj(out.flatten(1, 2)))


class AgentPVTBlock(DeferredSumBlock):
    """Pre-norm block with agent attention (``attn_type='A'``) or spatial-reduction attention (``'B'``)."""

    def __init__(self, dim: int, grid_size: tuple[int, int], num_heads: int, mlp_ratio: float = 4.,
                 qkv_bias: bool = False, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer: Callable[..., nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 sr_ratio: int = 1, agent_num: int = 49, attn_type: str = "A",
                 agent_shape: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = projection_norm(norm_layer, dim)
        if attn_type == "A":
            self.attn = AgentAttention(dim, grid_size, num_heads, qkv_bias, attn_drop, drop, sr_ratio, agent_num,
                                       agent_shape)
        elif attn_type == "B":
            self.attn = SpatialReductionAttention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        else:
            raise ValueError(f"attn_type must be 'A' (agent) or 'B' (spatial reduction), got {attn_type!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = projection_norm(norm_layer, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)


class PatchEmbed(nn.Module):
    """Strided conv patch embedding + LayerNorm (eps 1e-5), returning tokens and their grid (official layout)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> ((B, H/p * W/p, D), (H/p, W/p))."""
        x = self.proj(x)
        size = tuple(x.shape[-2:])
        return self.norm(x.flatten(2).transpose(1, 2)), size


class AgentPyramidVisionTransformer(PooledLinearHeadMixin, nn.Module):
    """Agent-PVT (official class ``PyramidVisionTransformer`` in ``agent_pvt.py``), with timm's backbone interface.

    Args:
        img_size: construction input size; sizes the position embeddings and the agent biases.
        patch_size: stage-1 patch size (later stages downsample by 2).
        in_chans: input channels.
        num_classes: classifier size (0: none).
        global_pool: ``'avg'`` (official) or ``''`` (forward_head returns the map).
        embed_dims, num_heads, mlp_ratios, depths: per-stage width, heads, MLP ratio, depth.
        qkv_bias: bias in the q/kv projections.
        qk_scale: only for ``'B'`` stages; must be None (agent stages always use head_dim ** -0.5).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention-map dropout, stochastic depth.
        norm_layer: block norm constructor (the official factories pass LayerNorm(eps=1e-6)).
        sr_ratios: spatial reduction of ``'B'`` stages.
        agent_sr_ratios: spatial reduction of the keys/values of ``'A'`` stages (``'1111'`` in the releases).
        num_stages: must be 4.
        agent_num: agents per stage (ints, digit strings or ``'9-16-49-49'``).
        attn_type: one letter per stage, ``'A'`` agent attention, ``'B'`` spatial-reduction attention.
        agent_shapes: per-stage agent pooling grids for dense prediction (official ``downstream_agent_shape``);
            None keeps the trained sqrt(agent_num) grids.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg",
                 embed_dims: tuple[int, ...] = (64, 128, 320, 512), num_heads: tuple[int, ...] = (1, 2, 5, 8),
                 mlp_ratios: tuple[float, ...] = (8, 8, 4, 4), qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 norm_layer: Callable[..., nn.Module] | None = None, depths: tuple[int, ...] = (2, 2, 2, 2),
                 sr_ratios: tuple[int, ...] = (8, 4, 2, 1), agent_sr_ratios: Any = "1111", num_stages: int = 4,
                 agent_num: Any = (9, 16, 49, 49), attn_type: str | None = "AAAA",
                 agent_shapes: list[tuple[int, int] | None] | None = None):
        super().__init__()
        if num_stages != 4:
            raise ValueError(f"num_stages must be 4 (the official layout), got {num_stages}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        attn_type = "AAAA" if attn_type is None else attn_type
        if len(attn_type) < num_stages or set(attn_type[:num_stages]) - {"A", "B"}:
            raise ValueError(f"attn_type must have one 'A' or 'B' per stage, got {attn_type!r}")
        if qk_scale is not None and "B" in attn_type[:num_stages]:
            raise ValueError("qk_scale is not supported for 'B' stages (use None: head_dim ** -0.5)")
        for name, seq in (("embed_dims", embed_dims), ("num_heads", num_heads), ("mlp_ratios", mlp_ratios),
                          ("depths", depths), ("sr_ratios", sr_ratios)):
            if len(seq) < num_stages:
                raise ValueError(f"{name} needs {num_stages} entries, got {seq!r}")
        img_size = to_2tuple(img_size, "img_size")
        norm_layer = norm_layer or nn.LayerNorm
        agent_nums = as_int_list(agent_num, num_stages, "agent_num")
        agent_srs = as_int_list(agent_sr_ratios, num_stages, "agent_sr_ratios")
        agent_shapes = list(agent_shapes) if agent_shapes is not None else [None] * num_stages

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_stages = num_stages
        self.depths = list(depths)
        self.num_features = self.head_hidden_size = embed_dims[num_stages - 1]
        self.patch_size = patch_size
        self.grad_checkpointing = False
        self.feature_info = []

        dpr = torch.linspace(0, drop_path_rate, sum(depths[:num_stages]), device="cpu").tolist()
        size, cur = img_size, 0
        for i in range(num_stages):
            stride = patch_size if i == 0 else 2
            embed = PatchEmbed(size, stride, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i])
            if i == 0:  # the image stem: one GEMM over patches on CUDA (zoo.ops.patch_conv; later stages unmeasured)
                as_patch_conv(embed.proj)
            grid = embed.grid_size
            sr = sr_ratios[i] if attn_type[i] == "B" else agent_srs[i]
            blocks = nn.ModuleList([
                AgentPVTBlock(embed_dims[i], grid, num_heads[i], mlp_ratios[i], qkv_bias, drop_rate, attn_drop_rate,
                              dpr[cur + j], norm_layer=norm_layer, sr_ratio=sr, agent_num=agent_nums[i],
                              attn_type=attn_type[i], agent_shape=agent_shapes[i])
                for j in range(depths[i])])
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dims[i])))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            setattr(self, f"block{i + 1}", blocks)
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f"block{i + 1}"))
            size, cur = grid, cur + depths[i]
        self.head_drop = nn.Dropout(drop_rate)  # the official head has no dropout; drop_rate 0 in every release
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for i in range(self.num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=.02)
        init_linears(self)

    # --- timm interface -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay: none (the official set names only a non-existent cls_token)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (stem = stage-1 embedding)."""
        return dict(
            stem=r"^(?:patch_embed1|pos_embed1)\.?",
            blocks=[(r"^(?:block|patch_embed|pos_embed)(\d+)", None)] if coarse else [
                (r"^block(\d+)\.(\d+)", None), (r"^(?:patch_embed|pos_embed)(\d+)", (0,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save memory."""
        self.grad_checkpointing = enable

    # --- forward --------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        check_images(x, "Agent-PVT", self.patch_size * 2 ** (self.num_stages - 1), "total stride")

    def _pos_embed(self, i: int, size: tuple[int, int]) -> torch.Tensor:
        pos = getattr(self, f"pos_embed{i + 1}")
        grid = getattr(self, f"patch_embed{i + 1}").grid_size
        if tuple(size) == tuple(grid):
            return pos  # the official same-size bilinear resize of stages 2-4 is an exact identity
        pos = pos.reshape(1, *grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=size, mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def _stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stage ``i``: (B, C, H, W) map -> (B, h*w, D) tokens and (h, w)."""
        x, size = getattr(self, f"patch_embed{i + 1}")(x)
        x = unless_identity(getattr(self, f"pos_drop{i + 1}"), x + self._pos_embed(i, size))
        return run_blocks(getattr(self, f"block{i + 1}"), x, size, checkpointing=self.grad_checkpointing), size

    @staticmethod
    def _to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, embed_dims[-1], H/32, W/32) stage-4 map (no final norm, as official)."""
        self._check_input(x)
        for i in range(self.num_stages):
            x, size = self._stage(i, x)
            x = self._to_map(x, size)
        return x

    @one_cast_per_forward
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs for dense tasks (timm's contract).

        Args:
            x: (B, C, H, W) images.
            indices: last n stages if int, these stage indices if a list, all four if None.
            norm: accepted for timm compatibility; the model has no final norm, so it changes nothing.
            stop_early: stop after the last requested stage.
            output_fmt: ``'NCHW'`` (B, C_i, H/s_i, W/s_i) or ``'NLC'`` (B, H/s_i*W/s_i, C_i).
            intermediates_only: return only the list of stage outputs.

        Returns:
            The stage outputs, or (stage-4 map, stage outputs).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_input(x)
        take, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        feats = []
        for i in range(last + 1):
            tokens, size = self._stage(i, x)
            x = self._to_map(tokens, size)
            if i in take:
                feats.append(tokens if output_fmt == "NLC" else x)
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested one (and the head); returns the kept indices."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in (f"patch_embed{i + 1}", f"pos_embed{i + 1}", f"pos_drop{i + 1}", f"block{i + 1}"):
                delattr(self, name)
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.num_features = self.feature_info[-1]["num_chs"]
            self.reset_classifier(0, "")
        return take


# ----------------------------------------------------------------------------------------------------------------
# Variants (official factories agent_pvt_{tiny,small,medium,large} with the README configs) and pretrained configs.

_SHARED = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               qkv_bias=True, sr_ratios=(8, 4, 2, 1), agent_sr_ratios="1111", agent_num=(9, 16, 49, 49),
               attn_type="AAAA")

VARIANTS: dict[str, dict[str, Any]] = {
    "agent_pvt_tiny": dict(_SHARED, depths=(2, 2, 2, 2)),
    "agent_pvt_small": dict(_SHARED, depths=(3, 4, 6, 3)),
    "agent_pvt_medium": dict(_SHARED, depths=(3, 4, 18, 3)),
    "agent_pvt_medium_256": dict(_SHARED, img_size=256, depths=(3, 4, 18, 3)),
    "agent_pvt_large": dict(_SHARED, depths=(3, 8, 27, 3)),
}

def _cfg(file_id: str, **kwargs: Any) -> dict[str, Any]:
    return agent_cfg(file_id, "patch_embed1.proj", **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny.in1k": _cfg("13fdf0e0a7c5498c934f"),
    "agent_pvt_small.in1k": _cfg("36b8be9a8863456685a3"),
    "agent_pvt_medium.in1k": _cfg("4d00ecacf18b45f9b88c"),
    "agent_pvt_medium_256.in1k": _cfg("654df734121643b19c52", input_size=(3, 256, 256), pool_size=(8, 8)),
    "agent_pvt_large.in1k": _cfg("040cfe0cfbbe4762ad09"),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    kwargs.setdefault("norm_layer", functools.partial(nn.LayerNorm, eps=1e-6))
    return build_zoo_model(AgentPyramidVisionTransformer, variant, pretrained, family=FAMILY,
                           feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


register_variants(FAMILY, __name__, VARIANTS, _create)


def _from_official(kwargs: dict[str, Any]) -> AgentPyramidVisionTransformer:
    """Build from the official ``PyramidVisionTransformer(**kwargs)`` of ``agent_pvt.py`` (objects resolved)."""
    return AgentPyramidVisionTransformer(**kwargs)


register_official_builder("PyramidVisionTransformer", _from_official)
