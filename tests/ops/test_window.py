"""window_attention: reference vs a float64 dense-masked oracle, SDPA vs reference (forward and backward)."""
import pytest
import torch

from zoo.ops import available_backends, window_attention
from zoo.ops._dispatch import select_backend
from zoo.ops.window import shifted_window_mask, window_partition, window_reverse


def _qkv(b, heads, h, w, d, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, h, w, d, generator=g, dtype=dtype).to(device) for _ in range(3)]


def _dense_oracle(q, k, v, window, shift, scale, bias):
    """Full (H*W x H*W) attention with a mask from the image-coordinate window definition, in float64."""
    b, heads, h, w, d = q.shape
    (wh, ww), (sy, sx) = window, shift
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    # Same window: the grid offset by the shift, border windows cut short.
    gy, gx = torch.div(ys - sy, wh, rounding_mode="floor"), torch.div(xs - sx, ww, rounding_mode="floor")
    allowed = (gy[:, None] == gy[None, :]) & (gx[:, None] == gx[None, :])
    logits = torch.einsum("bhnd,bhmd->bhnm", q.reshape(b, heads, h * w, d).double(),
                          k.reshape(b, heads, h * w, d).double()) * scale
    if bias is not None:
        # The bias is indexed by positions inside the rolled windows.
        ry, rx = (ys - sy) % h, (xs - sx) % w
        win = (ry // wh) * (w // ww) + rx // ww
        pos = (ry % wh) * ww + rx % ww
        full = torch.broadcast_to(bias.double(), ((h // wh) * (w // ww), heads, wh * ww, wh * ww))
        dense = full[win[:, None], :, pos[:, None], pos[None, :]]  # (HW, HW, heads)
        logits = logits + dense.permute(2, 0, 1)
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = logits.softmax(-1) @ v.reshape(b, heads, h * w, -1).double()
    return out.reshape(b, heads, h, w, -1)


CASES = [
    # (H, W, window, shift, bias kind)
    (8, 8, (4, 4), (0, 0), "heads"),
    (8, 8, (4, 4), (2, 2), "heads"),
    (8, 12, (4, 4), (1, 3), "window"),
    (6, 9, (3, 3), (1, 2), None),
    (8, 6, (8, 2), (0, 0), None),      # column stripes (CSWin, split 2)
    (4, 10, (1, 10), (0, 0), None),    # row stripes (CSWin, split 1)
    (5, 7, (5, 7), (0, 0), "heads"),   # one global window
]


def _bias(kind, h, w, window, heads, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    n = window[0] * window[1]
    if kind == "heads":
        return torch.randn(heads, n, n, generator=g, dtype=dtype)
    if kind == "window":
        return torch.randn((h // window[0]) * (w // window[1]), heads, n, n, generator=g, dtype=dtype)
    return None


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("h,w,window,shift,bias_kind", CASES)
def test_matches_dense_oracle(backend, h, w, window, shift, bias_kind):
    q, k, v = _qkv(2, 3, h, w, 4)
    bias = _bias(bias_kind, h, w, window, 3)
    out = window_attention(q, k, v, window, shift_size=shift, scale=0.7, bias=bias, backend=backend)
    ref = _dense_oracle(q, k, v, window, shift, 0.7, bias)
    assert out.shape == (2, 3, h, w, 4)
    assert (out - ref).abs().max().item() < 1e-12
    assert ref.abs().max().item() > 0.1  # not a degenerate comparison


def test_default_scale_and_value_dim():
    q, k, _ = _qkv(1, 2, 4, 4, 9)
    v = torch.randn(1, 2, 4, 4, 3, dtype=torch.float64)
    out = window_attention(q, k, v, 2, backend="reference")
    ref = _dense_oracle(q, k, v, (2, 2), (0, 0), 9 ** -0.5, None)
    assert out.shape == (1, 2, 4, 4, 3)
    assert (out - ref).abs().max().item() < 1e-12


def test_shift_mask_matches_swin_slices():
    """The mask equals Swin's construction (label 9 regions of the map by slices, compare labels per window)."""
    h, w, win, s = 12, 8, 4, 2
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -win), slice(-win, -s), slice(-s, None)):
        for ws in (slice(0, -win), slice(-win, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    labels = window_partition(img, win).view(-1, win * win)
    swin = labels[:, None, :] == labels[:, :, None]
    ours = shifted_window_mask(h, w, win, s)
    assert torch.equal(ours, swin)
    assert ours.shape == (6, 16, 16) and not ours.all()


def test_partition_roundtrip():
    x = torch.randn(2, 6, 8, 5)
    win = window_partition(x, (3, 2))
    assert win.shape == (2 * 2 * 4, 3, 2, 5)
    assert torch.equal(win[1], x[0, 0:3, 2:4])  # second window of the first image, raster order
    assert torch.equal(window_reverse(win, (3, 2), 6, 8), x)


@pytest.mark.parametrize("h,w,window,shift,bias_kind", [CASES[1], CASES[2], CASES[4]])
def test_sdpa_matches_reference_float32_forward_backward(h, w, window, shift, bias_kind):
    def run(backend):
        q, k, v = (t.float().requires_grad_() for t in _qkv(2, 3, h, w, 8, seed=3))
        bias = _bias(bias_kind, h, w, window, 3, dtype=torch.float32)
        if bias is not None:
            bias.requires_grad_()
        out = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend=backend)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        out.backward(grad_out)
        grads = [t.grad for t in (q, k, v)] + ([bias.grad] if bias is not None else [])
        return out, grads

    out_ref, g_ref = run("reference")
    out_sdpa, g_sdpa = run("sdpa")
    assert (out_sdpa - out_ref).abs().max().item() < 1e-5 * out_ref.abs().max().item()
    for a, b in zip(g_sdpa, g_ref):
        assert b.abs().max().item() > 1e-3
        assert (a - b).abs().max().item() < 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_compile_matches_eager_with_gradients(backend):
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 8, 8, 4, seed=4))
    bias = _bias("heads", 8, 8, (4, 4), 2, dtype=torch.float32).requires_grad_()

    def fn(q, k, v, bias):
        return window_attention(q, k, v, 4, shift_size=2, bias=bias, backend=backend)

    eager = fn(q, k, v, bias)
    g_eager = torch.autograd.grad(eager.square().sum(), (q, k, v, bias))
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, bias)
    g_comp = torch.autograd.grad(compiled.square().sum(), (q, k, v, bias))
    assert (compiled - eager).abs().max().item() <= 1e-6 * eager.abs().max().item()
    for a, b in zip(g_comp, g_eager):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_gradcheck_shifted(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 4, 4, 3, seed=11))
    bias = _bias("heads", 4, 4, (2, 2), 2).requires_grad_()

    def fn(q, k, v, bias):
        return window_attention(q, k, v, 2, shift_size=1, bias=bias, backend=backend)

    # fast_mode checks random projections of the Jacobian: the same check, far fewer evaluations
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-7, fast_mode=True)


def test_bf16_close_to_float32():
    q, k, v = (t.float() for t in _qkv(1, 2, 8, 8, 16, seed=2))
    bias = _bias("heads", 8, 8, (4, 4), 2, dtype=torch.float32)
    ref = window_attention(q, k, v, 4, shift_size=2, bias=bias, backend="reference")
    for backend in ("reference", "sdpa"):
        out = window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4, shift_size=2, bias=bias,
                               backend=backend)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max().item() < 3e-2


def test_dispatch_prefers_sdpa():
    q, k, v = _qkv(1, 1, 4, 4, 2)
    assert "sdpa" in available_backends("window_attention")
    assert select_backend("window_attention", None, q, k, v, window_size=(2, 2), shift_size=(0, 0), scale=1.0,
                          bias=None, dropout_p=0.0).name == "sdpa"


@pytest.mark.parametrize("kwargs,message", [
    (dict(window_size=3), "window_size=(3, 3) must be positive and divide"),
    (dict(window_size=(2, 2), shift_size=2), "shift_size=(2, 2) must satisfy"),
    (dict(window_size=(2, 2, 2)), "window_size must be an int or a pair"),
    (dict(window_size=2, bias=torch.zeros(3, 5, 5)), "bias of shape (3, 5, 5) does not broadcast"),
    (dict(window_size=2, dropout_p=1.0), "dropout_p must be in [0, 1)"),
])
def test_errors_name_argument(kwargs, message):
    q, k, v = _qkv(1, 2, 4, 4, 2)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        window_attention(q, k, v, **kwargs)


def test_error_on_wrong_rank():
    q = torch.zeros(1, 2, 16, 4)
    with pytest.raises(ValueError, match="q must be a 5-d tensor"):
        window_attention(q, q, q, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_gpu_sdpa_matches_reference(dtype, tol):
    h, w, window, shift = 28, 28, (7, 7), (3, 3)

    def run(backend):
        q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(2, 4, h, w, 32, dtype=torch.float32, seed=1,
                                                                device="cuda"))
        bias = _bias("heads", h, w, window, 4, dtype=torch.float32).cuda().requires_grad_()
        out = window_attention(q, k, v, window, shift_size=shift, bias=bias, backend=backend)
        out.float().square().sum().backward()
        return out.float(), [t.grad.float() for t in (q, k, v, bias)]

    out_ref, g_ref = run("reference")
    out_sdpa, g_sdpa = run("sdpa")
    assert (out_sdpa - out_ref).abs().max().item() <= tol * out_ref.abs().max().item()
    for a, b in zip(g_sdpa, g_ref):
        assert (a - b).abs().max().item() <= 10 * tol * b.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inductor_matches_eager():
    q, k, v = (t.float() for t in _qkv(2, 4, 28, 28, 32, seed=1, device="cuda"))
    bias = _bias("heads", 28, 28, (7, 7), 4, dtype=torch.float32).cuda()

    def fn(q, k, v, bias):
        return window_attention(q, k, v, 7, shift_size=3, bias=bias)

    eager = fn(q, k, v, bias)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v, bias)
    assert (compiled - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()


def test_shift_masks_are_cached_and_usable_for_training_after_inference_mode():
    from zoo.ops import window as win

    win._allowed.cache_clear()
    win._shift_logit_mask.cache_clear()
    q, k, v = (torch.randn(1, 2, 8, 8, 4) for _ in range(3))
    with torch.inference_mode():  # first built here: must still serve a later backward
        window_attention(q, k, v, 4, shift_size=2, backend="sdpa")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = window_attention(*leaves, 4, shift_size=2, backend="sdpa")
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    ref = window_attention(q, k, v, 4, shift_size=2, backend="reference")
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)
    assert win._shift_logit_mask.cache_info().hits >= 1 and win._allowed.cache_info().currsize == 1


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_empty_batch(backend):
    q = torch.randn(0, 2, 8, 8, 4)
    assert window_attention(q, q, q, 4, shift_size=2, backend=backend).shape == (0, 2, 8, 8, 4)
    assert window_partition(torch.randn(0, 8, 8, 3), 4).shape == (0, 4, 4, 3)
    assert window_reverse(torch.randn(0, 4, 4, 3), 4, 8, 8).shape == (0, 8, 8, 3)
