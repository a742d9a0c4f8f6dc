"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), the core sampling op.

Every query and head reads, on each of ``L`` feature levels, ``P`` bilinear samples of that head's value map at
predicted locations, and returns their sum weighted by predicted attention weights::

    out[b, q, m*C:(m+1)*C] = sum_{l, p} a[b, q, m, l, p] * bilinear(value_l[b, :, :, m, :], loc[b, q, m, l, p])

Locations are normalised ``(x, y)`` in ``[0, 1]`` of each level's map: pixel ``(i, j)`` has its centre at
``((j + 0.5) / W, (i + 0.5) / H)`` (``align_corners=False``), and samples outside the map read zeros (the same as
``F.grid_sample(..., padding_mode="zeros", align_corners=False)`` with ``grid = 2 * loc - 1``). This is the
semantics of the official CUDA op and of its PyTorch fallback in Deformable-DETR / detrex / Focus-DETR.

Dtypes: each of ``value``, ``sampling_locations`` and ``attention_weights`` may be float32, float16 or bfloat16
(float64 too on the reference backend), independently: low-precision inputs are read and combined in float32 (the
reference upcasts, the kernels accumulate in float32) and the output has ``value``'s dtype; gradients have their
input's dtype. Under autocast nothing is cast by the op itself (an autocast region usually hands it a low-precision
``value`` from ``value_proj`` and float32 locations/softmax weights; that mix is served as is).

Backends:
    ``reference``: one ``F.grid_sample`` per level, then the weighted sum (the definition; any device; autograd,
        double backward included). Reads ``spatial_shapes`` on the host (a device sync on CUDA).
    ``triton``: fused Triton kernels (:mod:`zoo.ops.triton.ms_deform`) wrapped as ``torch.library`` ops
        (``zoo::ms_deform_attn_fwd`` / ``zoo::ms_deform_attn_bwd``) so ``torch.compile`` keeps them in its graph.
        CUDA in float32/float16/bfloat16; CPU only under ``TRITON_INTERPRET=1`` (float32/float16). No host sync.
        Backward is deterministic (bitwise repeatable): see the kernel module for how ``grad_value`` is gathered
        instead of scattered with atomics. No double backward.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ._dispatch import dispatch, register_backend
from .triton import device_reason, kernel_op, kernels_interpreted, needs_grad, traced, triton_missing_reason

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]

_OP = "ms_deform_attn"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int64, torch.int32)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor, level_start_index: torch.Tensor | None = None, *,
                   backend: str | None = None) -> torch.Tensor:
    """Multi-scale deformable attention: weighted bilinear samples of per-level value maps.

    Args:
        value: ``[B, S, heads, C]`` float; the ``L`` levels' maps flattened row-major and concatenated along ``S``
            (``S = sum_l H_l * W_l``).
        spatial_shapes: ``[L, 2]`` int64/int32, ``(H_l, W_l)`` per level (any device).
        sampling_locations: ``[B, Q, heads, L, P, 2]`` float, normalised ``(x, y)``; ``[0, 1]`` spans the map,
            values outside read zeros.
        attention_weights: ``[B, Q, heads, L, P]`` float (usually softmaxed over ``L * P``; not required).
        level_start_index: ``[L]`` int, offset of each level in ``S``; defaults to the exclusive cumulative sum of
            ``H_l * W_l`` (the layout Deformable DETR builds, and the only one it uses).
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        ``[B, Q, heads * C]`` in ``value``'s dtype; channel ``m * C + c`` is head ``m``, channel ``c``.
    """
    _check_inputs(value, spatial_shapes, sampling_locations, attention_weights, level_start_index)
    return dispatch(_OP, backend, value, spatial_shapes, sampling_locations, attention_weights, level_start_index)


def _check_inputs(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor, level_start_index: torch.Tensor | None) -> None:
    """Shape/dtype/device checks that need no device sync; raises ValueError naming the argument."""
    if value.dim() != 4 or value.dtype not in _FLOATS:
        raise ValueError(f"value must be a float tensor [B, S, heads, C]; got shape {tuple(value.shape)}, "
                         f"dtype {value.dtype}")
    batch, _, heads, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.dtype not in _INTS:
        raise ValueError(f"spatial_shapes must be an int64/int32 tensor [L, 2] of (H, W); got shape "
                         f"{tuple(spatial_shapes.shape)}, dtype {spatial_shapes.dtype}")
    levels = spatial_shapes.shape[0]
    if levels == 0:
        raise ValueError("spatial_shapes has no levels (shape (0, 2)); give at least one (H, W) level")
    loc = sampling_locations
    if loc.dim() != 6 or loc.shape[-1] != 2 or loc.dtype not in _FLOATS or loc.shape[0] != batch \
            or loc.shape[2] != heads or loc.shape[3] != levels:
        raise ValueError(f"sampling_locations must be a float tensor [B={batch}, Q, heads={heads}, L={levels}, P, 2]; "
                         f"got shape {tuple(loc.shape)}, dtype {loc.dtype}")
    if attention_weights.shape != loc.shape[:-1] or attention_weights.dtype not in _FLOATS:
        raise ValueError(f"attention_weights must be a float tensor of shape {tuple(loc.shape[:-1])} "
                         f"([B, Q, heads, L, P]); got shape {tuple(attention_weights.shape)}, "
                         f"dtype {attention_weights.dtype}")
    if level_start_index is not None and (level_start_index.shape != (levels,) or level_start_index.dtype not in _INTS):
        raise ValueError(f"level_start_index must be an int64/int32 tensor [L={levels}]; got shape "
                         f"{tuple(level_start_index.shape)}, dtype {level_start_index.dtype}")
    if not (value.device == loc.device == attention_weights.device):
        raise ValueError(f"value, sampling_locations and attention_weights must share a device; got {value.device}, "
                         f"{loc.device}, {attention_weights.device}")
    if spatial_shapes.device.type == "cpu" and not _is_tracing():
        total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if total != value.shape[1]:
            raise ValueError(f"value has S={value.shape[1]} tokens but spatial_shapes {spatial_shapes.tolist()} "
                             f"cover {total}")


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------------
# reference backend


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: low-precision inputs are combined in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _level_starts(sizes: list[int], level_start_index: torch.Tensor | None) -> list[int]:
    if level_start_index is not None:
        return [int(s) for s in level_start_index.tolist()]
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor,
                             level_start_index: torch.Tensor | None = None) -> torch.Tensor:
    """Reference backend: ``F.grid_sample`` per level, then the attention-weighted sum over levels and points.

    Shapes and dtypes as :func:`ms_deform_attn`; computes in float32 (float64 if any input is float64) and returns
    ``[B, Q, heads * C]`` in ``value``'s dtype. Differentiable (twice) on any device.
    """
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    hw = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = _level_starts([h * w for h, w in hw], level_start_index)
    if sum(h * w for h, w in hw) != tokens:
        raise ValueError(f"value has S={tokens} tokens but spatial_shapes {hw} cover {sum(h * w for h, w in hw)}")
    # grid_sample works on [N, C, H, W] maps with grids in [-1, 1]; fold heads into the batch
    grids = 2 * sampling_locations.to(dtype) - 1
    samples = []
    for level, (h, w) in enumerate(hw):
        if h * w == 0:  # every sample of an empty map falls in the zero padding (grid_sample rejects empty maps)
            samples.append(grids.new_zeros((batch * heads, channels, queries, points)))
            continue
        v = value[:, starts[level]:starts[level] + h * w].to(dtype)
        v = v.permute(0, 2, 3, 1).reshape(batch * heads, channels, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)                       # [B*heads, C, Q, L*P]
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1)                                         # [B*heads, C, Q]
    return out.view(batch, heads * channels, queries).transpose(1, 2).contiguous().to(value.dtype)


register_backend(_OP, "reference", ms_deform_attn_reference, priority=0)


# ----------------------------------------------------------------------------------------------------------------
# triton backend: torch.library ops here (registered at import, no triton needed); kernels imported on first real call

_TRITON_MISSING = triton_missing_reason()
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_CHANNELS = 256


def _triton_available() -> str | None:
    return _TRITON_MISSING


def _kernels_interpreted() -> bool:
    """Whether the kernels run (or, not yet imported, will run) in Triton's CPU interpreter."""
    return kernels_interpreted(f"{__package__}.triton.ms_deform")


def _triton_supports(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                     attention_weights: torch.Tensor, level_start_index: torch.Tensor | None = None) -> str | None:
    tensors = (value, sampling_locations, attention_weights)
    if any(t.dtype not in _TRITON_DTYPES for t in tensors):
        return f"dtypes {[str(t.dtype) for t in tensors]}; each must be float32, float16 or bfloat16"
    if value.shape[-1] > _MAX_CHANNELS:
        return f"head_dim={value.shape[-1]} > {_MAX_CHANNELS}"
    return device_reason(value.device, (t.dtype for t in tensors), _kernels_interpreted())


def _triton_forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


@kernel_op("zoo::ms_deform_attn_fwd", fake=_triton_forward_fake)
def _triton_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor | None,
                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Fused forward: ``[B, Q, heads * C]`` in value's dtype."""
    from .triton.ms_deform import msda_forward

    return msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, traced)


def _triton_backward_fake(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          need_value_grad):
    # contiguous, like the real gradients (empty_like would copy the strides of a non-contiguous input)
    return tuple(t.new_empty(t.shape) for t in (value, sampling_locations, attention_weights))


@kernel_op("zoo::ms_deform_attn_bwd", fake=_triton_backward_fake)
def _triton_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                     level_start_index: torch.Tensor | None, sampling_locations: torch.Tensor,
                     attention_weights: torch.Tensor, need_value_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused deterministic backward: gradients of value, sampling_locations and attention_weights (their dtypes).

    With ``need_value_grad=False`` the value gradient is returned as zeros and its (sort + gather) passes are
    skipped.
    """
    from .triton.ms_deform import msda_backward

    return msda_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         need_value_grad, traced)


def _setup_context(ctx, inputs, output) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_out):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _triton_backward(grad_out, value, spatial_shapes, level_start_index,
                                                       sampling_locations, attention_weights,
                                                       bool(ctx.needs_input_grad[0]))
    return (grad_value if ctx.needs_input_grad[0] else None, None, None,
            grad_loc if ctx.needs_input_grad[3] else None, grad_attn if ctx.needs_input_grad[4] else None)


_triton_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerMSDA(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls: ``torch.library`` dispatch costs tens of
    microseconds of host time a call, more than a decoder layer's forward kernel on an H200. Graphs under
    ``torch.compile`` use the ``torch.library`` ops."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        from .triton.ms_deform import msda_forward

        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_out):
        from .triton.ms_deform import msda_backward

        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = msda_backward(grad_out, value, spatial_shapes, level_start_index,
                                                        sampling_locations, attention_weights,
                                                        bool(ctx.needs_input_grad[0]))
        return (grad_value if ctx.needs_input_grad[0] else None, None, None,
                grad_loc if ctx.needs_input_grad[3] else None, grad_attn if ctx.needs_input_grad[4] else None)


def _triton(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
            attention_weights: torch.Tensor, level_start_index: torch.Tensor | None = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _triton_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not needs_grad(value, sampling_locations, attention_weights):  # inference: no autograd node
        from .triton.ms_deform import msda_forward

        return msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _EagerMSDA.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


register_backend(_OP, "triton", _triton, supports=_triton_supports, priority=10, available=_triton_available)
