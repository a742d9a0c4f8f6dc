"""Per-call constants (masks, index tables) built once per shape and device; the optimizer-step count that caches of
values derived from parameters key on, and the one call that drops all such caches."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["cached_constant", "tracing", "functorch_transforming", "optimizer_steps", "register_parameter_cache",
           "clear_parameter_caches"]

T = TypeVar("T", bound=Callable[..., torch.Tensor])

_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many ``torch.optim`` steps this process has taken (a global step hook counts them).

    Caches of values computed from parameters (autocast's weight copies, the agent biases) key on it besides the
    parameters' version counters, because some in-place kernels leave those counters unchanged: measured on an H200
    with torch 2.11, ``torch.optim.AdamW(fused=True)`` and ``torch._foreach_lerp_`` on CUDA tensors (timm's
    ModelEmaV3 update) do, while the default multi-tensor AdamW bumps them.
    """
    return _OPTIMIZER_STEPS[0]


# Instance attributes of modules that hold values derived from the module's parameters.
_PARAMETER_CACHE_ATTRS: set[str] = set()


def register_parameter_cache(attr: str) -> str:
    """Declare ``attr`` as a module instance attribute caching values computed from that module's parameters, so
    that :func:`clear_parameter_caches` drops it; returns ``attr``."""
    _PARAMETER_CACHE_ATTRS.add(attr)
    return attr


def clear_parameter_caches(model: torch.nn.Module) -> int:
    """Drop every cache of parameter-derived values (autocast's weight copies, the agent biases, Agent-Swin's window
    position biases) in every module of ``model``; returns how many were dropped.

    Needed after a write that neither bumps a version counter nor is an optimizer step: ``p.data`` writes, or
    ``torch._foreach_lerp_`` on CUDA (an EMA update such as timm's ModelEmaV3) that no optimizer step follows.
    """
    return sum(m.__dict__.pop(attr, None) is not None for m in model.modules() for attr in _PARAMETER_CACHE_ATTRS)


def functorch_transforming() -> bool:
    """Whether a ``torch.func`` transform that wraps tensors is running: ``grad``, ``vmap``, ``jvp`` and those built
    on them (``jacrev``, ``hessian``, ...). Functionalization, which AOTAutograd's tracing runs, is not one; nor is
    anything while dynamo traces (it handles the transforms in a graph itself)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    return any(i.key() in _WRAPPING for i in torch._C._functorch.get_interpreter_stack())


_WRAPPING = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp,
             torch._C._functorch.TransformType.Vmap)


def tracing() -> bool:
    """True while ``torch.compile`` traces or a dispatch-mode tracer runs (``make_fx``, ``torch.export``,
    ``FakeTensorMode``, the fake run of a ``triton_op`` body): a cached real tensor must not leak in then."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def cached_constant(maxsize: int = 64) -> Callable[[T], T]:
    """Decorate ``build(*hashable_args) -> Tensor`` so that eager calls reuse the result for equal arguments.

    Building such a constant is several small kernels, each a host-side launch on every call of the op. The
    cached tensor is built outside inference mode (an op may save it for the backward of a later training step);
    inside ``torch.compile`` the builder is traced instead, so the graph holds the computation, not a Python
    cache; so is it under any dispatch-mode tracer (``make_fx``, ``torch.export``, ``FakeTensorMode``), where a cached
    real tensor would leak into the trace and symbolic sizes cannot be hashed. ``cache_clear`` and ``cache_info`` are
    those of :func:`functools.lru_cache`.
    """
    def wrap(build: T) -> T:
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False):
                return build(*args)

        @functools.wraps(build)
        def get(*args):
            if tracing():
                return build(*args)
            return cached(*args)

        get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
        return get  # type: ignore[return-value]

    return wrap
