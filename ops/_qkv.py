"""The ``qkv=`` argument of the self-attention ops: the (B, N, 3 * heads * d) projection whose head-split views q, k
and v are (q, k, v each ``heads * d`` channels, in that order). It changes no value; a backend that is given it can
run on the projection itself, so that its backward writes the projection's gradient in one buffer instead of
autograd stacking q's, k's and v's gradients in one more pass over them."""
from __future__ import annotations

import torch

from ._cache import functorch_transforming

__all__ = ["check_qkv", "qkv_offsets", "split_qkv"]


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3 * heads * d) -> q, k, v, each a (B, heads, N, d) view (splitting one dimension is always a view):
    the views that ``qkv=`` of :func:`~zoo.ops.downsampled_attention` and :func:`~zoo.ops.pooled_agent_attention`
    expects."""
    b, n, c3 = qkv.shape
    return qkv.view(b, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def qkv_offsets(qkv: torch.Tensor | None, *views: torch.Tensor) -> tuple[int, ...] | None:
    """Where each view starts in qkv's memory (bytes), for an op's call key: :func:`check_qkv` reads addresses, so a
    call whose views lie elsewhere in qkv is checked again. None without qkv, while tracing or inside a ``torch.func``
    transform (no addresses)."""
    if qkv is None or torch.compiler.is_compiling() or functorch_transforming():
        return None
    base = qkv.data_ptr()
    return tuple(t.data_ptr() - base for t in views)


def check_qkv(op: str, qkv: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless qkv is None or the (B, N, 3 * heads * d) tensor whose head-split views q, k and v (B, heads, N, d)
    are (in eager calls also checked by address: a traced graph computes from qkv alone)."""
    if qkv is None:
        return
    b, heads, n, d = q.shape
    want = (b, n, 3 * heads * d)
    if not isinstance(qkv, torch.Tensor) or tuple(qkv.shape) != want or qkv.stride(-1) != 1:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"{op}: qkv must be the (B, N, 3 * heads * d) = {want} projection q, k and v are "
                         f"head-split views of (channels contiguous), got {got}")
    if torch.compiler.is_compiling() or functorch_transforming() or qkv.numel() == 0:
        return  # no addresses to check: traced, a torch.func transform's wrapped tensors, or views of nothing
    size = qkv.element_size()
    want_strides = (qkv.stride(0), d, qkv.stride(1), 1)
    for i, (name, t) in enumerate((("q", q), ("k", k), ("v", v))):
        view = (tuple(t.shape) == (b, heads, n, d) and t.dtype == qkv.dtype
                and _strides_agree(t, want_strides) and t.data_ptr() == qkv.data_ptr() + i * heads * d * size)
        if not view:
            raise ValueError(f"{op}: {name} is not the head-split view of qkv's channels "
                             f"[{i * heads * d}, {(i + 1) * heads * d}) (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}); pass qkv=None for q, k, v of other memory")


def _strides_agree(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """Whether ``t`` has ``strides`` in every dimension longer than one (a length-one dimension's stride addresses
    nothing: views of one token or one head may carry any)."""
    return all(size == 1 or have == want for size, have, want in zip(t.shape, t.stride(), strides))
