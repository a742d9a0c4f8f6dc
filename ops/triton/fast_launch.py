"""Eager launches of compiled Triton kernels at a fraction of the JIT's host cost.

``kernel[grid](*args, **kwargs)`` on a ``@triton.jit`` function binds every argument, specialises each (its type, a
pointer's 16-byte alignment, an integer's divisibility by 16 and equality to 1), builds a cache key string from that,
looks the compiled kernel up and only then calls its launcher: about 24 us of host time a launch on the H200
machine's host against 9 us for the launcher alone (triton 3.6, a 19-argument kernel). Eager models are bound by that
host time (BiFormer-T's forward makes 66 launches), so :class:`FastLaunch` keeps the compiled kernels under a key
of what that specialisation reads (a tensor's dtype and alignment; an int's equality to 1, divisibility by 16 and
width; the type of a float, bool or None; the keyword arguments' values and the current device), so a hit is the
very kernel the JIT would pick, and launches it directly: through :mod:`~zoo.ops.triton.cxx_launch`'s C++
launcher where the kernel's launch is plain (no scratch memory, one CTA a program), else through Triton's compiled
launcher. A miss, a grid function, launch hooks (profilers such as proton set them) or an argument of another type
take the JIT path unchanged.

Not read on a hit: Triton's check that the kernel's global variables are unchanged, and the ``TRITON_DEBUG`` /
instrumentation environment variables (set them before the first launch). ``ZOO_TRITON_FAST_LAUNCH=0`` turns the
fast path off (read when a kernel's launcher is first made).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction

try:  # triton >= 3.4: the launcher's calling convention this module uses (checked with 3.6 and 3.8)
    from triton import knobs
except ImportError:
    knobs = None

__all__ = ["FastLaunch", "fast_launch", "argument_classes"]

_INT32_MIN, _INT32_MAX = -2**31, 2**31 - 1
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
_CACHE_LIMIT = 256  # compiled variants a kernel keeps (a model uses a handful a kernel)
_INT_MEMO_LIMIT = 4096  # int arguments whose class is remembered (sizes and strides of a few dozen shapes)
_JIT = object()  # cache entry of a key whose launches keep the JIT path


def _int_class(value: int) -> int:
    """What Triton's specialisation reads of an int argument: 1 for the value 1, else divisible by 16 or not, plus
    the width it is passed as (int32, int64, uint64)."""
    if value == 1:
        return 1
    width = 0 if _INT32_MIN <= value <= _INT32_MAX else 4 if _INT64_MIN <= value <= _INT64_MAX else 8
    return width + (2 if value % 16 == 0 else 3)


def argument_classes(args: Sequence[Any], _ints: dict[int, int] = {}) -> tuple | None:  # noqa: B006 (a memo)
    """The part of the positional kernel arguments ``args`` that Triton's specialisation reads, as a hashable tuple
    (a tensor: its dtype, then whether it is 16-byte aligned; an int: :func:`_int_class`; a float, bool or None: its
    type), or None when an argument is of another type (the JIT path then launches it). Flat, with each int's class
    remembered: it runs before every eager launch. Only a tensor contributes a ``torch.dtype``, so the flat tuple
    still tells every argument list apart."""
    classes: list[Any] = []
    append = classes.append
    for a in args:
        kind = type(a)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            append(a.dtype)
            append(a.data_ptr() & 15 == 0)
        elif kind is int:
            cls = _ints.get(a)
            if cls is None:
                if len(_ints) >= _INT_MEMO_LIMIT:
                    _ints.clear()
                cls = _ints[a] = _int_class(a)
            append(cls)
        elif kind is float or kind is bool or a is None:
            append(kind)
        elif isinstance(a, torch.Tensor):
            append(a.dtype)
            append(a.data_ptr() & 15 == 0)
        else:
            return None
    return tuple(classes)


# The C++ twin of argument_classes (zoo.ops.triton.cxx_launch's extension, set once it is loaded): the same classes
# packed three bytes an argument, so the keys it makes equal exactly where argument_classes's do (and never one of
# those). None until then.
_native_classes: Callable[[tuple], bytes | None] | None = None


def use_native_argument_classes(fn: Callable[[tuple], bytes | None] | None) -> None:
    """Key launches by ``fn`` (the extension's ``argument_classes``) instead of :func:`argument_classes`, or by it
    again (None). Kernels remembered under the other kind of key take the JIT path once and are remembered again."""
    global _native_classes
    _native_classes = fn


# While zoo.ops.triton.call_plans records an op call: (the recording thread's id, a list that gets each of its launches
# as (kernel index, grid, positional arguments, compiled kernel, (device function, stream function), device) where the
# C++ launcher made it, else None). Other threads' launches are not the call's.
_recorder: tuple[int, list[Any]] | None = None


def _hooked(runtime: Any) -> bool:
    """Whether launch hooks are set: a function (triton 3.6), or a non-empty ``HookChain`` (3.8, where the
    attributes are never None). Asked before every eager launch and op replay."""
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True)))


class FastLaunch:
    """``FastLaunch(kernel)[grid](*args, **kwargs)`` launches the ``@triton.jit`` ``kernel`` as
    ``kernel[grid](*args, **kwargs)`` does (module docstring); ``grid`` a tuple of 1-3 ints. Fast when the runtime
    arguments come positionally (a runtime argument by keyword keeps the JIT path: its value is not in the key);
    constexprs and launch options (``num_warps``, ...) either way, keyed by value."""

    __slots__ = ("kernel", "_names", "_constexpr", "_runtime", "_first_constexpr", "_defaults", "_compiled",
                 "_current")

    def __init__(self, kernel: JITFunction):
        self.kernel = kernel
        self._names = [p.name for p in kernel.params]
        self._constexpr = {p.name for p in kernel.params if p.is_constexpr}
        self._runtime = set(self._names) - self._constexpr
        # constexprs passed positionally are keyed by value (their class would mix kernels compiled for other values)
        self._first_constexpr = next((i for i, p in enumerate(kernel.params) if p.is_constexpr), len(self._names))
        self._defaults = {p.name: p.default for p in kernel.params if p.has_default}
        self._compiled: dict[tuple, Any] = {}
        self._current: tuple[Callable[[], int], Callable[[int], Any]] | None = None  # read at the first launch

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> None:
        """Launch the kernel on ``grid`` with ``args`` and ``kwargs`` on the current device and stream."""
        key = self._key(grid, args, kwargs)
        try:
            entry = _JIT if key is None else self._compiled.get(key)
        except TypeError:  # an unhashable keyword value
            entry = _JIT
        if entry is None:
            self._compile_and_launch(key, grid, args, kwargs)
        elif entry is _JIT:
            self.kernel[grid](*args, **kwargs)
        else:
            compiled, tail, cxx = entry
            size = len(grid)
            stream = self._current[1](key[0])
            if cxx is not None:  # the C++ launcher (cxx_launch): (its launch function, the kernel's index)
                try:
                    cxx[0](cxx[1], grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, *args,
                           *tail)
                    if _recorder is not None and _recorder[0] == threading.get_ident():
                        _recorder[1].append((cxx[1], grid, (*args, *tail), compiled, self._current, key[0]))
                    return
                except RuntimeError:  # the driver refused the launch (no current context, say): Triton's launcher
                    self._compiled[key] = (compiled, tail, None)  # takes this kernel from now on
            compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream,
                         compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
        if _recorder is not None and _recorder[0] == threading.get_ident():  # not a launch a plan can replay
            _recorder[1].append(None)

    def _key(self, grid: Any, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """(device, what the specialisation reads of ``args``, the keyword arguments), or None where the JIT path
        launches: a grid function, launch hooks, an argument of another type."""
        if type(grid) is not tuple or _hooked(knobs.runtime):
            return None
        if len(args) > self._first_constexpr:
            classes = self._positional_key(args)
        else:
            classes = argument_classes(args) if _native_classes is None else _native_classes(args)
        if classes is None:
            return None
        if self._current is None:
            self._current = _device_and_stream()
        return self._current[0](), classes, tuple(kwargs.items())

    def _positional_key(self, args: tuple) -> tuple | None:
        """:func:`argument_classes` of the runtime arguments and the values of the constexprs among ``args``."""
        runtime = [a for a, n in zip(args, self._names) if n not in self._constexpr]
        classes = argument_classes(runtime)
        return None if classes is None else (classes, *(a for a, n in zip(args, self._names) if n in self._constexpr))

    def _compile_and_launch(self, key: tuple, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> None:
        """The JIT path (compiling on first use), then remember its kernel under ``key`` with the values of the
        parameters after ``args`` (constexprs by keyword or default: their values are part of the key)."""
        compiled = self.kernel[grid](*args, **kwargs)
        if len(self._compiled) >= _CACHE_LIMIT:
            self._compiled.clear()
        rest = self._names[len(args):]
        launchable = all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata"))
        if not launchable or not self._runtime.isdisjoint(kwargs):
            self._compiled[key] = _JIT  # a runtime argument by keyword: its value is not in the key
            return
        self._compiled[key] = (compiled, tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in rest),
                               _cxx_launcher(compiled))


def _cxx_launcher(compiled: Any) -> tuple[Callable[..., None], int] | None:
    """(the C++ launch function, the kernel's index) where :mod:`~zoo.ops.triton.cxx_launch` can launch
    ``compiled``, else None (Triton's launcher)."""
    from . import cxx_launch

    index = cxx_launch.register(compiled)
    return None if index is None else (cxx_launch.extension().launch, index)


def _device_and_stream() -> tuple[Callable[[], int], Callable[[int], Any]]:
    """The driver's current-device and current-stream functions, read once: every attribute read through
    ``driver.active`` (a proxy) costs host time. Triton's CUDA driver answers the device with
    ``torch.cuda.current_device``, whose lazy-initialisation check a launch on CUDA tensors has passed already, so
    the same value comes straight from ``torch._C._cuda_getDevice``."""
    active = driver.active
    device = active.get_current_device
    if device is torch.cuda.current_device and hasattr(torch._C, "_cuda_getDevice"):
        device = torch._C._cuda_getDevice
    return device, active.get_current_stream


def fast_launch(kernel: Any) -> Any:
    """A :class:`FastLaunch` of ``kernel`` if it is a JIT-compiled kernel and ``ZOO_TRITON_FAST_LAUNCH`` is not
    ``0`` (and triton has ``knobs``: 3.4 or newer), else ``kernel`` itself (the interpreter's kernels)."""
    if (knobs is not None and isinstance(kernel, JITFunction)
            and os.environ.get("ZOO_TRITON_FAST_LAUNCH", "1") != "0"):
        return FastLaunch(kernel)
    return kernel
