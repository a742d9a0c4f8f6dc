"""Pieces shared by the Agent Attention backbones (Agent-DeiT, Agent-PVT, Agent-Swin, Agent-CSwin).

* The ``agent_attention`` family and its converter are registered once, here. Each model file adds its official
  class names to :data:`OFFICIAL_BUILDERS` with :func:`register_official_builder` (and, only if its keys differ from
  the official ones, a key map with :func:`register_key_map`).
* The agent position biases. Every official AgentAttention owns parameters with the same names and shapes:

  ======== ============================== ============================================
  name     shape                          role
  ======== ============================== ============================================
  an_bias  (heads, A, 7, 7)               agent->key bias, bilinearly resized to the key grid
  ah_bias  (1, heads, A, Hk, 1)           agent->key row bias
  aw_bias  (1, heads, A, 1, Wk)           agent->key column bias
  na_bias  (heads, A, 7, 7)               query->agent bias, resized to the query grid
  ha_bias  (1, heads, Hq, 1, A)           query->agent row bias
  wa_bias  (1, heads, 1, Wq, A)           query->agent column bias
  ac_bias  (1, heads, A, 1)               agent->cls-key bias (DeiT only)
  ca_bias  (1, heads, 1, A)               cls-query->agent bias (DeiT only)
  ======== ============================== ============================================

  ``Hk, Wk, Hq, Wq`` are fixed at construction (the ImageNet resolution). At another feature size the row/column
  biases are bilinearly interpolated to it, as the official detection/segmentation backbones do; at the
  construction size this reduces exactly to the classification code. :func:`agent_key_bias` and
  :func:`agent_query_bias` return the additive biases that :func:`zoo.ops.agent_attention` takes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from zoo.convert import FamilyConverter, register_converter
from zoo.registry import register_family

__all__ = ["FAMILY", "OFFICIAL_BUILDERS", "register_official_builder", "register_key_map", "init_agent_biases",
           "agent_key_bias", "agent_query_bias", "pool_agent_tokens", "agent_grid", "as_int_list", "to_2tuple"]

FAMILY = "agent_attention"
# The official repository has no LICENSE file (its Swin/timm-derived files carry MIT/Apache headers).
LICENSE = "unknown"
PAPER = "Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024)"
PAPER_URL = "https://arxiv.org/abs/2312.08874"
CODE_URL = "https://github.com/LeapLabTHU/Agent-Attention"

register_family(FAMILY, paper=PAPER, paper_url=PAPER_URL, code_url=CODE_URL, license=LICENSE)

StateDict = dict[str, torch.Tensor]

#: official class name -> ``fn(resolved_official_kwargs) -> zoo nn.Module``; filled by the model files.
OFFICIAL_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}
_KEY_MAPS: list[Callable[[StateDict], StateDict]] = []


def _build_official(cls_name: str, kwargs: dict[str, Any]) -> nn.Module:
    if cls_name not in OFFICIAL_BUILDERS:
        raise ValueError(f"cls={cls_name!r} is not an official {FAMILY} class; accepted: {sorted(OFFICIAL_BUILDERS)} "
                         "(import zoo.backbones to register every model file)")
    return OFFICIAL_BUILDERS[cls_name](dict(kwargs))


def _key_map(state_dict: StateDict) -> StateDict:
    # Each registered map must leave keys it does not recognise unchanged (the family spans four model files).
    for fn in _KEY_MAPS:
        state_dict = fn(state_dict)
    return dict(state_dict)


_CONVERTER = FamilyConverter(key_map=_key_map, build_official=_build_official, official_classes=())
register_converter(FAMILY, _CONVERTER)


def register_official_builder(cls_name: str, fn: Callable[[dict[str, Any]], nn.Module]) -> None:
    """Make ``from_official("agent_attention", cls_name, kwargs, sd)`` build a zoo model with ``fn(kwargs)``."""
    OFFICIAL_BUILDERS[cls_name] = fn
    _CONVERTER.official_classes = tuple(sorted(OFFICIAL_BUILDERS))


def register_key_map(fn: Callable[[StateDict], StateDict]) -> None:
    """Add an official->zoo key map; it must pass through keys of the other agent models unchanged."""
    if fn not in _KEY_MAPS:
        _KEY_MAPS.append(fn)


# ----------------------------------------------------------------------------------------------------------------
# Small argument helpers shared by the model files.

def to_2tuple(x: int | tuple[int, int] | list[int], name: str = "size") -> tuple[int, int]:
    """``x`` as an (h, w) pair of ints; raises ValueError naming ``name`` otherwise."""
    if isinstance(x, int):
        return (x, x)
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) for v in x):
        return (int(x[0]), int(x[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {x!r}")


def as_int_list(value: Any, n: int, name: str) -> list[int]:
    """Per-stage ints from the official spellings: ``[9, 16, 49, 49]``, ``['9', '16', ...]``, ``'9-16-49-49'``,
    ``'1111'`` (one digit per stage) or a single int for every stage."""
    if isinstance(value, int):
        return [value] * n
    if isinstance(value, str):
        parts = value.split("-") if "-" in value else list(value)
    else:
        parts = list(value)
    try:
        out = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be ints (or digit strings), got {value!r}") from None
    if len(out) < n:
        raise ValueError(f"{name} needs at least {n} entries, got {value!r}")
    return out


def agent_grid(agent_num: int) -> tuple[int, int]:
    """The square pooling grid of ``agent_num`` agents; raises ValueError when it is not a perfect square."""
    side = int(round(agent_num ** 0.5))
    if agent_num < 1 or side * side != agent_num:
        raise ValueError(f"agent_num must be a positive perfect square (agents are pooled on a square grid), "
                         f"got {agent_num}")
    return side, side


# ----------------------------------------------------------------------------------------------------------------
# Agent position biases.

def init_agent_biases(module: nn.Module, num_heads: int, agent_num: int, key_size: tuple[int, int],
                      query_size: tuple[int, int], cls_token: bool = False, std: float = 0.02) -> None:
    """Create the official agent bias parameters on ``module`` (names and shapes as in the official code).

    Args:
        module: the attention module that owns the parameters.
        num_heads: attention heads.
        agent_num: number of agents A.
        key_size: (Hk, Wk) key grid the row/column agent->key biases are sized for.
        query_size: (Hq, Wq) query grid the row/column query->agent biases are sized for.
        cls_token: also create ``ac_bias``/``ca_bias`` for a leading class token (Agent-DeiT).
        std: truncated-normal init std (the official value).
    """
    (hk, wk), (hq, wq) = key_size, query_size
    shapes = {
        "an_bias": (num_heads, agent_num, 7, 7),
        "na_bias": (num_heads, agent_num, 7, 7),
        "ah_bias": (1, num_heads, agent_num, hk, 1),
        "aw_bias": (1, num_heads, agent_num, 1, wk),
        "ha_bias": (1, num_heads, hq, 1, agent_num),
        "wa_bias": (1, num_heads, 1, wq, agent_num),
    }
    if cls_token:
        shapes.update(ac_bias=(1, num_heads, agent_num, 1), ca_bias=(1, num_heads, 1, agent_num))
    for name, shape in shapes.items():
        param = nn.Parameter(torch.zeros(shape))
        trunc_normal_(param, std=std)
        module.register_parameter(name, param)


def _resize(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) maps (align_corners=False, the official default); identity at equal size."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


def _resize_agents(bias: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int] | None) -> torch.Tensor:
    """Resize the agent axis (dim 1 of (heads, A, L)) from the ``grid`` to ``new_grid`` agents, bilinearly.

    Returns (heads, A', L). This is the official dense-prediction ``downstream_agent_shape`` path.
    """
    if new_grid is None or tuple(new_grid) == tuple(grid):
        return bias
    heads, _, length = bias.shape
    maps = bias.transpose(1, 2).reshape(heads, length, *grid)
    maps = F.interpolate(maps, size=tuple(new_grid), mode="bilinear", align_corners=False)
    return maps.reshape(heads, length, -1).transpose(1, 2)


def agent_key_bias(an_bias: torch.Tensor, ah_bias: torch.Tensor, aw_bias: torch.Tensor, key_size: tuple[int, int],
                   *, ac_bias: torch.Tensor | None = None, agents: tuple[int, int] | None = None) -> torch.Tensor:
    """The additive agent->key bias for :func:`zoo.ops.agent_attention` (``agent_bias``).

    ``interpolate(an_bias, key grid) + (ah_bias + aw_bias)`` (the row/column sum bilinearly resized to the key grid
    when it differs from the construction grid), flattened row-major; with ``ac_bias`` a leading column for a class
    token key.

    Args:
        an_bias: (heads, A, 7, 7). ah_bias: (1, heads, A, Hk0, 1). aw_bias: (1, heads, A, 1, Wk0).
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
    bias = _resize(an_bias, key_size) + _resize((ah_bias + aw_bias)[0], key_size)
    bias = _resize_agents(bias.reshape(heads, num, -1), grid, agents)
    if ac_bias is not None:
        cls = _resize_agents(ac_bias[0], grid, agents)
        bias = torch.cat([cls, bias], dim=-1)
    return bias.unsqueeze(0)


def agent_query_bias(na_bias: torch.Tensor, ha_bias: torch.Tensor, wa_bias: torch.Tensor,
                     query_size: tuple[int, int], *, ca_bias: torch.Tensor | None = None,
                     agents: tuple[int, int] | None = None) -> torch.Tensor:
    """The additive query->agent bias for :func:`zoo.ops.agent_attention` (``query_bias``).

    ``interpolate(na_bias, query grid)`` transposed to (query, agent), plus ``ha_bias + wa_bias`` (bilinearly resized
    to the query grid when it differs from the construction grid); with ``ca_bias`` a leading row for a class token
    query.

    Args:
        na_bias: (heads, A, 7, 7). ha_bias: (1, heads, Hq0, 1, A). wa_bias: (1, heads, 1, Wq0, A).
        query_size: (Hq, Wq) of the queries.
        ca_bias: optional (1, heads, 1, A), the bias of a leading class token query.
        agents: optional agent grid for the dense-prediction agent resizing (see :func:`agent_key_bias`).

    Returns:
        (1, heads, [1 +] Hq * Wq, A').
    """
    query_size = tuple(query_size)
    heads, num = na_bias.shape[:2]
    grid = agent_grid(num)
    rowcol = (ha_bias + wa_bias)[0].permute(0, 3, 1, 2)  # (heads, A, Hq0, Wq0)
    bias = _resize(na_bias, query_size) + _resize(rowcol, query_size)
    bias = _resize_agents(bias.reshape(heads, num, -1), grid, agents)
    if ca_bias is not None:
        cls = _resize_agents(ca_bias[0].transpose(1, 2), grid, agents)
        bias = torch.cat([cls, bias], dim=-1)
    return bias.transpose(1, 2).unsqueeze(0)


def pool_agent_tokens(q: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Agent tokens: adaptive average pool of the (patch) queries on their grid.

    Args:
        q: (B, H*W, C) queries in row-major grid order.
        size: (H, W).
        grid: (ga, gb) agent grid.

    Returns:
        (B, ga*gb, C).
    """
    b, n, c = q.shape
    h, w = size
    if n != h * w:
        raise ValueError(f"pool_agent_tokens: {n} tokens do not form a {h}x{w} grid")
    maps = q.transpose(1, 2).reshape(b, c, h, w)
    return F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)
