"""Window attention: softmax attention inside non-overlapping (optionally shifted) rectangular windows.

The feature map is cut into a grid of ``wh x ww`` windows and every query attends only to the keys of its own
window (Swin's W-MSA). Rectangular windows cover CSWin's stripes: ``(H, sw)`` is a column stripe of width ``sw``,
``(sh, W)`` a row stripe, ``(H, W)`` global attention. With ``shift_size=(sy, sx)`` the window grid is offset by
``(sy, sx)`` (Swin's SW-MSA): computed, as in Swin, by a cyclic roll of the map, attention in the rolled windows,
and a roll back, where the pieces that the roll wraps into one window are kept apart by a mask. Equivalently, in
image coordinates a query at ``(y, x)`` attends to a key at ``(y', x')`` exactly when::

    floor((y - sy) / wh) == floor((y' - sy) / wh)   and   floor((x - sx) / ww) == floor((x' - sx) / ww)

(the windows at the top/left border are cut short). A ``bias`` (e.g. Swin's relative position bias, gathered from
its table by the model) is added to the logits of every window; with a shift it is indexed in rolled-window
coordinates, which for two tokens of the same window equals their displacement in the image.

Swin masks the wrapped pairs with an additive -100; here they are excluded exactly (``-inf``). The two agree to
float32 precision unless logits within a window span more than about 80.

Backends:
    ``reference``: plain PyTorch, the definition (scales the queries before the product, as Swin does).
    ``sdpa``: ``F.scaled_dot_product_attention`` on the window-partitioned tensors, with the bias and the shift mask
        as one float mask; any device and dtype, differentiable in q, k, v and the bias.
    ``triton``: :mod:`zoo.ops.triton.window`, one fused kernel per pass: windows, roll and shift mask from index
        arithmetic (no partition, roll or mask tensors), q, k, v read through their strides; deterministic backward
        with the bias gradient; CUDA fp32/fp16/bf16 (CPU under ``TRITON_INTERPRET=1``), windows of at most 256
        tokens, no dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._sdpa import mixed_dtypes_reason, sdpa
from ._cache import cached_constant
from ._checks import broadcasts_to, check_float_tensors
from ._dispatch import call_key, dispatch, register_backend, validated

__all__ = ["window_attention", "window_partition", "window_reverse", "shifted_window_mask"]

_OP = "window_attention"


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"window_attention: {name} must be an int or a pair of ints (height, width), got {value!r}")


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     window_size: int | tuple[int, int], *, shift_size: int | tuple[int, int] = 0,
                     scale: float | None = None, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                     backend: str | None = None) -> torch.Tensor:
    """Softmax attention within (shifted) rectangular windows of a 2-D token map.

    Args:
        q: queries (B, heads, H, W, d).
        k: keys (B, heads, H, W, d).
        v: values (B, heads, H, W, d_v).
        window_size: ``wh`` or ``(wh, ww)``; H must be a multiple of ``wh`` and W of ``ww`` (pad the map first).
        shift_size: ``s`` or ``(sy, sx)``, the offset of the window grid, ``0 <= sy < wh`` and ``0 <= sx < ww``.
        scale: logit scale; ``d ** -0.5`` when None.
        bias: float logit bias per window, broadcastable to (nW, heads, N, N) with N = wh*ww and
            nW = (H/wh)*(W/ww) windows in raster order; usually a relative position bias (heads, N, N).
        dropout_p: dropout on the attention map (apply only in training).
        backend: ``"reference"``, ``"sdpa"``, ``"triton"`` or None for automatic choice (see
            :mod:`zoo.ops._dispatch`).

    Returns:
        (B, heads, H, W, d_v) in the dtype of ``q``.
    """
    window = _pair(window_size, "window_size")
    shift = _pair(shift_size, "shift_size")
    key = call_key(q, k, v, window, shift, bias, scale, dropout_p)
    if not validated(_OP, key):
        _check_inputs(q, k, v, window, shift, bias, dropout_p)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return dispatch(_OP, backend, q, k, v, window_size=window, shift_size=shift, scale=float(scale), bias=bias,
                    dropout_p=float(dropout_p), key=key)


def _check_inputs(q, k, v, window, shift, bias, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 5:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"window_attention: {name} must be a 5-d tensor (B, heads, H, W, dim), got {got}")
    check_float_tensors("window_attention", q=q, k=k, v=v)
    if k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError("window_attention: q and k must have the same shape and v the same (B, heads, H, W); got "
                         f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}")
    _, heads, h, w, _ = q.shape
    (wh, ww), (sy, sx) = window, shift
    if wh < 1 or ww < 1 or h % wh or w % ww:
        raise ValueError(f"window_attention: window_size={window} must be positive and divide the map size "
                         f"(H, W)=({h}, {w}); pad the map to a multiple of the window first")
    if not (0 <= sy < wh and 0 <= sx < ww):
        raise ValueError(f"window_attention: shift_size={shift} must satisfy 0 <= shift < window_size={window}")
    if bias is not None:
        target = ((h // wh) * (w // ww), heads, wh * ww, wh * ww)
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise ValueError("window_attention: bias must be a floating-point tensor or None")
        ok = broadcasts_to(bias.shape, target)
        if not ok:
            raise ValueError(f"window_attention: bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"(nW, heads, N, N)={target}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"window_attention: dropout_p must be in [0, 1), got {dropout_p}")


# ----------------------------------------------------------------------------------------------------------------
# Partition helpers (also used by models that run other attentions per window, e.g. Agent-Swin).

def window_partition(x: torch.Tensor, window_size: int | tuple[int, int]) -> torch.Tensor:
    """Cut a channels-last map into windows.

    Args:
        x: (B, H, W, C), H and W multiples of the window size.
        window_size: ``w`` or ``(wh, ww)``.

    Returns:
        (B * nW, wh, ww, C), windows in raster order within each image.
    """
    wh, ww = _pair(window_size, "window_size")
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // wh) * (w // ww), wh, ww, c)  # explicit sizes: an empty batch has no -1 to infer


def window_reverse(windows: torch.Tensor, window_size: int | tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh, ww, C) -> (B, H, W, C)."""
    wh, ww = _pair(window_size, "window_size")
    c = windows.shape[-1]
    b = windows.shape[0] // ((height // wh) * (width // ww))
    x = windows.view(b, height // wh, width // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def _partition_heads(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    # (B, heads, H, W, d) -> (B, nW, heads, wh*ww, d)
    b, n, h, w, d = x.shape
    wh, ww = window
    x = x.view(b, n, h // wh, wh, w // ww, ww, d).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(b, (h // wh) * (w // ww), n, wh * ww, d)


def _reverse_heads(x: torch.Tensor, window: tuple[int, int], h: int, w: int) -> torch.Tensor:
    # (B, nW, heads, wh*ww, d) -> (B, heads, H, W, d)
    b, _, n, _, d = x.shape
    wh, ww = window
    x = x.view(b, h // wh, w // ww, n, wh, ww, d).permute(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(b, n, h, w, d)


def shifted_window_mask(height: int, width: int, window_size: int | tuple[int, int],
                        shift_size: int | tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Which key each query may see in the rolled windows of a shifted-window attention.

    Args:
        height, width: map size (multiples of the window size).
        window_size: ``w`` or ``(wh, ww)``.
        shift_size: ``s`` or ``(sy, sx)``.

    Returns:
        bool (nW, N, N), True where query i and key j of a rolled window came from the same image region.
    """
    (wh, ww), (sy, sx) = _pair(window_size, "window_size"), _pair(shift_size, "shift_size")

    def region_ids(size: int, win: int, shift: int) -> torch.Tensor:
        # Window id in image coordinates (the grid offset by `shift`), read at rolled positions.
        pos = torch.arange(size, device=device)
        ids = torch.div(pos - shift, win, rounding_mode="floor")
        return torch.roll(ids, -shift).view(size // win, win)

    ids_y, ids_x = region_ids(height, wh, sy), region_ids(width, ww, sx)
    # (nWh, nWw, wh, ww) id pairs, flattened per window in raster order.
    ids = (ids_y[:, None, :, None] * (width + 1) + ids_x[None, :, None, :]).reshape(-1, wh * ww)
    return ids[:, :, None] == ids[:, None, :]


@cached_constant()
def _allowed(h: int, w: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The shift mask of :func:`shifted_window_mask`, cached (a dozen small kernels on every shifted call)."""
    return shifted_window_mask(h, w, window, shift, device=device)


@cached_constant()
def _shift_logit_mask(h: int, w: int, window: tuple[int, int], shift: tuple[int, int], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive mask: 0 where the shift lets query and key meet, -inf elsewhere."""
    allowed = _allowed(h, w, window, shift, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def _roll(x: torch.Tensor, shift: tuple[int, int], sign: int) -> torch.Tensor:
    if shift == (0, 0):
        return x
    return torch.roll(x, shifts=(sign * shift[0], sign * shift[1]), dims=(2, 3))


# ----------------------------------------------------------------------------------------------------------------
# Backends

def _reference(q, k, v, *, window_size, shift_size, scale, bias, dropout_p):
    h, w = q.shape[2:4]
    qw, kw, vw = (_partition_heads(_roll(t, shift_size, -1), window_size) for t in (q, k, v))
    logits = (qw * scale) @ kw.transpose(-2, -1)  # (B, nW, heads, N, N)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)  # a float32 bias must not promote half-precision logits
    if shift_size != (0, 0):
        allowed = _allowed(h, w, window_size, shift_size, q.device)
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    attn = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    out = _reverse_heads(attn @ vw, window_size, h, w)
    return _roll(out, shift_size, 1)


def _sdpa_mask(bias, shift_size, window_size, h, w, heads, dtype, device) -> torch.Tensor | None:
    """Bias plus shift mask as one float mask (nW, heads, N, N), or (heads, N, N) when it is the same per window."""
    mask = None if bias is None else bias.to(dtype)
    if shift_size != (0, 0):
        shift_mask = _shift_logit_mask(h, w, window_size, shift_size, dtype, device)[:, None]
        mask = shift_mask if mask is None else mask + shift_mask
    return mask


def _sdpa(q, k, v, *, window_size, shift_size, scale, bias, dropout_p):
    b, heads, h, w, _ = q.shape
    qw, kw, vw = (_partition_heads(_roll(t, shift_size, -1), window_size) for t in (q, k, v))
    n_win, n = qw.shape[1], qw.shape[3]
    mask = _sdpa_mask(bias, shift_size, window_size, h, w, heads, q.dtype, q.device)
    if mask is None or mask.ndim < 4 or mask.shape[0] == 1:
        # One mask for every window: windows go to the batch dim, the mask broadcasts over it.
        mask = None if mask is None else mask.expand(1, heads, n, n)
        fold = (b * n_win, heads)
    else:
        # Per-window masks: windows go to the head dim, so the mask broadcasts over the images only.
        mask = mask.expand(n_win, heads, n, n).reshape(1, n_win * heads, n, n)
        fold = (b, n_win * heads)
    out = sdpa(qw.reshape(*fold, n, qw.shape[-1]), kw.reshape(*fold, n, kw.shape[-1]),
                                         vw.reshape(*fold, n, vw.shape[-1]), attn_mask=mask, dropout_p=dropout_p,
                                         scale=scale)
    out = _reverse_heads(out.view(b, n_win, heads, n, out.shape[-1]), window_size, h, w)
    return _roll(out, shift_size, 1)


def _sdpa_supports(q, k, v, **_) -> str | None:
    return mixed_dtypes_reason(q=q, k=k, v=v)


register_backend(_OP, "reference", _reference, priority=0)
register_backend(_OP, "sdpa", _sdpa, supports=_sdpa_supports, priority=10)
