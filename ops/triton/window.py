"""The ``triton`` backend of :func:`zoo.ops.window_attention`: (shifted) window attention in one kernel launch.

Importing this module registers the backend (priority 20, above ``sdpa``) and the two ``torch.library`` custom ops
``zoo::window_attention_fwd`` / ``zoo::window_attention_bwd``; it does not import triton. The kernels are built on
first use, so ``TRITON_INTERPRET`` is read then (set it before the first call to run them on CPU).

Computation (same definition as the reference backend, :mod:`zoo.ops.window`): one program per (batch, head,
window) holds the window's ``N = wh * ww`` keys and values in one tile (``BLOCK_N = max(16, next_pow2(N))``, at
most :data:`MAX_WINDOW_TOKENS`) and walks its queries in blocks of ``BLOCK_M`` rows. Nothing is partitioned, rolled
or masked in memory:

* **Geometry from indices.** Token ``t`` of rolled window ``(wy, wx)`` sits at rolled position
  ``(ry, rx) = (wy * wh + t // ww, wx * ww + t % ww)``; the cyclic roll by ``-(sy, sx)`` means it is read from, and
  its output written to, image position ``((ry + sy) mod H, (rx + sx) mod W)``. q, k, v (and dO) are read there
  through their strides (the models' permuted views of one qkv projection are read in place).
* **Shift mask from indices.** The roll wraps rows ``ry >= H - sy`` and columns ``rx >= W - sx`` in from the other
  side of the map, so the shift region of a token is ``2 * [ry >= H - sy] + [rx >= W - sx]`` and two tokens of one
  window attend to each other exactly when their regions are equal (the reference's mask, ``-inf``, not Swin's
  -100). Without a shift every region is 0.
* **Bias** is read through its strides broadcast to (nW, heads, N, N) (stride 0 on broadcast dims), in float32
  whatever its dtype (the reference rounds it to the logits' dtype first: for 16-bit inputs this backend is the
  closer of the two to exact arithmetic).

Forward (``_forward_kernel``, the only launch): logits ``q k^T * scale + bias`` of a query block over all keys of
its window, softmax in float32 (base 2, the row max and sum in registers: a whole row is one tile, so there is no
online rescaling and nothing is saved for the backward), ``P V``, stored into a contiguous (B, H, W, heads, d_v)
buffer at the un-rolled image positions. The op returns its (B, heads, H, W, d_v) permuted view, so the models'
``out.permute(0, 2, 3, 1, 4).reshape(b, h, w, heads * d_v)`` is free.

Backward (``_backward_kernel``, one launch; plus one ``torch.sum`` launch when the bias needs a gradient): the
same programs recompute ``P`` bit for bit, then per query block ``dV += P^T dO``, ``dP = dO V^T``,
``dS = P * (dP - rowsum(P * dP))`` (``rowsum(P * dP) = rowsum(dO * O)``, so the output is not needed),
``dQ = dS K * scale`` (stored), ``dK += dS^T Q * scale``; dK and dV are stored after the last block. All three
gradients are contiguous (B, H, W, heads, d) buffers returned as permuted views. The bias gradient is ``dS`` summed
over the batch and the bias's broadcast dims, deterministically: with a bias gradient a program owns a fixed chunk
of batch items (chunk size from the shapes only) and sums their ``dS`` in batch order into its own float32 slice of
a (chunks, nW, heads, N, N) buffer (a read-modify-write of memory no other program touches, behind a barrier), which
``torch.sum`` reduces over the chunks and the broadcast dims (no sum when one chunk holds the batch and the bias is
full-sized; one more launch, a cast, when the bias is not float32). No atomics anywhere: results are bitwise
repeatable for a given launch configuration.

Numerics: float32 accumulation for every product; fp32 inputs use IEEE dots (no TF32, like torch's default
matmul); fp16/bf16 probabilities and ``dS`` are rounded to the input dtype before their products (as flash
attention). The scale multiplies the float32 logits (the reference scales q first: a rounding difference in fp32,
a smaller error than the reference's in 16 bits).

Limits: windows of at most :data:`MAX_WINDOW_TOKENS` tokens, head dims of at most :data:`MAX_HEAD_DIM`, no dropout;
``supports`` refuses anything else (and mixed dtypes, devices other than CUDA, 32-bit offset overflow) with a
reason, and dispatch falls back to ``sdpa``.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.autograd.function import once_differentiable

from .._dispatch import register_backend
from . import (INT32_MAX, broadcast_strides, check_tile_edge, device_reason, dot_precision, interpreter_requested,
               item_extent, next_pow2, on_device, override_knobs, triton_missing_reason)

__all__ = ["window_attention_triton", "use_tiles", "SUPPORTED_DTYPES", "MAX_WINDOW_TOKENS", "MAX_HEAD_DIM"]

_OP = "window_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WINDOW_TOKENS = 256  # a window's keys and values are one tile each: 256 x 128 fp32 is half an SM's registers
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

# Launch knobs. block_m: the query rows a program handles at a time (None: as many as fit, see _Geometry); tests
# lower it to run the multi-block loops on tiny windows. bias_programs: the most programs of a backward that also
# sums the bias gradient over the batch (each program then takes a chunk of batch items; the chunk size depends on
# the shapes and this number only, so the summation order is the same on every GPU); 4096 is ~8 waves of 4 programs
# per SM on an H200 (not measured), and fewer for large windows so that the float32 partial sums stay under
# _BIAS_PARTIAL_FLOATS (32 MiB). num_warps / num_stages: None picks by tile size (see _Geometry). No autotuner
# (as in the routing backend: its timing runs allocate memory inside the caller's first call and may pick different
# configurations in different processes).
_TILES: dict[str, int | None] = {"block_m": None, "bias_programs": 4096, "num_warps": None, "num_stages": None}
_BIAS_PARTIAL_FLOATS = 2**23


def use_tiles(block_m: int | None = None, bias_programs: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override the launch knobs (None keeps the current value).

    Args:
        block_m: query rows per block, a power of two >= 16 (smaller than the window runs several blocks).
        bias_programs: most programs of a backward with a bias gradient (>= 1; fewer means larger chunks of batch
            items per program; at least one program per (head, window) in any case).
        num_warps, num_stages: Triton launch options of both kernels (default: chosen by tile size).
    """
    check_tile_edge("block_m", block_m)
    if bias_programs is not None and bias_programs < 1:
        raise ValueError(f"bias_programs must be >= 1, got {bias_programs}")
    return override_knobs(_TILES, block_m=block_m, bias_programs=bias_programs, num_warps=num_warps,
                          num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------------------
# kernels (built on first use)

_STATE: dict[str, bool] = {}


def _kernels_interpreted() -> bool:
    """Whether the kernels run (or, not yet built, will run) in Triton's CPU interpreter."""
    return _STATE.get("interpreted", interpreter_requested())


@functools.cache
def _kernels():
    """Build the two kernels: forward, backward."""
    import triton
    import triton.language as tl

    _STATE["interpreted"] = interpreter_requested()

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
    def _probabilities(q, k, q_ok, k_ok, q_region, k_region, bias_base, offs_m, offs_n, stride_bi, stride_bj,
                       qk_scale2, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        """Softmax of a query block over its window's keys: float32 [BLOCK_M, BLOCK_N], zero where masked."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * stride_bi + offs_n[None, :] * stride_bj,
                           mask=q_ok[:, None] & k_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634  # log2(e): the softmax runs in base 2
        # padded query rows (never stored) see every key, so that no row is all -inf (its NaN would reach dK as
        # NaN * 0 in the backward)
        allowed = ((q_region[:, None] == k_region[None, :]) | ~q_ok[:, None]) & k_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=1)[:, None])
        return p / tl.sum(p, axis=1)[:, None]

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
                ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # d loss / d logits (rowsum(P dP) = rowsum(dO O))
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
                _store_tokens(dq_base, qy, qx, q_ok, offs_d, dq, W * HEADS * D, HEADS * D, D)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
                if BIAS_GRAD:
                    _accumulate_bias_grad(dbias_base, ds, offs_m, offs_n, q_ok, k_ok, item > 0, N)
            _store_tokens(dk_ptr + b * H * W * HEADS * D + head * D, ky, kx, k_ok, offs_d, dk * scale,
                          W * HEADS * D, HEADS * D, D)
            _store_tokens(dv_ptr + b * H * W * HEADS * DV + head * DV, ky, kx, k_ok, offs_dv, dv,
                          W * HEADS * DV, HEADS * DV, DV)

    # Triton resolves names through the kernel module's globals: the interpreter ignores closures altogether, and the
    # compiler reads a helper's ``tl.constexpr`` annotations in a scope holding only the globals and the helper's own
    # closure. Publish ``tl`` and the helpers there before the first launch compiles anything.
    globals().update(tl=tl, _window_tokens=_window_tokens, _load_tokens=_load_tokens, _store_tokens=_store_tokens,
                     _probabilities=_probabilities, _accumulate_bias_grad=_accumulate_bias_grad)
    return _forward_kernel, _backward_kernel


# ----------------------------------------------------------------------------------------------------------------
# launches


class _Geometry:
    """Sizes of one pass: map (H, W), window grid, shift, heads, head dims, tiles and launch options.

    q and v are the kernels' views, (B, H, W, heads, d) and (B, H, W, heads, d_v).
    """

    def __init__(self, q: torch.Tensor, v: torch.Tensor, window: tuple[int, int], shift: tuple[int, int],
                 backward: bool = False):
        self.b, self.h, self.w, self.heads, self.d = q.shape
        self.dv = v.shape[-1]
        (self.wh, self.ww), (self.sy, self.sx) = window, shift
        self.n = self.wh * self.ww
        self.nwx = self.w // self.ww
        self.nwin = (self.h // self.wh) * self.nwx
        self.block_n = max(16, next_pow2(self.n))
        fp32 = q.dtype == torch.float32
        # Query rows per block: the largest score tile that compiles without register spills for sm_90 at head dim
        # 32 (ptxas -v on the kernels built for the Swin / CSWin windows of 49, 98 and 144 tokens): 8K floats in
        # the forward (64 x 128, 32 x 256), in the backward (three live score tiles, dK and dV) 4K for 16-bit inputs
        # and 2K for fp32 (whose IEEE dots hold more registers).
        budget = 8192 if not backward else 4096 if not fp32 else 2048
        self.block_m = min(self.block_n, _TILES["block_m"] or min(64, max(16, budget // self.block_n)))
        if backward:
            wide = self.block_n >= (64 if fp32 else 128)
        else:
            wide = self.block_m * self.block_n >= (4096 if fp32 else 8192)
        self.num_warps = _TILES["num_warps"] or (8 if wide else 4)

    def programs(self, items_per_program: int = 1) -> int:
        return -(-self.b // items_per_program) * self.heads * self.nwin

    def runtime(self) -> tuple[int, ...]:
        return self.h, self.w, self.nwx, self.nwin, self.heads, self.sy, self.sx

    def constexprs(self) -> dict:
        return dict(WH=self.wh, WW=self.ww, D=self.d, DV=self.dv, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
                    BLOCK_D=max(16, next_pow2(self.d)), BLOCK_DV=max(16, next_pow2(self.dv)))

    def bias_chunk(self) -> int:
        """Batch items per backward program when the bias gradient is summed over the batch."""
        programs = min(_TILES["bias_programs"], _BIAS_PARTIAL_FLOATS // (self.n * self.n))
        chunks = min(self.b, max(1, programs // (self.heads * self.nwin)))
        return -(-self.b // chunks)


def _launch_options(geo: _Geometry) -> dict[str, int]:
    """num_warps / num_stages of a launch (knob overrides, else by tile size, see _Geometry)."""
    return {"num_warps": geo.num_warps, "num_stages": _TILES["num_stages"] or 2}


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, ...]:
    """Strides of ``bias`` broadcast to (nW, heads, N, N): 0 along broadcast dims (all 0 without a bias)."""
    return (0, 0, 0, 0) if bias is None else broadcast_strides(bias.shape, bias.stride(), 4)


def _launch_forward(q, k, v, bias, window, shift, scale) -> torch.Tensor:
    """One kernel: (B, H, W, heads, d) views in, contiguous (B, H, W, heads, d_v) out."""
    geo = _Geometry(q, v, window, shift)
    out = torch.empty((geo.b, geo.h, geo.w, geo.heads, geo.dv), device=q.device, dtype=q.dtype)
    if out.numel() == 0:  # empty batch or map: nothing to launch (a zero-size grid is an error)
        return out
    _kernels()[0][(geo.programs(),)](
        q, k, v, q if bias is None else bias, out, *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias),
        *geo.runtime(), scale * _LOG2E, HAS_BIAS=bias is not None, PRECISION=dot_precision(q.dtype),
        **geo.constexprs(), **_launch_options(geo))
    return out


def _launch_backward(grad_out, q, k, v, bias, window, shift, scale, bias_grad: bool):
    """One kernel (plus a torch sum for the bias gradient): contiguous (B, H, W, heads, d) dq, dk, dv and the bias
    gradient in the bias's shape and dtype (None unless ``bias_grad``)."""
    geo = _Geometry(q, v, window, shift, backward=True)
    dq, dk = (torch.empty((geo.b, geo.h, geo.w, geo.heads, geo.d), device=q.device, dtype=q.dtype) for _ in "qk")
    dv = torch.empty((geo.b, geo.h, geo.w, geo.heads, geo.dv), device=q.device, dtype=q.dtype)
    if geo.programs() == 0:  # empty batch or map: nothing to launch (a zero-size grid is an error)
        return dq, dk, dv, (torch.zeros_like(bias) if bias_grad else None)
    chunk, partial = 1, None
    if bias_grad:
        chunk = geo.bias_chunk()
        partial = torch.empty((-(-geo.b // chunk), geo.nwin, geo.heads, geo.n, geo.n), device=q.device,
                              dtype=torch.float32)
    if item_extent(grad_out) > INT32_MAX:  # an odd stride pattern; contiguous it fits (checked in supports)
        grad_out = grad_out.contiguous()
    _kernels()[1][(geo.programs(chunk),)](
        q, k, v, q if bias is None else bias, grad_out, dq, dk, dv, dq if partial is None else partial,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *_bias_strides(bias),
        geo.b, chunk, *geo.runtime(), scale, scale * _LOG2E, HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad,
        PRECISION=dot_precision(q.dtype), **geo.constexprs(), **_launch_options(geo))
    return dq, dk, dv, (_reduce_bias_grad(partial, bias) if bias_grad else None)


def _reduce_bias_grad(partial: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum the (chunks, nW, heads, N, N) float32 partial sums over the chunks and the bias's broadcast dims."""
    shape = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    dims = [0] + [1 + i for i, (size, full) in enumerate(zip(shape, partial.shape[1:])) if size == 1 < full]
    grad = partial[0] if dims == [0] and partial.shape[0] == 1 else partial.sum(dims, keepdim=True)
    return grad.reshape(bias.shape).to(bias.dtype)


# ----------------------------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile) and autograd


@torch.library.custom_op("zoo::window_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, window_h: int,
                window_w: int, shift_y: int, shift_x: int, scale: float) -> torch.Tensor:
    """Fused window attention on (B, H, W, heads, d) views (any strides) with an optional bias broadcastable to
    (nW, heads, N, N); returns the contiguous (B, H, W, heads, d_v) output in q's dtype."""
    with on_device(q):
        return _launch_forward(q, k, v, bias, (window_h, window_w), (shift_y, shift_x), scale)


@_forward_op.register_fake
def _(q, k, v, bias, window_h, window_w, shift_y, shift_x, scale):
    return q.new_empty((*q.shape[:4], v.shape[-1]))


@torch.library.custom_op("zoo::window_attention_bwd", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None, window_h: int, window_w: int, shift_y: int, shift_x: int, scale: float,
                 bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic fused backward: contiguous (B, H, W, heads, d) gradients of q, k and v, and the bias gradient
    (an empty tensor unless ``bias_grad``)."""
    with on_device(q):
        dq, dk, dv, dbias = _launch_backward(grad_out, q, k, v, bias, (window_h, window_w), (shift_y, shift_x),
                                             scale, bias_grad)
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias


@_backward_op.register_fake
def _(grad_out, q, k, v, bias, window_h, window_w, shift_y, shift_x, scale, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, *params = inputs
    ctx.save_for_backward(q, k, v, bias)
    ctx.params = tuple(params)


def _backward(ctx, grad_out):
    q, k, v, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _backward_op(grad_out, q, k, v, bias, *ctx.params, bias_grad)
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerWindow(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls.

    ``torch.library`` dispatch costs tens of microseconds of host time per call, as much as a stage's whole kernel
    on an H200; graphs under ``torch.compile`` keep the custom ops (opaque nodes, no graph break).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, window_h, window_w, shift_y, shift_x, scale):
        with on_device(q):
            out = _launch_forward(q, k, v, bias, (window_h, window_w), (shift_y, shift_x), scale)
        ctx.save_for_backward(q, k, v, bias)
        ctx.params = (window_h, window_w, shift_y, shift_x, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bias = ctx.saved_tensors
        window_h, window_w, shift_y, shift_x, scale = ctx.params
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        with on_device(q):
            dq, dk, dv, dbias = _launch_backward(grad_out, q, k, v, bias, (window_h, window_w), (shift_y, shift_x),
                                                 scale, bias_grad)
        return dq, dk, dv, dbias, None, None, None, None, None


def _attend(q, k, v, bias, window: tuple[int, int], shift: tuple[int, int], scale: float) -> torch.Tensor:
    """Fused window attention on (B, H, W, heads, d) views: the custom op inside ``torch.compile``, the bare
    autograd function in eager."""
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, bias, *window, *shift, scale)
    return _EagerWindow.apply(q, k, v, bias, *window, *shift, scale)


# ----------------------------------------------------------------------------------------------------------------
# the backend


def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: tuple[int, int],
                            shift_size: tuple[int, int], scale: float, bias: torch.Tensor | None = None,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """Window attention with the fused Triton kernels (the checked arguments of :func:`window_attention`).

    Args:
        q, k: (B, heads, H, W, d), any strides; v: (B, heads, H, W, d_v); one dtype among float32/float16/bfloat16,
            on CUDA (or CPU under ``TRITON_INTERPRET=1``, not bf16).
        window_size: (wh, ww) dividing (H, W), at most :data:`MAX_WINDOW_TOKENS` tokens.
        shift_size: (sy, sx), ``0 <= s < window``.
        scale: logit scale.
        bias: float, broadcastable to (nW, heads, N, N), or None.
        dropout_p: must be 0 (the kernels have no dropout).

    Returns:
        (B, heads, H, W, d_v) in q's dtype: a view of a contiguous (B, H, W, heads, d_v) buffer.
    """
    if dropout_p > 0.0:
        raise ValueError("window_attention_triton: dropout_p > 0 is not supported")
    q, k, v = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))
    return _attend(q, k, v, bias, window_size, shift_size, scale).permute(0, 3, 1, 2, 4)


def _triton_available() -> str | None:
    return triton_missing_reason()


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: tuple[int, int],
                     shift_size: tuple[int, int], scale: float, bias: torch.Tensor | None = None,
                     dropout_p: float = 0.0) -> str | None:
    """Why the triton backend cannot serve these arguments, or None."""
    if dropout_p > 0.0:
        return "dropout_p > 0 (attention dropout) is not supported by the kernels"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}; needs one of float32/float16/bfloat16 for all"
    if not (q.device == k.device == v.device) or (bias is not None and bias.device != q.device):
        where = f"{q.device}, {k.device}, {v.device}" + ("" if bias is None else f", bias {bias.device}")
        return f"inputs on different devices ({where})"
    tokens = window_size[0] * window_size[1]
    if tokens > MAX_WINDOW_TOKENS:
        return (f"windows of {tokens} tokens; the kernels hold a window's keys in one tile of at most "
                f"{MAX_WINDOW_TOKENS} tokens")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}; the kernels take at most {MAX_HEAD_DIM}"
    if _offsets_overflow(q, k, v, bias, tokens):
        return "tensors too large for the kernels' 32-bit in-image offsets"
    dtypes = (q.dtype,) if bias is None else (q.dtype, bias.dtype)
    return device_reason(q.device, dtypes, _kernels_interpreted())


def _offsets_overflow(q, k, v, bias, tokens: int) -> bool:
    """Whether an offset the kernels compute in int32 could overflow (batch offsets are int64)."""
    _, heads, h, w, _ = q.shape
    n_win = (h * w) // tokens
    item = h * w * heads * max(q.shape[-1], v.shape[-1])  # the contiguous outputs and gradients
    bias_extent = 0 if bias is None else sum((s - 1) * st for s, st in zip(bias.shape, bias.stride()))
    return max(item, bias_extent, n_win * heads * tokens * tokens, *(item_extent(t) for t in (q, k, v))) > INT32_MAX


register_backend(_OP, "triton", window_attention_triton, supports=_triton_supports, priority=20,
                 available=_triton_available)
