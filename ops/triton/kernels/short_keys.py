"""Triton kernels of :mod:`zoo.ops.triton.short_keys` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested
from .agent import _put, _tile

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _program(HEADS, CHUNK, N):
    """This program's batch (int64), head and query rows [start, end) (grid: (batch * heads, chunks)).

    Takes no pointer (see ``agent._agent_program``: a written input costs a copy under torch.compile)."""
    pid = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    return (pid // HEADS).to(tl.int64), pid % HEADS, start, tl.minimum(start + CHUNK, N)


@triton.jit
def _keys_and_values(k_base, v_base, M, skm, skd, svm, svd, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The (batch, head)'s keys [BLOCK_M, BLOCK_D] and values [BLOCK_M, BLOCK_DV] (zero padded), and which rows are
    keys."""
    offs_m = tl.arange(0, BLOCK_M)
    kt = _tile(k_base, offs_m, M, tl.arange(0, BLOCK_D), D, skm, skd)
    vt = _tile(v_base, offs_m, M, tl.arange(0, BLOCK_DV), DV, svm, svd)
    return kt, vt, offs_m < M


@triton.jit
def _probs(qt, kt, key_ok, qk_scale2, PRECISION: tl.constexpr):
    """Softmax over all keys (one tile) of a query tile, float32, unnormalised; its row sums and row maxima (of the
    scaled logits, base 2)."""
    s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * qk_scale2
    s = tl.where(key_ok[None, :], s, float("-inf"))
    s_max = tl.max(s, axis=1)
    p = tl.exp2(s - s_max[:, None])
    return p, tl.sum(p, axis=1), s_max


@triton.jit
def _forward_rows(q_base, out_base, lse_row, row0, end, kt, vt, key_ok, sqn, sqd, HEADS, qk_scale2,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  ROWS: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr):
    """One tile of ROWS query rows from row0 (rows below end): its output and, with STATS, its log-sum-exps."""
    rows = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qt = _tile(q_base, rows, end, offs_d, D, sqn, sqd)
    p, l, s_max = _probs(qt, kt, key_ok, qk_scale2, PRECISION)
    o = tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION) / l[:, None]
    _put(out_base, rows, end, offs_dv, DV, HEADS * DV, 1, o)
    if STATS:
        tl.store(lse_row + rows, s_max + tl.log2(l), mask=rows < end)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr,
                    sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                    HEADS, N, M, CHUNK, qk_scale2, lse_ptr,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
                    STATS: tl.constexpr = False, TAIL_T: tl.constexpr = 0):
    """out = softmax(q k^T) v over a chunk of query rows; with STATS also each row's log-sum-exp of its scaled
    logits in base 2 (lse_ptr: (B, heads, N) float32), what the key-blocked backward recomputes p from. With TAIL_T
    (a power of two below BLOCK_T), the rows after the chunk's last whole BLOCK_T tile take one TAIL_T-row tile."""
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, start, end = _program(HEADS, CHUNK, N)
    kt, vt, key_ok = _keys_and_values(k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh, M, skm, skd, svm, svd,
                                      D, DV, BLOCK_M, BLOCK_D, BLOCK_DV)
    q_base = q_ptr + b * sqb + h * sqh
    out_base = out_ptr + b * N * HEADS * DV + h * DV
    lse_row = lse_ptr + (b * HEADS + h) * N
    whole = end - (end - start) % BLOCK_T if TAIL_T > 0 else end
    for row0 in range(start, whole, BLOCK_T):
        _forward_rows(q_base, out_base, lse_row, row0, end, kt, vt, key_ok, sqn, sqd, HEADS, qk_scale2,
                      D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, PRECISION, STATS)
    if TAIL_T > 0:
        if whole < end:
            _forward_rows(q_base, out_base, lse_row, whole, end, kt, vt, key_ok, sqn, sqd, HEADS, qk_scale2,
                          D, DV, BLOCK_D, BLOCK_DV, TAIL_T, PRECISION, STATS)


@triton.jit
def _backward_kernel(do_ptr, q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr,
                     sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                     sdqb, sdqn, sdkb, sdkm, sdvb, sdvm, dk_split, dv_split, HEADS, N, M, CHUNK, scale, qk_scale2,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, start, end = _program(HEADS, CHUNK, N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_T)
    kt, vt, key_ok = _keys_and_values(k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh, M, skm, skd, svm, svd,
                                      D, DV, BLOCK_M, BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sob + h * soh
    dq_base = dq_ptr + b * sdqb + h * D
    for row0 in range(start, end, BLOCK_T):
        rows = row0 + offs_t
        qt = _tile(q_base, rows, end, offs_d, D, sqn, sqd)
        dot_ = _tile(do_base, rows, end, offs_dv, DV, son, sod)
        p, l, _ = _probs(qt, kt, key_ok, qk_scale2, PRECISION)
        p = tl.where((rows < end)[:, None], p / l[:, None], 0.0)  # the forward's probabilities, recomputed
        dp = tl.dot(dot_, tl.trans(vt), input_precision=PRECISION)
        # softmax backward with the row's sum(p * dp), as autograd's softmax does (no output tile to read)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        _put(dq_base, rows, end, offs_d, D, sdqn, 1, tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION) * scale)
        dk += tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=PRECISION)
        dv += tl.dot(tl.trans(p.to(dot_.dtype)), dot_, input_precision=PRECISION)
    # this chunk's key/value gradients (split tl.program_id(1)); a token's heads lie side by side in every layout
    split = tl.program_id(1).to(tl.int64)
    _put(dk_ptr + split * dk_split + b * sdkb + h * D, offs_m, M, offs_d, D, sdkm, 1, dk * scale)
    _put(dv_ptr + split * dv_split + b * sdvb + h * DV, offs_m, M, offs_dv, DV, sdvm, 1, dv)


# ----------------------------------------------------------------------------------------------------------------
# key-blocked backward (flash-attention 2's order): dQ per query tile, then dK/dV per key block, from the forward's
# row statistics; tiles of (BLOCK_T queries, BLOCK_N keys) instead of a whole key row


@triton.jit
def _kb_dq_keys(dq, qt, dot_, lse, delta, k_base, v_base, m0, M, skm, skd, svm, svd, qk_scale2,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                KEYS: tl.constexpr, PRECISION: tl.constexpr):
    """dq plus one block of KEYS keys from m0 (keys below M): sum_j ds[:, j] k[j]."""
    keys = m0 + tl.arange(0, KEYS)
    kt = _tile(k_base, keys, M, tl.arange(0, BLOCK_D), D, skm, skd)
    vt = _tile(v_base, keys, M, tl.arange(0, BLOCK_DV), DV, svm, svd)
    s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * qk_scale2
    p = tl.where((keys < M)[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(dot_, tl.trans(vt), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)


@triton.jit
def _kb_dq_rows(do_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, dq_ptr, delta_ptr, b, h, row0,
                sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                sdqb, sdqn, HEADS, N, M, scale, qk_scale2,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ and delta of ROWS query rows from row0 over every key: whole BLOCK_N blocks, then with TAIL_N one TAIL_N
    block for the keys after the last whole block."""
    rows = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qt = _tile(q_ptr + b * sqb + h * sqh, rows, N, offs_d, D, sqn, sqd)
    dot_ = _tile(do_ptr + b * sob + h * soh, rows, N, offs_dv, DV, son, sod)
    ot = _tile(out_ptr + b * N * HEADS * DV + h * DV, rows, N, offs_dv, DV, HEADS * DV, 1)
    delta = tl.sum(dot_.to(tl.float32) * ot.to(tl.float32), axis=1)
    stat = (b * HEADS + h) * N + rows
    lse = tl.load(lse_ptr + stat, mask=rows < N, other=0.0)
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    whole = M - M % BLOCK_N if TAIL_N > 0 else M
    for m0 in range(0, whole, BLOCK_N):
        dq = _kb_dq_keys(dq, qt, dot_, lse, delta, k_base, v_base, m0, M, skm, skd, svm, svd, qk_scale2,
                         D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION)
    if TAIL_N > 0:
        dq = _kb_dq_keys(dq, qt, dot_, lse, delta, k_base, v_base, whole, M, skm, skd, svm, svd, qk_scale2,
                         D, DV, BLOCK_D, BLOCK_DV, TAIL_N, PRECISION)
    _put(dq_ptr + b * sdqb + h * D, rows, N, offs_d, D, sdqn, 1, dq * scale)
    tl.store(delta_ptr + stat, delta, mask=rows < N)


@triton.jit
def _kb_dq_kernel(do_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, dq_ptr, delta_ptr,
                  sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                  sdqb, sdqn, HEADS, N, M, scale, qk_scale2,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                  TAIL_T: tl.constexpr = 0, TAIL_N: tl.constexpr = 0):
    """dQ of BLOCK_T query rows over every key, BLOCK_N keys at a time, and delta = rowsum(dO * O) for the dK/dV
    pass (delta_ptr: (B, heads, N) float32). out is token-major (B, N, heads, DV), as the forward writes it. With
    TAIL_T / TAIL_N (powers of two below BLOCK_T / BLOCK_N), the rows after the last whole query tile (the grid's last
    program) and the keys after the last whole key block take tiles of that size: VOLO's 196 tokens are three
    64-token tiles and a 16-token one, not four of 64."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)
    pid = tl.program_id(0)
    b, h, row0 = (pid // HEADS).to(tl.int64), pid % HEADS, tl.program_id(1) * BLOCK_T
    args = (do_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, dq_ptr, delta_ptr, b, h, row0,
            sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
            sdqb, sdqn, HEADS, N, M, scale, qk_scale2)
    if TAIL_T > 0:
        if row0 + BLOCK_T > N:
            _kb_dq_rows(*args, D, DV, BLOCK_D, BLOCK_DV, TAIL_T, BLOCK_N, TAIL_N, PRECISION)
        else:
            _kb_dq_rows(*args, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, BLOCK_N, TAIL_N, PRECISION)
    else:
        _kb_dq_rows(*args, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, BLOCK_N, TAIL_N, PRECISION)


@triton.jit
def _kb_dkv_rows(dk, dv, kt, vt, q_base, do_base, lse_ptr, delta_ptr, stat_base, n0, N, sqn, sqd, son, sod,
                 qk_scale2, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 ROWS: tl.constexpr, PRECISION: tl.constexpr):
    """dk and dv plus one tile of ROWS query rows from n0 (rows below N), keys as the tiles' rows; also the tile's
    logit gradient ds^T (keys, rows), unscaled, in the inputs' dtype, for the fused backward's dQ."""
    rows = n0 + tl.arange(0, ROWS)
    row_ok = rows < N
    qt = _tile(q_base, rows, N, tl.arange(0, BLOCK_D), D, sqn, sqd)
    dot_ = _tile(do_base, rows, N, tl.arange(0, BLOCK_DV), DV, son, sod)
    lse = tl.load(lse_ptr + stat_base + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + stat_base + rows, mask=row_ok, other=0.0)
    st = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * qk_scale2
    pt = tl.where(row_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
    dv += tl.dot(pt.to(dot_.dtype), dot_, input_precision=PRECISION)
    dpt = tl.dot(vt, tl.trans(dot_), input_precision=PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
    dk += tl.dot(dst, qt, input_precision=PRECISION)
    return dk, dv, dst


@triton.jit
def _kb_dkv_keys(do_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, b, h, key0,
                 sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                 sdkb, sdkm, sdvb, sdvm, HEADS, N, M, scale, qk_scale2,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_T: tl.constexpr, KEYS: tl.constexpr, TAIL_T: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of KEYS keys from key0 over every query row: whole BLOCK_T tiles, then with TAIL_T one TAIL_T tile
    for the rows after the last whole tile."""
    keys = key0 + tl.arange(0, KEYS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = _tile(k_ptr + b * skb + h * skh, keys, M, offs_d, D, skm, skd)
    vt = _tile(v_ptr + b * svb + h * svh, keys, M, offs_dv, DV, svm, svd)
    q_base, do_base = q_ptr + b * sqb + h * sqh, do_ptr + b * sob + h * soh
    stat_base = (b * HEADS + h) * N
    dk = tl.zeros([KEYS, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([KEYS, BLOCK_DV], dtype=tl.float32)
    whole = N - N % BLOCK_T if TAIL_T > 0 else N
    for n0 in range(0, whole, BLOCK_T):
        dk, dv, _ = _kb_dkv_rows(dk, dv, kt, vt, q_base, do_base, lse_ptr, delta_ptr, stat_base, n0, N, sqn, sqd,
                                 son, sod, qk_scale2, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, PRECISION)
    if TAIL_T > 0:
        dk, dv, _ = _kb_dkv_rows(dk, dv, kt, vt, q_base, do_base, lse_ptr, delta_ptr, stat_base, whole, N, sqn,
                                 sqd, son, sod, qk_scale2, D, DV, BLOCK_D, BLOCK_DV, TAIL_T, PRECISION)
    _put(dk_ptr + b * sdkb + h * D, keys, M, offs_d, D, sdkm, 1, dk * scale)
    _put(dv_ptr + b * sdvb + h * DV, keys, M, offs_dv, DV, sdvm, 1, dv)


@triton.jit
def _kb_dkv_kernel(do_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                   sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                   sdkb, sdkm, sdvb, sdvm, HEADS, N, M, scale, qk_scale2,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                   TAIL_T: tl.constexpr = 0, TAIL_N: tl.constexpr = 0):
    """dK and dV of BLOCK_N keys over every query row, BLOCK_T rows at a time (transposed tiles: keys are rows);
    tails as in ``_kb_dq_kernel`` (the grid's last program takes the TAIL_N keys after the last whole block)."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)
    pid = tl.program_id(0)
    b, h, key0 = (pid // HEADS).to(tl.int64), pid % HEADS, tl.program_id(1) * BLOCK_N
    args = (do_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, b, h, key0,
            sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
            sdkb, sdkm, sdvb, sdvm, HEADS, N, M, scale, qk_scale2)
    if TAIL_N > 0:
        if key0 + BLOCK_N > M:
            _kb_dkv_keys(*args, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, TAIL_N, TAIL_T, PRECISION)
        else:
            _kb_dkv_keys(*args, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, BLOCK_N, TAIL_T, PRECISION)
    else:
        _kb_dkv_keys(*args, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, BLOCK_N, TAIL_T, PRECISION)


# ----------------------------------------------------------------------------------------------------------------
# fused backward for at most four query tiles (VOLO's 196 tokens): one program per (batch, head) walks the key blocks
# and, within each, every query tile, so each tile's probabilities and logit gradient are computed once (the two
# kernels above compute them twice) and dQ's tiles stay in registers across the key blocks; no partial sums


@triton.jit
def _fused_delta(do_base, out_base, delta_row, row0, N, son, sod, HEADS,
                 DV: tl.constexpr, BLOCK_DV: tl.constexpr, ROWS: tl.constexpr):
    """delta = rowsum(dO * O) of ROWS query rows from row0, stored at delta_row (rows below N)."""
    rows = row0 + tl.arange(0, ROWS)
    offs_dv = tl.arange(0, BLOCK_DV)
    dot_ = _tile(do_base, rows, N, offs_dv, DV, son, sod)
    ot = _tile(out_base, rows, N, offs_dv, DV, HEADS * DV, 1)
    tl.store(delta_row + rows, tl.sum(dot_.to(tl.float32) * ot.to(tl.float32), axis=1), mask=rows < N)


@triton.jit
def _fused_rows(dq, dk, dv, kt, vt, q_base, do_base, lse_ptr, delta_ptr, stat_base, row0, N, sqn, sqd, son, sod,
                qk_scale2, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                ROWS: tl.constexpr, PRECISION: tl.constexpr):
    """One (key block, query tile) pair: dk, dv and the tile's dq plus its share (dq unscaled)."""
    dk, dv, dst = _kb_dkv_rows(dk, dv, kt, vt, q_base, do_base, lse_ptr, delta_ptr, stat_base, row0, N, sqn, sqd,
                               son, sod, qk_scale2, D, DV, BLOCK_D, BLOCK_DV, ROWS, PRECISION)
    return dq + tl.dot(tl.trans(dst), kt, input_precision=PRECISION), dk, dv


@triton.jit
def _fused_keys(dq0, dq1, dq2, dq3, dqt, k_base, v_base, q_base, do_base, lse_ptr, delta_ptr, dk_base, dv_base,
                stat_base, key0, N, M, sqn, sqd, skm, skd, svm, svd, son, sod, sdkm, sdvm, scale, qk_scale2,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_T: tl.constexpr, KEYS: tl.constexpr, TILES: tl.constexpr, TAIL_T: tl.constexpr,
                PRECISION: tl.constexpr):
    """The KEYS keys from key0 against every query tile: their dK and dV stored, the TILES whole query tiles' dq
    (dq0..dq3) and the tail tile's (dqt, with TAIL_T) returned with this block's share added."""
    keys = key0 + tl.arange(0, KEYS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = _tile(k_base, keys, M, offs_d, D, skm, skd)
    vt = _tile(v_base, keys, M, offs_dv, DV, svm, svd)
    dk = tl.zeros([KEYS, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([KEYS, BLOCK_DV], dtype=tl.float32)
    args = (kt, vt, q_base, do_base, lse_ptr, delta_ptr, stat_base)
    rest = (N, sqn, sqd, son, sod, qk_scale2)
    if TILES > 0:
        dq0, dk, dv = _fused_rows(dq0, dk, dv, *args, 0, *rest, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, PRECISION)
    if TILES > 1:
        dq1, dk, dv = _fused_rows(dq1, dk, dv, *args, BLOCK_T, *rest, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, PRECISION)
    if TILES > 2:
        dq2, dk, dv = _fused_rows(dq2, dk, dv, *args, 2 * BLOCK_T, *rest, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T,
                                  PRECISION)
    if TILES > 3:
        dq3, dk, dv = _fused_rows(dq3, dk, dv, *args, 3 * BLOCK_T, *rest, D, DV, BLOCK_D, BLOCK_DV, BLOCK_T,
                                  PRECISION)
    if TAIL_T > 0:
        dqt, dk, dv = _fused_rows(dqt, dk, dv, *args, TILES * BLOCK_T, *rest, D, DV, BLOCK_D, BLOCK_DV, TAIL_T,
                                  PRECISION)
    _put(dk_base, keys, M, offs_d, D, sdkm, 1, dk * scale)
    _put(dv_base, keys, M, offs_dv, DV, sdvm, 1, dv)
    return dq0, dq1, dq2, dq3, dqt


@triton.jit
def _fused_backward_kernel(do_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
                           sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                           sdqb, sdqn, sdkb, sdkm, sdvb, sdvm, HEADS, N, M, scale, qk_scale2,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
                           TAIL_T: tl.constexpr, TAIL_ROWS: tl.constexpr, TAIL_N: tl.constexpr,
                           PRECISION: tl.constexpr, SEPARATE_KV: tl.constexpr = True):
    """dQ, dK and dV of one (batch, head) (grid: batch * heads) whose N queries are TILES whole BLOCK_T tiles (at
    most four) and, with TAIL_T, one TAIL_T tile after them (TAIL_ROWS: TAIL_T, or 16 where there is none): delta
    = rowsum(dO * O) first (delta_ptr: (B, heads, N) float32 scratch, read back by the program's other threads),
    then BLOCK_N keys at a time (a TAIL_N block after the last whole one) against every query tile. Layouts and
    tails as in the two key-blocked kernels, whose arithmetic this repeats. Without SEPARATE_KV, dq_ptr is a qkv
    projection's gradient (B, N, 3 * heads * D), dK and dV go to its second and third channel thirds (with dq's
    strides) and dk_ptr / dv_ptr are not touched: one output buffer, where three views of it would cost torch.compile
    a copy of each."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)
    pid = tl.program_id(0)
    b, h = (pid // HEADS).to(tl.int64), pid % HEADS
    q_base, do_base = q_ptr + b * sqb + h * sqh, do_ptr + b * sob + h * soh
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    out_base = out_ptr + b * N * HEADS * DV + h * DV
    stat_base = (b * HEADS + h) * N
    for t in tl.static_range(TILES):
        _fused_delta(do_base, out_base, delta_ptr + stat_base, t * BLOCK_T, N, son, sod, HEADS, DV, BLOCK_DV, BLOCK_T)
    if TAIL_T > 0:
        _fused_delta(do_base, out_base, delta_ptr + stat_base, TILES * BLOCK_T, N, son, sod, HEADS, DV, BLOCK_DV,
                     TAIL_T)
    tl.debug_barrier()  # every row's delta stored before any thread reads one back
    dq0 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dq3 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dqt = tl.zeros([TAIL_ROWS, BLOCK_D], dtype=tl.float32)
    if SEPARATE_KV:
        dk_base, dv_base = dk_ptr + b * sdkb + h * D, dv_ptr + b * sdvb + h * DV
    else:
        dk_base, dv_base = dq_ptr + b * sdqb + (HEADS + h) * D, dq_ptr + b * sdqb + 2 * HEADS * D + h * DV
    # statistics through derived pointers: torch.compile counts a pointer handed unchanged to a helper whose results
    # reach a store as written, and would copy lse before every launch
    args = (k_base, v_base, q_base, do_base, lse_ptr + stat_base, delta_ptr + stat_base, dk_base, dv_base, 0)
    rest = (N, M, sqn, sqd, skm, skd, svm, svd, son, sod, sdkm, sdvm, scale, qk_scale2)
    whole = M - M % BLOCK_N if TAIL_N > 0 else M
    for key0 in range(0, whole, BLOCK_N):
        dq0, dq1, dq2, dq3, dqt = _fused_keys(dq0, dq1, dq2, dq3, dqt, *args, key0, *rest, D, DV, BLOCK_D, BLOCK_DV,
                                              BLOCK_T, BLOCK_N, TILES, TAIL_T, PRECISION)
    if TAIL_N > 0:
        dq0, dq1, dq2, dq3, dqt = _fused_keys(dq0, dq1, dq2, dq3, dqt, *args, whole, *rest, D, DV, BLOCK_D, BLOCK_DV,
                                              BLOCK_T, TAIL_N, TILES, TAIL_T, PRECISION)
    dq_base = dq_ptr + b * sdqb + h * D
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_T)
    if TILES > 0:
        _put(dq_base, rows, N, offs_d, D, sdqn, 1, dq0 * scale)
    if TILES > 1:
        _put(dq_base, BLOCK_T + rows, N, offs_d, D, sdqn, 1, dq1 * scale)
    if TILES > 2:
        _put(dq_base, 2 * BLOCK_T + rows, N, offs_d, D, sdqn, 1, dq2 * scale)
    if TILES > 3:
        _put(dq_base, 3 * BLOCK_T + rows, N, offs_d, D, sdqn, 1, dq3 * scale)
    if TAIL_T > 0:
        _put(dq_base, TILES * BLOCK_T + tl.arange(0, TAIL_ROWS), N, offs_d, D, sdqn, 1, dqt * scale)
