"""Triton kernels of :mod:`zoo.ops.outlook` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _pixel_block(H, W, NH, BLOCK_P: tl.constexpr):
    """This program's batch (int64) and head (grid axis 1: batch * heads) and its block of BLOCK_P pixels (grid
    axis 0, raster order): their numbers, which are inside the image, and their (y, x)."""
    pid_bh = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return (pid_bh // NH).to(tl.int64), pid_bh % NH, offs_p, offs_p < H * W, offs_p // W, offs_p % W


@triton.jit
def _covering_window(y, x, mask_p, b, h, w, ty, tx, K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr):
    """Candidate (ty, tx) of the at most NT x NT windows whose k x k footprint covers pixel (y, x): the window's
    flat index n, the pixel's position (iy, ix) in it, and whether that window exists."""
    ny = (y + PAD) // S - ty
    nx = (x + PAD) // S - tx
    iy = y + PAD - ny * S
    ix = x + PAD - nx * S
    valid = mask_p & (iy < K) & (ix < K) & (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    return (b * h + ny) * w + nx, iy, ix, valid


@triton.jit
def _neighbour_slots(K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Slots e of the (2K-1) x (2K-1) pixel offsets (oy, ox) in [-(K-1), K-1]^2 that one window row can reach
    (row i and column j of a window sit at pixels whose offset is j - i): slot numbers, offsets, which exist."""
    R: tl.constexpr = 2 * K - 1
    offs_e = tl.arange(0, BLOCK_E)
    return offs_e // R - (K - 1), offs_e % R - (K - 1), offs_e < R * R


@triton.jit
def _gather_neighbours(src_ptr, weights, b, head, y, x, mask_p, oy, ox, mask_e, H, W, C, D,
                       BLOCK_D: tl.constexpr):
    """sum_e weights[p, e] * src[pixel p + offset e] over one head's D channels, zero outside the image:
    (BLOCK_P, BLOCK_D) float32."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    sy = y[:, None] + oy[None, :]
    sx = x[:, None] + ox[None, :]
    inside = mask_p[:, None] & mask_e[None, :] & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
    ptrs = src_ptr + b * H * W * C + head * D + ((sy * W + sx) * C)[:, :, None] + offs_d[None, None, :]
    vals = tl.load(ptrs, mask=inside[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
    return tl.sum(weights[:, :, None] * vals, axis=1)


@triton.jit
def _store_pixels(dst_ptr, acc, b, head, offs_p, mask_p, H, W, C, D, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = dst_ptr + b * H * W * C + head * D + (offs_p * C)[:, None] + offs_d[None, :]
    tl.store(ptrs, acc.to(dst_ptr.dtype.element_ty), mask=mask_p[:, None] & (offs_d < D)[None, :])


# Both gather kernels work per output pixel p. The windows covering p reach only the (2K-1)^2 pixels around it, and
# several (window, row) pairs reach the same pixel (VOLO's k3/s2: up to 4 windows x 9 pixels onto 25 pixels; k3/s1:
# 81 onto 25), so the softmaxed weights are first summed per offset, then each neighbour's channels are read once.


@triton.jit
def forward_kernel(v_ptr, attn_ptr, out_ptr, lse_ptr, H, W, C, h, w, NH, D, scale,
                   K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, NT: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, STATS: tl.constexpr):
    """Outlook output of BLOCK_P pixels of one (batch, head) (grid: (cdiv(H*W, BLOCK_P), B*heads)): v and out
    (B, H, W, C) channels-last, attn the (B*h*w, heads, K*K, K*K) window logits; with STATS each window row's
    float32 log-sum-exp."""
    scale = tl.cast(scale, tl.float32)  # fp64 from inductor's launcher
    KK: tl.constexpr = K * K
    b, head, offs_p, mask_p, y, x = _pixel_block(H, W, NH, BLOCK_P)
    oy, ox, mask_e = _neighbour_slots(K, BLOCK_E)
    row_stride = NH * KK * KK
    weights = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    for ty in tl.static_range(NT):
        for tx in tl.static_range(NT):
            # the window n whose row i = (iy, ix) targets pixel (y, x); its column j reads the pixel at offset j - i
            n, iy, ix, valid = _covering_window(y, x, mask_p, b, h, w, ty, tx, K, S, PAD)
            jy = iy[:, None] + oy[None, :]
            jx = ix[:, None] + ox[None, :]
            m2 = valid[:, None] & mask_e[None, :] & (jy >= 0) & (jy < K) & (jx >= 0) & (jx < K)
            row = attn_ptr + n * row_stride + head * KK * KK + (iy * K + ix) * KK
            logits = tl.load(row[:, None] + jy * K + jx, mask=m2, other=0.0).to(tl.float32)
            logits = tl.where(m2, logits * scale, float("-inf"))
            row_max = tl.where(valid, tl.max(logits, axis=1), 0.0)
            e = tl.where(m2, tl.exp(logits - row_max[:, None]), 0.0)
            denom = tl.where(valid, tl.sum(e, axis=1), 1.0)
            weights += e / denom[:, None]
            if STATS:  # the backward's row statistics (inference calls skip the store and its buffer)
                tl.store(lse_ptr + (n * NH + head) * KK + iy * K + ix, row_max + tl.log(denom), mask=valid)
    acc = _gather_neighbours(v_ptr, weights, b, head, y, x, mask_p, oy, ox, mask_e, H, W, C, D, BLOCK_D)
    _store_pixels(out_ptr, acc, b, head, offs_p, mask_p, H, W, C, D, BLOCK_D)


@triton.jit
def grad_v_kernel(go_ptr, attn_ptr, lse_ptr, dv_ptr, H, W, C, h, w, NH, D, scale,
                  K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, NT: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """dv of BLOCK_P pixels of one (batch, head), the forward's gather with grad_out in place of v (grid and
    layouts as ``forward_kernel``); the softmax weights come back from the logits and the saved log-sum-exp."""
    scale = tl.cast(scale, tl.float32)  # fp64 from inductor's launcher
    KK: tl.constexpr = K * K
    b, head, offs_p, mask_p, y, x = _pixel_block(H, W, NH, BLOCK_P)
    oy, ox, mask_e = _neighbour_slots(K, BLOCK_E)
    row_stride = NH * KK * KK
    weights = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    for ty in tl.static_range(NT):
        for tx in tl.static_range(NT):
            # the window n that reads pixel (y, x) as its column j = (jy, jx); its row i writes the pixel at offset
            # i - j, and only rows whose pixel is inside the image have a gradient
            n, jy, jx, valid = _covering_window(y, x, mask_p, b, h, w, ty, tx, K, S, PAD)
            iy = jy[:, None] + oy[None, :]
            ix = jx[:, None] + ox[None, :]
            ty_pix = y[:, None] + oy[None, :]
            tx_pix = x[:, None] + ox[None, :]
            rows = (valid[:, None] & mask_e[None, :] & (iy >= 0) & (iy < K) & (ix >= 0) & (ix < K)
                    & (ty_pix >= 0) & (ty_pix < H) & (tx_pix >= 0) & (tx_pix < W))
            i = iy * K + ix
            base = n * row_stride + head * KK * KK
            logits = tl.load(attn_ptr + base[:, None] + i * KK + (jy * K + jx)[:, None], mask=rows,
                             other=0.0).to(tl.float32) * scale
            lse = tl.load(lse_ptr + ((n * NH + head) * KK)[:, None] + i, mask=rows, other=0.0)
            weights += tl.where(rows, tl.exp(logits - lse), 0.0)
    acc = _gather_neighbours(go_ptr, weights, b, head, y, x, mask_p, oy, ox, mask_e, H, W, C, D, BLOCK_D)
    _store_pixels(dv_ptr, acc, b, head, offs_p, mask_p, H, W, C, D, BLOCK_D)


@triton.jit
def grad_attn_kernel(go_ptr, v_ptr, attn_ptr, da_ptr, H, W, C, h, w, NH, D, scale,
                     K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_D: tl.constexpr):
    """d(logits) of BLOCK_N windows of one (batch, head) (grid: (cdiv(h*w, BLOCK_N), B*heads)), written in the
    (B*h*w, heads, K*K, K*K) layout of attn: each window's K*K values are loaded once and every row's softmax
    backward reads the grad_out pixel it wrote to."""
    scale = tl.cast(scale, tl.float32)  # fp64 from inductor's launcher
    KK: tl.constexpr = K * K
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    head = pid_bh % NH
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < h * w
    ny = offs_n // w
    nx = offs_n % w
    offs_j = tl.arange(0, BLOCK_KK)
    mask_j = offs_j < KK
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    pix_base = b * H * W * C + head * D
    # the window's k^2 values, loaded once: (BLOCK_N, BLOCK_KK, BLOCK_D)
    vy = ny[:, None] * S - PAD + (offs_j // K)[None, :]
    vx = nx[:, None] * S - PAD + (offs_j % K)[None, :]
    inside = mask_n[:, None] & mask_j[None, :] & (vy >= 0) & (vy < H) & (vx >= 0) & (vx < W)
    v_ptrs = v_ptr + pix_base + ((vy * W + vx) * C)[:, :, None] + offs_d[None, None, :]
    vals = tl.load(v_ptrs, mask=inside[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
    n = b * h * w + offs_n
    row_base = n * (NH * KK * KK) + head * KK * KK
    for i in tl.static_range(KK):
        iy = ny * S - PAD + i // K
        ix = nx * S - PAD + i % K
        target = mask_n & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        g_ptrs = go_ptr + pix_base + ((iy * W + ix) * C)[:, None] + offs_d[None, :]
        g = tl.load(g_ptrs, mask=target[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        dp = tl.sum(g[:, None, :] * vals, axis=2)  # (BLOCK_N, BLOCK_KK)
        m2 = mask_n[:, None] & mask_j[None, :]
        a_ptrs = attn_ptr + (row_base + i * KK)[:, None] + offs_j[None, :]
        logits = tl.load(a_ptrs, mask=m2, other=0.0).to(tl.float32)
        logits = tl.where(m2, logits * scale, float("-inf"))
        row_max = tl.where(mask_n, tl.max(logits, axis=1), 0.0)
        e = tl.where(m2, tl.exp(logits - row_max[:, None]), 0.0)
        p = e / tl.where(mask_n, tl.sum(e, axis=1), 1.0)[:, None]
        # rows writing outside the image get no gradient (g is zero there): da = 0
        da = scale * p * (dp - tl.sum(p * dp, axis=1)[:, None])
        tl.store(da_ptr + (row_base + i * KK)[:, None] + offs_j[None, :], da.to(da_ptr.dtype.element_ty),
                 mask=m2)
