"""pooled_agent_attention: the reference is pool_agent_tokens + agent_attention + depthwise_conv; the ``triton``
backend (one launch forward, one autograd node) against it in Triton's CPU interpreter (fp32 / fp16, outputs and
every gradient, equal and unequal pooling windows, a class-token prefix, several token tiles and query splits) and on
the GPU (bf16 autocast, the released Agent-DeiT and Agent-Swin shapes, and those models fused against unfused in
inference and training); dispatch and input errors on plain CPU."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import zoo.ops.triton.agent as ta  # registers the backend
from zoo.ops import agent_attention, depthwise_conv, pooled_agent_attention
from zoo.ops._dispatch import select_backend
from zoo.ops.agent import pool_agent_tokens
from triton_checks import assert_close_to, run_in_interpreter


def make_inputs(b, heads, grid, agent_grid, d, *, prefix=0, conv=True, dtype=torch.float32, device="cpu",
                seed=0):
    """q, k, v as head-split views of one (B, N, 3, heads, d) projection (the models' strides), the biases
    (1, heads, A, N) / (1, heads, N, A) float32, the conv weight (C, 1, 3, 3) and bias (C,) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    n, a, c = prefix + grid[0] * grid[1], agent_grid[0] * agent_grid[1], heads * d
    qkv = torch.randn(b, n, 3, heads, d, generator=g).to(device=device, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    ab = (torch.randn(1, heads, a, n, generator=g) * 0.5).to(device)
    qb = (torch.randn(1, heads, n, a, generator=g) * 0.5).to(device)
    weight = (torch.randn(c, 1, 3, 3, generator=g) * 0.3).to(device=device, dtype=dtype) if conv else None
    bias = (torch.randn(c, generator=g) * 0.1).to(device=device, dtype=dtype) if conv else None
    return q, k, v, ab, qb, weight, bias


def call(inputs, grid, agent_grid, prefix, backend, scale=0.3):
    q, k, v, ab, qb, weight, bias = inputs
    return pooled_agent_attention(q, k, v, grid=grid, agent_grid=agent_grid, prefix=prefix, scale=scale,
                                  agent_bias=ab, query_bias=qb, conv_weight=weight, conv_bias=bias, backend=backend)


def composed(inputs, grid, agent_grid, prefix, scale=0.3):
    """The definition written out with the three ops, each on its automatic backend (agents from the grid tokens; the
    prefix gets no conv term)."""
    q, k, v, ab, qb, weight, bias = inputs
    b, heads, n, d = q.shape
    grid_q = q.transpose(1, 2)[:, prefix:].reshape(b, -1, heads * d)
    agents = pool_agent_tokens(grid_q, grid, agent_grid).reshape(b, -1, heads, d).transpose(1, 2)
    out = agent_attention(q, k, v, agents, scale=scale, agent_bias=ab, query_bias=qb)
    if weight is None:
        return out
    tokens = out.transpose(1, 2).reshape(b, n, heads * d)
    values = v.transpose(1, 2)[:, prefix:].reshape(b, *grid, heads * d)
    rows = depthwise_conv(values, weight, bias, residual=tokens[:, prefix:].reshape(b, *grid, -1))
    return torch.cat([tokens[:, :prefix], rows.flatten(1, 2)], 1).reshape(b, n, heads, d).transpose(1, 2)


CASES = [  # (grid, agent_grid, prefix, conv)
    ((4, 4), (2, 2), 1, True),    # Agent-DeiT's layout: a class token, equal windows
    ((7, 7), (3, 3), 0, True),    # Agent-Swin's 7x7 window with 3x3 agents: overlapping windows
    ((5, 6), (2, 3), 1, True),    # unequal rows, a non-square grid
    ((4, 4), (2, 2), 0, False),   # no conv term
]


def test_reference_is_the_three_ops_with_gradients():
    for grid, agent_grid, prefix, conv in CASES:
        inputs = make_inputs(2, 2, grid, agent_grid, 8, prefix=prefix, conv=conv)
        leaves = [t.detach().requires_grad_() for t in inputs if t is not None]
        q, k, v, ab, qb, *conv_args = leaves
        full = (q, k, v, ab, qb, *(conv_args or (None, None)))
        got, want = call(full, grid, agent_grid, prefix, "reference"), composed(full, grid, agent_grid, prefix)
        assert torch.equal(got, want), (grid, agent_grid, prefix, conv)
        g = torch.randn_like(got)
        for x, y in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
            assert torch.equal(x, y), (grid, agent_grid, prefix, conv)
        with torch.no_grad():  # the in-place conv sum of inference calls: the same numbers
            assert torch.equal(call(full, grid, agent_grid, prefix, "reference"), want)


def test_triton_refuses_what_it_cannot_run():
    q, k, v, ab, qb, weight, bias = make_inputs(1, 2, (4, 4), (2, 2), 8, prefix=1)
    kwargs = dict(grid=(4, 4), agent_grid=(2, 2), prefix=1, scale=0.3, agent_bias=ab, query_bias=qb, dropout_p=0.0)
    assert "dropout_p=0.1" in ta._pooled_supports(q, k, v, weight, bias, **{**kwargs, "dropout_p": 0.1})
    with torch.no_grad():
        assert "kernel size 5" in ta._pooled_supports(q, k, v, torch.randn(16, 1, 5, 5), None, **kwargs)
        with torch.autocast("cpu", torch.bfloat16):  # a bf16 conv added to fp16 outputs: a float32 sum
            assert "not q's" in ta._pooled_supports(q.half(), k.half(), v.half(), weight, None, **kwargs)
        assert "dtypes" in ta._pooled_supports(q, k.half(), v, weight, bias, **kwargs)
    # automatic choice without grad off CUDA: the reference (faster than the interpreter)
    with torch.no_grad():
        assert select_backend("pooled_agent_attention", None, q, k, v, weight, bias, **kwargs).name == "reference"


@pytest.mark.parametrize("change, message", [
    (dict(grid=(4, 5)), "prefix \\+ H \\* W = 1 \\+ 4 \\* 5 = 21 tokens, got q 17"),
    (dict(grid=(4, 0)), "grid must be two positive ints"),
    (dict(agent_grid=(2,)), "agent_grid must be two positive ints"),
    (dict(prefix=-1), "prefix must be an int >= 0"),
    (dict(conv_weight=torch.randn(16, 1, 2, 2)),
     "conv_weight must be \\(heads \\* d_v, 1, K, K\\) = \\(16, 1, K, K\\)"),
    (dict(conv_weight=torch.randn(8, 1, 3, 3)), "= \\(16, 1, K, K\\) with K odd, got \\(8, 1, 3, 3\\)"),
    (dict(conv_bias=torch.randn(15)), "conv_bias must be \\(16,\\) or None, got \\(15,\\)"),
    (dict(conv_weight=None), "conv_bias needs a conv_weight"),
    (dict(agent_bias=torch.randn(1, 2, 5, 17)), "agent_bias of shape \\(1, 2, 5, 17\\) does not broadcast"),
])
def test_input_errors_name_the_argument(change, message):
    q, k, v, ab, qb, weight, bias = make_inputs(1, 2, (4, 4), (2, 2), 8, prefix=1)
    kwargs = {**dict(grid=(4, 4), agent_grid=(2, 2), prefix=1, agent_bias=ab, query_bias=qb, conv_weight=weight,
                     conv_bias=bias), **change}
    with pytest.raises(ValueError, match=message):
        pooled_agent_attention(q, k, v, **kwargs)


def test_conv_dtypes_follow_depthwise_conv_rules_on_every_backend():
    """Outside autocast the conv's weights must have the values' dtype: the fused backend, which computes the conv
    itself, refuses what the reference's depthwise_conv refuses instead of casting the weights silently."""
    q, k, v, ab, qb, weight, bias = make_inputs(1, 2, (4, 4), (2, 2), 8, prefix=1, dtype=torch.float16)
    for backend in ("reference", "triton", None):
        with pytest.raises(ValueError, match="weight has dtype torch.float32 but x has torch.float16"):
            pooled_agent_attention(q, k, v, grid=(4, 4), agent_grid=(2, 2), prefix=1, conv_weight=weight.float(),
                                   conv_bias=bias, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# the kernel in Triton's CPU interpreter


def _interpreter_checks() -> None:
    """fp32 within float32 rounding of the reference (the agents' window sums in another order), fp16 bitwise where
    the window sums are exact; several 16-token tiles and query splits give the same bits as one."""
    with torch.no_grad():
        for grid, agent_grid, prefix, conv in CASES:
            for dtype in (torch.float32, torch.float16):
                inputs = make_inputs(2, 2, grid, agent_grid, 16, prefix=prefix, conv=conv, dtype=dtype, seed=3)
                assert select_backend("pooled_agent_attention", "triton", *inputs[:3], *inputs[5:], grid=grid,
                                      agent_grid=agent_grid, prefix=prefix, scale=0.3, agent_bias=inputs[3],
                                      query_bias=inputs[4], dropout_p=0.0).name == "triton"
                got = call(inputs, grid, agent_grid, prefix, "triton")
                want = call(inputs, grid, agent_grid, prefix, "reference")
                assert got.dtype == want.dtype == dtype
                tol = 1e-5 if dtype == torch.float32 else 2e-3
                assert_close_to(got, want, tol, tol, f"{dtype} {grid} {agent_grid} prefix {prefix} conv {conv}")
        # 7x7 + a class token = 50 tokens: four 16-token tiles, dealt to 1, 2 and 3 programs a (batch, head)
        inputs = make_inputs(1, 3, (7, 7), (3, 3), 16, prefix=1, seed=5)
        want = call(inputs, (7, 7), (3, 3), 1, "reference")
        outs = []
        for splits in (1, 2, 3):
            with ta.use_tiles(block_t=16, num_warps=2, num_stages=1, query_splits=splits):
                outs.append(call(inputs, (7, 7), (3, 3), 1, "triton"))
        assert_close_to(outs[0], want, 1e-5, 1e-5, "16-token tiles")
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        # empty batch
        inputs = make_inputs(0, 2, (4, 4), (2, 2), 16, prefix=1)
        assert call(inputs, (4, 4), (2, 2), 1, "triton").shape == (0, 2, 17, 16)
    _interpreter_gradient_checks()
    print("ok")


def outputs_and_grads(inputs, grid, agent_grid, prefix, backend):
    """The output and the gradients of sum(out * g) w.r.t. every input tensor (all leaves requiring grad)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = call(leaves, grid, agent_grid, prefix, backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, [t for t in leaves if t is not None], g))


@contextlib.contextmanager
def _backward_launches():
    """Count the pooled backward's paths while the block runs: yields a Counter of ``fused``
    (``_launch_pooled_backward``, one launch) and ``split`` (``_launch_backward``, then the pooling's and the conv's
    gradient kernels)."""
    calls = collections.Counter()
    fused, split = ta._launch_pooled_backward, ta._launch_backward

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    ta._launch_pooled_backward, ta._launch_backward = counted("fused", fused), counted("split", split)
    try:
        yield calls
    finally:
        ta._launch_pooled_backward, ta._launch_backward = fused, split


def _interpreter_gradient_checks() -> None:
    """Training calls (one autograd node: the fused forward keeping its statistics; off CUDA the backward's one
    launch, the agent attention's gradients with the attention's output recomputed, then the pooling's and the conv's)
    against autograd through the reference: q, k, v, both biases, the conv's weight and bias (fp32 in every layout,
    fp16 in the class-token and the overlapping-window one). Then the split path: the agent backward over two programs
    a (batch, head) and the separate pooling and conv gradient kernels."""
    for (grid, agent_grid, prefix, conv), dtype in [*((case, torch.float32) for case in CASES),
                                                (CASES[0], torch.float16), (CASES[1], torch.float16)]:
        inputs = make_inputs(2, 2, grid, agent_grid, 16, prefix=prefix, conv=conv, dtype=dtype, seed=3)
        with _backward_launches() as calls:
            got = outputs_and_grads(inputs, grid, agent_grid, prefix, "triton")
        assert calls == {"fused": 1}, calls
        want = outputs_and_grads(inputs, grid, agent_grid, prefix, "reference")
        assert got[0].grad_fn is not None and type(got[0].grad_fn).__name__.startswith("_PooledAgentAttention")
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        for i, (x, y) in enumerate(zip(got, want)):
            assert_close_to(x, y, tol, tol, f"{dtype} {grid} {agent_grid} prefix {prefix} conv {conv} [{i}]")
    # the split path, recomputing the output tiles: 16-token tiles; and the fused launch over the same tiles
    inputs = make_inputs(1, 3, (7, 7), (3, 3), 16, prefix=1, seed=5)
    want = outputs_and_grads(inputs, (7, 7), (3, 3), 1, "reference")
    for splits in (2, 1):
        with ta.use_tiles(block_t=16, num_warps=2, num_stages=1, backward_splits=splits), _backward_launches() as calls:
            got = outputs_and_grads(inputs, (7, 7), (3, 3), 1, "triton")
        assert calls == ({"split": 1} if splits == 2 else {"fused": 1}), (splits, calls)
        for i, (x, y) in enumerate(zip(got, want)):
            assert_close_to(x, y, 1e-5, 1e-5, f"backward_splits={splits} [{i}]")
    # the single launch at the tiles that fit three programs an SM (pooled_backward_tiles): 32-token attention
    # tiles, 8-token conv tiles (seven over the 7x7 grid)
    with ta.use_tiles(block_t=32, num_warps=4, num_stages=2, backward_splits=1, conv_tokens=8, max_registers=168), \
            _backward_launches() as calls:
        got = outputs_and_grads(inputs, (7, 7), (3, 3), 1, "triton")
    assert calls == {"fused": 1}, calls
    for i, (x, y) in enumerate(zip(got, want)):
        assert_close_to(x, y, 1e-5, 1e-5, f"three programs an SM's tiles [{i}]")
    _pooling_grad_checks()


def test_pooled_backward_takes_three_programs_an_sm_where_that_saves_a_wave():
    """The single-launch pooled backward's tiles (``pooled_backward_tiles``): the agent backward's and 16-token conv
    tiles, no register cap; where batch * heads needs two waves at two programs an SM and one at three (on 132 SMs:
    265 to 396 (batch, head) pairs) at 64-wide agent, head and value tiles in 16 bits, and an SM's shared memory holds
    three, two stages, 8-token conv tiles and a 168-register cap instead."""
    def launch(b, heads=6, a=49, d=64, dtype=torch.bfloat16, sms=132, sm_shared=228 * 1024):  # an H200
        plan = ta._plan(ta._Sizes(b, heads, 197, 197, a, d, d), dtype, True, sms, training=True, sm_shared=sm_shared)
        return plan.constexprs["BLOCK_T"], plan.constexprs["CONV_T"], plan.options

    default, three = (32, 16, {"num_warps": 4, "num_stages": 3}), (32, 8, {"num_warps": 4, "num_stages": 2,
                                                                             "maxnreg": 168})
    assert launch(64) == launch(128, heads=3) == three  # Agent-DeiT-S at batch 64, Agent-DeiT-T at 128: 384 pairs
    assert launch(45) == launch(66) == launch(64, dtype=torch.float16) == launch(64, a=33, d=40) == three
    assert launch(44) == launch(67) == launch(128) == launch(64, heads=3) == default  # 264, 402, 768, 192 pairs
    assert launch(64, sms=None) == launch(64, a=32) == default  # off CUDA; 32-wide agent tiles
    # where an SM's shared memory cannot hold three (an A100's 164 KB; torch < 2.6 does not report it)
    assert launch(64, sm_shared=164 * 1024) == launch(64, sm_shared=None) == default
    assert launch(64, d=80) == (64, 16, {"num_warps": 8, "num_stages": 2})  # 128-wide head tiles
    assert launch(64, dtype=torch.float32) == (16, 16, {"num_warps": 8, "num_stages": 1})
    with ta.use_tiles(conv_tokens=4, max_registers=200):
        assert launch(64) == (32, 4, {"num_warps": 4, "num_stages": 2, "maxnreg": 200})
        assert launch(128) == (32, 4, {"num_warps": 4, "num_stages": 3, "maxnreg": 200})
    # the agent backward's own plan (not the pooled launch) takes neither
    plain = ta._plan(ta._Sizes(64, 6, 197, 197, 49, 64, 64), torch.bfloat16, True, 132)
    assert "CONV_T" not in plain.constexprs and plain.options == default[2]


def _pooling_grad_checks() -> None:
    """The pooling's gradient kernel added into a strided dq (a third of a qkv gradient, after a class token)
    against autograd through pool_agent_tokens plus that sum: equal windows, overlapping ones, unequal rows and a map
    smaller than the agent grid (a token in three window rows), over several token tiles and channel blocks."""
    for (h, w), agent_grid, heads, d in [((4, 4), (2, 2), 2, 8), ((9, 9), (3, 3), 2, 40), ((5, 6), (2, 3), 1, 16),
                                         ((2, 3), (5, 4), 2, 8)]:
        for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
            g = torch.Generator().manual_seed(h * w)
            b, c, a = 2, heads * d, agent_grid[0] * agent_grid[1]
            buffer = torch.randn(b, 1 + h * w, 3 * c, generator=g).to(dtype)
            rows = buffer[:, 1:, :c]  # the grid queries' third of a qkv gradient after one prefix token
            da = torch.randn(b, a, heads, d, generator=g).to(dtype).transpose(1, 2)
            q = torch.zeros(b, h * w, c, dtype=dtype, requires_grad=True)
            pooled, = torch.autograd.grad(pool_agent_tokens(q, (h, w), agent_grid), q, da.transpose(1, 2).flatten(2))
            want = buffer.clone()
            want[:, 1:, :c] = (want[:, 1:, :c].float() + pooled.float()).to(dtype)
            ta._add_pooling_grad(rows, da, (h, w), agent_grid)
            assert_close_to(buffer, want, tol, tol, f"pooling gradient {(h, w)} -> {agent_grid} {dtype}")


def _packed_leaves(b, heads, grid, agent_grid, d, prefix, conv, dtype, seed=7):
    """(qkv (B, N, 3 * heads * d), agent bias, query bias, conv weight, conv bias), all leaves requiring grad."""
    q, k, v, *rest = make_inputs(b, heads, grid, agent_grid, d, prefix=prefix, conv=conv, dtype=dtype, seed=seed)
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).flatten(2)  # (B, N, 3, heads, d) -> (B, N, 3C)
    return [None if t is None else t.detach().clone().requires_grad_() for t in (qkv, *rest)]


def _packed_call(qkv, ab, qb, weight, bias, heads, grid, agent_grid, prefix, backend, pass_qkv=True):
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(2)
    return pooled_agent_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid=grid,
                                  agent_grid=agent_grid, prefix=prefix, scale=0.3, agent_bias=ab, query_bias=qb,
                                  conv_weight=weight, conv_bias=bias, backend=backend,
                                  qkv=qkv if pass_qkv else None).square()


def _packed_reference_cases(half_case):
    """For every layout in fp32 and ``half_case`` in fp16: (description, leaves (see :func:`_packed_leaves`), the
    non-None leaves, the layout arguments of :func:`_packed_call`, an output gradient, the reference's output and its
    gradients w.r.t. those leaves)."""
    for (grid, agent_grid, prefix, conv), dtype in [*((case, torch.float32) for case in CASES),
                                                (half_case, torch.float16)]:
        leaves = _packed_leaves(2, 2, grid, agent_grid, 16, prefix, conv, dtype)
        used = [t for t in leaves if t is not None]
        args = (2, grid, agent_grid, prefix)
        want = _packed_call(*leaves, *args, "reference")
        g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        what = f"{dtype} {grid} {agent_grid} prefix {prefix} conv {conv}"
        yield what, leaves, used, args, g, want, torch.autograd.grad(want, used, g)


def _packed_checks() -> None:
    """A traced training graph given qkv runs the packed op forward and backward (no stack of q's, k's and v's
    gradients): its output and every gradient (qkv's, both biases', the conv's weight and bias) are the reference's
    (fp32 within float32 rounding, fp16 within its own); its ops pass torch.library's schema and fake checks."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compilers import nop

    ops = set()

    def record(gm, example_inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return nop(gm, example_inputs)

    for case, (what, leaves, used, args, g, want, want_grads) in enumerate(_packed_reference_cases(CASES[1])):
        torch._dynamo.reset()
        ops.clear()
        compiled = torch.compile(lambda *a: _packed_call(*a, *args, None), fullgraph=True,
                                 backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        # the backward's one launch (off CUDA), and in the first layout also the split path (the agent kernels
        # recomputing the attention's output, the pooling's and the conv's gradient kernels)
        for splits in (None, 2) if case == 0 else (None,):
            with ta.use_tiles(backward_splits=splits), _backward_launches() as calls:
                got = compiled(*leaves)
                got_grads = torch.autograd.grad(got, used, g)
            assert calls == ({"split": 1} if splits else {"fused": 1}), (what, splits, calls)
            assert {"zoo.pooled_agent_qkv_fwd.default", "zoo.pooled_agent_qkv_bwd.default"} <= ops, (what, sorted(ops))
            assert "aten.stack.default" not in ops and "aten.cat.default" not in ops, (what, sorted(ops))
            tol = 1e-5 if want.dtype == torch.float32 else 2e-3
            for i, (x, y) in enumerate(zip((got, *got_grads), (want, *want_grads))):
                assert x.dtype == y.dtype, (what, i)
                assert_close_to(x, y, tol, tol, f"{what} backward_splits={splits} [{i}]")
    qkv, ab, qb, weight, bias = (t.detach() for t in _packed_leaves(1, 2, (4, 4), (2, 2), 8, 1, True, torch.float32))
    agents = pool_agent_tokens(qkv[:, 1:, :16], (4, 4), (2, 2))
    fwd_args = (qkv, agents, ab, qb, weight, bias, 2, [4, 4], [2, 2], 1, 0.3)
    torch.library.opcheck(torch.ops.zoo.pooled_agent_qkv_fwd.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    launched, launch = [], ta._launch_forward
    ta._launch_forward = lambda *a, **kw: launched.append(kw.get("training")) or launch(*a, **kw)
    try:
        out, agent_v, lse = torch.ops.zoo.pooled_agent_qkv_fwd(*fwd_args)
    finally:
        ta._launch_forward = launch
    assert launched == [True], launched  # the op is always differentiated: the training forward's tiles
    torch.library.opcheck(torch.ops.zoo.pooled_agent_qkv_bwd.default,
                          (torch.randn_like(out), qkv, agents, agent_v, lse, ab, qb, weight, 2, [4, 4], [2, 2], 1,
                           0.3, True, True, True, True), test_utils=("test_schema", "test_faketensor"))


def _inductor_packed_checks() -> None:
    """Inductor-compiled training given qkv (its CPU code around the packed ops, which run the interpreted kernels):
    output and every gradient against the reference, through the single launch and the split path. Inductor checks
    each op output's sizes and strides against the op's fake, which must describe the buffers as the launches
    allocate them."""
    what, leaves, used, args, g, want, want_grads = next(_packed_reference_cases(CASES[1]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _packed_call(*a, *args, None), fullgraph=True)
    for splits in (None, 2):
        # no cached graphs: a cached graph keeps the metadata checks of the fake that was current when it compiled
        with ta.use_tiles(backward_splits=splits), _backward_launches() as calls, \
                torch._inductor.config.patch(force_disable_caches=True):
            got = compiled(*leaves)
            got_grads = torch.autograd.grad(got, used, g)
        assert calls == ({"split": 1} if splits else {"fused": 1}), (what, splits, calls)
        for i, (x, y) in enumerate(zip((got, *got_grads), (want, *want_grads))):
            assert_close_to(x, y, 1e-5, 1e-5, f"inductor {what} backward_splits={splits} [{i}]")


def _eager_packed_checks() -> None:
    """An eager training call given qkv is one autograd node on qkv itself (no views' nodes, no stack of q's, k's and
    v's gradients) with the reference's output and gradients (qkv's, both biases', the conv's); given a detached qkv
    (same memory, no gradient path) it differentiates q, k and v instead, so their gradients still arrive."""
    for what, leaves, used, args, g, want, want_grads in _packed_reference_cases(CASES[0]):
        got = _packed_call(*leaves, *args, "triton")
        node = got.grad_fn.next_functions[0][0]  # (square's input)
        assert type(node).__name__ == "_PooledQkvAttentionBackward", (what, node)
        assert node.next_functions[0][0].variable is leaves[0], what  # qkv's gradient straight to its leaf
        got_grads = torch.autograd.grad(got, used, g)
        tol = 1e-5 if want.dtype == torch.float32 else 2e-3
        for i, (x, y) in enumerate(zip((got, *got_grads), (want, *want_grads))):
            assert x.dtype == y.dtype, (what, i)
            assert_close_to(x, y, tol, tol, f"eager {what} [{i}]")
    qkv, ab, qb, weight, bias = _packed_leaves(2, 2, (4, 4), (2, 2), 8, 1, True, torch.float32)

    def attend(qkv_arg, backend):
        q, k, v = qkv.unflatten(-1, (3, 2, -1)).unbind(2)
        return pooled_agent_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid=(4, 4),
                                      agent_grid=(2, 2), prefix=1, scale=0.3, agent_bias=ab, query_bias=qb,
                                      conv_weight=weight, conv_bias=bias, backend=backend, qkv=qkv_arg)
    out, want = attend(qkv.detach(), "triton"), attend(None, "reference")
    assert type(out.grad_fn).__name__ == "_PooledAgentAttentionBackward", out.grad_fn
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    assert_close_to(torch.autograd.grad(out, qkv, g)[0], torch.autograd.grad(want, qkv, g)[0], 1e-5, 1e-5,
                    "detached qkv: q's, k's and v's gradients")


def test_triton_interpreter_against_the_reference_and_traced_training_writes_qkv_gradient_in_one_buffer():
    run_in_interpreter("test_pooled_agent", "_interpreter_checks", "_packed_checks", "_inductor_packed_checks",
                       "_eager_packed_checks")


def test_qkv_must_be_the_projection_q_k_v_view():
    """qkv is checked at the boundary: its shape, and in eager calls that q, k and v are its head-split views."""
    qkv, ab, qb, weight, bias = (t.detach() for t in _packed_leaves(1, 2, (4, 4), (2, 2), 8, 1, True, torch.float32))
    q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(-1, (3, 2, 8)).unbind(2))
    kwargs = dict(grid=(4, 4), agent_grid=(2, 2), prefix=1, agent_bias=ab, query_bias=qb, conv_weight=weight,
                  conv_bias=bias)
    want = pooled_agent_attention(q, k, v, **kwargs)
    assert torch.equal(pooled_agent_attention(q, k, v, **kwargs, qkv=qkv), want)  # changes no value
    with pytest.raises(ValueError, match=r"qkv must be the \(B, N, 3 \* heads \* d\) = \(1, 17, 48\) projection"):
        pooled_agent_attention(q, k, v, **kwargs, qkv=qkv[..., :47])
    with pytest.raises(ValueError, match=r"k is not the head-split view of qkv's channels \[16, 32\)"):
        pooled_agent_attention(q, k.clone(), v, **kwargs, qkv=qkv)
    with pytest.raises(ValueError, match=r"v is not the head-split view"):
        pooled_agent_attention(q, k, k, **kwargs, qkv=qkv)  # the same metadata as a good call: checked again
    empty = qkv[:0]  # an empty batch's views have no addresses to compare: its shape is all that is checked
    views = (t.transpose(1, 2) for t in empty.unflatten(-1, (3, 2, 8)).unbind(2))
    assert pooled_agent_attention(*views, **kwargs, qkv=empty).shape == (0, 2, 17, 8)
    # one token: chunk-and-reshape views carry their own stride on the length-one token axis, which addresses nothing
    one = torch.randn(2, 1, 48)
    views = [t.reshape(2, 1, 2, 8).transpose(1, 2) for t in one.chunk(3, dim=-1)]
    assert views[0].stride(2) != one.stride(1)
    kwargs.update(grid=(1, 1), agent_grid=(1, 1), prefix=0, agent_bias=None, query_bias=None)
    assert torch.equal(pooled_agent_attention(*views, **kwargs, qkv=one), pooled_agent_attention(*views, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# GPU

GPU_SHAPES = {  # (batch, heads, grid, agent grid, head dim, prefix)
    "deit_t": (16, 3, (14, 14), (7, 7), 64, 1),
    "deit_s": (16, 6, (14, 14), (7, 7), 64, 1),
    "swin_t_s0": (2, 3, (56, 56), (3, 3), 32, 0),    # global agent attention, 3x3 agents: unequal windows
    "swin_t_s1_window": (64, 6, (7, 7), (4, 4), 32, 0),
    "pvt_t_s0": (2, 1, (56, 56), (3, 3), 64, 0),     # Agent-PVT-T stage 0: one 64-wide head
    "pvt_t_s2": (16, 5, (14, 14), (7, 7), 64, 0),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backward_at_three_programs_an_sm_against_the_reference():
    """bf16 and fp16 training at Agent-DeiT-S's block with batch * heads at two and a half programs an SM, where the
    single-launch backward takes its register-capped tiles (``pooled_backward_tiles``): every gradient against
    autograd through the reference, within the agent kernels' 16-bit tolerance."""
    heads, grid, agent_grid, d, prefix = 6, (14, 14), (7, 7), 64, 1
    b = -(-5 * ta.sm_count(torch.empty(0, device="cuda")) // (2 * heads))
    for dtype in (torch.bfloat16, torch.float16):
        inputs = make_inputs(b, heads, grid, agent_grid, d, prefix=prefix, dtype=dtype, device="cuda")
        n = prefix + grid[0] * grid[1]
        plan = ta._plan(ta._Sizes(b, heads, n, n, agent_grid[0] * agent_grid[1], d, d), dtype, True,
                        ta.sm_count(inputs[0]), training=True, sm_shared=ta.sm_shared_bytes(inputs[0]))
        assert plan.options.get("maxnreg") == 168 and plan.constexprs["CONV_T"] == 8, plan
        with _backward_launches() as calls:
            got = outputs_and_grads(inputs, grid, agent_grid, prefix, "triton")
        assert calls == {"fused": 1}, calls
        want = outputs_and_grads(inputs, grid, agent_grid, prefix, "reference")
        for i, (x, y) in enumerate(zip(got, want)):
            assert_close_to(x, y, 3e-2, 1.5e-2, f"batch {b} {dtype} training [{i}]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_cuda_kernel_against_the_separate_kernels(shape):
    """bf16 autocast inference: the fused launch against the reference, whose agent attention and conv run the
    separate Triton kernels (the same roundings; the agents' window sums in another order)."""
    b, heads, grid, agent_grid, d, prefix = GPU_SHAPES[shape]
    inputs = make_inputs(b, heads, grid, agent_grid, d, prefix=prefix, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        q, k, v, ab, qb, weight, bias = inputs
        chosen = select_backend("pooled_agent_attention", None, q, k, v, weight, bias, grid=grid,
                                agent_grid=agent_grid, prefix=prefix, scale=0.3, agent_bias=ab, query_bias=qb,
                                dropout_p=0.0).name
        assert chosen == ("triton" if q.shape[2] <= ta._POOLED_MAX_TOKENS else "reference")
        got = call(inputs, grid, agent_grid, prefix, "triton")
        want = call(inputs, grid, agent_grid, prefix, "reference")
        fp32 = call([t.float() if t is not None else None for t in make_inputs(
            b, heads, grid, agent_grid, d, prefix=prefix, device="cuda")], grid, agent_grid, prefix, "triton")
        fp32_want = call([t.float() if t is not None else None for t in make_inputs(
            b, heads, grid, agent_grid, d, prefix=prefix, device="cuda")], grid, agent_grid, prefix, "reference")
    assert got.dtype == torch.bfloat16
    assert_close_to(got, want, 2e-2, 4e-3, f"{shape} bf16")
    assert_close_to(fp32, fp32_want, 2e-5, 2e-5, f"{shape} fp32")
    # training: every gradient (fp32 tight; bf16 as the agent kernels' own bf16 tests)
    for dtype, tol in ((torch.float32, (2e-5, 2e-5)), (torch.bfloat16, (3e-2, 1.5e-2))):
        inputs = make_inputs(b, heads, grid, agent_grid, d, prefix=prefix, dtype=dtype, device="cuda")
        got = outputs_and_grads(inputs, grid, agent_grid, prefix, "triton")
        want = outputs_and_grads(inputs, grid, agent_grid, prefix, "reference")
        for i, (x, y) in enumerate(zip(got, want)):
            assert_close_to(x, y, *tol, f"{shape} {dtype} training [{i}]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ["deit_t", "swin_t_s0", "pvt_t_s2"])
def test_cuda_compiled_training_writes_qkv_gradient_in_one_buffer(shape):
    """Inductor-compiled training given qkv (the packed op): output and every gradient against eager autograd
    through the reference, fp32 tight and bf16 within the agent kernels' bf16 tolerance."""
    b, heads, grid, agent_grid, d, prefix = GPU_SHAPES[shape]
    args = (heads, grid, agent_grid, prefix)
    for dtype, tol in ((torch.float32, (2e-5, 2e-5)), (torch.bfloat16, (3e-2, 1.5e-2))):
        leaves = [None if t is None else t.cuda().detach().requires_grad_()
                  for t in _packed_leaves(b, heads, grid, agent_grid, d, prefix, True, dtype)]
        used = [t for t in leaves if t is not None]
        want = _packed_call(*leaves, *args, "reference")
        g = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, used, g)
        torch._dynamo.reset()
        got = torch.compile(lambda *a: _packed_call(*a, *args, None), fullgraph=True)(*leaves)
        got_grads = torch.autograd.grad(got, used, g)
        for i, (x, y) in enumerate(zip((got, *got_grads), (want, *want_grads))):
            assert_close_to(x, y, *tol, f"{shape} {dtype} [{i}]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_swin_t", "agent_pvt_tiny"])
def test_cuda_models_fused_against_unfused(name, monkeypatch, no_tf32):
    import zoo

    model = zoo.create_model(name, drop_path_rate=0.0).cuda().eval()  # no random paths in the training step
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        fused = model(x).float()
        monkeypatch.setenv("ZOO_OPS_BACKEND", "pooled_agent_attention:reference")
        unfused = model(x).float()
    assert_close_to(fused, unfused, 3e-2, 1e-2, name)
    # training in float32, where both paths agree to float rounding (bf16 rounding differences grow through the
    # depth into gradients of random-init models that no tolerance separates from a wrong gradient)
    model.train()
    target = torch.randn(4, model.num_classes, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = []
    for backend in ("pooled_agent_attention:triton", "pooled_agent_attention:reference"):
        monkeypatch.setenv("ZOO_OPS_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        (model(x) * target).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key, want in grads[1].items():
        if not want.any():  # the last block's patch-query biases: only the class token reaches the head
            assert not grads[0][key].any(), f"{name} grad {key} should be zero"
            continue
        assert_close_to(grads[0][key], want, 1e-3, 1e-4, f"{name} grad {key}")
