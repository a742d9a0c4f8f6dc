"""downsampled_attention and cross_attention ``triton`` backends (attention over at most 256 keys): against the
reference backend in Triton's CPU interpreter (subprocess with TRITON_INTERPRET=1, fp32/fp16, tiny shapes, split
backward) and on the GPU (PVT and LookupViT shapes, fp32/fp16/bf16, determinism, torch.compile); refusals on plain
CPU."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import zoo.ops.triton.short_keys as tk  # registers the backend
from zoo.ops import cross_attention, downsampled_attention
from zoo.ops._dispatch import select_backend
from zoo.ops._qkv import split_qkv
from triton_checks import assert_close_to, assert_inductor_launches, run_compiled, run_in_interpreter


def make_inputs(b, heads, n, m, d, dv, *, dtype=torch.float32, device="cpu", seed=0):
    """q as a head-split view of a (B, N, heads, d) projection (the models' strides), k and v head-split views of one
    (B, M, 2, heads, d) projection; all require grad."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    kv = torch.randn(b, m, 2, heads, max(d, dv), generator=g).to(device=device, dtype=dtype)
    k, v = kv[:, :, 0, :, :d].transpose(1, 2), kv[:, :, 1, :, :dv].transpose(1, 2)
    return _leaves(q, k, v)


def _leaves(*views):
    """Leaf tensors with the views' strides (grad flows to them directly)."""
    out = []
    for t in views:
        leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        with torch.no_grad():
            leaf.copy_(t)
        out.append(leaf.requires_grad_())
    return out


def out_and_grads(tensors, backend, scale, grad_seed=7):
    """Output and gradients of sum(out * g) w.r.t. q, k, v."""
    q, k, v = tensors
    out = downsampled_attention(q, k, v, scale=scale, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, tensors, g))


def float64_out_and_grads(tensors, scale, grad_seed=7):
    """The reference backend on float64 copies (the oracle), same cotangent."""
    return out_and_grads([t.detach().double().requires_grad_() for t in tensors], "reference", scale, grad_seed)


NAMES = ("out", "dq", "dk", "dv")


def test_refusals_are_explained():
    q, k, v = make_inputs(1, 2, 8, 8, 16, 16)
    assert "float32/float16/bfloat16" in tk._supports(q.double(), k.double(), v.double(), scale=0.25)
    assert "dtypes" in tk._supports(q, k.half(), v, scale=0.25)
    assert "bias" in tk._supports(q, k, v, scale=0.25, bias=torch.zeros(1, 1, 8, 8))
    assert "dropout" in tk._supports(q, k, v, scale=0.25, dropout_p=0.1)
    many = torch.zeros(1, 2, tk.MAX_KEYS + 1, 16)
    assert "keys" in tk._supports(q, many, many, scale=0.25)
    wide = make_inputs(1, 1, 4, 4, 256, 16)
    assert "head dims" in tk._supports(*wide, scale=0.1)
    with pytest.raises(ValueError, match="bias=None and dropout_p=0"):
        tk.downsampled_attention_triton(q, k, v, scale=0.25, dropout_p=0.1)
    if not tk._kernels_interpreted():
        assert "TRITON_INTERPRET=1" in tk._supports(q, k, v, scale=0.25)
        with torch.no_grad():  # automatic choice falls back quietly
            assert select_backend("downsampled_attention", None, q, k, v, bias=None, scale=0.25,
                                  dropout_p=0.0).name != "triton"


def test_cross_attention_refusals_are_explained():
    q, k, v_q = make_inputs(1, 2, 8, 8, 16, 16)
    assert "no v_q" in tk._cross_supports(q, k, v_q, None)
    assert "v_k dtype" in tk._cross_supports(q, k, v_q.half(), v_q)
    many = torch.zeros(1, 2, tk.MAX_KEYS + 1, 16)
    assert "keys" in tk._cross_supports(many, k, None, many)  # M q tokens are the reverse direction's keys
    assert "0 keys" in tk._cross_supports(q[:, :, :0], k, None, v_q[:, :, :0])
    assert "bias" in tk._cross_supports(q, k, None, v_q, bias=torch.zeros(1, 1, 8, 8))


def test_tail_tiles_take_the_rows_after_the_last_whole_tile_where_a_smaller_tile_covers_them():
    assert [tk._tail_edge(n, 64) for n in (196, 197, 1, 70, 100, 49, 64, 3136, 128)] == [16, 16, 16, 16, 0, 0, 0, 0, 0]
    assert [tk._tail_edge(n, 32) for n in (40, 50, 33)] == [16, 0, 16]
    assert tk._tail_edge(20, 16) == 0  # a 16-row tile is the smallest a dot takes


def test_fused_backward_serves_16_bit_calls_whose_dq_fits_in_registers():
    def tiles(n, m, d, dtype=torch.bfloat16, **knobs):
        q, k = torch.empty(1, 1, n, d, dtype=dtype), torch.empty(1, 1, m, d, dtype=dtype)
        with tk.use_key_blocked_tiles(**knobs):
            return tk._fused_tiles(n, dtype, tk._key_blocked_constexprs(q, k, k))

    assert tiles(196, 196, 32) == 3  # VOLO-D1: 3 x 64 rows and a 16-row tail, 208 x 32 values of dQ
    assert tiles(1, 197, 32) == 0  # its class attention: the tail tile alone
    assert tiles(49, 49, 64) == 1 and tiles(128, 128, 64) == 2 and tiles(256, 256, 32) == 4
    assert tiles(196, 49, 64) is None  # PVT stage 2: 208 x 64 values spill (two kernels: 24.5 against 38.1 us)
    assert tiles(300, 256, 16) is None  # five whole tiles
    assert tiles(196, 196, 32, dtype=torch.float16) == 3
    assert tiles(196, 196, 32, dtype=torch.float32) is None  # float32 keeps two kernels (32-row tiles)
    assert tiles(40, 9, 16, dtype=torch.float32, fused=True) == 1  # forced: 32 + a 16-row tail
    assert tiles(196, 196, 32, fused=False) is None


def test_plans_split_the_queries_only_when_the_pairs_are_few():
    q, k, v = (torch.empty(128, 1, 3136, 64, dtype=torch.bfloat16), torch.empty(128, 1, 49, 64, dtype=torch.bfloat16),
               torch.empty(128, 1, 49, 64, dtype=torch.bfloat16))
    plan = tk._plan(q, k, v, True)  # PVT-S stage 0: 128 (batch, head) pairs -> 4 chunks of 13 64-row tiles
    assert plan.grid == (128, 4) and plan.chunk == 832 and plan.constexprs["BLOCK_M"] == 64
    many = torch.empty(64, 8, 196, 64, dtype=torch.bfloat16)
    assert tk._plan(many, k[:64].expand(64, 8, 49, 64), v[:64].expand(64, 8, 49, 64), True).grid == (512, 1)
    assert tk._plan(q.float(), k.float(), v.float(), False).constexprs["BLOCK_T"] == 16
    volo = torch.empty(64, 12, 196, 32, dtype=torch.bfloat16)  # above 128 keys the backward takes 16-row tiles
    backward = tk._plan(volo, volo, volo, True).constexprs
    assert (backward["BLOCK_T"], backward["BLOCK_M"]) == (16, 256)
    assert tk._plan(volo, volo, volo, False).constexprs["BLOCK_T"] == 64
    assert tk._plan(volo, volo, volo, False).constexprs["TAIL_T"] == 16  # 196 rows: 3 tiles of 64 and one of 16
    assert "TAIL_T" not in backward  # the one-pass backward's chunks stay whole tiles
    assert tk._plan(volo, volo[:, :, :128], volo[:, :, :128], True).constexprs["BLOCK_T"] == 64
    assert tk._plan(volo, volo, volo, False).options == {"num_warps": 4, "num_stages": 3}
    assert tk._plan(volo.float(), volo.float(), volo.float(), False).options["num_stages"] == 2
    cls = tk._plan(volo[:, :, :1], volo[:, :, :197], volo, False)  # class attention: one query over 197 keys
    assert cls.constexprs["BLOCK_T"] == 16 and cls.options == {"num_warps": 1, "num_stages": 3}
    fp32_cls = tk._plan(volo[:, :, :1].float(), volo[:, :, :197].float(), volo.float(), False)
    assert fp32_cls.options == {"num_warps": 4, "num_stages": 2}  # float32 dots over one warp spill
    assert tk._plan(volo[:, :, :1], volo, volo, True).options == {"num_warps": 4, "num_stages": 1}
    with tk.use_tiles(block_t=32, num_warps=2, num_stages=3):
        plan = tk._plan(q, k, v, False)
        assert plan.constexprs["BLOCK_T"] == 32 and plan.options == {"num_warps": 2, "num_stages": 3}
    with pytest.raises(ValueError, match="block_t must be a power of two >= 16"):
        tk.use_tiles(block_t=8)


# ----------------------------------------------------------------------------------------------------------------
# Triton interpreter (subprocess: TRITON_INTERPRET must be set before the kernels are built)

INTERPRETER_CASES = [
    # (B, heads, N, M, d, d_v)
    (2, 2, 40, 9, 16, 16),    # 3x3 reduced keys, padded key tile
    (1, 3, 70, 33, 16, 24),   # several query tiles, d_v != d
    (3, 1, 50, 49, 32, 32),   # one head: PVT's stage-0 case, split into chunks
    (1, 2, 17, 128, 16, 16),  # a full 128-key tile
    (1, 2, 20, 197, 16, 16),  # VOLO's class attention width: a 256-key tile
    (2, 2, 12, 9, 16, 16),    # one query tile: no split, the gradients written directly
]


def _interpreter_fp32_checks() -> None:
    """fp32: output and every gradient vs the reference backend (split into chunks of query rows, as the small
    batches here are); bitwise repeatable."""
    warnings.filterwarnings("error", message=".*falling back")  # a silent fallback would test reference vs itself
    for case in INTERPRETER_CASES:
        b, heads, n, m, d, dv = case
        tensors = make_inputs(b, heads, n, m, d, dv, seed=n)
        got = out_and_grads(tensors, "triton", d ** -0.5)
        want = out_and_grads(tensors, "reference", d ** -0.5)
        for name, x, y in zip(NAMES, got, want):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert_close_to(x, y, 1e-5, 1e-5, f"{name} {case}")
        again = out_and_grads(tensors, "triton", d ** -0.5)
        for name, x, y in zip(NAMES, got, again):
            assert torch.equal(x, y), f"{name} not bitwise repeatable {case}"
        with torch.no_grad():  # the inference launch (no autograd node)
            inference = downsampled_attention(*tensors, scale=d ** -0.5, backend="triton")
        assert torch.equal(inference, got[0]), f"inference output differs {case}"
    # token layout (B, N, heads * d) through the public function; 16-row tiles: 4 (batch, head) pairs x 5 chunks
    b, heads, n, m, d = 2, 2, 70, 20, 16
    q, k, v = (torch.randn(b, t, heads * d, requires_grad=True) for t in (n, m, m))
    g = torch.randn(b, n, heads * d)
    want = torch.autograd.grad(downsampled_attention(q, k, v, num_heads=heads, backend="reference"), (q, k, v), g)
    with tk.use_tiles(block_t=16, num_warps=2, num_stages=1):
        assert tk._plan(*(x.view(b, t, heads, d).transpose(1, 2) for x, t in ((q, n), (k, m), (v, m))),
                        True).grid == (4, 5)
        out = downsampled_attention(q, k, v, num_heads=heads, backend="triton")
        got = torch.autograd.grad(out, (q, k, v), g)
    assert out.shape == (b, n, heads * d)
    for name, x, y in zip(NAMES[1:], got, want):
        assert_close_to(x, y, 1e-5, 1e-5, f"{name} split")
    print("fp32 ok")


def _interpreter_key_blocked_checks() -> None:
    """The forward's row statistics (base-2 log-sum-exp) and the key-blocked backward (dQ per query tile, dK/dV per
    key block; and fused, one program per (batch, head)) against the float64 reference, fp32, at one- and
    several-block tilings; bitwise repeatable. Traced training on a qkv projection: the qkv ops, whose fused
    backward writes qkv's gradient as one buffer, bitwise equal to eager."""
    fused_calls = []
    launch_fused = tk._launch_fused
    tk._launch_fused = lambda *a, **kw: fused_calls.append(kw.get("separate_kv", True)) or launch_fused(*a, **kw)
    try:
        _key_blocked_cases(fused_calls)
        _traced_qkv_case(fused_calls)
    finally:
        tk._launch_fused = launch_fused


def _traced_qkv_case(fused_calls: list) -> None:
    """Traced training on a qkv projection through the fused backward: qkv's ops (one gradient buffer, the kernel
    told so), equal to eager; their schemas and fakes."""
    heads, n, d = 2, 50, 16
    qkv, _ = make_qkv(2, heads, n, d, seed=5)

    def loss(qkv):
        views = qkv.view(2, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        return downsampled_attention(*views, scale=0.25, qkv=qkv).square().sum()

    with tk.use_key_blocked_tiles(enabled=True, fused=True, block_t=32):
        fused_calls.clear()
        torch._dynamo.reset()
        traced = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(qkv), qkv)[0]
        assert fused_calls == [False], fused_calls  # the qkv op's backward: one buffer
        eager = torch.autograd.grad(loss(qkv), qkv)[0]
        assert fused_calls == [False, True], fused_calls  # eager: into the buffer's three views
        torch._dynamo.reset()
        assert torch.equal(traced, eager)
        want = torch.autograd.grad(downsampled_attention(*split_qkv(qkv, heads), scale=0.25, backend="reference")
                                   .square().sum(), qkv)[0]
        assert_close_to(traced, want, 1e-5, 1e-5, "traced qkv vs reference")

        def detached_qkv_loss(qkv):  # q, k and v carry the gradient, qkv= does not: the views' op, not qkv's
            views = qkv.view(2, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            return downsampled_attention(*views, scale=0.25, qkv=qkv.detach()).square().sum()

        fused_calls.clear()
        compiled = torch.compile(detached_qkv_loss, backend="aot_eager", fullgraph=True)
        assert torch.equal(torch.autograd.grad(compiled(qkv), qkv)[0], eager)
        assert fused_calls == [True], fused_calls  # the views' fused backward
        torch._dynamo.reset()
        x = qkv.detach()
        torch.library.opcheck(torch.ops.zoo.short_keys_attention_qkv_fwd.default, (x, heads, 0.25),
                              test_utils=("test_schema", "test_faketensor"))
        out, lse = tk._launch_forward(*split_qkv(x, heads), 0.25, stats=True)
        torch.library.opcheck(torch.ops.zoo.short_keys_attention_qkv_bwd.default, (out, x, out, lse, heads, 0.25),
                              test_utils=("test_schema", "test_faketensor"))


def _key_blocked_cases(fused_calls: list) -> None:
    for case in INTERPRETER_CASES:
        b, heads, n, m, d, dv = case
        tensors = make_inputs(b, heads, n, m, d, dv, seed=n)
        want = float64_out_and_grads(tensors, d ** -0.5)
        q, k, v = (t.detach() for t in tensors)
        out, lse = tk._launch_forward(q, k, v, d ** -0.5, stats=True)
        logits = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
        assert_close_to(lse, torch.logsumexp(logits, -1) / math.log(2), 1e-5, 1e-5, f"lse {case}")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        # (16, 32): key blocks end in a 16-key tail tile where 32 does not divide M (9, 33, 197); (32, 64): query
        # tiles do where 32 does not divide N (40, 70), and key blocks (9, 197). Fused: one program per (batch,
        # head) where the queries fit in four tiles and a tail (all but N = 70 in 16-row tiles)
        for (block_t, block_n), fused in itertools.product(((16, 32), (32, 64)), (False, True)):
            fused_calls.clear()
            with tk.use_key_blocked_tiles(block_t=block_t, block_n=block_n, fused=fused):
                got = (out, *tk._launch_backward_key_blocked(g, q, k, v, out, lse, d ** -0.5))
                again = tk._launch_backward_key_blocked(g, q, k, v, out, lse, d ** -0.5)
            assert len(fused_calls) == (2 if fused and (n, block_t) != (70, 16) else 0), (case, block_t, fused)
            for name, x, y in zip(NAMES, got, want):
                assert x.shape == y.shape, name
                assert_close_to(x, y, 1e-5, 1e-5, f"{name} {case} tiles {block_t}x{block_n} fused={fused}")
            assert all(torch.equal(x, y) for x, y in zip(got[1:], again)), f"not repeatable {case}"
        with tk.use_key_blocked_tiles(enabled=True):  # training through the public function: the autograd node
            trained = out_and_grads(tensors, "triton", d ** -0.5)
        for name, x, y in zip(NAMES, trained, want):
            assert_close_to(x, y, 1e-5, 1e-5, f"{name} {case} through autograd")
    kb_calls = []
    kb = tk._launch_backward_key_blocked
    tk._launch_backward_key_blocked = lambda *a, **kw: kb_calls.append(1) or kb(*a, **kw)
    try:
        for case in PACKED_CASES:  # on a qkv projection: qkv's gradient in one buffer, equal to the unpacked one's
            qkv, views = make_qkv(*case, seed=case[2])
            scale = case[3] ** -0.5
            with tk.use_key_blocked_tiles(enabled=True):
                packed = packed_out_and_grad(qkv, views, "triton", scale, packed=True)
                unpacked = packed_out_and_grad(qkv, views, "triton", scale, packed=False)
            assert len(kb_calls) == 2, "the key-blocked backward was not taken"
            kb_calls.clear()
            want = packed_out_and_grad(qkv, views, "reference", scale, packed=True)
            for name, x, y, z in zip(("out", "dqkv"), packed, unpacked, want):
                assert torch.equal(x, y), f"packed {name} {case}"
                assert_close_to(x, z, 1e-5, 1e-5, f"packed {name} vs reference {case}")
        # traced: the statistics op and its key-blocked backward op, equal to eager
        tensors = make_inputs(1, 2, 70, 49, 16, 16, seed=3)

        def loss(q, k, v):
            return downsampled_attention(q, k, v, scale=0.25, backend="triton").square().sum()

        with tk.use_key_blocked_tiles(enabled=True):
            eager = torch.autograd.grad(loss(*tensors), tensors)
            torch._dynamo.reset()
            traced = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*tensors), tensors)
        assert len(kb_calls) == 2 and all(torch.equal(x, y) for x, y in zip(traced, eager))
        torch._dynamo.reset()
        q, k, v = (t.detach() for t in tensors)
        torch.library.opcheck(torch.ops.zoo.short_keys_attention_fwd_stats.default, (q, k, v, 0.25),
                              test_utils=("test_schema", "test_faketensor"))
        out, lse = tk._launch_forward(q, k, v, 0.25, stats=True)
        torch.library.opcheck(torch.ops.zoo.short_keys_attention_bwd_kb.default, (out, q, k, v, out, lse, 0.25),
                              test_utils=("test_schema", "test_faketensor"))
    finally:
        tk._launch_backward_key_blocked = kb
    print("key-blocked ok")


def _cross_out_and_grads(tensors, backend, with_v_k, grad_seed=9):
    q, k, v_k, v_q = tensors
    out_q, out_k = cross_attention(q, k, v_k if with_v_k else None, v_q, backend=backend)
    outs = [o for o in (out_q, out_k) if o is not None]
    g = torch.Generator().manual_seed(grad_seed)
    cot = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    leaves = [t for t in tensors if t is not None and (with_v_k or t is not v_k)]
    return (*outs, *torch.autograd.grad(outs, leaves, cot))


def _cross_inputs(b, heads, m, n, d, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
            for t in (m, n, n, m)]  # q, k, v_k, v_q


def _interpreter_cross_checks() -> None:
    """cross_attention: both directions and the reverse alone vs the reference backend, fp32."""
    warnings.filterwarnings("error", message=".*falling back")
    for with_v_k in (True, False):
        tensors = _cross_inputs(2, 2, 9, 40, 16, seed=3)
        got = _cross_out_and_grads(tensors, "triton", with_v_k)
        want = _cross_out_and_grads(tensors, "reference", with_v_k)
        assert len(got) == len(want) == (6 if with_v_k else 4)
        for i, (x, y) in enumerate(zip(got, want)):
            assert_close_to(x, y, 1e-5, 1e-5, f"cross with_v_k={with_v_k} #{i}")
    print("cross ok")


def _interpreter_fp16_and_compile_checks() -> None:
    """fp16 vs a float64 oracle; custom-op registration (opcheck); a graph-break-free trace equal to eager."""
    warnings.filterwarnings("error", message=".*falling back")
    # the second case: a 256-key tile, which the 16-bit backward walks in 16-row query tiles (the forward in 64)
    for case in ((2, 2, 40, 9, 16, 16), (1, 2, 70, 197, 16, 16)):
        tensors = make_inputs(*case, dtype=torch.float16, seed=1)
        got = out_and_grads(tensors, "triton", 0.25)
        want = float64_out_and_grads(tensors, 0.25)
        for name, x, y in zip(NAMES, got, want):
            assert_close_to(x, y, 4e-3, 3e-3, f"fp16 {name} {case}")

    q, k, v = make_inputs(1, 2, 12, 10, 16, 16, seed=2)
    torch.library.opcheck(torch.ops.zoo.short_keys_attention_fwd.default, (q, k, v, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def loss(q, k, v):
        return downsampled_attention(q, k, v, scale=0.25).square().sum()

    assert select_backend("downsampled_attention", None, q, k, v, bias=None, scale=0.25,
                          dropout_p=0.0).name == "triton"
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for x, y in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)), torch.autograd.grad(loss(q, k, v), (q, k, v))):
        assert torch.equal(x, y)
    print("fp16 + compile ok")


def make_qkv(b, heads, n, d, *, dtype=torch.float32, device="cpu", seed=0):
    """A (B, N, 3 * heads * d) qkv projection (a leaf) and its head-split views q, k, v."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * heads * d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return qkv, qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def packed_out_and_grad(qkv, views, backend, scale, packed, grad_seed=7):
    """Output and qkv's gradient of sum(out * g), with the projection passed as ``qkv=`` or not."""
    out = downsampled_attention(*views, scale=scale, backend=backend, qkv=qkv if packed else None)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, qkv, g)[0]


PACKED_CASES = [
    # (B, heads, N, d)
    (2, 2, 40, 16),   # one query tile a program: the backward writes dq, dk and dv into qkv's gradient
    (1, 1, 70, 16),   # one (batch, head) pair: chunks of query rows, dk and dv summed from float32 partials
    (1, 2, 197, 16),  # a 256-key tile (VOLO's width)
]


def _interpreter_packed_checks() -> None:
    """Training on a qkv projection (``qkv=``): the output and qkv's gradient bitwise those of the unpacked kernels
    (the same arithmetic, written into one buffer) and within 1e-5 of the reference; fp16 likewise bitwise; the
    token layout; a graph-break-free trace (on the views) equal to eager."""
    warnings.filterwarnings("error", message=".*falling back")
    calls = []  # the packed backward's calls
    packed_backward = tk._packed_backward
    tk._packed_backward = lambda *args, **kw: calls.append(1) or packed_backward(*args, **kw)
    with tk.use_key_blocked_tiles(enabled=False):  # the one-pass backward (16-bit calls take the key-blocked one)
        for dtype in (torch.float32, torch.float16):
            for case in PACKED_CASES:
                qkv, views = make_qkv(*case, dtype=dtype, seed=case[2])
                scale = case[3] ** -0.5
                got = packed_out_and_grad(qkv, views, "triton", scale, packed=True)
                assert len(calls) == 1, "the packed path was not taken"
                unpacked = packed_out_and_grad(qkv, views, "triton", scale, packed=False)
                assert len(calls) == 1, "the packed path was taken without qkv"
                calls.clear()
                for name, x, y in zip(("out", "dqkv"), got, unpacked):
                    assert x.dtype == dtype and torch.equal(x, y), f"packed {name} {dtype} {case}"
                if dtype == torch.float32:
                    want = packed_out_and_grad(qkv, views, "reference", scale, packed=True)
                    for name, x, y in zip(("out", "dqkv"), got, want):
                        assert_close_to(x, y, 1e-5, 1e-5, f"packed {name} vs reference {case}")
    # the token layout: q, k and v as qkv's channel thirds (Agent-DeiT's plain blocks)
    b, heads, n, d = 2, 3, 33, 16
    qkv = torch.randn(b, n, 3 * heads * d, requires_grad=True)
    g = torch.randn(b, n, heads * d)
    grads = [torch.autograd.grad(downsampled_attention(*qkv.chunk(3, dim=-1), num_heads=heads, backend=backend,
                                                       qkv=qkv if packed else None), qkv, g)[0]
             for backend, packed in (("triton", True), ("triton", False), ("reference", True))]
    assert len(calls) == 1 and torch.equal(grads[0], grads[1])
    assert_close_to(grads[0], grads[2], 1e-5, 1e-5, "token layout")

    # traced given qkv=: the views' op (inductor fuses the stack of dq, dk and dv), at one query tile and at one
    # (batch, head) pair in five chunks (the partials' sums)
    for heads, n in ((2, 12), (1, 70)):
        qkv, _ = make_qkv(1, heads, n, 16, seed=n)

        def loss(qkv):
            views = qkv.view(1, n, 3, heads, 16).permute(2, 0, 3, 1, 4).unbind(0)
            return downsampled_attention(*views, scale=0.25, qkv=qkv).square().sum()

        calls.clear()
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        traced = torch.autograd.grad(compiled(qkv), qkv)[0]
        assert not calls, "a traced call took the packed backward"
        assert torch.equal(traced, torch.autograd.grad(loss(qkv), qkv)[0])
        assert len(calls) == 1, calls  # the eager node's
        torch._dynamo.reset()
    print("packed ok")


def test_triton_interpreter_fp32_fp16_cross_attention_custom_op_and_compile_trace():
    run_in_interpreter("test_short_keys_triton", "_interpreter_fp32_checks", "_interpreter_fp16_and_compile_checks",
                       "_interpreter_cross_checks", "_interpreter_packed_checks", "_interpreter_key_blocked_checks")


# ----------------------------------------------------------------------------------------------------------------
# GPU: the released models' shapes at 224, batch 8

SHAPES = {  # (heads, N, M, d)
    "pvt_s0": (1, 3136, 49, 64),     # PVT-S / Agent-PVT stage 0: 56x56 queries over 7x7 reduced keys (sr 8)
    "pvt_s1": (2, 784, 49, 64),      # stage 1 (sr 4)
    "pvt_s2": (5, 196, 49, 64),      # stage 2 (sr 2)
    "keys_128": (4, 300, 128, 32),   # a full 128-key tile
    "volo": (12, 196, 196, 32),      # VOLO-D1 self-attention (14x14 tokens), 16-row backward tiles
    "volo_cls": (12, 1, 197, 32),    # VOLO's class attention: one query over the class token and 196 tokens
    "keys_256": (4, 300, 256, 32),   # the widest key tile
}
GPU_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}


def _gpu_case(shape, dtype, seed=0, batch=8):
    heads, n, m, d = SHAPES[shape]
    return make_inputs(batch, heads, n, m, d, d, dtype=dtype, device="cuda", seed=seed), d ** -0.5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_triton_matches_float64(shape, dtype):
    tensors, scale = _gpu_case(shape, dtype)
    assert select_backend("downsampled_attention", None, *tensors, bias=None, scale=scale,
                          dropout_p=0.0).name == "triton"
    got = out_and_grads(tensors, "triton", scale)
    want = float64_out_and_grads(tensors, scale)
    max_abs, rel = GPU_TOL[dtype]
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == dtype, name
        assert_close_to(x, y, max_abs, rel, f"{shape} {dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["pvt_s0", "pvt_s2"])
def test_gpu_backward_is_bitwise_deterministic(shape):
    tensors, scale = _gpu_case(shape, torch.bfloat16, seed=2)
    first = out_and_grads(tensors, "triton", scale)
    for _ in range(3):
        for name, x, y in zip(NAMES, first, out_and_grads(tensors, "triton", scale)):
            assert torch.equal(x, y), f"{name} differs between runs"


@pytest.mark.gpu
def test_gpu_torch_compile_matches_eager():
    tensors, scale = _gpu_case("pvt_s1", torch.bfloat16, seed=3)
    torch.manual_seed(0)
    proj = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)

    def block(q, k, v):
        return proj(downsampled_attention(q, k, v, scale=scale, backend="triton")).float().square().mean()

    compiled = torch.compile(block, fullgraph=True)
    with tk.use_key_blocked_tiles(enabled=False):  # the one-pass backward (16-bit calls take the key-blocked one)
        got, code = run_compiled(lambda: torch.autograd.grad(compiled(*tensors), tensors))
    assert_inductor_launches(code, "_forward_kernel", "_backward_kernel")
    for x, y in zip(got, torch.autograd.grad(block(*tensors), tensors)):
        assert_close_to(x, y, 2e-2, 1e-2, "compiled vs eager")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [64, 2], ids=["batch64", "batch2_split"])
def test_gpu_packed_qkv_matches_the_unpacked_kernels_bitwise(batch, dtype):
    """VOLO-D1's self-attention on its qkv projection: the same bits as the unpacked kernels (at batch 2 the
    backward sums chunk partials), eager and inductor-compiled within rounding."""
    heads, n, _, d = SHAPES["volo"]
    qkv, views = make_qkv(batch, heads, n, d, dtype=dtype, device="cuda", seed=4)
    def loss(qkv):
        views = qkv.view(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        return downsampled_attention(*views, scale=d ** -0.5, qkv=qkv).float().square().mean()

    with tk.use_key_blocked_tiles(enabled=False):  # the one-pass backward (16-bit calls take the key-blocked one)
        got = packed_out_and_grad(qkv, views, "triton", d ** -0.5, packed=True)
        for name, x, y in zip(("out", "dqkv"), got,
                              packed_out_and_grad(qkv, views, "triton", d ** -0.5, packed=False)):
            assert torch.equal(x, y), name
        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True)
        grad, code = run_compiled(lambda: torch.autograd.grad(compiled(qkv), qkv)[0])
        assert_inductor_launches(code, "_forward_kernel", "_backward_kernel")
        assert_close_to(grad, torch.autograd.grad(loss(qkv), qkv)[0], *GPU_TOL[dtype], "compiled vs eager")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_cross_attention_matches_float64(dtype):
    """LookupViT-B's bidirectional cross-attention: 49 compressed tokens, 576 lookup tokens, 12 heads of 64."""
    tensors = _cross_inputs(4, 12, 49, 576, 64, dtype=dtype, device="cuda", seed=5)
    q, k, v_k, v_q = tensors
    assert select_backend("cross_attention", None, q, k, v_k, v_q, bias=None, scale=0.125,
                          dropout_p=0.0).name == "triton"
    got = _cross_out_and_grads(tensors, "triton", True)
    want = _cross_out_and_grads([t.detach().double().requires_grad_() for t in tensors], "reference", True)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == dtype
        assert_close_to(x, y, *GPU_TOL[dtype], f"cross {dtype} #{i}")


@pytest.mark.gpu
def test_gpu_torch_compile_follows_a_changing_batch():
    # the second batch size makes dynamo recompile with a symbolic batch: the plan's chunk count then depends on it
    torch._dynamo.reset()

    def attend(q, k, v, scale):
        return downsampled_attention(q, k, v, scale=scale, backend="triton")

    compiled = torch.compile(attend, fullgraph=True)
    for batch in (4, 6, 3):
        tensors, scale = _gpu_case("pvt_s1", torch.bfloat16, seed=batch, batch=batch)
        with torch.no_grad():
            assert_close_to(compiled(*tensors, scale), attend(*tensors, scale), 2e-2, 1e-2, f"batch {batch}")


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_key_blocked_backward_matches_float64(shape, dtype, fused):
    tensors, scale = _gpu_case(shape, dtype, seed=6)
    with tk.use_key_blocked_tiles(enabled=True, fused=fused):
        got = out_and_grads(tensors, "triton", scale)
        again = out_and_grads(tensors, "triton", scale)
    want = float64_out_and_grads(tensors, scale)
    for name, x, y, z in zip(NAMES, got, want, again):
        assert x.dtype == dtype and torch.equal(x, z), f"{shape} {dtype} {name} not repeatable"
        assert_close_to(x, y, *GPU_TOL[dtype], f"key-blocked {shape} {dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_kernels"])
def test_gpu_key_blocked_compiled_training_launches_its_kernels(fused, monkeypatch):
    """Fused (16-bit's default at VOLO's 196 tokens): qkv's ops, one gradient buffer; else the views' ops."""
    heads, n, _, d = SHAPES["volo"]
    qkv, _ = make_qkv(8, heads, n, d, dtype=torch.bfloat16, device="cuda", seed=8)

    def loss(qkv):
        views = qkv.view(8, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        return downsampled_attention(*views, scale=d ** -0.5, qkv=qkv).float().square().mean()

    qkv_calls = []
    launch_qkv = tk._launch_qkv_backward
    monkeypatch.setattr(tk, "_launch_qkv_backward", lambda *a: qkv_calls.append(1) or launch_qkv(*a))
    with tk.use_key_blocked_tiles(enabled=True, fused=fused):
        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True)
        grad, code = run_compiled(lambda: torch.autograd.grad(compiled(qkv), qkv)[0])
        eager = torch.autograd.grad(loss(qkv), qkv)[0]
    torch._dynamo.reset()
    backward = ("_fused_backward_kernel",) if fused else ("_kb_dq_kernel", "_kb_dkv_kernel")
    assert_inductor_launches(code, "_forward_kernel", *backward)
    assert bool(qkv_calls) == fused  # traced through qkv's ops (their backward writes one buffer)
    assert_close_to(grad, eager, *GPU_TOL[torch.bfloat16], "compiled vs eager")
