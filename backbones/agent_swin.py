"""Agent-Swin: Swin Transformer with agent attention (Han et al., ECCV 2024), LeapLabTHU/Agent-Attention
``agent_swin.py``.

``attn_type`` has one letter per stage: ``A`` agent attention blocks, ``B`` Swin window-attention blocks, ``M`` the
first N blocks agent and the rest window attention, N given by the digits after the stage letters (``'AAMB2'``).
Agent blocks use ``window_size`` and window blocks ``max(7, window_size // 8)``; a window that covers the stage
(clamped to its smaller side, as Swin does) means no shift. In the released models every agent block covers its
whole stage (global agent attention) and window blocks alternate plain and shifted 7x7 (9x9, 12x12) windows.

Agent attention runs through :func:`zoo.ops.pooled_agent_attention` (agents pooled from the queries, the official
agent biases, a depthwise 3x3 conv of the values added), window attention through :func:`zoo.ops.window_attention`
(relative position bias, shifted windows). State-dict keys, buffers included, equal the official ones.

Other input sizes work as in the official detection/segmentation backbone: global agent blocks bilinearly resize
their biases to the actual feature size, window blocks pad the map to a multiple of the window (after the norm,
before the projections), patch embedding and merging pad odd sizes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices

from ._layers import (DeferredSumBlock, channels_last_intermediates, check_images, init_linears, projection_norm,
                      run_blocks, unless_identity)
from ._heads import PooledLinearHeadMixin
from zoo.ops import Mlp, PatchConv2d, pooled_agent_attention, window_attention
from zoo.ops._cache import derived_cache
from zoo.ops.autocast_cache import autocast_weights, one_cast_per_forward
from zoo.ops.depthwise_conv import channels_innermost
from zoo.ops.window import shifted_window_mask, window_partition, window_reverse
from zoo.registry import build_zoo_model, register_variants

from ._agent_common import (AGENT_BIAS_NAMES, FAMILY, agent_biases, agent_cfg, agent_grid, as_int_list,
                            init_agent_biases, register_official_builder, to_2tuple)

__all__ = ["AgentSwinTransformer", "AgentSwinBlock", "AgentAttention", "WindowAttention", "PatchMerging",
           "PatchEmbed", "parse_attn_types", "relative_position_index"]


# ----------------------------------------------------------------------------------------------------------------
# Attention modules: (B, H, W, C) -> (B, H, W, C)

def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """Swin's (N, N) index into the ((2wh-1)(2ww-1), heads) bias table for the N = wh*ww tokens of a window."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2): query minus key
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


class WindowAttention(nn.Module):
    """Swin window attention with a relative position bias (official ``WindowAttention``)."""

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.window_size = tuple(window_size)
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        # Persistent, as in the official model, so official checkpoints load strictly.
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias of every window, N = wh*ww. Without autograd, in eager code, the gathered bias is kept
        while the table and index are unchanged (eager inference waits for the host, and the gather is three calls a
        block), under the rules of :func:`zoo.ops._cache.derived_cache`."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._gathered_bias()
        entries = derived_cache(self, (self._parameters["relative_position_bias_table"],
                                       self._buffers["relative_position_index"]))
        if entries is None:
            return self._gathered_bias()
        if "bias" not in entries:
            entries["bias"] = self._gathered_bias()
        return entries["bias"]

    def _gathered_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, shift_size: int = 0) -> torch.Tensor:
        """(B, H, W, C), H and W multiples of the window -> (B, H, W, C); ``shift_size`` shifts the window grid."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).view(b, h, w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        out = window_attention(q, k, v, self.window_size, shift_size=shift_size, scale=self.scale,
                               bias=self.relative_position_bias(),
                               dropout_p=self.attn_drop if self.training else 0.0)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return unless_identity(self.proj_drop, self.proj(out))


class AgentAttention(nn.Module):
    """Agent attention over a window (official ``AgentAttention`` of ``agent_swin.py``).

    The biases are sized for ``window_size``; a window of another size (a global block at another input size)
    bilinearly resizes them to it, as the official dense-prediction backbone does.
    """

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., agent_num: int = 49):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.window_size = tuple(window_size)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5  # the official code ignores qk_scale here
        self.agent_num = agent_num
        self.agent_grid = agent_grid(agent_num)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        init_agent_biases(self, num_heads, agent_num, self.window_size, self.window_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) window(s) -> (B, h, w, C)."""
        b, h, w, c = x.shape
        layers = self._modules  # (``self.qkv`` goes through nn.Module.__getattr__, which eager calls pay for)
        qkv = layers["qkv"](x).view(b, h * w, 3 * c)
        q, k, v = qkv.view(b, h * w, 3, c).unbind(2)
        agent_bias, query_bias = agent_biases(self, (h, w), (h, w))
        conv_weight, conv_bias = autocast_weights(layers["dwc"], channels_innermost)
        # agents pooled from the window's queries; the values' depthwise conv restores the feature diversity the
        # low-rank agent attention loses (qkv: a compiled training step then gets its gradient in one buffer)
        out = pooled_agent_attention(
            self._heads(q), self._heads(k), self._heads(v), grid=(h, w), agent_grid=self.agent_grid,
            scale=self.scale, agent_bias=agent_bias, query_bias=query_bias, conv_weight=conv_weight,
            conv_bias=conv_bias, dropout_p=self.attn_drop if self.training else 0.0, qkv=qkv)
        return unless_identity(layers["proj_drop"], layers["proj"](out.transpose(1, 2).reshape(b, h, w, c)))


# ----------------------------------------------------------------------------------------------------------------
# Blocks and stages (channels-last maps)

def _pad_to_multiple(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Zero-pad (B, H, W, C) at the bottom/right to multiples of ``window``."""
    h, w = x.shape[1:3]
    pad_b, pad_r = -h % window[0], -w % window[1]
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x


class AgentSwinBlock(DeferredSumBlock):
    """Pre-norm Swin block with agent (``'A'``) or window (``'B'``) attention.

    Args:
        input_resolution: (H, W) of the stage at the construction image size; the window is clamped to it.
        window_size: window side; ``shift_size`` the shift of odd blocks (0 when the window covers the stage).
        attn_type: ``'A'`` agent attention or ``'B'`` window attention.
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: float | None = None,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer: Callable[..., nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 agent_num: int = 49, attn_type: str = "A"):
        super().__init__()
        if attn_type not in ("A", "B"):
            raise ValueError(f"attn_type must be 'A' (agent) or 'B' (window), got {attn_type!r}")
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            # A window as large as the stage: no partition, no shift (official rule).
            window_size, shift_size = min(self.input_resolution), 0
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size={shift_size} must be in [0, window_size={window_size})")
        self.window_size, self.shift_size, self.attn_type = window_size, shift_size, attn_type
        # A global agent block attends over the whole map at any input size (biases resized to it).
        self.global_attn = attn_type == "A" and window_size >= min(self.input_resolution)
        window = (window_size, window_size)
        self.norm1 = projection_norm(norm_layer, dim)
        if attn_type == "A":
            self.attn = AgentAttention(dim, window, num_heads, qkv_bias, attn_drop, drop, agent_num)
        else:
            self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = projection_norm(norm_layer, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        # The official Swin mask (-100 between pieces the roll brings together), kept as a persistent buffer so
        # official checkpoints load strictly; window_attention builds the same mask itself at any map size.
        mask = None
        if shift_size > 0:
            # Sized for the map padded to whole windows, as forward pads it (the official code requires multiples).
            padded = [r + (-r % window_size) for r in self.input_resolution]
            allowed = shifted_window_mask(*padded, window, shift_size)
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, -100.0)
        self.register_buffer("attn_mask", mask)

    def _window_agent(self, x: torch.Tensor) -> torch.Tensor:
        # Agent attention per (shifted) window; the official agent attention ignores the shift mask.
        h, w = x.shape[1:3]
        s = self.shift_size
        x = torch.roll(x, (-s, -s), dims=(1, 2)) if s else x
        out = window_reverse(self.attn(window_partition(x, self.window_size)), self.window_size, h, w)
        return torch.roll(out, (s, s), dims=(1, 2)) if s else out

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_attn:
            return self._modules["attn"](x)  # (``self.attn`` goes through nn.Module.__getattr__: eager calls pay)
        h, w = x.shape[1:3]
        x = _pad_to_multiple(x, (self.window_size, self.window_size))
        if self.attn_type == "A":
            x = self._window_agent(x)
        else:
            x = self.attn(x, self.shift_size)
        return x if x.shape[1:3] == (h, w) else x[:, :h, :w]  # no slicing call where nothing was padded


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> norm -> linear (official order x00, x10, x01, x11); odd sizes are zero-padded."""

    def __init__(self, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = projection_norm(norm_layer, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        x = _pad_to_multiple(x, (2, 2))
        # Channel blocks ordered (dy, dx) = 00, 10, 01, 11. A concatenation of strided slices, not a reshape of a
        # permuted view: inductor stored that view's copy transposed (a dead, uncoalesced 154 MB write in the
        # compiled Agent-Swin-T's stage-0 merge, 0.87 ms of 9.5 on an H200); it stores the concatenation contiguously.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (+ norm) to a channels-last map; pads inputs to a multiple of the patch."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = PatchConv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, ceil(H/p), ceil(W/p), embed_dim)."""
        p = self.patch_size
        pad_b, pad_r = -x.shape[2] % p, -x.shape[3] % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class BasicLayer(nn.Module):
    """One stage: ``blocks`` then (except in the last stage) ``downsample``, with the official key names.

    ``forward`` runs the blocks only; the model applies ``downsample`` after taking the stage's feature.
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: list[float] | float = 0.,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, downsample: bool = False,
                 agent_num: int = 49, attn_types: list[str] | None = None):
        super().__init__()
        attn_types = attn_types or ["A"] * depth
        drop_path = drop_path if isinstance(drop_path, list) else [drop_path] * depth
        self.grad_checkpointing = False
        blocks = []
        for i in range(depth):
            # Window blocks use an eighth of the agent window (at least 7), Swin's plain/shifted alternation.
            win = window_size if attn_types[i] == "A" else max(7, window_size // 8)
            blocks.append(AgentSwinBlock(dim, input_resolution, num_heads, win, 0 if i % 2 == 0 else win // 2,
                                         mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path[i],
                                         norm_layer=norm_layer, agent_num=agent_num, attn_type=attn_types[i]))
        self.blocks = nn.ModuleList(blocks)
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C) through the blocks (not the downsample)."""
        return run_blocks(self.blocks, x, checkpointing=self.grad_checkpointing)


def parse_attn_types(attn_type: str, depths: list[int] | tuple[int, ...]) -> list[list[str]]:
    """Per-block ``'A'``/``'B'`` lists from the official ``attn_type`` string (one letter per stage, ``M`` + digits).

    ``'AAMB2'`` with depths (2, 2, 18, 2): stages 0-1 agent, stage 2 agent for its first 2 blocks then window,
    stage 3 window.
    """
    n = len(depths)
    if not isinstance(attn_type, str) or len(attn_type) < n or any(c not in "ABM" for c in attn_type[:n]):
        raise ValueError(f"attn_type must give one of 'A', 'B', 'M' per stage ({n} stages), then the number of "
                         f"agent blocks of 'M' stages, e.g. 'AAMB2'; got {attn_type!r}")
    mixed = attn_type[n:]
    if "M" in attn_type[:n] and not mixed.isdigit():
        raise ValueError(f"attn_type={attn_type!r}: an 'M' stage needs its agent block count after the stage "
                         "letters, e.g. 'AAMB2'")
    out = []
    for letter, depth in zip(attn_type[:n], depths):
        if letter == "M":
            out.append(["A" if i < int(mixed) else "B" for i in range(depth)])
        else:
            out.append([letter] * depth)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model

class AgentSwinTransformer(PooledLinearHeadMixin, nn.Module):
    """Agent-Swin (official ``AgentSwinTransformer``), with timm's backbone interface.

    Args:
        img_size: construction input size; sizes the windows, the agent biases and the shift masks.
        patch_size: patch embedding stride.
        in_chans: input channels.
        num_classes: classifier size (0: no classifier).
        global_pool: ``'avg'`` (official) or ``''`` (no pooling in ``forward_head``).
        embed_dim: channels of stage 0 (doubled per stage).
        depths, num_heads: blocks and heads per stage.
        window_size: agent window (the released models use img_size / 4: global agent attention).
        mlp_ratio, qkv_bias: MLP expansion, qkv bias.
        qk_scale: window-attention logit scale override (agent attention always uses head_dim ** -0.5).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (linear).
        norm_layer: norm constructor (nn.LayerNorm).
        ape: absolute position embedding after the patch embedding.
        patch_norm: norm after the patch embedding.
        agent_num: agents per stage (perfect squares), e.g. ``(9, 16, 49, 49)`` or ``'9-16-49-49'``.
        attn_type: per-stage attention, e.g. ``'AAAB'``, ``'AAMB2'`` (see :func:`parse_attn_types`).
    """

    pool_dims = (1, 2)  # forward_features gives a channels-last map

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer: Callable[..., nn.Module] | None = None, ape: bool = False, patch_norm: bool = True,
                 agent_num: Any = (9, 16, 49, 49), attn_type: str = "BBBB"):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads={list(num_heads)} needs one entry per stage of depths={list(depths)}")
        img_size = to_2tuple(img_size, "img_size")
        norm_layer = norm_layer or nn.LayerNorm
        num_layers = len(depths)
        agent_nums = as_int_list(agent_num, num_layers, "agent_num")
        attn_types = parse_attn_types(attn_type, depths)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_layers - 1))
        self.patch_size = patch_size
        self.patches_resolution = (img_size[0] // patch_size, img_size[1] // patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patches_resolution[0] *
                                                               self.patches_resolution[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under a meta device
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_layers):
            dim = int(embed_dim * 2 ** i)
            res = (self.patches_resolution[0] // 2 ** i, self.patches_resolution[1] // 2 ** i)
            self.layers.append(BasicLayer(
                dim, res, depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer,
                downsample=i < num_layers - 1, agent_num=agent_nums[i], attn_types=attn_types[i]))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_linears(self)  # convs keep PyTorch's default, as in the official code

    # --- timm interface -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position parameters kept out of weight decay: relative position tables, agent biases, the APE."""
        keys = {"relative_position_bias_table", "absolute_pos_embed", *AGENT_BIAS_NAMES}
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in keys}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (stem, blocks in order, final norm)."""
        return dict(
            stem=r"^absolute_pos_embed|patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),  # merging ends a stage here (it starts one in timm)
                (r"^norm", (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save memory."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    # --- forward --------------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "Agent-Swin", self.patch_size * 2 ** (self.num_layers - 1),
                     f"patch {self.patch_size}, {self.num_layers - 1} mergings")
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed.view(1, *self.patches_resolution, -1)
            if x.shape[1:3] != pos.shape[1:3]:
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bilinear",
                                    align_corners=False).permute(0, 2, 3, 1)
            x = x + pos
        return unless_identity(self.pos_drop, x)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i``: embedding (stage 0, from images) or the previous stage's patch merging, then its blocks."""
        x = self._embed(x) if i == 0 else self.layers[i - 1].downsample(x)
        return self.layers[i](x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, H/32, W/32, num_features) normalised channels-last map."""
        for i in range(len(self.layers)):
            x = self._stage(i, x)
        return self.norm(x)

    @one_cast_per_forward
    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (before each patch merging) for dense tasks (timm's contract; the arguments are
        :func:`zoo.backbones._layers.channels_last_intermediates`'s)."""
        return channels_last_intermediates(self._stage, len(self.layers), self.norm, x, indices, norm, stop_early,
                                           output_fmt, intermediates_only)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested one (and its merging, the norm, the head); returns the kept
        indices."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None  # its output is never used: no unused parameters under DDP
        if prune_norm or max_index < self.num_layers - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# ----------------------------------------------------------------------------------------------------------------
# Variants (README configs: cfgs/agent_swin_*.yaml) and pretrained configs.

_COMMON = dict(patch_size=4, mlp_ratio=4., qkv_bias=True, ape=False, patch_norm=True, agent_num=(9, 16, 49, 49))
VARIANTS: dict[str, dict[str, Any]] = {
    "agent_swin_t": dict(_COMMON, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56,
                         attn_type="AAAB", drop_path_rate=0.2),
    "agent_swin_s": dict(_COMMON, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=56,
                         attn_type="AABB", drop_path_rate=0.3),
    "agent_swin_s_288": dict(_COMMON, img_size=288, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                             window_size=72, attn_type="AABB", drop_path_rate=0.3),
    "agent_swin_b": dict(_COMMON, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=56,
                         attn_type="AAMB2", drop_path_rate=0.5),
    "agent_swin_b_384": dict(_COMMON, img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                             window_size=96, attn_type="AAMB2", drop_path_rate=0.5),
}

def _cfg(file_id: str, **kwargs: Any) -> dict[str, Any]:
    return agent_cfg(file_id, "patch_embed.proj", **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_swin_t.in1k": _cfg("a2ddc1190c224f768a41"),
    "agent_swin_s.in1k": _cfg("f607172c9fea4d6e99bb"),
    "agent_swin_s_288.in1k": _cfg("09760394e93b4046a25e", input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0),
    "agent_swin_b.in1k": _cfg("4fcd2d0114bb490483c3"),
    "agent_swin_b_384.in1k": _cfg("bb84ee9058954706a557", input_size=(3, 384, 384), pool_size=(12, 12),
                                  crop_pct=1.0),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_zoo_model(AgentSwinTransformer, variant, pretrained, family=FAMILY,
                           feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


register_variants(FAMILY, __name__, VARIANTS, _create)


# ----------------------------------------------------------------------------------------------------------------
# Official constructor -> zoo model.

def _from_official(kwargs: dict[str, Any]) -> AgentSwinTransformer:
    """Build from the official ``AgentSwinTransformer(**kwargs)`` (objects already resolved)."""
    kw = dict(kwargs)
    use_checkpoint = bool(kw.pop("use_checkpoint", False))
    model = AgentSwinTransformer(**kw)
    model.set_grad_checkpointing(use_checkpoint)
    return model


register_official_builder("AgentSwinTransformer", _from_official)
