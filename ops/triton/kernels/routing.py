"""Triton kernels of :mod:`zoo.ops.triton.routing` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _token_yx(region, token, NW, RH: tl.constexpr, RW: tl.constexpr):
    """Map coordinates (y, x) of token ``token`` (raster inside the region) of region ``region`` (raster)."""
    return (region // NW) * RH + token // RW, (region % NW) * RW + token % RW


@triton.jit
def _load_tile(base, y, x, mask, offs_c, stride_h, stride_w, stride_c):
    """A [rows, len(offs_c)] tile of channels ``offs_c`` at map positions (y, x); zeros where ``mask`` is not set."""
    ptrs = base + (y * stride_h + x * stride_w)[:, None] + (offs_c * stride_c)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_rows(base, y, x, ok, offs_d, stride_h, stride_w, stride_c, D: tl.constexpr):
    """A [rows, BLOCK_D] tile of one head's channels at map positions (y, x); zeros where not ``ok``."""
    return _load_tile(base, y, x, ok[:, None] & (offs_d < D)[None, :], offs_d, stride_h, stride_w, stride_c)


@triton.jit
def _store_rows(ptr, values, b64, y, x, ok, H, W, width, col0, offs_d, D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile into a contiguous (B, H, W, width) tensor: rows at map positions (y, x) of batch
    item ``b64``, channels ``col0 + offs_d`` (where ``ok`` and ``offs_d < D``), cast to the tensor's dtype."""
    row = ((b64 * H + y) * W + x) * width + col0
    tl.store(ptr + row[:, None] + offs_d[None, :], values.to(ptr.dtype.element_ty),
             mask=ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _query_rows_for_dq(q_ptr, do_ptr, out_ptr, b64, head, qy, qx, q_ok, offs_dq, offs_dv, sqb, sqh, sqw, sqc,
                       sdb, sdh, sdw, sdc, H, W, HEADS, DQK: tl.constexpr, DV: tl.constexpr):
    """A query tile's q and dO rows and ``delta = rowsum(dO * O)`` (zero on rows that are not ``q_ok``)."""
    q = _load_rows(q_ptr + b64 * sqb + head * DQK * sqc, qy, qx, q_ok, offs_dq, sqh, sqw, sqc, DQK)
    do = _load_rows(do_ptr + b64 * sdb + head * DV * sdc, qy, qx, q_ok, offs_dv, sdh, sdw, sdc, DV)
    o = _load_rows(out_ptr + b64 * H * W * (HEADS * DV) + head * DV, qy, qx, q_ok, offs_dv, W * (HEADS * DV),
                   HEADS * DV, 1, DV)
    return q, do, tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)


@triton.jit
def _online_softmax_step(q, k, in_range, m_i, l_i, qk_scale2, PRECISION: tl.constexpr):
    """One key tile of the forward's online softmax (base 2) over the keys ``in_range``: the new row maxima, the
    factor that rescales what was accumulated, the tile's probabilities (unnormalised) and the new row sums."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
    s = tl.where(in_range[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend_selected(q, k_base, v_base, idx_row, offs_ck, ck_ok, offs_cv, cv_ok, skh, skw, skc, svh, svw, svc, NW, H,
                     W, qk_scale2, T: tl.constexpr, TOPK: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax attention of the query tile ``q`` over the ``TOPK * T`` keys of its query region's selected
    regions (routing row ``idx_row``), key tiles of ``BLOCK_N`` loaded from the un-gathered maps (channels
    ``offs_ck`` / ``offs_cv`` where ``ck_ok`` / ``cv_ok``): the row maxima, row sums and unnormalised output."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_CV], dtype=tl.float32)
    for start in range(0, TOPK * T, BLOCK_N):
        ky, kx, in_range, k_ok = _selected_keys(idx_row, start + tl.arange(0, BLOCK_N), NW, H, W, T, TOPK, RH, RW)
        # padded keys are zero rows: logit 0, value 0, not masked (the reference's rule)
        k = _load_tile(k_base, ky, kx, k_ok[:, None] & ck_ok[None, :], offs_ck, skh, skw, skc)
        m_i, alpha, p, l_i = _online_softmax_step(q, k, in_range, m_i, l_i, qk_scale2, PRECISION)
        v = _load_tile(v_base, ky, kx, k_ok[:, None] & cv_ok[None, :], offs_cv, svh, svw, svc)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_i, l_i, acc


@triton.jit
def _dq_step(dq, q, k, v, do, lse, delta, keep, qk_scale2, PRECISION: tl.constexpr):
    """dQ accumulated over one key tile (``keep``: the scores that take part, broadcast against [rows, keys])."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
    p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dkv_step(dk, dv, k, v, q, do, lse, delta, keep_t, qk_scale2, PRECISION: tl.constexpr):
    """dK and dV accumulated over one query tile, on transposed scores (keys x queries) so that no probability
    tile needs a transpose (``keep_t``: the scores that take part, broadcast against [keys, rows])."""
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2
    p_t = tl.where(keep_t, tl.exp2(s_t - lse[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return dk + tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION), dv


@triton.jit
def _selected_keys(idx_row, n, NW, H, W, T: tl.constexpr, TOPK: tl.constexpr, RH: tl.constexpr,
                   RW: tl.constexpr):
    """Key number n = slot * T + token of a query region -> (y, x, in range, inside the map)."""
    in_range = n < TOPK * T
    region = tl.load(idx_row + n // T, mask=in_range, other=0).to(tl.int32)
    y, x = _token_yx(region, n % T, NW, RH, RW)
    return y, x, in_range, in_range & (y < H) & (x < W)


@triton.jit
def _region_tile(H, W, NW, R, HEADS, RH: tl.constexpr, RW: tl.constexpr, BLOCK: tl.constexpr):
    """This program's batch * head, region, batch and head, and its tile of ``BLOCK`` of the region's tokens: token
    numbers, map (y, x) and which are real tokens inside the map (grid: batch * heads * regions * tiles)."""
    T: tl.constexpr = RH * RW
    TILES: tl.constexpr = (T + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    bh = pid // (R * TILES)
    region = (pid % (R * TILES)) // TILES
    offs = (pid % TILES) * BLOCK + tl.arange(0, BLOCK)
    y, x = _token_yx(region, offs, NW, RH, RW)
    return bh, region, bh // HEADS, bh % HEADS, offs, y, x, (offs < T) & (y < H) & (x < W)


@triton.jit
def _grouped_region_tile(H, W, NW, R, HEADS, RH: tl.constexpr, RW: tl.constexpr, BLOCK: tl.constexpr,
                         GROUP: tl.constexpr, g):
    """:func:`_region_tile` of region ``g`` of this program's ``GROUP`` consecutive regions (grid: batch * heads *
    region groups * tiles), and whether that region exists: past the last region it is the last one again, every
    token masked."""
    if GROUP == 1:  # the plain tiling, instruction for instruction
        bh, region, b, head, offs, y, x, ok = _region_tile(H, W, NW, R, HEADS, RH, RW, BLOCK)
        real = tl.full([BLOCK], 1, tl.int1)
    else:
        T: tl.constexpr = RH * RW
        TILES: tl.constexpr = (T + BLOCK - 1) // BLOCK
        groups = (R + GROUP - 1) // GROUP
        pid = tl.program_id(0)
        bh = pid // (groups * TILES)
        region = (pid % (groups * TILES)) // TILES * GROUP + g
        real = (tl.zeros([BLOCK], tl.int32) + region) < R
        region = tl.minimum(region, R - 1)
        offs = (pid % TILES) * BLOCK + tl.arange(0, BLOCK)
        y, x = _token_yx(region, offs, NW, RH, RW)
        b, head, ok = bh // HEADS, bh % HEADS, (offs < T) & (y < H) & (x < W) & real
    return bh, region, b, head, offs, y, x, ok, real


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr,
                    sqb, sqh, sqw, sqc, skb, skh, skw, skc, svb, svh, svw, svc,
                    H, W, NW, R, HEADS, qk_scale2,
                    RH: tl.constexpr, RW: tl.constexpr, TOPK: tl.constexpr, DQK: tl.constexpr,
                    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
                    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr, GROUP: tl.constexpr):
    """Grid (batch * heads * groups of GROUP consecutive query regions * query tiles): each query region of the
    group in turn (neighbouring regions select many of the same key regions, whose rows the loads then find in
    L1), attention over its selected key regions."""
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    T: tl.constexpr = RH * RW
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for g in range(GROUP):
        bh, qr, b, head, offs_m, qy, qx, q_ok, real = _grouped_region_tile(H, W, NW, R, HEADS, RH, RW, BLOCK_M,
                                                                           GROUP, g)
        b64 = b.to(tl.int64)
        q = _load_rows(q_ptr + b64 * sqb + head * DQK * sqc, qy, qx, q_ok, offs_dq, sqh, sqw, sqc, DQK)
        k_base = k_ptr + b64 * skb + head * DQK * skc
        v_base = v_ptr + b64 * svb + head * DV * svc
        idx_row = idx_ptr + (b * R + qr) * TOPK
        m_i, l_i, acc = _attend_selected(q, k_base, v_base, idx_row, offs_dq, offs_dq < DQK, offs_dv, offs_dv < DV,
                                         skh, skw, skc, svh, svw, svc, NW, H, W, qk_scale2, T, TOPK, RH, RW, BLOCK_M,
                                         BLOCK_N, BLOCK_DV, PRECISION)
        _store_rows(out_ptr, acc / l_i[:, None], b64, qy, qx, q_ok, H, W, HEADS * DV, head * DV, offs_dv, DV)
        if STATS:  # the backward's row statistics (inference calls skip the store and its buffer)
            tl.store(lse_ptr + (bh * R + qr) * T + offs_m, m_i + tl.log2(l_i), mask=(offs_m < T) & real)


@triton.jit
def _packed_rows(H, W, NW, R, HEADS, RH: tl.constexpr, RW: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr,
                 GROUP: tl.constexpr, g):
    """The rows of a packed query tile (grid: batch * head groups * groups of GROUP consecutive regions): row m is
    token ``m % T`` of head ``m // T`` of this program's group of ``HP`` heads, in region g of its regions.

    Returns batch item, head group, region, head within the group and head of each row, map (y, x), the rows that
    belong to a head and a region (``row_ok``: their statistics are stored, padded tokens included) and those that
    are also inside the map (``q_ok``)."""
    T: tl.constexpr = RH * RW
    groups = (R + GROUP - 1) // GROUP
    head_groups = (HEADS + HP - 1) // HP
    pid = tl.program_id(0)
    bhg = pid // groups
    region = (pid % groups) * GROUP + g
    m = tl.arange(0, BLOCK_M)
    in_group = m // T
    head = (bhg % head_groups) * HP + in_group
    row_ok = (in_group < HP) & (head < HEADS) & ((tl.zeros([BLOCK_M], tl.int32) + region) < R)
    region = tl.minimum(region, R - 1)
    y, x = _token_yx(region, m % T, NW, RH, RW)
    return bhg // head_groups, bhg % head_groups, region, in_group, head, y, x, row_ok, row_ok & (y < H) & (x < W)


@triton.jit
def _packed_channels(in_group, ok, hg, HEADS, HP: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                     BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr):
    """Channels of a packed tile (``HP`` heads side by side, from head ``hg * HP``) for q/k and for v: offsets,
    which exist (inside the group, of a head below HEADS), and the tile entries a row owns (rows ``ok``, the
    channels of the row's head ``in_group``)."""
    offs_cq = tl.arange(0, BLOCK_CQK)
    offs_cv = tl.arange(0, BLOCK_CV)
    cq_ok = (offs_cq < HP * DQK) & (hg * HP + offs_cq // DQK < HEADS)
    cv_ok = (offs_cv < HP * DV) & (hg * HP + offs_cv // DV < HEADS)
    own_q = ok[:, None] & cq_ok[None, :] & ((offs_cq // DQK)[None, :] == in_group[:, None])
    own_v = ok[:, None] & cv_ok[None, :] & ((offs_cv // DV)[None, :] == in_group[:, None])
    return offs_cq, offs_cv, cq_ok, cv_ok, own_q, own_v


@triton.jit
def _packed_forward_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr,
                           sqb, sqh, sqw, sqc, skb, skh, skw, skc, svb, svh, svw, svc,
                           H, W, NW, R, HEADS, qk_scale2,
                           RH: tl.constexpr, RW: tl.constexpr, TOPK: tl.constexpr, DQK: tl.constexpr,
                           DV: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr, PRECISION: tl.constexpr,
                           STATS: tl.constexpr, GROUP: tl.constexpr):
    """:func:`_forward_kernel` with the query tile's rows shared by ``HP`` heads (for regions of fewer than 16
    tokens the plain tile idles ``16 - T`` of its rows; for larger ones, up to half a tile, packing still loads
    wider rows in fewer programs). Every head routes to the same key regions, so the program loads
    its keys and values once for its heads' channels (``HP * D`` wide). A row's query holds only its own head's
    channels (the others are zeros), so Q @ K^T gives each row its own head's scores; of P @ V each row keeps its
    head's channels. Same multiply-adds as one head a program, with no idle rows, 1/HP of the programs, softmax
    work on full rows, and key rows read ``HP * D`` channels wide."""
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    T: tl.constexpr = RH * RW
    for g in range(GROUP):
        b, hg, qr, in_group, head, qy, qx, row_ok, q_ok = _packed_rows(H, W, NW, R, HEADS, RH, RW, HP, BLOCK_M,
                                                                       GROUP, g)
        b64 = b.to(tl.int64)
        offs_cq, offs_cv, cq_ok, cv_ok, own_q, own_v = _packed_channels(in_group, q_ok, hg, HEADS, HP, DQK, DV,
                                                                        BLOCK_CQK, BLOCK_CV)
        q = _load_tile(q_ptr + b64 * sqb + hg * HP * DQK * sqc, qy, qx, own_q, offs_cq, sqh, sqw, sqc)
        k_base = k_ptr + b64 * skb + hg * HP * DQK * skc
        v_base = v_ptr + b64 * svb + hg * HP * DV * svc
        idx_row = idx_ptr + (b * R + qr) * TOPK
        m_i, l_i, acc = _attend_selected(q, k_base, v_base, idx_row, offs_cq, cq_ok, offs_cv, cv_ok, skh, skw, skc,
                                         svh, svw, svc, NW, H, W, qk_scale2, T, TOPK, RH, RW, BLOCK_M, BLOCK_N,
                                         BLOCK_CV, PRECISION)
        row = ((b64 * H + qy) * W + qx) * (HEADS * DV) + hg * HP * DV
        tl.store(out_ptr + row[:, None] + offs_cv[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=own_v)
        if STATS:
            stat = ((b * HEADS + head) * R + qr) * T + tl.arange(0, BLOCK_M) % T
            tl.store(lse_ptr + stat, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, idx_ptr, lse_ptr, delta_ptr, dq_ptr,
               sqb, sqh, sqw, sqc, skb, skh, skw, skc, svb, svh, svw, svc, sdb, sdh, sdw, sdc,
               H, W, NW, R, HEADS, scale, qk_scale2,
               RH: tl.constexpr, RW: tl.constexpr, TOPK: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
               PRECISION: tl.constexpr):
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    T: tl.constexpr = RH * RW
    bh, qr, b, head, offs_m, qy, qx, q_ok = _region_tile(H, W, NW, R, HEADS, RH, RW, BLOCK_M)
    b64 = b.to(tl.int64)
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, do, delta = _query_rows_for_dq(q_ptr, do_ptr, out_ptr, b64, head, qy, qx, q_ok, offs_dq, offs_dv,
                                      sqb, sqh, sqw, sqc, sdb, sdh, sdw, sdc, H, W, HEADS, DQK, DV)
    row = (bh * R + qr) * T + offs_m
    tl.store(delta_ptr + row, delta, mask=offs_m < T)
    lse = tl.load(lse_ptr + row, mask=offs_m < T, other=0.0)
    k_base = k_ptr + b64 * skb + head * DQK * skc
    v_base = v_ptr + b64 * svb + head * DV * svc
    idx_row = idx_ptr + (b * R + qr) * TOPK

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    for start in range(0, TOPK * T, BLOCK_N):
        ky, kx, in_range, k_ok = _selected_keys(idx_row, start + tl.arange(0, BLOCK_N), NW, H, W, T, TOPK, RH,
                                                RW)
        k = _load_rows(k_base, ky, kx, k_ok, offs_dq, skh, skw, skc, DQK)
        v = _load_rows(v_base, ky, kx, k_ok, offs_dv, svh, svw, svc, DV)
        dq = _dq_step(dq, q, k, v, do, lse, delta, in_range[None, :], qk_scale2, PRECISION)

    _store_rows(dq_ptr, dq * scale, b64, qy, qx, q_ok, H, W, HEADS * DQK, head * DQK, offs_dq, DQK)


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, offsets_ptr, sources_ptr, dk_ptr, dv_ptr,
                sqb, sqh, sqw, sqc, skb, skh, skw, skc, svb, svh, svw, svc, sdb, sdh, sdw, sdc,
                H, W, NW, R, HEADS, scale, qk_scale2,
                RH: tl.constexpr, RW: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                PRECISION: tl.constexpr):
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    T: tl.constexpr = RH * RW
    bh, kr, b, head, offs_n, ky, kx, k_ok = _region_tile(H, W, NW, R, HEADS, RH, RW, BLOCK_N)
    b64 = b.to(tl.int64)
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(k_ptr + b64 * skb + head * DQK * skc, ky, kx, k_ok, offs_dq, skh, skw, skc, DQK)
    v = _load_rows(v_ptr + b64 * svb + head * DV * svc, ky, kx, k_ok, offs_dv, svh, svw, svc, DV)
    q_base = q_ptr + b64 * sqb + head * DQK * sqc
    do_base = do_ptr + b64 * sdb + head * DV * sdc
    first = tl.load(offsets_ptr + b * R + kr)
    rows = (tl.load(offsets_ptr + b * R + kr + 1) - first) * T  # query tokens that attend to this key region

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start in range(0, rows, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)  # m = entry * T + token over this key region's list
        in_range = m < rows
        qr = tl.load(sources_ptr + first + m // T, mask=in_range, other=0) - b * R
        qy, qx = _token_yx(qr, m % T, NW, RH, RW)
        q_ok = in_range & (qy < H) & (qx < W)
        q = _load_rows(q_base, qy, qx, q_ok, offs_dq, sqh, sqw, sqc, DQK)
        do = _load_rows(do_base, qy, qx, q_ok, offs_dv, sdh, sdw, sdc, DV)
        row = (bh * R + qr) * T + m % T
        lse = tl.load(lse_ptr + row, mask=in_range, other=0.0)
        delta = tl.load(delta_ptr + row, mask=in_range, other=0.0)
        dk, dv = _dkv_step(dk, dv, k, v, q, do, lse, delta, q_ok[None, :], qk_scale2, PRECISION)

    _store_rows(dk_ptr, dk * scale, b64, ky, kx, k_ok, H, W, HEADS * DQK, head * DQK, offs_dq, DQK)
    _store_rows(dv_ptr, dv, b64, ky, kx, k_ok, H, W, HEADS * DV, head * DV, offs_dv, DV)


@triton.jit
def _inverse_routing_kernel(idx_ptr, offsets_ptr, sources_ptr, R, TOPK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Grid (batch, key regions): the CSR list of the query regions that selected one key region (see
    _inverse_routing). Lists are laid out by key region, so this one starts after the item's entries that
    selected a lower key region; every query region selects exactly TOPK key regions."""
    b = tl.program_id(0)
    key = tl.program_id(1)
    entries = R * TOPK
    offs = tl.arange(0, BLOCK_E)
    idx = tl.load(idx_ptr + b * entries + offs, mask=offs < entries, other=R).to(tl.int32)
    hit = (idx == key).to(tl.int32)
    start = b * entries + tl.sum((idx < key).to(tl.int32), axis=0)
    tl.store(offsets_ptr + b * R + key, start)
    # entries in ascending order: ascending query regions within each list (a fixed summation order)
    tl.store(sources_ptr + start + tl.cumsum(hit, axis=0) - 1, b * R + offs // TOPK, mask=hit > 0)
    if (b == tl.num_programs(0) - 1) & (key == R - 1):
        tl.store(offsets_ptr + (b + 1) * R, (b + 1) * entries)


# ----------------------------------------------------------------------------------------------------------------
# the masked backward: every key of the padded map, masked to the query row's selected regions


@triton.jit
def _padded_token(n, NW, RH: tl.constexpr, RW: tl.constexpr):
    """Token number ``n`` of the padded map in raster order -> (y, x, region)."""
    y = n // (NW * RW)
    x = n % (NW * RW)
    return y, x, (y // RH) * NW + x // RW


@triton.jit
def _map_tile(H, W, NW, R, HEADS, RH: tl.constexpr, RW: tl.constexpr, BLOCK: tl.constexpr):
    """This program's batch * head, batch, head and its tile of ``BLOCK`` tokens of the padded map (raster): token
    numbers, (y, x), regions, which are map tokens at all and which lie inside the map (grid: batch * heads *
    tiles)."""
    N = R * (RH * RW)
    tiles = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    bh = pid // tiles
    offs = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    y, x, region = _padded_token(offs, NW, RH, RW)
    in_grid = offs < N
    return bh, bh // HEADS, bh % HEADS, offs, y, x, tl.where(in_grid, region, 0), in_grid, in_grid & (y < H) & (
        x < W)


@triton.jit
def _stats_row(bh, region, y, x, R, RH: tl.constexpr, RW: tl.constexpr):
    """Index of a token's row statistic (log-sum-exp, delta) in the routed kernels' (B * heads, R, T) layout, which
    the masked backward shares (the forward is always routed)."""
    return (bh * R + region) * (RH * RW) + (y % RH) * RW + x % RW


@triton.jit
def _selection_bits(idx_ptr, regions, ok, TOPK: tl.constexpr, BLOCK_TOPK: tl.constexpr):
    """Per row, the int64 set of the key regions its query region selected (bit r: region r; needs R <= 64); empty
    where not ``ok``. ``idx_ptr``: the batch item's (R, TOPK) routing index."""
    slots = tl.arange(0, BLOCK_TOPK)
    idx = tl.load(idx_ptr + regions[:, None] * TOPK + slots[None, :], mask=ok[:, None] & (slots < TOPK)[None, :],
                  other=-1).to(tl.int64)
    chosen = idx >= 0
    # top-k indices are distinct, so the sum of their bits is their union
    return tl.sum(chosen.to(tl.int64) << tl.where(chosen, idx, 0), axis=1)


@triton.jit
def _selected(bits, regions):
    """[rows, cols] mask: whether the column's region is in the row's set (``bits`` per row, ``regions`` per
    column)."""
    return ((bits[:, None] >> regions[None, :].to(tl.int64)) & 1) != 0


@triton.jit
def _masked_dq_kernel(q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, idx_ptr, lse_ptr, delta_ptr, dq_ptr,
                      sqb, sqh, sqw, sqc, skb, skh, skw, skc, svb, svh, svw, svc, sdb, sdh, sdw, sdc,
                      H, W, NW, R, HEADS, scale, qk_scale2,
                      RH: tl.constexpr, RW: tl.constexpr, TOPK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
                      DQK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    N = R * (RH * RW)
    bh, b, head, offs_m, qy, qx, qr, m_in, q_ok = _map_tile(H, W, NW, R, HEADS, RH, RW, BLOCK_M)
    b64 = b.to(tl.int64)
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, do, delta = _query_rows_for_dq(q_ptr, do_ptr, out_ptr, b64, head, qy, qx, q_ok, offs_dq, offs_dv,
                                      sqb, sqh, sqw, sqc, sdb, sdh, sdw, sdc, H, W, HEADS, DQK, DV)
    row = _stats_row(bh, qr, qy, qx, R, RH, RW)
    tl.store(delta_ptr + row, delta, mask=m_in)
    lse = tl.load(lse_ptr + row, mask=m_in, other=0.0)
    bits = _selection_bits(idx_ptr + b * R * TOPK, qr, m_in, TOPK, BLOCK_TOPK)
    k_base = k_ptr + b64 * skb + head * DQK * skc
    v_base = v_ptr + b64 * svb + head * DV * svc

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        ky, kx, kr = _padded_token(n, NW, RH, RW)
        n_in = n < N
        k_ok = n_in & (ky < H) & (kx < W)
        k = _load_rows(k_base, ky, kx, k_ok, offs_dq, skh, skw, skc, DQK)
        v = _load_rows(v_base, ky, kx, k_ok, offs_dv, svh, svw, svc, DV)
        keep = _selected(bits, tl.where(n_in, kr, 0)) & n_in[None, :]
        dq = _dq_step(dq, q, k, v, do, lse, delta, keep, qk_scale2, PRECISION)

    _store_rows(dq_ptr, dq * scale, b64, qy, qx, q_ok, H, W, HEADS * DQK, head * DQK, offs_dq, DQK)


@triton.jit
def _masked_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, idx_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                       sqb, sqh, sqw, sqc, skb, skh, skw, skc, svb, svh, svw, svc, sdb, sdh, sdw, sdc,
                       H, W, NW, R, HEADS, scale, qk_scale2,
                       RH: tl.constexpr, RW: tl.constexpr, TOPK: tl.constexpr, BLOCK_TOPK: tl.constexpr,
                       DQK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    N = R * (RH * RW)
    bh, b, head, offs_n, ky, kx, kr, n_in, k_ok = _map_tile(H, W, NW, R, HEADS, RH, RW, BLOCK_N)
    b64 = b.to(tl.int64)
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(k_ptr + b64 * skb + head * DQK * skc, ky, kx, k_ok, offs_dq, skh, skw, skc, DQK)
    v = _load_rows(v_ptr + b64 * svb + head * DV * svc, ky, kx, k_ok, offs_dv, svh, svw, svc, DV)
    q_base = q_ptr + b64 * sqb + head * DQK * sqc
    do_base = do_ptr + b64 * sdb + head * DV * sdc
    idx_item = idx_ptr + b * R * TOPK

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        qy, qx, qr = _padded_token(m, NW, RH, RW)
        m_in = m < N
        q_ok = m_in & (qy < H) & (qx < W)
        q = _load_rows(q_base, qy, qx, q_ok, offs_dq, sqh, sqw, sqc, DQK)
        do = _load_rows(do_base, qy, qx, q_ok, offs_dv, sdh, sdw, sdc, DV)
        qr = tl.where(m_in, qr, 0)
        row = _stats_row(bh, qr, qy, qx, R, RH, RW)
        lse = tl.load(lse_ptr + row, mask=m_in, other=0.0)
        delta = tl.load(delta_ptr + row, mask=m_in, other=0.0)
        bits = _selection_bits(idx_item, qr, q_ok, TOPK, BLOCK_TOPK)
        keep_t = (((bits[None, :] >> kr[:, None].to(tl.int64)) & 1) != 0) & n_in[:, None]
        dk, dv = _dkv_step(dk, dv, k, v, q, do, lse, delta, keep_t, qk_scale2, PRECISION)

    _store_rows(dk_ptr, dk * scale, b64, ky, kx, k_ok, H, W, HEADS * DQK, head * DQK, offs_dq, DQK)
    _store_rows(dv_ptr, dv, b64, ky, kx, k_ok, H, W, HEADS * DV, head * DV, offs_dv, DV)


# ----------------------------------------------------------------------------------------------------------------
# routing: region sums, then affinity and top-k


@triton.jit
def _region_sums_kernel(q_ptr, k_ptr, sums_ptr, sqb, sqh, sqw, sqc, skb, skh, skw, skc, H, W, NW, R, C, B,
                        RH: tl.constexpr, RW: tl.constexpr, BLOCK_NW: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (batch, region rows, channel chunks): the float32 sums of q and k over each region of one row of regions
    (a 0/1 membership matrix times each token tile), written to sums[0 / 1, b, region, channel] (regions partition
    the tokens, so every sum is one program's, in a fixed order)."""
    b = tl.program_id(0).to(tl.int64)
    region_row = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_g = tl.arange(0, BLOCK_NW)
    c_ok = offs_c < C
    band = RH * NW * RW  # tokens of a row of regions in the padded map
    q_sum = tl.zeros([BLOCK_NW, BLOCK_C], dtype=tl.float32)
    k_sum = tl.zeros([BLOCK_NW, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, band, BLOCK_T):
        n = n0 + tl.arange(0, BLOCK_T)
        y = region_row * RH + n // (NW * RW)
        x = n % (NW * RW)
        ok = (n < band) & (y < H) & (x < W)
        qt = tl.load(q_ptr + b * sqb + (y * sqh + x * sqw)[:, None] + (offs_c * sqc)[None, :],
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        kt = tl.load(k_ptr + b * skb + (y * skh + x * skw)[:, None] + (offs_c * skc)[None, :],
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        member = ((offs_g[:, None] == (x // RW)[None, :]) & ok[None, :]).to(qt.dtype)  # exact in every dtype
        q_sum += tl.dot(member, qt, input_precision=PRECISION)
        k_sum += tl.dot(member, kt, input_precision=PRECISION)
    rows = (b * R + region_row * NW + offs_g) * C
    mask = (offs_g < NW)[:, None] & c_ok[None, :]
    tl.store(sums_ptr + rows[:, None] + offs_c[None, :], q_sum, mask=mask)
    tl.store(sums_ptr + B * R * C + rows[:, None] + offs_c[None, :], k_sum, mask=mask)


@triton.jit
def _route_topk_kernel(sums_ptr, idx_ptr, H, W, NW, R, C, B, RH: tl.constexpr, RW: tl.constexpr,
                       TOPK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Grid (batch, query-region chunks): the float32 affinity of BLOCK_Q query regions with every key region,
    divided by the key regions' token counts (mean descriptors; a query's own count scales its whole row), and its
    top-k by repeated arg-max (ties: the lowest region), written as (TOPK,) int64 per query region. PRECISION is
    an fp32-accurate ``tl.dot`` precision ("tf32x3" or "ieee"): the top-k turns rounding into different choices."""
    b = tl.program_id(0).to(tl.int64)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    affinity = tl.zeros([BLOCK_Q, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_ok = (c0 + offs_c) < C
        qd = tl.load(sums_ptr + ((b * R + offs_q) * C)[:, None] + (c0 + offs_c)[None, :],
                     mask=(offs_q < R)[:, None] & c_ok[None, :], other=0.0)
        kd = tl.load(sums_ptr + B * R * C + ((b * R + offs_r) * C)[:, None] + (c0 + offs_c)[None, :],
                     mask=(offs_r < R)[:, None] & c_ok[None, :], other=0.0)
        affinity += tl.dot(qd, tl.trans(kd), input_precision=PRECISION)
    count = tl.maximum(tl.minimum(H - (offs_r // NW) * RH, RH) * tl.minimum(W - (offs_r % NW) * RW, RW), 1)
    affinity = tl.where((offs_r < R)[None, :], affinity / count.to(tl.float32)[None, :], float("-inf"))
    out = idx_ptr + (b * R + offs_q) * TOPK
    for slot in range(TOPK):
        best = tl.argmax(affinity, axis=1, tie_break_left=True)
        tl.store(out + slot, best.to(tl.int64), mask=offs_q < R)
        affinity = tl.where(offs_r[None, :] == best[:, None], float("-inf"), affinity)
