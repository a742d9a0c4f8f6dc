"""zoo.ops: the shared attention operators.

Every model computes attention through these functions; each has a plain-PyTorch ``reference`` backend (the
definition) and optional fast backends chosen by :mod:`zoo.ops._dispatch`. See ``available_backends(op_name)``.
"""
from ._dispatch import BackendUnavailable, available_backends, dispatch, register_backend, registered_backends

from .agent import agent_attention, pooled_agent_attention  # noqa: F401
from .agent_bias import agent_bias_maps  # noqa: F401
from .outlook import outlook_attention  # noqa: F401
from .routing import routing_attention  # noqa: F401
from .triton import routing as _routing_triton  # noqa: F401  (registers the triton backend of routing_attention)
from .triton import agent as _agent_triton  # noqa: F401  (registers the triton backend of agent_attention)
from .window import window_attention  # noqa: F401
from .triton import window as _window_triton  # noqa: F401  (registers the triton backend of window_attention)
from .cross import cross_attention  # noqa: F401
from .downsampled import downsampled_attention  # noqa: F401
from ._qkv import split_qkv  # noqa: F401
from .triton import short_keys as _short_keys_triton  # noqa: F401  (triton backends of downsampled, cross attention)
from .masked import masked_attention, structured_mask  # noqa: F401
from .neighborhood import neighborhood_attention, neighborhood_mask  # noqa: F401
from .triton import neighborhood as _neighborhood_triton  # noqa: F401  (registers its triton backend)
from .ms_deform import ms_deform_attn  # noqa: F401
from .layer_norm import LayerNorm, add_layer_norm, layer_norm  # noqa: F401
from .mlp import Mlp, SequentialMlp, linear_gelu, mlp  # noqa: F401
from .linear import linear, linears_as_op  # noqa: F401
from .depthwise_conv import depthwise_conv  # noqa: F401
from .autocast_cache import AutocastCachedConv2d, AutocastCachedLinear, cache_autocast_casts  # noqa: F401
from .autocast_cache import one_cast_per_forward  # noqa: F401
from ._cache import clear_parameter_caches  # noqa: F401
from .patch_conv import PatchConv2d, as_patch_conv  # noqa: F401
from .space_to_depth import SpaceToDepthConv2d, as_space_to_depth_conv  # noqa: F401

__all__ = ["available_backends", "registered_backends", "register_backend", "dispatch", "BackendUnavailable",
           "agent_attention", "pooled_agent_attention", "agent_bias_maps", "outlook_attention", "routing_attention",
           "window_attention",
           "cross_attention", "downsampled_attention", "split_qkv",
           "masked_attention", "structured_mask", "neighborhood_attention",
           "neighborhood_mask", "ms_deform_attn", "layer_norm", "add_layer_norm", "LayerNorm", "mlp", "Mlp",
           "SequentialMlp", "linear_gelu", "linear", "linears_as_op", "depthwise_conv",
           "AutocastCachedLinear", "AutocastCachedConv2d", "cache_autocast_casts", "one_cast_per_forward",
           "clear_parameter_caches",
           "PatchConv2d", "as_patch_conv", "SpaceToDepthConv2d", "as_space_to_depth_conv"]
