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
def forward_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, P, H, W, C, sx_b, sx_h, sx_w, sx_c, sr_b, sr_h, sr_w, sr_c,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """y = residual + depthwise_conv(x) for BLOCK_P pixels x BLOCK_C channels a program (grid: (cdiv(P, BLOCK_P),
    cdiv(C, BLOCK_C)), P = B*H*W pixels of the (B, H, W, C) maps; y written contiguous).

    x and residual (B, H, W, C) are read through their strides; w is (C, K*K) contiguous and b (C,), both in the
    compute dtype (w's). Rounding follows the unfused layers: conv inputs in the compute dtype, float32 accumulation,
    the conv (+ bias) rounded to the compute dtype, the residual sum in float32 rounded to y's dtype. Zero padding of
    K // 2 at the map's borders.
    """
    compute = w_ptr.dtype.element_ty
    pix = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pix_ok = pix < P
    ch_ok = ch < C
    col = (pix % W).to(tl.int32)
    row = ((pix // W) % H).to(tl.int32)
    item = pix // (H * W)
    x_item = item * sx_b  # per-pixel offsets: only the accumulator is a (pixels, channels) tile across the taps
    x_ch = ch * sx_c
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for dy in tl.static_range(K):
        y_in = row + (dy - K // 2)
        y_ok = pix_ok & (y_in >= 0) & (y_in < H)
        for dx in tl.static_range(K):
            x_in = col + (dx - K // 2)
            ok = (y_ok & (x_in >= 0) & (x_in < W))[:, None] & ch_ok[None, :]
            offset = x_item + (y_in * sx_h + x_in * sx_w)
            value = tl.load(x_ptr + offset[:, None] + x_ch[None, :], mask=ok, other=0.0).to(tl.float32)
            tap = tl.load(w_ptr + ch * (K * K) + (dy * K + dx), mask=ch_ok, other=0.0).to(tl.float32)
            acc += _rounded(value, compute) * tap[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
    acc = _rounded(acc, compute)
    out_ok = pix_ok[:, None] & ch_ok[None, :]
    if HAS_RESIDUAL:
        r_offset = item * sr_b + row.to(tl.int64) * sr_h + col.to(tl.int64) * sr_w
        acc += tl.load(r_ptr + r_offset[:, None] + ch[None, :] * sr_c, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + pix[:, None] * C + ch[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)
