"""The additive position biases of Agent Attention, built from their parameters (Han et al., ECCV 2024).

Every official AgentAttention module owns eight bias parameters (shapes in :mod:`zoo.backbones._agent_common`) and
turns them into the two maps :func:`zoo.ops.agent_attention` adds to its logits, on every forward::

    agent_bias[h, a, (i, j)] = resize(an_bias[h, a])[i, j] + (ah_bias[h, a, i] + aw_bias[h, a, j])   # (1, heads, A, Lk)
    query_bias[h, (i, j), a] = (ha_bias[h, i, a] + wa_bias[h, j, a]) + resize(na_bias[h, a])[i, j]   # (1, heads, Lq, A)

with ``resize`` the bilinear ``F.interpolate(..., align_corners=False)`` of the 7x7 maps to the key / query grid,
and, for a class token (Agent-DeiT), ``ac_bias`` / ``ca_bias`` as a leading key column / query row. At another grid
than the construction one the row/column sums are resized too, and a dense-prediction model may resize the agent
axis (``agents``), as the official detection and segmentation backbones do.

Why an op: written with PyTorch ops the build is two resizes, four sums, two concatenations and a copy a block, and
their backward as many nodes again; an eager training step waits for the host's launches (Agent-DeiT-S: 24 resize
launches a step, 2.5 of its 16.5 ms of kernel time on an H200, ATen's resize kernel looping over the 294 (head,
agent) maps in each thread).

Backends:
    ``reference``: the PyTorch ops above: the definition; any device and dtype, differentiable, every case.
    ``triton``: one launch for both maps, one autograd node whose backward is one more launch (row and column sums,
        the resize's adjoint in a fixed order, no atomics), and nothing saved for it. Float32 parameters at the
        construction grid (no row/column or agent resize), maps of up to 64x64, on CUDA (or CPU under
        ``TRITON_INTERPRET=1``); inside ``torch.compile`` the same two launches as the ``torch.library`` ops
        ``zoo::agent_bias_maps_fwd`` / ``_bwd`` (static sizes). It computes the resize as ATen's CUDA kernel does
        (same formula and order), so it matches the reference up to float32 contraction.

Why the ops in compiled graphs too: there inductor turned the reference's build into some 27 kernels a block (the
resizes' gathers, the concatenations; backward, the resize adjoint as eight scatters into zeroed buffers, the row and
column sums, and copies of the maps into the packed pooled op's layout): 324 of the 889 kernels of a compiled
Agent-DeiT-T training step and 0.49 of its 5.33 ms of kernel time (H200, bf16, batch 64). With the ops: 595 kernels,
5.03 ms.
"""
from __future__ import annotations

import functools
import struct
from typing import Any, List, Optional, Sequence  # custom_op schemas: torch 2.5 reads only typing's List, Optional

import torch
import torch.nn.functional as F

from ._dispatch import call_key, dispatch, planned, register_backend, validated
from .triton import (direct, inputs_reason, kernel_op, kernels_interpreted, needs_grad, next_pow2, no_device_reason,
                      on_device, traced)

__all__ = ["agent_bias_maps", "agent_key_bias", "agent_query_bias", "resize_bilinear", "agent_grid"]

_OP = "agent_bias_maps"
MAX_TILE = 4096  # a map's (rows x columns) tile, both powers of two, held by one program


def agent_grid(agent_num: int) -> tuple[int, int]:
    """The square pooling grid of ``agent_num`` agents; raises ValueError when it is not a perfect square."""
    side = int(round(agent_num ** 0.5))
    if agent_num < 1 or side * side != agent_num:
        raise ValueError(f"agent_num must be a positive perfect square (agents are pooled on a square grid), "
                         f"got {agent_num}")
    return side, side


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """``F.interpolate(mode="bilinear", align_corners=False)`` of the two ``dims`` of ``x`` to ``size``.

    ``x``: (..., H, ..., W, ...) with H, W at ``dims`` -> the same with H, W replaced by ``size``; identity (no
    kernel) at equal size. One interpolation kernel: on a GPU host the bias build is launch-bound (a separable
    gather + lerp version measured 0.119 ms against 0.053 ms for this on an H200), so fewer launches win.
    """
    dim_h, dim_w = (d % x.ndim for d in dims)
    if (x.shape[dim_h], x.shape[dim_w]) == tuple(size):
        return x
    moved = x.movedim((dim_h, dim_w), (-2, -1))
    lead = moved.shape[:-2]
    out = F.interpolate(moved.reshape(1, -1, *moved.shape[-2:]), size=tuple(size), mode="bilinear",
                        align_corners=False)
    return out.reshape(*lead, *size).movedim((-2, -1), (dim_h, dim_w))


def _resize_agents(bias: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int] | None,
                   dim: int = 1) -> torch.Tensor:
    """Resize the agent axis ``dim`` of (heads, A, L) (dim 1) or (heads, L, A) (dim 2) from the ``grid`` to
    ``new_grid`` agents, bilinearly; A becomes A'. This is the official dense-prediction ``downstream_agent_shape``.
    """
    if new_grid is None or tuple(new_grid) == tuple(grid):
        return bias
    maps = resize_bilinear(bias.unflatten(dim, tuple(grid)), tuple(new_grid), dims=(dim, dim + 1))
    return maps.flatten(dim, dim + 1)


def agent_key_bias(an_bias: torch.Tensor, ah_bias: torch.Tensor, aw_bias: torch.Tensor, key_size: tuple[int, int],
                   *, ac_bias: torch.Tensor | None = None, agents: tuple[int, int] | None = None) -> torch.Tensor:
    """The additive agent->key bias (``agent_bias`` of :func:`zoo.ops.agent_attention`), in PyTorch ops.

    ``interpolate(an_bias, key grid) + (ah_bias + aw_bias)`` (the row/column sum bilinearly resized to the key grid
    when it differs from the construction grid), flattened row-major; with ``ac_bias`` a leading column for a class
    token key.

    Args:
        an_bias: (heads, A, 7, 7). ah_bias: (heads, A, Hk0, 1). aw_bias: (heads, A, 1, Wk0).
        key_size: (Hk, Wk) of the keys this call attends to.
        ac_bias: optional (1, heads, A, 1), the bias towards a leading class token key.
        agents: optional (ga, gb) agent grid when it differs from the one the biases were trained with (the
            official dense-prediction ``downstream_agent_shape``); the agent axis is resized bilinearly.

    Returns:
        (1, heads, A', [1 +] Hk * Wk).
    """
    key_size = tuple(key_size)
    heads, num = an_bias.shape[:2]
    grid = agent_grid(num)
    bias = resize_bilinear(an_bias, key_size) + resize_bilinear(ah_bias + aw_bias, key_size)
    bias = _resize_agents(bias.reshape(heads, num, -1), grid, agents)
    if ac_bias is not None:
        cls = _resize_agents(ac_bias[0], grid, agents)
        bias = torch.cat([cls, bias], dim=-1)
    return bias.unsqueeze(0)


def agent_query_bias(na_bias: torch.Tensor, ha_bias: torch.Tensor, wa_bias: torch.Tensor,
                     query_size: tuple[int, int], *, ca_bias: torch.Tensor | None = None,
                     agents: tuple[int, int] | None = None) -> torch.Tensor:
    """The additive query->agent bias (``query_bias`` of :func:`zoo.ops.agent_attention`), in PyTorch ops.

    ``interpolate(na_bias, query grid)`` transposed to (query, agent), plus ``ha_bias + wa_bias`` (bilinearly resized
    to the query grid when it differs from the construction grid); with ``ca_bias`` a leading row for a class token
    query.

    Args:
        na_bias: (heads, A, 7, 7). ha_bias: (heads, Hq0, 1, A). wa_bias: (heads, 1, Wq0, A).
        query_size: (Hq, Wq) of the queries.
        ca_bias: optional (1, heads, 1, A), the bias of a leading class token query.
        agents: optional agent grid for the dense-prediction agent resizing (see :func:`agent_key_bias`).

    Returns:
        (1, heads, [1 +] Hq * Wq, A'), contiguous.
    """
    query_size = tuple(query_size)
    heads, num = na_bias.shape[:2]
    grid = agent_grid(num)
    rowcol = resize_bilinear(ha_bias + wa_bias, query_size, dims=(1, 2))  # (heads, Hq, Wq, A)
    # Built query-major so that the agent dim is contiguous: SDPA's memory-efficient backward needs that of a mask.
    bias = (rowcol + resize_bilinear(na_bias, query_size).permute(0, 2, 3, 1)).reshape(heads, -1, num)
    if ca_bias is not None:
        bias = torch.cat([ca_bias[0], bias], dim=1)
    return _resize_agents(bias, grid, agents, dim=2).unsqueeze(0).contiguous()


def agent_bias_maps(an_bias: torch.Tensor, ah_bias: torch.Tensor, aw_bias: torch.Tensor, na_bias: torch.Tensor,
                    ha_bias: torch.Tensor, wa_bias: torch.Tensor, key_size: tuple[int, int],
                    query_size: tuple[int, int], *, ac_bias: torch.Tensor | None = None,
                    ca_bias: torch.Tensor | None = None, agents: tuple[int, int] | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both additive bias maps of an Agent Attention module: (:func:`agent_key_bias`, :func:`agent_query_bias`).

    Args:
        an_bias, na_bias: (heads, A, S, S) maps resized to the key / query grid (S = 7 in every released model).
        ah_bias, aw_bias: (heads, A, Hk0, 1) / (heads, A, 1, Wk0) agent->key row / column biases.
        ha_bias, wa_bias: (heads, Hq0, 1, A) / (heads, 1, Wq0, A) query->agent row / column biases.
        key_size, query_size: the (H, W) grids of this call's keys and queries.
        ac_bias, ca_bias: (1, heads, A, 1) / (1, heads, 1, A) class-token biases, both or neither.
        agents: a dense-prediction agent grid that differs from the trained one (the agent axis is resized).
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        ``agent_bias`` (1, heads, A', [1 +] Hk * Wk) and ``query_bias`` (1, heads, [1 +] Hq * Wq, A'), contiguous,
        in the parameters' dtype.
    """
    key_size, query_size = tuple(key_size), tuple(query_size)
    agents = tuple(agents) if agents is not None else None
    params = (an_bias, ah_bias, aw_bias, na_bias, ha_bias, wa_bias, ac_bias, ca_bias)
    key = call_key(*params, key_size, query_size, agents)
    if not validated(_OP, key):
        _check_inputs(*params, key_size, query_size, agents)
    return dispatch(_OP, backend, *params, key_size, query_size, agents, key=key)


def _check_inputs(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size, agents) -> None:
    named = dict(an_bias=an, ah_bias=ah, aw_bias=aw, na_bias=na, ha_bias=ha, wa_bias=wa, ac_bias=ac, ca_bias=ca)
    for name, t in named.items():
        if t is None and name in ("ac_bias", "ca_bias"):
            continue
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"agent_bias_maps: {name} must be a 4-d floating-point tensor, got {got}")
    heads, num = an.shape[:2]
    agent_grid(num)
    hk0, wk0, hq0, wq0 = ah.shape[2], aw.shape[3], ha.shape[1], wa.shape[2]
    expected = dict(na_bias=(heads, num, *na.shape[2:]), ah_bias=(heads, num, hk0, 1), aw_bias=(heads, num, 1, wk0),
                    ha_bias=(heads, hq0, 1, num), wa_bias=(heads, 1, wq0, num), ac_bias=(1, heads, num, 1),
                    ca_bias=(1, heads, 1, num))
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"agent_bias_maps: {name} must have shape {shape} for an_bias of shape "
                             f"{tuple(an.shape)} (heads={heads}, A={num}), got {tuple(t.shape)}")
    if (ac is None) != (ca is None):
        raise ValueError("agent_bias_maps: ac_bias and ca_bias (the class token's) come together; got one of them")
    for name, size in (("key_size", key_size), ("query_size", query_size), ("agents", agents)):
        if size is None and name == "agents":
            continue
        if len(size) != 2 or not all(type(s) is int and s > 0 for s in size):
            raise ValueError(f"agent_bias_maps: {name} must be two positive ints (H, W), got {size!r}")
    for name, t in named.items():
        if t is not None and t.device != an.device:
            raise ValueError(f"agent_bias_maps: {name} is on {t.device}, an_bias on {an.device}; use one device")


def _reference(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size, agents):
    return (agent_key_bias(an, ah, aw, key_size, ac_bias=ac, agents=agents),
            agent_query_bias(na, ha, wa, query_size, ca_bias=ca, agents=agents))


register_backend(_OP, "reference", _reference)


# ----------------------------------------------------------------------------------------------------------------
# triton backend


@functools.cache
def _kernels():
    """(forward, backward) kernels (imports triton on first use, so ``TRITON_INTERPRET`` is read then)."""
    from .triton.kernels import agent_bias as kernels

    return kernels.bias_maps_kernel, kernels.bias_maps_backward_kernel


def _supports(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size, agents) -> str | None:
    if not all(type(s) is int for s in (*key_size, *query_size)):
        return "symbolic map sizes (torch.compile's dynamic shapes) take the reference"
    if agents is not None and agents != agent_grid(an.shape[1]):
        return "a resized agent axis (dense prediction) takes the reference"
    if (ah.shape[2], aw.shape[3]) != key_size or (ha.shape[1], wa.shape[2]) != query_size:
        return "row/column biases resized to another grid take the reference"
    if an.shape[2:] != na.shape[2:]:
        return f"an_bias and na_bias maps of different sizes ({tuple(an.shape[2:])}, {tuple(na.shape[2:])})"
    for size in (key_size, query_size):
        if next_pow2(size[0]) * next_pow2(size[1]) > MAX_TILE:
            return f"a {size[0]}x{size[1]} map exceeds one program's tile ({MAX_TILE} values)"
    params = (an, ah, aw, na, ha, wa, ac, ca)
    if any(t is not None and t.dtype != torch.float32 for t in params):
        return "float32 parameters only"
    if any(t is not None and not t.is_contiguous() for t in params):
        return "contiguous parameters only"
    return inputs_reason(an.device, kernels_interpreted(f"{__package__}.triton.kernels.agent_bias"), an_bias=an)


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _scales(source: tuple[int, int], size: tuple[int, int]) -> tuple[float, float]:
    """ATen's float32 resize scales (input / output) of an ``align_corners=False`` resize from ``source``: the
    float64 quotient of the two (exact) sizes rounded to float32 is float32's own division (a double's 53 bits hold
    twice float32's 24 and two more, so the second rounding never differs)."""
    return tuple(_float32(s / o) for s, o in zip(source, size))


@functools.lru_cache(maxsize=256)
def _plan(source: tuple[int, int], key_size: tuple[int, int], query_size: tuple[int, int]) -> tuple[Any, ...]:
    """The launch's size arguments and tile constexprs for these grids (one call a block and step: cached)."""
    runtime = (*key_size, *query_size, *_scales(source, key_size), *_scales(source, query_size))
    tiles = dict(BLOCK_KH=next_pow2(key_size[0]), BLOCK_KW=next_pow2(key_size[1]), BLOCK_QH=next_pow2(query_size[0]),
                 BLOCK_QW=next_pow2(query_size[1]), SH=source[0], SW=source[1])
    return runtime, tiles


def _maps_forward(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size, launch=direct):
    """(key, query) bias maps in one launch (module docstring)."""
    heads, num = an.shape[:2]
    cls = int(ac is not None)
    key = an.new_empty((1, heads, num, cls + key_size[0] * key_size[1]))
    query = an.new_empty((1, heads, cls + query_size[0] * query_size[1], num))
    runtime, tiles = _plan(tuple(an.shape[2:]), key_size, query_size)
    with on_device(an):
        launch(_kernels()[0])[(heads * num,)](
            an, ah, aw, ac if cls else an, na, ha, wa, ca if cls else an, key, query, num, *runtime,
            CLS=bool(cls), num_warps=4, **tiles)
    return key, query


def _param_shapes(heads: int, num: int, source: tuple[int, int], key_size: tuple[int, int],
                  query_size: tuple[int, int]) -> list[tuple[int, ...]]:
    """The shapes of an, ah, aw, na, ha, wa, ac, ca that the triton backend serves (row and column biases at the
    maps' grids, both maps ``source``-sized)."""
    (hk, wk), (hq, wq) = key_size, query_size
    return [(heads, num, *source), (heads, num, hk, 1), (heads, num, 1, wk), (heads, num, *source),
            (heads, hq, 1, num), (heads, 1, wq, num), (1, heads, num, 1), (1, heads, 1, num)]


def _maps_backward(dkey, dquery, source, key_size, query_size, cls, launch=direct):
    """Every parameter's float32 gradient (an, ah, aw, na, ha, wa, ac, ca; the last two None without a class
    token) from the maps' gradients (1, heads, A, [1 +] Hk * Wk) / (1, heads, [1 +] Hq * Wq, A), in one launch."""
    heads, num = dkey.shape[1:3]
    device = dkey.device
    shapes = _param_shapes(heads, num, tuple(source), key_size, query_size)
    grads = [torch.empty(shape, device=device, dtype=torch.float32) for shape in shapes[:6 + 2 * cls]]
    dkey, dquery = dkey.float(), dquery.float()  # (no copy: float32 already, unless autocast handed a half gradient)
    runtime, tiles = _plan(tuple(source), key_size, query_size)
    dac, dca = (grads[6], grads[7]) if cls else (grads[0], grads[0])
    with on_device(dkey):
        launch(_kernels()[1])[(heads * num,)](
            dkey, dquery, grads[0], grads[1], grads[2], dac, grads[3], grads[4], grads[5], dca, num,
            *key_size, *query_size, dkey.stride(1), dkey.stride(2), dkey.stride(3), dquery.stride(1),
            dquery.stride(2), dquery.stride(3), *runtime[4:], CLS=bool(cls), num_warps=4, **tiles)
    return grads + [None] * (2 - 2 * cls)


class _BiasMaps(torch.autograd.Function):
    """Training calls of the triton backend: one node, nothing saved but shapes."""

    @staticmethod
    def forward(ctx, an, ah, aw, na, ha, wa, ac, ca, key_size, query_size):
        ctx.layout = (tuple(an.shape[2:]), key_size, query_size, int(ac is not None))
        return planned("agent_bias_maps.forward", _maps_forward, an, ah, aw, na, ha, wa, ac, ca, key_size, query_size)

    @staticmethod
    def backward(ctx, dkey, dquery):
        grads = planned("agent_bias_maps.backward", _planned_maps_backward, dkey, dquery, *ctx.layout)
        wanted = ctx.needs_input_grad
        return (*(g if wanted[i] else None for i, g in enumerate(grads)), None, None)


def _planned_maps_backward(dkey, dquery, source, key_size, query_size, cls) -> tuple:
    """:func:`_maps_backward` as a tuple (what a call plan returns)."""
    return tuple(_maps_backward(dkey, dquery, source, key_size, query_size, cls))


# traced calls (torch.compile): the same two launches as torch.library ops


def _maps_fake(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size):
    heads, num = an.shape[:2]
    cls = int(ac is not None)
    return (an.new_empty((1, heads, num, cls + key_size[0] * key_size[1])),
            an.new_empty((1, heads, cls + query_size[0] * query_size[1], num)))


@kernel_op("zoo::agent_bias_maps_fwd", fake=_maps_fake)
def _maps_op(an: torch.Tensor, ah: torch.Tensor, aw: torch.Tensor, na: torch.Tensor, ha: torch.Tensor,
             wa: torch.Tensor, ac: Optional[torch.Tensor], ca: Optional[torch.Tensor],  # noqa: UP045
             key_size: Sequence[int], query_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps (1, heads, A, [1 +] Hk * Wk) / (1, heads, [1 +] Hq * Wq, A) in one launch, for torch.compile."""
    return _maps_forward(an, ah, aw, na, ha, wa, ac, ca, tuple(key_size), tuple(query_size), traced)


def _maps_backward_fake(dkey, dquery, source, key_size, query_size, cls):
    heads, num = dkey.shape[1:3]
    shapes = _param_shapes(heads, num, tuple(source), tuple(key_size), tuple(query_size))
    return [dkey.new_empty(shape if cls or i < 6 else (0,), dtype=torch.float32) for i, shape in enumerate(shapes)]


@kernel_op("zoo::agent_bias_maps_bwd", fake=_maps_backward_fake)
def _maps_backward_op(dkey: torch.Tensor, dquery: torch.Tensor, source: Sequence[int], key_size: Sequence[int],
                      query_size: Sequence[int], cls: bool) -> List[torch.Tensor]:  # noqa: UP006
    """The eight parameters' float32 gradients (:func:`_maps_backward`; ac's and ca's empty without a class token)
    in one launch, for torch.compile."""
    grads = _maps_backward(dkey, dquery, source, tuple(key_size), tuple(query_size), cls, traced)
    return [g if g is not None else dkey.new_empty((0,), dtype=torch.float32) for g in grads]


def _setup_traced(ctx, inputs, output) -> None:
    an, _, _, _, _, _, ac, _, key_size, query_size = inputs
    ctx.layout = (list(an.shape[2:]), list(key_size), list(query_size), ac is not None)


def _traced_backward(ctx, dkey, dquery):
    grads = _maps_backward_op(dkey, dquery, *ctx.layout)
    wanted = ctx.needs_input_grad  # (False for the absent class biases, whose gradients come back empty)
    return (*(g if wanted[i] else None for i, g in enumerate(grads)), None, None)


_maps_op.register_autograd(_traced_backward, setup_context=_setup_traced)


def _triton(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size, agents):
    if torch.compiler.is_compiling():
        return _maps_op(an, ah, aw, na, ha, wa, ac, ca, list(key_size), list(query_size))
    if needs_grad(an, ah, aw, na, ha, wa, ac, ca):
        return _BiasMaps.apply(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size)
    return _maps_forward(an, ah, aw, na, ha, wa, ac, ca, key_size, query_size)


register_backend(_OP, "triton", _triton, supports=_supports, priority=10, available=no_device_reason)
