"""Every op rejects integer inputs, and mixed dtypes outside autocast, at its boundary with one clear message."""
from __future__ import annotations

import warnings

import pytest
import torch

import zoo.ops as ops
from zoo.ops._checks import check_float_tensors


def test_check_float_tensors_messages():
    x = torch.zeros(2, 3)
    check_float_tensors("op", a=x, b=x, c=None)  # accepted: one floating dtype, None skipped
    with pytest.raises(ValueError, match=r"op: a, b must be floating-point tensors, got a=torch.float32, "
                                         r"b=torch.int64"):
        check_float_tensors("op", a=x, b=x.long())
    with pytest.raises(ValueError, match=r"op: a, b must share one dtype outside torch.autocast, got "
                                         r"a=torch.float32, b=torch.float16; cast them to one dtype"):
        check_float_tensors("op", a=x, b=x.half())
    check_float_tensors("op", same_dtype=False, a=x, b=x.half())
    with torch.autocast("cpu", torch.bfloat16):  # autocast casts mixed operands in the reference matmuls
        check_float_tensors("op", a=x, b=x.half())


CALLS = {
    "routing_attention": lambda f: ops.routing_attention(*f(torch.randn(1, 8, 8, 32)), num_heads=2, region_size=4,
                                                         topk=2, scale=0.2),
    "window_attention": lambda f: ops.window_attention(*f(torch.randn(1, 2, 7, 7, 16)), 7),
    "neighborhood_attention": lambda f: ops.neighborhood_attention(*f(torch.randn(1, 2, 9, 9, 16)), 3),
    "downsampled_attention": lambda f: ops.downsampled_attention(*f(torch.randn(1, 2, 20, 16))),
    "cross_attention": lambda f: ops.cross_attention(*f(torch.randn(1, 2, 20, 16))),
    "masked_attention": lambda f: ops.masked_attention(*f(torch.randn(1, 2, 20, 16))),
    "agent_attention": lambda f: ops.agent_attention(*f(torch.randn(1, 2, 20, 16)), torch.randn(1, 2, 4, 16)),
}


@pytest.mark.parametrize("op", sorted(CALLS))
def test_integer_and_mixed_inputs_are_named(op):
    with pytest.raises(ValueError, match=f"{op}: .*must be floating-point tensors, got q=torch.int64"):
        CALLS[op](lambda x: (x.long(), x.long(), x.long()))
    with pytest.raises(ValueError, match=f"{op}: .*must share one dtype outside torch.autocast, got q=torch.float16"):
        CALLS[op](lambda x: (x.half(), x, x))
    with warnings.catch_warnings(), torch.autocast("cpu", torch.bfloat16):
        warnings.simplefilter("ignore")  # the SDPA backends decline mixed operands; the reference serves them
        out = CALLS[op](lambda x: (x, x.bfloat16(), x))
    out = out[0] if isinstance(out, tuple) else out
    assert out.is_floating_point() and torch.isfinite(out.float()).all()


def test_outlook_rejects_integer_inputs_and_keeps_mixed_ones():
    v, attn = torch.randn(1, 6, 6, 32), torch.randn(1, 3, 3, 2 * 81)
    with pytest.raises(ValueError, match="outlook_attention: v, attn must be floating-point tensors"):
        ops.outlook_attention(v, attn.long(), num_heads=2, kernel_size=3, stride=2, padding=1)
    out = ops.outlook_attention(v.half(), attn, num_heads=2, kernel_size=3, stride=2, padding=1)
    assert out.dtype == torch.float16  # the output is in v's dtype (docstring)
