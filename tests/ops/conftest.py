"""Shared helpers for the ops tests: float64 oracles, random inputs, closeness checks, the gpu marker.

Tests reach them through the fixtures at the bottom (``oracle``, ``randn``, ``assert_close``, ``grads``): several
test folders have a conftest.py, so ``import conftest`` would be ambiguous.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


def make_randn(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               requires_grad: bool = False, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal tensor (times ``scale``) from a seeded generator; never zeros, reproducible per seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def dense_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """float64 attention ``softmax(q k^T * scale + bias | allowed) v``; rows with no allowed key are zero.

    q (..., Lq, d), k (..., Lk, d), v (..., Lk, d_v); ``allowed`` boolean and ``bias`` float broadcastable to
    (..., Lq, Lk). Returns float64 (..., Lq, d_v). Written with explicit exp/sum, not softmax or SDPA.
    """
    q, k, v = (t.double() for t in (q, k, v))  # differentiable: float64 leaves give oracle gradients
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("...id,...jd->...ij", q, k) * scale
    if bias is not None:
        logits = logits + bias.double()
    if allowed is None:
        allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed = allowed.expand_as(logits)
    logits = logits.masked_fill(~allowed, -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)  # empty rows: -inf -> 0
    weights = torch.exp(logits - row_max) * allowed
    denom = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(denom > 0, weights / denom.clamp(min=1e-300), torch.zeros_like(weights))
    return torch.einsum("...ij,...jd->...id", probs, v)


def check_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0,
                what: str = "") -> tuple[float, float]:
    """Assert max|a-e| <= atol and ||a-e|| / ||e|| <= rtol (when rtol > 0); returns both numbers."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    max_abs = (a - e).abs().max().item()
    rel = ((a - e).norm() / e.norm().clamp(min=1e-30)).item()
    assert max_abs <= atol, f"{what}: max|a-e| = {max_abs:.3g} > {atol:.3g} (rel {rel:.3g})"
    if rtol > 0:
        assert rel <= rtol, f"{what}: relative norm {rel:.3g} > {rtol:.3g} (max abs {max_abs:.3g})"
    return max_abs, rel


def grads_of(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 123) -> list[torch.Tensor]:
    """Gradients of ``sum(out * g)`` for a fixed random cotangent ``g`` (zero for inputs that get none)."""
    g = make_randn(*out.shape, dtype=out.dtype, device=out.device, seed=seed)
    grads = torch.autograd.grad(out, inputs, grad_outputs=g, allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]


@contextlib.contextmanager
def no_fallback():
    """Fail if a dispatch inside falls back from the requested backend (a silent fallback would test the reference
    against itself); other warnings (compile notices and the like) pass through."""
    from zoo.ops import _dispatch

    _dispatch._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert not fallbacks, fallbacks


@pytest.fixture
def oracle():
    return dense_oracle


@pytest.fixture
def randn():
    return make_randn


@pytest.fixture
def assert_close():
    return check_close


@pytest.fixture
def grads():
    return grads_of


@pytest.fixture
def assert_no_fallback():
    return no_fallback


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    """Dispatch warns once per (op, backend, reason) per process; each test must see its own fallback warning."""
    from zoo.ops import _dispatch

    _dispatch._WARNED.clear()
    yield
