"""Triton kernels behind the ``triton`` backends of :mod:`zoo.ops`.

Nothing here imports triton when ``zoo.ops`` is imported: kernel modules are imported on first use, so the package
imports cleanly on machines without triton or CUDA. Whether a kernel runs in Triton's CPU interpreter is decided when
its ``@triton.jit`` decorator runs (triton reads ``TRITON_INTERPRET`` then), i.e. when its module is first imported.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .._cache import functorch_transforming

__all__ = ["triton_missing_reason", "interpreter_missing_reason", "interpreter_requested", "no_device_reason",
           "device_reason", "inputs_reason",
           "contiguous_or_none", "on_device", "next_pow2", "prev_pow2",
           "dot_precision", "fp32_dot_precision", "sm_count", "sm_shared_bytes", "item_extent", "broadcast_strides",
           "override_knobs", "is_num_warps", "check_tile_edge", "check_count", "token_major",
           "kernel_op", "kernels_interpreted", "needs_grad", "direct", "traced", "INT32_MAX"]

INT32_MAX = 2**31 - 1

_TRUE = ("1", "true", "yes", "on")


# The oldest triton that builds every kernel here, compiled for sm_90 on the CPU (tests/ops/test_kernels_compile.py's
# 35 cases, each version in turn): 3.3.1 and 3.5.1 build all of them, as 3.6 and 3.8 do; 3.2.0 (torch 2.6) crashes the
# process on the routing and pooled agent kernels and fails on the key-blocked short-key ones; 3.1.0 (torch 2.5)
# crashes on the routing and split agent backward kernels and fails on the pooled agent and key-blocked short-key
# ones, and its interpreter cannot run several. Below it every op runs its other backends.
_MIN_TRITON = (3, 3)


def _installed_version(distributions: Sequence[str]) -> tuple[int, ...] | None:
    """The (major, minor) of the first installed distribution of these names, or None (read from its metadata, which
    does not import it)."""
    for name in distributions:
        try:
            text = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        parts = text.split(".")[:2]
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None
    return None


def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    version = _installed_version(("triton", "pytorch-triton"))
    if version is not None and version < _MIN_TRITON:
        return (f"triton {'.'.join(map(str, version))} is older than {'.'.join(map(str, _MIN_TRITON))}, the oldest "
                "that builds these kernels (torch >= 2.7 comes with it)")
    return None


# Looked up once: dispatch asks at every call, also inside torch.compile regions, and dynamo refuses to trace
# importlib's find_spec (a graph break, or an error under fullgraph=True; seen on the H200 with torch 2.11).
_TRITON_MISSING = _triton_missing()


def triton_missing_reason() -> str | None:
    """Why triton cannot be used here (not installed, or older than these kernels need), or None. Does not import
    triton."""
    return _TRITON_MISSING


@functools.cache  # only the tests ask, so it is not looked up at import as the dispatch-time reasons are
def interpreter_missing_reason() -> str | None:
    """Why Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run these kernels here: triton missing or too old,
    or a triton whose interpreter breaks on the installed numpy; or None. Does not import triton."""
    if _TRITON_MISSING is not None:
        return _TRITON_MISSING
    triton, numpy = _installed_version(("triton", "pytorch-triton")), _installed_version(("numpy",))
    # triton < 3.7's interpreter converts a loop bound held in a one-element array with int(), which numpy 2.4 refuses
    # (triton-lang/triton#9171; seen with triton 3.6, torch 2.11's): every kernel with a runtime loop bound fails
    if triton is not None and numpy is not None and triton < (3, 7) and numpy >= (2, 4):
        return (f"triton {'.'.join(map(str, triton))}'s CPU interpreter fails with numpy "
                f"{'.'.join(map(str, numpy))} (triton-lang/triton#9171): install numpy<2.4 or triton>=3.7")
    return None


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the CPU interpreter (the same spellings triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def kernels_interpreted(module: str) -> bool:
    """Whether the kernel module ``module`` (full name) was imported for Triton's CPU interpreter or, not imported
    yet, will be (``TRITON_INTERPRET`` is read at its import).

    A constant to ``torch.compile``: the first trace may import the module midway (running a ``triton_op`` body on
    fake tensors), and a guard on its presence would then fail on the frame that made it.
    """
    return _zoo_kernels_interpreted_constant(module)


# torch 2.5's dynamo stores a constant result as a global of the traced frame's module named after the function:
# under the public name it would replace ``kernels_interpreted`` itself, in the modules that import it, by a bool
@torch.compiler.assume_constant_result
def _zoo_kernels_interpreted_constant(module: str) -> bool:
    loaded = sys.modules.get(module)
    return loaded.INTERPRETED if loaded is not None else interpreter_requested()


def no_device_reason() -> str | None:
    """Why no Triton kernel can run here (triton missing; no CUDA device and no interpreter requested), or None."""
    if _TRITON_MISSING is not None:
        return _TRITON_MISSING
    if not torch.cuda.is_available() and not interpreter_requested():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return None


def device_reason(device: torch.device, dtypes: Iterable[torch.dtype], interpreted: bool) -> str | None:
    """Why a backend's Triton kernels cannot run on ``device`` with these dtypes, or None.

    CUDA always can; CPU only when the kernels are built for the interpreter (``interpreted``: the module read
    ``TRITON_INTERPRET`` when it built them), and not in bfloat16, which the interpreter breaks. Neither inside a
    ``torch.func`` transform, whose wrapped tensors the kernels cannot read.
    """
    if functorch_transforming():
        return ("inside a torch.func transform (vmap, grad, jacrev, ...): the kernels read raw memory, the "
                "reference's PyTorch ops have functorch rules")
    if device.type == "cpu":
        if not interpreted:
            return "CPU tensors need TRITON_INTERPRET=1 (set before the kernels are first used)"
        if torch.bfloat16 in set(dtypes):
            return "bfloat16 is broken in the Triton interpreter"
        return None
    if device.type != "cuda":
        return f"device {device.type} is not supported"
    return None


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def inputs_reason(device: torch.device, interpreted: bool,
                  **operands: torch.Tensor | torch.dtype | None) -> str | None:
    """Why a kernel taking float32/float16/bfloat16 operands cannot take these on ``device``, or None.

    ``operands`` are named tensors or dtypes (e.g. ``x=x, output=out_dtype``); None marks an absent optional one. A
    dtype outside those three is named first; then :func:`device_reason` with the operands' dtypes.
    """
    dtypes = {name: op if isinstance(op, torch.dtype) else op.dtype for name, op in operands.items() if op is not None}
    wrong = {name: dtype for name, dtype in dtypes.items() if dtype not in _KERNEL_DTYPES}
    if wrong:
        return f"dtypes {wrong}; needs float32/float16/bfloat16"
    return device_reason(device, dtypes.values(), interpreted)


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t.contiguous()``, or None for an absent optional tensor (a bias, a weight)."""
    return None if t is None else t.contiguous()


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (Triton launches on the current CUDA device). Nothing to switch (the usual case,
    asked before every eager launch) costs two C calls: no ``torch.cuda.device`` context and its exchanges."""
    if not t.is_cuda:
        return _NO_SWITCH
    index = t.get_device()
    return _NO_SWITCH if index == torch._C._cuda_getDevice() else torch.cuda.device(index)


_NO_SWITCH = contextlib.nullcontext()  # reusable: it holds no state


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): tile edges are powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (1 for n <= 1)."""
    return 1 << max(0, int(n).bit_length() - 1)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 stays IEEE (torch's matmul default, never silent TF32); 16-bit ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def fp32_dot_precision(t: torch.Tensor) -> str:
    """``tl.dot`` precision for float32 operands whose products must keep float32 accuracy: "tf32x3" (three TF32
    tensor-core products, error near float32 rounding) on GPUs with TF32 (compute capability >= 8.0), "ieee" on
    older GPUs and in the CPU interpreter."""
    return "tf32x3" if t.is_cuda and _properties(t.device).major >= 8 else "ieee"


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of a CUDA tensor's GPU: launch heuristics size grids by it."""
    return _properties(t.device).multi_processor_count


def sm_shared_bytes(t: torch.Tensor) -> int | None:
    """Shared memory of one SM of a CUDA tensor's GPU in bytes (what bounds the programs an SM holds), or None where
    torch does not report it (before 2.6)."""
    return getattr(_properties(t.device), "shared_memory_per_multiprocessor", None)


def _properties(device: torch.device):
    return _properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _properties_of(index: int):
    return torch.cuda.get_device_properties(index)


def item_extent(t: torch.Tensor) -> int:
    """Largest element offset inside one batch item (dim 0): kernels that index within an item use int32."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def broadcast_strides(shape: Sequence[int], stride: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Strides of a tensor broadcast to ``ndim`` dims: 0 along missing leading dims and size-1 dims.

    What ``t.expand(target).stride()`` gives (a size-1 dim is only ever indexed at 0), without a tensor op.
    """
    lead = ndim - len(shape)
    return (0,) * lead + tuple(0 if size == 1 else st for size, st in zip(shape, stride))


def token_major(b: int, heads: int, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, heads, n, d) view of a contiguous (B, n, heads, d) tensor with ``like``'s device and
    dtype: kernels write attention outputs and gradients token-major, so the models' ``transpose(1, 2).reshape(B, n,
    heads * d)`` back to tokens is free."""
    return torch.empty((b, n, heads, d), device=like.device, dtype=like.dtype).transpose(1, 2)


def override_knobs(knobs: dict[str, Any], **values: Any) -> contextlib.AbstractContextManager:
    """A context that sets the given non-None launch knobs in a backend's ``knobs`` dict, then restores them all.

    ``num_warps`` (a power of two, 1 to 32) and ``num_stages`` (>= 1) are checked here, at the call, for every
    backend: Triton would only reject them at the first launch, inside the caller's step.

    Under ``torch.compile`` the knobs are read when an op's body is traced, and the traced graph holds its launches;
    the graph that dynamo hands on shows only the op's call, so a later compile that finds the graph in the compile
    caches keeps the earlier launches (seen on an H200, torch 2.11: a second model compiled in the same process and
    cache directory after the defaults changed). Set the knobs before the first compile; to compare settings compiled,
    run each in a fresh process with its own ``TORCHINDUCTOR_CACHE_DIR``.
    """
    warps, stages = values.get("num_warps"), values.get("num_stages")
    if warps is not None and not is_num_warps(warps):
        raise ValueError(f"num_warps must be a power of two from 1 to 32 or None, got {warps!r}")
    if stages is not None and (type(stages) is not int or stages < 1):
        raise ValueError(f"num_stages must be an int >= 1 or None, got {stages!r}")
    return _overridden(knobs, {name: value for name, value in values.items() if value is not None})


def is_num_warps(value: Any) -> bool:
    """Whether ``value`` is a Triton ``num_warps``: an int power of two from 1 to 32."""
    return type(value) is int and 1 <= value <= 32 and not value & (value - 1)


@contextlib.contextmanager
def _overridden(knobs: dict[str, Any], values: dict[str, Any]) -> Iterator[None]:
    from .._dispatch import forget_plans

    old = dict(knobs)
    knobs.update(values)
    forget_plans()  # the eager calls' plans hold launches made under the knobs before
    try:
        yield
    finally:
        knobs.clear()
        knobs.update(old)
        forget_plans()


def check_tile_edge(name: str, value: int | None) -> None:
    """Raise unless ``value`` (a tile-edge knob) is None or a power of two >= 16, the smallest ``tl.dot`` operand."""
    if value is not None and (value < 16 or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def check_count(name: str, value: int | None) -> None:
    """Raise unless ``value`` (a knob counting programs, regions or heads) is None or an int >= 1."""
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{name}={value!r} must be an int >= 1 or None")


# torch >= 2.6: torch.compile traces into a triton_op's body and inductor launches its kernels from the generated code
# (a custom op instead stays one opaque node whose Python body costs about 230 us of host time per call on the H200
# machine's host, more than the kernels take in BiFormer's compiled graphs).
# The interpreter's kernels are not JITFunctions: wrap_triton passes them through and the derived fake would run them on
# fake tensors, so interpreted kernels keep the opaque custom op.
_TRITON_OP = (_TRITON_MISSING is None and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
              and not interpreter_requested())


def direct(kernel: Any) -> Any:
    """How eager code launches ``kernel`` (the counterpart of :func:`traced`): through a
    :class:`~zoo.ops.triton.fast_launch.FastLaunch` of it, made once a kernel, which skips most of the JIT's host
    work a launch; the interpreter's kernels as they are."""
    entry = _LAUNCHERS.get(id(kernel))
    if entry is None:
        from .fast_launch import fast_launch

        entry = _LAUNCHERS[id(kernel)] = (kernel, fast_launch(kernel))
    return entry[1]


# id(kernel) -> (kernel, how eager code launches it): a JITFunction hashes its source on every lookup; the entry
# holds the kernel, so its id is never reused
_LAUNCHERS: dict[int, tuple[Any, Any]] = {}


def traced(kernel: Any) -> Any:
    """How the body of a :func:`kernel_op` launches ``kernel``: wrapped for tracing where torch has ``triton_op``."""
    return torch.library.wrap_triton(kernel) if _TRITON_OP else kernel


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (grad mode on and one of them requires grad): the eager
    backends launch without an autograd node or saved statistics otherwise."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def kernel_op(name: str, *, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Register the decorated function, whose kernels launch through :func:`traced`, as the ``torch.library`` op
    ``name``: a ``triton_op`` (torch >= 2.6; its fake is derived by running the body), else an opaque ``custom_op``
    with ``fake`` as its fake implementation."""
    def register(fn: Callable[..., Any]) -> Any:
        if _TRITON_OP:
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return register
