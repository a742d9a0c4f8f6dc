"""outlook_attention: the reference against an explicit-loop float64 oracle and timm's module; the Triton kernels
against the reference (CPU through TRITON_INTERPRET=1 in a subprocess, and on the GPU)."""
from __future__ import annotations

import re

import pytest
import torch

from zoo.ops import outlook_attention, registered_backends
from zoo.ops._dispatch import select_backend
from zoo.ops.outlook import outlook_window_grid, use_tiles
from zoo.ops.triton import interpreter_requested as _interpreting
from zoo.ops.triton import triton_missing_reason
from triton_checks import assert_inference_launch_agrees, run_pytest_in_interpreter

# (H, W, kernel_size, stride, padding, heads, head_dim): VOLO's k3/s2/p1 with odd sizes, stride 1, stride > kernel
# reach, no padding, even kernels and padding beyond the kernel's reach.
CONFIGS = [
    (7, 9, 3, 2, 1, 2, 4),
    (8, 8, 3, 1, 1, 1, 3),
    (9, 6, 3, 3, 0, 2, 4),
    (6, 7, 2, 2, 0, 1, 5),
    (5, 5, 3, 2, 2, 1, 2),
]


def loop_oracle(v: torch.Tensor, attn: torch.Tensor, num_heads: int, k: int, s: int, p: int,
                scale: float) -> torch.Tensor:
    """Outlook attention written window by window in float64: softmax with explicit exp/sum, zero-padded gather,
    overlap-sum by accumulating per-pixel lists. Differentiable in ``v`` and ``attn``."""
    v, attn = v.double(), attn.double()
    b, height, width, channels = v.shape
    _, h, w, _ = attn.shape
    d = channels // num_heads
    zero = v.new_zeros(b, num_heads, d)
    writes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for ny in range(h):
        for nx in range(w):
            logits = attn[:, ny, nx].reshape(b, num_heads, k * k, k * k) * scale
            e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
            probs = e / e.sum(dim=-1, keepdim=True)
            cells = [(ny * s - p + j // k, nx * s - p + j % k) for j in range(k * k)]
            window = torch.stack([v[:, y, x].reshape(b, num_heads, d) if 0 <= y < height and 0 <= x < width
                                  else zero for y, x in cells], dim=2)  # b, heads, k*k, d
            result = torch.einsum("bhij,bhjd->bhid", probs, window)
            for i, (y, x) in enumerate(cells):
                if 0 <= y < height and 0 <= x < width:
                    writes.setdefault((y, x), []).append(result[:, :, i].reshape(b, channels))
    rows = [torch.stack([torch.stack(writes[(y, x)]).sum(0) if (y, x) in writes else v.new_zeros(b, channels)
                         for x in range(width)], dim=1) for y in range(height)]
    return torch.stack(rows, dim=1)


def _inputs(cfg, randn, dtype=torch.float64, device="cpu", batch=2, seed=0):
    height, width, k, s, p, heads, d = cfg
    h, w = outlook_window_grid(height, width, k, s, p)
    v = randn(batch, height, width, heads * d, dtype=dtype, device=device, requires_grad=True, seed=seed)
    attn = randn(batch, h, w, heads * k ** 4, dtype=dtype, device=device, requires_grad=True, seed=seed + 1,
                 scale=2.0)
    return v, attn


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_reference_matches_loop_oracle(cfg, randn, assert_close, grads):
    v, attn = _inputs(cfg, randn)
    _, _, k, s, p, heads, _ = cfg
    scale = 0.7
    out = outlook_attention(v, attn, heads, k, s, p, scale=scale, backend="reference")
    expected = loop_oracle(v, attn, heads, k, s, p, scale)
    assert out.abs().max() > 0.5  # not a degenerate case
    assert_close(out, expected, atol=1e-12, what="forward")
    for got, want, name in zip(grads(out, [v, attn]), grads(expected, [v, attn]), ("grad v", "grad attn")):
        assert want.abs().max() > 0.1, name
        assert_close(got, want, atol=1e-12, what=name)


def test_reference_float32_matches_timm_module(randn, assert_close):
    """VOLO-D1's outlooker shape at a small map: the op inside timm's OutlookAttention's projections."""
    from timm.models.volo import OutlookAttention

    torch.manual_seed(0)
    module = OutlookAttention(48, 6, kernel_size=3, padding=1, stride=2).eval()
    x = randn(2, 14, 14, 48, seed=3)
    with torch.no_grad():
        expected = module(x)
        pooled = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2, ceil_mode=True).permute(0, 2, 3, 1)
        got = module.proj(outlook_attention(module.v(x), module.attn(pooled), 6, 3, 2, 1, backend="reference"))
    assert_close(got, expected, atol=1e-6 * expected.abs().max().item(), what="timm OutlookAttention")


def test_default_scale_is_head_dim_inverse_sqrt(randn, assert_close):
    v, attn = _inputs((6, 6, 3, 2, 1, 2, 4), randn)
    assert_close(outlook_attention(v, attn, 2, 3, 2, 1), outlook_attention(v, attn, 2, 3, 2, 1, scale=0.5),
                 atol=0.0, what="scale")


def test_gradcheck_reference(randn):
    v, attn = _inputs((3, 4, 3, 2, 1, 1, 2), randn, batch=1)  # 2x2 windows overlapping on row 1 and column 1
    assert torch.autograd.gradcheck(
        lambda a, b: outlook_attention(a, b, 1, 3, 2, 1, scale=0.8, backend="reference"), (v, attn), fast_mode=True)


def test_dropout_only_in_reference(randn):
    v, attn = _inputs((6, 6, 3, 2, 1, 2, 4), randn, dtype=torch.float32)
    torch.manual_seed(0)
    a = outlook_attention(v, attn, 2, 3, 2, 1, dropout_p=0.5)
    torch.manual_seed(0)
    b = outlook_attention(v, attn, 2, 3, 2, 1, dropout_p=0.5)
    plain = outlook_attention(v, attn, 2, 3, 2, 1)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    assert select_backend("outlook_attention", None, v, attn, 2, 3, 2, 1, 0.5, 0.5).name == "reference"


@pytest.mark.parametrize("bad, message", [
    (dict(v=torch.zeros(2, 6, 6)), "4-d channels-last"),
    (dict(num_heads=5), "divisible by num_heads"),
    (dict(attn=torch.zeros(2, 4, 3, 2 * 81)), "attn must have shape"),
    (dict(stride=0), "stride must be an int >= 1"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_input_errors_name_the_argument(bad, message):
    args = dict(v=torch.zeros(2, 6, 6, 8), attn=torch.zeros(2, 3, 3, 2 * 81), num_heads=2, kernel_size=3, stride=2,
                padding=1, dropout_p=0.0)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        outlook_attention(**args)


def test_backends_registered_and_cpu_dispatch(randn):
    assert registered_backends("outlook_attention") == ["triton", "reference"]
    v, attn = _inputs((6, 6, 3, 2, 1, 2, 4), randn, dtype=torch.float32)
    expected = "triton" if _interpreting() else "reference"
    assert select_backend("outlook_attention", None, v, attn, 2, 3, 2, 1, 0.5, 0.0).name == expected
    if not _interpreting():
        with pytest.warns(UserWarning, match=re.escape(triton_missing_reason() or "TRITON_INTERPRET")):
            out = outlook_attention(v, attn, 2, 3, 2, 1, backend="triton")
        assert torch.equal(out, outlook_attention(v, attn, 2, 3, 2, 1, backend="reference"))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


def _check_triton(cfg, dtype, device, randn, assert_close, grads, seed=0):
    """Triton forward and both gradients against the float64 reference; tolerances relative to magnitudes."""
    v, attn = _inputs(cfg, randn, dtype=dtype, device=device, seed=seed)
    _, _, k, s, p, heads, _ = cfg
    out = outlook_attention(v, attn, heads, k, s, p, backend="triton")
    with torch.no_grad():  # the inference launch (no autograd node, no statistics stored)
        assert_inference_launch_agrees(outlook_attention(v, attn, heads, k, s, p, backend="triton"), out)
    v64, a64 = (t.detach().double().requires_grad_() for t in (v, attn))
    ref = outlook_attention(v64, a64, heads, k, s, p, backend="reference")
    tol = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert out.dtype == dtype
    assert_close(out, ref, atol=tol * ref.abs().max().item(), what=f"forward {dtype}")
    got = grads(out.float(), [v, attn])
    want = grads(ref, [v64, a64])
    for g, w_, name in zip(got, want, ("grad v", "grad attn")):
        assert g.dtype == dtype
        assert_close(g, w_, atol=tol * w_.abs().max().item(), what=f"{name} {dtype}")


@pytest.mark.skipif(not _interpreting(), reason="runs inside the TRITON_INTERPRET=1 subprocess")
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: "x".join(map(str, c)))
def test_triton_interpreter_matches_reference(cfg, randn, assert_close, grads):
    assert select_backend("outlook_attention", None, *_inputs(cfg, randn, dtype=torch.float32),
                          cfg[5], cfg[2], cfg[3], cfg[4], 0.5, 0.0).name == "triton"
    _check_triton(cfg, torch.float32, "cpu", randn, assert_close, grads)
    if cfg == CONFIGS[0]:
        _check_triton(cfg, torch.float16, "cpu", randn, assert_close, grads)


@pytest.mark.skipif(not _interpreting(), reason="runs inside the TRITON_INTERPRET=1 subprocess")
def test_triton_interpreter_matches_reference_with_small_tiles(randn, assert_close, grads):
    """Two pixels a program: the programs' pixel blocks cut across window rows and image rows (rows of 5 pixels)."""
    with use_tiles(rows=2, num_warps=1):
        _check_triton((5, 5, 3, 1, 1, 1, 3), torch.float32, "cpu", randn, assert_close, grads, seed=3)


@pytest.mark.skipif(not _interpreting(), reason="runs inside the TRITON_INTERPRET=1 subprocess")
def test_triton_interpreter_zeroes_pixels_no_window_covers(randn, assert_close, grads):
    """kernel_size 2 < stride 3: the pixels of residue class 1 along each axis lie under no window, so no launch
    writes them; the output and grad_v there must be zeros, not uninitialised memory."""
    cfg = (9, 7, 2, 3, 1, 1, 3)
    _check_triton(cfg, torch.float32, "cpu", randn, assert_close, grads, seed=5)
    v, attn = _inputs(cfg, randn, dtype=torch.float32, seed=5)
    out = outlook_attention(v, attn, 1, 2, 3, 1, backend="triton")
    grad_v, = torch.autograd.grad(out.sum(), [v])
    for t in (out, grad_v):
        assert t[:, 1::3].abs().max() == 0 and t[:, :, 1::3].abs().max() == 0
        assert t[:, 0::3, 0::3].abs().min() > 0


@pytest.mark.parametrize("knob", [dict(rows=0), dict(rows=12), dict(num_warps=3), dict(rows=2.0)])
def test_use_tiles_rejects_bad_knobs(knob):
    with pytest.raises(ValueError, match=next(iter(knob))):
        use_tiles(**knob)


@pytest.mark.skipif(not _interpreting(), reason="runs inside the TRITON_INTERPRET=1 subprocess")
def test_triton_custom_op_opcheck(randn):
    v, attn = _inputs(CONFIGS[0], randn, dtype=torch.float32)
    torch.library.opcheck(torch.ops.zoo.outlook_attention_fwd.default, (v, attn, 2, 3, 2, 1, 0.5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_triton_kernels_under_interpreter():
    """Runs the interpreter tests (and the dispatch check) in a fresh process with TRITON_INTERPRET=1."""
    if _interpreting():
        pytest.skip("already interpreting: the tests above ran in this process")
    run_pytest_in_interpreter(__file__, "interpreter_matches or interpreter_zeroes or opcheck or cpu_dispatch",
                              passed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS + [(28, 28, 3, 2, 1, 6, 32), (27, 30, 3, 2, 1, 4, 48)],
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_triton_gpu_matches_reference(cfg, dtype, randn, assert_close, grads):
    _check_triton(cfg, dtype, "cuda", randn, assert_close, grads)


@pytest.mark.gpu
def test_triton_gpu_compiles_without_graph_breaks(randn, assert_close):
    from triton_checks import assert_inductor_launches, run_compiled

    v, attn = _inputs((28, 28, 3, 2, 1, 6, 32), randn, dtype=torch.bfloat16, device="cuda")

    def f(v, attn):
        return outlook_attention(v * 2, attn, 6, 3, 2, 1).sum()

    compiled = torch.compile(f, fullgraph=True)
    eager_grads = torch.autograd.grad(f(v, attn), (v, attn))
    grads, code = run_compiled(lambda: torch.autograd.grad(compiled(v, attn), (v, attn)))
    assert_inductor_launches(code, "forward_kernel", "grad_v_kernel", "grad_attn_kernel")
    for g, e in zip(grads, eager_grads):
        assert_close(g.float(), e.float(), atol=1e-2 * e.abs().max().item(), what="compiled grad")
    torch.library.opcheck(torch.ops.zoo.outlook_attention_fwd.default, (v.detach().float(), attn.detach().float(),
                                                                      6, 3, 2, 1, 0.5))
