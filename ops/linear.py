"""``linear``: ``F.linear`` whose backward sums the bias gradient with a Triton kernel, for captured CUDA graphs.

A linear layer's bias gradient is the column sum of its output gradient, (tokens, C_out). ATen's linear backward
takes it with a bf16 column reduction that reads that gradient at about half the memory bandwidth of an H100: 35-45 us
a call, 9-12% of the Agent-PVT and Agent-Swin eager training steps' kernel time for their q/kv/qkv, proj and fc2 layers
(BENCHMARKS.md, seventy-eighth and seventy-ninth sessions; fc1's sum is already taken by :func:`~zoo.ops.linear_gelu`).
The ``triton`` backend's backward makes ATen's two matrix products for the input's and the weight's gradients (the
same calls, so the same values) and takes the bias's from ``column_sum_kernel``: float32 partial sums over row
splits, then their sum in a fixed order, rounded to the compute dtype as ATen's sum is.

Where it runs: its backward is one Python autograd node, which costs the host more than the ATen nodes it replaces
(seventy-eighth session), and eager training steps wait for the host; so it is chosen automatically only while a CUDA
graph is being captured (inside :func:`linears_as_op`), where the host's work is done once and the kernels replay:
:mod:`zoo.ops.block_graphs` warms up and captures each block with its linear layers sent here.

Backends:
    ``reference``: ``F.linear``; any device and dtype, autocast as usual.
    ``triton``: a training call (grad mode on, the bias needs a gradient) on CUDA, or on CPU under
        ``TRITON_INTERPRET=1``, float32/float16/bfloat16, not under ``torch.compile`` (inductor fuses the bias sum
        itself). Forward bitwise the reference's (autocast's casts, then ``F.linear``); input and weight gradients
        bitwise ATen's; the bias's up to the order of its float32 sum. A backward with ``create_graph=True`` takes
        ATen's ops, so second derivatives are the reference's.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._amp import compute_dtype
from ._cache import functorch_transforming
from ._dispatch import call_key, dispatch, planned, register_backend, validated
from .triton import direct, inputs_reason, kernels_interpreted, needs_grad, no_device_reason, on_device, sm_count

__all__ = ["linear", "linears_as_op", "column_sums"]

_OP = "linear"

# (BLOCK_M, BLOCK_N, num_warps) of column_sum_kernel and its programs a SM, each summing a share of the rows of a
# column block (gelu_backward_kernel's tiling: the same loop without the GELU)
_TILES = (32, 128, 8)
_PROGRAMS_PER_SM = 2
_SUM_BLOCK_S, _SUM_BLOCK_C = 512, 32  # the partial sums' reduction (depthwise_conv's weight_grad_sum_kernel)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """``x @ weight^T + bias``, as ``F.linear`` computes it (module docstring for the backends).

    Args:
        x: (..., C_in) floating point.
        weight: (C_out, C_in); bias: (C_out,) or None.
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`): the
            ``triton`` backend is chosen automatically only for training calls inside :func:`linears_as_op`.

    Returns:
        (..., C_out), in the autocast dtype under autocast.
    """
    # the choice differs inside linears_as_op and with the compute dtype (the interpreter's): their own memo entries
    key = call_key(x, weight, bias, _host_once(), compute_dtype(x) if isinstance(x, torch.Tensor) else None)
    if not validated(_OP, key):
        check_linear_args(_OP, x, weight, bias)
    return dispatch(_OP, backend, x, weight, bias, key=key)


_SCOPE = threading.local()  # depth: how many linears_as_op scopes this thread is inside


def _host_once() -> bool:
    return getattr(_SCOPE, "depth", 0) > 0


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_linear_args(op: str, x, weight, bias, out: str = "C_out") -> None:
    """Raise a ValueError naming ``op``, the argument and its value unless x is (..., C_in), weight (out, C_in) and
    bias None or (out,), floating point, on x's device (``out``: the output dimension's name in the messages)."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor of shape (..., C_in), got {_describe(x)}")
    if (not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 2
            or weight.shape[1] != x.shape[-1]):
        raise ValueError(f"{op}: weight must be a floating-point tensor of shape ({out}, C_in) = ({out}, "
                         f"{x.shape[-1]}) for x of shape {tuple(x.shape)}, got {_describe(weight)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{op}: bias must be None or a floating-point tensor of shape ({out},) = "
                         f"({weight.shape[0]},), got {_describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} must be on the device of x ({x.device}), got {t.device}")


def _reference(x, weight, bias) -> torch.Tensor:
    return F.linear(x, weight, bias)


register_backend(_OP, "reference", _reference, priority=0)


def _triton_supports(x, weight, bias) -> str | None:
    if torch.compiler.is_compiling():
        return "under torch.compile inductor fuses the bias gradient's sum itself"
    if functorch_transforming():
        return "inside a torch.func transform (the backward is a Python autograd node)"
    if bias is None or not needs_grad(bias):
        return "only the backward has a kernel (the bias gradient's): calls whose bias takes no gradient go to ATen"
    return inputs_reason(x.device, _kernels_interpreted(), compute=compute_dtype(x), x=x, weight=weight, bias=bias)


def _triton_prefer(x, weight, bias) -> str | None:
    if x.device.type != "cuda":
        return f"on {x.device.type} the reference is faster than Triton's interpreter"
    if not _host_once():
        return ("outside linears_as_op (a CUDA graph capture) the Python autograd node costs the host more than the "
                "kernel saves the GPU (eager steps wait for the host)")
    return None


def _triton(x, weight, bias) -> torch.Tensor:
    return _Linear.apply(x, weight, bias)


register_backend(_OP, "triton", _triton, supports=_triton_supports, priority=10, available=no_device_reason,
                 prefer=_triton_prefer)


class _Linear(torch.autograd.Function):
    """``F.linear`` after autocast's casts; the backward's bias gradient from :func:`column_sums`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        xc, wc, bc = (t.to(compute_dtype(x, t.dtype)) for t in (x, weight, bias))  # autocast's casts, if on
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, wc, bc)
        # the casts saved only where autocast made one (backward reads None as "no cast")
        ctx.save_for_backward(x, weight, None if xc is x else xc, None if wc is weight else wc)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, xc, wc = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: ATen's differentiable ops on the saved inputs (their casts made again, on the graph)
            xc, wc = (t.to(c.dtype) if c is not None else None for t, c in ((x, xc), (weight, wc)))
        xc, wc = x if xc is None else xc, weight if wc is None else wc
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = (g @ wc).reshape(x.shape).to(x.dtype) if need_x else None
        # grad^T @ x, the product ATen's linear backward makes for a row-major weight (the same cuBLAS call and values)
        gw = (g.t() @ xc.reshape(-1, xc.shape[-1])).to(weight.dtype) if need_w else None
        if not need_b:
            gb = None
        elif torch.is_grad_enabled() or g.numel() == 0:
            gb = g.sum(0).to(ctx.bias_dtype)
        else:
            gb = planned("linear.bias_grad", column_sums, g.contiguous(), ctx.bias_dtype)
        return gx, gw, gb


def column_sums(g: torch.Tensor, dtype: torch.dtype, launch=direct) -> torch.Tensor:
    """(N,) column sums of a contiguous (M, N) ``g`` in ``dtype``: float32 partial sums over row splits, then their
    sum in a fixed order, rounded to g's dtype (what ATen's sum of g gives) and stored in ``dtype``."""
    m, n = g.shape
    block_m, block_n, num_warps = _TILES
    parts, rows_per_split = row_split_sums(g, block_m, block_n)
    db = torch.empty((n,), dtype=dtype, device=g.device)
    with on_device(g):
        launch(_kernels()[0].column_sum_kernel)[(parts.shape[0], -(-n // block_n))](
            g, parts, m, n, rows_per_split, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        sum_splits(parts, db, g, launch)
    return db


def row_split_sums(like: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, int]:
    """For a kernel summing the rows of an (M, N) tensor like ``like`` in (splits, cdiv(N, block_n)) programs: the
    (splits, 1, N) float32 buffer of their partial sums and the rows each split takes (whole ``block_m`` blocks),
    about :data:`_PROGRAMS_PER_SM` programs a SM on CUDA (three splits at most in the interpreter)."""
    n = like.shape[-1]
    m = like.numel() // n
    col_blocks = -(-n // block_n)
    programs = _PROGRAMS_PER_SM * sm_count(like) if like.is_cuda else 3
    splits = max(1, min(-(-m // block_m), programs // col_blocks))
    rows_per_split = -(-m // splits)
    rows_per_split = -(-rows_per_split // block_m) * block_m  # whole row blocks a split
    splits = -(-m // rows_per_split)
    return torch.empty((splits, 1, n), dtype=torch.float32, device=like.device), rows_per_split


def sum_splits(parts: torch.Tensor, out: torch.Tensor, like: torch.Tensor, launch=direct) -> None:
    """``out`` (N,) = the sum over splits of the (splits, 1, N) float32 ``parts`` in a fixed order, rounded to
    ``like``'s dtype and stored in out's."""
    n = out.shape[0]
    launch(_kernels()[1])[(-(-n // _SUM_BLOCK_C), 1)](parts, out, out, like, n, parts.shape[0], 1, KK=0,
                                                      BLOCK_S=_SUM_BLOCK_S, BLOCK_C=_SUM_BLOCK_C, num_warps=8)


def _kernels_interpreted() -> bool:
    return kernels_interpreted(f"{__package__}.triton.kernels.mlp")


@functools.cache
def _kernels():
    """(the kernels' module, the partial sums' reduction), imported on first use (TRITON_INTERPRET is read then)."""
    from .triton.kernels import depthwise_conv, mlp as kernels

    return kernels, depthwise_conv.weight_grad_sum_kernel


class _LinearsAsOp(TorchFunctionMode):
    """Sends every ``F.linear`` call (``nn.Linear`` and its subclasses call it) to :func:`linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            return linear(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def linears_as_op() -> Iterator[None]:
    """Context manager: ``F.linear`` calls inside (this thread's, including those of ``nn.Linear`` layers) go through
    :func:`linear`, whose automatic choice takes the ``triton`` backend for training calls on CUDA in here (the
    backward of a call made inside runs the kernels too, wherever it runs) and ATen's ``F.linear`` otherwise. Every
    torch call inside passes through a Python torch-function mode, so it is for code whose host time is spent once,
    such as a CUDA graph's capture and its warm-up."""
    depth = getattr(_SCOPE, "depth", 0)
    _SCOPE.depth = depth + 1
    try:
        with _LinearsAsOp() if depth == 0 else contextlib.nullcontext():  # (one mode: a second would route again)
            yield
    finally:
        _SCOPE.depth = depth
