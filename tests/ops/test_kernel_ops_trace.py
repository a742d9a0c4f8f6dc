"""The ``torch.library.triton_op`` bodies trace on fake tensors with symbolic sizes, as ``torch.compile`` runs them
under dynamic shapes (a batch or map size that changed between calls), without specialising those sizes.

Under ``triton_op`` the body of each op (host-side launch code: sizes, strides, tile choices, buffers) runs during
tracing, where a custom op's separate fake function used to; sizes that are ``SymInt`` must neither be hashed (a
cache key) nor turned into Python ints. The kernels are not launched: ``wrap_triton`` records them.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext, is_concrete_int

import zoo.ops.agent_bias  # noqa: F401  (registers the ops)
import zoo.ops.layer_norm  # noqa: F401
import zoo.ops.ms_deform  # noqa: F401
import zoo.ops.outlook  # noqa: F401
import zoo.ops.triton.agent  # noqa: F401
import zoo.ops.triton.neighborhood  # noqa: F401
import zoo.ops.triton.routing  # noqa: F401
import zoo.ops.triton.window  # noqa: F401
from zoo.ops import triton as zoo_triton

pytestmark = pytest.mark.skipif(not zoo_triton._TRITON_OP, reason="needs torch.library.triton_op (torch >= 2.6), "
                                "triton, and no TRITON_INTERPRET (interpreted kernels keep custom ops)")

F16 = torch.float16


def _randn(*shape: int, dtype: torch.dtype = F16) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _cases():
    """name -> (op call, its tensor arguments, the dims of every tensor argument made symbolic)."""
    zo = torch.ops.zoo
    q, agent = _randn(2, 2, 17, 16), _randn(2, 2, 4, 16)
    rq, index, rlse = _randn(2, 8, 8, 32), torch.randint(0, 16, (2, 16, 4)), _randn(4, 16, 4, dtype=torch.float32)
    wq = _randn(2, 8, 8, 2, 16)
    nq, nlse = _randn(2, 2, 8, 8, 16), _randn(2, 2, 8, 8, dtype=torch.float32)
    v, attn, olse = _randn(2, 8, 8, 32), _randn(2, 4, 4, 2 * 81), _randn(2, 4, 4, 2, 9, dtype=torch.float32)
    x, w, b, stat = _randn(2, 64, 32), _randn(32, dtype=torch.float32), _randn(32, dtype=torch.float32), \
        _randn(2, 64, dtype=torch.float32)
    shapes, starts = torch.tensor([[8, 8], [4, 4]]), torch.tensor([0, 64])
    value = _randn(2, 80, 2, 16)
    loc, weights = torch.rand(2, 10, 2, 2, 2, 2).to(F16), torch.rand(2, 10, 2, 2, 2).to(F16)
    return {
        "agent_fwd": (lambda q, k, v, a: zo.agent_attention_fwd(q, k, v, a, None, None, 0.25), (q, q, q, agent),
                      (0, 2)),
        "routing_fwd": (lambda q, k, v, i: zo.routing_attention_fwd(q, k, v, i, 2, 2, 2, 0.2), (rq, rq, rq, index),
                        (0, 1, 2)),
        "routing_route": (lambda q, k: zo.routing_route(q, k, 2, 2, 4), (rq, rq), (0, 1, 2)),
        "routing_bwd": (lambda g, q, k, v, o, lse, i: zo.routing_attention_bwd(g, q, k, v, o, lse, i, 2, 2, 2, 0.2),
                        (rq, rq, rq, rq, rq, rlse, index), (0, 1, 2)),
        "window_fwd": (lambda q, k, v: zo.window_attention_fwd(q, k, v, None, 4, 4, 2, 2, 0.25), (wq, wq, wq),
                       (0, 1, 2)),
        "window_bwd": (lambda g, q, k, v: zo.window_attention_bwd(g, q, k, v, None, 4, 4, 2, 2, 0.25, False),
                       (wq, wq, wq, wq), (0, 1, 2)),
        "outlook_fwd": (lambda v, a: zo.outlook_attention_fwd(v, a, 2, 3, 2, 1, 0.25), (v, attn), (0, 1, 2)),
        "outlook_bwd": (lambda g, v, a, lse: zo.outlook_attention_bwd(g, v, a, lse, 2, 3, 2, 1, 0.25),
                        (v, v, attn, olse), (0, 1, 2)),
        "layer_norm_fwd": (lambda x, w, b: zo.layer_norm_fwd(x, w, b, 1e-5, F16), (x, w, b), (0, 1)),
        "layer_norm_bwd": (lambda g, x, w, m, r: zo.layer_norm_bwd(g, x, w, m, r, True, True, True),
                           (x, x, w, stat, stat), (0, 1)),
        "neighborhood_fwd": (lambda q, k, v: zo.neighborhood_attention_fwd(q, k, v, [3, 3], [2, 1], [False, True],
                                                                         0.25, True), (nq, nq, nq), (0, 2, 3)),
        "neighborhood_bwd": (lambda g, q, k, v, o, lse: zo.neighborhood_attention_bwd(
            g, q, k, v, o, lse, [3, 3], [2, 1], [False, True], 0.25), (nq, nq, nq, nq, nq, nlse), (0, 2, 3)),
        "ms_deform_fwd": (lambda v, s, i, l, a: zo.ms_deform_attn_fwd(v, s, i, l, a),
                          (value, shapes, starts, loc, weights), (0, 1)),
        "ms_deform_bwd": (lambda g, v, s, i, l, a: zo.ms_deform_attn_bwd(g, v, s, i, l, a, True),
                          (_randn(2, 10, 32), value, shapes, starts, loc, weights), (0, 1)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_op_body_traces_with_symbolic_sizes(name):
    call, tensors, dims = _cases()[name]
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = [mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC for d in range(t.dim())]))
        for t in tensors]
    with mode:
        outputs = call(*fakes)
    first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    assert first.shape[:1] == fakes[0].shape[:1]
    assert not is_concrete_int(first.shape[0]), f"{name}: the batch size was specialised"


def test_agent_bias_op_bodies_trace_on_fake_tensors():
    """The bias maps' ops take static sizes only (parameters' shapes are static under torch.compile; the dispatch
    sends symbolic grids to the reference), but their bodies still run on fake tensors while tracing (the host-side
    sizes, scales and buffers), with the kernels recorded, not launched."""
    from zoo.ops import agent_bias as ab

    ab._plan.cache_clear()  # the launch plan is made under the fake mode, not taken from an earlier eager call
    shapes = ab._param_shapes(3, 49, (7, 7), (14, 14), (12, 12))
    mode = FakeTensorMode(shape_env=ShapeEnv())
    static = lambda t: StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * t.dim())  # noqa: E731
    params = [mode.from_tensor(t, symbolic_context=static(t))
              for t in (_randn(*shape, dtype=torch.float32) for shape in shapes)]
    with mode:
        key, query = torch.ops.zoo.agent_bias_maps_fwd(*params, [14, 14], [12, 12])
        grads = torch.ops.zoo.agent_bias_maps_bwd(key, query, [7, 7], [14, 14], [12, 12], True)
    assert key.shape == (1, 3, 49, 1 + 196) and query.shape == (1, 3, 1 + 144, 49)
    assert [tuple(g.shape) for g in grads] == shapes and all(g.dtype == torch.float32 for g in grads)
