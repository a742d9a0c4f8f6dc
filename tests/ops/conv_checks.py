"""Inputs shared by the tests of the convolution layers computed another way (patch GEMM, space-to-depth)."""
import torch
import torch.nn.functional as F


def conv_inputs(shape, out_channels, kernel, dtype=torch.float64, bias=True, seed=0):
    """(x of ``shape`` (B, C_in, H, W), weight (out_channels, C_in, *kernel), bias (out_channels,) or None), random
    normal values from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    weight = torch.randn(out_channels, shape[1], *kernel, generator=g, dtype=dtype)
    b = torch.randn(out_channels, generator=g, dtype=dtype) if bias else None
    return x, weight, b


def assert_equals_the_convolution(compute, x, weight, b, **conv_args) -> None:
    """``compute(x, weight, b)`` against ``F.conv2d(x, weight, b, **conv_args)`` in float64: the output and the
    gradients of x, weight and b (those given) for one random output gradient, to 1e-12."""
    leaves = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    ours = compute(x, weight, b)
    ref = F.conv2d(x, weight, b, **conv_args)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    for g_ours, g_ref in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def assert_cuda_layer_matches(layer, x, ref) -> torch.Tensor:
    """The CUDA ``layer`` on float32 ``x`` against the float64 convolution ``ref`` (on CUDA): float32 output to 1e-6
    relative, bf16 autocast output (in bf16) to 1e-2, ``torch.compile(fullgraph=True)`` to 1e-6; returns the float32
    output."""
    def rel(out):
        return ((out.double() - ref).norm() / ref.norm()).item()

    with torch.no_grad():
        out = layer(x)
        assert rel(out) < 1e-6
        with torch.autocast("cuda", torch.bfloat16):
            out16 = layer(x)
        assert out16.dtype == torch.bfloat16 and rel(out16) < 1e-2
        assert rel(torch.compile(layer, fullgraph=True)(x)) < 1e-6
    return out
