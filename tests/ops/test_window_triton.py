"""window_attention ``triton`` backend: against the reference backend in Triton's CPU interpreter (subprocess with
TRITON_INTERPRET=1, fp32/fp16, tiny shapes), refusals on plain CPU, and on the GPU (Swin-T and CSWin-T stage shapes,
fp32/fp16/bf16 against float64, bias gradient, determinism, torch.compile, automatic dispatch)."""
from __future__ import annotations

import warnings

import pytest
import torch

import zoo.ops.triton.window as tw  # registers the backend
from zoo.ops import available_backends, registered_backends, window_attention
from zoo.ops._dispatch import select_backend
from triton_checks import assert_close_to, assert_inductor_launches, run_compiled, run_in_interpreter

NAMES = ("out", "dq", "dk", "dv", "dbias")


def make_inputs(b, heads, h, w, d, d_v=None, *, strided=False, seed=0, dtype=torch.float32, device="cpu"):
    """Seeded standard-normal q, k (B, heads, H, W, d) and v (..., d_v).

    ``strided``: the models' layout, permuted (B, heads, H, W, d) views of one (B, H, W, 3, heads, d) projection
    (d_v must equal d); the views are returned (gradients are taken with respect to them), the leaf is their base.
    """
    g = torch.Generator().manual_seed(seed)
    if strided:
        assert d_v in (None, d)
        qkv = torch.randn(b, h, w, 3, heads, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
        return list(qkv.permute(3, 0, 4, 1, 2, 5).unbind(0))
    shapes = ((b, heads, h, w, d), (b, heads, h, w, d), (b, heads, h, w, d_v or d))
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def make_bias(kind, h, w, window, heads, *, seed=5, dtype=torch.float32, device="cpu", requires_grad=True):
    """A bias of the given broadcast ``kind``: None, "heads" (heads, N, N), "window" (nW, heads, N, N), "nn" (N, N),
    or "table": (heads, N, N) as Swin gathers it, a permuted view of an (N, N, heads) tensor."""
    if kind is None:
        return None
    n, n_win = window[0] * window[1], (h // window[0]) * (w // window[1])
    shape = {"heads": (heads, n, n), "window": (n_win, heads, n, n), "nn": (n, n), "table": (n, n, heads)}[kind]
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return bias.permute(2, 0, 1) if kind == "table" else bias


def out_and_grads(q, k, v, window, *, shift=(0, 0), bias=None, scale=None, backend=None, grad_seed=7):
    """Output and gradients of sum(out * g) w.r.t. q, k, v (and the bias when it requires grad), g a fixed cotangent."""
    out = window_attention(q, k, v, window, shift_size=shift, scale=scale, bias=bias, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    inputs = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    return [out, *torch.autograd.grad(out, inputs, g)]


def oracle_out_and_grads(q, k, v, window, *, shift=(0, 0), bias=None, scale=None, grad_seed=7):
    """The reference backend in float64 on float64 copies, for the cotangent :func:`out_and_grads` uses."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bias64 = None if bias is None else bias.detach().double().requires_grad_(bias.requires_grad)
    out = window_attention(*leaves, window, shift_size=shift, scale=scale, bias=bias64, backend="reference")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(q.device, q.dtype)
    inputs = leaves + ([bias64] if bias64 is not None and bias64.requires_grad else [])
    return [out, *torch.autograd.grad(out, inputs, g.double())]


def _kwargs(**overrides):
    """The keyword arguments dispatch hands a backend (window_attention normalises them first)."""
    return dict(dict(window_size=(2, 2), shift_size=(0, 0), scale=1.0, bias=None, dropout_p=0.0), **overrides)


# ----------------------------------------------------------------------------------------------------------------
# plain CPU: registration, refusals


def test_backend_is_registered_above_sdpa():
    names = registered_backends("window_attention")
    assert names.index("triton") < names.index("sdpa") < names.index("reference")
    if tw.triton_missing_reason() is None:
        assert "triton" in available_backends("window_attention")


def test_refusals_are_explained():
    q, k, v = make_inputs(1, 2, 4, 4, 8)
    supports = tw._triton_supports
    assert "dropout_p > 0" in supports(q, k, v, **_kwargs(dropout_p=0.1))
    assert "float32/float16/bfloat16" in supports(q.double(), k.double(), v.double(), **_kwargs())
    assert "float32/float16/bfloat16" in supports(q, k, v.half(), **_kwargs())
    big = make_inputs(1, 1, 16, 17, 4)
    assert "272 tokens" in supports(*big, **_kwargs(window_size=(16, 17)))
    wide = make_inputs(1, 1, 2, 2, 8, 160)
    assert "head dims" in supports(*wide, **_kwargs())
    huge = [torch.empty(1, 2, 2**16, 2**16, 1, device="meta") for _ in range(3)]  # 2**33 elements in one image
    assert "32-bit" in supports(*huge, **_kwargs(window_size=(8, 8)))
    meta = [t.to("meta") for t in (q, k, v)]
    assert "device meta" in supports(*meta, **_kwargs())
    assert "different devices" in supports(q, k, v, **_kwargs(bias=torch.zeros(4, 4, device="meta")))
    if not tw._kernels_interpreted():
        assert "TRITON_INTERPRET=1" in supports(q, k, v, **_kwargs())
    else:
        assert "bfloat16" in supports(q.bfloat16(), k.bfloat16(), v.bfloat16(), **_kwargs())
        assert "bfloat16" in supports(q, k, v, **_kwargs(bias=torch.zeros(4, 4, dtype=torch.bfloat16)))


def test_plain_cpu_falls_back_quietly_to_sdpa():
    if tw._kernels_interpreted():
        pytest.skip("the interpreter serves CPU tensors in this process")
    q, k, v = (t.detach() for t in make_inputs(1, 2, 4, 4, 8))
    bias = make_bias("heads", 4, 4, (2, 2), 2, requires_grad=False)
    kw = _kwargs(shift_size=(1, 1), bias=bias)
    assert select_backend("window_attention", None, q, k, v, **kw).name == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # automatic choice skips the backend without a word
        auto = window_attention(q, k, v, 2, shift_size=1, bias=bias)
    assert torch.equal(auto, window_attention(q, k, v, 2, shift_size=1, bias=bias, backend="sdpa"))


def _geometry(b, heads, h, w, d, window, shift=(0, 0), dtype=torch.float32, backward=True, has_bias=True):
    """The launch geometry of a (B, heads, H, W, d) call, from shapes only (meta tensors)."""
    q = torch.empty(b, h, w, heads, d, device="meta", dtype=dtype)
    return tw._Geometry(q, q, window, shift, backward=backward, has_bias=has_bias)


def test_bias_gradient_chunks_depend_on_shapes_only():
    # Swin-T stage 0 at batch 128 in fp32 (49 tokens in two query blocks): 192 (head, window) pairs, 16 chunks of
    # 8 items, 3072 programs whose float32 partial sums stay under 32 MiB; one item a program without a bias gradient
    geo = _geometry(128, 3, 56, 56, 32, (7, 7))
    chunk = geo.items_per_program(bias_grad=True)
    assert not geo.items and geo.items_per_program() == 1
    assert chunk == 8 and geo.programs(chunk) == 3072 and geo.programs(chunk) * 49 * 49 <= tw._BIAS_PARTIAL_FLOATS
    # large windows: fewer, longer programs; never fewer than one per (head, window)
    geo = _geometry(64, 4, 48, 48, 32, (16, 16))
    assert geo.programs(geo.items_per_program(True)) * 256 * 256 <= tw._BIAS_PARTIAL_FLOATS
    assert _geometry(1, 24, 7, 7, 32, (7, 7)).items_per_program(True) == 1
    with tw.use_tiles(bias_programs=8, block_m=16):  # the interpreter case with a 2 + 1 split of 3 items
        assert _geometry(3, 2, 8, 8, 16, (4, 8)).items_per_program(True) == 2


def test_windows_of_one_query_block_with_a_bias_take_chunks_of_items():
    # Swin-S stage 2 in bf16 at batch 64: 49 tokens in one 64-row block; 48 (head, window) pairs take 5 chunks of
    # 13 items (240 programs) with or without a bias gradient, in the forward and the backward
    for backward in (False, True):
        geo = _geometry(64, 12, 14, 14, 32, (7, 7), dtype=torch.bfloat16, backward=backward)
        assert geo.items and geo.items_per_program() == geo.items_per_program(True) == 13
        assert geo.programs(13) == 240
    # without a bias (CSWin's stripes): one item a program, the per-item kernels
    geo = _geometry(64, 1, 56, 56, 32, (56, 1), dtype=torch.bfloat16, has_bias=False)
    assert not geo.items and geo.items_per_program() == 1
    with tw.use_tiles(programs=16):  # the interpreter case with a 2 + 1 split of 3 items
        assert _geometry(3, 2, 8, 8, 16, (4, 4)).items_per_program() == 2


@pytest.mark.parametrize("window,forward,backward_16,backward_32", [
    ((4, 4), 16, 16, 16), ((7, 7), 64, 64, 32), ((7, 14), 64, 32, 16), ((12, 12), 32, 16, 16)])
def test_query_blocks_shrink_with_the_window_and_in_the_backward(window, forward, backward_16, backward_32):
    q16, q32 = (torch.empty(2, 24, 28, 2, 32, device="meta", dtype=dt) for dt in (torch.float16, torch.float32))
    assert tw._Geometry(q32, q32, window, (0, 0)).block_m == forward
    assert tw._Geometry(q16, q16, window, (0, 0), backward=True).block_m == backward_16
    assert tw._Geometry(q32, q32, window, (0, 0), backward=True).block_m == backward_32
    with tw.use_tiles(block_m=16):
        assert tw._Geometry(q32, q32, window, (0, 0)).block_m == 16


def test_use_tiles_validates():
    with pytest.raises(ValueError, match="power of two"):
        with tw.use_tiles(block_m=24):
            pass
    with pytest.raises(ValueError, match="bias_programs"):
        with tw.use_tiles(bias_programs=0):
            pass
    with pytest.raises(ValueError, match="programs must be >= 1, got -2"):
        with tw.use_tiles(programs=-2):
            pass


# ----------------------------------------------------------------------------------------------------------------
# Triton interpreter (subprocess: TRITON_INTERPRET must be set before the kernels are built)

INTERPRETER_CASES = [
    # (B, heads, H, W, d, d_v, window, shift, bias kind, strided, tiles)
    (2, 2, 8, 8, 16, 16, (4, 4), (0, 0), "heads", True, {}),                  # plain windows, the models' views
    (2, 2, 8, 8, 16, 16, (4, 4), (2, 1), "table", True, {}),                  # shifted in y and x, Swin's bias view
    (2, 2, 8, 12, 8, 8, (4, 4), (1, 0), "window", False,                      # shifted in y only, per-window bias
     dict(programs=1)),                                                       # summed in one chunk: no torch sum
    (2, 2, 6, 8, 16, 16, (6, 2), (0, 0), None, True, {}),                     # column stripes (H, 2), no bias
    (2, 1, 4, 10, 8, 24, (2, 10), (0, 0), "nn", False, {}),                   # row stripes (2, W), d_v != d, (N, N)
    (2, 2, 6, 9, 12, 8, (3, 3), (1, 2), "heads", False, dict(block_m=16)),    # 9 tokens, d 12 / d_v 8: masked lanes
    (3, 2, 8, 8, 16, 16, (4, 8), (3, 5), "heads", False,                      # 32 tokens in 2 query blocks; bias
     dict(block_m=16, bias_programs=8)),                                      # grad summed over chunks of 2 + 1
    (3, 2, 8, 8, 16, 16, (4, 4), (2, 2), "table", True, dict(programs=16)),   # one block: items in chunks of 2 + 1
]


def _interpreter_fp32_checks() -> None:
    """fp32: forward and all gradients vs the reference backend at 1e-5; bitwise repeatable; the output layout."""
    warnings.filterwarnings("error", message=".*falling back")  # a silent fallback would test reference vs itself
    for i, (b, heads, h, w, d, d_v, window, shift, kind, strided, tiles) in enumerate(INTERPRETER_CASES):
        q, k, v = make_inputs(b, heads, h, w, d, d_v, strided=strided, seed=i)
        bias = make_bias(kind, h, w, window, heads, seed=i)
        kw = dict(shift=shift, bias=bias, scale=0.7 if i % 2 else None)
        assert tw._triton_supports(q, k, v, **_kwargs(window_size=window, shift_size=shift, bias=bias)) is None
        with tw.use_tiles(**tiles):
            got = out_and_grads(q, k, v, window, backend="triton", **kw)
            if tiles.get("bias_programs") or tiles.get("programs"):  # chunked sums (a second a pass interpreted)
                again = out_and_grads(q, k, v, window, backend="triton", **kw)
                for name, x, y in zip(NAMES, got, again):
                    assert torch.equal(x, y), f"{name} not bitwise repeatable"
            with torch.no_grad():  # the inference launch (no autograd node)
                inference = window_attention(q, k, v, window, shift_size=shift, scale=kw["scale"], bias=bias,
                                             backend="triton")
            assert torch.equal(inference, got[0]), f"inference output differs in case {i}"
        assert tw._kernels_interpreted()
        want = out_and_grads(q, k, v, window, backend="reference", **kw)
        assert len(got) == len(want) == (5 if kind else 4)
        for name, x, y in zip(NAMES, got, want):
            assert x.dtype == torch.float32
            assert_close_to(x, y, 1e-5, 1e-5, f"{name} case {i}: {h}x{w} window {window} shift {shift} bias {kind}")
        # (B, heads, H, W, d_v) view of a contiguous (B, H, W, heads, d_v) buffer: the models' permute is free
        assert got[0].permute(0, 2, 3, 1, 4).is_contiguous()

    # a bias that needs no gradient gets none; the others still match
    q, k, v = make_inputs(2, 2, 8, 8, 16, seed=9)
    bias = make_bias("heads", 8, 8, (4, 4), 2, requires_grad=False)
    got = out_and_grads(q, k, v, (4, 4), shift=(2, 2), bias=bias, backend="triton")
    want = out_and_grads(q, k, v, (4, 4), shift=(2, 2), bias=bias, backend="reference")
    assert len(got) == 4 and bias.grad is None
    for name, x, y in zip(NAMES, got, want):
        assert_close_to(x, y, 1e-5, 1e-5, f"frozen bias {name}")

    # an empty batch launches nothing and still has (zero) gradients
    q, k, v = make_inputs(0, 2, 8, 8, 16)
    bias = make_bias("heads", 8, 8, (4, 4), 2)
    out = window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="triton")
    assert out.shape == (0, 2, 8, 8, 16)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v, bias)] and not grads[-1].any()
    print("fp32 ok")


def _interpreter_fp16_and_compile_checks() -> None:
    """fp16 vs float64; custom-op registration (opcheck); a graph-break-free trace that matches eager; refusals."""
    warnings.filterwarnings("error", message=".*falling back")
    q, k, v = make_inputs(2, 2, 8, 8, 16, dtype=torch.float16, strided=True, seed=3)
    bias = make_bias("heads", 8, 8, (4, 4), 2)  # float32, as the models' gathered tables
    got = out_and_grads(q, k, v, (4, 4), shift=(2, 2), bias=bias, backend="triton")
    want = oracle_out_and_grads(q, k, v, (4, 4), shift=(2, 2), bias=bias)
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == (torch.float32 if name == "dbias" else torch.float16)
        assert_close_to(x, y, 2e-3, 1.5e-3, f"fp16 {name}")
    assert "bfloat16" in tw._triton_supports(q.bfloat16(), k.bfloat16(), v.bfloat16(), **_kwargs())

    q, k, v = make_inputs(2, 2, 4, 8, 16, seed=4)
    bias = make_bias("window", 4, 8, (2, 4), 2, seed=4)
    views = [t.detach().permute(0, 2, 3, 1, 4).requires_grad_() for t in (q, k, v)]
    for b in (bias, None):
        torch.library.opcheck(torch.ops.zoo.window_attention_fwd.default, (*views, b, 2, 4, 1, 2, 0.3),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    grad_out = torch.randn(views[0].shape)
    plain = [t.detach() for t in views]
    for b, bias_grad in ((bias.detach(), True), (bias.detach(), False), (None, False)):
        args = (grad_out, *plain, b, 2, 4, 1, 2, 0.3, bias_grad)
        torch.library.opcheck(torch.ops.zoo.window_attention_bwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))

    def loss(q, k, v, bias):
        return window_attention(q, k, v, (2, 4), shift_size=(1, 2), bias=bias).square().sum()

    assert select_backend("window_attention", None, q, k, v,
                          **_kwargs(window_size=(2, 4), shift_size=(1, 2), scale=0.25, bias=bias)).name == "triton"
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(loss, backend=recording_aot_eager, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    want = torch.autograd.grad(loss(q, k, v, bias), (q, k, v, bias))
    assert any("window_attention_fwd" in code for code in graphs), graphs  # the custom op, not the eager function
    for name, x, y in zip(NAMES[1:], got, want):
        assert torch.equal(x, y), f"compiled {name} differs from eager"
    print("fp16 + compile ok")


def test_triton_interpreter_fp32_fp16_determinism_custom_op_and_compile_trace():
    run_in_interpreter("test_window_triton", "_interpreter_fp32_checks", "_interpreter_fp16_and_compile_checks")


# ----------------------------------------------------------------------------------------------------------------
# GPU: Swin-T (7x7 windows, shift 3, relative position bias, head dim 32) and CSWin-T stripes (no bias), batch 8

STAGES = {
    "swin_t.s0": dict(hw=(56, 56), heads=3, window=(7, 7), shift=(3, 3), bias="table"),
    "swin_t.s0.unshifted": dict(hw=(56, 56), heads=3, window=(7, 7), shift=(0, 0), bias="heads"),
    "swin_t.s2": dict(hw=(14, 14), heads=12, window=(7, 7), shift=(3, 3), bias="table"),
    # CSWin-T: each direction gets half the heads of the stage (2, 4, 8) and half its channels, head dim 32
    "cswin_t.s0.columns": dict(hw=(56, 56), heads=1, window=(56, 1), shift=(0, 0), bias=None),
    "cswin_t.s0.rows": dict(hw=(56, 56), heads=1, window=(1, 56), shift=(0, 0), bias=None),
    "cswin_t.s1.columns": dict(hw=(28, 28), heads=2, window=(28, 2), shift=(0, 0), bias=None),
    "cswin_t.s2.rows": dict(hw=(14, 14), heads=4, window=(7, 14), shift=(0, 0), bias=None),  # 98 tokens: 2 blocks
    # Agent-Swin's 12x12 windows (144 tokens: a 256-key tile in 32-row query blocks), per-window bias
    "window12": dict(hw=(24, 24), heads=4, window=(12, 12), shift=(6, 6), bias="window"),
}
GPU_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}


def _gpu_case(stage, dtype, seed=0, batch=8):
    p = STAGES[stage]
    q, k, v = make_inputs(batch, p["heads"], *p["hw"], 32, strided=True, seed=seed, dtype=dtype, device="cuda")
    bias = make_bias(p["bias"], *p["hw"], p["window"], p["heads"], seed=seed, device="cuda")  # float32 table
    return (q, k, v), dict(shift=p["shift"], bias=bias), p["window"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", list(STAGES))
def test_gpu_triton_matches_float64(stage, dtype):
    (q, k, v), kw, window = _gpu_case(stage, dtype)
    got = out_and_grads(q, k, v, window, backend="triton", **kw)
    want = oracle_out_and_grads(q, k, v, window, **kw)
    max_abs, rel = GPU_TOL[dtype]
    assert len(got) == len(want) == (5 if kw["bias"] is not None else 4)
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == (kw["bias"].dtype if name == "dbias" else dtype) and x.shape == y.shape
        assert_close_to(x, y, max_abs, rel, f"{stage} {dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", ["swin_t.s0", "swin_t.s2", "cswin_t.s0.columns", "cswin_t.s2.rows"])
def test_gpu_automatic_dispatch_picks_triton(stage, dtype):
    (q, k, v), kw, window = _gpu_case(stage, dtype, batch=2)
    args = _kwargs(window_size=window, shift_size=kw["shift"], scale=32 ** -0.5, bias=kw["bias"])
    assert select_backend("window_attention", None, q, k, v, **args).name == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", ["swin_t.s0", "swin_t.s2", "window12"])
def test_gpu_backward_and_bias_gradient_are_bitwise_deterministic(stage, dtype):
    (q, k, v), kw, window = _gpu_case(stage, dtype, seed=1, batch=13)
    geo = tw._Geometry(q.permute(0, 2, 3, 1, 4), v.permute(0, 2, 3, 1, 4), window, kw["shift"], backward=True)
    # default chunks and 4 chunks of 4, 4, 4 and 1 items summed in order
    for programs in (None, 4 * geo.heads * geo.nwin):
        with tw.use_tiles(bias_programs=programs, programs=programs):
            first = out_and_grads(q, k, v, window, backend="triton", **kw)
            for _ in range(3):
                again = out_and_grads(q, k, v, window, backend="triton", **kw)
                for name, x, y in zip(NAMES, first, again):
                    assert torch.equal(x, y), f"{name} differs between runs (bias_programs={programs})"


@pytest.mark.gpu
@pytest.mark.parametrize("stage,kernels", [
    ("swin_t.s2", "_items_kernel"), ("cswin_t.s1.columns", "_kernel"), ("cswin_t.s2.rows", "_kernel")])
def test_gpu_torch_compile_inductor_matches_eager(stage, kernels):
    (q, k, v), kw, window = _gpu_case(stage, torch.bfloat16, seed=2)
    heads, dim = q.shape[1], q.shape[1] * q.shape[-1]
    torch.manual_seed(0)
    proj = torch.nn.Linear(dim, dim, device=q.device, dtype=q.dtype)
    bias = kw["bias"]

    def block(q, k, v, bias):
        out = window_attention(q, k, v, window, shift_size=kw["shift"], bias=bias)
        b, _, h, w, _ = out.shape
        return proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, dim)).float().square().mean()

    inputs = (q, k, v) + ((bias,) if bias is not None else ())
    compiled = torch.compile(block, fullgraph=True)
    got, code = run_compiled(lambda: torch.autograd.grad(compiled(q, k, v, bias), inputs))
    assert_inductor_launches(code, "_forward" + kernels, "_backward" + kernels)  # one block, a bias: items kernels
    want = torch.autograd.grad(block(q, k, v, bias), inputs)
    assert heads > 0 and len(got) == len(want)
    for name, x, y in zip(NAMES[1:], got, want):
        assert_close_to(x, y, 2e-2, 1e-2, f"compiled vs eager {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,num_warps", [(16, 4), (32, 8), (64, 4)])
def test_gpu_launch_variants_agree(block_m, num_warps):
    # the knobs a tuning sweep turns must not change results beyond rounding
    (q, k, v), kw, window = _gpu_case("window12", torch.bfloat16, seed=5)
    default = out_and_grads(q, k, v, window, backend="triton", **kw)
    with tw.use_tiles(block_m=block_m, num_warps=num_warps, bias_programs=1):
        variant = out_and_grads(q, k, v, window, backend="triton", **kw)
    for name, x, y in zip(NAMES, variant, default):
        assert_close_to(x, y, 2e-2, 1e-2, f"{name} block_m={block_m} num_warps={num_warps}")
