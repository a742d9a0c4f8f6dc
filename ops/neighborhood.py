"""Neighbourhood attention (NAT / DiNAT, Hassani et al.) in 1-D and 2-D, with NATTEN's exact semantics.

Each query attends to a ``kernel_size`` window of keys around it on the token grid, per axis:

* **dilation** ``d`` splits an axis into ``d`` interleaved groups (positions with equal ``i % d``); a query only sees
  keys of its own group, and the window is taken on the group's own coordinates ``i // d``. A group holds
  ``L // d + (g < L % d)`` positions.
* **borders clamp, they do not pad**: the window of ``kernel_size`` keys is shifted to stay inside the group, so
  every query sees exactly ``kernel_size`` keys per axis. On group coordinates the window starts at
  ``clamp(i - kernel_size // 2, 0, group_len - kernel_size)`` (for even kernels the extra key is on the left).
* **causal** (per axis): the window ends at the query, ``j <= i`` and ``i - j < kernel_size`` on group coordinates;
  near the start the window is shorter (it is not shifted).

The key set of a 2-D query is the product of its two axis windows. Requires ``kernel_size * dilation <= length``
per axis (as NATTEN does).

Backends:
    ``reference``: dense boolean mask over all token pairs + ``F.scaled_dot_product_attention``; any device,
        differentiable (O(N^2) memory: the definition, not a fast path).
    ``flex``: FlexAttention with the window as ``mask_mod`` and a cached ``BlockMask``, compiled; CUDA only
        (FlexAttention has no backward on CPU and its eager CPU path is slower than the reference).
    ``natten``: ``natten.na1d`` / ``natten.na2d`` when NATTEN with its CUDA library ``libnatten`` is importable
        (optional; never a dependency).
    ``triton``: tiled kernels (:mod:`zoo.ops.triton.neighborhood`), forward and deterministic backward; chosen
        automatically on CUDA unless NATTEN is present (H200, bf16: 4.4-9.5x the dense-masked reference, 3.9-16x
        flex at NAT-T / DiNAT-T shapes).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Callable, Sequence

import torch

from ._cache import cached_constant
from ._checks import check_float_tensors
from ._sdpa import sdpa
from ._dispatch import call_key, dispatch, register_backend, validated

__all__ = ["neighborhood_attention", "neighborhood_mask"]

_OP = "neighborhood_attention"

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: IntOrTuple,
                           dilation: IntOrTuple = 1, *, is_causal: BoolOrTuple = False, scale: float | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """Neighbourhood attention over a 1-D sequence or a 2-D map (NATTEN semantics, see the module docstring).

    Args:
        q: queries, (B, heads, L, d) for 1-D or (B, heads, H, W, d) for 2-D.
        k: keys, same shape as ``q``.
        v: values, (B, heads, *spatial, d_v) with the spatial shape of ``q``.
        kernel_size: window size, an int or one per spatial axis; each >= 1 and ``kernel * dilation <= length``.
        dilation: an int or one per spatial axis, each >= 1.
        is_causal: a bool or one per spatial axis; a causal axis only looks backwards.
        scale: logit scale; ``d ** -0.5`` when None.
        backend: ``"reference"``, ``"flex"``, ``"natten"`` or None for automatic choice.

    Returns:
        (B, heads, *spatial, d_v) in the dtype of ``q``.
    """
    key = call_key(q, k, v, kernel_size, dilation, is_causal, scale)
    checked = validated(_OP, key)
    spatial = tuple(q.shape[2:-1]) if checked else _check_tensors(q, k, v)
    kernel = _per_axis("kernel_size", kernel_size, len(spatial), int)
    dil = _per_axis("dilation", dilation, len(spatial), int)
    causal = _per_axis("is_causal", is_causal, len(spatial), bool)
    if not checked:
        _check_window(spatial, kernel, dil)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return dispatch(_OP, backend, q, k, v, kernel_size=kernel, dilation=dil, is_causal=causal, scale=float(scale),
                    key=key)


def _check_tensors(q, k, v) -> tuple[int, ...]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (4, 5):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{_OP}: {name} must be (B, heads, L, d) or (B, heads, H, W, d), got {got}")
    check_float_tensors(_OP, q=q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"{_OP}: v must be (B, heads, *spatial, d_v) with q's leading dims {tuple(q.shape[:-1])}, "
                         f"got {tuple(v.shape)}")
    return tuple(q.shape[2:-1])


def _per_axis(name: str, value, n_axes: int, kind: type) -> tuple:
    values = (value,) * n_axes if isinstance(value, (int, bool)) else tuple(value)
    if len(values) != n_axes or not all(isinstance(x, kind) and (kind is bool or not isinstance(x, bool))
                                        for x in values):
        raise ValueError(f"{_OP}: {name} must be a {kind.__name__} or {n_axes} of them (one per spatial axis), "
                         f"got {value!r}")
    return tuple(values)


def _check_window(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]) -> None:
    for axis, (length, ks, dil) in enumerate(zip(spatial, kernel, dilation)):
        if ks < 1 or dil < 1:
            raise ValueError(f"{_OP}: kernel_size and dilation must be >= 1, got {ks} and {dil} on axis {axis}")
        if ks * dil > length:
            raise ValueError(f"{_OP}: kernel_size * dilation = {ks} * {dil} exceeds the length {length} of spatial "
                             f"axis {axis}; use a smaller window or dilation")


# --- the window definition, shared by the dense mask and the FlexAttention mask_mod --------------------------------

def _axis_window(qi: torch.Tensor, ki: torch.Tensor, length: int, kernel: int, dilation: int,
                 causal: bool) -> torch.Tensor:
    """Whether key coordinate ``ki`` is in the window of query coordinate ``qi`` on one axis (int tensors, bool)."""
    group = qi % dilation
    same_group = group == ki % dilation
    qg, kg = qi // dilation, ki // dilation
    if causal:
        return same_group & (kg <= qg) & (qg - kg < kernel)
    group_len = length // dilation + (group < length % dilation).to(qi.dtype)
    start = torch.minimum((qg - kernel // 2).clamp(min=0), group_len - kernel)
    return same_group & (kg >= start) & (kg < start + kernel)


def _token_window(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...],
                  causal: tuple[bool, ...]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``allowed(q_idx, kv_idx)`` on flattened (raster-order) token indices."""
    def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        result = None
        q_rest, k_rest = q_idx, kv_idx
        for axis in reversed(range(len(spatial))):  # raster order: the last axis varies fastest
            length = spatial[axis]
            inside = _axis_window(q_rest % length, k_rest % length, length, kernel[axis], dilation[axis],
                                  causal[axis])
            result = inside if result is None else result & inside
            q_rest, k_rest = q_rest // length, k_rest // length
        return result
    return allowed


def neighborhood_mask(spatial: Sequence[int], kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                      is_causal: BoolOrTuple = False, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense boolean mask (N, N), N = prod(spatial), True where query token i may attend key token j.

    Tokens are in raster order (the last spatial axis varies fastest), as ``x.flatten(2, -2)`` gives.
    """
    spatial = tuple(int(s) for s in spatial)
    kernel = _per_axis("kernel_size", kernel_size, len(spatial), int)
    dil = _per_axis("dilation", dilation, len(spatial), int)
    causal = _per_axis("is_causal", is_causal, len(spatial), bool)
    _check_window(spatial, kernel, dil)
    return _dense_mask(spatial, kernel, dil, causal, torch.device(device or "cpu"))


@cached_constant()
def _dense_mask(spatial, kernel, dilation, causal, device: torch.device) -> torch.Tensor:
    n = math.prod(spatial)
    idx = torch.arange(n, device=device)
    return _token_window(spatial, kernel, dilation, causal)(idx[:, None], idx[None, :])


# --- backends --------------------------------------------------------------------------------------------------------

def _flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2, -2)


def _reference(q, k, v, *, kernel_size, dilation, is_causal, scale):
    spatial = tuple(q.shape[2:-1])
    mask = _dense_mask(spatial, kernel_size, dilation, is_causal, q.device)
    out = sdpa(_flatten_tokens(q), _flatten_tokens(k), _flatten_tokens(v),
                                         attn_mask=mask, scale=scale)
    return out.reshape(*q.shape[:-1], v.shape[-1])


def _load_flex():
    """``torch.nn.attention.flex_attention`` where it is as these backends use it (torch >= 2.6), else None."""
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:
        return None
    # torch 2.5's FlexAttention has no sequence lengths (they had to be multiples of the block) and fails on the
    # masks' captured tensors ("Other buffers must be tensors")
    if "seq_lengths" not in inspect.signature(flex.BlockMask.from_kv_blocks).parameters:
        return None
    return flex


# Read once at import (3 ms): every flex call and dispatch's availability check ask, also in traced code
_FLEX = _load_flex()


def _flex_module():
    """The FlexAttention module the flex backends use, or None where this torch's does not serve them."""
    return _FLEX


@functools.lru_cache(maxsize=None)
def _flex_available() -> str | None:
    if _flex_module() is None:
        return f"FlexAttention as the flex backends use it needs torch >= 2.6 (this is {torch.__version__})"
    return None


_FLEX_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, shared by the flex backends of zoo.ops (neighborhood, masked).

    Dynamo keeps one cache per code object, so every shape/dtype/mask variant of every op is a recompile of the
    same ``flex_attention``; past the default limit (8) dynamo silently runs the slow unfused path. The limit is
    raised to 64 (never lowered) when this is first used.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), _FLEX_RECOMPILE_LIMIT))
    return torch.compile(_flex_module().flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _na_block_mask(spatial, kernel, dilation, causal, device: str):
    allowed = _token_window(spatial, kernel, dilation, causal)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx)

    n = 1
    for s in spatial:
        n *= s
    return _flex_module().create_block_mask(mask_mod, None, None, n, n, device=device)


def _flex_forward(q, k, v, *, kernel_size, dilation, is_causal, scale, compiled: bool = True):
    """FlexAttention neighbourhood attention; ``compiled=False`` runs the eager (unfused) path, used by CPU tests."""
    spatial = tuple(q.shape[2:-1])
    block_mask = _na_block_mask(spatial, kernel_size, dilation, is_causal, str(q.device))
    fn = compiled_flex_attention() if compiled else _flex_module().flex_attention
    out = fn(_flatten_tokens(q), _flatten_tokens(k), _flatten_tokens(v), block_mask=block_mask, scale=scale)
    return out.reshape(*q.shape[:-1], v.shape[-1])


def _flex(q, k, v, *, kernel_size, dilation, is_causal, scale):
    return _flex_forward(q, k, v, kernel_size=kernel_size, dilation=dilation, is_causal=is_causal, scale=scale)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _flex_supports(q, k, v, **_) -> str | None:
    if q.device.type != "cuda":
        if _needs_grad(q, k, v):
            return "FlexAttention has no backward on CPU (inputs require grad)"
        return f"the flex backend runs on CUDA only (got {q.device.type}; its eager CPU path is slower than reference)"
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"needs q, k, v of one dtype among float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] < 16 or v.shape[-1] != q.shape[-1]:
        return f"needs head dim >= 16 and d_v == d, got d={q.shape[-1]}, d_v={v.shape[-1]}"
    return None


@functools.lru_cache(maxsize=None)
def _natten_available() -> str | None:
    if importlib.util.find_spec("natten") is None:
        return "natten is not installed"
    try:
        import natten
    except Exception as exc:  # a broken build must not break zoo.ops
        return f"natten fails to import: {exc}"
    if not getattr(natten, "HAS_LIBNATTEN", False):
        return "natten is installed without libnatten (its CUDA kernels)"
    if not hasattr(natten, "na1d") or not hasattr(natten, "na2d"):
        return "natten is too old (needs natten.na1d / natten.na2d, NATTEN >= 0.20)"
    return None


def _natten_supports(q, k, v, **_) -> str | None:
    if q.device.type != "cuda":
        return f"libnatten runs on CUDA only, got {q.device.type}"
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"needs q, k, v of one dtype among float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] % 8 or v.shape[-1] != q.shape[-1]:
        return f"needs a head dim divisible by 8 and d_v == d, got d={q.shape[-1]}, d_v={v.shape[-1]}"
    return None


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -2).contiguous()  # natten's layout: (B, *spatial, heads, d)


def _natten(q, k, v, *, kernel_size, dilation, is_causal, scale):
    import natten

    fn = natten.na1d if q.ndim == 4 else natten.na2d
    out = fn(_heads_last(q), _heads_last(k), _heads_last(v), kernel_size=kernel_size, dilation=dilation,
             is_causal=is_causal, scale=scale)
    return out.movedim(-2, 1)


# Measured on an H200 (torch 2.11, bf16, batch 128, flex vs the dense-masked reference, fwd / fwd+bwd): NAT-T stage 0
# (56x56, k 7, dilation 1) 2.0x / 1.75x faster; DiNAT-T stage 1 (28x28, k 7, dilation 4) 0.34x / 0.42x. A dilated
# neighbourhood scatters each query's keys over the whole map, so the block mask skips almost nothing.
_FLEX_MIN_TOKENS = 1024


def _flex_prefer(q, k, v, *, dilation, **_) -> str | None:
    tokens = math.prod(q.shape[2:-1])
    if any(d > 1 for d in dilation) or tokens < _FLEX_MIN_TOKENS:
        return (f"dilation {tuple(dilation)} over {tokens} tokens: the dense-masked reference is faster (flex pays "
                f"off undilated from {_FLEX_MIN_TOKENS} tokens)")
    return None


register_backend(_OP, "reference", _reference, priority=0)
register_backend(_OP, "flex", _flex, supports=_flex_supports, priority=10, available=_flex_available,
                 prefer=_flex_prefer)
register_backend(_OP, "natten", _natten, supports=_natten_supports, priority=20, available=_natten_available)
