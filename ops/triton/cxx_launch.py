"""Launches of compiled Triton kernels from C++: the last step of :class:`~zoo.ops.triton.fast_launch.FastLaunch`.

Triton's own launcher (``CompiledKernel.run``) runs Python on every launch (scratch allocation closures, hook checks)
and then unpacks each argument in C by calling back into Python (a tensor's ``data_ptr()``). On the device machines'
hosts that cost 22.7 us a launch of the LayerNorm kernel through :class:`FastLaunch`, where the whole op in C++
(allocation and ``cuLaunchKernel`` included) took 9.6 (H100 machine, torch 2.11, triton 3.6; BENCHMARKS.md,
seventieth session), and eager models wait for that host time. Here a small C++ extension (``_launch.cpp``, built
with torch's headers on first use by :func:`torch.utils.cpp_extension.load`, cached in torch's extensions directory)
keeps each compiled kernel's CUfunction, block size, shared memory and the kind of each positional parameter, and a
launch packs the arguments and calls ``cuLaunchKernel`` without returning to Python.

A kernel takes this path only when its launch is plain: no global or profile scratch memory, one CTA per program, no
cooperative grid or programmatic dependent launch, at most 228 KiB of shared memory, and a parameter list (from its
Triton signature) whose length matches its PTX entry's. Anything else, a failed build (no C++ compiler, say) or
``ZOO_CXX_LAUNCH=0`` keeps Triton's launcher. The build needs a C++ compiler and torch's headers, no CUDA toolkit
(``cuLaunchKernel`` is looked up in the libcuda the process has loaded). Under torches that lock a build with a plain
file, a lock left by a build that was killed is cleared before building (:func:`_without_stale_build_lock`).

Once loaded, the extension also computes the two keys an eager op call looks things up by: the dispatch layer's
call key (:func:`zoo.ops._dispatch.call_key`, for the op's checks and backend choice; 0.78 against 2.73 us for a
LayerNorm call's five arguments on this repository's CPU) and FastLaunch's argument classes (for the compiled
kernel; 0.4 against 2.3 us for that kernel's eleven arguments). ``ZOO_CXX_KEYS=0`` keeps both in Python (as does
``ZOO_CXX_LAUNCH=0``, under which the extension is never built). It also replays whole eager op calls
(:mod:`~zoo.ops.triton.call_plans`; ``ZOO_CALL_PLANS=0`` keeps every call on its backend).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["enabled", "extension", "argument_kinds", "register"]

_SOURCE = Path(__file__).with_name("_launch.cpp")
logger = logging.getLogger(__name__)

# Triton signature type -> the extension's argument kind (``Kind`` in _launch.cpp)
_SKIP, _POINTER = 0, 1
_SCALAR_KINDS = {"i32": 2, "i64": 3, "u32": 4, "u64": 5, "fp32": 6, "f32": 6, "fp64": 7, "i1": 8, "i8": 8}


def enabled() -> bool:
    """Whether launches may take the C++ path (``ZOO_CXX_LAUNCH`` is not ``0``; read when a kernel compiles)."""
    return os.environ.get("ZOO_CXX_LAUNCH", "1") != "0"


@functools.cache
def extension() -> Any | None:
    """The built extension module, or None (with one warning) when it cannot be built or loaded here. The first call
    on a machine builds it (about 35 s); later processes load the cached build."""
    from torch.utils import cpp_extension

    # one build per torch and Python version: an extension is bound to the torch ABI it was compiled against
    name = f"zoo_triton_launch_{hashlib.sha1(f'{torch.__version__}|{sys.version}'.encode()).hexdigest()[:10]}"
    try:
        folder = _build_folder(cpp_extension, name)
        _announce_a_build(folder, name)
        with _ninja_on_path(), _without_stale_build_lock(cpp_extension, folder):
            module = cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O2"], verbose=False)
    except Exception as error:  # noqa: BLE001 (no compiler, no headers, a failed build: Triton's launcher stays)
        warnings.warn(f"zoo: the C++ Triton launcher could not be built ({type(error).__name__}: {error}); "
                      "kernels launch through Triton's launcher (set ZOO_CXX_LAUNCH=0 to skip the build)",
                      stacklevel=2)
        return None
    if os.environ.get("ZOO_CXX_KEYS", "1") != "0":
        from .._dispatch import use_native_call_key
        from .fast_launch import use_native_argument_classes

        use_native_call_key(module.call_key)
        use_native_argument_classes(module.argument_classes)
    if os.environ.get("ZOO_CALL_PLANS", "1") != "0":
        from .. import _dispatch
        from . import call_plans

        _dispatch.use_call_plans(call_plans, module)
    return module


def _build_folder(cpp_extension: Any, name: str) -> str | None:
    """The folder torch builds and caches extension ``name`` in (created), or None where torch cannot name it."""
    try:
        return cpp_extension._get_build_directory(name, False)
    except Exception:  # noqa: BLE001 (a private helper: without it, no notice and torch's own locking as it is)
        return None


def _announce_a_build(folder: str | None, name: str) -> None:
    """Says, on zoo's logger, that the extension is about to be built where ``folder`` holds no build of ``name``:
    the first kernel launch then takes about 35 s, which an interrupted process would otherwise not explain."""
    if folder is not None and not any(entry.startswith(name) and entry.endswith((".so", ".pyd"))
                                      for entry in os.listdir(folder)):
        logger.warning("zoo: building the C++ Triton launcher in %s (once per torch and Python version; about 35 s)",
                       folder)


@contextlib.contextmanager
def _without_stale_build_lock(cpp_extension: Any, folder: str | None) -> Iterator[None]:
    """Holds zoo's build lock on an extension's build ``folder`` and clears a build lock left there by a dead
    process, for torch versions whose JIT builds wait on a plain lock file.

    Those torches (``cpp_extension`` with a ``FileBaton``, torch 2.11 for one) take a build folder by creating the
    file ``lock`` and wait while it exists. A process killed mid-build (Ctrl-C during a first forward, which builds
    this extension for about 35 s; a job's time limit) leaves it behind, and every later zoo process then hung at its
    first kernel launch. Here each build first takes ``zoo_build.lock``, an OS lock (``filelock``) that the kernel
    releases when its holder dies: a ``lock`` file found while holding it is a dead build's, and is removed with a
    warning. Torches that lock with ``filelock`` themselves (2.14) are left alone, as is a folder torch cannot name
    (None).
    """
    if folder is None or not hasattr(cpp_extension, "FileBaton") or hasattr(cpp_extension, "FileLock"):
        yield
        return
    import filelock

    with filelock.FileLock(os.path.join(folder, "zoo_build.lock")):
        stale = os.path.join(folder, "lock")
        if os.path.exists(stale):
            os.remove(stale)
            warnings.warn(f"zoo: removed {stale}, the build lock of an earlier build of the C++ Triton launcher "
                          "that was interrupted (without this every later build would wait on it forever)",
                          stacklevel=3)
        yield


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch builds extensions with a ``ninja`` found on PATH: where there is none, the ``ninja`` package's binary
    (a dependency of zoo, whose scripts folder is not on PATH when Python runs from a virtual environment without
    activating it) is put there for the build."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


def argument_kinds(compiled: Any) -> list[int] | None:
    """The extension's kind of each positional parameter of the kernel ``compiled`` (a Triton ``CompiledKernel``),
    from its Triton signature: constexprs and specialised constants are skipped. None where a type is not one of
    pointers, ints, floats and bools, or the signature cannot be read."""
    src = getattr(compiled, "src", None)
    signature = getattr(src, "signature", None)
    fn = getattr(src, "fn", None)
    names = getattr(fn, "arg_names", None)
    if not isinstance(signature, dict) or names is None:
        return None
    constants = getattr(src, "constants", {}) or {}
    kinds = []
    for index, name in enumerate(names):
        ty = signature.get(name, signature.get(index))
        if not isinstance(ty, str):
            return None
        if ty == "constexpr" or name in constants or (index,) in constants:
            kinds.append(_SKIP)
        elif ty.startswith("*"):
            kinds.append(_POINTER)
        elif ty in _SCALAR_KINDS:
            kinds.append(_SCALAR_KINDS[ty])
        else:
            return None
    return kinds


def _ptx_parameters(compiled: Any) -> int | None:
    """How many parameters the PTX entry of ``compiled`` declares, or None without its PTX."""
    ptx = getattr(compiled, "asm", {}).get("ptx")
    if not isinstance(ptx, str):
        return None
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, flags=re.S)
    return None if entry is None else len(re.findall(r"\.param\s", entry.group(1)))


def _plain_launch(metadata: Any) -> bool:
    """No scratch memory, one CTA a program, no cooperative grid or programmatic dependent launch, and shared memory
    within an SM's 228 KiB (beyond it Triton's launcher asks for an oversized-shared-memory mode)."""
    return (getattr(metadata, "global_scratch_size", 0) == 0 and getattr(metadata, "profile_scratch_size", 0) == 0
            and getattr(metadata, "shared", 0) <= 228 * 1024
            and getattr(metadata, "num_ctas", 1) == 1 and tuple(getattr(metadata, "cluster_dims", (1, 1, 1))) in
            ((1, 1, 1), (0, 0, 0)) and not getattr(metadata, "launch_cooperative_grid", False)
            and not getattr(metadata, "launch_pdl", False))


def register(compiled: Any) -> int | None:
    """Register the CUDA kernel ``compiled`` with the extension: its index for ``extension().launch``, or None when
    it must keep Triton's launcher (see the module docstring)."""
    if not enabled():
        return None
    metadata = getattr(compiled, "metadata", None)
    kinds = argument_kinds(compiled)
    declared = _ptx_parameters(compiled)
    function = getattr(compiled, "function", None)
    if metadata is None or kinds is None or declared is None or not isinstance(function, int) or function == 0:
        return None
    trailing = declared - sum(kind != _SKIP for kind in kinds)  # the scratch pointers Triton appends (0-2)
    if not _plain_launch(metadata) or not 0 <= trailing <= 2:
        return None
    ext = extension()
    if ext is None:
        return None
    return ext.register_kernel(function, 32 * metadata.num_warps, metadata.shared, kinds, trailing)
