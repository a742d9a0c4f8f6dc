"""routing_attention ``triton`` backend: against the reference backend in Triton's CPU interpreter (subprocess with
TRITON_INTERPRET=1, fp32/fp16, tiny shapes) and on the GPU (BiFormer-T stage shapes, fp32/fp16/bf16, determinism,
torch.compile); the torch-side helpers (routing, inverse routing lists) and refusals on plain CPU."""
from __future__ import annotations

import itertools
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import zoo.ops.triton.routing as rt  # registers the backend
from zoo.ops import available_backends, registered_backends, routing_attention
from zoo.ops._dispatch import select_backend
from zoo.ops.routing import _from_regions, _gather_regions, _pad_to_regions, _split_heads, _to_regions, route
from triton_checks import assert_close_to, assert_inductor_launches, run_compiled, run_in_interpreter


def make_inputs(b, h, w, c_qk, c_v, *, seed=0, dtype=torch.float32, device="cpu", layout="nhwc"):
    """Seeded standard-normal q, k (C_qk channels), v (C_v) with requires_grad, in the given layout."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, h, w, c, generator=g) for c in (c_qk, c_qk, c_v)]
    if layout == "nchw":
        tensors = [t.permute(0, 3, 1, 2) for t in tensors]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]


def out_and_grads(q, k, v, grad_seed=7, **kwargs):
    """Output and gradients of sum(out * g) for a fixed random cotangent g."""
    out = routing_attention(q, k, v, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def attention_with_index(q, k, v, index, *, num_heads, region_size, scale):
    """float64 routed attention for a given (B, R, topk) index, NHWC in/out (reference helpers, explicit softmax)."""
    b, h, w, _ = q.shape
    q, k, v = (_pad_to_regions(t.double(), region_size) for t in (q, k, v))
    grid = (q.shape[1] // region_size[0], q.shape[2] // region_size[1])
    q_reg, k_reg, v_reg = (_to_regions(t, region_size) for t in (q, k, v))
    index = index.long()
    k_sel = _split_heads(_gather_regions(k_reg, index), num_heads)
    v_sel = _split_heads(_gather_regions(v_reg, index), num_heads)
    attn = torch.softmax(_split_heads(q_reg, num_heads) @ k_sel.transpose(-1, -2) * scale, dim=-1)
    out = (attn @ v_sel).transpose(2, 3)
    return _from_regions(out.reshape(*out.shape[:3], -1), grid, region_size)[:, :h, :w]


def oracle_out_and_grads(q, k, v, index, *, num_heads, region_size, scale, layout="nhwc", grad_seed=7, **_):
    """float64 output and gradients (w.r.t. float64 copies) for the cotangent :func:`out_and_grads` uses."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    q64, k64, v64 = (t.permute(0, 2, 3, 1) if layout == "nchw" else t for t in leaves)
    out = attention_with_index(q64, k64, v64, index, num_heads=num_heads, region_size=region_size, scale=scale)
    out = out.permute(0, 3, 1, 2) if layout == "nchw" else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(q.device, q.dtype)
    return (out, *torch.autograd.grad(out, leaves, g.double()))


# ----------------------------------------------------------------------------------------------------------------
# plain CPU: registration, refusals, torch-side helpers


def test_backend_is_registered_above_reference():
    names = registered_backends("routing_attention")
    assert names.index("triton") < names.index("reference")
    if rt.triton_missing_reason() is None:
        assert "triton" in available_backends("routing_attention")
        from zoo.ops import bench

        assert "triton" in bench._backends("routing_attention")  # the bench enumerates it


def test_refusals_are_explained():
    q, k, v = make_inputs(1, 4, 4, 8, 8)
    kw = dict(num_heads=2, region_size=(2, 2), topk=2, scale=0.5)
    assert "float32/float16/bfloat16" in rt._triton_supports(q.double(), k.double(), v.double(), **kw)
    assert "float32/float16/bfloat16" in rt._triton_supports(q, k, v.half(), **kw)
    wide = make_inputs(1, 4, 4, 512, 8)
    assert "head dims" in rt._triton_supports(*wide, **{**kw, "num_heads": 2})
    if not rt._kernels_interpreted():
        assert "TRITON_INTERPRET=1" in rt._triton_supports(q, k, v, **kw)
        few = dict(kw, region_size=(1, 1))  # 2 of 16 regions: the masked dense pass is not preferred either
        with torch.no_grad():  # automatic choice falls back to the reference quietly
            assert torch.equal(routing_attention(q, k, v, **few), routing_attention(q, k, v, backend="reference",
                                                                                    **few))
    else:
        assert "bfloat16" in rt._triton_supports(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)


def test_route_matches_avg_pool_descriptors_with_padding():
    q, k, _ = make_inputs(2, 7, 10, 6, 6, seed=3, dtype=torch.float64)
    region, topk = (3, 4), 4
    index = route(q, k, region, topk, routing_scale=0.5)
    q_desc, k_desc = (F.avg_pool2d(t.detach().permute(0, 3, 1, 2), region, ceil_mode=True, count_include_pad=False)
                      .flatten(2).transpose(1, 2) for t in (q, k))
    expected = (q_desc * 0.5 @ k_desc.transpose(1, 2)).topk(topk, dim=-1).indices
    assert torch.equal(index.sort(-1).values, expected.sort(-1).values)  # the same regions, in any order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("region,routing_scale", [((2, 2), None), ((4, 2), 0.3), ((3, 2), None)])
def test_route_reads_strided_maps_without_changing_the_choice(dtype, region, routing_scale):
    # an NCHW tensor's channels-last view routes exactly like the same values stored contiguously
    q, k, _ = make_inputs(2, 12, 8, 16, 16, seed=4, dtype=dtype)
    q_nchw, k_nchw = (t.permute(0, 3, 1, 2).contiguous() for t in (q, k))
    strided = route(q_nchw.permute(0, 2, 3, 1), k_nchw.permute(0, 2, 3, 1), region, 5, routing_scale)
    assert not q_nchw.permute(0, 2, 3, 1).is_contiguous()
    assert torch.equal(strided, route(q, k, region, 5, routing_scale))
    assert_is_a_top_k(strided, q, k, region, 5)


def test_maps_of_more_than_64_regions_route_with_route():
    q, k, _ = make_inputs(2, 18, 18, 8, 8, seed=2)  # 81 regions of 2x2: more than the routing kernels' tile
    assert torch.equal(rt._route(q, k, (2, 2), 3, None), route(q, k, (2, 2), 3, None))


def check_inverse_routing(device: str = "cpu") -> None:
    """Every selection listed once, per key region, in ascending query order (the dK/dV summation order)."""
    g = torch.Generator().manual_seed(0)
    b, r, topk = 3, 6, 2
    index = torch.stack([torch.stack([torch.randperm(r, generator=g)[:topk] for _ in range(r)]) for _ in range(b)])
    offsets, sources = (t.cpu() for t in rt._inverse_routing(index.to(device)))
    assert offsets.dtype == sources.dtype == torch.int32 and offsets[-1] == b * r * topk
    for batch in range(b):
        for key in range(r):
            g_key = batch * r + key
            listed = sources[offsets[g_key]:offsets[g_key + 1]].tolist()
            chose = [batch * r + query for query in range(r) if key in index[batch, query].tolist()]
            assert listed == chose
    if device == "cuda" or rt._kernels_interpreted():  # the kernel's lists equal the sort path's at BiFormer's size
        index = torch.stack([torch.stack([torch.randperm(49, generator=g)[:16] for _ in range(49)]) for _ in range(3)])
        kernel = rt._inverse_routing(index.to(device))
        with mock.patch.object(rt, "_kernels_interpreted", lambda: False):
            sort = rt._inverse_routing(index)  # CPU tensors, not interpreted: the sort path
        assert all(torch.equal(a.cpu(), b) for a, b in zip(kernel, sort))


def test_inverse_routing_lists_every_selection_once_in_order():
    check_inverse_routing()  # the sort path here; the one-launch kernel in the interpreter subprocess and on GPU


@pytest.mark.gpu
def test_gpu_inverse_routing_kernel_lists_every_selection_once_in_order():
    check_inverse_routing("cuda")


@pytest.mark.parametrize("knob, message", [
    (dict(max_block=24), "power of two"), (dict(backward="dense"), "backward='dense'.*'routed', 'masked'"),
    (dict(query_regions=0), "query_regions=0 must be an int >= 1"),
    (dict(heads_per_tile=2.0), "heads_per_tile=2.0 must be an int >= 1")])
def test_use_tiles_validates(knob, message):
    with pytest.raises(ValueError, match=message):
        with rt.use_tiles(**knob):
            pass


def _geometry(h, w, region, topk, channels=64, heads=2, batch=2):
    """The launch geometry of a call (meta tensors: shapes only)."""
    q = torch.empty(batch, h, w, channels, device="meta")
    index = torch.empty(batch, -(-h // region[0]) * -(-w // region[1]), topk, dtype=torch.int64, device="meta")
    return rt._Geometry(q, q, index, heads, *region)


def test_heads_share_a_tile_where_it_holds_two_regions_or_more():
    with rt.use_tiles(heads_per_tile=4):
        stage2 = _geometry(14, 14, (2, 2), 16, channels=256, heads=8)  # BiFormer-T stage 2: 4-token regions
        assert (stage2.hp, stage2.block_packed, stage2.query_tiles(1, stage2.hp)) == (4, 16, 2 * 2 * 49)
        assert stage2.masked_backward()  # the backward never packs: 16-row tiles of 4 rows, as unpacked
        assert _geometry(28, 28, (4, 4), 4, channels=128, heads=4).hp == 4  # 16-token regions: 4 a 64-row tile
        assert _geometry(56, 56, (8, 8), 1, channels=64, heads=2).hp == 1  # 64-token regions fill a tile alone
        assert _geometry(14, 14, (2, 2), 16, channels=64, heads=2).hp == 2  # no more than the heads
    with rt.use_tiles(heads_per_tile=32, max_block=32):
        assert _geometry(15, 15, (3, 3), 4, channels=256, heads=8).hp == 3  # 9-token regions: 3 fill 32 rows
    plain = _geometry(14, 14, (2, 2), 16, channels=256, heads=8)
    assert plain.hp == 1 and plain.masked_backward()  # meta tensors are not CUDA: one head a tile


@pytest.mark.parametrize("stage, batch, sms, dtype, packed", [
    ("T.s2", 128, 132, torch.bfloat16, 2), ("B.s2", 128, 132, torch.float16, 2), ("T.s2", 128, 132, torch.float32, 1),
    ("T.s2", 128, None, torch.bfloat16, 1), ("T.s2", 32, 132, torch.bfloat16, 1), ("T.s2", 64, 132, torch.bfloat16, 2),
    ("T.s1", 128, 132, torch.bfloat16, 1), ("one head", 128, 132, torch.bfloat16, 1)])
def test_default_packs_two_heads_where_two_regions_fit_a_tile(stage, batch, sms, dtype, packed):
    # 4-token regions pack 2 heads a 16-row tile while a row of regions a program leaves >= 12 programs per SM
    # (T.s2 batch 64: 64 * 4 * 7 = 1,792 >= 12 * 132; batch 32: 896); 16-token regions (T.s1) would need 32 rows
    shape = {"T.s2": (14, 14, (2, 2), 16, 256, 8), "B.s2": (14, 14, (2, 2), 16, 384, 12),
             "T.s1": (28, 28, (4, 4), 4, 128, 4), "one head": (14, 14, (2, 2), 16, 32, 1)}[stage]
    assert _geometry(*shape, batch=batch).default_heads_per_tile(sms, dtype) == packed


@pytest.mark.parametrize("stage, batch, sms, group", [
    ("T.s2", 128, 132, 7), ("T.s2", 32, 132, 7), ("T.s2", 16, 132, 2), ("T.s2", 4, 132, 1), ("T.s2", 128, None, 1),
    ("T.s0", 128, 132, 7), ("T.s0", 64, 132, 2), ("T.s0", 16, 132, 1), ("T.s0", 128, 528, 2)])
def test_forward_groups_a_row_of_regions_while_programs_fill_the_gpu(stage, batch, sms, group):
    # BiFormer-T stage 2 (14x14, 2x2 regions, 8 heads) and stage 0 (56x56, 8x8 regions, 2 heads): programs at a
    # row (7 regions) of stage 2, batch 32: 32 * 8 * 7 = 1,792 >= 12 * 132; at 2 regions, batch 16: 3,200
    shape = {"T.s2": (14, 14, (2, 2), 16, 256, 8), "T.s0": (56, 56, (8, 8), 1, 64, 2)}[stage]
    geo = _geometry(*shape, batch=batch)
    assert geo.default_group(sms) == group
    assert geo.group == 1  # meta tensors are not CUDA: one region a program
    with rt.use_tiles(query_regions=3):
        assert _geometry(*shape, batch=batch).group == 3


def test_backward_choice_by_tile_work():
    # BiFormer-T at 224: 64-token regions at top-1 and 16-token ones at top-4 fill the routed tiles; 2x2 regions at
    # top-16 idle 12 of 16 query rows, as much score-tile work per row as the whole 196-token map (256 columns)
    assert not _geometry(56, 56, (8, 8), 1).masked_backward()
    assert not _geometry(28, 28, (4, 4), 4).masked_backward()
    assert _geometry(14, 14, (2, 2), 16).masked_backward()
    assert not _geometry(14, 14, (2, 2), 4).masked_backward()  # 16 keys a query region: smaller routed tiles
    assert _geometry(15, 13, (2, 2), 12).masked_backward()     # padded map, 56 regions, 48 keys a query region
    with rt.use_tiles(backward="routed"):
        assert not _geometry(14, 14, (2, 2), 16).masked_backward()
    with rt.use_tiles(backward="masked"):
        assert _geometry(56, 56, (8, 8), 1).masked_backward()
        assert not _geometry(18, 18, (2, 2), 16).masked_backward()  # 81 regions: more than an int64 of bits


# ----------------------------------------------------------------------------------------------------------------
# Triton interpreter (subprocess: TRITON_INTERPRET must be set before the kernels are built)

INTERPRETER_CASES = [
    # (B, H, W, region, topk, heads, C_qk, C_v, layout, max_block, routing_scale); each runs both backwards
    (1, 8, 8, (2, 2), 2, 2, 32, 32, "nhwc", 64, None),    # 4x4 regions of 2x2 tokens, d 16: the brief's tiny case
    (2, 7, 6, (2, 2), 3, 2, 32, 16, "nchw", 64, None),    # batch 2, padded map, nchw strides, d_v 8 < d_qk 16
    (1, 7, 10, (3, 4), 4, 2, 32, 32, "nhwc", 16, 0.25),   # padded, 12-token regions: several key / query-list tiles
    (1, 10, 8, (5, 4), 2, 1, 16, 24, "nchw", 16, None),   # 20-token regions: two query tiles, d_v 24 (masked lanes)
]


def check_routing_kernel(device: str = "cpu", dtypes=(torch.float32, torch.float16)) -> None:
    """The routing kernels pick a top-k of the affinities (float64 check), the same regions as :func:`route` on
    these seeds, for contiguous and strided maps, full and padded, with the top-k kernel's small- and large-batch
    tiles (16 query regions a program, or all)."""
    cases = [(2, 8, 8, (2, 2), 3, 32, "nhwc"), (2, 7, 10, (3, 4), 4, 24, "nchw"), (1, 14, 14, (2, 2), 16, 64, "nhwc"),
             (1, 15, 13, (2, 2), 5, 16, "nchw"), (1, 20, 20, (3, 3), 7, 200, "nhwc")]
    tiles = {16: lambda q, batch, block_r: 16, "all": lambda q, batch, block_r: block_r}
    for dtype, tile, (b, h, w, region, topk, c, layout) in itertools.product(dtypes, tiles, cases):
        with mock.patch.object(rt, "_route_block_q", tiles[tile]):
            q, k, _ = make_inputs(b, h, w, c, c, seed=h * w + c, dtype=dtype, device=device, layout=layout)
            q, k = (_nhwc(t.detach(), layout) for t in (q, k))
            got = rt._route(q, k, region, topk, None)
        assert got.shape == (b, -(-h // region[0]) * -(-w // region[1]), topk) and got.dtype == torch.int64
        assert_is_a_top_k(got, q, k, region, topk)
        assert torch.equal(got.sort(-1).values, route(q, k, region, topk, None).sort(-1).values), (dtype, tile)
    # exact ties (every key region alike): the lowest regions, in ascending order
    q, k, _ = make_inputs(2, 8, 8, 16, 16, seed=1, device=device)
    got = rt._route(q.detach(), k.detach()[:, :1, :1].expand(2, 8, 8, 16), (2, 2), 5, None)
    assert torch.equal(got, torch.arange(5, device=device).expand(2, 16, 5))


def check_grouped_forward(device: str = "cpu", dtype=torch.float32) -> None:
    """Forward programs that take several query regions in turn write the same bits (output and row statistics,
    padded tokens included) as one region a program, also where the last group runs past the last region."""
    # 3x4 regions, 4x2 of them, the last row of regions padded
    q, k, v = (t.detach() for t in make_inputs(2, 10, 8, 32, 32, seed=7, dtype=dtype, device=device))
    index = route(q, k, (3, 4), 3, None)
    want = rt._launch_forward(q, k, v, index, 2, 3, 4, 0.25)
    for group in (3, 8, 20):
        with rt.use_tiles(query_regions=group):
            got = rt._launch_forward(q, k, v, index, 2, 3, 4, 0.25)
            inference, _ = rt._launch_forward(q, k, v, index, 2, 3, 4, 0.25, stats=False)
        for name, a, b in (("out", got[0], want[0]), ("lse", got[1], want[1]), ("inference", inference, want[0])):
            assert torch.equal(a, b), f"{name} differs with {group} query regions a program"


def check_packed_forward(device: str = "cpu", dtype=torch.float32) -> None:
    """Forward programs whose query tile several heads share give one head a program's output and row statistics
    (padded tokens included): heads not a multiple of the heads a tile, region groups, padding, strided nchw input,
    query/key width different from the value width."""
    # the same products and sums, though not bitwise: matmuls of different widths (zeros added) group them
    # differently, so a 16-bit output may round to the next value (torch's default tolerance of its dtype)
    exact = dict(rtol=1e-5, atol=2e-6)
    tol = {"out": exact if dtype == torch.float32 else {}, "lse": exact}
    # (each interpreted program costs time: one case has a second image, for the batch stride)
    cases = (((9, 10), (2, 3), 3, 48, 24, 3, "nhwc", 1),   # 3 heads of 16/8, 6-token regions, padded map
             ((8, 8), (2, 2), 5, 64, 64, 4, "nchw", 2),    # 4 heads of 16, 4-token regions, channels strided
             ((8, 8), (4, 4), 2, 32, 32, 4, "nhwc", 1))    # 4 heads of 8, 16-token regions: a 64-row tile
    for (h, w), region, topk, c_qk, c_v, heads, layout, batch in cases:
        q, k, v = (t.detach() for t in make_inputs(batch, h, w, c_qk, c_v, seed=3, dtype=dtype, device=device,
                                                   layout=layout))
        if layout == "nchw":
            q, k, v = (t.permute(0, 2, 3, 1) for t in (q, k, v))
        index = route(q, k, region, topk, None)
        want = rt._launch_forward(q, k, v, index, heads, *region, 0.3)
        for packed, group in ((2, 1), (4, 3), (16, 1)):
            with rt.use_tiles(heads_per_tile=packed, query_regions=group):
                geo = rt._Geometry(q, v, index, heads, *region)
                assert geo.hp == min(packed, heads) > 1
                got = rt._launch_forward(q, k, v, index, heads, *region, 0.3)
                inference, _ = rt._launch_forward(q, k, v, index, heads, *region, 0.3, stats=False)
            for name, a, b in (("out", got[0], want[0]), ("lse", got[1], want[1]), ("out", inference, want[0])):
                torch.testing.assert_close(a, b, **tol[name], msg=lambda m: f"{name}, {packed} heads a tile: {m}")


def _interpreter_fp32_checks() -> None:
    """fp32: forward and all gradients vs the reference backend, both layouts, padding; bitwise repeatable."""
    warnings.filterwarnings("error", message=".*falling back")  # a silent fallback would test reference vs itself
    check_inverse_routing()  # interpreted: the one-launch kernel
    check_routing_kernel()
    check_grouped_forward()
    check_packed_forward()
    assert rt._triton_supports(*make_inputs(1, 4, 4, 8, 8), num_heads=2, region_size=(2, 2), topk=1,
                               scale=1.0) is None
    for batch, h, w, region, topk, heads, c_qk, c_v, layout, max_block, rscale in INTERPRETER_CASES:
        q, k, v = make_inputs(batch, h, w, c_qk, c_v, seed=h * w, layout=layout)
        kw = dict(num_heads=heads, region_size=region, topk=topk, scale=c_qk ** -0.5, routing_scale=rscale,
                  layout=layout)
        want = out_and_grads(q, k, v, backend="reference", **kw)
        for path in ("routed", "masked"):  # the backward's
            with rt.use_tiles(max_block=max_block, num_warps=1 if max_block == 16 else None, backward=path):
                got = out_and_grads(q, k, v, backend="triton", **kw)
                assert rt._kernels_interpreted()
                if rscale is not None:  # one case is enough (each interpreted pass costs seconds)
                    again = out_and_grads(q, k, v, backend="triton", **kw)
                    for name, a, b in zip(("out", "dq", "dk", "dv"), got, again):
                        assert torch.equal(a, b), f"{name} not bitwise repeatable ({path})"
                    with torch.no_grad():  # the inference launch (no autograd node, no statistics stored)
                        assert torch.equal(routing_attention(q, k, v, backend="triton", **kw), got[0])
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                assert a.dtype == torch.float32 and a.shape == b.shape
                assert_close_to(a, b, 1e-5, 1e-5, f"{name} {layout} {h}x{w} region {region} {path}")
    print("fp32 ok")


def _interpreter_fp16_and_compile_checks() -> None:
    """fp16 vs a float64 attention on the same routing; custom-op registration (opcheck); a graph-break-free trace."""
    warnings.filterwarnings("error", message=".*falling back")
    q, k, v = make_inputs(1, 8, 8, 32, 32, seed=5, dtype=torch.float16)
    kw = dict(num_heads=2, region_size=(2, 2), topk=3, scale=32 ** -0.5)
    want = oracle_out_and_grads(q, k, v, route(q, k, (2, 2), 3, None), **kw)
    for path in ("routed", "masked"):
        with rt.use_tiles(backward=path):
            got = out_and_grads(q, k, v, backend="triton", **kw)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.dtype == torch.float16
            assert_close_to(a, b, 4e-3, 3e-3, f"fp16 {name} {path}")

    q, k, v = make_inputs(1, 8, 9, 16, 16, seed=6)  # 2 of 12 regions: auto choice is the routed kernel
    index = route(q, k, (2, 3), 2, None)
    torch.library.opcheck(torch.ops.zoo.routing_attention_fwd.default, (q, k, v, index, 1, 2, 3, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.zoo.routing_route.default, (q.detach(), k.detach(), 2, 3, 2),
                          test_utils=("test_schema", "test_faketensor"))

    def loss(q, k, v):
        return routing_attention(q, k, v, num_heads=1, region_size=(2, 3), topk=2, scale=0.25).square().sum()

    assert select_backend("routing_attention", None, q, k, v, num_heads=1, region_size=(2, 3), topk=2, scale=0.25,
                          routing_scale=None, layout="nhwc").name == "triton"

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    print("fp16 + compile ok")


def test_triton_interpreter_fp32_fp16_determinism_custom_op_and_compile_trace():
    run_in_interpreter("test_routing_triton", "_interpreter_fp32_checks", "_interpreter_fp16_and_compile_checks")


# ----------------------------------------------------------------------------------------------------------------
# GPU: BiFormer-T stages at 224 (56/28/14 maps, 7x7 regions, top-1/4/16, head dim 32), batch 8

STAGES = {
    "s0": dict(hw=(56, 56), channels=64, heads=2, region=(8, 8), topk=1),
    "s1": dict(hw=(28, 28), channels=128, heads=4, region=(4, 4), topk=4),
    "s2": dict(hw=(14, 14), channels=256, heads=8, region=(2, 2), topk=16),
    "big_regions": dict(hw=(28, 28), channels=64, heads=2, region=(14, 14), topk=2),   # 196 tokens: tiled regions
    "padded_nchw": dict(hw=(15, 13), channels=64, heads=2, region=(2, 2), topk=12, layout="nchw"),  # masked bwd
    "s2_routed": dict(hw=(14, 14), channels=256, heads=8, region=(2, 2), topk=16, backward="routed"),
}
GPU_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}


def _gpu_case(stage, dtype, seed=0, batch=8):
    """Inputs and keyword arguments of a stage (the backward it forces is applied by :func:`_path`)."""
    p = STAGES[stage]
    layout = p.get("layout", "nhwc")
    q, k, v = make_inputs(batch, *p["hw"], p["channels"], p["channels"], seed=seed, dtype=dtype, device="cuda",
                          layout=layout)
    kw = dict(num_heads=p["heads"], region_size=p["region"], topk=p["topk"], scale=p["channels"] ** -0.5,
              layout=layout)
    return (q, k, v), kw


def _path(stage):
    """The launch knobs of a stage: its forced backward, or the automatic choice."""
    return rt.use_tiles(backward=STAGES[stage].get("backward"))


def _nhwc(t, layout):
    return t.permute(0, 2, 3, 1) if layout == "nchw" else t


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", list(STAGES))
def test_gpu_triton_matches_float64_on_the_same_routing(stage, dtype):
    (q, k, v), kw = _gpu_case(stage, dtype)
    assert select_backend("routing_attention", None, q, k, v, **{**kw, "routing_scale": None}).name == "triton"
    with _path(stage):
        got = out_and_grads(q, k, v, backend="triton", **kw)
    # float64 attention on the routing the backend computes (its one kernel: a top-k of the same affinities, near
    # ties may resolve differently from route(), whose choice the reference check below uses)
    index = rt._route(_nhwc(q, kw["layout"]), _nhwc(k, kw["layout"]), kw["region_size"], kw["topk"], None)
    want = oracle_out_and_grads(q, k, v, index, **kw)
    max_abs, rel = GPU_TOL[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close_to(a, b, max_abs, rel, f"{stage} {dtype} {name}")
    # the reference backend (same routing code) lands on the same oracle: a wrongly routed region would be O(1) off
    with torch.no_grad():
        ref = routing_attention(q, k, v, backend="reference", **kw)
    assert_close_to(ref, want[0], 4 * max_abs, 4 * rel, f"reference {stage} {dtype} out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", ["s0", "s2", "s2_routed"])
def test_gpu_triton_backward_is_bitwise_deterministic(stage, dtype):
    (q, k, v), kw = _gpu_case(stage, dtype, seed=1)
    with _path(stage):
        first = out_and_grads(q, k, v, backend="triton", **kw)
        for _ in range(3):
            again = out_and_grads(q, k, v, backend="triton", **kw)
            for name, a, b in zip(("out", "dq", "dk", "dv"), first, again):
                assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.gpu
@pytest.mark.parametrize("stage,kernels", [
    ("s1", ("_region_sums_kernel", "_route_topk_kernel", "_forward_kernel", "_dq_kernel", "_dkv_kernel",
            "_inverse_routing_kernel")),
    ("s2", ("_region_sums_kernel", "_route_topk_kernel", "_forward_kernel", "_masked_dq_kernel",
            "_masked_dkv_kernel")),
])
def test_gpu_torch_compile_keeps_the_op_in_graph(stage, kernels):
    torch._dynamo.reset()
    (q, k, v), kw = _gpu_case(stage, torch.bfloat16, seed=2)
    torch.manual_seed(0)
    channels = STAGES[stage]["channels"]
    proj = torch.nn.Linear(channels, channels, device="cuda", dtype=torch.bfloat16)

    def block(q, k, v):
        return proj(routing_attention(q, k, v, **kw)).float().square().mean()

    compiled = torch.compile(block, fullgraph=True)
    got, code = run_compiled(lambda: torch.autograd.grad(compiled(q, k, v), (q, k, v)))
    assert_inductor_launches(code, *kernels)
    want = torch.autograd.grad(block(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert_close_to(a, b, 2e-2, 1e-2, "compiled vs eager")



@pytest.mark.gpu
def test_gpu_torch_compile_follows_a_changing_batch():
    # the second batch size makes dynamo recompile with a symbolic batch: the triton_op bodies then trace on SymInts
    torch._dynamo.reset()
    _, kw = _gpu_case("s1", torch.bfloat16, batch=1)
    compiled = torch.compile(lambda q, k, v: routing_attention(q, k, v, **kw), fullgraph=True)
    for batch in (4, 6, 3):
        (q, k, v), _ = _gpu_case("s1", torch.bfloat16, seed=batch, batch=batch)
        with torch.no_grad():
            assert_close_to(compiled(q, k, v), routing_attention(q, k, v, **kw), 2e-2, 1e-2, f"batch {batch}")

@pytest.mark.gpu
def test_gpu_peak_memory_at_most_the_reference():
    (q, k, v), kw = _gpu_case("s2", torch.bfloat16, seed=3, batch=32)
    peaks = {}
    for backend in ("reference", "triton"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out_and_grads(q, k, v, backend=backend, **kw)
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated() - base
    assert peaks["triton"] <= peaks["reference"], peaks


def assert_is_a_top_k(index, q, k, region, topk, rel=1e-5):
    """Every chosen key region's float64 affinity is within ``rel`` of the k-th largest (near ties may go either way:
    summation order decides them)."""
    q64, k64 = (F.avg_pool2d(t.double().permute(0, 3, 1, 2), region, ceil_mode=True, count_include_pad=False)
                .flatten(2).transpose(1, 2) for t in (q, k))
    affinity = q64 @ k64.transpose(1, 2)  # (B, R, R)
    kth = affinity.topk(topk, dim=-1).values[..., -1:]
    chosen = affinity.gather(-1, index.long())
    scale = affinity.abs().amax(dim=-1, keepdim=True)
    assert (chosen >= kth - rel * scale).all(), "a routed region is not among the top-k affinities"
    assert (index.sort(-1).values.diff(dim=-1) > 0).all(), "a key region chosen twice"


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["s0", "s1", "s2", "padded_nchw"])
def test_gpu_route_of_strided_views_is_a_top_k(stage):
    (q, k, _), kw = _gpu_case(stage, torch.bfloat16, seed=4)
    qn, kn = _nhwc(q, kw["layout"]), _nhwc(k, kw["layout"])
    for rscale in (None, kw["scale"]):
        for routing in (route, rt._route):
            assert_is_a_top_k(routing(qn, kn, kw["region_size"], kw["topk"], rscale), qn, kn, kw["region_size"],
                              kw["topk"])


@pytest.mark.gpu
def test_gpu_grouped_forward_writes_the_same_bits():
    for dtype in (torch.float32, torch.bfloat16):
        check_grouped_forward("cuda", dtype)


@pytest.mark.gpu
def test_gpu_packed_forward_matches_one_head_a_program():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_packed_forward("cuda", dtype)


@pytest.mark.gpu
def test_gpu_routing_kernel_is_a_top_k():
    check_routing_kernel("cuda", (torch.float32, torch.float16, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("max_block,num_warps", [(16, 2), (32, 8), (64, 8), (64, 2)])
def test_gpu_launch_variants_agree(max_block, num_warps):
    # the knobs a tuning sweep turns must not change results beyond rounding
    (q, k, v), kw = _gpu_case("s1", torch.bfloat16, seed=5)
    default = out_and_grads(q, k, v, backend="triton", **kw)
    with rt.use_tiles(max_block=max_block, num_warps=num_warps):
        variant = out_and_grads(q, k, v, backend="triton", **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), variant, default):
        assert_close_to(a, b, 2e-2, 1e-2, f"{name} max_block={max_block} num_warps={num_warps}")
