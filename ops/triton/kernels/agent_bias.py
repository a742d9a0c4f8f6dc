"""Triton kernels of :mod:`zoo.ops.agent_bias` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _source(dst, scale, size_in):
    """Bilinear (``align_corners=False``) sources of the output positions ``dst`` (int): the first source index, the
    offset of the second (0 at the last source) and the second's weight, as ATen's upsampling computes them."""
    src = tl.maximum(tl.cast(scale, tl.float32) * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)  # (fp64 from inductor)
    first = src.to(tl.int32)  # truncation: the floor of a non-negative source
    step = tl.where(first < size_in - 1, 1, 0)
    return first, step, src - first.to(tl.float32)


@triton.jit
def _program_pair(A):
    """This program's (head * A + agent, head, agent)."""
    pair = tl.program_id(0)
    return pair, pair // A, pair % A


@triton.jit
def _interpolated(src_ptr, row, col, ok, scale_h, scale_w, SH: tl.constexpr, SW: tl.constexpr):
    """The (SH, SW) float32 map at ``src_ptr`` bilinearly resized, at output rows ``row`` and columns ``col``
    (broadcast tiles), in ATen's order: ``lh0 * (lw0 * x00 + lw1 * x01) + lh1 * (lw0 * x10 + lw1 * x11)``."""
    h0, hp, lh1 = _source(row, scale_h, SH)
    w0, wp, lw1 = _source(col, scale_w, SW)
    lh0 = 1.0 - lh1
    lw0 = 1.0 - lw1
    top = src_ptr + h0 * SW + w0
    bottom = top + hp * SW
    x00 = tl.load(top, mask=ok, other=0.0)
    x01 = tl.load(top + wp, mask=ok, other=0.0)
    x10 = tl.load(bottom, mask=ok, other=0.0)
    x11 = tl.load(bottom + wp, mask=ok, other=0.0)
    return lh0 * (lw0 * x00 + lw1 * x01) + lh1 * (lw0 * x10 + lw1 * x11)


@triton.jit
def bias_maps_kernel(an_ptr, ah_ptr, aw_ptr, ac_ptr, na_ptr, ha_ptr, wa_ptr, ca_ptr, key_ptr, query_ptr, A,
                     HK, WK, HQ, WQ, key_scale_h, key_scale_w, query_scale_h, query_scale_w,
                     SH: tl.constexpr, SW: tl.constexpr, CLS: tl.constexpr, BLOCK_KH: tl.constexpr,
                     BLOCK_KW: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_QW: tl.constexpr):
    """Both bias maps of one (head, agent) a program (grid: (heads * A,)); every tensor contiguous float32.

    key (heads, A, CLS + HK * WK): ``resize(an) + (ah + aw)``, after ``ac`` in the class column;
    query (heads, CLS + HQ * WQ, A): ``(ha + wa) + resize(na)``, after ``ca`` in the class row.
    """
    pair, head, agent = _program_pair(A)

    row = tl.arange(0, BLOCK_KH)[:, None]
    col = tl.arange(0, BLOCK_KW)[None, :]
    ok = (row < HK) & (col < WK)
    rowcol = tl.load(ah_ptr + pair * HK + row, mask=row < HK, other=0.0) + \
        tl.load(aw_ptr + pair * WK + col, mask=col < WK, other=0.0)
    value = _interpolated(an_ptr + pair * (SH * SW), row, col, ok, key_scale_h, key_scale_w, SH, SW) + rowcol
    key_row = key_ptr + pair * (CLS + HK * WK)
    tl.store(key_row + CLS + row * WK + col, value, mask=ok)

    row = tl.arange(0, BLOCK_QH)[:, None]
    col = tl.arange(0, BLOCK_QW)[None, :]
    ok = (row < HQ) & (col < WQ)
    rowcol = tl.load(ha_ptr + (head * HQ + row) * A + agent, mask=row < HQ, other=0.0) + \
        tl.load(wa_ptr + (head * WQ + col) * A + agent, mask=col < WQ, other=0.0)
    value = rowcol + _interpolated(na_ptr + pair * (SH * SW), row, col, ok, query_scale_h, query_scale_w, SH, SW)
    query_column = query_ptr + head * (CLS + HQ * WQ) * A + agent
    tl.store(query_column + (CLS + row * WQ + col) * A, value, mask=ok)

    if CLS:
        tl.store(key_row, tl.load(ac_ptr + pair))
        tl.store(query_column, tl.load(ca_ptr + pair))


@triton.jit
def _resize_adjoint(grad, row, col, n_row, n_col, scale_h, scale_w, out_ptr, SH: tl.constexpr, SW: tl.constexpr):
    """Store the gradient of an (SH, SW) map that was bilinearly resized, given ``grad`` (BLOCK_H, BLOCK_W) of the
    resized map (zero outside it): each source cell sums its outputs' gradients times their two weights, rows
    after columns, in a fixed order."""
    h0, hp, lh1 = _source(row, scale_h, SH)  # (BLOCK_H, 1)
    w0, wp, lw1 = _source(col, scale_w, SW)  # (1, BLOCK_W)
    lh0 = tl.where(row < n_row, 1.0 - lh1, 0.0)
    lh1 = tl.where(row < n_row, lh1, 0.0)
    lw0 = tl.where(col < n_col, 1.0 - lw1, 0.0)
    lw1 = tl.where(col < n_col, lw1, 0.0)
    for s in tl.static_range(SW):
        weight_w = tl.where(w0 == s, lw0, 0.0) + tl.where(w0 + wp == s, lw1, 0.0)
        by_row = tl.sum(grad * weight_w, axis=1)[:, None]  # (BLOCK_H, 1): the rows' share of source column s
        for r in tl.static_range(SH):
            weight_h = tl.where(h0 == r, lh0, 0.0) + tl.where(h0 + hp == r, lh1, 0.0)
            tl.store(out_ptr + r * SW + s, tl.sum(by_row * weight_h))


@triton.jit
def bias_maps_backward_kernel(dkey_ptr, dquery_ptr, dan_ptr, dah_ptr, daw_ptr, dac_ptr, dna_ptr, dha_ptr, dwa_ptr,
                              dca_ptr, A, HK, WK, HQ, WQ, sk_h, sk_a, sk_t, sq_h, sq_t, sq_a,
                              key_scale_h, key_scale_w, query_scale_h, query_scale_w,
                              SH: tl.constexpr, SW: tl.constexpr, CLS: tl.constexpr, BLOCK_KH: tl.constexpr,
                              BLOCK_KW: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_QW: tl.constexpr):
    """Every parameter's gradient for one (head, agent) a program (grid: (heads * A,)), from the maps' float32
    gradients dkey (heads, A, CLS + HK * WK) and dquery (heads, CLS + HQ * WQ, A), read through their strides; the
    parameters' gradients are written contiguous float32 in their shapes. Row and column biases get the maps'
    row and column sums, the 7x7 maps the adjoint of their resize, the class biases their column or row."""
    pair, head, agent = _program_pair(A)

    row = tl.arange(0, BLOCK_KH)[:, None]
    col = tl.arange(0, BLOCK_KW)[None, :]
    key_row = dkey_ptr + head * sk_h + agent * sk_a
    grad = tl.load(key_row + (CLS + row * WK + col) * sk_t, mask=(row < HK) & (col < WK), other=0.0)
    tl.store(dah_ptr + pair * HK + tl.arange(0, BLOCK_KH), tl.sum(grad, axis=1), mask=tl.arange(0, BLOCK_KH) < HK)
    tl.store(daw_ptr + pair * WK + tl.arange(0, BLOCK_KW), tl.sum(grad, axis=0), mask=tl.arange(0, BLOCK_KW) < WK)
    _resize_adjoint(grad, row, col, HK, WK, key_scale_h, key_scale_w, dan_ptr + pair * (SH * SW), SH, SW)

    row = tl.arange(0, BLOCK_QH)[:, None]
    col = tl.arange(0, BLOCK_QW)[None, :]
    query_column = dquery_ptr + head * sq_h + agent * sq_a
    grad = tl.load(query_column + (CLS + row * WQ + col) * sq_t, mask=(row < HQ) & (col < WQ), other=0.0)
    rows = tl.arange(0, BLOCK_QH)
    cols = tl.arange(0, BLOCK_QW)
    tl.store(dha_ptr + (head * HQ + rows) * A + agent, tl.sum(grad, axis=1), mask=rows < HQ)
    tl.store(dwa_ptr + (head * WQ + cols) * A + agent, tl.sum(grad, axis=0), mask=cols < WQ)
    _resize_adjoint(grad, row, col, HQ, WQ, query_scale_h, query_scale_w, dna_ptr + pair * (SH * SW), SH, SW)

    if CLS:
        tl.store(dac_ptr + pair, tl.load(key_row))
        tl.store(dca_ptr + pair, tl.load(query_column))
