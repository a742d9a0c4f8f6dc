"""Triton kernels of :mod:`zoo.ops.triton.neighborhood` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested
from .window import _load_tokens  # a [positions, BLOCK_C] tile of one head at image positions (y, x)

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _group_length(length, group, DIL):
    """Positions of one dilation group of an axis: ``length // DIL`` plus one for the first ``length % DIL`` groups."""
    return length // DIL + (group < length % DIL).to(tl.int32)


@triton.jit
def _axis_span(first, count, glen, K: tl.constexpr, CAUSAL: tl.constexpr):
    """(lo, size): the group coordinates [lo, lo + size) of every key that queries first .. first + count - 1
    (clipped to the group) of one axis can see; their windows start and end monotonically with the query, so the
    first and last bound it."""
    last = tl.minimum(first + count, glen) - 1
    if CAUSAL:
        lo = tl.maximum(first - K + 1, 0)
        hi = last + 1
    else:
        lo = tl.minimum(tl.maximum(first - K // 2, 0), glen - K)
        hi = tl.minimum(tl.maximum(last - K // 2, 0), glen - K) + K
    return lo, tl.maximum(hi - lo, 0)


@triton.jit
def _in_window(qi, ki, glen, K: tl.constexpr, CAUSAL: tl.constexpr):
    """Whether key coordinate ``ki`` is in the window of query coordinate ``qi`` on one axis, elementwise with
    broadcasting (group coordinates; NATTEN's window: clamped inside the group, or ending at the query when
    causal)."""
    if CAUSAL:
        ok = (ki <= qi) & (qi - ki < K)
    else:
        start = tl.minimum(tl.maximum(qi - K // 2, 0), glen - K)
        ok = (ki >= start) & (ki < start + K)
    return ok


@triton.jit
def _query_span(first, count, glen, K: tl.constexpr, CAUSAL: tl.constexpr):
    """Group coordinates [lo, lo + size) of every query whose window holds one of the keys first .. first + count
    - 1 (clipped to the group) of one axis: the inverse of :func:`_axis_span`."""
    last = tl.minimum(first + count, glen) - 1
    if CAUSAL:
        lo = first
        hi = tl.minimum(last + K - 1, glen - 1)
    else:
        # window starts are clamp(q - K // 2, 0, glen - K), non-decreasing in q: the first query whose window
        # reaches `first` and the last whose window starts at or before `last`
        lo = tl.where(first - K + 1 <= 0, 0, first - K + 1 + K // 2)
        hi = tl.where(last >= glen - K, glen - 1, last + K // 2)
    return lo, tl.maximum(hi - lo + 1, 0)


@triton.jit
def _program_tile(HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, TY: tl.constexpr, TX: tl.constexpr):
    """This program's batch item (int64), head, dilation group (gy, gx) and its lengths, the first group
    coordinates of its TY x TX tile, and per tile position its group coordinates, validity and image coordinates
    (grid: groups x tiles of a group, batch * heads). Takes no pointer: torch.compile's mutation analysis would count
    it as written (see test_kernels_compile.py)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    tile_x = pid % TILES_X
    tile_y = (pid // TILES_X) % TILES_Y
    group = pid // (TILES_X * TILES_Y)
    gy = group // DIL_X
    gx = group % DIL_X
    glen_y = _group_length(H, gy, DIL_Y)
    glen_x = _group_length(W, gx, DIL_X)
    offs = tl.arange(0, TY * TX)
    cy = tile_y * TY + offs // TX
    cx = tile_x * TX + offs % TX
    return ((bh // HEADS).to(tl.int64), bh % HEADS, gy, gx, glen_y, glen_x, tile_y * TY, tile_x * TX, cy, cx,
            (cy < glen_y) & (cx < glen_x), gy + DIL_Y * cy, gx + DIL_X * cx)


@triton.jit
def _box_positions(start, lo_y, lo_x, cols, total, BLOCK: tl.constexpr):
    """Group coordinates (y, x) and validity of the BLOCK positions from ``start`` of a box walked in raster order."""
    j = start + tl.arange(0, BLOCK)
    cols_safe = tl.maximum(cols, 1)
    return lo_y + j // cols_safe, lo_x + j % cols_safe, j < total


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
                    sqb, sqh, sqy, sqx, sqd, skb, skh, sky, skx, skd, svb, svh, svy, svx, svd,
                    sob, soh, soy, sox, sod,
                    HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, qk_scale2,
                    KY: tl.constexpr, KX: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_X: tl.constexpr,
                    D: tl.constexpr, DV: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr):
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, gy, gx, glen_y, glen_x, first_y, first_x, qy, qx, q_ok, y_q, x_q = _program_tile(
        HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, TY, TX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tokens(q_ptr + b * sqb + h * sqh, y_q, x_q, q_ok, offs_d, sqy, sqx, sqd, D)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    # the keys any query of the tile can see: a box of group coordinates, walked BLOCK_N at a time
    lo_y, rows = _axis_span(first_y, TY, glen_y, KY, CAUSAL_Y)
    lo_x, cols = _axis_span(first_x, TX, glen_x, KX, CAUSAL_X)
    m_i = tl.full([TY * TX], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TY * TX], dtype=tl.float32)
    acc = tl.zeros([TY * TX, BLOCK_DV], dtype=tl.float32)
    for start in range(0, rows * cols, BLOCK_N):
        ky, kx, k_ok = _box_positions(start, lo_y, lo_x, cols, rows * cols, BLOCK_N)
        y = gy + DIL_Y * ky
        x = gx + DIL_X * kx
        k = _load_tokens(k_base, y, x, k_ok, offs_d, sky, skx, skd, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
        allowed = (_in_window(qy[:, None], ky[None, :], glen_y, KY, CAUSAL_Y)
                   & _in_window(qx[:, None], kx[None, :], glen_x, KX, CAUSAL_X) & k_ok[None, :])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tokens(v_base, y, x, k_ok, offs_dv, svy, svx, svd, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_rows = y_q * soy + x_q * sox
    tl.store(out_ptr + b * sob + h * soh + o_rows[:, None] + (offs_dv * sod)[None, :],
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & (offs_dv < DV)[None, :])
    if STATS:  # base-2 log-sum-exp of the scaled logits, per query, in the output's (contiguous) token order
        tl.store(lse_ptr + (b * HEADS + h) * H * W + y_q * W + x_q, m_i + tl.log2(l_safe), mask=q_ok)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, lse_ptr, dq_ptr, delta_ptr,
               sqb, sqh, sqy, sqx, sqd, skb, skh, sky, skx, skd, svb, svh, svy, svx, svd,
               sob, soh, soy, sox, sod,
               HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, scale, qk_scale2,
               KY: tl.constexpr, KX: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_X: tl.constexpr,
               D: tl.constexpr, DV: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of a query tile over the box of keys it sees, and delta = rowsum(dO * O) for the dK/dV pass. out and dO
    share the out strides; dQ is contiguous (B, heads, H, W, D); lse and delta are (B, heads, H, W) float32."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)
    b, h, gy, gx, glen_y, glen_x, first_y, first_x, qy, qx, q_ok, y_q, x_q = _program_tile(
        HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, TY, TX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tokens(q_ptr + b * sqb + h * sqh, y_q, x_q, q_ok, offs_d, sqy, sqx, sqd, D)
    do = _load_tokens(do_ptr + b * sob + h * soh, y_q, x_q, q_ok, offs_dv, soy, sox, sod, DV)
    o = _load_tokens(out_ptr + b * sob + h * soh, y_q, x_q, q_ok, offs_dv, soy, sox, sod, DV)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    token = (b * HEADS + h) * H * W + y_q * W + x_q
    lse = tl.load(lse_ptr + token, mask=q_ok, other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    lo_y, rows = _axis_span(first_y, TY, glen_y, KY, CAUSAL_Y)
    lo_x, cols = _axis_span(first_x, TX, glen_x, KX, CAUSAL_X)
    dq = tl.zeros([TY * TX, BLOCK_D], dtype=tl.float32)
    for start in range(0, rows * cols, BLOCK_N):
        ky, kx, k_ok = _box_positions(start, lo_y, lo_x, cols, rows * cols, BLOCK_N)
        y = gy + DIL_Y * ky
        x = gx + DIL_X * kx
        k = _load_tokens(k_base, y, x, k_ok, offs_d, sky, skx, skd, D)
        v = _load_tokens(v_base, y, x, k_ok, offs_dv, svy, svx, svd, DV)
        allowed = (_in_window(qy[:, None], ky[None, :], glen_y, KY, CAUSAL_Y)
                   & _in_window(qx[:, None], kx[None, :], glen_x, KX, CAUSAL_X) & k_ok[None, :] & q_ok[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + (b * HEADS + h) * H * W * D + (y_q * W + x_q)[:, None] * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_ok[:, None] & (offs_d < D)[None, :])
    tl.store(delta_ptr + token, delta, mask=q_ok)


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                sqb, sqh, sqy, sqx, sqd, skb, skh, sky, skx, skd, svb, svh, svy, svx, svd,
                sob, soh, soy, sox, sod,
                HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, scale, qk_scale2,
                KY: tl.constexpr, KX: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_X: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of a key tile over the box of queries whose windows hold its keys (no atomics: each program owns
    its keys). dK and dV are contiguous (B, heads, H, W, .)."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)
    b, h, gy, gx, glen_y, glen_x, first_y, first_x, ky, kx, k_ok, y_k, x_k = _program_tile(
        HEADS, H, W, DIL_Y, DIL_X, TILES_Y, TILES_X, TY, TX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tokens(k_ptr + b * skb + h * skh, y_k, x_k, k_ok, offs_d, sky, skx, skd, D)
    v = _load_tokens(v_ptr + b * svb + h * svh, y_k, x_k, k_ok, offs_dv, svy, svx, svd, DV)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sob + h * soh
    stat_base = (b * HEADS + h) * H * W
    lo_y, rows = _query_span(first_y, TY, glen_y, KY, CAUSAL_Y)
    lo_x, cols = _query_span(first_x, TX, glen_x, KX, CAUSAL_X)
    dk = tl.zeros([TY * TX, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TY * TX, BLOCK_DV], dtype=tl.float32)
    for start in range(0, rows * cols, BLOCK_M):
        qy, qx, q_ok = _box_positions(start, lo_y, lo_x, cols, rows * cols, BLOCK_M)
        y = gy + DIL_Y * qy
        x = gx + DIL_X * qx
        q = _load_tokens(q_base, y, x, q_ok, offs_d, sqy, sqx, sqd, D)
        do = _load_tokens(do_base, y, x, q_ok, offs_dv, soy, sox, sod, DV)
        lse = tl.load(lse_ptr + stat_base + y * W + x, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + stat_base + y * W + x, mask=q_ok, other=0.0)
        allowed = (_in_window(qy[None, :], ky[:, None], glen_y, KY, CAUSAL_Y)
                   & _in_window(qx[None, :], kx[:, None], glen_x, KX, CAUSAL_X) & q_ok[None, :] & k_ok[:, None])
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2  # [keys, queries]
        pt = tl.where(allowed, tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    token = stat_base + y_k * W + x_k
    tl.store(dk_ptr + token[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=k_ok[:, None] & (offs_d < D)[None, :])
    tl.store(dv_ptr + token[:, None] * DV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=k_ok[:, None] & (offs_dv < DV)[None, :])
