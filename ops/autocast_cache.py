"""Linear and convolution layers that keep autocast's low-precision copies of their weights between inference calls.

Under ``torch.autocast`` each call of an ``nn.Linear`` or ``nn.Conv2d`` casts its float32 weight and bias to the
autocast dtype: two copy kernels whose launches cost the host about what the layer's own GEMM launch does. Autocast's
own cache keeps such copies only until the outermost autocast region exits, that is for one forward pass in the usual
``with torch.autocast(...): model(x)`` loop. Eager inference of these backbones is bound by the host (an H200
waits for Python), so the layers here keep the copies across calls while the parameters are unchanged (H200, bf16,
eager, one process, the same model with plain layers against these: 8-19% less time per step at batch 128 and at
batch 1 for the Agent, BiFormer and VOLO backbones; the README has the table).

A layer uses its cached copy only when all of these hold, and is exactly its parent class otherwise:

- autocast is on for the weight's device and the weight (and bias) are plain float32 tensors or parameters, not
  views (FSDP's flat-parameter views change every call) nor tensor subclasses (DTensor);
- autograd records nothing for them: grad mode is off, or neither requires grad (a copy cannot route gradients back
  to the parameter; such a call also drops the copy, so training does not keep it alive);
- ``torch.compile`` is not tracing (a traced forward casts once per call, below).

A copy is reused while the parameter objects, their storage addresses, their version counters (bumped by in-place
updates: ``load_state_dict``, ``nn.init`` functions, ``p.add_(...)``), the autocast dtype and the count of optimizer
steps taken in the process are unchanged; ``.to()``, ``.cuda()``, ``.half()`` and the like drop it. Every
``torch.optim`` step invalidates every copy (a global step hook counts them), because some kernels write parameters
without bumping their version counters (H200, torch 2.11: fused AdamW, and ``torch._foreach_lerp_`` on CUDA). Writes
that bump no version counter outside an optimizer step, such as ``p.data.mul_(2)`` or an EMA update by
``torch._foreach_lerp_`` (timm's ModelEmaV3) on CUDA, need a :func:`zoo.ops.clear_parameter_caches` call. Outputs
are bitwise those of the parent class: the copy is the cast autocast makes. The copies cost the autocast dtype's
share of the layers' weights (half of their float32 size) while cached.

Training calls cast too, but once a forward: :func:`cache_autocast_casts` hooks the model's own forward so that in a
training forward the first of its layers to run casts the trainable weights and biases of all of them in one
multi-tensor copy (one autograd node, whose backward casts the gradients back in one more launch), each layer uses
its copy, and the copies are dropped when the forward returns (so nothing that wrote the parameters between steps is
missed). Not under data-parallel training (DDP starts each gradient's communication as it is accumulated; one node
for all would hold them to the end of the backward).

The zoo models' classes open that scope in their ``forward`` and ``forward_intermediates`` (timm's ``features_only``
path, a detector's) themselves (:func:`one_cast_per_forward`), not by hooks, and there it also serves
``torch.compile`` (training and inference): the model's traced forward casts all its
autocast-cached layers' float32 weights and biases in one multi-tensor copy, which inductor lowers to one foreach
kernel, and its backward to one more. Inductor leaves each layer's own casts as two kernels forward and two backward,
because the GEMMs that read the copies are library calls it cannot fuse them into (Agent-PVT-T's compiled training
step on an H200: 146 cast kernels, 0.21 ms, and as many nodes of the CUDA graph for the host to launch). Hooks could
not do that: ``torch.compile(model)`` traces a model's own hooks as frames of their own, so the cast would be a graph
of its own. Not under data-parallel training, for the reason above.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet
from torch import nn
from torch._utils import _unflatten_dense_tensors

from ._amp import autocast_dtype
from ._cache import functorch_transforming, optimizer_steps, register_parameter_cache

__all__ = ["AutocastCachedLinear", "AutocastCachedConv2d", "autocast_weights", "cache_autocast_casts",
           "one_cast_per_forward", "no_forward_casts"]

# instance attribute: (weight, bias, state, weight copy, bias copy)
_ATTR = register_parameter_cache("_zoo_autocast_copies")
_PLAIN = (nn.Parameter, torch.Tensor)


def _plain_float32(t: torch.Tensor | None) -> bool:
    return t is None or (type(t) in _PLAIN and t.dtype == torch.float32 and not t._is_view())


def _state(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, copy_weight: Callable | None
           ) -> tuple:
    """What a cached copy was made from: (the weight's device type, its storage address and version, the bias's (0, 0
    without one), the autocast dtype, the optimizer steps taken, ``copy_weight``), the layout :func:`_unchanged`
    reads."""
    bias_state = (0, 0) if bias is None else (bias.data_ptr(), bias._version)
    return (weight.device.type, weight.data_ptr(), weight._version, *bias_state, dtype, optimizer_steps(),
            copy_weight)


def _unchanged(state: tuple, weight: torch.Tensor, bias: torch.Tensor | None, copy_weight: Callable | None) -> bool:
    """Whether :func:`_state` would give ``state`` again for these parameters now, read field by field: it runs
    before every inference call of every cached layer (the weight's device type is the recorded one, since a
    weight moved to another device has another storage address)."""
    device_type = state[0]
    return (state[7] is copy_weight and state[6] == optimizer_steps() and weight._version == state[2]
            and weight.data_ptr() == state[1]
            and (bias is None or (bias._version == state[4] and bias.data_ptr() == state[3]))
            and torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == state[5])


def autocast_weights(module: nn.Module, copy_weight: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of ``module`` as its next autocast op would consume them: the cached low-precision copies
    when the module docstring's rules allow, else the parameters themselves (autocast then casts them as usual).

    Args:
        module: a layer with ``weight`` and ``bias`` attributes (``bias`` may be None).
        copy_weight: makes the weight's copy from (weight, dtype) in the layout its consumer reads best (such as
            :func:`zoo.ops.depthwise_conv.channels_innermost`); default ``weight.to(dtype)``. The same values.

    Returns:
        (weight, bias), each of the parameter's shape, in the autocast dtype when cached, else the parameters.
    """
    entry = module.__dict__.get(_ATTR)
    if entry is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # the hot path of eager inference: the parameters the copies were made of (they passed the checks below
        # then), read from the parameter dict (``module.weight`` goes through nn.Module.__getattr__, slower)
        params = module._parameters
        weight, bias = params.get("weight"), params.get("bias")
        if entry[0] is weight and entry[1] is bias and _unchanged(entry[2], weight, bias, copy_weight):
            return entry[3], entry[4]
    if torch.compiler.is_compiling():
        copies = _traced_copies(module)
        return copies if copies is not None else (module.weight, module.bias)
    weight, bias = module.weight, module.bias
    if not (_plain_float32(weight) and _plain_float32(bias)):
        return weight, bias  # (symbolic tracers' proxies are not tensors either)
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        module.__dict__.pop(_ATTR, None)
        copies = _forward_cast(module, weight, bias)
        return (weight, bias) if copies is None else copies
    dtype = autocast_dtype(weight.device.type)
    if dtype is None:
        return weight, bias
    try:
        state = _state(weight, bias, dtype, copy_weight)
    except RuntimeError:  # no storage: functorch's wrapped tensors (vmap over stacked parameters)
        return weight, bias
    if entry is not None and entry[0] is weight and entry[1] is bias and entry[2] == state:
        return entry[3], entry[4]
    # outside inference mode: a copy made there could not be saved for a later backward through frozen layers
    with torch.inference_mode(False), torch.no_grad():
        copies = (weight.to(dtype) if copy_weight is None else copy_weight(weight, dtype),
                  None if bias is None else bias.to(dtype))
    module.__dict__[_ATTR] = (weight, bias, state, *copies)
    return copies


# ----------------------------------------------------------------------------------------------------------------
# training forwards: one multi-tensor cast of a model's trainable layer weights


class _CastTogether(torch.autograd.Function):
    """Low-precision copies of float32 tensors by one multi-tensor copy, one autograd node: the backward casts
    their gradients back to float32 the same way. The values are those of ``t.to(dtype)`` and of autocast's
    backward cast (``grad.to(torch.float32)``).

    In eager calls the copies, and the gradients, of the contiguous tensors are views of one buffer each way
    (:func:`_views_of_one_buffer`): an allocation each costs the host several microseconds, and a model casts some
    hundred tensors a step. The parameters' gradients are then views of one float32 buffer, which lives while any of
    them does."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.compiler.is_compiling():
            targets = [torch.empty_like(t, dtype=dtype) for t in tensors]
        else:
            targets = _views_of_one_buffer(tensors, dtype)
        copies = _foreach_copy(targets, list(tensors))
        ctx.like = [(t.shape, t.stride(), t.dtype) for t in tensors]
        ctx.set_materialize_grads(False)  # a copy no loss reached gets None, as its parameter would
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        out: list[torch.Tensor | None] = [None] * len(grads)
        together: list[int] = []
        compiling = torch.compiler.is_compiling()
        for i, (grad, (shape, stride, dtype)) in enumerate(zip(grads, ctx.like)):
            if grad is None:
                continue
            # eager: the multi-tensor kernel takes equal layouts only; traced: the functional op takes any (and
            # torch 2.5's dynamo refuses to read a stride in a backward)
            if compiling or grad.stride() == stride:
                together.append(i)
            else:
                out[i] = torch.empty_strided(shape, stride, dtype=dtype, device=grad.device).copy_(grad)
        if together:
            sources = [grads[i] for i in together]
            dtypes = {ctx.like[i][2] for i in together}
            if compiling or len(dtypes) > 1:
                targets = [torch.empty_strided(*ctx.like[i][:2], dtype=ctx.like[i][2], device=grads[i].device)
                           for i in together]
            else:  # (the gradients share the parameters' layouts here: contiguous where those are)
                targets = _views_of_one_buffer(sources, dtypes.pop())
            for i, t in zip(together, _foreach_copy(targets, sources)):
                out[i] = t
        return (None, *out)


def _views_of_one_buffer(like: list[torch.Tensor] | tuple[torch.Tensor, ...], dtype: torch.dtype
                         ) -> list[torch.Tensor]:
    """Uninitialized ``dtype`` tensors shaped and strided as ``like``'s: the contiguous ones' views of one new
    buffer, in order, the others each allocated (``torch.empty_like``)."""
    pooled = [t.is_contiguous() for t in like]
    kept = [t for t, p in zip(like, pooled) if p]
    views = iter(())
    if kept:
        flat = torch.empty(sum(t.numel() for t in kept), dtype=dtype, device=kept[0].device)
        views = iter(_unflatten_dense_tensors(flat, kept))
    return [next(views) if p else torch.empty_like(t, dtype=dtype) for t, p in zip(like, pooled)]


def _foreach_copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> list[torch.Tensor]:
    """``targets`` with ``sources`` copied in (cast to the targets' dtypes) by one multi-tensor copy; returns them."""
    if torch.compiler.is_compiling():
        # the functional op: torch 2.11's dynamo took the outputs of an autograd.Function's forward that were
        # written in place for constants, so no gradient reached the parameters (H200: all zero)
        return list(torch.ops.aten._foreach_copy.default(targets, sources))
    torch._foreach_copy_(targets, sources)
    return targets


_SCOPES = threading.local()  # .stack: the _ForwardCasts of the zoo models whose forward is running, innermost last


class _ForwardCasts:
    """One training forward of one model: on the first request, the low-precision copies of every trainable
    ``AutocastCached*`` layer's weight and bias on the requesting device, made by :class:`_CastTogether`."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.copies: dict[int, tuple] | None = None  # id(layer) -> (weight, bias, dtype, weight copy, bias copy)

    def get(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        if self.copies is None:
            self.copies = self._cast(weight.device, dtype)
        entry = self.copies.get(id(module))
        if entry is None or entry[0] is not weight or entry[1] is not bias or entry[2] != dtype:
            return None
        return entry[3], entry[4]

    def _cast(self, device: torch.device, dtype: torch.dtype) -> dict[int, tuple]:
        return _cast_layers(self.root, dtype, lambda t: _plain_float32(t) and t.requires_grad and t.device == device,
                            _cached_layers(self.root))


# Bumped whenever any module registers a submodule (``nn.Module.__setattr__``, ``add_module``): the eager training
# forward's list of a model's autocast-cached layers is walked again after that. A change no hook sees
# (``ModuleList.insert``, ``del model.layer``) costs speed, not correctness: a layer missing from the list casts
# its own weights, and a stale one's copies are never asked for.
_STRUCTURE = [0]
_LAYERS_ATTR = "_zoo_cast_layers"  # root instance attribute: (_STRUCTURE count, its autocast-cached layers)


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _STRUCTURE[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _cached_layers(root: nn.Module) -> list[nn.Module]:
    """``root``'s autocast-cached layers in module order, walked once per change of any module tree: a training
    forward of a model otherwise walks all its modules (VOLO-D1: 332, about 0.7 ms of host time on the CPU machine)
    for the 93 layers it casts."""
    entry = root.__dict__.get(_LAYERS_ATTR)
    if entry is None or entry[0] != _STRUCTURE[0]:
        layers = [m for m in root.modules() if isinstance(m, _DropsCopies)]
        entry = root.__dict__[_LAYERS_ATTR] = (_STRUCTURE[0], layers)
    return entry[1]


def _weight_and_bias(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(layer.weight, layer.bias)``, from the parameter dict where both are there (``nn.Module.__getattr__`` costs
    several times more host time; a parametrized weight is a property and is read as one)."""
    params = layer._parameters
    if "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    return layer.weight, layer.bias


def _cast_layers(root: nn.Module, dtype: torch.dtype, takes: Callable[[torch.Tensor], bool],
                 candidates: list[nn.Module] | None = None) -> dict[int, tuple]:
    """``id(layer) -> (weight, bias, dtype, weight copy, bias copy)`` for every autocast-cached layer of ``root``
    whose weight and bias (where it has one) ``takes`` accepts, all cast to ``dtype`` by one :class:`_CastTogether`.
    ``candidates``: those layers as :func:`_cached_layers` lists them (eager calls; traced ones walk the modules)."""
    layers, tensors = [], []
    for layer in root.modules() if candidates is None else candidates:
        if not isinstance(layer, _DropsCopies):
            continue
        weight, bias = (layer.weight, layer.bias) if candidates is None else _weight_and_bias(layer)
        if all(t is None or takes(t) for t in (weight, bias)):
            layers.append((layer, weight, bias))
            tensors += [weight] if bias is None else [weight, bias]
    if not tensors:
        return {}
    copies = iter(_CastTogether.apply(dtype, *tensors))
    return {id(layer): (weight, bias, dtype, next(copies), None if bias is None else next(copies))
            for layer, weight, bias in layers}


def _forward_cast(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
    """The copies of ``module``'s parameters from the running training forward's one cast, or None (no zoo model's
    forward is running, autocast is off, or the layer is not part of it)."""
    stack = getattr(_SCOPES, "stack", None)
    if not stack or functorch_transforming():
        return None  # (the copies' autograd.Function has no functorch rules: autocast's own casts have)
    dtype = autocast_dtype(weight.device.type)
    if dtype is None:
        return None
    for scope in reversed(stack):
        if scope is _NO_CASTS:
            return None
        copies = None if scope is None else scope.get(module, weight, bias, dtype)
        if copies is not None:
            return copies
    return None


def _scope_stack() -> list:
    """This thread's stack of forward-cast scopes (created on first use)."""
    stack = getattr(_SCOPES, "stack", None)
    if stack is None:
        stack = _SCOPES.stack = []
    return stack


_NO_CASTS = "no casts"  # a scope on the stack that hides the outer ones (no_forward_casts)


@contextlib.contextmanager
def no_forward_casts() -> Iterator[None]:
    """Context manager: layers called inside cast their own weights (autocast's casts) instead of taking the
    running training forward's one cast. A CUDA graph captured inside (:mod:`zoo.ops.block_graphs`) must not read
    copies that the next step's cast will make elsewhere."""
    stack = _scope_stack()
    stack.append(_NO_CASTS)
    try:
        yield
    finally:
        stack.pop()


# Under torch.compile: the copies of the zoo model forwards being traced, innermost last (``_cast_layers``'s entries,
# or None where the forward casts nothing). Dynamo traces one_cast_per_forward's push and pop in the model's frame;
# each traced forward pops what it pushed, so the list is empty between steps.
_TRACED: list[dict[int, tuple] | None] = []


def _traced_casts(root: nn.Module, args: tuple) -> dict[int, tuple] | None:
    """While torch.compile traces ``root``'s forward under autocast: every autocast-cached layer's float32 weight and
    bias on the input's device cast in one multi-tensor copy (:func:`_cast_layers`). Inductor lowers the copy to one
    foreach kernel and its backward's to one more, where each layer's own casts are two kernels forward and two
    backward (Agent-PVT-T's compiled training step: 146 cast kernels, 0.21 ms on an H200)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]  # (torch 2.5's dynamo cannot trace next's default)
    x = tensors[0] if tensors else None
    if x is None or _distributed():
        return None
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return None
    # (the type rather than _plain_float32: dynamo breaks the graph at Tensor._is_view)
    return _cast_layers(root, dtype, lambda t: type(t) in _PLAIN and t.dtype == torch.float32 and t.device == x.device)


def _traced_copies(module: nn.Module) -> tuple | None:
    """``module``'s copies from the innermost traced forward's one cast, or None."""
    for casts in reversed(_TRACED):
        entry = None if casts is None else casts.get(id(module))
        if entry is not None:
            return entry[3], entry[4]
    return None


def _open_forward(root: nn.Module, args: tuple) -> None:
    if torch.compiler.is_compiling():
        return  # (a hook traced as a frame of its own: the cast would be a graph of its own)
    stack = _scope_stack()
    # a scope only where the one cast pays: training forwards, and not under data-parallel training, whose gradient
    # communication starts as each gradient is accumulated (one node would hand them all over at the end)
    active = torch.is_grad_enabled() and not _distributed()
    stack.append(_ForwardCasts(root) if active else None)


def _close_forward(root: nn.Module, args: tuple, output) -> None:
    if torch.compiler.is_compiling():
        return
    stack = getattr(_SCOPES, "stack", None)
    if stack:
        stack.pop()
    # the copies die with the scope: the next forward casts again, whatever changed the parameters meanwhile


_IN_SCOPE = "_zoo_one_cast_per_forward"  # the mark on a wrapped forward (cache_autocast_casts then adds no hooks)


def one_cast_per_forward(forward: Callable) -> Callable:
    """Decorator for a model class's ``forward`` (or another entry point that runs the whole network, such as
    ``forward_intermediates``): each call is the scope of the one cast (module docstring), eager and traced by
    ``torch.compile``; :func:`cache_autocast_casts` then adds no hooks to the model. One decorated method must not
    call another (traced, each would cast the weights).

    Args:
        forward: the ``method(self, x, *args, **kwargs)`` to wrap; ``x``, the first tensor argument, gives the device
            whose autocast dtype the cast takes.

    Returns:
        the wrapped method (``functools.wraps``), marked for :func:`cache_autocast_casts`.
    """
    @functools.wraps(forward)
    def forward_in_scope(self: nn.Module, *args, **kwargs):
        if torch.compiler.is_compiling():
            _TRACED.append(_traced_casts(self, args))
            try:
                return forward(self, *args, **kwargs)
            finally:
                _TRACED.pop()
        _open_forward(self, args)
        try:
            return forward(self, *args, **kwargs)
        finally:
            _close_forward(self, args, None)

    forward_in_scope.__dict__[_IN_SCOPE] = True
    return forward_in_scope


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class _DropsCopies:
    """Drops the cached copies when the module is moved or converted, and when it is pickled or deep-copied."""

    def _apply(self, fn, recurse=True):
        self.__dict__.pop(_ATTR, None)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(_ATTR, None)
        return state


class AutocastCachedLinear(_DropsCopies, nn.Linear):
    """``nn.Linear`` that keeps autocast's copies of its weight and bias between inference calls (module docstring).

    Same constructor, parameters and state-dict keys as ``nn.Linear``; ``x`` (..., in_features) → (..., out_features).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = autocast_weights(self)
        return F.linear(x, weight, bias)


class AutocastCachedConv2d(_DropsCopies, nn.Conv2d):
    """``nn.Conv2d`` that keeps autocast's copies of its weight and bias between inference calls (module docstring).

    Same constructor, parameters and state-dict keys as ``nn.Conv2d``; ``x`` (B, C_in, H, W) → (B, C_out, H', W').
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = autocast_weights(self)
        return self._conv_forward(x, weight, bias)


_SWAPS = {nn.Linear: AutocastCachedLinear, nn.Conv2d: AutocastCachedConv2d}


def cache_autocast_casts(model: nn.Module) -> nn.Module:
    """Turn every submodule of ``model`` whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` into its
    autocast-caching subclass, in place (parameters, hooks and state-dict keys unchanged); returns ``model``.

    Subclasses of those layers (timm's or yours) are left alone: their forward may differ.

    ``model``'s own forward also gets two hooks (none where its class's ``forward`` is wrapped by
    :func:`one_cast_per_forward`, as the zoo models' are, which does the same and more): in a training forward (grad
    mode on, eager, not data-parallel) the first of its autocast-cached layers to run casts the float32 weights and
    biases of all of them that train, on its device, in one multi-tensor copy, and each layer uses its copy; the
    backward casts their gradients back in one more. That replaces two copy kernels and one autograd node a tensor
    (some 250 launches a step in these backbones) by two; the copies are dropped when the forward returns. Values are
    bitwise those of autocast's own casts. Under ``torch.compile`` only a wrapped ``forward`` casts them so (every
    forward, training or not, not data-parallel, on the device of its first tensor argument; module docstring).
    """
    for module in model.modules():
        cached = _SWAPS.get(type(module))
        if cached is not None:
            module.__class__ = cached
    _STRUCTURE[0] += 1  # (no registration hook sees a class swap: the cached layer lists are walked again)
    if not _scoped(model) and not model.__dict__.get(_HOOKED, False):
        model.register_forward_pre_hook(_open_forward)
        model.register_forward_hook(_close_forward, always_call=True)
        model.__dict__[_HOOKED] = True
    return model


_HOOKED = "_zoo_forward_casts"


def _scoped(model: nn.Module) -> bool:
    """Whether every forward of ``model`` runs in a method wrapped by :func:`one_cast_per_forward`: its class's
    ``forward``, or for timm's ``FeatureGetterNet`` (``features_only=True``) the wrapped model's
    ``forward_intermediates``, which its forward calls once (hooks there would be a scope around a scope, and
    torch 2.5's ``torch.export`` traces a hook as a frame of its own, which whole-graph export refuses)."""
    if getattr(type(model).forward, _IN_SCOPE, False):
        return True
    inner = getattr(model, "model", None)
    return (isinstance(model, FeatureGetterNet) and isinstance(inner, nn.Module)
            and getattr(getattr(type(inner), "forward_intermediates", None), _IN_SCOPE, False))
