"""Backend dispatch for the attention operators.

Each op (``routing_attention``, ``outlook_attention``, ...) has a ``reference`` backend in plain PyTorch, the
definition every other backend is tested against, and any number of fast backends. A backend registers a
``supports(*args, **kwargs) -> str | None`` check that returns why it cannot serve an input (dtype, device, shape,
missing library) or None. Dispatch order:

1. the ``backend=`` argument of the call, else
2. ``ZOO_OPS_BACKEND=op:backend,op2:backend2`` (read at every call, so tests can set it), else
3. the highest-priority backend whose check passes and whose ``prefer`` rule (a measured speed rule, e.g. "SDPA's
   bias gradient is slower than the reference above 512 keys") does not point to a lower-priority backend.

A requested backend that cannot serve an input warns once with its reason and dispatch falls back to automatic
choice: wrong numbers are never returned silently.

Ops whose argument checks and backend rules read only metadata (shapes, strides, dtypes, devices, requires_grad,
scalar arguments), not tensor values, pass :func:`call_key` of their raw arguments: a call with the key of an earlier
one skips the checks (:func:`validated`) and reuses its choice. Eager models are bound by host time on a fast GPU
(one attention call's checks cost as much host time as its kernel takes on an H200), and a model calls each layer's
op with the same metadata every step.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ._cache import functorch_transforming

__all__ = ["Backend", "register_backend", "available_backends", "registered_backends", "select_backend", "dispatch",
           "BackendUnavailable", "call_key", "validated", "planned"]


class BackendUnavailable(RuntimeError):
    """No registered backend of an op can serve the given input."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op."""
    op: str
    name: str
    fn: Callable[..., Any]
    supports: Callable[..., str | None]
    priority: int
    available: Callable[[], str | None]
    prefer: Callable[..., str | None] = None  # type: ignore[assignment]


def _always(*_: Any, **__: Any) -> None:
    return None


_REGISTRY: dict[str, dict[str, Backend]] = {}
_WARNED: set[tuple[str, str, str]] = set()


def register_backend(op: str, name: str, fn: Callable[..., Any], *, supports: Callable[..., str | None] | None = None,
                     priority: int = 0, available: Callable[[], str | None] | None = None,
                     prefer: Callable[..., str | None] | None = None) -> Backend:
    """Register ``fn`` as backend ``name`` of ``op``.

    Args:
        supports: per-call check with the op's arguments; returns the reason it cannot serve them, or None.
        priority: higher is tried first by automatic choice (``reference`` uses 0).
        available: environment check (library importable, device present); returns a reason or None.
        prefer: per-call speed rule for automatic choice only, with the op's arguments: returns why another backend
            is faster for them (a measured fact), or None. An explicit request ignores it.
    """
    backend = Backend(op, name, fn, supports or _always, priority, available or _always, prefer or _always)
    _REGISTRY.setdefault(op, {})[name] = backend
    return backend


# op -> (its registry entry, its backends highest priority first): dispatch runs on every attention call, so the
# order is sorted once per registry state rather than per call
_ORDER: dict[str, tuple[dict[str, Backend], tuple[Backend, ...], list[Backend]]] = {}

_SCALARS = frozenset((bool, int, float, str, type(None), torch.dtype))  # values that key a call as they are
# op -> {(backend, ZOO_OPS_BACKEND, grad mode, call key): chosen backend} and op -> {call keys whose checks passed};
# bounded (a model has a few dozen distinct calls; shapes that change every step must not grow them without end)
_CHOICES: dict[str, dict[tuple, Backend]] = {}
_VALID: dict[str, dict[tuple, bool]] = {}
_MEMO_LIMIT = 512


def _highest_first(backends: Iterable[Backend]) -> list[Backend]:
    """The backends by priority, highest first, equal ones in registration order. An insertion sort: torch 2.5's
    dynamo cannot trace ``sorted`` with a key (traced calls order the registry on every trace)."""
    ordered: list[Backend] = []
    for backend in backends:
        at = 0
        while at < len(ordered) and ordered[at].priority >= backend.priority:
            at += 1
        ordered.insert(at, backend)
    return ordered


def _by_priority(op: str) -> list[Backend]:
    backends = _REGISTRY[op]
    if torch.compiler.is_compiling():
        # dynamo replays a write to this module's caches after the traced call, which fails the guard it took on
        # them and recompiles the whole model on its second call: traced code sorts and writes nothing
        return _highest_first(backends.values())
    cached = _ORDER.get(op)
    values = tuple(backends.values())
    if cached is None or cached[0] is not backends or cached[1] != values:
        cached = (backends, values, _highest_first(values))
        _ORDER[op] = cached
        _CHOICES.pop(op, None)  # choices remembered by dispatch were made among the old backends
        _PLANS.pop(op, None)
    return cached[2]


def registered_backends(op: str) -> list[str]:
    """Every backend registered for ``op``, highest priority first."""
    _check_op(op)
    return [b.name for b in _by_priority(op)]


def available_backends(op: str) -> list[str]:
    """Backends of ``op`` whose environment requirements are met here, highest priority first."""
    _check_op(op)
    return [b.name for b in _by_priority(op) if b.available() is None]


def _check_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"op={op!r} is not a zoo op; known ops: {sorted(_REGISTRY)}")


def _env_override_raw(_data=getattr(os.environ, "_data", None), _key=os.environ.encodekey("ZOO_OPS_BACKEND")):
    """``ZOO_OPS_BACKEND`` as ``os.environ`` stores it (encoded), for the memo key of every eager op call:
    ``os.environ.get`` encodes the name and decodes the value each time (about 1.5 us of host time a call, which
    eager inference waits for). ``os.environ`` keeps ``_data`` in step with every change made through it."""
    if _data is None:  # not CPython's os.environ
        return os.environ.get("ZOO_OPS_BACKEND")
    return _data.get(_key)


def _env_choice(op: str) -> str | None:
    return _env_choices(os.environ.get("ZOO_OPS_BACKEND", "")).get(op)


def _env_choices(spec: str) -> dict[str, str]:
    """``ZOO_OPS_BACKEND``'s ``op:backend`` items as a dict; a malformed item or an unknown op is an error (a typo
    silently ignored would leave the user measuring the backend they meant to replace)."""
    choices = {}
    # (a list, not filter(None, ...): torch 2.5's dynamo cannot trace that)
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, sep, backend = (part.strip() for part in item.partition(":"))
        if not sep or not name or not backend:
            raise ValueError(f"ZOO_OPS_BACKEND={spec!r}: item {item!r} is not 'op:backend' "
                             "(e.g. ZOO_OPS_BACKEND=routing_attention:reference,window_attention:sdpa)")
        if name not in _REGISTRY:
            raise ValueError(f"ZOO_OPS_BACKEND={spec!r}: {name!r} is not a zoo op; known ops: {sorted(_REGISTRY)}")
        choices[name] = backend
    return choices


def _reason(backend: Backend, args: tuple, kwargs: dict) -> str | None:
    return backend.available() or backend.supports(*args, **kwargs)


def select_backend(op: str, backend: str | None, *args: Any, **kwargs: Any) -> Backend:
    """The backend that will run ``op`` on these arguments (see the module docstring for the order)."""
    _check_op(op)
    backends = _REGISTRY[op]
    wanted = backend or _env_choice(op)
    if wanted:
        if wanted not in backends:
            raise ValueError(f"backend={wanted!r} is not a backend of {op}; registered: {registered_backends(op)}")
        reason = _reason(backends[wanted], args, kwargs)
        if reason is None:
            return backends[wanted]
        key = (op, wanted, reason)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"{op}: backend {wanted!r} cannot serve this input ({reason}); falling back", stacklevel=3)
    reasons, slower = [], None
    for b in _by_priority(op):
        reason = _reason(b, args, kwargs)
        if reason is None:
            if b.prefer(*args, **kwargs) is None:
                return b
            slower = slower or b  # can serve, but a lower-priority backend is faster here
            continue
        reasons.append(f"{b.name}: {reason}")
    if slower is not None:
        return slower
    raise BackendUnavailable(f"no backend of {op} can serve this input: " + "; ".join(reasons))


def call_key(*args: Any) -> tuple | None:
    """Hashable metadata of an op's raw arguments, or None when they cannot be summarised that way.

    A tensor contributes (shape, strides, dtype, device, requires_grad), a scalar (bool, int, float, str, None, a
    ``torch.dtype``) or a tuple of scalars its value.
    Inside ``torch.compile`` tracing there is no key: dynamo traces the checks and the choice once per graph; nor
    for symbolic shapes (``make_fx(tracing_mode="symbolic")``), whose sizes are not values; nor inside a
    ``torch.func`` transform, where the fast backends refuse tensors whose metadata matches an earlier call's.
    """
    if torch.compiler.is_compiling() or functorch_transforming():
        return None
    if _native_call_key is not None:
        return _native_call_key(*args)
    # Flat: each tensor adds five entries, starting with its torch.Size, which no scalar entry is, so the tuple
    # still tells every argument list apart (and saves a tuple a tensor on every call of a hot op).
    items: list[Any] = []
    append = items.append
    for a in args:
        kind = type(a)  # exact types first
        if kind is torch.Tensor or kind is torch.nn.Parameter or isinstance(a, torch.Tensor):
            append(a.shape)
            append(a.stride())
            append(a.dtype)
            append(a.device)
            append(a.requires_grad)
        elif kind in _SCALARS or (kind is tuple and all(type(x) in _SCALARS for x in a)):
            append(a)
        else:
            return None
    key = tuple(items)
    try:
        hash(key)
    except TypeError:  # symbolic sizes (make_fx / export tracing with dynamic shapes) have no stable value
        return None
    return key


# The C++ twin of call_key's body (zoo.ops.triton.cxx_launch's extension, set once it is loaded): the same key but for
# each tensor's metadata, packed as one bytes object, for a fraction of the host time (eager op calls compute a key
# before every launch). None until then, on machines where it is never built (no CUDA launch, no compiler), and with
# ZOO_CXX_KEYS=0.
_native_call_key: Callable[..., tuple | None] | None = None


def use_native_call_key(fn: Callable[..., tuple | None] | None) -> None:
    """Make :func:`call_key` compute keys with ``fn`` (the extension's ``call_key``), or in Python again (None).
    Keys of the two kinds never equal each other, so the remembered choices and checks made under the other are
    missed once and made again, never confused."""
    global _native_call_key
    _native_call_key = fn


def validated(op: str, key: tuple | None) -> bool:
    """Whether a call with this :func:`call_key` already passed the op's argument checks."""
    return key is not None and key in _VALID.get(op, ())


def _remember(table: dict[str, dict], op: str, entry: tuple, value: Any) -> None:
    memo = table.setdefault(op, {})
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo[entry] = value


def dispatch(op: str, backend: str | None, *args: Any, key: tuple | None = None, **kwargs: Any) -> Any:
    """Run ``op`` on the selected backend.

    Args:
        key: the :func:`call_key` of the op's raw arguments, whose checks have passed: the choice is then made once
            per (key, ``backend``, ``ZOO_OPS_BACKEND``, grad mode), and, with call plans on (the default),
            a call that autograd does not record is replayed from its plan (:mod:`zoo.ops.triton.call_plans`) from
            the third time on. Only for ops whose checks, backend rules and backends read metadata, never tensor
            values, and that pass their keyword arguments here in one order.
    """
    if key is None:
        return select_backend(op, backend, *args, **kwargs).fn(*args, **kwargs)
    _by_priority(op)  # a changed registry forgets the remembered choices
    memo_key = (backend, _env_override_raw(), torch.is_grad_enabled(), key)
    chosen = _CHOICES.get(op, {}).get(memo_key)
    if chosen is None:
        chosen = select_backend(op, backend, *args, **kwargs)
        _remember(_VALID, op, key, True)
        wanted = backend or _env_choice(op)
        if not wanted or chosen.name == wanted:  # a fallback is chosen again each call: its warning stays reachable
            _remember(_CHOICES, op, memo_key, chosen)
        return chosen.fn(*args, **kwargs)
    if _plans is not None and not _RECORDING.locked():  # (while a call records, calls run their backends)
        return _planned_call(op, memo_key, chosen.fn, args, kwargs)
    return chosen.fn(*args, **kwargs)


def planned(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, replayed from a call plan (:mod:`zoo.ops.triton.call_plans`) where plans are on.

    For the launch code inside an autograd Function's ``forward`` and ``backward`` (which run without grad): the
    op's own call is never planned in training, since a replay would record no graph, but the body's allocations and
    launches are the same for every call with the same :func:`call_key` of ``args``, and eager training steps wait
    for that Python as eager inference does. ``name`` names the body (one plan table each); ``fn`` must read only
    its arguments' metadata and the CUDA autocast state, allocate, take views and launch through the C++ launcher
    (any other ATen op leaves the call unplanned), and return a tensor or a flat tuple of tensors and None. The
    first call with a key runs ``fn`` (it may compile kernels); the second records; later ones replay. Bodies are
    planned wherever call plans are, unless :func:`use_call_plans` turned them off (``ZOO_TRAINING_PLANS=0`` when the
    extension loads).
    """
    if _plans is None or not _body_plans or _RECORDING.locked():
        return fn(*args)
    key = call_key(*args)
    if key is None:
        return fn(*args)
    if key not in _PLANS.get(name, _NO_PLANS):
        _remember(_PLANS, name, key, 0)
        return fn(*args)
    return _planned_call(name, key, fn, args, {})


def _planned_call(op: str, memo_key: tuple, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """A call's replay from its plan, else ``fn`` (the chosen backend) while recording one, or just ``fn``."""
    plan = _PLANS.get(op, _NO_PLANS).get(memo_key, 0)
    if plan.__class__ is int:  # recordings so far
        if plan < _PLAN_TRIES:
            return _record(op, memo_key, fn, plan, args, kwargs)
    elif not _plans[2]():  # no launch hooks (a profiler's) that a replay would bypass
        try:
            out = plan.replay(*args, *kwargs.values())
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # the driver refused a launch: the backend serves this call from now on
            _PLANS[op][memo_key] = _PLAN_TRIES
            out = None
        if out is not None:
            return out
    return fn(*args, **kwargs)


# Plans of remembered calls (zoo.ops.triton.call_plans): op -> {dispatch memo key: its Plan, or how many recordings
# found none (at _PLAN_TRIES, none is tried again)}. Plans are on once use_call_plans has been given the extension.
_PLANS: dict[str, dict[tuple, Any]] = {}
_NO_PLANS: dict[tuple, Any] = {}
_PLAN_TRIES = 3
_plans: tuple | None = None  # (call_plans, the extension, whether launch hooks are set: a function of nothing)
_body_plans = False  # whether planned() plans autograd Function bodies too (use_call_plans' ``bodies``)
# held while an op call is recorded; calls made meanwhile (the recorded call's own nested ones, other threads') run
# their backends: FastLaunch notes the launches of one recording thread, so a second recording at once (threads
# serving one model) would mix or cut short the first's
_RECORDING = threading.Lock()


def use_call_plans(call_plans: Any | None, ext: Any | None = None, bodies: bool | None = None) -> None:
    """Replay remembered calls from plans made by the module ``call_plans`` (:mod:`zoo.ops.triton.call_plans`)
    with the C++ extension ``ext``; or (None) never again, forgetting every plan. ``bodies``: whether the launch code
    of eager training's autograd Functions is planned too (:func:`planned`); None reads ``ZOO_TRAINING_PLANS``
    (on unless set to "0")."""
    global _plans, _body_plans
    _PLANS.clear()
    _body_plans = os.environ.get("ZOO_TRAINING_PLANS", "1") != "0" if bodies is None else bool(bodies)
    if call_plans is None:
        _plans = None
        return
    from .triton import fast_launch

    _plans = (call_plans, ext, functools.partial(fast_launch._hooked, fast_launch.knobs.runtime))


def forget_plans() -> None:
    """Drop every plan (a backend's launch knobs changed: calls are recorded again)."""
    _PLANS.clear()


def _record(op: str, memo_key: tuple, fn: Callable[..., Any], tries: int, args: tuple, kwargs: dict[str, Any]
            ) -> Any:
    """Run ``fn`` (the chosen backend) while recording the call's plan, and remember the plan or the failed try."""
    call_plans, ext = _plans[0], _plans[1]
    if not call_plans.plannable_call(args, kwargs):
        _remember(_PLANS, op, memo_key, _PLAN_TRIES)
        return fn(*args, **kwargs)
    if not _RECORDING.acquire(blocking=False):  # another thread is recording: not a try of this call's
        return fn(*args, **kwargs)
    try:
        out, plan, retry = call_plans.record(ext, fn, args, kwargs)
    finally:
        _RECORDING.release()
    if isinstance(plan, str):
        plan = tries + 1 if retry else _PLAN_TRIES
    _remember(_PLANS, op, memo_key, plan)
    return out
