"""Host-side helpers shared by the Triton backends (no kernel runs here)."""
from __future__ import annotations

import pytest
import torch

from zoo.ops.triton import broadcast_strides


@pytest.mark.parametrize("shape, target", [((1, 3, 5, 7), (2, 3, 5, 7)), ((3, 1, 7), (2, 3, 5, 7)),
                                           ((7,), (2, 3, 5, 7)), ((2, 3, 5, 7), (2, 3, 5, 7)),
                                           ((1, 1, 1, 1), (2, 3, 5, 7))])
def test_broadcast_strides_are_what_expand_gives_on_every_indexed_dim(shape, target):
    bias = torch.randn(shape)
    layouts = [bias] + ([bias.transpose(-1, -2).contiguous().transpose(-1, -2)] if bias.ndim > 1 else [])
    for t in layouts:
        expanded = t.expand(target).stride()
        ours = broadcast_strides(t.shape, t.stride(), len(target))
        # a size-1 target dim is only indexed at 0: its stride does not matter
        assert [s for s, n in zip(ours, target) if n > 1] == [s for s, n in zip(expanded, target) if n > 1]


def _kernel_modules() -> list[str]:
    import pkgutil

    from zoo.ops.triton import kernels
    names = sorted(f"zoo.ops.triton.kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__))
    return names + ["zoo.ops.triton.ms_deform"]  # kernels and launchers in one module, importing triton


@pytest.mark.parametrize("name", _kernel_modules())
def test_kernels_name_only_globals_that_inductor_copies_with_them(name):
    # inductor launches a triton_op's kernels from its own generated source: it copies the kernel's source plus the
    # @triton.jit functions and int/str/bool/constexpr values that the code names as globals (co_names), nothing else;
    # a helper reached through a closure, or a float global, is a NameError when the compiled graph builds the kernel
    triton = pytest.importorskip("triton")
    import importlib

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(name)
    jitted = {n: f for n, f in vars(module).items() if isinstance(f, JITFunction) or hasattr(f, "fn")}
    assert jitted, f"{name}: no @triton.jit functions"
    for kernel_name, kernel in jitted.items():
        code = kernel.fn.__code__
        assert not code.co_freevars, f"{name}.{kernel_name} reads closure variables {code.co_freevars}"
        for symbol in code.co_names:
            value = kernel.fn.__globals__.get(symbol)
            if value is None:  # an attribute name (tl.load -> "load") or a builtin
                continue
            copied = isinstance(value, (JITFunction, int, str, bool, tl.constexpr)) or value is tl or value is triton
            assert copied or hasattr(value, "fn"), f"{name}.{kernel_name} names global {symbol}={value!r}"


@pytest.mark.parametrize("installed, expected", [
    ({"triton": "3.1.0"}, "triton 3.1 is older than 3.3"),  # torch 2.5's: its compiler crashes on the kernels
    ({"triton": "3.2.0"}, "triton 3.2 is older than 3.3"),
    ({"triton": "3.3.1"}, None),
    ({"triton": "3.10.0"}, None),  # numbers, not strings: 3.10 is newer than 3.3
    ({"pytorch-triton": "3.2.0+git1234"}, "triton 3.2 is older"),  # nightly torch's distribution name
    ({"triton": "custom"}, None),  # an unreadable version is not refused
])
def test_triton_older_than_the_kernels_need_is_refused(monkeypatch, installed, expected):
    import importlib.metadata

    from zoo.ops import triton as zt

    if zt.importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    reason = zt._triton_missing()
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason
