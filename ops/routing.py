"""Bi-level routing attention (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023).

The feature map is cut into regions of ``region_size`` tokens (raster order of regions, raster order of tokens
inside a region). Attention happens on two levels:

1. **Region routing.** Every region gets a descriptor: the mean of its query tokens and the mean of its key
   tokens (all channels, all heads together). The region affinity ``A = (q_r * routing_scale) @ k_r^T`` picks,
   for every query region, the ``topk`` key regions with the largest affinity (computed in float32; common
   positive factors, which cannot change the ranking, are skipped: see :func:`route`). Routing is computed on
   detached tensors: no gradient flows through the choice (the official ``diff_routing=False``), every head
   shares it.
2. **Token attention.** Every query token attends, per head, to all tokens of its region's ``topk`` key regions::

       out[t] = softmax(scale * q[t] @ K_sel^T) @ V_sel          K_sel, V_sel: topk * region tokens

Padding: when H or W is not a multiple of the region size, q, k and v are zero-padded at the bottom/right
(*after* projection), region descriptors average only the real tokens (``avg_pool2d(..., ceil_mode=True,
count_include_pad=False)`` in the official code), padded tokens still take part as keys (logit 0, value 0, not
masked, as in the official ``nchwBRA``), and the output is cropped back to H x W. The legacy BiFormer rule (pad
the normalised input *before* the qkv projection, so padded tokens carry the projection bias) is done by the
caller, which then passes divisible tensors and this padding path is idle.

Quirks callers choose explicitly: ``scale`` (the official models use the full channel width, ``qk_dim ** -0.5``,
not the head width) and ``routing_scale`` (legacy BRA multiplies the query descriptors by ``scale`` before the
affinity, nchwBRA does not; the top-k choice is the same up to float rounding of near ties).

Backends:
    ``reference``: plain PyTorch, the definition: region-major partition, index-gather of the selected key
        regions, explicit ``softmax((q * scale) @ k^T) @ v`` (the official order of operations).
    ``sdpa``: one ``F.scaled_dot_product_attention`` over all (padded) tokens in raster order, with the routing as
        a boolean mask (token ``i`` may read token ``j`` when ``j``'s region is among ``i``'s region's top-k).
        The same softmax over the same keys; it reads every key once per query tile instead of once per query
        region, so it wins when the selected regions cover a large share of the map (BiFormer's last routed
        stage: 16 of 49 regions) and loses when they cover little (stage 0: 1 of 49). Any device and dtype,
        differentiable; under ``torch.compile`` it is plain PyTorch that inductor can fuse.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._amp import autocast_dtype
from ._cache import cached_constant
from ._checks import check_float_tensors
from ._dispatch import call_key, dispatch, register_backend, validated
from ._sdpa import sdpa

__all__ = ["routing_attention", "route", "region_sums"]

_OP = "routing_attention"
_LAYOUTS = ("nhwc", "nchw")


def routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int,
                      region_size: int | Sequence[int], topk: int, scale: float,
                      routing_scale: float | None = None, layout: str = "nhwc",
                      backend: str | None = None) -> torch.Tensor:
    """Bi-level routing attention on image-shaped q, k, v (see the module docstring for the computation).

    Args:
        q: queries, (B, H, W, C_qk) for ``layout="nhwc"`` or (B, C_qk, H, W) for ``layout="nchw"``.
        k: keys, same shape as ``q``.
        v: values, (B, H, W, C_v) or (B, C_v, H, W); C_v may differ from C_qk.
        num_heads: heads of the token attention; C_qk and C_v must be divisible by it (channel ``c`` belongs to
            head ``c // (C / num_heads)``). Routing uses all channels and is shared by the heads.
        region_size: (rh, rw) tokens per region (an int means square). Regions per side: ``ceil(H / rh)``,
            ``ceil(W / rw)``; non-divisible sizes are zero-padded (see the module docstring).
        topk: key regions each query region attends to, 1 <= topk <= number of regions.
        scale: multiplier of the token-attention logits.
        routing_scale: multiplier of the query descriptors before the region affinity; None multiplies by
            nothing. Only float rounding of near ties depends on it (it must be > 0).
        layout: ``"nhwc"`` or ``"nchw"``; the output uses the same layout.
        backend: ``"reference"``, ``"sdpa"``, ``"triton"`` or None for automatic choice (see
            :mod:`zoo.ops._dispatch`).

    Returns:
        (B, H, W, C_v) for ``"nhwc"``, (B, C_v, H, W) for ``"nchw"``, in the dtype of ``v``.
    """
    key = call_key(q, k, v, num_heads, region_size, topk, scale, routing_scale, layout)
    if validated(_OP, key):
        region = _pair(region_size)
    else:
        region = _check_inputs(q, k, v, num_heads, region_size, topk, scale, routing_scale, layout)
    return dispatch(_OP, backend, q, k, v, num_heads=int(num_heads), region_size=region, topk=int(topk),
                    scale=float(scale), routing_scale=None if routing_scale is None else float(routing_scale),
                    layout=layout, key=key)


def _check_inputs(q, k, v, num_heads, region_size, topk, scale, routing_scale, layout) -> tuple[int, int]:
    if layout not in _LAYOUTS:
        raise ValueError(f"routing_attention: layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"routing_attention: {name} must be a 4-d {layout.upper()} tensor, got {got}")
    check_float_tensors("routing_attention", q=q, k=k, v=v)
    if q.shape != k.shape:
        raise ValueError(f"routing_attention: q and k must have the same shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    spatial = (lambda t: (t.shape[0], t.shape[1], t.shape[2])) if layout == "nhwc" else \
        (lambda t: (t.shape[0], t.shape[2], t.shape[3]))
    if spatial(v) != spatial(q):
        raise ValueError(f"routing_attention: v must share (B, H, W) with q ({layout}), got q {tuple(q.shape)} "
                         f"and v {tuple(v.shape)}")
    c_qk = q.shape[-1] if layout == "nhwc" else q.shape[1]
    c_v = v.shape[-1] if layout == "nhwc" else v.shape[1]
    if not isinstance(num_heads, int) or num_heads < 1 or c_qk % num_heads or c_v % num_heads:
        raise ValueError(f"routing_attention: num_heads must be a positive int dividing the q/k channels ({c_qk}) "
                         f"and the v channels ({c_v}), got {num_heads!r}")
    region = _pair(region_size)
    if region is None or min(region) < 1:
        raise ValueError(f"routing_attention: region_size must be a positive int or a pair of positive ints, "
                         f"got {region_size!r}")
    _, h, w = spatial(q)
    num_regions = -(-h // region[0]) * -(-w // region[1])
    if not isinstance(topk, int) or not 1 <= topk <= num_regions:
        raise ValueError(f"routing_attention: topk must be an int in [1, {num_regions}] (the number of "
                         f"{region[0]}x{region[1]} regions of a {h}x{w} map), got {topk!r}")
    if routing_scale is not None and not routing_scale > 0:
        raise ValueError(f"routing_attention: routing_scale must be None or > 0, got {routing_scale!r}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"routing_attention: scale must be a number, got {scale!r}")
    return region


def _pair(size) -> tuple[int, int] | None:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    return None


# ----------------------------------------------------------------------------------------------------------------
# Region-major layout helpers and the routing every backend shares (so that all backends route identically).

def _pad_to_regions(x: torch.Tensor, region: tuple[int, int]) -> torch.Tensor:
    """Zero-pad an NHWC map at the bottom/right to a multiple of the region size."""
    _, h, w, _ = x.shape
    pad_h, pad_w = -h % region[0], -w % region[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def _to_regions(x: torch.Tensor, region: tuple[int, int]) -> torch.Tensor:
    """(B, nh*rh, nw*rw, C) -> (B, nh*nw, rh*rw, C): regions in raster order, tokens in raster order."""
    b, h, w, c = x.shape
    rh, rw = region
    x = x.reshape(b, h // rh, rh, w // rw, rw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // rh) * (w // rw), rh * rw, c)


def _from_regions(x: torch.Tensor, grid: tuple[int, int], region: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_regions`: (B, nh*nw, rh*rw, C) -> (B, nh*rh, nw*rw, C)."""
    b, _, _, c = x.shape
    (nh, nw), (rh, rw) = grid, region
    x = x.reshape(b, nh, nw, rh, rw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * rh, nw * rw, c)


def _valid_tokens_per_region(h: int, w: int, region: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(R, 1) count of real (unpadded) tokens in each region, raster order."""
    rh, rw = region
    rows = torch.clamp(h - torch.arange(0, h, rh, device=device), max=rh)
    cols = torch.clamp(w - torch.arange(0, w, rw, device=device), max=rw)
    return (rows[:, None] * cols[None, :]).reshape(-1, 1)


def region_sums(x: torch.Tensor, region: tuple[int, int]) -> torch.Tensor:
    """Sum of the tokens of every region, straight from the map (no region-major copy).

    Args:
        x: (B, H, W, C) map, any strides (an NCHW tensor's channels-last view is read in place).
        region: (rh, rw) tokens per region; a non-divisible map is zero-padded (padding adds nothing to the sums).

    Returns:
        (B, R, C) float32 (float64 for float64 maps), regions in raster order.
    """
    b, _, _, c = x.shape
    rh, rw = region
    x = _pad_to_regions(x, region)
    nh, nw = x.shape[1] // rh, x.shape[2] // rw
    # float32 (float64 stays): sums of 16-bit tokens would overflow float16 in the affinity product
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.unflatten(2, (nw, rw)).unflatten(1, (nh, rh)).sum(dim=(2, 4), dtype=dtype).reshape(b, nh * nw, c)


def route(q: torch.Tensor, k: torch.Tensor, region_size: tuple[int, int], topk: int,
          routing_scale: float | None = None) -> torch.Tensor:
    """Top-k key regions of every query region, on detached tensors; every backend routes with this function.

    The affinity of two regions is the product of their mean query and mean key, in float32 whatever the input
    dtype (float64 stays float64), also under autocast. Positive factors common to every
    pair (``1 / tokens**2`` when all regions are full, ``routing_scale``) do not change the ranking, so they are
    left out (fewer kernels on a launch-bound GPU host): only float rounding of near ties can depend on them. On a
    padded map the per-region counts differ and the sums are divided by them.

    Args:
        q, k: (B, H, W, C_qk) maps, any strides.
        region_size: (rh, rw).
        topk: regions kept per query region.
        routing_scale: the official query-descriptor multiplier (> 0); it does not change the choice.

    Returns:
        (B, R, topk) int64 indices of key regions (raster order), in no particular order: the attention does not
        depend on it beyond summation order, and on CUDA sorting them was a kernel of its own (7 us of the 72 us
        routing at BiFormer-T's third stage, batch 128 on an H200).
    """
    _, h, w, _ = q.shape
    q_desc = region_sums(q.detach(), region_size)
    k_desc = region_sums(k.detach(), region_size)
    if h % region_size[0] or w % region_size[1]:
        count = _valid_tokens_per_region(h, w, region_size, q.device).to(q_desc.dtype)
        q_desc, k_desc = q_desc / count, k_desc / count
    if autocast_dtype(q.device.type) is not None:
        with torch.autocast(q.device.type, enabled=False):  # keep the affinity in float32 under autocast
            return torch.topk(q_desc @ k_desc.transpose(-1, -2), k=topk, dim=-1, sorted=False).indices
    return torch.topk(q_desc @ k_desc.transpose(-1, -2), k=topk, dim=-1, sorted=False).indices


def _gather_regions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, R, T, C) regions, (B, R, topk) indices -> (B, R, topk * T, C) selected tokens per query region."""
    b, r, t, c = x.shape
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return x[batch, index].reshape(b, r, index.shape[-1] * t, c)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, R, N, C) -> (B, R, heads, N, C / heads)."""
    b, r, n, c = x.shape
    return x.reshape(b, r, n, num_heads, c // num_heads).transpose(2, 3)


def _routing_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int,
                                 region_size: tuple[int, int], topk: int, scale: float,
                                 routing_scale: float | None, layout: str) -> torch.Tensor:
    (q, k, v), index, size = _routed_and_padded(q, k, v, region_size, topk, routing_scale, layout)
    grid = (q.shape[1] // region_size[0], q.shape[2] // region_size[1])
    q_reg, k_reg, v_reg = (_to_regions(t, region_size) for t in (q, k, v))
    k_sel = _split_heads(_gather_regions(k_reg, index), num_heads)  # (B, R, heads, topk*T, d)
    v_sel = _split_heads(_gather_regions(v_reg, index), num_heads)
    attn = torch.softmax((_split_heads(q_reg, num_heads) * scale) @ k_sel.transpose(-1, -2), dim=-1)
    out = (attn @ v_sel).transpose(2, 3)  # (B, R, T, heads, d_v)
    out = _from_regions(out.reshape(*out.shape[:3], out.shape[3] * out.shape[4]), grid, region_size)
    return _cropped(out, size, layout)


def _routed_and_padded(q, k, v, region_size, topk, routing_scale, layout):
    """NHWC views of q, k, v padded to whole regions, the routing (B, R, topk) and the unpadded (H, W)."""
    if layout == "nchw":
        q, k, v = (t.permute(0, 2, 3, 1) for t in (q, k, v))
    size = (q.shape[1], q.shape[2])
    index = route(q, k, region_size, topk, routing_scale)
    return tuple(_pad_to_regions(t, region_size) for t in (q, k, v)), index, size


def _cropped(out: torch.Tensor, size: tuple[int, int], layout: str) -> torch.Tensor:
    """(B, Hp, Wp, C) padded NHWC output -> the caller's layout at the unpadded (H, W)."""
    out = out[:, :size[0], :size[1]]
    return out.permute(0, 3, 1, 2) if layout == "nchw" else out


register_backend(_OP, "reference", _routing_attention_reference, priority=0)


# ----------------------------------------------------------------------------------------------------------------
# sdpa backend: dense attention over all tokens, masked to the routed regions

@cached_constant()
def _token_regions(height: int, width: int, region: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H*W,) int64 region index (raster order of regions) of every token of a divisible H x W map, raster order."""
    rows = torch.arange(height, device=device) // region[0]
    cols = torch.arange(width, device=device) // region[1]
    return (rows[:, None] * (width // region[1]) + cols[None, :]).reshape(height * width)


def _routing_mask(index: torch.Tensor, num_regions: int, token_regions: torch.Tensor) -> torch.Tensor:
    """(B, R, topk) routed regions -> (B, 1, N, N) bool: query token i may read key token j."""
    b = index.shape[0]
    # out of place, from zeros made by the index: under torch.func.vmap the mask is then batched as the index is
    chosen = index.new_zeros(b, num_regions, num_regions, dtype=torch.bool).scatter(2, index, True)
    return chosen[:, token_regions[:, None], token_regions[None, :]].unsqueeze(1)


def _routing_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int,
                            region_size: tuple[int, int], topk: int, scale: float,
                            routing_scale: float | None, layout: str) -> torch.Tensor:
    (q, k, v), index, size = _routed_and_padded(q, k, v, region_size, topk, routing_scale, layout)
    b, hp, wp, _ = q.shape
    mask = _routing_mask(index, index.shape[1], _token_regions(hp, wp, region_size, q.device))
    heads = [t.reshape(b, hp * wp, num_heads, t.shape[-1] // num_heads).transpose(1, 2) for t in (q, k, v)]
    out = sdpa(*heads, attn_mask=mask, scale=scale)  # (B, heads, N, d_v)
    return _cropped(out.transpose(1, 2).reshape(b, hp, wp, v.shape[-1]), size, layout)


# The masked pass costs about a dense one plus the mask; it is chosen on CPU (where the reference is the other
# choice: BiFormer-T stage 2, 196 tokens, top-16 of 49 regions, 2.1 vs 4.5 ms) when the routed keys are at least a
# quarter of the map; below that the routed gather reads fewer bytes. On CUDA the Triton routed kernel measured
# faster at every BiFormer stage (H200, bf16, batch 128, ms fwd / fwd+bwd, masked SDPA vs Triton): T stage 2
# 0.782 / 1.649 vs 0.635 / 1.490, B stage 2 0.918 / 2.019 vs 0.799 / 1.861, stage 1 1.661 / 4.465 vs 0.563 / 1.170.
_SDPA_MIN_ROUTED_SHARE = 0.25


def _sdpa_prefer(q, k, v, *, region_size, topk, layout, **_) -> str | None:
    if q.is_cuda:
        return "on CUDA the routed Triton kernel measured faster than the masked dense pass at every BiFormer stage"
    h, w = (q.shape[1], q.shape[2]) if layout == "nhwc" else (q.shape[2], q.shape[3])
    regions = -(-h // region_size[0]) * -(-w // region_size[1])
    if topk / regions < _SDPA_MIN_ROUTED_SHARE:
        return (f"top-{topk} of {regions} regions is less than {_SDPA_MIN_ROUTED_SHARE:.0%} of the keys: the routed "
                "gather reads fewer bytes than a masked pass over every key")
    return None


register_backend(_OP, "sdpa", _routing_attention_sdpa, prefer=_sdpa_prefer, priority=20)
