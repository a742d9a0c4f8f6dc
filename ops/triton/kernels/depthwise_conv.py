"""Triton kernel of :mod:`zoo.ops.depthwise_conv` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _rounded(t, dtype: tl.constexpr):
    """float32 ``t`` rounded to ``dtype`` and back: what a layer writing ``dtype`` hands the next one."""
    return t.to(dtype).to(tl.float32)


@triton.jit
def _neighbours(x_item, row, col, pix_ok, x_ch, ch_ok, H, W, sx_h, sx_w, dy: tl.constexpr, dx: tl.constexpr,
                K: tl.constexpr):
    """x at tap (dy, dx) of each of the block's pixels (row, col) (padding K // 2, zero outside the map) for the
    channels at offsets x_ch: (TILE_H * TILE_W, BLOCK_C) float32."""
    y_in = row + (dy - K // 2)
    x_in = col + (dx - K // 2)
    ok = (pix_ok & (y_in >= 0) & (y_in < H) & (x_in >= 0) & (x_in < W))[:, None] & ch_ok[None, :]
    return tl.load(x_item + (y_in * sx_h + x_in * sx_w)[:, None] + x_ch[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def forward_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, H, W, C, sx_b, sx_h, sx_w, sx_c, sr_b, sr_h, sr_w, sr_c,
                   sw_c, sw_t, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   IN_PLACE: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
                   FLIP: tl.constexpr = False):
    """y = residual + depthwise_conv(x) for a TILE_H x TILE_W block of one map's pixels x BLOCK_C channels a program
    (grid: (B * cdiv(H, TILE_H) * cdiv(W, TILE_W), cdiv(C, BLOCK_C)); y (B, H, W, C) written contiguous).

    x and residual (B, H, W, C) are read through their strides, w (C, K*K) through its strides (sw_c, sw_t) and b
    (C,) contiguous, both in the compute dtype (w's). With IN_PLACE, y is the residual and the sum is stored
    through the residual's strides (each element read and written by the same program). Rounding follows the unfused
    layers: conv inputs in the compute dtype, float32 accumulation, the conv (+ bias) rounded to the compute dtype,
    the residual sum in float32 rounded to y's dtype. Zero padding of
    K // 2 at the map's borders. Offsets within a batch item are int32 (the caller checks the extents).

    FLIP reads the taps in reverse order (w[c, K-1-i, K-1-j]): the conv's input gradient from the output's (stride
    1, padding K // 2).
    """
    compute = w_ptr.dtype.element_ty
    # a block of rows and columns of one map (not a run of flat pixel indices): the K rows of taps a block reads
    # overlap within it, and the pixel's row and column are shifts of a power-of-two tile index
    row_blocks = tl.cdiv(H, TILE_H)
    col_blocks = tl.cdiv(W, TILE_W)
    block = tl.program_id(0)
    item = (block // (row_blocks * col_blocks)).to(tl.int64)
    in_item = block % (row_blocks * col_blocks)
    i = tl.arange(0, TILE_H * TILE_W)
    row = (in_item // col_blocks) * TILE_H + i // TILE_W
    col = (in_item % col_blocks) * TILE_W + i % TILE_W
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pix_ok = (row < H) & (col < W)
    ch_ok = ch < C
    x_item = x_ptr + item * sx_b
    x_ch = ch * sx_c
    acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=tl.float32)
    for dy in tl.static_range(K):
        for dx in tl.static_range(K):
            value = _neighbours(x_item, row, col, pix_ok, x_ch, ch_ok, H, W, sx_h, sx_w, dy, dx, K)
            t = (K * K - 1 - (dy * K + dx)) if FLIP else (dy * K + dx)
            tap = tl.load(w_ptr + ch * sw_c + t * sw_t, mask=ch_ok, other=0.0).to(tl.float32)
            acc += _rounded(value, compute) * tap[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
    acc = _rounded(acc, compute)
    out_ok = pix_ok[:, None] & ch_ok[None, :]
    if HAS_RESIDUAL:
        r_offset = row * sr_h + col * sr_w
        acc += tl.load(r_ptr + item * sr_b + r_offset[:, None] + ch[None, :] * sr_c, mask=out_ok,
                       other=0.0).to(tl.float32)
    if IN_PLACE:
        y_at = y_ptr + item * sr_b + (row * sr_h + col * sr_w)[:, None] + ch[None, :] * sr_c
    else:
        y_at = y_ptr + item * H * W * C + ((row * W + col) * C)[:, None] + ch[None, :]
    tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def weight_grad_kernel(g_ptr, x_ptr, part_ptr, H, W, C, tiles, sg_b, sg_h, sg_w, sg_c, sx_b, sx_h, sx_w, sx_c,
                       K: tl.constexpr, TAPS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Per-program partial sums of the weight and bias gradients of ``depthwise_conv(x)`` given its output's
    gradient g (grid: (splits, cdiv(C, BLOCK_C))).

    Program (s, j) takes tiles s, s + splits, ... of the B * cdiv(H, TILE_H) * cdiv(W, TILE_W) pixel blocks (the
    forward's tiles) and writes part[s, t, c] (float32, (splits, TAPS, C) contiguous) = sum over its pixels p of
    g[p, c] * x[p + tap t's offset, c] for the K*K taps t (zero padding), and part[s, K*K, c] = sum of g[p, c]. g
    and x (B, H, W, C) are read through their strides; x is rounded to g's dtype (the compute dtype) on load, as the
    forward rounds the conv's inputs. A fixed order of sums: the same bits every call.
    """
    compute = g_ptr.dtype.element_ty
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    row_blocks = tl.cdiv(H, TILE_H)
    col_blocks = tl.cdiv(W, TILE_W)
    i = tl.arange(0, TILE_H * TILE_W)
    tap_ids = tl.arange(0, TAPS)
    x_ch = ch * sx_c
    acc = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
    for block in range(split, tiles, splits):
        item = (block // (row_blocks * col_blocks)).to(tl.int64)
        in_item = block % (row_blocks * col_blocks)
        row = (in_item // col_blocks) * TILE_H + i // TILE_W
        col = (in_item % col_blocks) * TILE_W + i % TILE_W
        pix_ok = (row < H) & (col < W)
        g_at = g_ptr + item * sg_b + (row * sg_h + col * sg_w)[:, None] + ch[None, :] * sg_c
        g = tl.load(g_at, mask=pix_ok[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.where(tap_ids[:, None] == K * K, tl.sum(g, axis=0)[None, :], 0.0)
        x_item = x_ptr + item * sx_b
        for dy in tl.static_range(K):
            for dx in tl.static_range(K):
                value = _rounded(_neighbours(x_item, row, col, pix_ok, x_ch, ch_ok, H, W, sx_h, sx_w, dy, dx, K),
                                 compute)
                acc += tl.where(tap_ids[:, None] == dy * K + dx, tl.sum(g * value, axis=0)[None, :], 0.0)
    part_at = part_ptr + split.to(tl.int64) * TAPS * C + tap_ids[:, None] * C + ch[None, :]
    tl.store(part_at, acc, mask=(tap_ids[:, None] <= K * K) & ch_ok[None, :])


@triton.jit
def _row_shifts(item_ptr, r, cols, ch, ch_ok, H, W, s_h, s_w, s_c, compute: tl.constexpr):
    """Row r of a (H, W, C) map at columns cols - 1, cols and cols + 1 for the channels ch (zero outside the map),
    each (TILE_W, BLOCK_C) float32 rounded to ``compute``: a 3x3 conv's three column taps of that row."""
    ok = ((r >= 0) & (r < H)) & ch_ok[None, :]
    at = item_ptr + r * s_h + ch[None, :] * s_c
    left = tl.load(at + ((cols - 1) * s_w)[:, None], mask=ok & ((cols >= 1) & (cols <= W))[:, None], other=0.0)
    mid = tl.load(at + (cols * s_w)[:, None], mask=ok & (cols < W)[:, None], other=0.0)
    right = tl.load(at + ((cols + 1) * s_w)[:, None], mask=ok & ((cols + 1) < W)[:, None], other=0.0)
    return (left.to(compute).to(tl.float32), mid.to(compute).to(tl.float32), right.to(compute).to(tl.float32))


@triton.jit
def weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, t: tl.constexpr):
    """Tap t of the (C, 9) weight for the channels ch: (1, BLOCK_C) float32."""
    return tl.load(w_ptr + ch * sw_c + t * sw_t, mask=ch_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def reversed_taps(w_ptr, ch, ch_ok, sw_c, sw_t):
    """The nine taps of the (C, 9) weight for the channels ch in reverse order, w[8], w[7], ..., w[0], each (1,
    BLOCK_C) float32: the taps of the input gradient's conv (stride 1, padding 1), as :func:`input_grad_row` takes
    them."""
    return (weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 8), weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 7),
            weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 6), weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 5),
            weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 4), weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 3),
            weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 2), weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 1),
            weight_tap(w_ptr, ch, ch_ok, sw_c, sw_t, 0))


@triton.jit
def input_grad_row(ul, um, ur, ml, mm, mr, dl, dm, dr, w00, w01, w02, w10, w11, w12, w20, w21, w22,
                   compute: tl.constexpr):
    """The input gradient at a tile of positions (one row of them here; a run of grid tokens in the pooled agent
    backward) from the output gradient at their nine neighbours, the row above (u), at (m) and below (d) each at
    three column shifts, and the reversed taps (:func:`reversed_taps`): float32 taps in :func:`forward_kernel`'s
    order with FLIP, rounded to ``compute``."""
    acc = ul * w00 + um * w01 + ur * w02 + ml * w10 + mm * w11 + mr * w12 + dl * w20 + dm * w21 + dr * w22
    return acc.to(compute).to(tl.float32)


@triton.jit
def _store_input_grad(acc, r, cols, ch, col_ok, H, W, C, item, r_ptr, dx_ptr, sr_b, sr_h, sr_w, sr_c,
                      INTO: tl.constexpr):
    """Row r of the input gradient (rows past the map are dropped): added into r_ptr's tensor through its strides
    in float32 with INTO, else written to dx (B, H, W, C) contiguous."""
    ok = col_ok & (r < H)
    if INTO:
        at = r_ptr + item * sr_b + r * sr_h + (cols * sr_w)[:, None] + ch[None, :] * sr_c
        acc += tl.load(at, mask=ok, other=0.0).to(tl.float32)
    else:
        at = dx_ptr + item * H * W * C + ((r * W + cols) * C)[:, None] + ch[None, :]
    tl.store(at, acc.to(at.dtype.element_ty), mask=ok)


@triton.jit
def backward3_kernel(g_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, part_ptr, H, W, C, row_blocks, col_blocks,
                     sg_b, sg_h, sg_w, sg_c, sx_b, sx_h, sx_w, sx_c, sr_b, sr_h, sr_w, sr_c, sw_c, sw_t,
                     ROWS: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, INPUT_GRAD: tl.constexpr,
                     INTO: tl.constexpr):
    """A 3x3 depthwise conv's backward in one pass over its output's gradient g and its input x (both (B, H, W, C),
    read through their strides): the input's gradient (with INPUT_GRAD) and the weight's and bias's float32 partial
    sums of ROWS rows (a multiple of 4) x TILE_W columns x BLOCK_C channels a program (grid:
    (B * row_blocks * col_blocks, cdiv(C, BLOCK_C))); any strides (a unit channel stride is what makes it fast).

    The program walks its rows top to bottom four at a time, keeping the two rows above the step of g and of x, each
    at three column shifts, in registers and loading the step's four rows (and the one below) together: every row is
    read once, where :func:`forward_kernel` (taps reversed) and :func:`weight_grad_kernel` read each pixel nine
    times, and a step's 24 loads are in flight at once (one row a step left the kernel waiting on memory: 199 against
    90 us at 56x56x96, batch 64, bf16 on the H200). The input gradient rounds as :func:`forward_kernel` with FLIP
    does; with INTO it is added to ``r`` (the tensor autograd sums it into) in float32 and stored there in place,
    else written to dx (B, H, W, C) contiguous. part[program, t, c] (float32, (programs, 10, C) contiguous) = the
    program's sum of g[p, c] * x[p + tap t's offset, c] (x rounded to the compute dtype), t = 9 the sum of g[p, c]:
    a fixed order, the same bits every call. Rows past the map load as zeros and add nothing.
    """
    compute = g_ptr.dtype.element_ty
    block = tl.program_id(0)
    item = (block // (row_blocks * col_blocks)).to(tl.int64)
    in_item = block % (row_blocks * col_blocks)
    r0 = (in_item // col_blocks) * ROWS
    cols = (in_item % col_blocks) * TILE_W + tl.arange(0, TILE_W)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    col_ok = (cols < W)[:, None] & ch_ok[None, :]
    g_item = g_ptr + item * sg_b
    x_item = x_ptr + item * sx_b
    if INPUT_GRAD:
        w00, w01, w02, w10, w11, w12, w20, w21, w22 = reversed_taps(w_ptr, ch, ch_ok, sw_c, sw_t)
    d00 = tl.zeros((TILE_W, BLOCK_C), dtype=tl.float32)
    d01 = d00
    d02 = d00
    d10 = d00
    d11 = d00
    d12 = d00
    d20 = d00
    d21 = d00
    d22 = d00
    db = d00
    # rows a (r - 1) and b (r) carried into each step; c, d, e, f are rows r + 1 ... r + 4
    gal, gam, gar = _row_shifts(g_item, r0 - 1, cols, ch, ch_ok, H, W, sg_h, sg_w, sg_c, compute)
    gbl, gbm, gbr = _row_shifts(g_item, r0, cols, ch, ch_ok, H, W, sg_h, sg_w, sg_c, compute)
    xal, xam, xar = _row_shifts(x_item, r0 - 1, cols, ch, ch_ok, H, W, sx_h, sx_w, sx_c, compute)
    xbl, xbm, xbr = _row_shifts(x_item, r0, cols, ch, ch_ok, H, W, sx_h, sx_w, sx_c, compute)
    for r in range(r0, tl.minimum(r0 + ROWS, H), 4):
        gcl, gcm, gcr = _row_shifts(g_item, r + 1, cols, ch, ch_ok, H, W, sg_h, sg_w, sg_c, compute)
        xcl, xcm, xcr = _row_shifts(x_item, r + 1, cols, ch, ch_ok, H, W, sx_h, sx_w, sx_c, compute)
        gdl, gdm, gdr = _row_shifts(g_item, r + 2, cols, ch, ch_ok, H, W, sg_h, sg_w, sg_c, compute)
        xdl, xdm, xdr = _row_shifts(x_item, r + 2, cols, ch, ch_ok, H, W, sx_h, sx_w, sx_c, compute)
        gel, gem, ger = _row_shifts(g_item, r + 3, cols, ch, ch_ok, H, W, sg_h, sg_w, sg_c, compute)
        xel, xem, xer = _row_shifts(x_item, r + 3, cols, ch, ch_ok, H, W, sx_h, sx_w, sx_c, compute)
        gfl, gfm, gfr = _row_shifts(g_item, r + 4, cols, ch, ch_ok, H, W, sg_h, sg_w, sg_c, compute)
        xfl, xfm, xfr = _row_shifts(x_item, r + 4, cols, ch, ch_ok, H, W, sx_h, sx_w, sx_c, compute)
        # output rows r ... r + 3 are g's rows b ... e; tap (i, j) of output row q reads x's row q - 1 + i
        d00 += gbm * xal + gcm * xbl + gdm * xcl + gem * xdl
        d01 += gbm * xam + gcm * xbm + gdm * xcm + gem * xdm
        d02 += gbm * xar + gcm * xbr + gdm * xcr + gem * xdr
        d10 += gbm * xbl + gcm * xcl + gdm * xdl + gem * xel
        d11 += gbm * xbm + gcm * xcm + gdm * xdm + gem * xem
        d12 += gbm * xbr + gcm * xcr + gdm * xdr + gem * xer
        d20 += gbm * xcl + gcm * xdl + gdm * xel + gem * xfl
        d21 += gbm * xcm + gcm * xdm + gdm * xem + gem * xfm
        d22 += gbm * xcr + gcm * xdr + gdm * xer + gem * xfr
        db += gbm + gcm + gdm + gem
        if INPUT_GRAD:
            _store_input_grad(input_grad_row(gal, gam, gar, gbl, gbm, gbr, gcl, gcm, gcr, w00, w01, w02, w10, w11,
                                             w12, w20, w21, w22, compute),
                              r, cols, ch, col_ok, H, W, C, item, r_ptr, dx_ptr, sr_b, sr_h, sr_w, sr_c, INTO)
            _store_input_grad(input_grad_row(gbl, gbm, gbr, gcl, gcm, gcr, gdl, gdm, gdr, w00, w01, w02, w10, w11,
                                             w12, w20, w21, w22, compute),
                              r + 1, cols, ch, col_ok, H, W, C, item, r_ptr, dx_ptr, sr_b, sr_h, sr_w, sr_c, INTO)
            _store_input_grad(input_grad_row(gcl, gcm, gcr, gdl, gdm, gdr, gel, gem, ger, w00, w01, w02, w10, w11,
                                             w12, w20, w21, w22, compute),
                              r + 2, cols, ch, col_ok, H, W, C, item, r_ptr, dx_ptr, sr_b, sr_h, sr_w, sr_c, INTO)
            _store_input_grad(input_grad_row(gdl, gdm, gdr, gel, gem, ger, gfl, gfm, gfr, w00, w01, w02, w10, w11,
                                             w12, w20, w21, w22, compute),
                              r + 3, cols, ch, col_ok, H, W, C, item, r_ptr, dx_ptr, sr_b, sr_h, sr_w, sr_c, INTO)
        gal, gam, gar = gel, gem, ger
        gbl, gbm, gbr = gfl, gfm, gfr
        xal, xam, xar = xel, xem, xer
        xbl, xbm, xbr = xfl, xfm, xfr
    store_tap_sums(part_ptr + (block.to(tl.int64) * 10) * C + ch, C, ch_ok, d00, d01, d02, d10, d11, d12, d20, d21,
                   d22, db)


@triton.jit
def store_tap_sums(at, C, ok, t0, t1, t2, t3, t4, t5, t6, t7, t8, bias):
    """Store the column sums (over axis 0) of a 3x3 conv's nine per-tap weight-gradient products and its bias's
    as rows 0-8 and 9 of a (10, C) float32 partial at ``at`` (the channels' addresses in row 0)."""
    tl.store(at, tl.sum(t0, axis=0), mask=ok)
    tl.store(at + C, tl.sum(t1, axis=0), mask=ok)
    tl.store(at + 2 * C, tl.sum(t2, axis=0), mask=ok)
    tl.store(at + 3 * C, tl.sum(t3, axis=0), mask=ok)
    tl.store(at + 4 * C, tl.sum(t4, axis=0), mask=ok)
    tl.store(at + 5 * C, tl.sum(t5, axis=0), mask=ok)
    tl.store(at + 6 * C, tl.sum(t6, axis=0), mask=ok)
    tl.store(at + 7 * C, tl.sum(t7, axis=0), mask=ok)
    tl.store(at + 8 * C, tl.sum(t8, axis=0), mask=ok)
    tl.store(at + 9 * C, tl.sum(bias, axis=0), mask=ok)


@triton.jit
def weight_grad_sum_kernel(part_ptr, dw_ptr, db_ptr, like_ptr, C, splits, taps, KK: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dw (C, KK) contiguous and db (C,) from the (splits, taps, C) partial sums of :func:`weight_grad_kernel` or
    :func:`backward3_kernel` (grid: (cdiv(C, BLOCK_C), KK, or KK + 1 with a bias)): program (j, t) sums tap t (t = KK:
    the bias) of BLOCK_C channels over the splits in a fixed order, rounds it to the compute dtype (like_ptr's: the
    dtype the conv's weight and bias had in the forward) and stores it in dw's or db's dtype. One program a tap and
    channel block, where one a channel block summed every tap in turn."""
    compute = like_ptr.dtype.element_ty
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    t = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(0, splits, BLOCK_S):
        ok = ((start + s) < splits)[:, None] & ch_ok[None, :]
        at = part_ptr + ((start + s).to(tl.int64) * taps + t)[:, None] * C + ch[None, :]
        total += tl.sum(tl.load(at, mask=ok, other=0.0), axis=0)
    total = total.to(compute).to(tl.float32)
    if t < KK:
        tl.store(dw_ptr + ch * KK + t, total.to(dw_ptr.dtype.element_ty), mask=ch_ok)
    else:
        tl.store(db_ptr + ch, total.to(db_ptr.dtype.element_ty), mask=ch_ok)
