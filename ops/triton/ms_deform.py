"""Triton kernels of multi-scale deformable attention (the ``triton`` backend of :func:`zoo.ops.ms_deform_attn`).

Layouts (all contiguous): value ``[B, S, M, C]``, locations ``[B, Q, M, L, P, 2]``, weights ``[B, Q, M, L, P]``,
output ``[B, Q, M, C]``. A "sample" is one ``(b, q, m, l, p)``; its flat index ``n`` addresses the weights
(``n``) and the locations (``2n``, ``2n + 1``), and ``n // (L * P)`` is its output row ``(b, q, m)``.

Forward (``_forward_kernel``): one program per (query block, head, batch); per level a ``[BLOCK_Q, P, C]`` tile of
the four bilinear corners is gathered (each corner row is ``C`` contiguous channels: coalesced, vectorised loads),
weighted by ``a * w_corner`` and accumulated in float32; one reduction over points at the end.

Backward, deterministic by construction (no float atomics anywhere):
  1. ``_sample_grad_kernel`` (same tiling as the forward) re-gathers the corners and reduces over channels to get,
     per sample, ``grad_attention = <g, sampled>`` and ``grad_loc = a * (W, H) * <g, d sampled / d(x, y)>``;
     each sample is owned by one program, so these are plain stores. It also writes the sample's *cell*: the
     top-left corner ``(y0, x0)`` of its 2x2 footprint on a grid padded by one row/column on the top/left
     (``y0, x0 >= -1``), offset per (batch, head, level) -- or a sentinel when the footprint misses the map --
     and a 16-byte record ``(x, y, a)`` (pixel coordinates and weight, float32) for pass 3.
  2. ``torch.sort(cells, stable=True)`` groups samples by cell (stable: ties keep ascending sample order, so the
     permutation is a pure function of the inputs), and ``torch.searchsorted`` turns the sorted cells into CSR
     segment offsets.
  3. ``_value_grad_kernel``: one program per (block of value pixels, head, batch) *gathers* the contributions
     ``a * w * g`` of every sample whose footprint covers each pixel. A pixel ``(y, x)`` is covered by the cells
     ``(y, x-1), (y, x), (y-1, x-1), (y-1, x)``; the first two and the last two are adjacent in cell order, so that
     is two contiguous ranges of the sorted samples. The bilinear weight of a covered pixel is
     ``(1 - |xs - x|) (1 - |ys - y|)``, so no corner bookkeeping is needed. Each gradient element is a float32 sum
     in a fixed order, written once.
  Cost of determinism against an atomic scatter: one int32 sort of ``N = B*Q*M*L*P`` keys (+ its int64
  permutation; CUB radix sort, a few passes over ~12 bytes per sample) and a search; ``N`` keys, records and the
  permutation (28 bytes per sample: 160 MB at the Focus-DETR encoder shape); and each sample's ``grad_out`` row and
  record are read four times (once per covered pixel) instead of ``4*C`` atomic adds per sample (the official
  CUDA op's way, which is not bitwise repeatable). Deterministic means: same inputs, same GPU, same tile
  configuration -> identical bits.

No sync with the host anywhere: all sizes come from tensor shapes (the cell space is bounded by ``2*S + 2*L`` per
(batch, head), since ``(H+1)(W+1) <= 2*H*W + 2``), as CUDA-graph capture requires.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import triton
import triton.language as tl

from .._cache import tracing
from . import direct, is_num_warps, override_knobs

__all__ = ["msda_forward", "msda_backward", "INTERPRETED", "TILES", "use_tiles", "corners_per_pixel",
           "pixel_tile_kind"]


@triton.jit
def _level_shape(shapes_ptr, level):
    """(H, W) of one level as int32 scalars."""
    return tl.load(shapes_ptr + 2 * level).to(tl.int32), tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)


@triton.jit
def _load_samples(loc_ptr, attn_ptr, sample, ok):
    """Locations (x, y) and weight of a tile of samples, in float32."""
    lx = tl.load(loc_ptr + 2 * sample, mask=ok, other=0.0).to(tl.float32)
    ly = tl.load(loc_ptr + 2 * sample + 1, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(attn_ptr + sample, mask=ok, other=0.0).to(tl.float32)
    return lx, ly, a


@triton.jit
def _pixel_coords(lx, ly, height, width):
    """Continuous pixel coordinates (align_corners=False), clamped to a range that keeps integers sane.

    Anything beyond [-1, size] has all four corners outside the map, so clamping to [-2, size + 1] changes no
    output or gradient; it only keeps the float->int conversion defined for huge or infinite locations.
    """
    wf = width.to(tl.float32)
    hf = height.to(tl.float32)
    x = tl.minimum(tl.maximum(lx * wf - 0.5, -2.0), wf + 1.0)
    y = tl.minimum(tl.maximum(ly * hf - 0.5, -2.0), hf + 1.0)
    return x, y


@triton.jit
def _gather_corner(value_base, start, yi, xi, height, width, S, ok, offs_c, c_ok, ROW: tl.constexpr,
                   EVEN_C: tl.constexpr):
    """Value rows ``[..., C]`` (float32) at integer pixel (yi, xi) of one level; zeros outside the map."""
    inside = ok & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    pixel = start + yi * width + xi
    inside = inside & (pixel < S)  # memory safety if spatial_shapes disagree with value
    ptrs = value_base + (pixel.to(tl.int64) * ROW)[:, :, None] + offs_c[None, None, :]
    return tl.load(ptrs, mask=_row_mask(inside, c_ok, EVEN_C), other=0.0).to(tl.float32)


@triton.jit
def _row_mask(rows_ok, c_ok, EVEN_C: tl.constexpr):
    """Mask of a [..., C] tile of rows. Without a channel mask when C fills the block, so loads can vectorise."""
    if EVEN_C:
        mask = rows_ok[:, :, None]
    else:
        mask = rows_ok[:, :, None] & c_ok[None, None, :]
    return mask


@triton.jit
def _query_block(Q, M: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """This program's head and batch (grid: query blocks, heads, batch), its query, point and channel offsets, the
    (query, point) mask and the output rows (b, q, m) as int64.

    Takes no pointer: torch's Triton mutation analysis counts every argument of a helper whose results reach a
    store address as written, and a written input costs a copy under torch.compile."""
    head = tl.program_id(1)
    batch = tl.program_id(2)
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    ok = (offs_q < Q)[:, None] & (offs_p < P)[None, :]
    row = (batch * Q + offs_q).to(tl.int64) * M + head
    return head, batch, offs_q, offs_p, tl.arange(0, BLOCK_C), ok, row


@triton.jit
def _level_start(starts_ptr, level, running, HAS_STARTS: tl.constexpr):
    """First value pixel of ``level``: from level_start_index, else the running sum of the earlier levels' sizes."""
    if HAS_STARTS:
        start = tl.load(starts_ptr + level).to(tl.int32)
    else:
        start = running
    return start


@triton.jit
def _footprints(loc_ptr, attn_ptr, sample, ok, height, width):
    """A tile of samples of one level: weight a, continuous pixel (x, y), top-left corner (x0, y0) of the bilinear
    footprint and the fractions (fx, fy)."""
    lx, ly, a = _load_samples(loc_ptr, attn_ptr, sample, ok)
    x, y = _pixel_coords(lx, ly, height, width)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return a, x, y, x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@triton.jit
def _forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, S, Q, num_levels,
                    M: tl.constexpr, C: tl.constexpr, L: tl.constexpr, P: tl.constexpr, HAS_STARTS: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    ROW: tl.constexpr = M * C  # elements between consecutive value pixels
    EVEN_C: tl.constexpr = C == BLOCK_C
    head, batch, offs_q, offs_p, offs_c, ok, row = _query_block(Q, M, P, BLOCK_Q, BLOCK_P, BLOCK_C)
    c_ok = offs_c < C
    value_base = value_ptr + batch.to(tl.int64) * S * ROW + head * C
    acc = tl.zeros((BLOCK_Q, BLOCK_P, BLOCK_C), dtype=tl.float32)
    running = 0
    # a runtime loop (not unrolled): unrolling lets the compiler hoist all levels' gathers and run out of registers
    for level in range(num_levels):
        height, width = _level_shape(shapes_ptr, level)
        start = _level_start(starts_ptr, level, running, HAS_STARTS)
        running = running + height * width
        sample = (row[:, None] * L + level) * P + offs_p[None, :]
        a, x, y, x0, y0, fx, fy = _footprints(loc_ptr, attn_ptr, sample, ok, height, width)
        wy0 = a * (1.0 - fy)
        wy1 = a * fy
        v = _gather_corner(value_base, start, y0, x0, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        acc += v * (wy0 * (1.0 - fx))[:, :, None]
        v = _gather_corner(value_base, start, y0, x0 + 1, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        acc += v * (wy0 * fx)[:, :, None]
        v = _gather_corner(value_base, start, y0 + 1, x0, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        acc += v * (wy1 * (1.0 - fx))[:, :, None]
        v = _gather_corner(value_base, start, y0 + 1, x0 + 1, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        acc += v * (wy1 * fx)[:, :, None]
    out = tl.sum(acc, axis=1)
    out_ptrs = out_ptr + row[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_q < Q)[:, None] & c_ok[None, :])


@triton.jit
def _sample_grad_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, gout_ptr,
                        gloc_ptr, gattn_ptr, cell_ptr, record_ptr, S, Q, num_levels, CELLS, SENTINEL,
                        M: tl.constexpr, C: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                        HAS_STARTS: tl.constexpr, WRITE_CELLS: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    ROW: tl.constexpr = M * C  # elements between consecutive value pixels
    EVEN_C: tl.constexpr = C == BLOCK_C
    head, batch, offs_q, offs_p, offs_c, ok, row = _query_block(Q, M, P, BLOCK_Q, BLOCK_P, BLOCK_C)
    c_ok = offs_c < C
    value_base = value_ptr + batch.to(tl.int64) * S * ROW + head * C
    q_ok = offs_q < Q
    g = tl.load(gout_ptr + row[:, None] * C + offs_c[None, :], mask=q_ok[:, None] & c_ok[None, :], other=0.0)
    g = g.to(tl.float32)[:, None, :]
    cell_base = (batch * M + head).to(tl.int64) * CELLS
    running = 0
    running_cells = 0
    for level in range(num_levels):
        height, width = _level_shape(shapes_ptr, level)
        start = _level_start(starts_ptr, level, running, HAS_STARTS)
        running = running + height * width
        sample = (row[:, None] * L + level) * P + offs_p[None, :]
        a, x, y, x0, y0, fx, fy = _footprints(loc_ptr, attn_ptr, sample, ok, height, width)
        fx = fx[:, :, None]
        fy = fy[:, :, None]
        v00 = _gather_corner(value_base, start, y0, x0, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        v01 = _gather_corner(value_base, start, y0, x0 + 1, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        v10 = _gather_corner(value_base, start, y0 + 1, x0, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        v11 = _gather_corner(value_base, start, y0 + 1, x0 + 1, height, width, S, ok, offs_c, c_ok, ROW, EVEN_C)
        top = v00 + fx * (v01 - v00)
        bottom = v10 + fx * (v11 - v10)
        sampled = top + fy * (bottom - top)
        d_dx = (1.0 - fy) * (v01 - v00) + fy * (v11 - v10)
        d_dy = bottom - top
        grad_a = tl.sum(sampled * g, axis=2)
        grad_x = a * width.to(tl.float32) * tl.sum(d_dx * g, axis=2)
        grad_y = a * height.to(tl.float32) * tl.sum(d_dy * g, axis=2)
        tl.store(gattn_ptr + sample, grad_a.to(gattn_ptr.dtype.element_ty), mask=ok)
        tl.store(gloc_ptr + 2 * sample, grad_x.to(gloc_ptr.dtype.element_ty), mask=ok)
        tl.store(gloc_ptr + 2 * sample + 1, grad_y.to(gloc_ptr.dtype.element_ty), mask=ok)
        if WRITE_CELLS:
            # footprint's top-left on the grid padded by one row/column above/left: (y0 + 1, x0 + 1) in [0, H]x[0, W]
            touches = (x0 >= -1) & (x0 < width) & (y0 >= -1) & (y0 < height)
            cell = running_cells + (y0 + 1) * (width + 1) + (x0 + 1)
            touches = touches & (cell < CELLS)
            key = tl.where(touches, cell_base + cell, SENTINEL)
            tl.store(cell_ptr + sample, key.to(cell_ptr.dtype.element_ty), mask=ok)
            # (x, y, a) in one 16-byte record: the value-gradient gather then reads one sector per sample
            tl.store(record_ptr + 4 * sample, x, mask=ok)
            tl.store(record_ptr + 4 * sample + 1, y, mask=ok)
            tl.store(record_ptr + 4 * sample + 2, a, mask=ok)
        running_cells = running_cells + (height + 1) * (width + 1)


@triton.jit
def _value_grad_kernel(shapes_ptr, starts_ptr, record_ptr, gout_ptr, perm_ptr, seg_ptr, gvalue_ptr,
                       S, CELLS,
                       M: tl.constexpr, C: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                       HAS_STARTS: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_s = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    # which level, row and column each value pixel is, and where its level's cells begin
    ys = tl.zeros((BLOCK_S,), tl.int32)
    xs = tl.zeros((BLOCK_S,), tl.int32)
    ws = tl.zeros((BLOCK_S,), tl.int32)
    cs = tl.zeros((BLOCK_S,), tl.int32)
    found = offs_s < 0
    running = 0
    running_cells = 0
    for level in tl.static_range(L):
        height, width = _level_shape(shapes_ptr, level)
        if HAS_STARTS:
            start = tl.load(starts_ptr + level).to(tl.int32)
        else:
            start = running
        running = running + height * width
        local = offs_s - start
        here = (local >= 0) & (local < height * width) & (running_cells + (height + 1) * (width + 1) <= CELLS)
        ys = tl.where(here, local // width, ys)
        xs = tl.where(here, local % width, xs)
        ws = tl.where(here, width, ws)
        cs = tl.where(here, running_cells, cs)
        found = found | here
        running_cells = running_cells + (height + 1) * (width + 1)
    s_ok = found & (offs_s < S)
    # the two contiguous runs of cells that cover (y, x): {(y, x-1), (y, x)} and {(y-1, x-1), (y-1, x)}
    cell_base = (batch * M + head).to(tl.int64) * CELLS + cs
    cell_top = cell_base + (ys + 1) * (ws + 1) + xs + 1
    cell_bottom = cell_base + ys * (ws + 1) + xs + 1
    lo_a = tl.load(seg_ptr + cell_top - 1, mask=s_ok, other=0)
    hi_a = tl.load(seg_ptr + cell_top + 1, mask=s_ok, other=0)
    lo_b = tl.load(seg_ptr + cell_bottom - 1, mask=s_ok, other=0)
    hi_b = tl.load(seg_ptr + cell_bottom + 1, mask=s_ok, other=0)
    n_a = hi_a - lo_a
    n = n_a + (hi_b - lo_b)
    n_max = tl.max(n, axis=0)
    xs_f = xs.to(tl.float32)[:, None]
    ys_f = ys.to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for first in range(0, n_max, BLOCK_E):
        i = first + offs_e[None, :]
        e_ok = i < n[:, None]
        j = tl.where(i < n_a[:, None], lo_a[:, None] + i, lo_b[:, None] + (i - n_a[:, None]))
        sample = tl.load(perm_ptr + j, mask=e_ok, other=0)
        x = tl.load(record_ptr + 4 * sample, mask=e_ok, other=0.0)
        y = tl.load(record_ptr + 4 * sample + 1, mask=e_ok, other=0.0)
        a = tl.load(record_ptr + 4 * sample + 2, mask=e_ok, other=0.0)
        # these samples' footprints cover the pixel, so |x - xs|, |y - ys| <= 1 and this is the bilinear weight
        w = a * tl.maximum(1.0 - tl.abs(x - xs_f), 0.0) * tl.maximum(1.0 - tl.abs(y - ys_f), 0.0)
        w = tl.where(e_ok, w, 0.0)
        out_row = sample // (L * P)
        g_ptrs = gout_ptr + (out_row * C)[:, :, None] + offs_c[None, None, :]
        g = tl.load(g_ptrs, mask=_row_mask(e_ok, c_ok, C == BLOCK_C), other=0.0).to(tl.float32)
        acc += tl.sum(g * w[:, :, None], axis=1)
    value_row = (batch * S + offs_s).to(tl.int64) * M + head
    out_ptrs = gvalue_ptr + value_row[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, acc.to(gvalue_ptr.dtype.element_ty), mask=(offs_s < S)[:, None] & c_ok[None, :])


# True when this module's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET was set at import)
INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------------------------
# launchers


# Tile sizes and warps per kernel, from ``zoo.ops.bench_ms_deform.sweep_ms_deform_tiles`` on an H200 (torch 2.11,
# Focus-DETR R50 shapes at batch 2, kernel ms against the first defaults, which every kernel shared: 2048 elements,
# 4 warps); ``use_tiles`` overrides them. Results are bitwise repeatable for a fixed configuration (the reduction
# trees depend on the tile shape).
#   forward:     the forward kernel, a [queries, points, channels] tile of ``elements`` elements. 4096 / 4 warps:
#                decoder fp32 0.023 -> 0.014, encoder bf16 0.272 -> 0.228 (fp32 0.276 -> 0.259).
#   sample:      the per-sample backward, same tiling. 1024 / 2 warps: the whole backward, decoder fp32
#                0.179 -> 0.173, encoder 1.86 -> 1.78 (4096 elements, best for the forward, made it 2.05).
#   pixel:       the value-gradient gather where samples are sparse (fewer corners per value pixel than a dense
#                step's ``samples``: a decoder's 900 queries, ~2.6 a pixel), a [pixels, samples, channels] tile;
#                ``samples`` entries are read per step. 4096 / 4 warps (32 pixels a program): decoder backward
#                fp32 0.180 -> 0.154, bf16 0.179 -> 0.154.
#   dense_pixel: the same where each pixel fills a step (the encoder, ~40 a pixel). 1024 / 2 warps (one pixel a
#                program): encoder backward fp32 1.86 -> 1.55, bf16 1.85 -> 1.52 (4096 / 4 warps: 1.74).
# All four together (same sweep, second run): backward decoder fp32 0.148 (official CUDA op 0.152), encoder fp32
# 1.46 (2.23); forward 0.014 and 0.258 (0.061 and 0.89).
TILES: dict[str, dict[str, int]] = {
    "forward": {"elements": 4096, "num_warps": 4},
    "sample": {"elements": 1024, "num_warps": 2},
    "pixel": {"elements": 4096, "samples": 32, "num_warps": 4},
    "dense_pixel": {"elements": 1024, "samples": 32, "num_warps": 2},
}


def use_tiles(forward: dict[str, int] | None = None, sample: dict[str, int] | None = None,
              pixel: dict[str, int] | None = None,
              dense_pixel: dict[str, int] | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override entries of :data:`TILES` (for tuning sweeps).

    Args:
        forward: any of ``elements`` (>= 1) and ``num_warps`` for the forward kernel.
        sample: the same keys for the per-sample backward kernel.
        pixel: any of ``elements``, ``samples`` (>= 1) and ``num_warps`` for the value-gradient gather where
            samples are sparse; ``dense_pixel``: the same where they are dense (see :func:`pixel_tile_kind`).
    Unknown keys and bad values raise ``ValueError`` here (``num_warps``: a power of two from 1 to 32).
    """
    given = {"forward": forward, "sample": sample, "pixel": pixel, "dense_pixel": dense_pixel}
    for name, config in given.items():
        unknown = sorted(set(config or {}) - set(TILES[name]))
        if unknown:
            raise ValueError(f"use_tiles({name}=...): unknown keys {unknown}; known: {sorted(TILES[name])}")
        for key, value in (config or {}).items():
            if not (is_num_warps(value) if key == "num_warps" else type(value) is int and value >= 1):
                accepted = "a power of two from 1 to 32" if key == "num_warps" else "an int >= 1"
                raise ValueError(f"use_tiles({name}=...): {key} must be {accepted}, got {value!r}")
    return _tiles_overridden({name: config or {} for name, config in given.items()})


@contextlib.contextmanager
def _tiles_overridden(overrides: dict[str, dict[str, int]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name, config in overrides.items():
            stack.enter_context(override_knobs(TILES[name], **config))
        yield


def corners_per_pixel(tokens: int, queries: int, levels: int, points: int) -> float:
    """Mean number of sample corners per value pixel (4 per sample), a function of the shapes only."""
    return 4 * queries * levels * points / max(1, tokens)


def pixel_tile_kind(per_pixel: float) -> str:
    """``"dense_pixel"`` where the mean corners per value pixel fill a dense gather step, else ``"pixel"``: the
    :data:`TILES` entry of the value-gradient gather."""
    return "dense_pixel" if per_pixel >= TILES["dense_pixel"]["samples"] else "pixel"


def _sample_tile(points: int, channels: int, kind: str) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_P, BLOCK_C, num_warps) of the forward (``kind="forward"``) or the per-sample backward
    (``"sample"``) kernel."""
    cfg = TILES[kind]
    block_p = triton.next_power_of_2(points)
    block_c = max(triton.next_power_of_2(channels), 4)
    block_q = max(1, min(128, cfg["elements"] // (block_p * block_c)))
    return block_q, block_p, block_c, cfg["num_warps"]


def _pixel_tile(channels: int, per_pixel: float) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_E, BLOCK_C, num_warps) of the value-gradient gather: pixels x samples x channels.

    ``per_pixel`` is the mean number of sample corners per value pixel (a function of the shapes only, so the
    configuration, and with it the bits of the result, do not depend on the data). Sparse sampling (a decoder's
    900 queries over an encoder's 22k tokens: ~2.6 corners a pixel) gets narrow sample steps over many pixels
    (``TILES["pixel"]``); with the encoder's ~40 a pixel, wide steps over few pixels (``TILES["dense_pixel"]``).
    """
    cfg = TILES[pixel_tile_kind(per_pixel)]
    block_c = max(triton.next_power_of_2(channels), 4)
    block_e = min(cfg["samples"], max(4, triton.next_power_of_2(math.ceil(per_pixel))))
    block_s = max(1, min(64, cfg["elements"] // (block_e * block_c)))
    return block_s, block_e, block_c, cfg["num_warps"]


def _prepare(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor | None,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor):
    device = value.device
    shapes = spatial_shapes.to(device=device).contiguous()
    starts = level_start_index.to(device=device).contiguous() if level_start_index is not None else None
    return (value.contiguous(), shapes, starts, sampling_locations.contiguous(), attention_weights.contiguous())


def msda_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor | None,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor, launch=direct) -> torch.Tensor:
    """Forward pass: value [B, S, M, C], loc [B, Q, M, L, P, 2], weights [B, Q, M, L, P] -> [B, Q, M*C].

    Each input may be float32/float16/bfloat16 independently; float32 accumulation; output in value's dtype.
    """
    value, shapes, starts, loc, attn = _prepare(value, spatial_shapes, level_start_index, sampling_locations,
                                                attention_weights)
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = loc.shape
    out = value.new_empty((batch, queries, heads * channels))
    if out.numel() == 0:
        return out
    if levels * points == 0:  # a weighted sum over no samples
        return out.zero_()
    block_q, block_p, block_c, warps = _sample_tile(points, channels, "forward")
    grid = (triton.cdiv(queries, block_q), heads, batch)
    launch(_forward_kernel)[grid](
        value, shapes, starts if starts is not None else shapes, loc, attn, out, tokens, queries, levels,
        M=heads, C=channels, L=levels, P=points, HAS_STARTS=starts is not None,
        BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return out


def _cells_per_head(tokens: int, levels: int) -> int:
    # sum_l (H+1)(W+1) = S + sum_l (H + W + 1) and H + W <= H*W + 1, so 2S + 2L bounds the padded cell grid
    return 2 * tokens + 2 * levels


def msda_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                  level_start_index: torch.Tensor | None, sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor, need_value_grad: bool = True, launch=direct
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic backward: (grad_value, grad_sampling_locations, grad_attention_weights) in their inputs' dtypes.

    ``grad_out`` is ``[B, Q, M*C]`` in any float dtype. See the module docstring for the passes.
    """
    value, shapes, starts, loc, attn = _prepare(value, spatial_shapes, level_start_index, sampling_locations,
                                                attention_weights)
    grad_out = grad_out.contiguous()
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = loc.shape
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    if not need_value_grad or attn.numel() == 0 or value.numel() == 0:
        grad_value = torch.zeros_like(value)
        if attn.numel() == 0:
            return grad_value, grad_loc, grad_attn
    cells = _cells_per_head(tokens, levels)
    sentinel = batch * heads * cells
    key_dtype = torch.int32 if sentinel < 2**31 - 1 else torch.int64
    if need_value_grad:
        keys = torch.empty(attn.shape, device=value.device, dtype=key_dtype)
        records = torch.empty((*attn.shape, 4), device=value.device, dtype=torch.float32)
    else:
        keys = records = attn  # not written
    block_q, block_p, block_c, warps = _sample_tile(points, channels, "sample")
    launch(_sample_grad_kernel)[(triton.cdiv(queries, block_q), heads, batch)](
        value, shapes, starts if starts is not None else shapes, loc, attn, grad_out, grad_loc, grad_attn, keys,
        records, tokens, queries, levels, cells, sentinel,
        M=heads, C=channels, L=levels, P=points, HAS_STARTS=starts is not None, WRITE_CELLS=need_value_grad,
        BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    if not need_value_grad or value.numel() == 0:
        return grad_value, grad_loc, grad_attn
    grad_value = _value_grad(grad_out, value, shapes, starts, loc, keys, records, cells, sentinel, launch)
    return grad_value, grad_loc, grad_attn


_ARANGE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _cell_boundaries(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``arange(count)``, the cell ids searched in the sorted keys: a prefix of one growing cached ramp per dtype
    and device (one launch less a backward; detection batches change size, so no per-shape cache)."""
    if tracing():
        return torch.arange(count, device=device, dtype=dtype)
    key = (dtype, torch.device(device))
    ramp = _ARANGE.get(key)
    if ramp is None or ramp.numel() < count:
        with torch.inference_mode(False):
            ramp = torch.arange(count + count // 4, device=device, dtype=dtype)
        _ARANGE[key] = ramp
    return ramp[:count]


def _value_grad(grad_out, value, shapes, starts, loc, keys, records, cells: int, sentinel: int,
                launch=direct) -> torch.Tensor:
    """Sort samples by cell, build CSR offsets, gather per value pixel (passes 2 and 3 of the module docstring)."""
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = loc.shape
    sorted_keys, perm = torch.sort(keys.flatten(), stable=True)
    boundaries = _cell_boundaries(sentinel + 1, sorted_keys.dtype, value.device)
    # bool(): a guard, not a SymBool, when torch.compile traces with symbolic sizes
    seg = torch.searchsorted(sorted_keys, boundaries, out_int32=bool(sorted_keys.numel() < 2**31 - 1))
    grad_value = torch.empty_like(value)
    # The gather reads each sample's output-gradient row once per covered pixel. From float32 rows it ran 2.8x
    # faster than from bfloat16 ones at the decoder shape (H200: 78 against 215 us; encoder 1.05 against 1.48 ms;
    # the value's and the locations' dtypes made no difference), far more than the cast costs.
    grad_rows = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
    block_s, block_e, block_c, warps = _pixel_tile(channels, corners_per_pixel(tokens, queries, levels, points))
    launch(_value_grad_kernel)[(triton.cdiv(tokens, block_s), heads, batch)](
        shapes, starts if starts is not None else shapes, records, grad_rows, perm, seg, grad_value, tokens, cells,
        M=heads, C=channels, L=levels, P=points, HAS_STARTS=starts is not None,
        BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_C=block_c, num_warps=warps)
    return grad_value
