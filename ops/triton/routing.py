"""The ``triton`` backend of :func:`zoo.ops.routing_attention`: fused bi-level routing attention, no gathered K/V.

Importing this module registers the backend (priority 10, above ``reference``) and the three ``torch.library``
ops ``zoo::routing_route``, ``zoo::routing_attention_fwd`` and ``zoo::routing_attention_bwd``; it does not import
triton.
The kernels (:mod:`zoo.ops.triton.kernels`) are imported on first use, so ``TRITON_INTERPRET`` is read then (set
it before the first call to run them on CPU).

Computation (same definition as the reference backend, :mod:`zoo.ops.routing`):

1. **Routing** in two kernels where the map has at most 64 regions (BiFormer: 49): ``_region_sums_kernel`` (one
   program per batch item, row of regions and 64 channels) sums q and k over each region straight from the strided
   maps (a 0/1 region-membership matrix times each token tile, float32 accumulation); ``_route_topk_kernel`` (one
   program per 16 query regions, or per batch item from about three 16-region programs per SM) takes their
   float32-accurate affinity with every key region (3xTF32 tensor-core products, ``tf32x3``, where the GPU has
   TF32), divided by the key regions' token counts (as :func:`zoo.ops.routing.route`'s means), and the top-k by
   repeated arg-max. They replace route()'s five kernels (two reductions, a float32 GEMM, the top-k and its sort:
   72 us at BiFormer-T's third stage, batch 128 on the H200); measured there: region sums 15 us, affinity + top-k
   14 us (51 with IEEE float32 products on CUDA cores; plain TF32 chose differently in 13 of 6,272 query regions,
   3xTF32 in none). The affinities are the reference's up to float32 rounding, so a near tie may resolve
   differently from the reference backend; larger region grids route with route(). The region sums read 32-token
   tiles of up to 128 channels (H200 sweep, bf16 batch 128: BiFormer-T stage 2 15.4 -> 9.7 us, BiFormer-B stage 2
   23.0 -> 15.9 against 64 x 64 tiles; stages 0 and 1 alike). One program per batch item doing both steps (no sums
   buffer) measured 2-9x slower at every batch from 1 to 256 (too few programs), so routing stays two kernels.
   The attention itself never materialises anything.
2. **Attention** (``_forward_kernel``): one program per (batch, head, query region, query tile). Its keys are the
   ``topk * T`` tokens of its selected regions (``T = rh * rw``), numbered ``n = slot * T + token``; key tiles of
   ``BLOCK_N`` consecutive ``n`` are loaded row by row straight from the un-gathered (B, H, W, C) tensor (row
   address from the routing index and the token's (y, x)), so a tile may span several small regions: BiFormer-T's
   64/16/4-token regions at top-1/4/16 are all one 64-key tile, with no padding of regions to 16 tokens on the key
   side. Online softmax in float32 (base 2), output and the row log-sum-exp stored. Query tiles are
   ``max(16, next_pow2(T))`` rows (at most 64) because ``tl.dot`` needs 16; with 2x2 regions that leaves 12 of 16
   rows idle, which costs tensor-core work only (the masked rows are never loaded or stored).
   On CUDA each program takes a row of the region grid's query regions in turn where that still leaves at least 12
   programs per SM, else 2 regions, else 1 (``_Geometry.default_group``): neighbouring query regions select many
   of the same key regions, whose rows the loads then find in L1 (same bits as one region a program). H200,
   BiFormer-T stage 2, batch 128 bf16: 83 -> 64 us; BiFormer-B stage 2: 123 -> 93 us.
   ``use_tiles(query_regions=G)`` forces G.
   **Head-packed forward** (``_packed_forward_kernel``): HP heads share a query tile (row m is token ``m % T`` of
   head ``m // T``), each row's query holding only its head's channels, so one Q @ K^T over the heads' channels
   side by side gives each row its own head's scores and the keys and values are loaded once for all HP heads
   (every head routes to the same regions); same multiply-adds, fewer idle rows, 1/HP of the programs. By default
   (``_Geometry.default_heads_per_tile``) 2 heads share a tile where two regions fit the 16-row minimum (T <= 8),
   for 16-bit inputs on CUDA while the packed grid keeps 12 programs per SM; ``use_tiles(heads_per_tile=HP)``
   forces HP. H200 sweep, bf16 batch 128, forward us (a row of regions a program): BiFormer-T stage 2 64.8 -> 60.2
   at HP 2 and 1 warp (HP 4: 71.9 at best; 2 to 8 warps at HP 2: 74-138), BiFormer-B stage 2 94.2 -> 84.5;
   16-token regions (stage 1, 32-row packed tiles) 46.0 -> 61.2 at best, so never packed there. Not bitwise the
   plain kernel's in general (products summed in other groupings; at 1 warp it measured equal); an inf or NaN in
   one head's keys reaches the other heads' rows of the tile (0 * inf).
3. **Backward**, deterministic (no atomics; every gradient element is one program's float32 sum in a fixed order):
   * ``_dq_kernel`` (the forward's grid): ``delta = rowsum(dO * O)`` (stored for the next kernel), then dQ over the
     same key tiles as the forward.
   * inverse routing lists: per key region, the ascending list of query regions that selected it (CSR), from
     ``_inverse_routing_kernel`` (one program per batch item and key region: the list starts after the item's
     entries that selected a lower region) where an item's entries fit one program, else a stable torch sort of
     the (batch, key region) of every (query region, slot) entry and a ``searchsorted``.
   * ``_dkv_kernel``: one program per (batch, head, key region, key tile) accumulates dK and dV over the query tokens
     of its list, numbered ``m = entry * T + token`` and tiled by ``BLOCK_M`` like the forward's keys, so 2x2
     regions still fill a 64-row query tile.
   * Packed dQ and dK/dV kernels (HP heads a tile as in the forward) measured no faster than these at any HP,
     warps and region group (H200, bf16 batch 128, backward us: BiFormer-T stage 2 masked 340, routed 356, packed
     at best 355; stage 1 routed 203, packed at best 286), so the backward never packs heads.
   * The **masked backward** replaces both kernels (and the lists) where the routed tiles are mostly idle (2x2
     regions at top-16: BiFormer's third stage): ``_masked_dq_kernel`` and ``_masked_dkv_kernel`` tile the padded
     map in raster order (64 x 64 tiles, flash-attention's backward) and mask each score to the regions the query
     row's region selected, held as the bits of one int64 per row (so at most 64 regions). It is chosen when its
     score-tile columns per query row (the padded map) are no more than the routed kernels'. H200, BiFormer-T stage
     2 (14x14, top-16), batch 128 bf16, kernel us: masked dQ 105 + dK/dV 182 against routed dQ 116 + lists 38 +
     dK/dV 221. The same masking in a forward kernel measured slower than the routed forward (115 against 86 us),
     so the forward is always routed. Both backwards read the row statistics in one (B * heads, R, T) layout.

Padding (H or W not a multiple of the region): as the reference, out-of-map tokens are zeros: padded keys take part
with logit 0 and value 0 (masked loads give exactly that), padded queries are neither loaded nor stored (their
output is cropped, so they receive no gradient), and region descriptors average the real tokens only.

Layouts: the kernels read q, k, v, dO through their strides as (B, H, W, C) views, so ``nchw`` inputs (the channels
of a 1x1-conv output) are read in place; outputs and gradients are written as contiguous NHWC (for ``nchw`` the
result is the same channels-last NCHW view the reference returns).

Numerics: float32 accumulation for every product; fp32 inputs use IEEE dots (no TF32, like torch's default
matmul); fp16/bf16 probabilities are rounded to the input dtype before the P @ V product (as flash attention).
Results are bitwise repeatable for a given launch configuration (``use_tiles``).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .._dispatch import planned, register_backend
from ..routing import route
from . import (INT32_MAX, check_count, check_tile_edge, device_reason, direct, dot_precision, fp32_dot_precision,
               item_extent, kernel_op, kernels_interpreted, needs_grad, next_pow2, on_device, override_knobs, sm_count,
               traced, triton_missing_reason)

__all__ = ["routing_attention_triton", "use_tiles", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "MAX_MASKED_REGIONS",
           "MAX_ROUTE_REGIONS"]

_OP = "routing_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

# Launch knobs. max_block: the largest tile edge (rows of a query or key tile); 64 covers BiFormer-T's 64 keys per
# query region in one tile, tests lower it to exercise the multi-tile loops on tiny shapes. num_warps / num_stages:
# None picks by tile size (see _launch_options); set them to sweep on a GPU. No autotuner: its timing runs allocate a
# 256 MB L2-flush buffer inside the caller's first backward (it would show in peak-memory benchmarks) and could pick
# different configurations in different processes.
# backward: "routed" or "masked" forces that backward (masked only where R <= 64); None chooses by tile work.
_TILES: dict[str, int | str | None] = {"max_block": 64, "num_warps": None, "num_stages": None, "backward": None,
                                       "query_regions": None, "heads_per_tile": None}
_BACKWARDS = ("routed", "masked")
MAX_MASKED_REGIONS = 64  # the masked backward holds a query row's selected regions as the bits of one int64


def use_tiles(max_block: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
              backward: str | None = None, query_regions: int | None = None,
              heads_per_tile: int | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override the launch knobs (None keeps the current value).

    Args:
        max_block: largest tile edge, a power of two >= 16 (smaller tiles make tiny shapes take several tiles).
        num_warps, num_stages: Triton launch options of all kernels (default: chosen by tile size).
        backward: ``"routed"`` or ``"masked"`` forces that backward (``"masked"`` only where the map has at most
            64 regions; elsewhere the routed one runs); by default it is chosen by tile work (module docstring).
        query_regions: consecutive query regions each forward program takes in turn (default: a row of regions,
            2 or 1 by programs per SM; 1 off CUDA).
        heads_per_tile: heads sharing a forward query tile where a region has at most ``max_block / 2`` tokens
            (default: 2 or 1, see ``_Geometry.default_heads_per_tile``; at most as many as fill ``max_block`` rows).
    """
    check_tile_edge("max_block", max_block)
    if backward is not None and backward not in _BACKWARDS:
        raise ValueError(f"backward={backward!r} is not a routing backward; expected one of {_BACKWARDS} or None")
    check_count("query_regions", query_regions)
    check_count("heads_per_tile", heads_per_tile)
    return override_knobs(_TILES, max_block=max_block, num_warps=num_warps, num_stages=num_stages,
                          backward=backward, query_regions=query_regions, heads_per_tile=heads_per_tile)


def _launch_options(rows: int, cols: int, dtype: torch.dtype, dkv: bool = False,
                    packed_channels: int = 0) -> dict[str, int]:
    """num_warps / num_stages for a kernel whose score tile is rows x cols (``dkv``: the dK/dV kernel;
    ``packed_channels``: the width of the packed forward's q/k rows, several heads' channels side by side)."""
    # 4 warps: the usual choice for 64 x 64 tiles at head dim 32. fp32 runs IEEE dots on CUDA cores, whose 64 x 64
    # tiles spill at 4 warps. 16-bit 16 x 64 tiles (regions of <= 16 tokens: BiFormer stages 2 and 3) are latency
    # bound, so more programs in flight beat wider ones; H200 sweep at BiFormer-T bf16 stage 2 (stage 1), us per
    # kernel, 4 warps -> chosen: forward 148 -> 92 (78 -> 55) at 1 warp, dQ 160 -> 118 (96 -> 77) at 1 warp,
    # dK/dV 344 -> 223 (177 -> 121) at 2 warps.
    small_16bit = dtype != torch.float32 and rows * cols <= 16 * 64
    default = (2 if dkv else 1) if small_16bit else (8 if dtype == torch.float32 and rows * cols >= 64 * 64 else 4)
    if packed_channels > 64:  # H200, BiFormer-T stage 2 bf16, 4 heads a tile (128 channels): 1 warp 78, 2 warps 72 us
        default = 2 if small_16bit else (8 if dtype == torch.float32 and rows * cols >= 64 * 64 else 4)
    return {"num_warps": _TILES["num_warps"] or default, "num_stages": _TILES["num_stages"] or 2}


# ----------------------------------------------------------------------------------------------------------------
# kernels (built on first use)

def _kernels_interpreted() -> bool:
    """Whether the kernels run (or, not yet built, will run) in Triton's CPU interpreter."""
    return kernels_interpreted(f"{__package__}.kernels.routing")


@functools.cache
def _kernels():
    """The kernel module (imports triton on first use): the routing kernels, the forward, both backwards' dQ
    (+ delta) and dK/dV kernels, and the routed backward's inverse routing lists."""
    from .kernels import routing as kernels

    return kernels


# ----------------------------------------------------------------------------------------------------------------
# launches


class _Geometry:
    """Sizes of one call: map (H, W), region (rh, rw), region grid, heads and head sizes, tiles."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, index: torch.Tensor, num_heads: int, region_h: int,
                 region_w: int):
        self.b, self.h, self.w, c_qk = q.shape
        self.rh, self.rw = region_h, region_w
        self.t = region_h * region_w
        self.nw = -(-self.w // region_w)
        self.r = -(-self.h // region_h) * self.nw
        self.topk = index.shape[-1]
        self.heads = num_heads
        self.d_qk, self.d_v = c_qk // num_heads, v.shape[-1] // num_heads
        cap = _TILES["max_block"]
        self.block_q = min(cap, max(16, next_pow2(self.t)))          # query tile of one region (forward, dQ)
        self.block_keys = min(cap, max(16, next_pow2(self.topk * self.t)))  # key tile over the selected regions
        self.block_k = min(cap, max(16, next_pow2(self.t)))          # key tile of one region (dK/dV)
        self.block_rows = cap                                         # query tile over a key region's list (dK/dV)
        self.block_map = cap                                          # query and key tiles of the masked backward
        sms = sm_count(q) if q.is_cuda else None
        # heads sharing a forward query tile (packed: row m is token m % T of head m // T)
        wanted = _TILES["heads_per_tile"] or self.default_heads_per_tile(sms, q.dtype)
        self.hp = max(1, min(wanted, self.heads, cap // self.t))
        self.block_packed = max(16, next_pow2(self.hp * self.t))      # packed query tile
        # query regions a forward program takes in turn
        self.group = min(self.r, _TILES["query_regions"] or self.default_group(sms))

    def default_heads_per_tile(self, sms: int | None, dtype: torch.dtype) -> int:
        """Heads sharing a forward query tile: 2 where two regions fit the 16-row minimum tile (T <= 8) and the
        packed grid still keeps 12 programs per SM with a row of regions a program, for 16-bit inputs on CUDA (the
        measured case, module docstring: BiFormer stage 2 at batch 128); else 1.

        Args:
            sms: the GPU's SM count; None (not CUDA: the interpreter) packs no heads.
            dtype: the inputs' dtype (float32 runs its dots on CUDA cores, where packing was not measured).
        """
        if sms is None or dtype == torch.float32 or self.heads < 2 or 2 * self.t > 16:
            return 1
        return 2 if self.query_tiles(self.nw, 2) >= 12 * sms else 1

    def default_group(self, sms: int | None) -> int:
        """Query regions a forward program takes in turn: a row of the region grid (neighbouring query regions
        select many of the same key regions, so their rows come from L1), else 2, while the grid keeps at least
        12 programs per SM; 1 off CUDA. H200 (132 SMs), BiFormer stages, bf16 forward us at batch 32 / 128: T.s2
        21.6 / 82.8 at 1 region, 18.4 / 64.2 at a row (7); T.s0 16.2 / 61.4 at 1, 16.1 / 56.6 at 2; with fewer
        programs per SM (batch <= 4 to 16) a group is slower than 1 region (2.8 -> 9.2 us at T.s2, batch 1).

        Args:
            sms: the GPU's SM count; None (not CUDA: the interpreter) takes 1 region a program.
        """
        if sms is None:
            return 1
        enough = 12 * sms
        for group in (self.nw, 2):
            if 1 < group < self.r and self.query_tiles(group, self.hp) >= enough:
                return group
        return 1

    def masked_backward(self) -> bool:
        """Whether the masked backward runs: forced by ``use_tiles(backward=...)``, else when its score tiles per
        query row are no more than the routed kernels' (whose query tiles idle all but T of >= 16 rows)."""
        if self.r > MAX_MASKED_REGIONS or _TILES["backward"] == "routed":
            return False
        if _TILES["backward"] == "masked":
            return True
        per_row = self.block_q // min(self.t, self.block_q)
        routed = per_row * -(-self.topk * self.t // self.block_keys) * self.block_keys
        whole = -(-self.r * self.t // self.block_map) * self.block_map
        return whole <= routed

    def constexprs(self) -> dict:
        return dict(RH=self.rh, RW=self.rw, DQK=self.d_qk, DV=self.d_v, BLOCK_DQK=max(16, next_pow2(self.d_qk)),
                    BLOCK_DV=max(16, next_pow2(self.d_v)))

    def packed_constexprs(self) -> dict:
        """The packed forward's shapes: ``HP`` heads' rows in a ``BLOCK_M`` tile, their channels side by side."""
        return dict(RH=self.rh, RW=self.rw, DQK=self.d_qk, DV=self.d_v, HP=self.hp, BLOCK_M=self.block_packed,
                    BLOCK_CQK=max(16, next_pow2(self.hp * self.d_qk)), BLOCK_CV=max(16, next_pow2(self.hp * self.d_v)))

    def masked_constexprs(self) -> dict:
        return dict(TOPK=self.topk, BLOCK_TOPK=next_pow2(self.topk), BLOCK_M=self.block_map,
                    BLOCK_N=self.block_map, **self.constexprs())

    def runtime(self) -> tuple[int, ...]:
        return self.h, self.w, self.nw, self.r, self.heads

    def query_tiles(self, group: int = 1, heads_per_tile: int = 1) -> int:
        """Programs of a kernel over query tiles: batch * groups of ``heads_per_tile`` heads * groups of ``group``
        query regions * tiles (one where heads share a tile)."""
        return self.b * -(-self.heads // heads_per_tile) * -(-self.r // group) * -(-self.t // self.block_q)

    def key_tiles(self) -> int:
        """Programs of the dK/dV kernel: batch * heads * key regions * tiles."""
        return self.b * self.heads * self.r * -(-self.t // self.block_k)

    def map_tiles(self) -> int:
        """Programs of the masked backward's kernels: batch * heads * tiles of the padded map."""
        return self.b * self.heads * -(-self.r * self.t // self.block_map)


def _launch_forward(q, k, v, index, num_heads, region_h, region_w, scale, launch=direct, stats: bool = True):
    """The output and, with ``stats``, the row log-sum-exps the backward needs (else None: inference)."""
    geo = _Geometry(q, v, index, num_heads, region_h, region_w)
    out = torch.empty((geo.b, geo.h, geo.w, v.shape[-1]), device=v.device, dtype=v.dtype)
    lse = torch.empty((geo.b * geo.heads, geo.r, geo.t), device=q.device, dtype=torch.float32) if stats else None
    if geo.b * geo.heads * geo.r == 0:  # empty batch: nothing to launch (a zero-size grid is an error)
        return out, lse
    args = (q, k, v, index.contiguous(), out, out if lse is None else lse, *q.stride(), *k.stride(), *v.stride(),
            *geo.runtime(), scale * _LOG2E)
    common = dict(TOPK=geo.topk, BLOCK_N=geo.block_keys, PRECISION=dot_precision(q.dtype), STATS=stats,
                  GROUP=geo.group)
    if geo.hp > 1:
        launch(_kernels()._packed_forward_kernel)[(geo.query_tiles(geo.group, geo.hp),)](
            *args, **common, **geo.packed_constexprs(),
            **_launch_options(geo.block_packed, geo.block_keys, q.dtype, packed_channels=geo.hp * geo.d_qk))
    else:
        launch(_kernels()._forward_kernel)[(geo.query_tiles(geo.group),)](
            *args, BLOCK_M=geo.block_q, **common, **geo.constexprs(),
            **_launch_options(geo.block_q, geo.block_keys, q.dtype))
    return out, lse


# the one-launch inverse routing holds a batch item's R * topk entries in each program (BiFormer: 49 to 784)
_MAX_FUSED_ENTRIES = 4096


def _inverse_routing(index: torch.Tensor, launch=direct) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key region, the query regions that selected it (CSR; deterministic, no host sync).

    Args:
        index: (B, R, topk) int routing index.

    Returns:
        offsets (B * R + 1,) int32: the list of key region ``b * R + r`` is ``sources[offsets[g]:offsets[g + 1]]``;
        sources (B * R * topk,) int32: query regions as ``b * R + r``, ascending within each list.
    """
    b, r, topk = index.shape
    if r * topk <= _MAX_FUSED_ENTRIES and b > 0 and (index.is_cuda or _kernels_interpreted()):
        # one kernel instead of the sort, search and index arithmetic below (each a launch: host time on a GPU)
        offsets = torch.empty(b * r + 1, device=index.device, dtype=torch.int32)
        sources = torch.empty(b * r * topk, device=index.device, dtype=torch.int32)
        launch(_kernels()._inverse_routing_kernel)[(b, r)](index.contiguous(), offsets, sources, r, TOPK=topk,
                                                           BLOCK_E=max(16, next_pow2(r * topk)))
        return offsets, sources
    key_region = (index.long() + torch.arange(b, device=index.device).view(b, 1, 1) * r).reshape(-1)
    sorted_keys, entries = torch.sort(key_region, stable=True)  # stable: ascending query region within a list
    offsets = torch.searchsorted(sorted_keys, torch.arange(b * r + 1, device=index.device))
    return offsets.to(torch.int32), (entries // topk).to(torch.int32)


def _launch_backward(grad_out, q, k, v, out, lse, index, num_heads, region_h, region_w, scale, launch=direct):
    geo = _Geometry(q, v, index, num_heads, region_h, region_w)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    delta = torch.empty_like(lse)
    if lse.numel() == 0:
        return dq, dk, dv
    index = index.contiguous()
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    precision = dot_precision(q.dtype)
    if geo.masked_backward():
        args = (*strides, *geo.runtime(), scale, scale * _LOG2E)
        options = _launch_options(geo.block_map, geo.block_map, q.dtype)
        launch(_kernels()._masked_dq_kernel)[(geo.map_tiles(),)](
            q, k, v, out, grad_out, index, lse, delta, dq, *args, PRECISION=precision, **geo.masked_constexprs(),
            **options)
        launch(_kernels()._masked_dkv_kernel)[(geo.map_tiles(),)](
            q, k, v, grad_out, index, lse, delta, dk, dv, *args, PRECISION=precision, **geo.masked_constexprs(),
            **options)
        return dq, dk, dv
    launch(_kernels()._dq_kernel)[(geo.query_tiles(),)](
        q, k, v, out, grad_out, index, lse, delta, dq, *strides, *geo.runtime(), scale, scale * _LOG2E,
        TOPK=geo.topk, BLOCK_M=geo.block_q, BLOCK_N=geo.block_keys, PRECISION=precision, **geo.constexprs(),
        **_launch_options(geo.block_q, geo.block_keys, q.dtype))
    offsets, sources = _inverse_routing(index, launch)
    launch(_kernels()._dkv_kernel)[(geo.key_tiles(),)](
        q, k, v, grad_out, lse, delta, offsets, sources, dk, dv, *strides, *geo.runtime(), scale, scale * _LOG2E,
        BLOCK_M=geo.block_rows, BLOCK_N=geo.block_k, PRECISION=precision, **geo.constexprs(),
        **_launch_options(geo.block_k, geo.block_rows, q.dtype, dkv=True))
    return dq, dk, dv


MAX_ROUTE_REGIONS = 64  # the top-k kernel holds a query region's affinities to every key region in one tile row


def _launch_route(q: torch.Tensor, k: torch.Tensor, region_h: int, region_w: int, topk: int,
                  launch=direct) -> torch.Tensor:
    """(B, R, topk) int64 top-k key regions of every query region: region sums, then affinity and top-k."""
    b, h, w, c = q.shape
    nw = -(-w // region_w)
    nh = -(-h // region_h)
    r = nh * nw
    index = torch.empty((b, r, topk), device=q.device, dtype=torch.int64)
    if b == 0:
        return index
    block_r = max(16, next_pow2(r))
    sums = torch.empty((2, b, r, c), device=q.device, dtype=torch.float32)  # q's then k's
    block_c = min(128, max(16, next_pow2(c)))  # 32 tokens x 128 channels: the H200 sweep (module docstring)
    launch(_kernels()._region_sums_kernel)[(b, nh, -(-c // block_c))](
        q, k, sums, *q.stride(), *k.stride(), h, w, nw, r, c, b, RH=region_h, RW=region_w,
        BLOCK_NW=max(16, next_pow2(nw)), BLOCK_T=32, BLOCK_C=block_c, PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2)
    block_q = _route_block_q(q, b, block_r)
    launch(_kernels()._route_topk_kernel)[(b, -(-r // block_q))](
        sums, index, h, w, nw, r, c, b, RH=region_h, RW=region_w, TOPK=topk, BLOCK_Q=block_q, BLOCK_R=block_r,
        BLOCK_C=32, PRECISION=fp32_dot_precision(q), num_warps=4, num_stages=2)
    return index


def _route_block_q(q: torch.Tensor, batch: int, block_r: int) -> int:
    """Query regions per top-k program: 16, or all of them (each program then reads its item's key-region sums
    once) when 16-region tiles would make more than 3 programs per SM. Measured on the H200 (132 SMs) at BiFormer's
    stages: all 64 are 1.2-1.6x faster from batch 128, 16 are 1.2-1.5x faster up to batch 64."""
    if q.is_cuda and batch * (block_r // 16) > 3 * sm_count(q):
        return block_r
    return 16


def _route_fake(q, k, region_h, region_w, topk):
    b, h, w, _ = q.shape
    return q.new_empty((b, -(-h // region_h) * -(-w // region_w), topk), dtype=torch.int64)


@kernel_op("zoo::routing_route", fake=_route_fake)
def _route_op(q: torch.Tensor, k: torch.Tensor, region_h: int, region_w: int, topk: int) -> torch.Tensor:
    """(B, R, topk) int64 routing index of (B, H, W, C) maps (any strides), computed by the routing kernels."""
    with on_device(q):
        return _launch_route(q, k, region_h, region_w, topk, traced)


def _route(q: torch.Tensor, k: torch.Tensor, region_size: tuple[int, int], topk: int,
           routing_scale: float | None) -> torch.Tensor:
    """The routing index: the routing kernels where the map has at most 64 regions, else :func:`route`."""
    rh, rw = region_size
    if -(-q.shape[1] // rh) * -(-q.shape[2] // rw) > MAX_ROUTE_REGIONS:
        return route(q, k, region_size, topk, routing_scale)
    q, k = q.detach(), k.detach()
    if torch.compiler.is_compiling():
        return _route_op(q, k, rh, rw, topk)
    with on_device(q):
        return _launch_route(q, k, rh, rw, topk)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (for torch.compile) and autograd


def _forward_fake(q, k, v, index, num_heads, region_h, region_w, scale):
    b, h, w, _ = q.shape
    regions = -(-h // region_h) * -(-w // region_w)
    return (v.new_empty((b, h, w, v.shape[-1])),
            q.new_empty((b * num_heads, regions, region_h * region_w), dtype=torch.float32))


def _backward_fake(grad_out, q, k, v, out, lse, index, num_heads, region_h, region_w, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("zoo::routing_attention_fwd", fake=_forward_fake)
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, num_heads: int,
                region_h: int, region_w: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused routed attention on (B, H, W, C) views (any strides) with a (B, R, topk) integer routing index.

    Returns the (B, H, W, C_v) contiguous output in v's dtype and the (B * heads, R, rh * rw) float32 base-2
    log-sum-exp of every query token (padded tokens included) for the backward.
    """
    with on_device(q):
        return _launch_forward(q, k, v, index, num_heads, region_h, region_w, scale, traced)


@kernel_op("zoo::routing_attention_bwd", fake=_backward_fake)
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, index: torch.Tensor, num_heads: int, region_h: int, region_w: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic fused backward: contiguous (B, H, W, C) gradients of q, k and v in their dtypes."""
    with on_device(q):
        return _launch_backward(grad_out, q, k, v, out, lse, index, num_heads, region_h, region_w, scale, traced)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, index, num_heads, region_h, region_w, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, index, out, lse)
    ctx.params = (num_heads, region_h, region_w, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, index, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, index, *ctx.params)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerRouting(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls.

    ``torch.library`` dispatch costs tens of microseconds of host time per call, as much as a stage's whole kernel
    on an H200; graphs under ``torch.compile`` use the ``torch.library`` ops (no graph break).
    """

    @staticmethod
    def forward(ctx, q, k, v, index, num_heads, region_h, region_w, scale):
        with on_device(q):  # (the launches replayed from a call plan where plans are on: zoo.ops._dispatch.planned)
            out, lse = planned("routing_attention.forward", _launch_forward, q, k, v, index, num_heads, region_h,
                               region_w, scale)
        ctx.save_for_backward(q, k, v, index, out, lse)
        ctx.params = (num_heads, region_h, region_w, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, out, lse = ctx.saved_tensors
        with on_device(q):
            dq, dk, dv = planned("routing_attention.backward", _launch_backward, grad_out, q, k, v, out, lse, index,
                                 *ctx.params)
        return dq, dk, dv, None, None, None, None, None


def _routed_attention(q, k, v, index, num_heads: int, region_h: int, region_w: int, scale: float) -> torch.Tensor:
    """Fused routed attention: the ``torch.library`` op inside ``torch.compile``, the bare autograd function in
    eager."""
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, index, num_heads, region_h, region_w, scale)[0]
    if not needs_grad(q, k, v):  # inference: no autograd node, no saved statistics
        with on_device(q):
            return _launch_forward(q, k, v, index, num_heads, region_h, region_w, scale, stats=False)[0]
    return _EagerRouting.apply(q, k, v, index, num_heads, region_h, region_w, scale)


# ----------------------------------------------------------------------------------------------------------------
# the backend


def routing_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int,
                             region_size: tuple[int, int], topk: int, scale: float,
                             routing_scale: float | None = None, layout: str = "nhwc") -> torch.Tensor:
    """Bi-level routing attention with the fused Triton kernels (the arguments of :func:`routing_attention`).

    Args:
        q, k: (B, H, W, C_qk) for ``"nhwc"`` or (B, C_qk, H, W) for ``"nchw"``; v likewise with C_v channels;
            one dtype among float32/float16/bfloat16, on CUDA (or CPU under ``TRITON_INTERPRET=1``, not bf16).

    Returns:
        (B, H, W, C_v) for ``"nhwc"``, (B, C_v, H, W) (a channels-last view) for ``"nchw"``, in v's dtype.
    """
    if layout == "nchw":
        q, k, v = (t.permute(0, 2, 3, 1) for t in (q, k, v))
    index = _route(q, k, region_size, topk, routing_scale)
    out = _routed_attention(q, k, v, index, num_heads, region_size[0], region_size[1], scale)
    return out.permute(0, 3, 1, 2) if layout == "nchw" else out


def _triton_available() -> str | None:
    return triton_missing_reason()


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int,
                     region_size: tuple[int, int], topk: int, scale: float, routing_scale: float | None = None,
                     layout: str = "nhwc") -> str | None:
    """Why the triton backend cannot serve these arguments, or None."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}; needs one of float32/float16/bfloat16 for all"
    if not (q.device == k.device == v.device):
        return f"q, k, v on different devices ({q.device}, {k.device}, {v.device})"
    c_axis = -1 if layout == "nhwc" else 1
    d_qk, d_v = q.shape[c_axis] // num_heads, v.shape[c_axis] // num_heads
    if max(d_qk, d_v) > MAX_HEAD_DIM:
        return f"head dims q/k {d_qk}, v {d_v}; the kernels take at most {MAX_HEAD_DIM}"
    b, h, w = (q.shape[0], *q.shape[1:3]) if layout == "nhwc" else (q.shape[0], *q.shape[2:4])
    rh, rw = region_size
    padded_rows = b * num_heads * -(-h // rh) * rh * -(-w // rw) * rw  # log-sum-exp entries, indexed in int32
    if any(item_extent(t) > INT32_MAX for t in (q, k, v)) or padded_rows > INT32_MAX:
        return "tensors too large for the kernels' 32-bit in-image offsets"
    return device_reason(q.device, (q.dtype,), _kernels_interpreted())


register_backend(_OP, "triton", routing_attention_triton, supports=_triton_supports, priority=10,
                 available=_triton_available)
