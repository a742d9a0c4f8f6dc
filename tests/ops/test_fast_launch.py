"""zoo.ops.triton.fast_launch: a hit launches the kernel the JIT compiled for the same specialisation; everything
else takes the JIT path. CPU: the caching logic against a recording stand-in for a kernel; GPU: real launches."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
fast_launch = pytest.importorskip("zoo.ops.triton.fast_launch")
if fast_launch.knobs is None:
    pytest.skip("this triton has no knobs (< 3.4): the fast path is off", allow_module_level=True)

from zoo.ops.triton.fast_launch import FastLaunch, argument_classes  # noqa: E402


def test_argument_classes_separate_what_triton_specialises_on():
    x = torch.randn(64)
    aligned, misaligned = argument_classes([x]), argument_classes([x[1:]])  # 4 bytes past a 16-byte boundary
    assert aligned != misaligned and aligned == argument_classes([torch.randn(8)])
    assert argument_classes([x.half()]) != aligned
    ints = [1, 16, 17, 32, 2**31, -2**31 - 1, 2**63]
    classes = [argument_classes([v])[0] for v in ints]
    assert classes[1] == classes[3]  # both divisible by 16, int32
    assert len({classes[i] for i in (0, 1, 2, 4, 6)}) == 5  # 1, %16, other, int64 %16, uint64 %16
    assert classes[5] != classes[2]  # int64 and int32, neither divisible by 16
    assert argument_classes([True]) != argument_classes([1])  # a bool is an i1, not an int
    assert argument_classes([0.5]) == argument_classes([2.0]) != argument_classes([None])
    assert argument_classes([x, [1, 2]]) is None and argument_classes([x, torch.int32]) is None


class _Param:
    def __init__(self, name, constexpr=False, default=None):
        self.name, self.is_constexpr, self.has_default, self.default = name, constexpr, default is not None, default


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _Kernel:
    """Records the JIT path's launches and returns one compiled kernel for all."""

    params = [_Param("x"), _Param("n"), _Param("eps"), _Param("BLOCK", True), _Param("FLAG", True, default=False)]

    def __init__(self):
        self.jit = []
        self.compiled = _Compiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit.append((grid, args, kwargs))
            return self.compiled
        return run


class _Driver:
    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(fast_launch, "driver", _Driver)
    return _Kernel()


def test_a_hit_calls_the_compiled_launcher_with_every_argument(kernel):
    launch = FastLaunch(kernel)
    x = torch.randn(32)
    launch[(5,)](x, 32, 1e-5, BLOCK=64, num_warps=4)
    assert len(kernel.jit) == 1 and kernel.compiled.launches == []
    y = torch.randn(16)
    launch[(7, 2)](y, 48, 1e-6, BLOCK=64, num_warps=4)  # other values, the same classes
    assert len(kernel.jit) == 1
    assert kernel.compiled.launches == [(7, 2, 1, 1234, "function", "metadata", None, None, None,
                                         y, 48, 1e-6, 64, False)]


@pytest.mark.parametrize("changed", ["misaligned", "one", "dtype", "constexpr", "options"])
def test_another_specialisation_takes_the_jit_path(kernel, changed):
    launch = FastLaunch(kernel)
    x = torch.randn(32)
    call = dict(x=x, n=32, BLOCK=64, num_warps=4)
    launch[(1,)](call["x"], call["n"], 0.5, BLOCK=call["BLOCK"], num_warps=call["num_warps"])
    call.update({"misaligned": {"x": x[1:]}, "one": {"n": 1}, "dtype": {"x": x.double()},
                 "constexpr": {"BLOCK": 128}, "options": {"num_warps": 8}}[changed])
    launch[(1,)](call["x"], call["n"], 0.5, BLOCK=call["BLOCK"], num_warps=call["num_warps"])
    assert len(kernel.jit) == 2 and kernel.compiled.launches == []
    launch[(1,)](call["x"], call["n"], 0.5, BLOCK=call["BLOCK"], num_warps=call["num_warps"])
    assert len(kernel.jit) == 2 and len(kernel.compiled.launches) == 1  # now remembered too


def test_constexprs_passed_positionally_are_keyed_by_value(kernel):
    launch = FastLaunch(kernel)
    x = torch.randn(32)
    launch[(1,)](x, 32, 0.5, 64)
    launch[(1,)](x, 32, 0.5, 128)  # another BLOCK: the JIT path compiles another kernel
    assert len(kernel.jit) == 2 and kernel.compiled.launches == []
    launch[(2,)](x, 48, 0.25, 128, True)
    launch[(2,)](x, 48, 0.25, 128, True)
    assert len(kernel.jit) == 3
    assert kernel.compiled.launches == [(2, 1, 1, 1234, "function", "metadata", None, None, None,
                                         x, 48, 0.25, 128, True)]


def test_runtime_keywords_hooks_and_grid_functions_keep_the_jit_path(kernel, monkeypatch):
    launch = FastLaunch(kernel)
    x = torch.randn(32)
    for _ in range(2):
        launch[(1,)](x, 32, eps=0.5, BLOCK=64)  # a runtime argument's value is not in the key
    launch[(1,)](x, 32, 0.5, BLOCK=64)
    launch[lambda meta: (1,)](x, 32, 0.5, BLOCK=64)
    hook = fast_launch.knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):  # triton 3.8: a chain of hooks, never None
        hook.add(_hook)
        try:
            launch[(1,)](x, 32, 0.5, BLOCK=64)
        finally:
            hook.remove(_hook)
    else:
        monkeypatch.setattr(fast_launch.knobs.runtime, "launch_enter_hook", _hook)
        launch[(1,)](x, 32, 0.5, BLOCK=64)
    assert len(kernel.jit) == 5 and kernel.compiled.launches == []
    launch[(1,)](x, 32, 0.5, BLOCK=64)  # the hook gone: remembered from the third launch
    assert len(kernel.jit) == 5 and len(kernel.compiled.launches) == 1


def _hook(*args):
    pass


def test_only_jit_kernels_get_a_fast_launch(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    jitted, interpreted = JITFunction(_hook), InterpretedFunction(_hook)
    assert isinstance(fast_launch.fast_launch(jitted), FastLaunch)
    assert fast_launch.fast_launch(interpreted) is interpreted
    monkeypatch.setenv("ZOO_TRITON_FAST_LAUNCH", "0")
    assert fast_launch.fast_launch(jitted) is jitted


@pytest.mark.gpu
def test_gpu_fast_launches_write_what_the_jit_path_writes():
    from zoo.ops.triton.kernels import depthwise_conv as kernels

    if kernels.INTERPRETED:
        pytest.skip("kernels imported for the interpreter")
    from zoo.ops.depthwise_conv import _tiles

    launch = FastLaunch(kernels.forward_kernel)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, h, w, c, offset in [(2, 7, 9, 64, 0), (2, 7, 9, 64, 1), (1, 1, 1, 32, 0), (2, 7, 9, 64, 0),
                               (3, 14, 14, 96, 3), (3, 14, 14, 96, 0)]:
        flat = torch.randn(b * h * w * c + offset, device="cuda", generator=gen, dtype=torch.float16)
        x = flat[offset:].view(b, h, w, c)  # offset 1 or 3: not 16-byte aligned
        weight = torch.randn(c, 1, 3, 3, device="cuda", generator=gen, dtype=torch.float16)
        outs = []
        for run in (launch, kernels.forward_kernel):
            y = torch.full((b, h, w, c), float("nan"), device="cuda", dtype=torch.float16)
            tile_h, tile_w, block_c, num_warps = _tiles(h, w, c)
            blocks = b * -(-h // tile_h) * -(-w // tile_w)
            run[(blocks, -(-c // block_c))](
                x, weight, weight, y, y, h, w, c, *x.stride(), *y.stride(), weight.stride(0), weight.stride(3),
                K=3, HAS_BIAS=False, HAS_RESIDUAL=False, IN_PLACE=False, TILE_H=tile_h, TILE_W=tile_w,
                BLOCK_C=block_c, num_warps=num_warps)
            outs.append(y)
        want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).float(), weight.float(), padding=1, groups=c)
        torch.testing.assert_close(outs[0].permute(0, 3, 1, 2).float(), want, rtol=2e-3, atol=2e-3)
        assert torch.equal(outs[0], outs[1])
    assert len(launch._compiled) == 5  # aligned and misaligned at two shapes, the one-pixel map; one repeat hit
    from zoo.ops.triton import cxx_launch

    if cxx_launch.enabled() and cxx_launch.extension() is not None:  # the hits above went through the C++ launcher
        assert all(entry[2] is not None for entry in launch._compiled.values())
