"""Triton kernels of :mod:`zoo.ops.triton.neighborhood` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _group_length(length, group, DIL):
    """Positions of one dilation group of an axis: ``length // DIL`` plus one for the first ``length % DIL`` groups."""
    return length // DIL + (group < length % DIL).to(tl.int32)


@triton.jit
def _axis_span(first, count, glen, K: tl.constexpr, CAUSAL: tl.constexpr):
    """Group coordinates [lo, hi) of every key that queries first .. first + count - 1 (clipped to the group) of
    one axis can see: their windows start and end monotonically with the query, so the first and last bound it."""
    last = tl.minimum(first + count, glen) - 1
    if CAUSAL:
        lo = tl.maximum(first - K + 1, 0)
        hi = last + 1
    else:
        lo = tl.minimum(tl.maximum(first - K // 2, 0), glen - K)
        hi = tl.minimum(tl.maximum(last - K // 2, 0), glen - K) + K
    return lo, tl.maximum(hi - lo, 0)


@triton.jit
def _axis_allowed(qi, ki, glen, K: tl.constexpr, CAUSAL: tl.constexpr):
    """[queries, keys]: whether key coordinate ``ki`` is in the window of query coordinate ``qi`` on one axis (group
    coordinates; NATTEN's window: clamped inside the group, or ending at the query when causal)."""
    if CAUSAL:
        ok = (ki[None, :] <= qi[:, None]) & (qi[:, None] - ki[None, :] < K)
    else:
        start = tl.minimum(tl.maximum(qi - K // 2, 0), glen - K)
        ok = (ki[None, :] >= start[:, None]) & (ki[None, :] < start[:, None] + K)
    return ok


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr,
                    sqb, sqh, sqy, sqx, sqd, skb, skh, sky, skx, skd, svb, svh, svy, svx, svd,
                    sob, soh, soy, sox, sod,
                    HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, qk_scale2,
                    KY: tl.constexpr, KX: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_X: tl.constexpr,
                    D: tl.constexpr, DV: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    # grid: (dilation groups x query tiles of a group, batch * heads)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HEADS).to(tl.int64)
    h = bh % HEADS
    tile_x = pid % TILES_X
    tile_y = (pid // TILES_X) % TILES_Y
    group = pid // (TILES_X * TILES_Y)
    gy = group // DIL_X
    gx = group % DIL_X
    glen_y = _group_length(H, gy, DIL_Y)
    glen_x = _group_length(W, gx, DIL_X)

    offs_m = tl.arange(0, TY * TX)
    qy = tile_y * TY + offs_m // TX  # group coordinates of the tile's queries
    qx = tile_x * TX + offs_m % TX
    q_ok = (qy < glen_y) & (qx < glen_x)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = (gy + DIL_Y * qy) * sqy + (gx + DIL_X * qx) * sqx
    q = tl.load(q_ptr + b * sqb + h * sqh + q_rows[:, None] + (offs_d * sqd)[None, :],
                mask=q_ok[:, None] & (offs_d < D)[None, :], other=0.0)

    # the keys any query of the tile can see: a (rows x cols) box of group coordinates, walked BLOCK_N at a time
    lo_y, rows = _axis_span(tile_y * TY, TY, glen_y, KY, CAUSAL_Y)
    lo_x, cols = _axis_span(tile_x * TX, TX, glen_x, KX, CAUSAL_X)
    total = rows * cols
    cols_safe = tl.maximum(cols, 1)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_i = tl.full([TY * TX], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TY * TX], dtype=tl.float32)
    acc = tl.zeros([TY * TX, BLOCK_DV], dtype=tl.float32)
    for start in range(0, total, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        k_ok = j < total
        ky = lo_y + j // cols_safe
        kx = lo_x + j % cols_safe
        y = gy + DIL_Y * ky
        x = gx + DIL_X * kx
        kt = tl.load(k_base + (y * sky + x * skx)[None, :] + (offs_d * skd)[:, None],
                     mask=k_ok[None, :] & (offs_d < D)[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale2
        allowed = (_axis_allowed(qy, ky, glen_y, KY, CAUSAL_Y) & _axis_allowed(qx, kx, glen_x, KX, CAUSAL_X)
                   & k_ok[None, :])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + (y * svy + x * svx)[:, None] + (offs_dv * svd)[None, :],
                     mask=k_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = (gy + DIL_Y * qy) * soy + (gx + DIL_X * qx) * sox
    tl.store(out_ptr + b * sob + h * soh + o_rows[:, None] + (offs_dv * sod)[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & (offs_dv < DV)[None, :])
