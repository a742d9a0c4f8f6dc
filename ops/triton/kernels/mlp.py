"""Triton kernel of :mod:`zoo.ops.mlp` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""

_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _rounded(t, dtype: tl.constexpr):
    """float32 ``t`` rounded to ``dtype`` and back: what a layer writing ``dtype`` hands the next one."""
    return t.to(dtype).to(tl.float32)


@triton.jit
def forward_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, M, CIN, HID, COUT,
                   HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CIN: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_COUT: tl.constexpr, PRECISION: tl.constexpr):
    """y = gelu(x @ w1^T + b1) @ w2^T + b2 for BLOCK_M rows of the row-major (M, CIN) x a program (grid:
    cdiv(M, BLOCK_M)); w1 (HID, CIN) and w2 (COUT, HID) row-major, of any float dtype (converted on load).

    Everything is computed in y's dtype as the unfused layers do under autocast: inputs rounded to it, float32
    accumulation, fc1 + b1 rounded to it, GELU in float32 rounded to it, fc2 + b2 rounded to it. The hidden
    activation lives in registers, BLOCK_H columns at a time: each chunk's fc2 product is added to the output tile.
    """
    dtype = y_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cin = tl.arange(0, BLOCK_CIN)
    cout = tl.arange(0, BLOCK_COUT)
    cin_ok = cin < CIN
    cout_ok = cout < COUT
    x = tl.load(x_ptr + rows[:, None] * CIN + cin[None, :], mask=row_ok[:, None] & cin_ok[None, :], other=0.0)
    x = x.to(dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_COUT), dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        hid = h0 + tl.arange(0, BLOCK_H)
        hid_ok = hid < HID
        w1t = tl.load(w1_ptr + hid[None, :] * CIN + cin[:, None], mask=cin_ok[:, None] & hid_ok[None, :], other=0.0)
        h = tl.dot(x, w1t.to(dtype), input_precision=PRECISION)
        if HAS_B1:
            h += _rounded(tl.load(b1_ptr + hid, mask=hid_ok, other=0.0), dtype)[None, :]
        h = _rounded(h, dtype)
        h = _rounded(0.5 * h * (1.0 + tl.erf(h * _SQRT1_2)), dtype)  # exact GELU (nn.GELU's default)
        w2t = tl.load(w2_ptr + cout[None, :] * HID + hid[:, None], mask=hid_ok[:, None] & cout_ok[None, :], other=0.0)
        acc += tl.dot(h.to(dtype), w2t.to(dtype), input_precision=PRECISION)
    if HAS_B2:
        acc += _rounded(tl.load(b2_ptr + cout, mask=cout_ok, other=0.0), dtype)[None, :]
    tl.store(y_ptr + rows[:, None] * COUT + cout[None, :], acc.to(dtype), mask=row_ok[:, None] & cout_ok[None, :])


_GELU_PDF = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi), ATen's kBeta


@triton.jit
def gelu_backward_kernel(g_ptr, a_ptr, da_ptr, part_ptr, M, N, ROWS_PER_SPLIT,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The exact GELU's backward and the column sums of its result (grid: (splits, cdiv(N, BLOCK_N))).

    For row-major (M, N) g (the GELU output's gradient) and a (its input): da = g * GELU'(a), computed in float32 as
    ATen's ``gelu_backward`` computes it and stored in da's dtype; program (s, j) takes rows [s * ROWS_PER_SPLIT,
    (s + 1) * ROWS_PER_SPLIT) of column block j and stores the float32 sum of its stored (rounded) da values over
    those rows in part[s, columns]: partial sums of the bias gradient of the linear layer that made ``a``.
    """
    dtype = da_ptr.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    first = tl.program_id(0).to(tl.int64) * ROWS_PER_SPLIT
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(0, ROWS_PER_SPLIT, BLOCK_M, num_stages=3):  # loads issued ahead of the arithmetic
        rows = first + step + tl.arange(0, BLOCK_M)
        ok = (rows < M)[:, None] & col_ok[None, :]
        at = rows[:, None] * N + cols[None, :]
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(a * _SQRT1_2))
        pdf = tl.exp(-0.5 * a * a) * _GELU_PDF
        da = (g * (cdf + a * pdf)).to(dtype)
        tl.store(da_ptr + at, da, mask=ok)
        total += da.to(tl.float32)  # masked entries are 0: g loads 0 there
    tl.store(part_ptr + tl.program_id(0) * N + cols, tl.sum(total, axis=0), mask=col_ok)


@triton.jit
def column_sum_kernel(g_ptr, part_ptr, M, N, ROWS_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial column sums of a row-major (M, N) g (grid: (splits, cdiv(N, BLOCK_N))): program (s, j) stores the
    float32 sum of rows [s * ROWS_PER_SPLIT, (s + 1) * ROWS_PER_SPLIT) of column block j in part[s, columns]. A linear
    layer's bias gradient is the sum of these over s (:func:`zoo.ops.linear`)."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    first = tl.program_id(0).to(tl.int64) * ROWS_PER_SPLIT
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(0, ROWS_PER_SPLIT, BLOCK_M, num_stages=3):  # loads issued ahead of the additions
        rows = first + step + tl.arange(0, BLOCK_M)
        ok = (rows < M)[:, None] & col_ok[None, :]
        total += tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(part_ptr + tl.program_id(0) * N + cols, tl.sum(total, axis=0), mask=col_ok)
