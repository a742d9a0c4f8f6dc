"""routing_attention reference backend against an independent dense masked-SDPA oracle (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.ops import routing_attention


def dense_routing_oracle(q, k, v, *, num_heads, region_size, topk, scale, routing_scale=None):
    """BRA as dense attention with a region mask: NHWC in/out, float64, written independently of the op.

    Descriptors use avg_pool2d(ceil_mode, count_include_pad=False) as the official nchwBRA does; q, k, v are
    zero-padded (padded keys take part, unmasked) and the output is cropped.
    """
    b, h, w, c_qk = q.shape
    rh, rw = region_size
    q_desc, k_desc = (F.avg_pool2d(t.detach().permute(0, 3, 1, 2), (rh, rw), ceil_mode=True,
                                   count_include_pad=False).flatten(2).transpose(1, 2) for t in (q, k))
    affinity = (q_desc * routing_scale if routing_scale is not None else q_desc) @ k_desc.transpose(1, 2)
    selected = torch.zeros_like(affinity, dtype=torch.bool)
    selected.scatter_(-1, affinity.topk(topk, dim=-1).indices, True)  # (B, R, R)

    pad = (0, 0, 0, -w % rw, 0, -h % rh)
    qp, kp, vp = (F.pad(t, pad) for t in (q, k, v))
    hp, wp = qp.shape[1:3]
    rows = torch.arange(hp).repeat_interleave(wp) // rh
    cols = torch.arange(wp).repeat(hp) // rw
    region_of_token = rows * (wp // rw) + cols  # raster region id of every raster token
    mask = selected[:, region_of_token][:, :, region_of_token]  # (B, N, N)

    def heads(t):
        return t.reshape(b, hp * wp, num_heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(qp), heads(kp), heads(vp), attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b, hp, wp, -1)[:, :h, :w]


CASES = [
    # (H, W, region_size, topk, heads, C_qk, C_v, routing_scale)
    pytest.param(8, 8, (2, 2), 3, 2, 8, 8, None, id="divisible"),
    pytest.param(8, 12, (4, 3), 2, 1, 4, 6, 0.5, id="rect-regions-cv-differs"),
    pytest.param(7, 10, (3, 4), 4, 2, 8, 4, None, id="padded"),
    pytest.param(5, 5, (5, 5), 1, 2, 4, 4, None, id="single-region-is-full-attention"),
]


def _inputs(b, h, w, c_qk, c_v, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, w, c_qk, generator=g, dtype=dtype)
    k = torch.randn(b, h, w, c_qk, generator=g, dtype=dtype)
    v = torch.randn(b, h, w, c_v, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("h,w,region,topk,heads,c_qk,c_v,rscale", CASES)
def test_reference_matches_dense_oracle_forward_and_grad(h, w, region, topk, heads, c_qk, c_v, rscale):
    q, k, v = (t.requires_grad_() for t in _inputs(2, h, w, c_qk, c_v))
    kwargs = dict(num_heads=heads, region_size=region, topk=topk, scale=c_qk ** -0.5, routing_scale=rscale)
    out = routing_attention(q, k, v, backend="reference", **kwargs)
    ref = dense_routing_oracle(q, k, v, **kwargs)
    assert out.shape == (2, h, w, c_v)
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() < 1e-12

    w_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * w_out).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w_out).sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        assert g_ref.abs().max() > 1e-3
        assert (g - g_ref).abs().max().item() < 1e-12


def test_single_region_equals_full_attention():
    q, k, v = _inputs(1, 4, 4, 8, 8, seed=3)
    out = routing_attention(q, k, v, num_heads=2, region_size=4, topk=1, scale=0.3)
    heads = [t.reshape(1, 16, 2, 4).transpose(1, 2) for t in (q, k, v)]
    full = F.scaled_dot_product_attention(*heads, scale=0.3).transpose(1, 2).reshape(1, 4, 4, 8)
    assert (out - full).abs().max().item() < 1e-13


def test_nchw_layout_equals_nhwc():
    q, k, v = _inputs(2, 7, 9, 8, 8, seed=1)
    kw = dict(num_heads=2, region_size=(2, 3), topk=3, scale=0.25)
    nhwc = routing_attention(q, k, v, layout="nhwc", **kw)
    nchw = routing_attention(*(t.permute(0, 3, 1, 2) for t in (q, k, v)), layout="nchw", **kw)
    assert nchw.shape == (2, 8, 7, 9)
    assert (nchw.permute(0, 2, 3, 1) - nhwc).abs().max().item() == 0.0


def test_routing_is_detached_and_topk_all_is_dense_over_padded_map():
    # with topk = all regions the routing choice no longer matters: dense attention over the zero-padded map
    q, k, v = (t.requires_grad_() for t in _inputs(1, 5, 6, 4, 4, seed=2))
    out = routing_attention(q, k, v, num_heads=1, region_size=(2, 4), topk=6, scale=0.5)
    qp, kp, vp = (F.pad(t, (0, 0, 0, 2, 0, 1)).reshape(1, 1, 48, 4) for t in (q, k, v))
    dense = F.scaled_dot_product_attention(qp, kp, vp, scale=0.5).reshape(1, 6, 8, 4)[:, :5, :6]
    assert (out - dense).abs().max().item() < 1e-13


def test_gradcheck_tiny_padded():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 3, 5, 4, 2, seed=4))
    assert q.abs().max() > 0.5

    def fn(q, k, v):
        return routing_attention(q, k, v, num_heads=2, region_size=2, topk=2, scale=0.7)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_float32_close_to_float64():
    q, k, v = _inputs(2, 8, 8, 16, 16, seed=5)
    kw = dict(num_heads=4, region_size=2, topk=4, scale=16 ** -0.5)
    out64 = routing_attention(q, k, v, **kw)
    out32 = routing_attention(q.float(), k.float(), v.float(), **kw)
    assert out32.dtype == torch.float32
    rel = (out32.double() - out64).norm() / out64.norm()
    assert rel.item() < 1e-6


@pytest.mark.parametrize("bad,match", [
    (dict(layout="hwc"), "layout"),
    (dict(num_heads=3), "num_heads"),
    (dict(region_size=0), "region_size"),
    (dict(region_size=(2, 2, 2)), "region_size"),
    (dict(topk=17), r"topk must be an int in \[1, 16\]"),
    (dict(topk=0), "topk"),
    (dict(routing_scale=-1.0), "routing_scale"),
])
def test_errors_name_the_argument(bad, match):
    q, k, v = _inputs(1, 8, 8, 4, 4)
    kw = dict(num_heads=2, region_size=2, topk=2, scale=0.5)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        routing_attention(q, k, v, **kw)


def test_shape_mismatch_errors():
    q, k, v = _inputs(1, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="q and k"):
        routing_attention(q, k[:, :4], v, num_heads=1, region_size=2, topk=1, scale=1.0)
    with pytest.raises(ValueError, match="v must share"):
        routing_attention(q, k, v[:, :4], num_heads=1, region_size=2, topk=1, scale=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_reference():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 14, 14, 64, 64, seed=6, dtype=torch.float32))
    kw = dict(num_heads=2, region_size=2, topk=16, scale=64 ** -0.5)
    out_cpu = routing_attention(q, k, v, **kw)
    qc, kc, vc = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    out_gpu = routing_attention(qc, kc, vc, **kw)
    assert (out_gpu.cpu() - out_cpu).abs().max().item() < 1e-4
    out_gpu.square().sum().backward()
    out_cpu.square().sum().backward()
    assert (qc.grad.cpu() - q.grad).abs().max().item() < 1e-3


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_empty_batch(layout):
    shape = (0, 8, 8, 16) if layout == "nhwc" else (0, 16, 8, 8)
    q = torch.randn(shape)
    out = routing_attention(q, q, q, num_heads=2, region_size=2, topk=2, scale=0.3, layout=layout, backend="reference")
    assert out.shape == shape


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("h,w,region,topk,heads,c_qk,c_v,rscale", CASES)
def test_sdpa_backend_matches_the_gather_reference(h, w, region, topk, heads, c_qk, c_v, rscale, layout):
    q, k, v = (t.requires_grad_() for t in _inputs(2, h, w, c_qk, c_v, seed=3))
    if layout == "nchw":
        q, k, v = (t.detach().permute(0, 3, 1, 2).contiguous().requires_grad_() for t in (q, k, v))
    kwargs = dict(num_heads=heads, region_size=region, topk=topk, scale=c_qk ** -0.5, routing_scale=rscale,
                  layout=layout)
    out = routing_attention(q, k, v, backend="sdpa", **kwargs)
    ref = routing_attention(q, k, v, backend="reference", **kwargs)
    assert out.shape == ref.shape and ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() < 1e-12
    w_out = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad((out * w_out).sum(), (q, k, v)),
                        torch.autograd.grad((ref * w_out).sum(), (q, k, v))):
        assert g_ref.abs().max() > 1e-3 and (g - g_ref).abs().max().item() < 1e-12


def test_sdpa_backend_float32_bfloat16_and_empty_batch():
    q, k, v = _inputs(2, 14, 14, 64, 64, seed=4, dtype=torch.float32)
    kw = dict(num_heads=2, region_size=2, topk=16, scale=64 ** -0.5)
    ref = routing_attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert (routing_attention(q, k, v, backend="sdpa", **kw).double() - ref).abs().max().item() < 1e-5
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref = routing_attention(qb.double(), kb.double(), vb.double(), backend="reference", **kw)  # same routing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routing_attention(qb, kb, vb, backend="sdpa", **kw)
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max().item() < 0.02
    empty = torch.randn(0, 8, 8, 16)
    assert routing_attention(empty, empty, empty, num_heads=2, region_size=2, topk=8, scale=0.3,
                             backend="sdpa").shape == (0, 8, 8, 16)


def test_auto_choice_masks_densely_only_when_the_routed_keys_are_a_large_share():
    from zoo.ops._dispatch import select_backend

    def pick(hw, region, topk):
        q = torch.randn(1, hw, hw, 32)
        return select_backend("routing_attention", None, q, q, q, num_heads=1, region_size=(region, region),
                              topk=topk, scale=0.2, routing_scale=None, layout="nhwc").name

    assert pick(14, 2, 16) == "sdpa"  # BiFormer stage 2: 16 of 49 regions
    assert pick(28, 4, 4) != "sdpa" and pick(56, 8, 1) != "sdpa"  # stages 1 and 0: 4 and 1 of 49


def test_masked_dense_pass_is_never_preferred_on_cuda():
    from types import SimpleNamespace

    from zoo.ops.routing import _sdpa_prefer

    stage2 = dict(region_size=(2, 2), topk=16, layout="nhwc")
    cuda_q = SimpleNamespace(is_cuda=True, shape=(1, 14, 14, 32))  # the rule reads only the device and the shape
    assert "Triton" in _sdpa_prefer(cuda_q, None, None, **stage2)
    assert _sdpa_prefer(torch.empty(1, 14, 14, 32), None, None, **stage2) is None
