"""Triton kernels of :mod:`zoo.ops.triton.window` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _window_tokens(win, t, H, W, NWX, SY, SX, WH: tl.constexpr, WW: tl.constexpr):
    """Image position (y, x) and shift region of token ``t`` (raster) of rolled window ``win`` (raster)."""
    ry = (win // NWX) * WH + t // WW
    rx = (win % NWX) * WW + t % WW
    wrapped_y = ry >= H - SY  # rows the roll brought in from the top of the map
    wrapped_x = rx >= W - SX
    y = tl.where(wrapped_y, ry + SY - H, ry + SY)
    x = tl.where(wrapped_x, rx + SX - W, rx + SX)
    return y, x, wrapped_y.to(tl.int32) * 2 + wrapped_x.to(tl.int32)


@triton.jit
def _load_tokens(base, y, x, ok, offs_d, stride_y, stride_x, stride_d, D: tl.constexpr):
    """A [rows, BLOCK_D] tile of one head's channels at image positions (y, x); zeros where not ``ok``."""
    ptrs = base + (y * stride_y + x * stride_x)[:, None] + (offs_d * stride_d)[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _store_tokens(base, y, x, ok, offs_d, value, stride_y, stride_x, D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile at image positions (y, x) of a buffer with unit channel stride."""
    ptrs = base + (y * stride_y + x * stride_x)[:, None] + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _bias_logits(bias_base, offs_m, offs_n, q_ok, k_ok, stride_bi, stride_bj):
    """The bias of a [BLOCK_M, BLOCK_N] block of logits in float32, scaled by log2(e) (the softmax runs in base 2)."""
    bias = tl.load(bias_base + offs_m[:, None] * stride_bi + offs_n[None, :] * stride_bj,
                   mask=q_ok[:, None] & k_ok[None, :], other=0.0)
    return bias.to(tl.float32) * 1.4426950408889634


@triton.jit
def _allowed_keys(q_ok, k_ok, q_region, k_region):
    """Which keys each query row sees: those of its shift region (padded query rows, never stored, see every key,
    so that no row is all -inf: its NaN would reach dK as NaN * 0 in the backward)."""
    return ((q_region[:, None] == k_region[None, :]) | ~q_ok[:, None]) & k_ok[None, :]


@triton.jit
def _softmax_rows(s, allowed):
    """Base-2 softmax of float32 logits over the allowed keys of each row; zero elsewhere."""
    s = tl.where(allowed, s, float("-inf"))
    p = tl.exp2(s - tl.max(s, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _probabilities(q, k, q_ok, k_ok, q_region, k_region, bias_base, offs_m, offs_n, stride_bi, stride_bj,
                   qk_scale2, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax of a query block over its window's keys: float32 [BLOCK_M, BLOCK_N], zero where masked."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
    if HAS_BIAS:
        s += _bias_logits(bias_base, offs_m, offs_n, q_ok, k_ok, stride_bi, stride_bj)
    return _softmax_rows(s, _allowed_keys(q_ok, k_ok, q_region, k_region))


@triton.jit
def _grad_logits(p, dp):
    """d loss / d logits of a softmax block: P * (dP - rowsum(P * dP)) (= rowsum(dO * O), so O is not needed)."""
    return p * (dp - tl.sum(p * dp, axis=1)[:, None])


@triton.jit
def _accumulate_bias_grad(base, ds, offs_m, offs_n, q_ok, k_ok, not_first, N: tl.constexpr):
    """Add a [BLOCK_M, BLOCK_N] block of dS to this program's (N, N) float32 slice (stored, on its first item)."""
    ptrs = base + offs_m[:, None] * N + offs_n[None, :]
    ok = q_ok[:, None] & k_ok[None, :]
    tl.debug_barrier()  # the previous item's stores to these addresses, by any thread of the program, are seen
    tl.store(ptrs, ds + tl.load(ptrs, mask=ok & not_first, other=0.0), mask=ok)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr,
                    sqb, sqy, sqx, sqh, sqd, skb, sky, skx, skh, skd, svb, svy, svx, svh, svd,
                    sbw, sbh, sbi, sbj, H, W, NWX, NWIN, HEADS, SY, SX, qk_scale2,
                    WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    N: tl.constexpr = WH * WW
    pid = tl.program_id(0)
    win = pid % NWIN
    head = (pid // NWIN) % HEADS
    b = (pid // (NWIN * HEADS)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = offs_n < N
    ky, kx, k_region = _window_tokens(win, offs_n, H, W, NWX, SY, SX, WH, WW)
    k = _load_tokens(k_ptr + b * skb + head * skh, ky, kx, k_ok, offs_d, sky, skx, skd, D)
    v = _load_tokens(v_ptr + b * svb + head * svh, ky, kx, k_ok, offs_dv, svy, svx, svd, DV)
    q_base = q_ptr + b * sqb + head * sqh
    bias_base = bias_ptr + win * sbw + head * sbh
    out_base = out_ptr + b * H * W * HEADS * DV + head * DV
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_ok = offs_m < N
        qy, qx, q_region = _window_tokens(win, offs_m, H, W, NWX, SY, SX, WH, WW)
        q = _load_tokens(q_base, qy, qx, q_ok, offs_d, sqy, sqx, sqd, D)
        p = _probabilities(q, k, q_ok, k_ok, q_region, k_region, bias_base, offs_m, offs_n, sbi, sbj,
                           qk_scale2, HAS_BIAS, PRECISION)
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        _store_tokens(out_base, qy, qx, q_ok, offs_dv, out, W * HEADS * DV, HEADS * DV, DV)


@triton.jit
def _backward_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr,
                     sqb, sqy, sqx, sqh, sqd, skb, sky, skx, skh, skd, svb, svy, svx, svh, svd,
                     sdb, sdy, sdx, sdh, sdd, sbw, sbh, sbi, sbj,
                     B, CHUNK, H, W, NWX, NWIN, HEADS, SY, SX, scale, qk_scale2,
                     WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                     PRECISION: tl.constexpr):
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    N: tl.constexpr = WH * WW
    pid = tl.program_id(0)
    win = pid % NWIN
    head = (pid // NWIN) % HEADS
    chunk = pid // (NWIN * HEADS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = offs_n < N
    ky, kx, k_region = _window_tokens(win, offs_n, H, W, NWX, SY, SX, WH, WW)
    bias_base = bias_ptr + win * sbw + head * sbh
    dbias_base = dbias_ptr + ((chunk.to(tl.int64) * NWIN + win) * HEADS + head) * (N * N)
    first = chunk.to(tl.int64) * CHUNK
    # one batch item per program without a bias gradient; a chunk of them, summed in order, with one
    for item in range(0, tl.minimum(CHUNK, B - chunk * CHUNK)):
        b = first + item
        k = _load_tokens(k_ptr + b * skb + head * skh, ky, kx, k_ok, offs_d, sky, skx, skd, D)
        v = _load_tokens(v_ptr + b * svb + head * svh, ky, kx, k_ok, offs_dv, svy, svx, svd, DV)
        q_base = q_ptr + b * sqb + head * sqh
        do_base = do_ptr + b * sdb + head * sdh
        dq_base = dq_ptr + b * H * W * HEADS * D + head * D
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for start in range(0, N, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q_ok = offs_m < N
            qy, qx, q_region = _window_tokens(win, offs_m, H, W, NWX, SY, SX, WH, WW)
            q = _load_tokens(q_base, qy, qx, q_ok, offs_d, sqy, sqx, sqd, D)
            do = _load_tokens(do_base, qy, qx, q_ok, offs_dv, sdy, sdx, sdd, DV)
            p = _probabilities(q, k, q_ok, k_ok, q_region, k_region, bias_base, offs_m, offs_n, sbi, sbj,
                               qk_scale2, HAS_BIAS, PRECISION)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = _grad_logits(p, dp)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
            _store_tokens(dq_base, qy, qx, q_ok, offs_d, dq, W * HEADS * D, HEADS * D, D)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            if BIAS_GRAD:
                _accumulate_bias_grad(dbias_base, ds, offs_m, offs_n, q_ok, k_ok, item > 0, N)
        _store_tokens(dk_ptr + b * H * W * HEADS * D + head * D, ky, kx, k_ok, offs_d, dk * scale,
                      W * HEADS * D, HEADS * D, D)
        _store_tokens(dv_ptr + b * H * W * HEADS * DV + head * DV, ky, kx, k_ok, offs_dv, dv,
                      W * HEADS * DV, HEADS * DV, DV)


# ----------------------------------------------------------------------------------------------------------------
# windows of one query block with a bias (every Swin window of 49 tokens in 16 bits): a program takes a chunk of
# batch items of one (window, head) in its innermost loop, so that Triton pipelines the next item's loads under this
# item's products; the bias block (Swin's gathered table, read through a permuted view: a 32-byte sector for each
# 4-byte value) is loaded once, and the bias gradient is summed in registers and stored once


@triton.jit
def _items_program(H, W, NWX, NWIN, HEADS, SY, SX, WH: tl.constexpr, WW: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (window, head, chunk of batch items), its window's tokens (offsets, validity, image position)
    and which keys each query sees (the bias is loaded by the kernel: torch.compile's analysis of the tensors a
    kernel writes counts a pointer argument handed to a helper as written)."""
    pid = tl.program_id(0)
    win = pid % NWIN
    head = (pid // NWIN) % HEADS
    chunk = pid // (NWIN * HEADS)
    offs_n = tl.arange(0, BLOCK_N)
    ok = offs_n < WH * WW
    y, x, region = _window_tokens(win, offs_n, H, W, NWX, SY, SX, WH, WW)
    return win, head, chunk, offs_n, ok, y, x, _allowed_keys(ok, ok, region, region)


@triton.jit
def _forward_items_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr,
                          sqb, sqy, sqx, sqh, sqd, skb, sky, skx, skh, skd, svb, svy, svx, svh, svd,
                          sbw, sbh, sbi, sbj, B, CHUNK, H, W, NWX, NWIN, HEADS, SY, SX, qk_scale2,
                          WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          PRECISION: tl.constexpr):
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    win, head, chunk, offs_n, ok, y, x, allowed = _items_program(H, W, NWX, NWIN, HEADS, SY, SX, WH, WW, BLOCK_N)
    bias = _bias_logits(bias_ptr + win * sbw + head * sbh, offs_n, offs_n, ok, ok, sbi, sbj)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    first = chunk.to(tl.int64) * CHUNK
    for item in range(0, tl.minimum(CHUNK, B - chunk * CHUNK)):
        b = first + item
        q = _load_tokens(q_ptr + b * sqb + head * sqh, y, x, ok, offs_d, sqy, sqx, sqd, D)
        k = _load_tokens(k_ptr + b * skb + head * skh, y, x, ok, offs_d, sky, skx, skd, D)
        v = _load_tokens(v_ptr + b * svb + head * svh, y, x, ok, offs_dv, svy, svx, svd, DV)
        p = _softmax_rows(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2 + bias, allowed)
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        _store_tokens(out_ptr + b * H * W * HEADS * DV + head * DV, y, x, ok, offs_dv, out, W * HEADS * DV,
                      HEADS * DV, DV)


@triton.jit
def _backward_items_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr,
                           sqb, sqy, sqx, sqh, sqd, skb, sky, skx, skh, skd, svb, svy, svx, svh, svd,
                           sdb, sdy, sdx, sdh, sdd, sbw, sbh, sbi, sbj,
                           B, CHUNK, H, W, NWX, NWIN, HEADS, SY, SX, scale, qk_scale2,
                           WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    N: tl.constexpr = WH * WW
    win, head, chunk, offs_n, ok, y, x, allowed = _items_program(H, W, NWX, NWIN, HEADS, SY, SX, WH, WW, BLOCK_N)
    bias = _bias_logits(bias_ptr + win * sbw + head * sbh, offs_n, offs_n, ok, ok, sbi, sbj)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dbias = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
    first = chunk.to(tl.int64) * CHUNK
    grad_stride_y, grad_stride_x = W * HEADS * D, HEADS * D
    for item in range(0, tl.minimum(CHUNK, B - chunk * CHUNK)):
        b = first + item
        q = _load_tokens(q_ptr + b * sqb + head * sqh, y, x, ok, offs_d, sqy, sqx, sqd, D)
        k = _load_tokens(k_ptr + b * skb + head * skh, y, x, ok, offs_d, sky, skx, skd, D)
        v = _load_tokens(v_ptr + b * svb + head * svh, y, x, ok, offs_dv, svy, svx, svd, DV)
        do = _load_tokens(do_ptr + b * sdb + head * sdh, y, x, ok, offs_dv, sdy, sdx, sdd, DV)
        p = _softmax_rows(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2 + bias, allowed)
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        ds = _grad_logits(p, tl.dot(do, tl.trans(v), input_precision=PRECISION))
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
        item_offset = b * H * W * HEADS * D
        _store_tokens(dq_ptr + item_offset + head * D, y, x, ok, offs_d, dq, grad_stride_y, grad_stride_x, D)
        _store_tokens(dk_ptr + item_offset + head * D, y, x, ok, offs_d, dk, grad_stride_y, grad_stride_x, D)
        _store_tokens(dv_ptr + b * H * W * HEADS * DV + head * DV, y, x, ok, offs_dv, dv, W * HEADS * DV,
                      HEADS * DV, DV)
        if BIAS_GRAD:
            dbias += ds
    if BIAS_GRAD:
        ptrs = dbias_ptr + ((chunk.to(tl.int64) * NWIN + win) * HEADS + head) * (N * N)
        tl.store(ptrs + offs_n[:, None] * N + offs_n[None, :], dbias, mask=ok[:, None] & ok[None, :])
