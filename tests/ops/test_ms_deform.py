"""ms_deform_attn: reference vs the official core's fixture, float64 oracle and gradcheck; Triton backend in the CPU
interpreter (subprocess, TRITON_INTERPRET=1) and on the GPU (forward, backward, determinism, torch.compile)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from zoo.ops import available_backends, ms_deform_attn
from zoo.ops._dispatch import select_backend
from zoo.ops.ms_deform import _triton_supports, ms_deform_attn_reference
from triton_checks import assert_close_to, assert_inductor_launches, run_compiled, run_in_interpreter

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "focus_detr"


def msda_oracle(value, spatial_shapes, loc, attn):
    """Independent float64 oracle: explicit four-corner bilinear gathers (no grid_sample). Differentiable."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    b, _, m, c = value.shape
    _, q, _, _, p, _ = loc.shape
    out = value.new_zeros(b, q, m, c)
    bi = torch.arange(b, device=value.device)[:, None, None, None]
    mi = torch.arange(m, device=value.device)[None, None, :, None]
    start = 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value[:, start:start + h * w]
        x = loc[:, :, :, level, :, 0] * w - 0.5
        y = loc[:, :, :, level, :, 1] * h - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        fx, fy = x - x0, y - y0
        # weights written with floor (not 1 - |x - xi|) so the derivative at integer positions is the right-hand
        # one, as in grid_sample and the CUDA op
        for yi, wy in ((y0, 1 - fy), (y0 + 1, fy)):
            for xi, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                weight = wx * wy * inside * attn[:, :, :, level]
                index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
                out = out + (weight[..., None] * v[bi, index, mi]).sum(3)
        start += h * w
    return out.reshape(b, q, m * c)


def random_case(batch=2, queries=5, heads=2, channels=8, points=3, shapes=((4, 6), (3, 2)), *, dtype=torch.float32,
                device="cpu", spread=(-0.15, 1.15), seed=0):
    """Random value / locations (some outside the map) / softmaxed weights with requires_grad, plus shapes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    tokens = int((spatial[:, 0] * spatial[:, 1]).sum())
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=g)
    lo, hi = spread
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g) * (hi - lo) + lo
    # multiples of 2^-16: loc * W is then exact in float32 for W < 64, so the kernels' float32 pixel coordinates
    # equal the float64 oracle's and both take the same floor (grad_loc jumps where the floor changes)
    loc = torch.round(loc * 2**16) / 2**16
    attn = torch.randn(batch, queries, heads, levels * points, generator=g).softmax(-1)
    attn = attn.view(batch, queries, heads, levels, points)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (value, loc, attn)]
    return tensors[0], spatial.to(device), tensors[1], tensors[2]


def randn(*shape, seed=0, device="cpu"):
    """Standard-normal float32 tensor from its own generator (independent of whatever imports consumed)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def forward_and_grads(value, spatial, loc, attn, grad_out, backend, level_start_index=None):
    out = ms_deform_attn(value, spatial, loc, attn, level_start_index, backend=backend)
    grads = torch.autograd.grad(out, (value, loc, attn), grad_out.to(out.dtype))
    return (out, *grads)


# ----------------------------------------------------------------------------------------------------------------
# reference backend (CPU)


def test_reference_matches_official_core_fixture():
    from safetensors.torch import load_file

    meta = json.loads((FIXTURES / "msda_core.json").read_text())
    t = load_file(str(FIXTURES / "msda_core.safetensors"))
    out = ms_deform_attn(t["input"], t["input.value_spatial_shapes"], t["input.sampling_locations"],
                         t["input.attention_weights"], backend="reference")
    assert out.shape == tuple(meta["output_shape"])
    # some of the fixture's samples fall outside the map: the zero padding is exercised
    assert (t["input.sampling_locations"] < 0).any() and (t["input.sampling_locations"] > 1).any()
    torch.testing.assert_close(out, t["output"], **meta["tolerance"])


@pytest.mark.parametrize("channels,points", [(8, 3), (6, 4)])
def test_reference_matches_float64_oracle_forward_and_grad(channels, points):
    value, spatial, loc, attn = random_case(channels=channels, points=points, dtype=torch.float64, seed=1)
    grad_out = randn(2, 5, 2 * channels, seed=7).double()
    got = forward_and_grads(value, spatial, loc, attn, grad_out, "reference")
    expected = msda_oracle(value, spatial, loc, attn)
    want = (expected, *torch.autograd.grad(expected, (value, loc, attn), grad_out))
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
        assert_close_to(a, b, 1e-12, 1e-12, name)


def test_reference_gradcheck_float64():
    value, spatial, loc, attn = random_case(batch=1, queries=3, channels=3, points=2, shapes=((3, 4), (2, 2)),
                                            dtype=torch.float64, spread=(0.05, 0.95), seed=2)
    def op(v, l, a):
        return ms_deform_attn(v, spatial, l, a, backend="reference")

    assert torch.autograd.gradcheck(op, (value, loc, attn), eps=1e-6, atol=1e-6)
    if _grid_sample_twice_differentiable():
        assert torch.autograd.gradgradcheck(op, (value, loc, attn), eps=1e-6, atol=1e-6)


def _grid_sample_twice_differentiable() -> bool:
    """Whether this torch differentiates ``grid_sample``'s backward (torch 2.5 does not)."""
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    grid = torch.zeros(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(torch.nn.functional.grid_sample(x, grid, align_corners=False).sum(), x,
                                create_graph=True)
    try:
        torch.autograd.grad(gx.sum(), grid)
    except RuntimeError:
        return False
    return True


def test_reference_level_start_index_and_low_precision_inputs():
    value, spatial, loc, attn = random_case(seed=3)
    starts = torch.tensor([0, 24])
    full = ms_deform_attn(value, spatial, loc, attn, backend="reference")
    torch.testing.assert_close(ms_deform_attn(value, spatial, loc, attn, starts, backend="reference"), full)
    # a bf16 value with float32 locations (the autocast mix): float32 math, output in value's dtype
    mixed = ms_deform_attn(value.bfloat16(), spatial, loc, attn, backend="reference")
    assert mixed.dtype == torch.bfloat16
    assert_close_to(mixed, full, 2e-2, 1e-2, "bf16 value")


def test_rejects_bad_arguments_with_clear_errors():
    value, spatial, loc, attn = random_case(seed=4)
    with pytest.raises(ValueError, match="value must be"):
        ms_deform_attn(value[0], spatial, loc, attn)
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        ms_deform_attn(value, spatial.float(), loc, attn)
    with pytest.raises(ValueError, match="sampling_locations must be"):
        ms_deform_attn(value, spatial, loc[..., :1], attn)
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn(value, spatial, loc, attn[..., :2])
    with pytest.raises(ValueError, match="cover 30"):
        ms_deform_attn(value[:, :20], spatial, loc, attn)
    with pytest.raises(ValueError, match="level_start_index must be"):
        ms_deform_attn(value, spatial, loc, attn, torch.tensor([0]))
    with pytest.raises(ValueError, match="spatial_shapes has no levels"):
        ms_deform_attn(value[:, :0], spatial[:0], loc[:, :, :, :0], attn[:, :, :, :0])


def _degenerate_cases_agree(backend: str) -> None:
    """An empty level adds nothing (all its samples fall in the zero padding); no points give zeros with gradients."""
    value, spatial, loc, attn = random_case(shapes=((4, 6), (0, 3)), seed=16)
    out = ms_deform_attn(value, spatial, loc, attn, backend=backend)
    first = ms_deform_attn(value, spatial[:1], loc[:, :, :, :1], attn[:, :, :, :1], backend="reference")
    assert_close_to(out, first, 1e-6, 1e-6, f"{backend} empty level")
    grad_loc, grad_attn = torch.autograd.grad(out.square().sum(), (loc, attn))
    assert grad_loc[:, :, :, 1].abs().max() == 0 and grad_attn[:, :, :, 1].abs().max() == 0
    value, spatial, loc, attn = random_case(points=0, seed=17)
    out = ms_deform_attn(value, spatial, loc, attn, backend=backend)
    assert out.shape == (2, 5, 16) and out.abs().max() == 0
    grad_value, = torch.autograd.grad(out.sum(), (value,))
    assert grad_value.abs().max() == 0


def test_reference_empty_level_and_no_points():
    _degenerate_cases_agree("reference")


def test_use_tiles_rejects_unknown_keys_and_bad_values():
    pytest.importorskip("triton")
    from zoo.ops.triton.ms_deform import TILES, use_tiles

    with pytest.raises(ValueError, match=r"use_tiles\(sample=...\): unknown keys \['elemnts'\]; known"):
        use_tiles(sample={"elemnts": 64})
    with pytest.raises(ValueError, match="num_warps must be a power of two from 1 to 32, got 3"):
        use_tiles(pixel={"num_warps": 3})
    with pytest.raises(ValueError, match="samples must be an int >= 1, got 0"):
        use_tiles(pixel={"samples": 0})
    with pytest.raises(ValueError, match=r"use_tiles\(dense_pixel=...\): unknown keys \['pixels'\]"):
        use_tiles(dense_pixel={"pixels": 4})
    before = {k: dict(v) for k, v in TILES.items()}
    with use_tiles(forward={"num_warps": 8}, sample={"elements": 64}, dense_pixel={"samples": 8}):
        changed = TILES["forward"]["num_warps"], TILES["sample"]["elements"], TILES["dense_pixel"]["samples"]
        assert changed == (8, 64, 8)
    assert TILES == before


def test_value_gradient_gather_tile_by_corners_per_pixel():
    pytest.importorskip("triton")
    from zoo.ops.triton.ms_deform import corners_per_pixel, pixel_tile_kind, use_tiles

    tokens = 100 * 167 + 50 * 84 + 25 * 42 + 13 * 21  # Focus-DETR R50 at 800 x 1333: 22,223 value pixels
    assert corners_per_pixel(tokens, tokens, 4, 4) == 64.0  # the encoder: every token a query, 16 samples each
    assert pixel_tile_kind(64.0) == "dense_pixel"
    assert pixel_tile_kind(corners_per_pixel(tokens, 900, 4, 4)) == "pixel"  # 900 decoder queries: 2.6 a pixel
    assert pixel_tile_kind(32.0) == "dense_pixel" and pixel_tile_kind(31.9) == "pixel"  # a full 32-sample step
    with use_tiles(dense_pixel={"samples": 64}):
        assert pixel_tile_kind(32.0) == "pixel"


def test_triton_backend_refusals_are_explained():
    value, spatial, loc, attn = random_case(seed=5)
    reason = _triton_supports(value.double(), spatial, loc, attn)
    assert reason is not None and "float32, float16 or bfloat16" in reason
    if "TRITON_INTERPRET" not in os.environ and "zoo.ops.triton.ms_deform" not in sys.modules:
        assert "TRITON_INTERPRET=1" in _triton_supports(value, spatial, loc, attn)
        # automatic choice falls back to the reference quietly
        torch.testing.assert_close(ms_deform_attn(value, spatial, loc, attn),
                                   ms_deform_attn_reference(value, spatial, loc, attn))
    assert "reference" in available_backends("ms_deform_attn")


def test_bench_rows_on_cpu_smoke():
    from zoo.ops.bench_ms_deform import bench_ms_deform

    rows = bench_ms_deform(shapes=("tiny",), dtypes=("float32",), backends=("reference",), device="cpu", warmup=1,
                           iters=2)
    assert [r["pass"] for r in rows] == ["fwd", "bwd", "fwd+bwd"]
    for row in rows:
        assert row["op"] == "ms_deform_attn" and row["backend"] == "reference" and row["ms"] > 0
        assert row["ratio_to_reference"] == 1.0 and row["gbps"] > 0 and "tiny B1 Q60 S60 L2 M2 C8 P2" == row["shape"]


# ----------------------------------------------------------------------------------------------------------------
# triton backend in the CPU interpreter: a subprocess, because TRITON_INTERPRET must be set before the kernels'
# module is imported (triton reads it when @triton.jit runs)


def _interpreter_checks() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1: Triton (fp32/fp16) against the float64 oracle."""
    import zoo.ops.ms_deform as msd

    assert msd._triton_supports(*random_case()) is None
    cases = [dict(seed=10), dict(channels=6, points=4, shapes=((3, 5), (2, 2)), seed=11, queries=4, heads=3)]
    for kwargs in cases:
        value, spatial, loc, attn = random_case(**kwargs)
        grad_out = randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], seed=8)
        got = forward_and_grads(value, spatial, loc, attn, grad_out, "triton")
        expected = msda_oracle(value, spatial, loc, attn)
        want = (expected, *torch.autograd.grad(expected, (value, loc, attn), grad_out.double()))
        for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
            assert a.dtype == torch.float32
            assert_close_to(a, b, 2e-6, 2e-6, f"fp32 {name} {kwargs}")
        again = forward_and_grads(value, spatial, loc, attn, grad_out, "triton")
        for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, again):
            assert torch.equal(a, b), f"{name} not bitwise repeatable"
        with torch.no_grad():  # the inference launch (no autograd node)
            assert torch.equal(ms_deform_attn(value, spatial, loc, attn, backend="triton"), got[0])
    assert sys.modules["zoo.ops.triton.ms_deform"].INTERPRETED
    _degenerate_cases_agree("triton")

    # tiny tiles and clustered samples: several query blocks, several gather steps per pixel, crowded cells
    from zoo.ops.triton.ms_deform import use_tiles

    value, spatial, loc, attn = random_case(queries=7, spread=(0.3, 0.55), seed=14)
    grad_out = randn(2, 7, 16, seed=15)
    tiny, tiny_gather = {"elements": 64, "num_warps": 1}, {"elements": 64, "samples": 4, "num_warps": 1}
    with use_tiles(forward=tiny, sample=tiny, pixel=tiny_gather, dense_pixel=tiny_gather):
        got = forward_and_grads(value, spatial, loc, attn, grad_out, "triton")
    expected = msda_oracle(value, spatial, loc, attn)
    want = (expected, *torch.autograd.grad(expected, (value, loc, attn), grad_out.double()))
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
        assert_close_to(a, b, 2e-6, 2e-6, f"small tiles {name}")

    # float16 everywhere, explicit level_start_index, locations exactly on pixel centres and far outside
    value, spatial, loc, attn = random_case(dtype=torch.float16, seed=12)
    with torch.no_grad():
        loc[0, 0, 0, 0, 0] = torch.tensor([0.5 / 6, 0.5 / 4])
        loc[0, 1, 0, 0, 0] = torch.tensor([-30.0, 0.5])
        loc[1, 0, 1, 1, 1] = torch.tensor([0.5, 1e4])
    grad_out = randn(2, 5, 16, seed=9)
    got = forward_and_grads(value, spatial, loc, attn, grad_out, "triton", torch.tensor([0, 24]))
    expected = msda_oracle(value, spatial, loc, attn)
    want = (expected, *torch.autograd.grad(expected, (value, loc, attn), grad_out.double()))
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
        assert a.dtype == torch.float16
        assert_close_to(a, b, 2e-3, 2e-3, f"fp16 {name}")

    # the autocast mix: fp16 value, fp32 locations and weights; no value gradient wanted
    value, spatial, loc, attn = random_case(seed=13)
    value16 = value.detach().half()
    out = ms_deform_attn(value16, spatial, loc, attn, backend="triton")
    grad_loc, = torch.autograd.grad(out.float().square().sum(), (loc,))
    expected = msda_oracle(value16, spatial, loc, attn)
    want_loc, = torch.autograd.grad(expected.square().sum(), (loc,))
    assert out.dtype == torch.float16 and grad_loc.dtype == torch.float32
    assert_close_to(out, expected, 2e-3, 2e-3, "mixed out")
    assert_close_to(grad_loc, want_loc, 5e-3, 5e-3, "mixed grad_loc")


def _interpreter_compile_checks() -> None:
    """Subprocess with TRITON_INTERPRET=1: custom-op registration (opcheck) and a graph-break-free trace."""
    value, spatial, loc, attn = random_case(batch=1, queries=3, channels=4, points=2, shapes=((3, 4), (2, 2)), seed=20)
    torch.library.opcheck(torch.ops.zoo.ms_deform_attn_fwd.default, (value, spatial, None, loc, attn),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def loss(v, l, a):
        return ms_deform_attn(v, spatial, l, a).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(value, loc, attn), (value, loc, attn))
    want = torch.autograd.grad(loss(value, loc, attn), (value, loc, attn))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_triton_interpreter_forward_backward_determinism_custom_op_and_compile_trace():
    run_in_interpreter("test_ms_deform", "_interpreter_checks", "_interpreter_compile_checks")


# ----------------------------------------------------------------------------------------------------------------
# GPU

ENCODER_LIKE = ((32, 48), (16, 24), (8, 12), (4, 6))  # a 4-level pyramid of a 256x384 image, 2040 tokens
GPU_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}


def _gpu_case(dtype, queries=None, seed=0):
    tokens = sum(h * w for h, w in ENCODER_LIKE)
    return random_case(batch=2, queries=queries or tokens, heads=8, channels=32, points=4, shapes=ENCODER_LIKE,
                       dtype=dtype, device="cuda", spread=(-0.05, 1.05), seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("queries", [None, 300], ids=["encoder", "decoder"])
def test_gpu_triton_matches_float64_oracle(dtype, queries):
    value, spatial, loc, attn = _gpu_case(dtype, queries)
    grad_out = randn(2, loc.shape[1], 256, seed=10, device="cuda")
    got = forward_and_grads(value, spatial, loc, attn, grad_out, "triton")
    expected = ms_deform_attn_reference(value.double(), spatial, loc.double(), attn.double())
    want = (expected, *torch.autograd.grad(expected, (value, loc, attn), grad_out.double()))
    max_abs, rel = GPU_TOL[dtype]
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
        assert a.dtype == dtype
        assert_close_to(a, b, max_abs, rel, f"{dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_triton_backward_is_bitwise_deterministic(dtype):
    value, spatial, loc, attn = _gpu_case(dtype, seed=1)
    # concentrate samples so that many land in the same cells (where an atomic scatter would race)
    with torch.no_grad():
        loc.mul_(0.1).add_(0.45)
    grad_out = randn(2, loc.shape[1], 256, seed=10, device="cuda")
    first = forward_and_grads(value, spatial, loc, attn, grad_out, "triton")
    for _ in range(3):
        again = forward_and_grads(value, spatial, loc, attn, grad_out, "triton")
        for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), first, again):
            assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.gpu
def test_gpu_triton_never_syncs_with_the_host():
    value, spatial, loc, attn = _gpu_case(torch.float32, queries=300, seed=4)
    grad_out = randn(2, 300, 256, seed=11, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_and_grads(value, spatial, loc, attn, grad_out, "triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_torch_compile_keeps_the_op_in_graph():
    value, spatial, loc, attn = _gpu_case(torch.bfloat16, queries=300, seed=2)
    torch.manual_seed(0)
    proj = torch.nn.Linear(256, 256, device="cuda", dtype=torch.bfloat16)  # the op returns value's dtype

    def block(v, l, a):
        return proj(ms_deform_attn(v, spatial, l, a)).float().square().mean()

    compiled = torch.compile(block, fullgraph=True)
    got, code = run_compiled(lambda: torch.autograd.grad(compiled(value, loc, attn), (value, loc, attn)))
    assert_inductor_launches(code, "_forward_kernel", "_sample_grad_kernel", "_value_grad_kernel")
    want = torch.autograd.grad(block(value, loc, attn), (value, loc, attn))
    for a, b in zip(got, want):
        assert_close_to(a, b, 2e-2, 1e-2, "compiled vs eager")


@pytest.mark.gpu
def test_gpu_autocast_mix_is_served_by_triton():
    value, spatial, loc, attn = _gpu_case(torch.float32, queries=300, seed=3)
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        v = proj(value)  # bf16 under autocast; locations and weights stay float32
        out = ms_deform_attn(v, spatial, loc, attn)
    assert out.dtype == torch.bfloat16
    assert select_backend("ms_deform_attn", None, v, spatial, loc, attn, None).name == "triton"
    grads = torch.autograd.grad(out.float().square().sum(), (value, loc, attn))
    expected = ms_deform_attn_reference(v.double(), spatial, loc.double(), attn.double())
    assert_close_to(out, expected, 3e-2, 1.5e-2, "autocast out")
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_cell_boundaries_are_prefixes_of_one_growing_ramp():
    pytest.importorskip("triton")
    from zoo.ops.triton import ms_deform as kernels

    kernels._ARANGE.clear()
    small = kernels._cell_boundaries(5, torch.int32, torch.device("cpu"))
    assert small.tolist() == [0, 1, 2, 3, 4]
    big = kernels._cell_boundaries(40, torch.int32, torch.device("cpu"))
    assert torch.equal(big, torch.arange(40, dtype=torch.int32))
    again = kernels._cell_boundaries(7, torch.int32, torch.device("cpu"))
    assert torch.equal(again, torch.arange(7, dtype=torch.int32)) and again.data_ptr() == big.data_ptr()
    assert kernels._cell_boundaries(3, torch.int64, torch.device("cpu")).dtype == torch.int64
