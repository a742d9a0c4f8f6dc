"""neighborhood_attention ``triton`` backend: refusals and dispatch on plain CPU; output and gradients against the
float64 reference in Triton's CPU interpreter (subprocess with TRITON_INTERPRET=1: 1-D/2-D, dilation, causal axes,
even and border-filling kernels, strided inputs, d_v != d, fp32/fp16, determinism, the custom ops and a compiled
trace); on the GPU at NAT-T, DiNAT-T and a 1-D shape (tests marked ``gpu``)."""
from __future__ import annotations

import warnings

import pytest
import torch

import zoo.ops.triton.neighborhood as tn  # registers the backend
from zoo.ops import neighborhood_attention, registered_backends
from zoo.ops._dispatch import select_backend
from triton_checks import assert_close_to, assert_inductor_launches, run_compiled, run_in_interpreter


def make_inputs(b, heads, spatial, d, d_v=None, *, strided=False, seed=0, dtype=torch.float32, device="cpu"):
    """Seeded standard-normal q, k (B, heads, *spatial, d) and v (..., d_v); ``strided``: permuted views of one
    (B, *spatial, 3, heads, d) projection, as models pass them."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        qkv = torch.randn(b, *spatial, 3, heads, d, generator=g).to(device=device, dtype=dtype)
        n = len(spatial)
        return list(qkv.permute(n + 1, 0, n + 2, *range(1, n + 1), n + 3).unbind(0))
    shapes = ((b, heads, *spatial, d),) * 2 + ((b, heads, *spatial, d_v or d),)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def oracle(q, k, v, kernel, dilation=1, causal=False, scale=None):
    """The reference backend in float64 on float64 copies."""
    return neighborhood_attention(q.double(), k.double(), v.double(), kernel, dilation, is_causal=causal,
                                  scale=scale, backend="reference")


def _kwargs(q, kernel=(3, 3), dilation=(1, 1), causal=(False, False), scale=0.25):
    return dict(kernel_size=kernel[:q.ndim - 3], dilation=dilation[:q.ndim - 3], is_causal=causal[:q.ndim - 3],
                scale=scale)


def test_chosen_automatically_after_natten_before_flex():
    assert registered_backends("neighborhood_attention") == ["natten", "triton", "flex", "reference"]
    q, k, v = make_inputs(1, 1, (8, 8), 16)
    want = "triton" if tn._kernels_interpreted() else "reference"  # plain CPU tensors: only the reference serves
    assert select_backend("neighborhood_attention", None, q, k, v, **_kwargs(q)).name == want


def test_refusals_are_explained():
    q, k, v = make_inputs(1, 1, (8, 8), 16)
    supports = tn._triton_supports
    if not tn._kernels_interpreted():
        assert "TRITON_INTERPRET=1" in supports(q, k, v, **_kwargs(q))
    assert "dtypes" in supports(q, k.half(), v, **_kwargs(q))
    wide = make_inputs(1, 1, (4, 4), 16, 256)
    assert "at most 128" in supports(*wide, **_kwargs(wide[0]))


def test_tiles_cover_the_longest_dilation_group():
    assert tn._tiles((1, 70), (1, 3)) == (1, 64, 1, 1)  # groups of 24, 23, 23 positions
    assert tn._tiles((1, 130), (1, 1)) == (1, 64, 1, 3)
    assert tn._tiles((56, 56), (1, 1)) == (8, 8, 7, 7)
    assert tn._tiles((28, 28), (4, 4)) == (8, 8, 1, 1)
    assert tn._tiles((17, 19), (2, 3)) == (8, 8, 2, 1)  # 9 rows and 7 columns in the first groups


# ----------------------------------------------------------------------------------------------------------------
# Triton interpreter (subprocess: TRITON_INTERPRET must be set before the kernel is built)

# (batch, heads, spatial, d, d_v, kernel, dilation, causal, strided)
INTERPRETER_CASES = [
    (2, 2, (9, 11), 16, None, 3, 1, False, False),
    (1, 2, (12, 10), 16, 24, (5, 3), (2, 3), False, True),  # unequal dilation groups, d_v != d
    (2, 1, (20,), 16, None, 5, 2, True, False),  # 1-D causal, dilated
    (1, 2, (70,), 32, None, 7, 1, False, True),  # two query tiles of 64
    (1, 1, (17, 19), 16, None, 7, 2, (True, False), False),  # one causal axis
    (1, 1, (16, 16), 16, None, 7, 1, False, False),  # two 8 x 8 tiles per axis, windows clamped at the borders
    (1, 1, (6, 8), 16, None, (6, 4), 1, False, False),  # even kernels (extra key on the left), kernel = length
    (1, 1, (8, 9), 16, None, (2, 3), (4, 3), False, False),  # kernel * dilation = length
]


def out_and_grads(q, k, v, kernel, dilation=1, causal=False, backend="triton", grad_seed=7):
    """Output and the gradients of sum(out * g) w.r.t. q, k, v (leaves made here), g a fixed cotangent."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = neighborhood_attention(*leaves, kernel, dilation, is_causal=causal, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, leaves, g)]


def _interpreter_checks() -> None:
    """Output and gradients in fp32 and fp16 against float64 on every case, bitwise repeatable, the inference launch
    equal to the training one; the custom ops; a graph-break-free compiled trace with its backward."""
    warnings.filterwarnings("error", message=".*falling back")
    assert tn._kernels_interpreted()
    q, k, v = make_inputs(1, 1, (8, 8), 16)
    assert select_backend("neighborhood_attention", None, q, k, v, **_kwargs(q)).name == "triton"  # automatic
    for i, (b, heads, spatial, d, d_v, kernel, dil, causal, strided) in enumerate(INTERPRETER_CASES):
        for dtype, tol in ((torch.float32, 2e-6), (torch.float16, 2e-3)):
            q, k, v = make_inputs(b, heads, spatial, d, d_v, strided=strided, seed=i, dtype=dtype)
            got = out_and_grads(q, k, v, kernel, dil, causal)
            want = out_and_grads(q.double(), k.double(), v.double(), kernel, dil, causal, backend="reference")
            assert got[0].dtype == dtype and got[0].shape == (*q.shape[:-1], v.shape[-1])
            for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
                assert_close_to(x, y, tol, tol, f"case {i} {dtype} {name}")
            if dtype == torch.float32 and i in (0, 3):  # repeatability: a 2-D and a 1-D case (each pass costs secs)
                for name, x, y in zip(("out", "dq", "dk", "dv"), got, out_and_grads(q, k, v, kernel, dil, causal)):
                    assert torch.equal(x, y), f"case {i}: {name} not bitwise repeatable"
            if dtype == torch.float32:
                with torch.no_grad():  # the inference launch (no autograd node, no statistics)
                    assert torch.equal(neighborhood_attention(q, k, v, kernel, dil, is_causal=causal,
                                                              backend="triton"), got[0])
    empty = [t[:0].detach().requires_grad_() for t in make_inputs(2, 2, (7, 9), 16, seed=12)]  # an empty batch
    out = neighborhood_attention(*empty, 3, backend="triton")
    assert out.shape == (0, 2, 7, 9, 16) and torch.autograd.grad(out.sum(), empty[0])[0].shape == empty[0].shape
    q, k, v = make_inputs(2, 2, (7, 9), 16, seed=11)
    args = ([3, 5], [2, 1], [False, True], 0.3)
    for stats in (True, False):
        torch.library.opcheck(torch.ops.zoo.neighborhood_attention_fwd.default,
                              (*[t.requires_grad_(stats) for t in (q, k, v)], *args, stats),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = torch.ops.zoo.neighborhood_attention_fwd(q.detach(), k.detach(), v.detach(), *args, True)
    torch.library.opcheck(torch.ops.zoo.neighborhood_attention_bwd.default,
                          (torch.randn(out.shape), q.detach(), k.detach(), v.detach(), out, lse, *args),
                          test_utils=("test_schema", "test_faketensor"))
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def loss(q, k, v):
        return neighborhood_attention(q, k, v, (3, 5), (2, 1), is_causal=(False, True),
                                      backend="triton").square().sum()

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(torch.compile(loss, backend=recording_aot_eager, fullgraph=True)(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    assert any("neighborhood_attention_fwd" in code for code in graphs), graphs  # the op, not the eager function
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(x, y), f"compiled {name} differs from eager"
    print("interpreter ok")


def test_triton_interpreter_matches_float64_custom_op_and_compile_trace():
    run_in_interpreter("test_neighborhood_triton", "_interpreter_checks")


# ----------------------------------------------------------------------------------------------------------------
# GPU

GPU_STAGES = {"nat_t.s0": ((56, 56), 2, 7, 1), "dinat_t.s1": ((28, 28), 4, 7, 4), "na1d": ((1024,), 4, 13, 2)}


def _gpu_case(stage, dtype, batch=8, seed=0):
    spatial, heads, kernel, dil = GPU_STAGES[stage]
    return make_inputs(batch, heads, spatial, 32, strided=True, seed=seed, dtype=dtype, device="cuda"), kernel, dil


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stage", list(GPU_STAGES))
def test_gpu_triton_matches_float64(stage, dtype):
    (q, k, v), kernel, dil = _gpu_case(stage, dtype)
    got = out_and_grads(q, k, v, kernel, dil)
    want = out_and_grads(q.double(), k.double(), v.double(), kernel, dil, backend="reference")
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_to(x, y, tol, tol, f"{stage} {dtype} {name}")
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, out_and_grads(q, k, v, kernel, dil)):
        assert torch.equal(x, y), f"{stage} {dtype}: {name} not bitwise repeatable"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_torch_compile_launches_the_kernels():
    (q, k, v), kernel, dil = _gpu_case("nat_t.s0", torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def loss(q, k, v):
        return neighborhood_attention(q, k, v, kernel, dil, backend="triton").float().square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    got, code = run_compiled(lambda: torch.autograd.grad(compiled(*leaves), leaves))
    assert_inductor_launches(code, "_forward_kernel", "_dq_kernel", "_dkv_kernel")
    for name, x, y in zip(("dq", "dk", "dv"), got, torch.autograd.grad(loss(*leaves), leaves)):
        assert_close_to(x, y, 1e-2, 1e-2, f"compiled {name}")
