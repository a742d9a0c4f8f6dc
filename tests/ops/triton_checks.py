"""Helpers shared by the test files of the Triton backends: float64 closeness, and checks run in Triton's CPU
interpreter (a subprocess: ``TRITON_INTERPRET`` must be set before a backend builds its kernels)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.ops.triton import interpreter_missing_reason, interpreter_requested, triton_missing_reason

HERE = Path(__file__).resolve().parent


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, max_abs: float, rel_norm: float, what: str) -> None:
    """max|a-e| <= max_abs * max|e| and ||a-e|| / ||e|| <= rel_norm, in float64; same shapes; e not all zero."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = e.abs().max().item()
    assert scale > 0, f"{what}: degenerate (all-zero) expected values"
    err = (a - e).abs().max().item()
    rel = ((a - e).norm() / e.norm()).item()
    assert err <= max_abs * scale and rel <= rel_norm, f"{what}: max|err|={err:.3g} (scale {scale:.3g}), rel={rel:.3g}"


def require_triton() -> None:
    """Skip the calling test where the Triton backends are unavailable (triton missing or too old)."""
    reason = triton_missing_reason()
    if reason is not None:
        pytest.skip(reason)


def require_interpreter() -> None:
    """Skip the calling test where Triton's CPU interpreter cannot run the kernels (see
    :func:`zoo.ops.triton.interpreter_missing_reason`)."""
    reason = interpreter_missing_reason()
    if reason is not None:
        pytest.skip(reason)


def run_in_interpreter(module: str, *checks: str) -> None:
    """Run ``module.check()`` for each named check (functions of a test file of this folder), in order, in one fresh
    interpreter with ``TRITON_INTERPRET=1``: one process start (importing torch, triton and zoo takes several seconds
    on the CI machine) for a file's checks. The message of a failure holds the failing check's traceback."""
    require_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    code = f"import {module} as t\nfor name in {checks!r}:\n    getattr(t, name)()\n    print('ok', name)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    passed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert proc.returncode == 0 and passed == list(checks), proc.stdout[-3000:] + proc.stderr[-6000:]


def interpreter_fixture(kernel):
    """A pytest fixture for the tests that run inside a ``run_pytest_in_interpreter`` subprocess: skipped outside it;
    inside, no dispatch may fall back from the requested triton backend, and ``kernel()`` (the backend's kernel
    getter) must return an interpreted kernel afterwards. Assign it to a module-level name of the test file."""
    @pytest.fixture
    def interpreter(assert_no_fallback):
        if not interpreter_requested():
            pytest.skip("runs inside the TRITON_INTERPRET=1 subprocess")
        with assert_no_fallback():
            yield
        assert type(kernel()).__name__ == "InterpretedFunction"
    return interpreter


def run_pytest_in_interpreter(test_file: str, keyword: str, passed: int) -> None:
    """Run the tests of ``test_file`` selected by ``-k keyword`` in a fresh pytest process with
    ``TRITON_INTERPRET=1`` (triton's own ``tl.sum`` & co. are built in interpreted form only when triton is imported
    with it set); all must pass and exactly ``passed`` of them run, none skipped."""
    require_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "-k", keyword]
    proc = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{passed} passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def run_compiled(fn, *args):
    """Run ``fn(*args)``, which calls ``torch.compile``d code, and return its result and the source inductor wrote
    meanwhile (forward and, if ``fn`` differentiates, backward graphs; the FX graph cache is off so nothing is
    skipped)."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    with config.patch(fx_graph_cache=False):
        result, codes = run_and_get_code(fn, *args)
    return result, "\n".join(codes)


def compiled_inference(f, x: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """``f(x)`` eager and through ``torch.compile(f, fullgraph=True)``, both without grad under CUDA autocast in
    ``dtype``: (eager result, compiled result, the source inductor wrote)."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        eager = f(x)
        got, code = run_compiled(lambda: compiled(x))
    return eager, got, code


def assert_inductor_launches(code: str, *kernels: str) -> None:
    """Where torch has ``triton_op`` (>= 2.6), inductor's code launches each named kernel itself and keeps no zoo op
    as an opaque call (about 230 us of host time each on the H200 machine); before that, the op stays a call."""
    if not hasattr(torch.library, "triton_op"):
        assert "torch.ops.zoo." in code
        return
    missing = [kernel for kernel in kernels if kernel not in code]
    assert not missing, f"inductor's code does not launch {missing}"
    assert "torch.ops.zoo." not in code, "a zoo op stayed an opaque call in the compiled graph"


class LaunchRecorder:
    """Stands in for a launcher (``zoo.ops.triton.direct`` / ``traced``): ``recorder(kernel)[grid](*args, **kw)``
    records the launch instead of running it, so the host-side launch code can run on CPU tensors."""

    def __init__(self) -> None:
        self.launches: list[tuple[object, tuple, dict]] = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((kernel, args, kwargs))
                return launch
        return _Grid()


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                 torch.bool: "i1"}


def compile_for_gpu(kernel, args: tuple, kwargs: dict, capability: int = 90):
    """Compile ``kernel`` ahead of time for an NVIDIA GPU of this compute capability (no GPU needed: triton's own
    ptxas) with the argument types of a recorded launch, typed as inductor's launcher types them (Python floats as
    fp64) and specialised as the launchers specialise (ints equal to 1 as constants; 16-byte aligned pointers and
    ints divisible by 16 marked so). Returns the compiled kernel; raises triton's CompilationError where the GPU
    would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages", "maxnreg") if name in kwargs}
    bound = {**{p.name: p.default for p in kernel.params if p.has_default}, **dict(zip(kernel.arg_names, args)),
             **kwargs}
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]  # the launchers' specialisation: 16-byte aligned pointers, ints % 16 == 0
    for i, param in enumerate(kernel.params):
        value = bound[param.name]
        specialize = not param.do_not_specialize
        if param.is_constexpr or (specialize and isinstance(value, int) and not isinstance(value, bool)
                                  and value == 1):
            signature[param.name], constexprs[(i,)] = "constexpr", value  # ints equal to 1 become constants too
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
            if specialize and value.data_ptr() % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if specialize and value % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(value, float):
            signature[param.name] = "fp64"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {param.name}={value!r} of a type no launcher passes")
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options)


def written_by(kernel, args: tuple, kwargs: dict, capability: int = 90) -> set[str]:
    """The tensor arguments that torch.compile's analysis of ``kernel``'s TTIR counts as written at this recorded
    launch (what inductor copies or orders around). Runs on CPU: the analysis only needs a compile target."""
    import triton
    from torch._higher_order_ops import triton_kernel_wrap as wrap
    from triton.backends.compiler import GPUTarget

    class _TargetOnly:  # the one thing the analysis asks of triton's (absent) GPU driver
        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

    bound = {**dict(zip(kernel.arg_names, args)), **{k: v for k, v in kwargs.items()
                                                      if k not in ("num_warps", "num_stages")}}
    driver = triton.runtime.driver
    previous = driver._active  # reset_active() would look for a GPU driver, which a CPU machine lacks
    driver.set_active(_TargetOnly())
    try:
        if hasattr(wrap, "identify_accessed_tensors"):
            written = [dep.name for dep in wrap.identify_accessed_tensors(kernel, bound, {}).read_writes.writes]
        else:  # torch <= 2.11 (the H200's): the analysis's older name, which keeps the writes only
            written = wrap.identify_mutated_tensors(kernel, bound, {})
    finally:
        driver._active = previous
    return {name for name in written if isinstance(bound.get(name), torch.Tensor)}


def assert_inference_launch_agrees(inference: torch.Tensor, training: torch.Tensor) -> None:
    """The no_grad launch (statistics stores compiled out) against the training launch's output: bitwise in the
    Triton interpreter and on CPU; on a GPU within 2 eps of the output's scale, because the compiler may pick
    another reduction layout or FMA contraction once the stores are gone (H200, triton 3.6: at most 0.95 eps in
    fp32 and 0.12 eps in fp16/bf16, both launches equally close to the float64 reference)."""
    assert inference.dtype == training.dtype and inference.shape == training.shape
    if not inference.is_cuda:
        assert torch.equal(inference, training), "inference launch differs from the training launch"
        return
    diff = (inference.double() - training.double()).abs().max().item()
    bound = 2 * torch.finfo(training.dtype).eps * training.double().abs().max().item()
    assert diff <= bound, f"inference launch differs from the training launch by {diff:.3g} (> {bound:.3g})"
