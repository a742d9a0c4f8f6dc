"""masked_attention: the span spec (causal, bidirectional prefix, key padding, dense mask) vs float64 oracles."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from zoo.ops import available_backends, masked_attention, structured_mask
from zoo.ops import masked as masked_mod

# FlexAttention as the flex backends use it (torch >= 2.6)
NEEDS_FLEX = pytest.mark.skipif(
    "flex" not in available_backends("neighborhood_attention"), reason="FlexAttention needs torch >= 2.6")

CROC_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "croc" / "mask_and_replace.safetensors"


def _loop_mask(b, lq, lk, causal, prefix, valid):
    """The rule written out pair by pair (independent of the op's vectorised form)."""
    out = torch.zeros(b, 1, lq, lk, dtype=torch.bool)
    for s in range(b):
        for i in range(lq):
            pos = i + lk - lq
            for j in range(lk):
                visible = (not causal) or j <= pos or (prefix is not None and j < int(prefix[s]))
                out[s, 0, i, j] = visible and (valid is None or j < int(valid[s]))
    return out


def _qkv(randn, b=3, h=2, lq=13, lk=13, d=8, dv=8, **kw):
    return (randn(b, h, lq, d, seed=1, **kw), randn(b, h, lk, d, seed=2, **kw), randn(b, h, lk, dv, seed=3, **kw))


SPECS = [  # causal, prefix, valid
    (True, [4, 0, 9], [13, 10, 11]),  # Croc: bidirectional prefix + causal text + right padding
    (True, None, None),
    (False, None, [13, 5, 1]),
    (True, [13, 2, 5], None),
]


@pytest.mark.parametrize("causal,prefix,valid", SPECS)
def test_structured_mask_matches_pairwise_rule(causal, prefix, valid):
    p = None if prefix is None else torch.tensor(prefix)
    vl = None if valid is None else torch.tensor(valid)
    got = structured_mask(13, 13, causal=causal, prefix_len=p, valid_len=vl)
    assert torch.equal(got.expand(3, 1, 13, 13), _loop_mask(3, 13, 13, causal, p, vl))


@pytest.mark.parametrize("causal,prefix,valid", SPECS)
def test_reference_matches_float64_oracle(randn, oracle, assert_close, causal, prefix, valid):
    q, k, v = _qkv(randn, dv=5)
    p = None if prefix is None else torch.tensor(prefix)
    vl = None if valid is None else torch.tensor(valid)
    out = masked_attention(q, k, v, causal=causal, prefix_len=p, valid_len=vl, backend="reference")
    expected = oracle(q, k, v, _loop_mask(3, 13, 13, causal, p, vl))
    assert out.shape == (3, 2, 13, 5)
    assert_close(out, expected, atol=2e-6, rtol=1e-6)


def test_kv_cache_alignment_and_dense_mask(randn, oracle, assert_close):
    # 5 queries are the last 5 of 12 positions; a dense per-head mask is ANDed with the spans
    q, k, v = _qkv(randn, lq=5, lk=12)
    dense = randn(1, 2, 5, 12, seed=9) > -0.8
    prefix, valid = torch.tensor([3, 0, 6]), torch.tensor([12, 11, 9])
    out = masked_attention(q, k, v, causal=True, prefix_len=prefix, valid_len=valid, mask=dense, scale=0.3)
    allowed = _loop_mask(3, 5, 12, True, prefix, valid) & dense
    assert_close(out, oracle(q, k, v, allowed, scale=0.3), atol=2e-6, rtol=1e-6)


def test_int_lengths_and_empty_rows_give_zeros_with_finite_grads(randn, oracle, assert_close):
    q, k, v = _qkv(randn, requires_grad=True)
    valid = torch.tensor([13, 0, 4])  # sample 1 has no key at all
    out = masked_attention(q, k, v, causal=True, prefix_len=2, valid_len=valid)
    assert out[1].abs().max() == 0
    assert out[0].abs().min() > 0
    allowed = _loop_mask(3, 13, 13, True, torch.tensor([2, 2, 2]), valid)
    assert_close(out, oracle(q, k, v, allowed), atol=2e-6, rtol=1e-6)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad[0].abs().sum() > 0
    assert q.grad[1].abs().max() == 0


@pytest.mark.parametrize("causal,prefix,valid", SPECS[:1] + SPECS[2:3])
def test_reference_gradients_match_float64_oracle(randn, oracle, grads, assert_close, causal, prefix, valid):
    q, k, v = _qkv(randn, requires_grad=True)
    p = None if prefix is None else torch.tensor(prefix)
    vl = None if valid is None else torch.tensor(valid)
    got = grads(masked_attention(q, k, v, causal=causal, prefix_len=p, valid_len=vl), [q, k, v])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = grads(oracle(q64, k64, v64, _loop_mask(3, 13, 13, causal, p, vl)), [q64, k64, v64])
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-5, what=f"grad {name}")


def test_reference_gradcheck_float64(randn):
    q, k, v = _qkv(randn, b=2, h=1, lq=6, lk=6, d=3, dv=2, dtype=torch.float64, requires_grad=True)
    prefix, valid = torch.tensor([3, 1]), torch.tensor([6, 4])
    fn = lambda q, k, v: masked_attention(q, k, v, causal=True, prefix_len=prefix, valid_len=valid)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal,prefix,valid", SPECS)
def test_flex_block_lists_cover_exactly(causal, prefix, valid):
    # compiled flex trusts the block lists: check them against block reductions of the dense mask
    lq = lk = 300
    block = 64
    p = None if prefix is None else torch.tensor(prefix) * 23
    vl = None if valid is None else torch.tensor(valid) * 23
    dense = structured_mask(lq, lk, causal=causal, prefix_len=p, valid_len=vl).expand(3, 1, lq, lk)[:, 0]
    kv_num, kv_idx, full_num, full_idx = masked_mod.span_block_lists(lq, lk, causal, p, vl, 3, block,
                                                                     torch.device("cpu"))
    assert kv_idx.data_ptr() != full_idx.data_ptr()
    nb = -(-lq // block)
    padded = torch.zeros(3, nb * block, nb * block, dtype=torch.bool)
    padded[:, :lq, :lk] = dense
    blocks = padded.view(3, nb, block, nb, block)
    valid_area = torch.zeros_like(padded)
    valid_area[:, :lq, :lk] = True
    any_b = blocks.any(-1).any(2)
    all_b = (blocks | ~valid_area.view(3, nb, block, nb, block)).all(-1).all(2)
    for s in range(3):
        for r in range(nb):
            partial = set(kv_idx[s, 0, r, : kv_num[s, 0, r]].tolist())
            full = set(full_idx[s, 0, r, : full_num[s, 0, r]].tolist())
            assert full == set(torch.nonzero(all_b[s, r]).flatten().tolist())
            assert partial == set(torch.nonzero(any_b[s, r] & ~all_b[s, r]).flatten().tolist())


@NEEDS_FLEX
def test_flex_eager_forward_matches_reference_on_cpu(randn, assert_close):
    q, k, v = _qkv(randn, lq=40, lk=40, d=16, dv=16)
    prefix, valid = torch.tensor([10, 0, 25]), torch.tensor([40, 33, 30])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager path warns that it is unfused
        out = masked_mod._flex_forward(q, k, v, causal=True, prefix_len=prefix, valid_len=valid, scale=0.25,
                                       compiled=False)
    expected = masked_attention(q, k, v, causal=True, prefix_len=prefix, valid_len=valid, scale=0.25,
                                backend="reference")
    assert_close(out, expected, atol=2e-6, rtol=1e-6)


@NEEDS_FLEX
@pytest.mark.slow
def test_flex_compiled_forward_on_cpu_uses_the_block_lists(randn, assert_close):
    """Compiled flex trusts the block lists (eager ignores them); new span values must not need a recompile."""
    q, k, v = _qkv(randn, lq=300, lk=300, d=16, dv=16)
    for prefix, valid in (([10, 0, 200], [300, 250, 130]), ([140, 5, 0], [290, 0, 300])):
        prefix, valid = torch.tensor(prefix), torch.tensor(valid)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = masked_mod._flex_forward(q, k, v, causal=True, prefix_len=prefix, valid_len=valid, scale=0.25)
        expected = masked_attention(q, k, v, causal=True, prefix_len=prefix, valid_len=valid, scale=0.25,
                                    backend="reference")
        assert_close(out, expected, atol=2e-6, rtol=1e-6)


def test_flex_refuses_cpu_grad_dense_mask_and_dropout(randn):
    q, k, v = _qkv(randn, d=16, dv=16, requires_grad=True)
    assert "no backward on CPU" in masked_mod._flex_supports(q, k, v)
    assert "CUDA only" in masked_mod._flex_supports(q.detach(), k.detach(), v.detach())
    if torch.cuda.is_available():
        qc, kc, vc = (t.detach().cuda() for t in (q, k, v))
        assert "dense mask" in masked_mod._flex_supports(qc, kc, vc, mask=torch.ones(13, 13, dtype=torch.bool))
        assert "dropout" in masked_mod._flex_supports(qc, kc, vc, dropout_p=0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prefix_len=1.5), "prefix_len"),
    (dict(valid_len=torch.tensor([1.0, 2.0, 3.0])), "valid_len"),
    (dict(valid_len=torch.tensor([1, 2])), r"shape \(3,\)"),
    (dict(mask=torch.ones(13, 13)), "boolean"),
    (dict(mask=torch.ones(4, 13, 13, dtype=torch.bool)), "broadcast"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_argument_errors(randn, kwargs, match):
    q, k, v = _qkv(randn)
    with pytest.raises(ValueError, match=match):
        masked_attention(q, k, v, causal=True, **kwargs)


def test_causal_needs_enough_keys(randn):
    q, k, v = _qkv(randn, lq=6, lk=4)
    with pytest.raises(ValueError, match="at least as many keys"):
        masked_attention(q, k, v, causal=True)


@pytest.mark.skipif(not CROC_FIXTURE.exists(), reason="Croc parity fixture not copied into tests/fixtures")
def test_croc_official_mask_is_reproduced():
    from safetensors.torch import load_file

    data = load_file(str(CROC_FIXTURE))
    official = data["output"].bool()  # (B, 1, L, L), 1 = attend
    meta = json.loads(CROC_FIXTURE.with_suffix(".json").read_text())
    assert "prefix" in " ".join(meta["notes"])
    labels = data["labels"]
    b, _, length, _ = official.shape
    # prefix = every position before the first supervised label, after splicing 576 image tokens
    first_label = (labels != -100).float().argmax(dim=1) + 575
    valid = data["attention_mask_2d"].sum(dim=1).long() + 575
    ours = structured_mask(length, length, causal=True, prefix_len=first_label, valid_len=valid)
    assert torch.equal(ours.expand_as(official), official)


# --- GPU --------------------------------------------------------------------------------------------------------------

TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("length,dtype", [(585, torch.float32), (585, torch.float16), (585, torch.bfloat16),
                                          (1024, torch.bfloat16)])
def test_gpu_flex_matches_reference(randn, assert_close, assert_no_fallback, length, dtype):
    if "flex" not in available_backends("masked_attention"):
        pytest.skip("flex is not available")
    q, k, v = (randn(3, 4, length, 64, dtype=dtype, device="cuda", requires_grad=True, seed=s) for s in (1, 2, 3))
    for spans in ((torch.tensor([9, 0, 300]), torch.tensor([length, length - 1, 400])),
                  (torch.tensor([130, 4, 0]), torch.tensor([length - 200, 0, length]))):  # new spans, same shapes
        prefix, valid = (t.cuda() for t in spans)
        with assert_no_fallback():
            out = masked_attention(q, k, v, causal=True, prefix_len=prefix, valid_len=valid, backend="flex")
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = masked_attention(q32, k32, v32, causal=True, prefix_len=prefix, valid_len=valid, backend="reference")
        tol = TOL[dtype]
        assert_close(out, ref, atol=tol, rtol=tol, what=f"flex fwd {dtype}")
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
        want = torch.autograd.grad(ref, (q32, k32, v32), g)
        for name, a, b in zip("qkv", got, want):
            assert_close(a, b, atol=4 * tol, rtol=tol, what=f"flex grad {name} {dtype}")
