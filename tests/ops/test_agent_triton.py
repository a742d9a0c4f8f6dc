"""agent_attention ``triton`` backend: against the reference backend in Triton's CPU interpreter (subprocess with
TRITON_INTERPRET=1, fp32/fp16, tiny shapes) and on the GPU (Agent-DeiT/-PVT/-Swin shapes, fp32/fp16/bf16, bias
gradients, determinism, torch.compile); refusals on plain CPU."""
from __future__ import annotations

import warnings

import pytest
import torch

import zoo.ops.triton.agent as ta  # registers the backend
from zoo.ops import agent_attention
from zoo.ops._dispatch import select_backend
from triton_checks import assert_close_to, assert_inductor_launches, run_compiled, run_in_interpreter


def make_inputs(b, heads, n, m, a, d, dv, *, dtype=torch.float32, device="cpu", bias="shared", seed=0):
    """q as a head-split view of a (B, N, 3, heads, d) projection (the models' strides), k token-major, v and the
    agents contiguous; biases (1 or B, heads, A, M) and (1, heads, N, A) or None; all leaves require grad."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, heads, d, generator=g)
    q = qkv.to(device=device, dtype=dtype)[:, :, 0].transpose(1, 2)
    k = torch.randn(b, m, heads, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, heads, m, dv, generator=g).to(device=device, dtype=dtype)
    agent = torch.randn(b, heads, a, d, generator=g).to(device=device, dtype=dtype)
    biases = [None, None]
    if bias is not None:
        rows = b if bias == "per_item" else 1
        biases = [(torch.randn(rows, heads, a, m, generator=g) * 0.5).to(device),
                  (torch.randn(1, heads, n, a, generator=g) * 0.5).to(device)]
    tensors = [q, k, v, agent, *biases]
    for t in tensors:
        if t is not None:
            t.requires_grad_()
    return tensors


def out_and_grads(tensors, backend, scale, grad_seed=7):
    """Output and gradients of sum(out * g) w.r.t. every tensor that requires grad."""
    q, k, v, agent, ab, qb = tensors
    out = agent_attention(q, k, v, agent, scale=scale, agent_bias=ab, query_bias=qb, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    return (out, *torch.autograd.grad(out, leaves, g))


def float64_out_and_grads(tensors, scale, grad_seed=7):
    """The reference backend on float64 copies (the oracle), same cotangent."""
    copies = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    return out_and_grads(copies, "reference", scale, grad_seed)


NAMES = ("out", "dq", "dk", "dv", "d_agent", "d_agent_bias", "d_query_bias")

# ----------------------------------------------------------------------------------------------------------------
# plain CPU


def test_refusals_are_explained():
    q, k, v, agent, ab, qb = make_inputs(1, 2, 8, 8, 4, 16, 16)
    kw = dict(scale=0.25, agent_bias=ab, query_bias=qb)
    assert "float32/float16/bfloat16" in ta._supports(q.double(), k.double(), v.double(), agent.double(), **kw)
    assert "dropout" in ta._supports(q, k, v, agent, dropout_p=0.1, **kw)
    many = torch.zeros(1, 2, ta.MAX_AGENTS + 1, 16)
    assert "agents" in ta._supports(q, k, v, many, scale=0.25)
    wide = make_inputs(1, 1, 4, 4, 4, 256, 16)
    assert "head dims" in ta._supports(*wide[:4], scale=0.1)
    if not ta._kernels_interpreted():
        assert "TRITON_INTERPRET=1" in ta._supports(q, k, v, agent, **kw)
        with torch.no_grad():  # automatic choice falls back quietly
            assert select_backend("agent_attention", None, q, k, v, agent, **kw, dropout_p=0.0).name != "triton"


# ----------------------------------------------------------------------------------------------------------------
# Triton interpreter (subprocess: TRITON_INTERPRET must be set before the kernels are built)

INTERPRETER_CASES = [
    # (B, heads, N, M, A, d, d_v, bias)
    (2, 2, 20, 20, 9, 16, 16, "shared"),      # self-attention-like, 3x3 agents, batch-shared biases
    (1, 3, 70, 33, 16, 16, 24, "per_item"),   # N != M (PVT's reduced keys), two query tiles, d_v != d, per-item bias
    (2, 1, 65, 130, 5, 32, 16, None),         # no biases, three key tiles, padded agent tile
    (1, 2, 17, 17, 49, 16, 16, "shared"),     # 49 agents in a 64-row tile
]


def _interpreter_fp32_checks() -> None:
    """fp32: output and every gradient (biases included) vs the reference backend; bitwise repeatable."""
    warnings.filterwarnings("error", message=".*falling back")  # a silent fallback would test reference vs itself
    for case in INTERPRETER_CASES:
        b, heads, n, m, a, d, dv, bias = case
        tensors = make_inputs(b, heads, n, m, a, d, dv, bias=bias, seed=n)
        got = out_and_grads(tensors, "triton", d ** -0.5)
        want = out_and_grads(tensors, "reference", d ** -0.5)
        assert len(got) == (7 if bias else 5)
        for name, x, y in zip(NAMES, got, want):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert_close_to(x, y, 1e-5, 1e-5, f"{name} {case}")
        again = out_and_grads(tensors, "triton", d ** -0.5)
        for name, x, y in zip(NAMES, got, again):
            assert torch.equal(x, y), f"{name} not bitwise repeatable {case}"
        q, k, v, agent, ab, qb = tensors
        with torch.no_grad():  # the inference launch (no autograd node, no statistics stored)
            inference = agent_attention(q, k, v, agent, scale=d ** -0.5, agent_bias=ab, query_bias=qb,
                                        backend="triton")
        assert torch.equal(inference, got[0]), f"inference output differs {case}"
    # 16-token tiles: five query tiles and three key tiles through the launch knobs
    tensors = make_inputs(1, 3, 70, 33, 16, 16, 24, bias="per_item", seed=7)
    want = out_and_grads(tensors, "reference", 0.25)
    with ta.use_tiles(block_t=16, num_warps=2, num_stages=1):
        got = out_and_grads(tensors, "triton", 0.25)
    for name, x, y in zip(NAMES, got, want):
        assert_close_to(x, y, 1e-5, 1e-5, f"{name} block_t=16")
    # the forward's query tiles dealt to 2 and 3 programs a (batch, head) (5 tiles: uneven shares); the training
    # launch's statistics come from the first split only, so the gradients test them too
    for splits in (2, 3):
        with ta.use_tiles(block_t=16, num_warps=2, num_stages=1, query_splits=splits):
            split = out_and_grads(tensors, "triton", 0.25)
        for name, x, y in zip(NAMES, split, got):
            assert torch.equal(x, y), f"{name} query_splits={splits} differs from one program a (batch, head)"
    # the backward split over 2 and 3 programs a (batch, head): five query tiles and three key tiles dealt unevenly,
    # the d(agent) and d(agent_v) partials summed in split order; each bitwise repeatable
    for splits in (2, 3):
        with ta.use_tiles(block_t=16, num_warps=2, num_stages=1, backward_splits=splits):
            split, again = out_and_grads(tensors, "triton", 0.25), out_and_grads(tensors, "triton", 0.25)
        for name, x, y, z in zip(NAMES, split, want, again):
            assert_close_to(x, y, 1e-5, 1e-5, f"{name} backward_splits={splits}")
            assert torch.equal(x, z), f"{name} backward_splits={splits} not bitwise repeatable"
    print("fp32 ok")


def _interpreter_fp16_and_compile_checks() -> None:
    """fp16 vs a float64 oracle; custom-op registration (opcheck); a graph-break-free trace equal to eager."""
    warnings.filterwarnings("error", message=".*falling back")
    tensors = make_inputs(2, 2, 40, 40, 9, 16, 16, dtype=torch.float16, seed=1)
    got = out_and_grads(tensors, "triton", 0.25)
    want = float64_out_and_grads(tensors, 0.25)
    for name, x, y in zip(NAMES, got, want):
        assert_close_to(x, y, 4e-3, 3e-3, f"fp16 {name}")

    q, k, v, agent, ab, qb = make_inputs(1, 2, 12, 10, 4, 16, 16, seed=2)
    torch.library.opcheck(torch.ops.zoo.agent_attention_fwd.default, (q, k, v, agent, ab, qb, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def loss(q, k, v, agent, ab, qb):
        return agent_attention(q, k, v, agent, scale=0.25, agent_bias=ab, query_bias=qb).square().sum()

    assert select_backend("agent_attention", None, q, k, v, agent, scale=0.25, agent_bias=ab, query_bias=qb,
                          dropout_p=0.0).name == "triton"
    leaves = (q, k, v, agent, ab, qb)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for x, y in zip(torch.autograd.grad(compiled(*leaves), leaves), torch.autograd.grad(loss(*leaves), leaves)):
        assert torch.equal(x, y)
    # the launches take the training forward's tiles exactly where the graph (or eager autograd) differentiates
    launch, seen = ta._launch_forward, []
    ta._launch_forward = lambda *args, **kwargs: seen.append(kwargs.get("training", False)) or launch(*args, **kwargs)
    try:
        for grad_mode, want in ((True, {True}), (False, {False})):
            for fn in (torch.compile(loss, backend="aot_eager", fullgraph=True), loss):
                seen.clear()
                with torch.set_grad_enabled(grad_mode):
                    fn(*leaves)
                assert set(seen) == want, (grad_mode, fn, seen)
    finally:
        ta._launch_forward = launch
    print("fp16 + compile ok")


def test_triton_interpreter_fp32_fp16_determinism_custom_op_and_compile_trace():
    run_in_interpreter("test_agent_triton", "_interpreter_fp32_checks", "_interpreter_fp16_and_compile_checks")


# ----------------------------------------------------------------------------------------------------------------
# GPU: the released models' shapes at 224, batch 8

SHAPES = {  # (heads, N, M, A, d)
    "deit_s": (6, 197, 197, 49, 64),       # Agent-DeiT-S: class token + 14x14, 7x7 agents
    "pvt_t_s0": (1, 3136, 49, 49, 64),     # 56x56 queries over 7x7 reduced keys (Agent-PVT with agent_sr_ratios > 1)
    "pvt_t_s0_global": (1, 3136, 3136, 9, 64),  # Agent-PVT-T stage 0 as released: all 56x56 keys, 3x3 agents
    "swin_t_s0": (3, 3136, 3136, 9, 32),   # Agent-Swin-T stage 0: global agent attention over 56x56, 3x3 agents
    "swin_t_s1": (6, 784, 784, 16, 32),    # stage 1: 4x4 agents
}
GPU_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}


def _gpu_case(shape, dtype, seed=0, batch=8):
    heads, n, m, a, d = SHAPES[shape]
    return make_inputs(batch, heads, n, m, a, d, d, dtype=dtype, device="cuda", seed=seed), d ** -0.5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_triton_matches_float64(shape, dtype):
    tensors, scale = _gpu_case(shape, dtype)
    q, k, v, agent, ab, qb = tensors
    assert select_backend("agent_attention", None, q, k, v, agent, scale=scale, agent_bias=ab.detach(),
                          query_bias=qb.detach(), dropout_p=0.0).name == "triton"
    got = out_and_grads(tensors, "triton", scale)
    want = float64_out_and_grads(tensors, scale)
    max_abs, rel = GPU_TOL[dtype]
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == (dtype if name in NAMES[:5] else torch.float32), name
        assert_close_to(x, y, max_abs, rel, f"{shape} {dtype} {name}")


@pytest.mark.gpu
def test_gpu_autocast_float32_biases_and_layouts():
    tensors, scale = _gpu_case("deit_s", torch.float32, seed=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = [t.detach().bfloat16().requires_grad_() for t in tensors[:4]] + tensors[4:]
        got = out_and_grads(low, "triton", scale)
    want = float64_out_and_grads(low, scale)
    assert got[0].dtype == torch.bfloat16 and got[0].transpose(1, 2).is_contiguous()  # token-major memory
    assert got[5].dtype == got[6].dtype == torch.float32
    for name, x, y in zip(NAMES, got, want):
        assert_close_to(x, y, *GPU_TOL[torch.bfloat16], f"autocast {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["deit_s", "swin_t_s0"])
def test_gpu_backward_is_bitwise_deterministic(shape):
    tensors, scale = _gpu_case(shape, torch.bfloat16, seed=2)
    first = out_and_grads(tensors, "triton", scale)
    for _ in range(3):
        for name, x, y in zip(NAMES, first, out_and_grads(tensors, "triton", scale)):
            assert torch.equal(x, y), f"{name} differs between runs"


@pytest.mark.gpu
def test_gpu_torch_compile_matches_eager():
    tensors, scale = _gpu_case("deit_s", torch.bfloat16, seed=3)
    torch.manual_seed(0)
    proj = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)

    def block(q, k, v, agent, ab, qb):
        out = agent_attention(q, k, v, agent, scale=scale, agent_bias=ab, query_bias=qb, backend="triton")
        return proj(out).float().square().mean()

    compiled = torch.compile(block, fullgraph=True)
    got, code = run_compiled(lambda: torch.autograd.grad(compiled(*tensors), tensors))
    # DeiT-S's 6 heads at batch 8 leave fewer than two programs an SM: the backward splits, traced as in eager
    assert_inductor_launches(code, "_forward_kernel", "_backward_queries_kernel", "_backward_keys_kernel")
    for x, y in zip(got, torch.autograd.grad(block(*tensors), tensors)):
        assert_close_to(x, y, 2e-2, 1e-2, "compiled vs eager")



@pytest.mark.gpu
def test_gpu_torch_compile_follows_a_changing_batch():
    # the second batch size makes dynamo recompile with a symbolic batch: the triton_op bodies then trace on SymInts
    torch._dynamo.reset()

    def attend(q, k, v, agent, ab, qb, scale):
        return agent_attention(q, k, v, agent, scale=scale, agent_bias=ab, query_bias=qb, backend="triton")

    compiled = torch.compile(attend, fullgraph=True)
    for batch in (4, 6, 3):
        tensors, scale = _gpu_case("deit_s", torch.bfloat16, seed=batch, batch=batch)
        with torch.no_grad():
            assert_close_to(compiled(*tensors, scale), attend(*tensors, scale), 2e-2, 1e-2, f"batch {batch}")

def test_use_tiles_checks_and_restores_the_knobs():
    with pytest.raises(ValueError, match="block_t must be a power of two >= 16, got 24"):
        with ta.use_tiles(block_t=24):
            pass
    # launch options are checked at the call (shared by every backend's use_tiles), not at the first launch
    with pytest.raises(ValueError, match="num_warps must be a power of two from 1 to 32 or None, got 3"):
        ta.use_tiles(num_warps=3)
    with pytest.raises(ValueError, match="num_stages must be an int >= 1 or None, got 0"):
        ta.use_tiles(num_stages=0)
    with pytest.raises(ValueError, match="query_splits=0 must be an int >= 1 or None"):
        ta.use_tiles(query_splits=0)
    with pytest.raises(ValueError, match="backward_splits=0 must be an int >= 1 or None"):
        ta.use_tiles(backward_splits=0)
    with pytest.raises(ValueError, match="conv_tokens must be a power of two >= 1 or None, got 12"):
        ta.use_tiles(conv_tokens=12)
    with pytest.raises(ValueError, match="max_registers=0 must be an int >= 1 or None"):
        ta.use_tiles(max_registers=0)
    before = dict(ta._TILES)
    with ta.use_tiles(block_t=32, num_warps=2):
        assert ta._TILES == {**before, "block_t": 32, "num_warps": 2}
        plan = ta._plan(ta._Sizes(2, 3, 40, 40, 9, 16, 16), torch.float16, False, None)
        assert plan.constexprs["BLOCK_T"] == 32 and plan.options == {"num_warps": 2, "num_stages": 2}
    assert ta._TILES == before
    plan = ta._plan(ta._Sizes(2, 3, 40, 40, 9, 16, 16), torch.float16, True, None)
    assert plan.constexprs["BLOCK_T"] == 64 and plan.options == {"num_warps": 4, "num_stages": 3}
    plan = ta._plan(ta._Sizes(2, 3, 40, 40, 9, 16, 16), torch.float32, True, None)
    assert plan.constexprs["BLOCK_T"] == 16 and plan.options == {"num_warps": 8, "num_stages": 1}
    plan = ta._plan(ta._Sizes(2, 3, 40, 40, 100, 16, 16), torch.bfloat16, True, None)  # 128 agents: wider tiles
    assert plan.options == {"num_warps": 8, "num_stages": 2}
    # 16-bit defaults by agent count and head width (H200 sweep): (block_t, warps, stages) forward / backward
    tiles = lambda sizes, backward: (ta._plan(sizes, torch.bfloat16, backward, None).constexprs["BLOCK_T"],
                                     *ta._plan(sizes, torch.bfloat16, backward, None).options.values())
    deit_s, swin_s2, pvt_s0 = ta._Sizes(8, 6, 197, 197, 49, 64, 64), ta._Sizes(8, 12, 196, 196, 49, 32, 32), \
        ta._Sizes(8, 1, 3136, 3136, 9, 64, 64)
    assert (tiles(deit_s, False), tiles(deit_s, True)) == ((64, 4, 2), (32, 4, 3))
    assert (tiles(swin_s2, False), tiles(swin_s2, True)) == ((32, 4, 3), (64, 4, 1))
    assert (tiles(pvt_s0, False), tiles(pvt_s0, True)) == ((128, 4, 2), (64, 4, 3))
    # a training forward (one autograd will differentiate): its own tiles (batch 64 sweeps of Agent-PVT-T and -Swin-T)
    training = lambda sizes: (ta._plan(sizes, torch.bfloat16, False, None, training=True).constexprs["BLOCK_T"],
                              *ta._plan(sizes, torch.bfloat16, False, None, training=True).options.values())
    pvt_s2, swin_s0 = ta._Sizes(8, 5, 196, 196, 49, 64, 64), ta._Sizes(8, 3, 3136, 3136, 9, 32, 32)
    swin_s3 = ta._Sizes(8, 24, 49, 49, 49, 32, 32)
    assert (training(pvt_s0), training(pvt_s2)) == ((128, 4, 3), (64, 4, 1))
    assert (tiles(swin_s0, False), tiles(swin_s0, True), training(swin_s0)) == ((128, 4, 2), (64, 4, 3), (128, 4, 3))
    assert (training(swin_s2), training(swin_s3), tiles(swin_s3, False)) == ((32, 4, 3), (32, 4, 1), (32, 4, 3))
    # the pooled kernel's forward (inference and eager training): 16-token tiles where the others take 64 (49 agents,
    # heads of 64)
    pooled = lambda sizes: (lambda p: (p.constexprs["BLOCK_T"], *p.options.values()))(
        ta._plan(sizes, torch.bfloat16, False, None, pooled=True))
    assert (pooled(deit_s), pooled(pvt_s2)) == ((16, 4, 3), (16, 4, 3))
    assert (pooled(pvt_s0), pooled(swin_s2), pooled(swin_s3)) == ((128, 4, 2), (32, 4, 3), (32, 4, 3))


def test_default_query_splits_fill_the_sms():
    """Where batch * heads is below the SM count the forward deals each (batch, head)'s query tiles to about two
    programs per SM (Agent-PVT-T stage 0 at batch 128 on 132 SMs: 3), capped by the query tiles; otherwise one.
    The backward's splits, and the training forward's at Agent-PVT's shapes, follow their own rules."""
    splits = lambda sizes, sms: ta._plan(sizes, torch.bfloat16, False, sms).query_splits
    pvt_s0 = lambda b: ta._Sizes(b, 1, 3136, 3136, 9, 64, 64)   # 128-token tiles: 25 query tiles
    deit_s = lambda b: ta._Sizes(b, 6, 197, 197, 49, 64, 64)    # 64-token tiles: 4
    assert splits(pvt_s0(128), 132) == 3
    assert splits(pvt_s0(256), 132) == 1 and splits(deit_s(128), 132) == 1 and splits(deit_s(22), 132) == 1
    assert splits(pvt_s0(1), 132) == 25 and splits(deit_s(1), 132) == 4 and splits(deit_s(8), 132) == 4
    assert splits(pvt_s0(128), None) == 1  # off CUDA (the interpreter)
    # the backward aims at two programs an SM even above one wave
    backward = lambda sizes: ta._plan(sizes, torch.bfloat16, True, 132).query_splits
    assert backward(deit_s(128)) == 1 and backward(deit_s(8)) == 6  # 32-token tiles: 7
    # Agent-PVT's stages 0-1 split their backward only below half the SMs, then four programs an SM (64-token tiles)
    pvt_s1 = lambda b: ta._Sizes(b, 2, 784, 784, 16, 64, 64)
    assert backward(pvt_s0(64)) == 8 and backward(pvt_s0(128)) == 1 and backward(pvt_s1(64)) == 1
    assert backward(pvt_s0(1)) == 49 and backward(pvt_s1(16)) == 13
    # and their training forward takes about one program an SM: 2 at stage 0, batch 64 (128-token tiles)
    training = lambda sizes: ta._plan(sizes, torch.bfloat16, False, 132, training=True).query_splits
    assert training(pvt_s0(64)) == 2 and training(pvt_s1(64)) == 1 and training(pvt_s0(1)) == 25
    assert training(deit_s(8)) == splits(deit_s(8), 132) == 4  # other shapes: the inference rule
    assert backward(ta._Sizes(64, 3, 3136, 3136, 9, 32, 32)) == 2  # Agent-Swin-T stage 0 at batch 64
    assert ta._plan(pvt_s0(128), torch.bfloat16, True, None).query_splits == 1
    with ta.use_tiles(query_splits=2):
        assert splits(deit_s(128), 132) == 2
        assert ta._plan(deit_s(128), torch.bfloat16, True, 132).query_splits == 1  # the forward's knob only
    with ta.use_tiles(backward_splits=4):
        assert ta._plan(deit_s(128), torch.bfloat16, True, 132).query_splits == 4
