"""The transformer MLP, ``fc2(gelu(fc1(x)))``, with a fused Triton kernel for inference, and its first half
``gelu(fc1(x))`` (:func:`linear_gelu`) with a backward kernel for eager training.

For ``x`` of shape (..., C_in)::

    y = gelu(x @ fc1_weight^T + fc1_bias) @ fc2_weight^T + fc2_bias        # (..., C_out)

with the exact (erf) GELU, the semantics of timm's ``Mlp`` with ``nn.GELU`` and no dropout (or in eval mode).

Why a kernel of our own: the hidden activation is ``mlp_ratio`` (3-8) times wider than the tokens, and the unfused
layers write it, read and write it again for the GELU, and read it once more for ``fc2``. At the first stages of the
pyramid backbones that traffic dominates the MLP (Agent-PVT-T stage 0 at batch 128: 401,408 tokens of 64 channels, a
(401,408, 512) bf16 hidden activation of 411 MB and a GELU pass that moves 822 MB); the fused kernel keeps the hidden
activation in registers, 32 columns at a time, and moves only x, y and the weights. Its floor is then the GELU's erf on
the CUDA cores, which the matrix products cannot hide. Measured on an H200 (torch 2.11, triton 3.6, bf16 weights,
kernel ms, unfused cuBLAS + GELU + cuBLAS against fused): Agent-PVT-T stage 0 (C 64, H 512) 0.524 / 0.360, stage 1
(128, 1024) 0.280 / 0.232, Agent-Swin-T stage 0 (96, 384) 0.442 / 0.355, BiFormer-T stage 0 (64, 192) 0.247 / 0.148;
but Agent-Swin-T stage 1 (192, 768) 0.234 / 0.302 and DeiT-T (192, 768) 0.077 / 0.109: wider rows take 64 KB of
registers per tile and the unfused GEMMs win, so the automatic choice takes the kernel only up to 128 channels.

Backends:
    ``reference``: ``F.linear``, ``F.gelu``, ``F.linear``: the definition; any device and dtype, differentiable,
        and autocast applies to it as to the layers it is made of.
    ``triton``: one forward kernel, no backward: inference only (a call that autograd would record goes to the
        reference). CUDA in float16/bfloat16 (also float32 with IEEE dots, not chosen automatically); on CPU only
        under ``TRITON_INTERPRET=1`` (float32/float16); ``C_in``, ``C_out`` <= 256. Under autocast it computes in the
        autocast dtype and rounds where the unfused layers write that dtype (fc1's output, the GELU's output, the
        result), so it matches them up to the order of float32 accumulation. Chosen automatically on CUDA for 16-bit
        compute with ``C_in``, ``C_out`` <= 128, in eager code and under ``torch.compile`` (inductor launches the
        kernel from its generated code). The models' :class:`Mlp` / :class:`SequentialMlp` call it only in compiled
        graphs (see :class:`Mlp` for the measurement).
"""
from __future__ import annotations

import functools
from typing import Optional  # custom_op schemas: Optional is read by every torch >= 2.5

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers import Mlp as _TimmMlp
from torch import nn
from torch.nn.modules import module as _module_hooks

from ._amp import autocast_dtype, compute_dtype
from ._dispatch import call_key, dispatch, planned, register_backend, validated
from .autocast_cache import AutocastCachedLinear, autocast_weights
from .linear import check_linear_args, row_split_sums, sum_splits
from .triton import (contiguous_or_none, direct, inputs_reason, kernel_op, kernels_interpreted, needs_grad, next_pow2,
                     no_device_reason, on_device, traced)

__all__ = ["Mlp", "SequentialMlp", "calls_hooks", "is_identity", "linear_gelu", "mlp"]

_OP = "mlp"
_ACTIVATIONS = ("gelu",)


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor | None, activation: str = "gelu", backend: str | None = None) -> torch.Tensor:
    """``gelu(x @ fc1_weight^T + fc1_bias) @ fc2_weight^T + fc2_bias`` over the last dimension.

    Args:
        x: (..., C_in) floating point; any number of leading dimensions, possibly zero rows.
        fc1_weight: (H, C_in); fc1_bias: (H,) or None.
        fc2_weight: (C_out, H); fc2_bias: (C_out,) or None.
        activation: ``"gelu"``, the exact (erf) GELU.
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (..., C_out). Under autocast (for x's device, x float32/float16/bfloat16) in the autocast dtype, as
        ``F.linear`` gives it; otherwise in x's dtype, and then the weights must have x's dtype too.
    """
    compute = compute_dtype(x) if isinstance(x, torch.Tensor) else None
    key = call_key(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, compute)
    if not validated(_OP, key):
        _check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, compute)
    return dispatch(_OP, backend, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute, key=key)


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, compute) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
        raise ValueError(f"mlp: x must be a floating-point tensor of shape (..., C_in), got {_describe(x)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    c_in = x.shape[-1]
    hidden = fc1_weight.shape[0] if isinstance(fc1_weight, torch.Tensor) and fc1_weight.ndim == 2 else None
    c_out = fc2_weight.shape[0] if isinstance(fc2_weight, torch.Tensor) and fc2_weight.ndim == 2 else None
    expected = {"fc1_weight": (hidden, c_in), "fc1_bias": (hidden,), "fc2_weight": (c_out, hidden),
                "fc2_bias": (c_out,)}
    given = {"fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias}
    for name, t in given.items():
        if t is None and name.endswith("bias"):
            continue
        if (not isinstance(t, torch.Tensor) or not t.is_floating_point() or hidden is None or c_out is None
                or tuple(t.shape) != expected[name]):
            raise ValueError(f"mlp: {name} must be a floating-point tensor of shape (H, C_in) / (H,) / (C_out, H) / "
                             f"(C_out,) (fc1_weight, fc1_bias, fc2_weight, fc2_bias) for x of shape "
                             f"{tuple(x.shape)}, got {_describe(t)}")
        if t.device != x.device:
            raise ValueError(f"mlp: {name} must be on the device of x ({x.device}), got {t.device}")
        if compute == x.dtype and autocast_dtype(x.device.type) is None and t.dtype != x.dtype:
            raise ValueError(f"mlp: {name} has dtype {t.dtype} but x has {x.dtype}; outside autocast they must "
                             "match (or run under torch.autocast)")


class Mlp(_TimmMlp):
    """timm's ``Mlp`` whose GELU MLPs run through :func:`mlp` (the fused kernel) inside ``torch.compile`` graphs.

    Same constructor, parameters and state-dict keys as ``timm.layers.Mlp``. A call takes :func:`mlp` when it is
    being compiled (``torch.compile``), the activation is an exact ``nn.GELU``, there is no hidden norm, the layers
    are linear (not ``use_conv``), the in and out widths are those where the kernel measured faster (<= 128),
    dropout is off (p = 0 or eval mode) and autograd records nothing (inference); otherwise it is timm's forward,
    whose ``act(fc1(x))`` goes through :func:`linear_gelu` in eager training (see :func:`_activated`).

    Why only when compiled: eager inference of these backbones is bound by host time on an H200, and the fused call's
    Python and Triton launch cost about what the three layers' calls save (eager Agent-PVT-T, Agent-Swin-T and
    BiFormer-T measured slower or within noise with it), while in a compiled graph inductor launches the kernel from
    its generated code (compiled Agent-PVT-T at batch 128: 4.73 against 5.21 ms of kernels, 262 against 278 kernels
    a batch, H200, bf16; two runs of one session).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fusable_layers = isinstance(self.norm, nn.Identity) and _gelu_mlp_layers(self.fc1, self.act, self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        # the submodules from their dict: ``self.fc1`` goes through nn.Module.__getattr__, which eager calls pay for
        layers = self._modules
        fc1, fc2, drop1, drop2 = layers["fc1"], layers["fc2"], layers["drop1"], layers["drop2"]
        if (self._fusable_layers and _fuses_now(x, fc1, fc2)
                and (not self.training or (drop1.p == 0 and drop2.p == 0))):
            return mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        hidden = _activated(x, fc1, layers["act"])
        norm = layers["norm"]
        if is_identity(drop1) and is_identity(norm) and is_identity(drop2):
            return fc2(hidden)  # the same layers without three calls that change nothing
        return drop2(fc2(norm(drop1(hidden))))  # timm's Mlp.forward after its act(fc1(x))


class SequentialMlp(nn.Sequential):
    """``nn.Sequential(nn.Linear, [nn.Identity, ...], nn.GELU(), nn.Linear)`` whose calls run through :func:`mlp`
    under the rules of :class:`Mlp` (compiled, inference, widths <= 128), and whose linear layer and GELU (with only
    no-op layers between) go through :func:`linear_gelu` in eager training; anything else runs as a plain
    ``nn.Sequential``.

    For MLPs released as a Sequential (BiFormer's ``mlp.0``/``mlp.3`` keys, with an Identity kept in the middle
    slot): same constructor, entries and state-dict keys as ``nn.Sequential``.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        first, *middle, last = list(self) if len(self) >= 3 else (None, None, None)
        acts = [m for m in middle if not isinstance(m, nn.Identity)] if middle else []
        self._fusable_layers = len(acts) == 1 and _gelu_mlp_layers(first, acts[0], last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        layers = list(self)
        fc1, fc2 = layers[0], layers[-1]
        if self._fusable_layers and _fuses_now(x, fc1, fc2):
            return mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if len(layers) >= 3 and all(is_identity(m) for m in layers[1:-2]):
            return fc2(_activated(x, fc1, layers[-2]))
        return super().forward(x)


def _gelu_mlp_layers(fc1: nn.Module, act: nn.Module, fc2: nn.Module) -> bool:
    """Whether linear, exact GELU, linear at widths where the kernel pays: what the modules may hand to :func:`mlp`."""
    return (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and type(act) is nn.GELU
            and act.approximate == "none" and _fusion_pays(fc1.in_features, fc2.out_features))


def is_identity(module: nn.Module) -> bool:
    """Whether calling ``module`` now returns its input unchanged and nothing observes the call: an ``nn.Identity``,
    an ``nn.Dropout`` or timm ``DropPath`` with probability 0 or in eval mode, and no hooks run by calling it
    (:func:`calls_hooks`). Eager code can then skip the call (H200 machine's host, eager Agent-DeiT-T inference at
    batch 128: the MLPs' two dropouts and identity norm cost 0.45 of 8.3 ms a forward)."""
    kind = type(module)
    if kind is nn.Identity:
        observed = False
    elif kind is nn.Dropout:
        observed = module.training and module.p > 0
    elif kind is DropPath:
        observed = module.training and module.drop_prob > 0
    else:
        return False
    return not (observed or calls_hooks(module))


def _activated(x: torch.Tensor, fc1: nn.Module, act: nn.Module) -> torch.Tensor:
    """``act(fc1(x))`` (..., H); an eager training call of a linear layer and the exact GELU goes through
    :func:`linear_gelu`, whose backward computes fc1's bias gradient in the GELU's backward kernel on the GPU.

    Only where calling the two modules would do nothing else: ``fc1`` an ``nn.Linear`` (or the autocast-caching one,
    whose copies it then takes), not a subclass with a forward of its own; no hooks on either module nor global ones;
    fc1's bias taking a gradient; not under ``torch.compile`` (inductor fuses the GELU's backward and the bias sum
    itself).
    """
    if torch.is_grad_enabled() and _linear_then_gelu(fc1, act) and not torch.compiler.is_compiling():
        weight, bias = autocast_weights(fc1) if type(fc1) is AutocastCachedLinear else (fc1.weight, fc1.bias)
        return linear_gelu(x, weight, bias)
    return act(fc1(x))


_LINEARS = (nn.Linear, AutocastCachedLinear)


def _linear_then_gelu(fc1: nn.Module, act: nn.Module) -> bool:
    """Whether ``act(fc1(x))`` is exactly :func:`linear_gelu` of fc1's parameters, with a bias that trains."""
    if type(fc1) not in _LINEARS or type(act) is not nn.GELU or act.approximate != "none":
        return False
    bias = fc1._parameters.get("bias")
    return bias is not None and bias.requires_grad and not (calls_hooks(fc1) or calls_hooks(act))


def calls_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks that code skipping its ``__call__`` would lose: forward or backward
    hooks of its own, or ones registered for every module (``torch.nn.modules.module.register_module_*_hook``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks or _module_hooks._global_backward_hooks
                or _module_hooks._global_backward_pre_hooks)


def _fuses_now(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> bool:
    """Whether this call goes to :func:`mlp`: inside a ``torch.compile`` graph, with nothing for autograd to record
    (see :class:`Mlp` for why not in eager code)."""
    return torch.compiler.is_compiling() and not needs_grad(x, fc1.weight, fc2.weight)


# ----------------------------------------------------------------------------------------------------------------
# reference backend


def _reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


register_backend(_OP, "reference", _reference, priority=0)


# ----------------------------------------------------------------------------------------------------------------
# triton backend

_MAX_C = 256  # x's and y's row tiles live in registers
_BLOCK_H = 32  # hidden columns a loop step (see _tiles)
_FASTER_MAX_C = 128  # widths where the kernel measured faster than the unfused layers (module docstring)


def _triton_supports(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute) -> str | None:
    if needs_grad(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        return "no backward kernel: calls autograd records (training) take the reference"
    reason = inputs_reason(x.device, _kernels_interpreted(), compute=compute, x=x, fc1_weight=fc1_weight,
                           fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    if reason is not None:
        return reason
    widest = max(x.shape[-1], fc2_weight.shape[0])
    if widest > _MAX_C:
        return f"C_in={x.shape[-1]}, C_out={fc2_weight.shape[0]}: at most {_MAX_C} (row tiles live in registers)"
    return None


def _triton_prefer(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute) -> str | None:
    if x.device.type != "cuda":
        return f"on {x.device.type} the reference is faster than Triton's interpreter"
    if compute == torch.float32:
        return "float32: the kernel's IEEE dots are not measured against cuBLAS"
    if not _fusion_pays(x.shape[-1], fc2_weight.shape[0]):
        return (f"C_in={x.shape[-1]}, C_out={fc2_weight.shape[0]}: above {_FASTER_MAX_C} the unfused layers measured "
                "faster")
    return None


def _fusion_pays(c_in: int, c_out: int) -> bool:
    """Whether the kernel measured faster than the unfused layers at these widths (module docstring)."""
    return max(c_in, c_out) <= _FASTER_MAX_C


def _kernels_interpreted() -> bool:
    return kernels_interpreted(f"{__package__}.triton.kernels.mlp")


@functools.cache
def _kernel():
    """The Triton kernel, created on first use (so TRITON_INTERPRET is read then, and importing zoo is cheap)."""
    from .triton.kernels import mlp as kernels

    return kernels.forward_kernel


def _tiles(c_in: int, c_out: int, compute: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_CIN, BLOCK_COUT, num_warps, num_stages) for these widths and compute dtype."""
    block_cin, block_cout = max(16, next_pow2(c_in)), max(16, next_pow2(c_out))
    wide = max(block_cin, block_cout) > 128
    if compute == torch.float32:  # (not measured for speed) float32 tiles within the H200's 227 KiB of shared memory
        return (64, block_cin, block_cout, 8, 1) if wide else (128, block_cin, block_cout, 4, 2)
    # 16-bit: the best of 72 configurations (BLOCK_M 64/128/256, BLOCK_H 32/64/128, 4/8 warps, 1-4 stages) at each
    # H200 shape the module docstring lists; 128-row tiles with 32 hidden columns a step won at every width
    return (128, block_cin, block_cout, 8, 3) if wide else (128, block_cin, block_cout, 4, 3)


def _launch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute, launch=direct) -> torch.Tensor:
    """x contiguous (..., C_in), contiguous weights -> y (..., C_out) in ``compute``."""
    c_in, hidden, c_out = x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0]
    y = torch.empty((*x.shape[:-1], c_out), dtype=compute, device=x.device)
    if y.numel() == 0:
        return y
    rows = y.numel() // c_out  # (Size.numel() would specialise a symbolic batch)
    block_m, block_cin, block_cout, num_warps, num_stages = _tiles(c_in, c_out, compute)
    with on_device(x):
        launch(_kernel())[(-(-rows // block_m),)](
            x, fc1_weight, x if fc1_bias is None else fc1_bias, fc2_weight, x if fc2_bias is None else fc2_bias, y,
            rows, c_in, hidden, c_out, HAS_B1=fc1_bias is not None, HAS_B2=fc2_bias is not None, BLOCK_M=block_m,
            BLOCK_CIN=block_cin, BLOCK_H=_BLOCK_H, BLOCK_COUT=block_cout,
            PRECISION="ieee" if compute == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)
    return y


def _fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute):
    return x.new_empty((*x.shape[:-1], fc2_weight.shape[0]), dtype=compute)


@kernel_op("zoo::mlp_fwd", fake=_fake)
def _triton_op(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],  # noqa: UP045
               fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],  # noqa: UP045
               compute: torch.dtype) -> torch.Tensor:
    """The fused MLP (..., C_in) -> (..., C_out) in ``compute``, as a ``torch.library`` op for torch.compile."""
    return _launch(*map(contiguous_or_none, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)), compute, traced)


def _triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute) -> torch.Tensor:
    # every program reads all the weights: in the compute dtype (float32 weights took 1.5x the kernel time at
    # Agent-PVT-T stage 0); under autocast these casts are the ones the unfused layers would make
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = (t if t is None or t.dtype == compute else t.to(compute)
                                                  for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    if torch.compiler.is_compiling():
        return _triton_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, compute)
    return _launch(*map(contiguous_or_none, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)), compute)


register_backend(_OP, "triton", _triton, supports=_triton_supports, priority=10, available=no_device_reason,
                 prefer=_triton_prefer)


# ----------------------------------------------------------------------------------------------------------------
# linear_gelu: an MLP's first layer and its activation, for eager training

_LINEAR_GELU = "linear_gelu"


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                backend: str | None = None) -> torch.Tensor:
    """``gelu(x @ weight^T + bias)`` with the exact (erf) GELU: an MLP's ``act(fc1(x))``.

    The ``triton`` backend serves eager training calls on the GPU. Its forward makes the reference's two ATen calls
    (the bias still added in the GEMM, so the same values), but gives the GEMM a detached bias, and its backward
    computes the bias gradient from the GELU's backward kernel: the kernel sums the input gradient it writes, where
    ATen's linear backward would read it all again for a column sum (in bf16 eager training on H100s, 35-45 us a
    call and a tenth of the Agent-PVT and Agent-Swin steps' kernel time went to such sums; BENCHMARKS.md,
    seventy-eighth session). Gradients are those of the reference up to the order of that float32 sum; a backward
    with ``create_graph=True`` takes ATen's ops, so second derivatives are the reference's.

    Args:
        x: (..., C_in) floating point.
        weight: (H, C_in); bias: (H,) or None.
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (..., H), as ``F.gelu(F.linear(x, weight, bias))`` gives it (under autocast in the autocast dtype).
    """
    key = call_key(x, weight, bias)
    if not validated(_LINEAR_GELU, key):
        check_linear_args(_LINEAR_GELU, x, weight, bias, out="H")
    return dispatch(_LINEAR_GELU, backend, x, weight, bias, key=key)


def _linear_gelu_reference(x, weight, bias) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


register_backend(_LINEAR_GELU, "reference", _linear_gelu_reference, priority=0)

# (BLOCK_M, BLOCK_N, num_warps) of gelu_backward_kernel and its programs a SM, each summing a share of the rows of
# a column block. The best of 54 tilings (16-64 rows, 64-256 columns, 4 or 8 warps, 2-8 programs a SM) at five
# shapes of the backbones' MLPs (bf16, batch 64: (200704, 512), (50176, 1024), (12544, 1280), (200704, 384),
# (12608, 768)), then its row loop pipelined three stages deep; kernel and sum us on an H100 (torch 2.11, triton
# 3.6, do_bench): 229 / 121 / 50 / 177 / 35, against ATen's gelu_backward and column sum 333 / 178 / 69 / 281 / 49
# (its gelu_backward alone 207 / 107 / 39 / 157 / 26: the sum takes the rest)
_GELU_BACKWARD_TILES = (32, 128, 8)  # (2 programs a SM: zoo.ops.linear's row_split_sums)


def _linear_gelu_supports(x, weight, bias) -> str | None:
    if torch.compiler.is_compiling():
        return "under torch.compile inductor fuses the GELU's backward and the bias sum itself"
    if bias is None or not needs_grad(bias):
        return ("only the backward has a kernel (the bias gradient's): calls without a bias that takes a gradient "
                "take the reference")
    return inputs_reason(x.device, _gelu_kernels_interpreted(), compute=compute_dtype(x), x=x, weight=weight,
                         bias=bias)


def _linear_gelu_prefer(x, weight, bias) -> str | None:
    if x.device.type != "cuda":
        return f"on {x.device.type} the reference is faster than Triton's interpreter"
    return None


def _linear_gelu_triton(x, weight, bias) -> torch.Tensor:
    return _GeluBiasGrad.apply(F.linear(x, weight, bias.detach()), bias)


class _GeluBiasGrad(torch.autograd.Function):
    """``gelu(a)`` for ``a = linear(x, weight, bias)`` computed with a detached bias: the backward returns a's
    gradient and the bias's (the column sums of a's gradient), both from :func:`_launch_gelu_backward`."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, bias)
        return F.gelu(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, bias = ctx.saved_tensors
        if torch.is_grad_enabled() or a.numel() == 0:
            # create_graph=True (gradient penalties, double backward): the gradients get a graph from ATen's ops,
            # on ``a`` tied to the bias again (the GEMM had it detached), ``bias - bias.detach()`` being exactly 0
            da = torch.ops.aten.gelu_backward(grad, a + (bias - bias.detach()).to(a.dtype))
            return da, da.reshape(-1, a.shape[-1]).sum(0).to(bias.dtype)
        # (the launches replayed from a call plan where plans are on: zoo.ops._dispatch.planned)
        return planned("linear_gelu.backward", _launch_gelu_backward, grad.contiguous(), a.contiguous(), bias.dtype)


def _launch_gelu_backward(grad: torch.Tensor, a: torch.Tensor, bias_dtype: torch.dtype,
                          launch=direct) -> tuple[torch.Tensor, torch.Tensor]:
    """(a's gradient in a's dtype, the bias's (H,) in ``bias_dtype``) from contiguous (..., H) ``grad`` and ``a``:
    the GELU's backward with partial column sums, then their sum over the splits in a fixed order, rounded to a's
    dtype (what the bias's gradient is where autocast cast the bias to it) and stored in ``bias_dtype``."""
    n = a.shape[-1]
    m = a.numel() // n
    block_m, block_n, num_warps = _GELU_BACKWARD_TILES
    parts, rows_per_split = row_split_sums(a, block_m, block_n)
    da = torch.empty_like(a)
    db = torch.empty((n,), dtype=bias_dtype, device=a.device)
    with on_device(a):
        launch(_gelu_kernels().gelu_backward_kernel)[(parts.shape[0], -(-n // block_n))](
            grad, a, da, parts, m, n, rows_per_split, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        sum_splits(parts, db, a, launch)
    return da, db


def _gelu_kernels_interpreted() -> bool:
    return kernels_interpreted(f"{__package__}.triton.kernels.mlp")


@functools.cache
def _gelu_kernels():
    """The kernels' module, imported on first use (TRITON_INTERPRET is read then)."""
    from .triton.kernels import mlp as kernels

    return kernels


register_backend(_LINEAR_GELU, "triton", _linear_gelu_triton, supports=_linear_gelu_supports, priority=10,
                 available=no_device_reason, prefer=_linear_gelu_prefer)
