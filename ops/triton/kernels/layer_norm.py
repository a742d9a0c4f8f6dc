"""Triton kernels of :mod:`zoo.ops.layer_norm` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, r_ptr, s_ptr, M, C, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                   STATS: tl.constexpr, HAS_RES: tl.constexpr):
    """y = (x - mean) * rstd (* w) (+ b) over the last dim of the (M, C) row-major x, BLOCK_ROWS rows a program
    (grid: cdiv(M, BLOCK_ROWS)), float32 statistics; with STATS also each row's mean and rstd (M,) float32.

    With HAS_RES the row normalized is the residual sum s = x + r (r (M, C) row-major, any float dtype), added in
    float32 and rounded to s's dtype, stored to s_ptr and read back from registers: what ``x + r`` followed by the
    norm gives, in one pass."""
    eps = tl.cast(eps, tl.float32)  # fp64 from inductor's launcher
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = (x + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = tl.rsqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if STATS:  # what the backward needs (inference calls skip the stores and their buffers)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def backward_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, M, C, num_blocks,
                    HAS_W: tl.constexpr, DX: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx (M, C) and, per program, partial dw / db rows (num_programs, C) float32, summed by the caller: each
    program strides over blocks pid, pid + num_programs, ... of BLOCK_ROWS rows, so sums keep a fixed order."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
    for block in range(pid, num_blocks, step):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if DX:
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            mean_g = tl.sum(g, axis=1) / C
            mean_gx = tl.sum(g * xhat, axis=1) / C
            dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if DW:
            dw_acc += dy * xhat
        if DB:
            db_acc += dy
    if DW:
        tl.store(dw_ptr + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if DB:
        tl.store(db_ptr + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def sum_parts_kernel(parts_ptr, out_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r, c] = sum over p of parts[r, p, c], float32 (parts (R, P, C) and out (R, C) contiguous; grid: (R,
    cdiv(C, BLOCK_C))): the backward kernel's per-program partial rows of dw / db, in a fixed order (BLOCK_P rows a
    step, each column's tile then summed as a tree)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_ok[None, :]
        acc += tl.load(parts_ptr + (r * P + rows)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + r * C + cols, tl.sum(acc, axis=0), mask=col_ok)
