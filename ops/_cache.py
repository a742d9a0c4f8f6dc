"""Per-call constants (masks, index tables) built once per shape and device; the optimizer-step count that caches of
values derived from parameters key on, a module's cache of such values, and the one call that drops all such
caches."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["cached_constant", "tracing", "functorch_transforming", "optimizer_steps", "register_parameter_cache",
           "clear_parameter_caches", "derived_cache", "keep_cached_constants"]

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
            value = cached(*args)
            if _KEEPERS:
                _KEEPERS[-1].append(value)
            return value

        get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
        return get  # type: ignore[return-value]

    return wrap


# the lists of the CUDA-graph captures running (zoo.ops.block_graphs), innermost last: each cached constant returned
# meanwhile goes into the innermost, so that a graph reading it keeps it alive after the cache evicts it
_KEEPERS: list[list] = []


@contextlib.contextmanager
def keep_cached_constants(into: list) -> Iterator[None]:
    """Context manager: every :func:`cached_constant` value returned inside is appended to ``into`` (a CUDA graph
    captured inside reads those tensors at their addresses on every replay, so its owner holds them)."""
    _KEEPERS.append(into)
    try:
        yield
    finally:
        _KEEPERS.pop()


# (sources, their signature, {key: built value}): a plain instance attribute, not a buffer, so it stays out of
# state_dict and is left behind (then invalidated) by .to()
_DERIVED_ATTR = register_parameter_cache("_zoo_derived_cache")


def _signature(sources: tuple[torch.Tensor, ...]) -> tuple:
    """What identifies these tensors' current values, with the tensors themselves (compared by identity, and held by
    the cache so that no other tensor can take their addresses): in-place updates (load_state_dict, p.add_) bump
    ``_version``; .data swaps move data_ptr; optimizer steps are counted (fused AdamW on CUDA bumps no
    ``_version``)."""
    return (*((t._version, t.data_ptr()) for t in sources), optimizer_steps())


def derived_cache(module: torch.nn.Module, sources: tuple[torch.Tensor, ...], attr: str = _DERIVED_ATTR
                  ) -> dict | None:
    """The module's cache of tensors built from ``sources`` (its parameters or buffers, e.g. the agent biases built
    from their parameters, Agent-Swin's window bias gathered from its table), valid for their current values (a
    fresh, empty dict when they changed), or None when it cannot be known whether they changed: tensors created
    under inference_mode have no version counter and may still change in place inside it, so they are never cached.
    For eager calls without autograd only (the caller checks). Never inside a ``torch.func`` transform or a
    dispatch-mode tracer: their tensors (vmap's batched parameters, fakes) have no storage to key on and must not
    outlive the call. :func:`clear_parameter_caches` drops it. ``attr`` names the instance attribute that holds it
    (one that :func:`register_parameter_cache` returned), for a module with a second cache of other sources."""
    if attr not in _PARAMETER_CACHE_ATTRS:
        raise ValueError(f"derived_cache: attr={attr!r} is not a registered parameter cache "
                         "(use the name register_parameter_cache returns)")
    if functorch_transforming() or tracing():
        return None
    state = module.__dict__.get(attr)
    if (state is not None and len(state[0]) == len(sources) and all(a is b for a, b in zip(state[0], sources))
            and state[1] == _signature(sources)):
        return state[2]
    if any(t.is_inference() for t in sources):
        return None
    module.__dict__[attr] = state = (sources, _signature(sources), {})
    return state[2]
