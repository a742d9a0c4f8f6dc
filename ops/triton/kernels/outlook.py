"""Triton kernels of :mod:`zoo.ops.outlook` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _class_pixels(H, W, NH, S: tl.constexpr, CY: tl.constexpr, CX: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's batch (int64) and head (grid axis 1: batch * heads) and its block of BLOCK_P pixels (grid axis
    0) of residue class (y % S, x % S) = (CY, CX), in raster order: their (y, x) and which are inside the image."""
    pid_bh = tl.program_id(1)
    class_w = tl.cdiv(W - CX, S)
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    y = CY + S * (offs // class_w)
    x = CX + S * (offs % class_w)
    return (pid_bh // NH).to(tl.int64), pid_bh % NH, (y < H) & (offs < tl.cdiv(H - CY, S) * class_w), y, x


@triton.jit
def _class_window(y, x, mask_p, b, h, w, oy, ox, mask_e, ty: tl.constexpr, tx: tl.constexpr, K: tl.constexpr,
                  S: tl.constexpr, PAD: tl.constexpr, CY: tl.constexpr, CX: tl.constexpr):
    """Window (ty, tx) of the windows over each pixel (y, x) of class (CY, CX), numbered from the last one, in which
    every pixel of the class sits at position ((CY + PAD) % S + S * ty, (CX + PAD) % S + S * tx): the window's flat
    index n, whether it exists, the pixel's position index, the position index of each slot's offset from it, and
    which slots fall inside the window."""
    ny = (y + PAD) // S - ty
    nx = (x + PAD) // S - tx
    valid = mask_p & (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    py = (CY + PAD) % S + S * ty
    px = (CX + PAD) % S + S * tx
    qy = py + oy
    qx = px + ox
    reach = mask_e & (qy >= 0) & (qy < K) & (qx >= 0) & (qx < K)
    return (b * h + ny) * w + nx, valid, py * K + px, qy * K + qx, reach


@triton.jit
def _class_slots(K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, CY: tl.constexpr, CX: tl.constexpr,
                 NY: tl.constexpr, NX: tl.constexpr, BLOCK_E: tl.constexpr):
    """Slots e of the pixel offsets (oy, ox) that the windows covering the pixels of residue class (CY, CX) reach:
    their window positions are (CY + PAD) % S + S * ty (ty < NY) and (CX + PAD) % S + S * tx (tx < NX), so the
    offsets j - i between two positions of a window span K + S * (NY - 1) rows and K + S * (NX - 1) columns.
    Offsets, and which slots exist."""
    RX: tl.constexpr = K + S * (NX - 1)
    offs_e = tl.arange(0, BLOCK_E)
    oy = offs_e // RX - ((CY + PAD) % S + S * (NY - 1))
    ox = offs_e % RX - ((CX + PAD) % S + S * (NX - 1))
    return oy, ox, offs_e < (K + S * (NY - 1)) * RX


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
def _store_pixels(dst_ptr, acc, b, head, y, x, mask_p, H, W, C, D, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = dst_ptr + b * H * W * C + head * D + ((y * W + x) * C)[:, None] + offs_d[None, :]
    tl.store(ptrs, acc.to(dst_ptr.dtype.element_ty), mask=mask_p[:, None] & (offs_d < D)[None, :])


# Both gather kernels work per output pixel p, one residue class (p_y % S, p_x % S) a launch. The windows covering p
# reach only the pixels around it, and several (window, row) pairs reach the same pixel (VOLO's k3/s2: up to 4
# windows x 9 pixels onto 25 pixels; k3/s1: 81 onto 25), so the softmaxed weights are first summed per offset, then
# each neighbour's channels are read once. Within a class, the window position that lands on p is the same for every
# pixel and a compile-time constant, and so is the set of offsets it reaches (k3/s2: 9, 15, 15 and 25 offsets for the
# classes (0, 0), (0, 1), (1, 0), (1, 1), against 25 for every pixel without classes).


@triton.jit
def forward_kernel(v_ptr, attn_ptr, out_ptr, lse_ptr, H, W, C, h, w, NH, D, scale,
                   K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, CY: tl.constexpr, CX: tl.constexpr,
                   NY: tl.constexpr, NX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_D: tl.constexpr, STATS: tl.constexpr):
    """Outlook output of BLOCK_P pixels of residue class (CY, CX) of one (batch, head) (grid: (cdiv(class pixels,
    BLOCK_P), B*heads)), whose pixels are covered by NY x NX windows: v and out (B, H, W, C) channels-last, attn the
    (B*h*w, heads, K*K, K*K) window logits; with STATS each window row's float32 log-sum-exp."""
    scale = tl.cast(scale, tl.float32)  # fp64 from inductor's launcher
    KK: tl.constexpr = K * K
    b, head, mask_p, y, x = _class_pixels(H, W, NH, S, CY, CX, BLOCK_P)
    oy, ox, mask_e = _class_slots(K, S, PAD, CY, CX, NY, NX, BLOCK_E)
    weights = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    for ty in tl.static_range(NY):
        for tx in tl.static_range(NX):
            # the window n whose row i targets the pixel; its column j reads the pixel at offset j - i
            n, valid, i, j, reach = _class_window(y, x, mask_p, b, h, w, oy, ox, mask_e, ty, tx, K, S, PAD, CY, CX)
            m2 = valid[:, None] & reach[None, :]
            row = (n * NH + head) * (KK * KK) + i * KK
            logits = tl.load(attn_ptr + row[:, None] + j[None, :], mask=m2, other=0.0).to(tl.float32)
            logits = tl.where(m2, logits * scale, float("-inf"))
            row_max = tl.where(valid, tl.max(logits, axis=1), 0.0)
            e = tl.where(m2, tl.exp(logits - row_max[:, None]), 0.0)
            denom = tl.where(valid, tl.sum(e, axis=1), 1.0)
            weights += e / denom[:, None]
            if STATS:  # the backward's row statistics (inference calls skip the store and its buffer)
                tl.store(lse_ptr + (n * NH + head) * KK + i, row_max + tl.log(denom), mask=valid)
    acc = _gather_neighbours(v_ptr, weights, b, head, y, x, mask_p, oy, ox, mask_e, H, W, C, D, BLOCK_D)
    _store_pixels(out_ptr, acc, b, head, y, x, mask_p, H, W, C, D, BLOCK_D)


@triton.jit
def grad_v_kernel(go_ptr, attn_ptr, lse_ptr, dv_ptr, H, W, C, h, w, NH, D, scale,
                  K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, CY: tl.constexpr, CX: tl.constexpr,
                  NY: tl.constexpr, NX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """dv of BLOCK_P pixels of residue class (CY, CX) of one (batch, head), the forward's gather with grad_out in
    place of v (grid and layouts as ``forward_kernel``); the softmax weights come back from the logits and the saved
    log-sum-exp."""
    scale = tl.cast(scale, tl.float32)  # fp64 from inductor's launcher
    KK: tl.constexpr = K * K
    b, head, mask_p, y, x = _class_pixels(H, W, NH, S, CY, CX, BLOCK_P)
    oy, ox, mask_e = _class_slots(K, S, PAD, CY, CX, NY, NX, BLOCK_E)
    weights = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    for ty in tl.static_range(NY):
        for tx in tl.static_range(NX):
            # the window n that reads the pixel as its column j; its row i writes the pixel at offset i - j, and
            # only rows whose pixel is inside the image have a gradient
            n, valid, j, i, reach = _class_window(y, x, mask_p, b, h, w, oy, ox, mask_e, ty, tx, K, S, PAD, CY, CX)
            ty_pix = y[:, None] + oy[None, :]
            tx_pix = x[:, None] + ox[None, :]
            rows = (valid[:, None] & reach[None, :] & (ty_pix >= 0) & (ty_pix < H) & (tx_pix >= 0) & (tx_pix < W))
            block = (n * NH + head) * (KK * KK) + j
            logits = tl.load(attn_ptr + block[:, None] + (i * KK)[None, :], mask=rows, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + ((n * NH + head) * KK)[:, None] + i[None, :], mask=rows, other=0.0)
            weights += tl.where(rows, tl.exp(logits * scale - lse), 0.0)
    acc = _gather_neighbours(go_ptr, weights, b, head, y, x, mask_p, oy, ox, mask_e, H, W, C, D, BLOCK_D)
    _store_pixels(dv_ptr, acc, b, head, y, x, mask_p, H, W, C, D, BLOCK_D)


@triton.jit
def grad_attn_kernel(go_ptr, v_ptr, attn_ptr, da_ptr, H, W, C, h, w, NH, D, scale,
                     K: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """d(logits) of BLOCK_N windows of one (batch, head) (grid: (cdiv(h*w, BLOCK_N), B*heads)), written in the
    (B*h*w, heads, K*K, K*K) layout of attn. A window's row i writes the pixel its column i reads, so grad_out and v
    are gathered at the same K*K pixels, and dP = grad_out[rows] @ v[cols]^T is one batched product over the windows
    (BLOCK_KK >= 16 and BLOCK_D >= 16: the dot's smallest edges)."""
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
    # each window's K*K pixels (zero outside the image): (BLOCK_N, BLOCK_KK, BLOCK_D) tiles of grad_out and v
    py = ny[:, None] * S - PAD + (offs_j // K)[None, :]
    px = nx[:, None] * S - PAD + (offs_j % K)[None, :]
    inside = mask_n[:, None] & mask_j[None, :] & (py >= 0) & (py < H) & (px >= 0) & (px < W)
    pixel = (b * H * W * C + head * D + (py * W + px) * C)[:, :, None] + offs_d[None, None, :]
    mask3 = inside[:, :, None] & (offs_d < D)[None, None, :]
    g = tl.load(go_ptr + pixel, mask=mask3, other=0.0)
    vals = tl.load(v_ptr + pixel, mask=mask3, other=0.0)
    dp = tl.dot(g, tl.permute(vals, (0, 2, 1)), input_precision=PRECISION)  # (BLOCK_N, rows i, columns j)
    # rows writing outside the image have no gradient (their g is zero, so dp and da are too)
    m3 = mask_n[:, None, None] & mask_j[None, :, None] & mask_j[None, None, :]
    row_base = (b * h * w + offs_n) * (NH * KK * KK) + head * KK * KK
    a_off = row_base[:, None, None] + (offs_j * KK)[None, :, None] + offs_j[None, None, :]
    logits = tl.load(attn_ptr + a_off, mask=m3, other=0.0).to(tl.float32)
    logits = tl.where(m3, logits * scale, float("-inf"))
    row_max = tl.max(logits, axis=2)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    e = tl.where(m3, tl.exp(logits - row_max[:, :, None]), 0.0)
    denom = tl.sum(e, axis=2)
    p = e / tl.where(denom == 0.0, 1.0, denom)[:, :, None]
    da = scale * p * (dp - tl.sum(p * dp, axis=2)[:, :, None])
    tl.store(da_ptr + a_off, da.to(da_ptr.dtype.element_ty), mask=m3)
