"""zoo.ops.triton.cxx_launch: the C++ launcher's parameter lists agree with what Triton compiled, its packing writes
each argument as the kernel reads it, and FastLaunch hands it every launch of a remembered kernel. CPU: real kernels
compiled for sm_90 (triton's own ptxas) and the extension built here; the GPU test of test_fast_launch.py checks
that launches through it write what the JIT path writes."""
from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("triton")
fast_launch = pytest.importorskip("zoo.ops.triton.fast_launch")
if fast_launch.knobs is None:
    pytest.skip("this triton has no knobs (< 3.4): the fast path is off", allow_module_level=True)

from zoo.ops.triton import cxx_launch, interpreter_requested  # noqa: E402
from triton_checks import compile_for_gpu  # noqa: E402
import test_fast_launch  # noqa: E402 (its recording stand-ins for a kernel and the driver)


def _compiled_layer_norm():
    from zoo.ops.triton.kernels import layer_norm as kernels

    x, w = torch.randn(197, 192), torch.randn(192)
    y = torch.empty(197, 192, dtype=torch.bfloat16)
    args = (x, w, w, y, y, y, x, y, 197, 192, 1e-6)
    kwargs = dict(HAS_W=True, HAS_B=True, BLOCK_ROWS=8, BLOCK_C=256, STATS=False, HAS_RES=False, num_warps=4)
    return compile_for_gpu(kernels.forward_kernel, args, kwargs), args, kwargs


def _compiled_depthwise_conv():
    from zoo.ops.triton.kernels import depthwise_conv as kernels

    x, weight = torch.randn(2, 7, 9, 64), torch.randn(64, 1, 3, 3)
    y = torch.empty_like(x)
    args = (x, weight, weight, y, y, 7, 9, 64, *x.stride(), *y.stride(), weight.stride(0), weight.stride(3))
    kwargs = dict(K=3, HAS_BIAS=False, HAS_RESIDUAL=False, IN_PLACE=False, TILE_H=4, TILE_W=8, BLOCK_C=64,
                  num_warps=4)
    return compile_for_gpu(kernels.forward_kernel, args, kwargs), args, kwargs


@pytest.mark.skipif(interpreter_requested(), reason="compiles the JIT kernels, not interpreted ones")
@pytest.mark.parametrize("make", [_compiled_layer_norm, _compiled_depthwise_conv])
def test_argument_kinds_match_the_compiled_kernels_parameters(make):
    compiled, args, kwargs = make()
    kinds = cxx_launch.argument_kinds(compiled)
    names = compiled.src.fn.arg_names
    assert kinds is not None and len(kinds) == len(names)
    for name, value, kind in zip(names, args, kinds):
        if isinstance(value, torch.Tensor):
            assert kind == 1, name
        elif value == 1 and isinstance(value, int):
            assert kind == 0, name  # a constant after specialisation
        elif isinstance(value, int):
            assert kind == 2, name  # int32
        else:
            assert kind == 7, name  # compile_for_gpu types Python floats as inductor does: fp64
    assert all(k == 0 for k in kinds[len(args):])  # the constexprs after the runtime arguments
    declared = cxx_launch._ptx_parameters(compiled)
    trailing = declared - sum(k != 0 for k in kinds)
    assert 0 <= trailing <= 2  # triton's scratch pointers
    assert cxx_launch._plain_launch(compiled.metadata)


def _fake_compiled(signature, constants=None, ptx_params=None, **metadata):
    names = list(signature)
    ptx_params = len([t for t in signature.values() if t != "constexpr"]) + 2 if ptx_params is None else ptx_params
    ptx = ".visible .entry k(\n" + ",\n".join(f"\t.param .u64 k_param_{i}" for i in range(ptx_params)) + "\n)\n{"
    meta = dict(num_warps=4, shared=1024, global_scratch_size=0, profile_scratch_size=0, num_ctas=1)
    meta.update(metadata)
    return types.SimpleNamespace(
        src=types.SimpleNamespace(signature=signature, constants=constants or {},
                                  fn=types.SimpleNamespace(arg_names=names)),
        asm={"ptx": ptx}, function=0xABC, metadata=types.SimpleNamespace(**meta))


_SIGNATURE = {"x": "*bf16", "n": "i32", "eps": "fp32", "big": "i64", "flag": "i1", "BLOCK": "constexpr"}


def test_register_passes_the_launch_description(monkeypatch):
    calls = []
    ext = types.SimpleNamespace(register_kernel=lambda *a: calls.append(a) or 3)
    monkeypatch.setattr(cxx_launch, "extension", lambda: ext)
    assert cxx_launch.register(_fake_compiled(_SIGNATURE)) == 3
    assert calls == [(0xABC, 128, 1024, [1, 2, 6, 3, 8, 0], 2)]


@pytest.mark.parametrize("case", ["scratch", "profile", "ctas", "shared", "ptx", "type", "off"])
def test_unusual_launches_keep_tritons_launcher(monkeypatch, case):
    monkeypatch.setattr(cxx_launch, "extension", lambda: pytest.fail("must not build for this kernel"))
    signature = dict(_SIGNATURE)
    metadata = {"scratch": dict(global_scratch_size=64), "profile": dict(profile_scratch_size=8),
                "ctas": dict(num_ctas=2), "shared": dict(shared=229 * 1024)}.get(case, {})
    if case == "type":
        signature["desc"] = "tensordesc<bf16[64, 64]>"
    if case == "off":
        monkeypatch.setenv("ZOO_CXX_LAUNCH", "0")
    compiled = _fake_compiled(signature, ptx_params=9 if case == "ptx" else None, **metadata)
    assert cxx_launch.register(compiled) is None


@pytest.fixture
def recording_kernel(monkeypatch):
    """test_fast_launch.py's recording stand-ins for a JIT kernel (and its one compiled kernel) and the driver."""
    monkeypatch.setattr(fast_launch, "driver", test_fast_launch._Driver)
    return test_fast_launch._Kernel()


def test_fast_launch_hands_remembered_kernels_to_the_cxx_launcher(monkeypatch, recording_kernel):
    launched = []
    monkeypatch.setattr(fast_launch, "_cxx_launcher", lambda compiled: (lambda *a: launched.append(a), 7))
    launch = fast_launch.FastLaunch(recording_kernel)
    x = torch.randn(32)
    launch[(5,)](x, 32, 0.5, BLOCK=64)
    launch[(6, 2)](x, 48, 0.25, BLOCK=64)
    assert len(recording_kernel.jit) == 1 and recording_kernel.compiled.launches == []  # not Triton's launcher
    assert launched == [(7, 6, 2, 1, 1234, x, 48, 0.25, 64, False)]


def test_a_refused_cxx_launch_falls_back_to_tritons_launcher(monkeypatch, recording_kernel):
    """A driver error from the C++ launcher (say, no current context in a new thread) hands the kernel back to
    Triton's launcher, which makes the launch, and keeps it there."""
    tries = []

    def refuse(*args):
        tries.append(args)
        raise RuntimeError("zoo cxx_launch: cuLaunchKernel failed with CUDA error 201")

    monkeypatch.setattr(fast_launch, "_cxx_launcher", lambda compiled: (refuse, 0))
    launch = fast_launch.FastLaunch(recording_kernel)
    x = torch.randn(8)
    for _ in range(3):
        launch[(2,)](x, 8, 0.5, BLOCK=64)
    # the first launch compiled; the second fell back; the third stayed with Triton's launcher
    assert len(recording_kernel.jit) == 1 and len(tries) == 1 and len(recording_kernel.compiled.launches) == 2


def _buildable() -> str | None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler"
    return None


@pytest.fixture(scope="module")
def ext():
    from zoo.ops import _dispatch

    reason = _buildable()
    if reason is not None:
        pytest.skip(reason)
    cxx_launch.extension.cache_clear()  # (another test module may have loaded it and reset the keys)
    module = cxx_launch.extension()
    if module is None:
        pytest.fail("the extension did not build on a machine with a C++ compiler")
    # loading it hands the dispatch layer and FastLaunch their keys; the other test modules keep the Python ones
    # they were written against
    assert _dispatch._native_call_key is module.call_key
    assert fast_launch._native_classes is module.argument_classes
    _python_keys()
    yield module
    _python_keys()


def _python_keys() -> None:
    from zoo.ops import _dispatch

    _dispatch.use_native_call_key(None)
    fast_launch.use_native_argument_classes(None)
    _dispatch.use_call_plans(None)


def test_packed_parameters_hold_each_argument_as_the_kernel_reads_it(ext):
    index = ext.register_kernel(1, 128, 0, [1, 0, 2, 6, 1, 3, 8, 7, 4, 5], 2)
    a, b = torch.randn(4), torch.randn(3)
    raw = ext.packed(index, a, 64, -197, 1e-6, b, 2**40, True, 0.25, 2**32 - 1, 2**64 - 3)
    assert len(raw) == 8 * (9 + 2)
    slots = [raw[i:i + 8] for i in range(0, len(raw), 8)]
    assert struct.unpack("<Q", slots[0])[0] == a.data_ptr()
    assert struct.unpack("<i", slots[1][:4])[0] == -197
    assert struct.unpack("<f", slots[2][:4])[0] == struct.unpack("<f", struct.pack("<f", 1e-6))[0]
    assert struct.unpack("<Q", slots[3])[0] == b.data_ptr()
    assert struct.unpack("<q", slots[4])[0] == 2**40
    assert slots[5] == b"\x01" + bytes(7)
    assert struct.unpack("<d", slots[6])[0] == 0.25
    assert struct.unpack("<I", slots[7][:4])[0] == 2**32 - 1
    assert struct.unpack("<Q", slots[8])[0] == 2**64 - 3
    assert slots[9] == slots[10] == bytes(8)  # the scratch pointers: null
    offset = torch.randn(8)[2:]  # a view's pointer includes its offset
    raw = ext.packed(index, offset, 64, 1, 0.5, b, 1, False, 1.0, 1, 2**63)
    assert struct.unpack("<Q", raw[:8])[0] == offset.data_ptr()


def test_packing_refuses_what_does_not_fit(ext):
    index = ext.register_kernel(1, 128, 0, [1, 2], 0)
    with pytest.raises(TypeError, match="1 kernel arguments given, the kernel takes 2"):
        ext.packed(index, torch.randn(2))
    with pytest.raises(TypeError, match="must be a tensor"):
        ext.packed(index, 5, 5)
    with pytest.raises(TypeError):
        ext.packed(index, torch.randn(2), "five")
    with pytest.raises(IndexError):
        ext.packed(10**6, torch.randn(2), 5)
    with pytest.raises(OverflowError):  # a negative grid size
        ext.launch(index, -1, 1, 1, 0, torch.randn(2), 5)
    # the messages are joined without c10::str (see ZOO_CHECK in _launch.cpp): the values must still be in them
    with pytest.raises(RuntimeError, match="unknown argument kind 42$"):
        ext.register_kernel(1, 128, 0, [1, 42], 0)
    with pytest.raises(RuntimeError, match="100 kernel parameters, at most 96$"):
        ext.register_kernel(1, 128, 0, [1] * 99, 1)


def _key_corpus() -> list[tuple]:
    """Argument lists that differ in one thing each: shape, strides, dtype, device, requires_grad, offset-free views,
    scalars of each type (1, True and 1.0 are equal keys in Python, so in both), tuples, and ones without a key."""
    x = torch.zeros(2, 3)
    return [
        (x, 0.5), (torch.ones(2, 3), 0.5), (torch.zeros(3, 2), 0.5), (x.t(), 0.5), (x.t().contiguous(), 0.5),
        (x.half(), 0.5), (torch.zeros(2, 3, device="meta"), 0.5), (x.clone().requires_grad_(), 0.5), (x[1:], 0.5),
        (x, 0.25), (x, 1), (x, True), (x, 1.0), (x, "nhwc"), (x, None), (x, torch.bfloat16), (x, torch.float16),
        (x, (2, 2)), (x, (2, 2.0)), (x, (2, 3)), (x, ()), (torch.zeros(()), 0.5), (torch.zeros(0, 3), 0.5),
        (x, [2, 2]), (x, torch.Size([2, 2])), (x, (2, [2])), (x, object()), (x, x, 1), (x,), (),
        (x, torch.nn.Parameter(x)),
    ]


def test_native_call_key_tells_argument_lists_apart_as_the_python_one_does(ext):
    from zoo.ops import _dispatch

    corpus = _key_corpus()
    python_keys = [_dispatch.call_key(*args) for args in corpus]
    native_keys = [ext.call_key(*args) for args in corpus]
    for args, py, native in zip(corpus, python_keys, native_keys):
        assert (py is None) == (native is None), args
        if native is not None:
            hash(native)
    for i, j in itertools.combinations(range(len(corpus)), 2):
        if python_keys[i] is not None and python_keys[j] is not None:
            assert (python_keys[i] == python_keys[j]) == (native_keys[i] == native_keys[j]), (corpus[i], corpus[j])
    assert all(ext.call_key(*args) == key for args, key in zip(corpus, native_keys))  # stable across calls


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_native_call_key_has_none_for_tensors_without_plain_metadata(ext):
    nested = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    assert ext.call_key(nested, 1) is None
    assert ext.call_key(torch.zeros(4).to_sparse(), 1) is None


def test_ops_dispatch_alike_under_the_native_call_key(ext):
    """The same op calls, computed and checked under either key: equal outputs, and the checks still run for a bad
    input the first time its key is seen."""
    from zoo.ops import _dispatch, depthwise_conv, layer_norm

    x = torch.randn(2, 5, 6, 8)
    w = torch.randn(8, 1, 3, 3)
    want = (depthwise_conv(x, w), layer_norm(x, torch.ones(8), None, 1e-6))
    _dispatch.use_native_call_key(ext.call_key)
    try:
        for _ in range(2):
            got = (depthwise_conv(x, w), layer_norm(x, torch.ones(8), None, 1e-6))
            assert all(torch.equal(a, b) for a, b in zip(want, got))
        with pytest.raises(ValueError, match="weight"):
            layer_norm(x, torch.ones(7), None, 1e-6)
    finally:
        _dispatch.use_native_call_key(None)


def _classes_corpus() -> list[tuple]:
    """Launch argument lists that differ in one thing Triton specialises on each (and some without classes)."""
    x = torch.randn(64)
    ints = [1, 0, -1, 16, 17, 32, -16, -17, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**63 - 1, 2**63, 2**64 - 16]
    return [
        (x,), (x[1:],), (x[4:],), (x.half(),), (x.bfloat16(),), (torch.randn(8),), (torch.nn.Parameter(x),),
        (torch.zeros(4, dtype=torch.int64),), (torch.zeros(4, dtype=torch.bool),), (torch.empty(0),),
        *[(x, v) for v in ints], (x, True), (x, False), (x, 0.5), (x, 2.0), (x, None), (x, 1, 1.0),
        (x, [1, 2]), (x, torch.int32), (x, "s"), (x, (1,)), (), (x, x), (x, 16, 1e-5, None, True),
    ]


def test_native_argument_classes_key_launches_as_the_python_ones_do(ext):
    corpus = _classes_corpus()
    python = [fast_launch.argument_classes(args) for args in corpus]
    native = [ext.argument_classes(args) for args in corpus]
    for args, py, nat in zip(corpus, python, native):
        assert (py is None) == (nat is None), args
    for i, j in itertools.combinations(range(len(corpus)), 2):
        if python[i] is not None and python[j] is not None:
            assert (python[i] == python[j]) == (native[i] == native[j]), (corpus[i], corpus[j])
    assert ext.argument_classes((x := torch.randn(8), 2**70)) is None and x is not None  # beyond uint64: no class
    with pytest.raises(TypeError):
        ext.argument_classes([torch.randn(2)])


def test_fast_launch_hits_under_the_native_classes(ext, recording_kernel):
    """test_fast_launch.py's hit and miss rules, keyed by the extension's classes."""
    kernel = recording_kernel
    fast_launch.use_native_argument_classes(ext.argument_classes)
    try:
        launch = fast_launch.FastLaunch(kernel)
        x = torch.randn(32)
        launch[(5,)](x, 32, 1e-5, BLOCK=64, num_warps=4)
        launch[(7, 2)](torch.randn(16), 48, 1e-6, BLOCK=64, num_warps=4)  # other values, the same classes
        launch[(1,)](x[1:], 32, 1e-5, BLOCK=64, num_warps=4)  # misaligned: another kernel
        launch[(1,)](x, 1, 1e-5, BLOCK=64, num_warps=4)  # an int equal to 1: another kernel
        assert len(kernel.jit) == 3 and len(kernel.compiled.launches) == 1
    finally:
        fast_launch.use_native_argument_classes(None)


# ``torch.utils.cpp_extension`` stand-ins: the torches that lock a JIT build with a plain file (FileBaton, 2.11) and
# those that take an OS lock on it (filelock, 2.14)
_OLD_TORCH = types.SimpleNamespace(FileBaton=object)
_NEW_TORCH = types.SimpleNamespace(FileLock=object)


def test_a_dead_builds_lock_is_removed_before_building(tmp_path):
    """A ``lock`` file no live build holds (its builder was killed) would make every later build wait forever."""
    folder = tmp_path / "zoo_triton_launch_x"
    folder.mkdir()
    (folder / "lock").touch()
    with pytest.warns(UserWarning, match="interrupted"):
        with cxx_launch._without_stale_build_lock(_OLD_TORCH, str(folder)):
            assert not (folder / "lock").exists()


def test_a_live_build_keeps_its_lock_until_it_ends(tmp_path):
    """Another process building (holding zoo's OS lock, torch's lock file in place) is waited for, not broken into:
    the block is entered only after that build removed its own lock file and ended."""
    folder = tmp_path / "zoo_triton_launch_x"
    folder.mkdir()
    builder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, pathlib, time\n"
         f"folder = pathlib.Path({str(folder)!r})\n"
         "with filelock.FileLock(str(folder / 'zoo_build.lock')):\n"
         "    (folder / 'lock').touch(); print('building', flush=True); time.sleep(1.0)\n"
         "    (folder / 'lock').unlink(); (folder / 'built').touch()\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "building"
        with cxx_launch._without_stale_build_lock(_OLD_TORCH, str(folder)):
            assert (folder / "built").exists() and not (folder / "lock").exists()
    finally:
        builder.wait(timeout=60)


def test_torches_that_lock_builds_themselves_are_left_alone(tmp_path):
    """Where torch takes an OS lock on ``lock`` (2.14), removing that file would let a second build in."""
    folder = tmp_path / "zoo_triton_launch_x"
    folder.mkdir()
    (folder / "lock").touch()
    with cxx_launch._without_stale_build_lock(_NEW_TORCH, str(folder)):
        assert (folder / "lock").exists()
    assert not (folder / "zoo_build.lock").exists()


def test_a_build_is_announced_only_where_none_is_cached(tmp_path, caplog):
    """The first launch's silent 35-second build is what gets a process interrupted mid-build: it is announced."""
    name = "zoo_triton_launch_x"
    with caplog.at_level("WARNING", logger=cxx_launch.logger.name):
        cxx_launch._announce_a_build(str(tmp_path), name)
        (tmp_path / f"{name}.so").touch()
        cxx_launch._announce_a_build(str(tmp_path), name)
        cxx_launch._announce_a_build(None, name)
    assert [r.getMessage() for r in caplog.records] == [
        f"zoo: building the C++ Triton launcher in {tmp_path} (once per torch and Python version; about 35 s)"]
