"""neighborhood_attention: NATTEN semantics vs an independent per-query float64 loop oracle, gradients, backends."""
from __future__ import annotations

import importlib.util
import itertools
import time
import warnings

import pytest
import torch

from zoo.ops import available_backends, neighborhood_attention, neighborhood_mask
from zoo.ops import neighborhood as na_mod

# FlexAttention as the flex backends use it (torch >= 2.6)
NEEDS_FLEX = pytest.mark.skipif(
    "flex" not in available_backends("neighborhood_attention"), reason="FlexAttention needs torch >= 2.6")

# (spatial, kernel, dilation, causal)
CASES = [
    ((11,), (3,), (1,), (False,)),
    ((11,), (4,), (2,), (False,)),   # even kernel, dilation with unequal groups (6 and 5)
    ((13,), (3,), (3,), (False,)),
    ((11,), (4,), (1,), (True,)),
    ((12,), (3,), (2,), (True,)),
    ((5, 6), (3, 3), (1, 1), (False, False)),
    ((7, 6), (3, 2), (2, 1), (False, False)),
    ((6, 5), (3, 3), (1, 1), (True, False)),
]


def _window_1d(i: int, length: int, kernel: int, dilation: int, causal: bool) -> list[int]:
    """NATTEN's window written from its centre-clamping form (not the start-clamping form of the op)."""
    group, qg = i % dilation, i // dilation
    group_len = len(range(group, length, dilation))
    if causal:
        keys_g = [j for j in range(qg - kernel + 1, qg + 1) if j >= 0]
    else:
        left, right = kernel // 2, kernel // 2 + (kernel % 2 - 1)
        centre = min(max(qg, left), group_len - 1 - right)
        keys_g = list(range(centre - left, centre + right + 1))
    return [group + j * dilation for j in keys_g]


def _loop_oracle(q, k, v, spatial, kernel, dilation, causal, scale):
    """float64 attention, one query at a time over its explicitly enumerated window."""
    q, k, v = (t.detach().double().flatten(2, -2) for t in (q, k, v))
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    strides = [1]
    for s in reversed(spatial[1:]):
        strides.insert(0, strides[0] * s)
    for n, coord in enumerate(itertools.product(*(range(s) for s in spatial))):
        axes = [_window_1d(c, s, ks, d, cz) for c, s, ks, d, cz in zip(coord, spatial, kernel, dilation, causal)]
        keys = [sum(c * st for c, st in zip(kc, strides)) for kc in itertools.product(*axes)]
        logits = torch.einsum("bhd,bhjd->bhj", q[:, :, n], k[:, :, keys]) * scale
        probs = torch.exp(logits - logits.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        out[:, :, n] = torch.einsum("bhj,bhjd->bhd", probs, v[:, :, keys])
    return out.reshape(*q.shape[:2], *spatial, v.shape[-1])


def _inputs(randn, spatial, d=8, dv=8, b=2, h=2, requires_grad=False, dtype=torch.float32, device="cpu"):
    return [randn(b, h, *spatial, dim, dtype=dtype, device=device, requires_grad=requires_grad, seed=s)
            for s, dim in ((1, d), (2, d), (3, dv))]


@pytest.mark.parametrize("spatial,kernel,dilation,causal", CASES)
def test_reference_matches_loop_oracle(randn, assert_close, spatial, kernel, dilation, causal):
    q, k, v = _inputs(randn, spatial, dv=6)
    out = neighborhood_attention(q, k, v, kernel, dilation, is_causal=causal, scale=0.4, backend="reference")
    expected = _loop_oracle(q, k, v, spatial, kernel, dilation, causal, 0.4)
    assert out.shape == (2, 2, *spatial, 6) and out.dtype == torch.float32
    assert_close(out, expected, atol=2e-6, rtol=1e-6, what=f"{spatial} k{kernel} d{dilation} c{causal}")


@pytest.mark.parametrize("spatial,kernel,dilation,causal", CASES[1:2] + CASES[5:7])
def test_mask_has_kernel_keys_per_query(spatial, kernel, dilation, causal):
    mask = neighborhood_mask(spatial, kernel, dilation, causal)
    expected = 1
    for ks in kernel:
        expected *= ks
    assert (mask.sum(-1) == expected).all()  # clamped windows: never fewer keys at the borders


@pytest.mark.parametrize("spatial,kernel,dilation,causal", [CASES[1], CASES[4], CASES[6]])
def test_reference_gradients_match_float64_oracle(randn, oracle, grads, assert_close, spatial, kernel, dilation,
                                                  causal):
    q, k, v = _inputs(randn, spatial, requires_grad=True)
    out = neighborhood_attention(q, k, v, kernel, dilation, is_causal=causal, backend="reference")
    got = grads(out, [q, k, v])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    allowed = neighborhood_mask(spatial, kernel, dilation, causal)
    ref = oracle(q64.flatten(2, -2), k64.flatten(2, -2), v64.flatten(2, -2), allowed).reshape(out.shape)
    want = grads(ref, [q64, k64, v64])
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-5, what=f"grad {name}")


def test_reference_gradcheck_float64(randn):
    q, k, v = _inputs(randn, (3, 4), d=3, dv=2, b=1, h=1, requires_grad=True, dtype=torch.float64)
    fn = lambda q, k, v: neighborhood_attention(q, k, v, (3, 2), (1, 2), backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    q1, k1, v1 = _inputs(randn, (7,), d=3, dv=2, b=1, h=2, requires_grad=True, dtype=torch.float64)
    fn1 = lambda q, k, v: neighborhood_attention(q, k, v, 3, is_causal=True, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn1, (q1, k1, v1))


@NEEDS_FLEX
@pytest.mark.parametrize("spatial,kernel,dilation,causal", [CASES[1], CASES[3], CASES[6], CASES[7]])
def test_flex_eager_forward_matches_reference_on_cpu(randn, assert_close, spatial, kernel, dilation, causal):
    q, k, v = _inputs(randn, spatial, d=16, dv=16)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager path warns that it is unfused
        out = na_mod._flex_forward(q, k, v, kernel_size=kernel, dilation=dilation, is_causal=causal, scale=0.25,
                                   compiled=False)
    assert time.perf_counter() - start < 20
    expected = _loop_oracle(q, k, v, spatial, kernel, dilation, causal, 0.25)
    assert_close(out, expected, atol=2e-6, rtol=1e-6, what="flex eager")


@NEEDS_FLEX
@pytest.mark.slow
def test_flex_compiled_forward_on_cpu(randn, assert_close):
    """The compiled kernel follows the block lists, unlike eager: check it once (cold compile ~15 s on 2 cores)."""
    spatial, kernel, dilation, causal = (20, 13), (5, 3), (2, 3), (False, True)
    q, k, v = _inputs(randn, spatial, d=16, dv=16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = na_mod._flex_forward(q, k, v, kernel_size=kernel, dilation=dilation, is_causal=causal, scale=0.25)
    expected = neighborhood_attention(q, k, v, kernel, dilation, is_causal=causal, scale=0.25, backend="reference")
    assert_close(out, expected, atol=2e-6, rtol=1e-6)


@NEEDS_FLEX
def test_flex_block_mask_agrees_with_dense_mask():
    # the compiled kernel trusts the block lists (eager ignores them): every allowed pair must lie in a listed block
    spatial, kernel, dilation, causal = (20, 13), (5, 3), (2, 3), (False, True)
    bm = na_mod._na_block_mask(spatial, kernel, dilation, causal, "cpu")
    dense = neighborhood_mask(spatial, kernel, dilation, causal)
    n = dense.shape[0]
    covered = bm.to_dense()[0, 0].bool().repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :n]
    assert (covered | ~dense).all()
    assert covered.float().mean() < 1.0  # and some blocks are skipped


def test_flex_refuses_cpu_training_and_dispatch_falls_back(randn, assert_close):
    q, k, v = _inputs(randn, (5, 6), d=16, dv=16, requires_grad=True)
    reason = na_mod._flex_supports(q, k, v)
    assert reason is not None and "no backward on CPU" in reason
    with pytest.warns(UserWarning, match="flex"):
        out = neighborhood_attention(q, k, v, 3, backend="flex")
    expected = neighborhood_attention(q, k, v, 3, backend="reference")
    assert_close(out, expected, atol=0.0, what="fallback")
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=7), "exceeds"),
    (dict(kernel_size=3, dilation=2), "exceeds"),
    (dict(kernel_size=(3,)), "kernel_size"),
    (dict(kernel_size=0), ">= 1"),
    (dict(kernel_size=3, is_causal=(True, 1)), "is_causal"),
])
def test_argument_errors(randn, kwargs, match):
    q, k, v = _inputs(randn, (5, 6))
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(q, k, v, **kwargs)


def test_shape_errors(randn):
    q, k, v = _inputs(randn, (5, 6))
    with pytest.raises(ValueError, match="k must have"):
        neighborhood_attention(q, k[:, :, :4], v, 3)
    with pytest.raises(ValueError, match=r"\(B, heads, L, d\)"):
        neighborhood_attention(q[0, 0], k[0, 0], v[0, 0], 3)


@pytest.mark.parametrize("spatial", [(9,), (5, 6)])
def test_empty_batch_gives_an_empty_output(spatial):
    # dispatch asks every backend whether it can serve the call; the triton backend's size check once indexed item 0
    q = torch.randn(0, 2, *spatial, 16, requires_grad=True)
    for backend in (None, *available_backends("neighborhood_attention")):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*cannot serve this input")  # flex on CPU falls back
            out = neighborhood_attention(q, q, q, 3, backend=backend)
        assert out.shape == q.shape, backend
        assert torch.autograd.grad(out.sum(), q)[0].shape == q.shape


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten is not installed")
def test_natten_package_forward_matches_reference(randn, assert_close):
    natten = pytest.importorskip("natten")
    q, k, v = _inputs(randn, (7, 6), d=16, dv=16)
    with torch.no_grad():
        ours = neighborhood_attention(q, k, v, 3, (2, 1), backend="reference")
        theirs = natten.na2d(*(na_mod._heads_last(t) for t in (q, k, v)), kernel_size=3, dilation=(2, 1)).movedim(-2, 1)
    assert_close(theirs, ours, atol=1e-5, what="natten.na2d")


# --- GPU: fast backends vs the reference (fp32 / fp16 / bf16), forward and backward ----------------------------------

GPU_CASES = [  # few: every case x dtype is a flex compile (forward and backward)
    ((56, 56), (7, 7), (1, 1), (False, False)),
    ((14, 14), (5, 3), (1, 2), (False, False)),
    ((1000,), (16,), (3,), (True,)),
]
TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _gpu_check(backend, randn, assert_close, no_fallback, spatial, kernel, dilation, causal, dtype):
    if backend not in available_backends("neighborhood_attention"):
        pytest.skip(f"{backend} is not available here")
    q, k, v = _inputs(randn, spatial, d=32, dv=32, b=2, h=4, dtype=dtype, device="cuda", requires_grad=True)
    with no_fallback():
        out = neighborhood_attention(q, k, v, kernel, dilation, is_causal=causal, backend=backend)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = neighborhood_attention(q32, k32, v32, kernel, dilation, is_causal=causal, backend="reference")
    tol = TOL[dtype]
    assert_close(out, ref, atol=tol, rtol=tol, what=f"{backend} fwd {dtype}")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (q32, k32, v32), g)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, atol=4 * tol, rtol=tol, what=f"{backend} grad {name} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial,kernel,dilation,causal", GPU_CASES)
def test_gpu_flex_matches_reference(randn, assert_close, assert_no_fallback, spatial, kernel, dilation, causal, dtype):
    _gpu_check("flex", randn, assert_close, assert_no_fallback, spatial, kernel, dilation, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial,kernel,dilation,causal", GPU_CASES[:2])
def test_gpu_natten_matches_reference(randn, assert_close, assert_no_fallback, spatial, kernel, dilation, causal,
                                      dtype):
    _gpu_check("natten", randn, assert_close, assert_no_fallback, spatial, kernel, dilation, causal, dtype)


def test_flex_auto_choice_follows_the_measured_rule():
    from zoo.ops.neighborhood import _flex_prefer

    assert _flex_prefer(torch.empty(1, 2, 56, 56, 32), None, None, dilation=(1, 1)) is None
    assert "dilation (4, 4)" in _flex_prefer(torch.empty(1, 2, 56, 56, 32), None, None, dilation=(4, 4))
    assert "196 tokens" in _flex_prefer(torch.empty(1, 2, 14, 14, 32), None, None, dilation=(1, 1))


def test_mask_cached_in_inference_mode_serves_a_later_backward():
    from zoo.ops import neighborhood as na

    na._dense_mask.cache_clear()
    q, k, v = (torch.randn(1, 2, 6, 6, 8) for _ in range(3))
    with torch.inference_mode():
        na.neighborhood_attention(q, k, v, 3, backend="reference")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    na.neighborhood_attention(*leaves, 3, backend="reference").sum().backward()
    assert all(t.grad is not None for t in leaves)
