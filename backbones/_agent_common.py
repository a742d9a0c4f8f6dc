"""Pieces shared by the Agent Attention backbones (Agent-DeiT, Agent-PVT, Agent-Swin, Agent-CSwin).

* The ``agent_attention`` family and its converter are registered once, here. Each model file adds its official
  class names to :data:`OFFICIAL_BUILDERS` with :func:`register_official_builder` (and, only if its keys differ from
  the official ones, a key map with :func:`register_key_map`).
* The agent position biases. Every official AgentAttention owns parameters with these names (zoo shapes):

  ======== ============================== ============================================
  name     shape                          role
  ======== ============================== ============================================
  an_bias  (heads, A, 7, 7)               agent->key bias, bilinearly resized to the key grid
  ah_bias  (heads, A, Hk, 1)              agent->key row bias
  aw_bias  (heads, A, 1, Wk)              agent->key column bias
  na_bias  (heads, A, 7, 7)               query->agent bias, resized to the query grid
  ha_bias  (heads, Hq, 1, A)              query->agent row bias
  wa_bias  (heads, 1, Wq, A)              query->agent column bias
  ac_bias  (1, heads, A, 1)               agent->cls-key bias (DeiT only)
  ca_bias  (1, heads, 1, A)               cls-query->agent bias (DeiT only)
  ======== ============================== ============================================

  The official row/column biases carry a leading singleton dim, (1, heads, ...); the zoo drops it because
  ``nn.Module.to(memory_format=torch.channels_last)`` rejects 5-D parameters. The family key map, the converter's
  ``fit_to_model`` and a load_state_dict pre-hook squeeze official tensors, so official checkpoints load unchanged.

  ``Hk, Wk, Hq, Wq`` are fixed at construction (the ImageNet resolution). At another feature size the row/column
  biases are bilinearly interpolated to it, as the official detection/segmentation backbones do; at the
  construction size this reduces exactly to the classification code. :func:`zoo.ops.agent_bias.agent_bias_maps`
  builds the additive biases that :func:`zoo.ops.agent_attention` takes (its reference backend is
  :func:`agent_key_bias` and :func:`agent_query_bias`); :func:`agent_biases` returns both for a module, cached
  between no-grad forwards (see :func:`zoo.ops.clear_parameter_caches`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_

from zoo.convert import FamilyConverter, register_converter
from zoo.ops._amp import autocast_dtype
from zoo.ops._cache import derived_cache
from zoo.ops.agent import pool_agent_tokens
from zoo.ops.agent_bias import agent_bias_maps, agent_grid, agent_key_bias, agent_query_bias, resize_bilinear
from zoo.registry import register_family

__all__ = ["FAMILY", "AGENT_BIAS_NAMES", "OFFICIAL_BUILDERS", "agent_cfg", "register_official_builder",
           "register_key_map", "init_agent_biases", "squeeze_official_biases", "resize_bilinear", "agent_biases",
           "agent_key_bias", "agent_query_bias", "pool_agent_tokens", "agent_grid", "as_int_list", "to_2tuple"]

FAMILY = "agent_attention"
# The official repository has no LICENSE file (its Swin/timm-derived files carry MIT/Apache headers).
LICENSE = "unknown"
PAPER = "Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024)"
PAPER_URL = "https://arxiv.org/abs/2312.08874"
CODE_URL = "https://github.com/LeapLabTHU/Agent-Attention"
_TSINGHUA = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"


def agent_cfg(file_id: str, first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields of an official Agent-Attention checkpoint on Tsinghua Cloud.

    The official evaluation of every family (its ``data/build.py``): a square resize to ``int(256 / 224 * size)``,
    then a centre crop (timm's ``'squash'`` mode, ``crop_pct`` 0.875), bicubic, ImageNet statistics; configs with
    ``TEST.CROP False`` resize straight to the size (pass ``crop_pct=1.0``).

    Args:
        file_id: the checkpoint's Tsinghua Cloud share id.
        first_conv: the stem convolution's module name.
        kwargs: fields that differ from the 224-pixel defaults (``input_size``, ``pool_size``, ``crop_pct``).
    """
    return dict(dict(url=_TSINGHUA.format(file_id), num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                     crop_pct=0.875, crop_mode="squash", interpolation="bicubic", fixed_input_size=False,
                     mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv=first_conv, classifier="head",
                     license=LICENSE, paper_ids="arXiv:2312.08874", paper_name=PAPER, origin_url=CODE_URL), **kwargs)

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
    return squeeze_official_biases(state_dict)


def _fit_to_model(state_dict: StateDict, model: nn.Module) -> StateDict:
    # zoo.convert skips the key map when the keys already match the model's, which official agent checkpoints
    # always do (only the row/column bias shapes differ), so the layout change is applied here as well.
    return squeeze_official_biases(state_dict)


_CONVERTER = FamilyConverter(key_map=_key_map, build_official=_build_official, official_classes=(),
                             fit_to_model=_fit_to_model)
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


# ----------------------------------------------------------------------------------------------------------------
# Agent position biases.

#: Parameters stored without the official leading singleton dim (5-D parameters break ``model.to(channels_last)``).
_ROWCOL_BIASES = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")
#: Every agent position-bias parameter name (models keep them out of weight decay).
AGENT_BIAS_NAMES = ("an_bias", "na_bias", *_ROWCOL_BIASES, "ac_bias", "ca_bias")


def init_agent_biases(module: nn.Module, num_heads: int, agent_num: int, key_size: tuple[int, int],
                      query_size: tuple[int, int], cls_token: bool = False, std: float = 0.02) -> None:
    """Create the agent bias parameters on ``module`` (official names; shapes in the module docstring).

    Also registers a load_state_dict pre-hook so that official (5-D row/column bias) state dicts load directly.

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
        "ah_bias": (num_heads, agent_num, hk, 1),
        "aw_bias": (num_heads, agent_num, 1, wk),
        "ha_bias": (num_heads, hq, 1, agent_num),
        "wa_bias": (num_heads, 1, wq, agent_num),
    }
    if cls_token:
        shapes.update(ac_bias=(1, num_heads, agent_num, 1), ca_bias=(1, num_heads, 1, agent_num))
    for name, shape in shapes.items():
        param = nn.Parameter(torch.zeros(shape))
        trunc_normal_(param, std=std)
        module.register_parameter(name, param)
    module.register_load_state_dict_pre_hook(_load_official_layout)


def squeeze_official_biases(state_dict: StateDict) -> StateDict:
    """Official 5-D ``(1, ...)`` row/column agent biases -> the zoo's 4-D layout; other entries unchanged.

    Idempotent: zoo (already 4-D) state dicts pass through as they are.
    """
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in _ROWCOL_BIASES and value.ndim == 5 and value.shape[0] == 1:
            out[key] = value[0]
    return out


def _load_official_layout(module: nn.Module, state_dict: StateDict, prefix: str, *_: Any) -> None:
    # load_state_dict hands hooks its own copy of the dict, so rewriting entries here leaves the caller's intact.
    for name in _ROWCOL_BIASES:
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.ndim == 5 and value.shape[0] == 1:
            state_dict[prefix + name] = value[0]


def _build_biases(module: nn.Module, key_size: tuple[int, int], query_size: tuple[int, int],
                  agents: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    params = module._parameters
    return agent_bias_maps(params["an_bias"], params["ah_bias"], params["aw_bias"], params["na_bias"],
                           params["ha_bias"], params["wa_bias"], key_size, query_size, ac_bias=params.get("ac_bias"),
                           ca_bias=params.get("ca_bias"), agents=agents)


def _bias_params(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The module's agent-bias parameters, straight from its parameter dict (``nn.Module.__getattr__`` would cost
    about as much as the cache check they serve)."""
    return tuple(p for p in map(module._parameters.get, AGENT_BIAS_NAMES) if p is not None)


def agent_biases(module: nn.Module, key_size: tuple[int, int], query_size: tuple[int, int],
                 agents: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(agent_bias, query_bias) of an attention module made by :func:`init_agent_biases`.

    See :func:`agent_key_bias` and :func:`agent_query_bias`: returns (1, heads, A', [1 +] Hk * Wk) and
    (1, heads, [1 +] Hq * Wq, A'). Without autograd (no_grad / inference_mode, not while compiling) the result is
    cached on the module per (key_size, query_size, agents, autocast dtype), already in the autocast compute dtype
    (while compiling without autograd, built in the graph and cast to that dtype likewise),
    and reused while the bias parameters are unchanged. "Unchanged" is read from each parameter's version counter
    and storage and from the process's optimizer-step count (:func:`zoo.ops._cache.optimizer_steps`); a write that
    bumps no version counter outside an optimizer step (``p.data.mul_(...)``, ``torch._foreach_lerp_`` on CUDA)
    needs a :func:`zoo.ops.clear_parameter_caches` call on the model.
    """
    key_size, query_size = tuple(key_size), tuple(query_size)
    agents = tuple(agents) if agents is not None else None
    if torch.is_grad_enabled():
        return _build_biases(module, key_size, query_size, agents)
    if torch.compiler.is_compiling():
        # the graph builds them each call; cast as the eager cache does, so that compiled and eager inference feed
        # the attention the same biases (a fused kernel reads any dtype and would otherwise read float32 ones)
        biases = _build_biases(module, key_size, query_size, agents)
        return _in_dtype(biases, autocast_dtype(biases[0].device.type))
    entries = derived_cache(module, _bias_params(module))
    if entries is None:
        return _build_biases(module, key_size, query_size, agents)
    # Under autocast the attention casts float32 biases to the compute dtype on every call; cache that cast too.
    compute = autocast_dtype(module._parameters["an_bias"].device.type)  # the biases' device
    key = (key_size, query_size, agents, compute)
    if key not in entries:
        biases = _build_biases(module, key_size, query_size, agents)
        entries[key] = _in_dtype(biases, compute)
    return entries[key]


def _in_dtype(biases: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """The biases cast to ``dtype`` (the autocast compute dtype), or as they are where it is None."""
    return biases if dtype is None else tuple(b.to(dtype) for b in biases)
