"""Eager op calls replayed from C++: an op call's allocations and kernel launches, recorded once a call key.

An eager op call on the GPU runs Python for host work that is the same on every call with the same
:func:`~zoo.ops._dispatch.call_key`: the backend's geometry, its output allocations and each launch's argument list.
Only the tensors' data pointers change. On the device machines' hosts that Python cost about 60 us a LayerNorm call,
where the whole op written in C++ took 9.6 (BENCHMARKS.md, seventieth session), and eager models wait for it.

So the dispatch layer records a call the second time it sees its key (the first compiles the kernels) and replays
the third on: :func:`record` runs the chosen backend under a ``TorchDispatchMode`` that sees every ATen op and with
:class:`~zoo.ops.triton.fast_launch.FastLaunch` noting each launch. The call has a plan only when all it did on the
device was allocate (``empty``-like ops), take views and launch kernels through the C++ launcher, and when each
tensor a kernel received is found in an argument or an allocation, and each output in an allocation. The plan (the
allocations' sizes, strides and dtypes; each launch's kernel, grid and parameters, pointers as an argument or
allocation plus a byte offset; the outputs as views of the allocations) goes to the C++ extension
(:mod:`~zoo.ops.triton.cxx_launch`), whose ``replay`` then allocates with ``at::empty_strided``, packs the parameters
and calls ``cuLaunchKernel``. A replay falls back to the backend (and allocates and launches nothing) when the
current CUDA context is not the recorded one, when arguments that shared memory when recorded (q, k and v as views
of one qkv tensor, say) no longer do, or when a pointer's 16-byte alignment, which Triton specialises kernels on,
differs.

Calls under autograd (grad mode on and an argument requiring grad) are never planned: a replay records no graph.
Their autograd nodes' forward and backward bodies run without grad, though, and the launch code in them goes through
:func:`zoo.ops._dispatch.planned`, which records and replays it the same way (one plan table a body), so eager
training steps replay their kernels' allocations and launches too, unless ``ZOO_TRAINING_PLANS=0`` (or
``use_call_plans(..., bodies=False)``) turns that off.
A backend must read nothing but the call key's metadata (the dispatch layer's contract for keyed ops) and the CUDA
autocast state (a replay checks it); changed launch knobs (``use_tiles``) drop every plan. Launch hooks (profilers
such as proton) send calls back through the backend. One call is recorded at a time: FastLaunch notes the launches
of the recording thread, and a call another thread would record meanwhile runs its backend and is recorded later.

Plans are on once the extension loads (the first CUDA kernel compile) unless ``ZOO_CALL_PLANS=0`` is set then;
:func:`zoo.ops._dispatch.use_call_plans` turns them on or off at any time. The whole GPU test suite passes with them
(BENCHMARKS.md, seventy-third session), and with the training bodies' plans too (seventy-fifth session).
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import fast_launch

__all__ = ["Plan", "record", "plannable_call"]

aten = torch.ops.aten
# ATen ops a recorded call may run: allocations (replayed), views (their results are found by their pointers) and
# the dtype arithmetic below
_ALLOCATIONS = frozenset((aten.empty, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.empty_like))
_VIEWS = frozenset((aten.view, aten._unsafe_view, aten.as_strided, aten.slice, aten.select, aten.transpose, aten.t,
                    aten.permute, aten.unsqueeze, aten.squeeze, aten.expand, aten.alias, aten.detach, aten.unbind,
                    aten.split, aten.split_with_sizes, aten.unflatten, aten._reshape_alias, aten.diagonal,
                    aten.narrow, aten.view_as_real, aten.view_as_complex))
# ATen ops on dtypes alone (no tensor work), which dispatch modes see too
_METADATA = frozenset((aten.promote_types, aten.result_type, aten.can_cast))
_INPUT, _BUFFER = 1, 2  # a pointer's source (``Source`` in _launch.cpp)


class _Watch(TorchDispatchMode):
    """Notes the allocations of a recorded call and the first ATen op that is neither an allocation nor a view."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[torch.Tensor] = []
        self.refusal: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in _ALLOCATIONS:
            self.allocations.append(out)
        elif packet not in _VIEWS and packet not in _METADATA and self.refusal is None:
            self.refusal = f"it runs {func}"
        return out


class Plan:
    """A registered plan: ``replay(*arguments)`` returns the op's output, or None where this call must take the
    backend (see the module docstring). Holds the compiled kernels its launches use, and releases its slot in the
    extension when dropped."""

    __slots__ = ("replay", "_index", "_kernels", "_release")

    def __init__(self, ext: Any, index: int, kernels: list[Any]):
        self.replay: Callable[..., Any] = functools.partial(ext.replay, index)
        self._index, self._kernels, self._release = index, kernels, ext.release_plan

    def __del__(self) -> None:
        try:
            self._release(self._index)
        except Exception:  # noqa: BLE001 (at interpreter exit the extension or its module may be gone first)
            pass


def plannable_call(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call may be planned: autograd records nothing for it (grad mode off, or no tensor argument requires
    grad)."""
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def record(ext: Any, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Plan | str, bool]:
    """Run ``fn(*args, **kwargs)`` (the chosen backend) and make its plan.

    Returns:
        (its output, the plan or why the call has none, whether a later call may try again: a launch that was not
        a hit of the C++ launcher may be one next time, as a kernel compiled by this call).
    """
    launches: list[Any] = []
    watch = _Watch()
    fast_launch._recorder = (threading.get_ident(), launches)
    try:
        with watch:
            out = fn(*args, **kwargs)
    finally:
        fast_launch._recorder = None
    if any(launch is None for launch in launches):
        return out, "a launch did not take the C++ launcher", True
    if watch.refusal is not None:
        return out, watch.refusal, False
    try:
        return out, _plan(ext, (*args, *kwargs.values()), out, launches, watch.allocations), False
    except _NoPlan as reason:
        return out, str(reason), False


class _NoPlan(Exception):
    """Why a recorded call cannot be replayed."""


def _plan(ext: Any, inputs: tuple, out: Any, launches: list[tuple], allocations: list[torch.Tensor]) -> Plan:
    """The plan of a recorded call: ``launches`` as FastLaunch noted them, (kernel index, grid, the kernel's
    positional arguments, the compiled kernel, (device function, stream function), the device launched on)."""
    if not launches:
        raise _NoPlan("it launches no kernel")
    device_fn, stream_fn = launches[0][4]
    device = device_fn()
    if any(launch[5] != device for launch in launches):
        raise _NoPlan("it launches on another device than the current one")
    tensors = [(i, t) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    if any(t.numel() == 0 for _, t in tensors) or any(t.numel() == 0 for t in allocations):
        raise _NoPlan("an argument or an allocation is empty (its pointer tells nothing)")
    plan_launches = [(index, [*grid, *(1,) * (3 - len(grid))],
                      [_located(a, tensors, allocations) if isinstance(a, torch.Tensor) else a for a in args])
                     for index, grid, args, *_ in launches]
    outputs, as_tuple = _outputs(out, tensors, allocations)
    try:
        index = ext.register_plan(len(inputs), ext.current_context(), stream_fn, device, allocations,
                                  plan_launches, outputs, as_tuple)
    except (RuntimeError, TypeError) as error:  # a value that does not fit its parameter, more than 64 arguments
        raise _NoPlan(f"the extension refused it: {error}") from error
    return Plan(ext, index, [launch[3] for launch in launches])


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _extent(t: torch.Tensor) -> int:
    """Bytes from the tensor's data pointer to the end of its last element."""
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def _located(t: torch.Tensor, inputs: list[tuple[int, torch.Tensor]], allocations: list[torch.Tensor]) -> tuple:
    """A kernel's tensor argument as the plan reads it: (source, aligned, ((index, byte offset), ...))."""
    pointer, storage = t.data_ptr(), _storage(t)
    aligned = pointer % 16 == 0
    found = tuple((i, pointer - x.data_ptr()) for i, x in inputs
                  if _storage(x) == storage and 0 <= pointer - x.data_ptr() < _extent(x))
    if found:
        return _INPUT, aligned, found
    for j, buffer in enumerate(allocations):
        if _storage(buffer) == storage:
            return _BUFFER, aligned, ((j, pointer - buffer.data_ptr()),)
    raise _NoPlan("a kernel reads a tensor that is neither an argument nor allocated by the call")


def _outputs(out: Any, inputs: list[tuple[int, torch.Tensor]], allocations: list[torch.Tensor]
             ) -> tuple[list[tuple], bool]:
    """Each output as (allocation, sizes, strides, elements past the allocation's offset), -1 for None; and whether
    the op returns a tuple."""
    as_tuple = type(out) is tuple
    items = out if as_tuple else (out,)
    outputs = []
    for item in items:
        if item is None and as_tuple:
            outputs.append((-1, [], [], 0))
            continue
        if type(item) is not torch.Tensor:
            raise _NoPlan(f"it returns a {type(item).__name__}")
        storage = _storage(item)
        if any(_storage(x) == storage for _, x in inputs):
            raise _NoPlan("an output shares memory with an argument")
        match = [j for j, buffer in enumerate(allocations) if _storage(buffer) == storage]
        if not match or allocations[match[0]].dtype != item.dtype:
            raise _NoPlan("an output is not one of the call's allocations")
        buffer = allocations[match[0]]
        outputs.append((match[0], list(item.shape), list(item.stride()),
                        item.storage_offset() - buffer.storage_offset()))
    return outputs, as_tuple
