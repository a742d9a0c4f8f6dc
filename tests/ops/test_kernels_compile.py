"""Every Triton kernel compiles for the H200 (sm_90) without a GPU: triton's own ptxas, at released models' shapes,
with the argument types inductor's launcher gives a ``triton_op``'s kernels (Python floats as fp64).

The host-side launch code of each backend runs on CPU tensors with a recording launcher in place of the kernels, and
each recorded launch is compiled ahead of time. This catches on CPU what otherwise fails only on the GPU inside
``torch.compile``: a helper the kernel reaches through a closure, fp64 statistics from an fp64 scale, a constexpr
misuse, a tile that does not fit (in registers, or in the H200's 227 KiB of shared memory a block). The same recorded
launches also go through torch.compile's analysis of which tensors a kernel writes: an input it counts as written is
copied before every launch in a compiled graph (and once broke ms_deform's value gradient under compile). Whether
the kernels compute the right numbers is the other tests' job (the CPU interpreter and the GPU tests).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from zoo.ops.triton import interpreter_requested, triton_missing_reason
from triton_checks import LaunchRecorder, compile_for_gpu, written_by

pytestmark = [
    pytest.mark.skipif(triton_missing_reason() is not None, reason="needs triton"),
    pytest.mark.skipif(interpreter_requested(), reason="compiles the JIT kernels, not interpreted ones"),
]
LN = importlib.import_module("zoo.ops.layer_norm")  # the module (``zoo.ops.layer_norm`` is the function)
FM = importlib.import_module("zoo.ops.mlp")
DW = importlib.import_module("zoo.ops.depthwise_conv")

BF16, FP32 = torch.bfloat16, torch.float32
_H200_SHARED_BYTES = 227 * 1024
_H200_SM_SHARED_BYTES = 228 * 1024  # an SM's, of which each resident block also reserves 1 KiB


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _routing(launch: LaunchRecorder, monkeypatch, hw: int, channels: int, region: int, topk: int,
             dtype: torch.dtype) -> None:
    """BiFormer routing attention at one stage (batch 1): routing, forward, both backwards (dQ, dK/dV and the
    inverse routing lists; the masked dQ and dK/dV)."""
    from zoo.ops.triton import routing as rt

    monkeypatch.setattr(rt, "_kernels_interpreted", lambda: True)  # the one-kernel inverse lists, as on a GPU
    q, k, v = (_randn(1, hw, hw, channels, dtype=dtype) for _ in range(3))
    regions = (hw // region) ** 2
    index = torch.randint(0, regions, (1, regions, topk), generator=torch.Generator().manual_seed(1))
    heads, scale = channels // 32, channels ** -0.5
    monkeypatch.setattr(rt, "fp32_dot_precision", lambda t: "tf32x3")  # a GPU's (compute capability >= 8)
    for block_q in (16, 64):  # the small- and large-batch tiles of the top-k kernel
        monkeypatch.setattr(rt, "_route_block_q", lambda q, batch, block_r, n=block_q: min(n, block_r))
        rt._launch_route(q, k, region, region, topk, launch)
    rt._launch_forward(q, k, v, index, heads, region, region, scale, launch, stats=False)  # inference
    with rt.use_tiles(query_regions=4):  # forward programs that take four query regions in turn
        rt._launch_forward(q, k, v, index, heads, region, region, scale, launch)
    if region * region <= 32:  # tiles that heads share (2: the default at 4-token regions), with region groups
        for packed, group in ((2, 1), (2, 7), (4, 7)):
            with rt.use_tiles(heads_per_tile=packed, query_regions=group):
                rt._launch_forward(q, k, v, index, heads, region, region, scale, launch, stats=group == 7)
    out, lse = rt._launch_forward(q, k, v, index, heads, region, region, scale, launch)
    for backward in ("routed", "masked"):
        with rt.use_tiles(backward=backward):
            rt._launch_backward(out, q, k, v, out, lse, index, heads, region, region, scale, launch)


def _agent(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype) -> None:
    """Agent-DeiT-S attention (197 tokens, 6 heads of 64, 49 agents) with both biases and their gradients, summed
    over a batch of two as the eager node's backward sums them."""
    from zoo.ops.triton import agent as ta

    heads, n, a, d = 6, 197, 49, 64
    q, k, v = (_randn(2, heads, n, d, dtype=dtype) for _ in range(3))
    agent = _randn(2, heads, a, d, dtype=dtype)
    agent_bias, query_bias = _randn(1, heads, a, n, dtype=dtype), _randn(1, heads, n, a, dtype=dtype)
    ta._launch_forward(q, k, v, agent, agent_bias, query_bias, d ** -0.5, launch, stats=False)  # inference
    out, agent_v, lse = ta._launch_forward(q, k, v, agent, agent_bias, query_bias, d ** -0.5, launch)
    *_, dab, dqb = ta._launch_backward(out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse, d ** -0.5, True,
                                       True, launch)
    ta._summed_bias_grad(dab, agent_bias, True, n, launch)
    ta._summed_bias_grad(dqb, query_bias, True, a, launch)


def _agent_split_backward(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype) -> None:
    """Agent-PVT stage-0-like attention (one head of 64, 9 agents) whose backward is split over two programs a
    (batch, head): the queries' and the keys' kernels, with the agent-bias gradient."""
    from zoo.ops.triton import agent as ta

    heads, n, a, d = 1, 300, 9, 64
    q, k, v = (_randn(2, heads, n, d, dtype=dtype) for _ in range(3))
    agent = _randn(2, heads, a, d, dtype=dtype)
    agent_bias, query_bias = _randn(1, heads, a, n, dtype=dtype), _randn(1, heads, n, a, dtype=dtype)
    with ta.use_tiles(backward_splits=2):
        out, agent_v, lse = ta._launch_forward(q, k, v, agent, agent_bias, query_bias, d ** -0.5, launch)
        ta._launch_backward(out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse, d ** -0.5, True, True,
                            launch)


def _agent_pooling_grad(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype) -> None:
    """Agent-Swin-T stage-0-like (56x56 queries, 3 heads of 32, 3x3 overlapping windows): the forward, then the
    pooling's gradient added into dq, a third of a qkv gradient (the packed op's backward)."""
    from zoo.ops.triton import agent as ta

    heads, hw, g, d = 3, 56, 3, 32
    q, k, v = (_randn(2, heads, hw * hw, d, dtype=dtype) for _ in range(3))
    agent = _randn(2, heads, g * g, d, dtype=dtype)
    ta._launch_forward(q, k, v, agent, None, None, d ** -0.5, launch, stats=False)
    dq_rows = _randn(2, hw * hw, 3 * heads * d, dtype=dtype)[..., :heads * d]
    ta._add_pooling_grad(dq_rows, _randn(2, g * g, heads, d, dtype=dtype).transpose(1, 2), (hw, hw), (g, g), launch)


def _short_keys(launch: LaunchRecorder, monkeypatch, batch: int, dtype: torch.dtype) -> None:
    """PVT-S stage 0: 3136 queries over 49 reduced keys, one head of 64."""
    from zoo.ops.triton import short_keys as tk
    q = _randn(batch, 3136, 1, 64, dtype=dtype).transpose(1, 2)
    k, v = (_randn(batch, 1, 49, 64, dtype=dtype) for _ in range(2))
    out = tk._launch_forward(q, k, v, 0.125, launch)
    tk._launch_backward(out, q, k, v, 0.125, launch)


def _short_keys_packed(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype) -> None:
    """VOLO-D1's self-attention on its qkv projection (196 tokens, 12 heads of 32): the 256-key tile, the 16-bit
    backward's 16-row tiles and gradients written into the thirds of one buffer."""
    from zoo.ops._qkv import split_qkv
    from zoo.ops.triton import short_keys as tk
    qkv = _randn(64, 196, 3 * 12 * 32, dtype=dtype)
    out = tk._launch_forward(*split_qkv(qkv, 12), 32 ** -0.5, launch)
    tk._packed_backward(out, qkv, 12, 32 ** -0.5, launch)


def _short_keys_key_blocked(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype, fused: bool | None = None,
                            tokens: int = 196) -> None:
    """VOLO-D1's self-attention (196 tokens, 12 heads of 32): the forward with row statistics and the key-blocked
    backward (16-bit: the fused kernel, one program per (batch, head); float32 or ``fused=False``: dQ per query tile,
    dK/dV per key block; float32 fused where its 32-row tiles are at most four)."""
    from zoo.ops.triton import short_keys as tk
    q, k, v = (_randn(64, tokens, 12, 32, dtype=dtype).transpose(1, 2) for _ in range(3))
    out, lse = tk._launch_forward(q, k, v, 32 ** -0.5, launch, stats=True)
    with tk.use_key_blocked_tiles(fused=fused):
        tk._launch_backward_key_blocked(out, q, k, v, out, lse, 32 ** -0.5, launch)


def _window(launch: LaunchRecorder, monkeypatch, hw: tuple[int, int], window: tuple[int, int],
            shift: tuple[int, int], with_bias: bool, dtype: torch.dtype) -> None:
    """(Shifted) window attention, 4 heads of 32: a Swin stage (7x7 windows, shift, mask + position bias) or a CSWin
    stripe stage (no bias)."""
    from zoo.ops.triton import window as tw

    heads, d = 4, 32
    q, k, v = (_randn(1, *hw, heads, d, dtype=dtype) for _ in range(3))
    windows, tokens = (hw[0] // window[0]) * (hw[1] // window[1]), window[0] * window[1]
    bias = _randn(windows, heads, tokens, tokens, dtype=FP32) if with_bias else None
    out = tw._launch_forward(q, k, v, bias, window, shift, d ** -0.5, launch)
    tw._launch_backward(out, q, k, v, bias, window, shift, d ** -0.5, with_bias, launch)


def _outlook(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype) -> None:
    """VOLO-D1 stage-1 outlook attention: 28x28, 192 channels, 6 heads, kernel 3, stride 2, padding 1."""
    from zoo.ops import outlook as ol

    heads, kernel, stride, padding = 6, 3, 2, 1
    v = _randn(1, 28, 28, 192, dtype=dtype)
    attn = _randn(1, 14, 14, heads * kernel ** 4, dtype=dtype)
    ol._launch_forward(v, attn, heads, kernel, stride, padding, 32 ** -0.5, launch, stats=False)  # inference
    out, lse = ol._launch_forward(v, attn, heads, kernel, stride, padding, 32 ** -0.5, launch)
    ol._launch_backward(out, v, attn, lse, heads, kernel, stride, padding, 32 ** -0.5, launch)


def _layer_norm(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype) -> None:
    """LayerNorm over BiFormer-T's stage-1 map (3136 tokens of 64) with float32 parameters, autocast-style output."""
    x = _randn(1, 3136, 64, dtype=dtype)
    weight, bias = _randn(64, dtype=FP32), _randn(64, dtype=FP32)
    LN._launch_forward(x, weight, bias, 1e-6, dtype, launch, stats=False)  # inference
    y, mean, rstd = LN._launch_forward(x, weight, bias, 1e-6, dtype, launch)
    LN._launch_backward(y, x, weight, mean, rstd, True, True, True, launch)


def _mlp(launch: LaunchRecorder, monkeypatch, c_in: int, hidden: int, c_out: int, dtype: torch.dtype) -> None:
    """The fused MLP over 3136 tokens, weights already in the compute dtype (as the backend passes them)."""
    x = _randn(1, 3136, c_in, dtype=dtype)
    w1, b1 = _randn(hidden, c_in, dtype=dtype), _randn(hidden, dtype=dtype)
    w2, b2 = _randn(c_out, hidden, dtype=dtype), _randn(c_out, dtype=dtype)
    FM._launch(x, w1, b1, w2, b2, dtype, launch)


def _depthwise_conv(launch: LaunchRecorder, monkeypatch, c: int, k: int, hw: int, dtype: torch.dtype) -> None:
    """The values' depthwise conv plus residual, x a slice of a projection; and without bias and residual."""
    x = _randn(2, hw, hw, 2 * c, dtype=dtype)[..., c:]
    weight, bias, residual = _randn(c, 1, k, k, dtype=dtype), _randn(c, dtype=dtype), _randn(2, hw, hw, c, dtype=dtype)
    DW._launch(x, weight, bias, residual, dtype, dtype, launch)
    DW._launch(x, weight, None, None, dtype, dtype, launch)


def _depthwise_conv_backward(launch: LaunchRecorder, monkeypatch, c: int, k: int, hw: int,
                             dtype: torch.dtype) -> None:
    """The conv's backward, x a slice of a projection: for a 3x3 conv the one-pass kernel with the input's gradient
    added into a slice (an Agent node's dv), written fresh (the traced op's) and not asked for, each followed by the
    weight's and bias's sum; for other sizes the tiled weight gradients (their input gradient is the forward
    kernel's, flipped)."""
    x = _randn(2, hw, hw, 2 * c, dtype=dtype)[..., c:]
    grad, into = _randn(2, hw, hw, c, dtype=dtype), _randn(2, hw, hw, 2 * c, dtype=dtype)[..., c:]
    weight = DW._conv_weights(_randn(c, 1, k, k, dtype=dtype), None, dtype)[0]
    ways = ((weight, into), (weight, None), (None, None)) if k == 3 else ((None, None),)
    for w, dest in ways:
        DW.conv_backward(grad, x, w, k, (dtype, dtype), into=dest, launch=launch)


def _pooled_agent(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype, heads: int = 3, batch: int = 2,
                  sms: int | None = None, sm_shared: int | None = None) -> None:
    """Agent-DeiT's pooled agent attention (a class token and 14x14 grid tokens, heads of 64, 7x7 agents, both
    biases, the value conv with its bias) on a qkv projection's views: the inference and training forwards, then
    the one-launch backward with every gradient and the conv weight's and bias's sum, planned for ``sms`` SMs of
    ``sm_shared`` bytes of shared memory."""
    from zoo.ops.triton import agent as ta

    grid, agent_grid, d = (14, 14), (7, 7), 64
    n, a = 1 + grid[0] * grid[1], agent_grid[0] * agent_grid[1]
    q, k, v = (t.transpose(1, 2) for t in _randn(batch, n, 3 * heads * d, dtype=dtype).view(batch, n, 3, heads, d)
               .unbind(2))
    agent_bias, query_bias = _randn(1, heads, a, n, dtype=dtype), _randn(1, heads, n, a, dtype=dtype)
    weight, bias = ta._conv_in(_randn(heads * d, 1, 3, 3, dtype=dtype), _randn(heads * d, dtype=dtype), dtype)
    layout = (grid, agent_grid, 1, d ** -0.5)
    ta._launch_pooled(q, k, v, weight, bias, agent_bias, query_bias, *layout, launch)
    out, agents, agent_v, lse = ta._launch_pooled(q, k, v, weight, bias, agent_bias, query_bias, *layout, launch,
                                                  stats=True)
    plan = ta._plan(ta._Sizes.of(q, v, agents), dtype, True, sms, training=True, sm_shared=sm_shared)
    ta._launch_pooled_backward(plan, out, q, k, v, weight, agents, agent_bias, query_bias, agent_v, lse, *layout,
                               (True, True), (dtype, dtype), launch=launch)


def _agent_bias(launch: LaunchRecorder, monkeypatch, heads: int, num: int, keys: tuple[int, int],
                queries: tuple[int, int], cls: bool) -> None:
    """The Agent biases' maps of one block (7x7 maps resized to the key and query grids) and every parameter's
    gradient from the maps' (float32, a strided key gradient as a sum to a broadcast shape can leave)."""
    from zoo.ops import agent_bias as ab

    shapes = ab._param_shapes(heads, num, (7, 7), keys, queries)
    params = [_randn(*shape, dtype=FP32) if cls or i < 6 else None for i, shape in enumerate(shapes)]
    key, query = ab._maps_forward(*params, keys, queries, launch)
    dkey = _randn(2, *key.shape[1:], dtype=FP32)[1:]
    ab._maps_backward(dkey, query, (7, 7), keys, queries, int(cls), launch)


def _ms_deform(launch: LaunchRecorder, monkeypatch, dtype: torch.dtype) -> None:
    """Multi-scale deformable attention, Focus-DETR's layout at a small image: 4 levels, 8 heads of 32, 4 points;
    100 queries (a decoder's sparse value-gradient gather) and every token a query (the encoder's dense one)."""
    from zoo.ops.triton import ms_deform as md

    shapes = torch.tensor([[32, 40], [16, 20], [8, 10], [4, 5]])
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    tokens, heads, channels, levels, points = int((shapes[:, 0] * shapes[:, 1]).sum()), 8, 32, 4, 4
    value = _randn(1, tokens, heads, channels, dtype=dtype)
    for queries in (100, tokens):
        loc = torch.rand(1, queries, heads, levels, points, 2, generator=torch.Generator().manual_seed(2)).to(dtype)
        attn = torch.rand(1, queries, heads, levels, points, generator=torch.Generator().manual_seed(3)).to(dtype)
        out = md.msda_forward(value, shapes, starts, loc, attn, launch)
        md.msda_backward(out, value, shapes, starts, loc, attn, True, launch)


def _neighborhood(launch: LaunchRecorder, monkeypatch, spatial: tuple[int, ...], kernel: int, dilation: int,
                  causal: bool, dtype: torch.dtype) -> None:
    """Neighbourhood attention, 2 heads of 32, on a map (NAT / DiNAT) or a sequence: inference and training
    forward, dQ, dK/dV."""
    from zoo.ops.triton import neighborhood as tn

    q, k, v = (_randn(1, 2, *spatial, 32, dtype=dtype) for _ in range(3))
    args = ((kernel,) * len(spatial), (dilation,) * len(spatial), (causal,) * len(spatial), 32 ** -0.5)
    tn._launch_forward(q, k, v, *args, launch)
    out, lse = tn._launch_forward(q, k, v, *args, launch, stats=True)
    tn._launch_backward(out, q, k, v, out, lse, *args, launch)


CASES = {
    "routing.biformer_t.s0.bf16": (_routing, dict(hw=56, channels=64, region=8, topk=1, dtype=BF16)),
    "routing.biformer_t.s2.bf16": (_routing, dict(hw=14, channels=256, region=2, topk=16, dtype=BF16)),
    "routing.biformer_t.s1.fp32": (_routing, dict(hw=28, channels=128, region=4, topk=4, dtype=FP32)),
    "agent.deit_s.bf16": (_agent, dict(dtype=BF16)),
    "agent.deit_s.fp32": (_agent, dict(dtype=FP32)),
    "agent.split_backward.bf16": (_agent_split_backward, dict(dtype=BF16)),
    "agent.pooling_grad.bf16": (_agent_pooling_grad, dict(dtype=BF16)),
    "pooled_agent.deit_t.bf16": (_pooled_agent, dict(dtype=BF16)),
    # Agent-DeiT-S at batch 64 on an H200 (132 SMs): the backward's register-capped tiles, three programs an SM
    "pooled_agent.deit_s_b64.bf16": (_pooled_agent, dict(dtype=BF16, heads=6, batch=64, sms=132,
                                                         sm_shared=228 * 1024)),
    "agent_bias.deit_t": (_agent_bias, dict(heads=3, num=49, keys=(14, 14), queries=(14, 14), cls=True)),
    "agent_bias.pvt_t_s0": (_agent_bias, dict(heads=1, num=49, keys=(7, 7), queries=(56, 56), cls=False)),
    "short_keys.pvt_s0.bf16": (_short_keys, dict(batch=128, dtype=BF16)),
    "short_keys.pvt_s0.fp32": (_short_keys, dict(batch=8, dtype=FP32)),
    "short_keys.volo_qkv.bf16": (_short_keys_packed, dict(dtype=BF16)),
    "short_keys.volo_key_blocked.bf16": (_short_keys_key_blocked, dict(dtype=BF16)),
    "short_keys.volo_two_kernel.bf16": (_short_keys_key_blocked, dict(dtype=BF16, fused=False)),
    "short_keys.volo_key_blocked.fp32": (_short_keys_key_blocked, dict(dtype=FP32)),
    "short_keys.fused_100_tokens.fp32": (_short_keys_key_blocked, dict(dtype=FP32, fused=True, tokens=100)),
    "window.swin.bf16": (_window, dict(hw=(14, 14), window=(7, 7), shift=(3, 3), with_bias=True, dtype=BF16)),
    # 144-token windows with a bias: the per-item kernels with HAS_BIAS (query blocks of 32 rows)
    "window.window12.bf16": (_window, dict(hw=(24, 24), window=(12, 12), shift=(6, 6), with_bias=True, dtype=BF16)),
    "window.cswin_columns.fp32": (_window, dict(hw=(28, 28), window=(28, 2), shift=(0, 0), with_bias=False,
                                                dtype=FP32)),
    "outlook.volo_d1.bf16": (_outlook, dict(dtype=BF16)),  # 30 s to compile its three kernels: one dtype only
    "layer_norm.bf16": (_layer_norm, dict(dtype=BF16)),
    "mlp.pvt_t_s0.bf16": (_mlp, dict(c_in=64, hidden=512, c_out=64, dtype=BF16)),
    "mlp.c256.bf16": (_mlp, dict(c_in=256, hidden=70, c_out=100, dtype=BF16)),
    "mlp.c96.fp32": (_mlp, dict(c_in=96, hidden=384, c_out=96, dtype=FP32)),
    "mlp.c192.fp32": (_mlp, dict(c_in=192, hidden=576, c_out=150, dtype=FP32)),
    "depthwise_conv.swin_t_s0.bf16": (_depthwise_conv, dict(c=96, k=3, hw=7, dtype=BF16)),
    "depthwise_conv.biformer_lepe.fp32": (_depthwise_conv, dict(c=64, k=5, hw=14, dtype=FP32)),
    "depthwise_conv_backward.swin_t_s0.bf16": (_depthwise_conv_backward, dict(c=96, k=3, hw=56, dtype=BF16)),
    "depthwise_conv_backward.biformer_lepe.fp32": (_depthwise_conv_backward, dict(c=64, k=5, hw=14, dtype=FP32)),
    "ms_deform.bf16": (_ms_deform, dict(dtype=BF16)),
    "ms_deform.fp32": (_ms_deform, dict(dtype=FP32)),
    "neighborhood.nat_t.bf16": (_neighborhood, dict(spatial=(56, 56), kernel=7, dilation=1, causal=False, dtype=BF16)),
    "neighborhood.causal_1d.fp32": (_neighborhood, dict(spatial=(200,), kernel=13, dilation=2, causal=True,
                                                        dtype=FP32)),
}
EXPECTED_KERNELS = {"routing": 8, "agent": 2, "pooled_agent": 3, "agent_bias": 2, "short_keys": 2, "window": 2,
                    "outlook": 3,
                    "layer_norm": 3, "mlp": 1, "depthwise_conv": 1, "depthwise_conv_backward": 2, "ms_deform": 3,
                    "neighborhood": 3}
# kernels beyond the family's usual: regions of at most half a tile (32 tokens) launch the packed forward too; the
# split agent backward is three kernels in place of one; the eager node's bias gradients are summed over the batch
# by one more; the unfused key-blocked short-key backward is two
EXTRA_KERNELS = {"routing.biformer_t.s2.bf16": 1, "routing.biformer_t.s1.fp32": 1, "agent.split_backward.bf16": 2,
                 "agent.deit_s.bf16": 1, "agent.deit_s.fp32": 1, "short_keys.volo_two_kernel.bf16": 1,
                 "short_keys.volo_key_blocked.fp32": 1}


@pytest.mark.parametrize("case", list(CASES))
def test_every_launched_kernel_compiles_for_sm90(case, monkeypatch):
    build, kwargs = CASES[case]
    recorder = LaunchRecorder()
    build(recorder, monkeypatch, **kwargs)
    names = [kernel.fn.__name__ for kernel, _, _ in recorder.launches]
    expected = EXPECTED_KERNELS[case.split(".")[0]] + EXTRA_KERNELS.get(case, 0)
    assert len(set(names)) == expected, f"{case}: launched {names}"
    for kernel, args, kw in recorder.launches:
        compiled = compile_for_gpu(kernel, args, kw)
        assert compiled.metadata.num_warps == kw.get("num_warps", 4)
        assert ".target sm_90" in compiled.asm["ptx"], f"{case}: {kernel.fn.__name__} not built for sm_90"
        # ptxas builds a kernel whose tiles need more than the H200's 227 KiB of shared memory a block; its launch
        # then fails (OutOfResources), only on the GPU
        shared = compiled.metadata.shared
        assert shared <= _H200_SHARED_BYTES, f"{case}: {kernel.fn.__name__} needs {shared} bytes of shared memory"
        if "maxnreg" in kw:  # a register cap is for more programs an SM: their shared memory must fit too
            programs = 65536 // (kw["maxnreg"] * 32 * kw["num_warps"])
            assert programs * (shared + 1024) <= _H200_SM_SHARED_BYTES, (case, kernel.fn.__name__, programs, shared)
            if kernel.fn.__name__ == "_pooled_backward_kernel":  # what its tile rule asks of an SM
                from zoo.ops.triton import agent as ta

                assert programs * (shared + 1024) <= ta._THREE_CAPPED_BYTES, (case, programs, shared)


# What each kernel stores to: the pointers always written, and those written only when a condition on the launch's
# constexpr flags holds (a flag's name, ``!`` before it for the flag off, or a tuple of such that must all hold).
# torch.compile finds a triton_op kernel's writes by analysing its TTIR and copies every input it counts
# as written before each launch (a helper call counts all its arguments as written when its results reach a store
# address), so an input counted as written is a wasted copy and, under in-place buffer reuse, a risk.
WRITES = {
    "routing": {"_forward_kernel": ({"out_ptr"}, {"STATS": {"lse_ptr"}}),
                "_packed_forward_kernel": ({"out_ptr"}, {"STATS": {"lse_ptr"}}),
                "_dq_kernel": ({"dq_ptr", "delta_ptr"}, {}),
                "_dkv_kernel": ({"dk_ptr", "dv_ptr"}, {}),
                "_inverse_routing_kernel": ({"offsets_ptr", "sources_ptr"}, {}),
                "_masked_dq_kernel": ({"dq_ptr", "delta_ptr"}, {}),
                "_masked_dkv_kernel": ({"dk_ptr", "dv_ptr"}, {}),
                "_region_sums_kernel": ({"sums_ptr"}, {}),
                "_route_topk_kernel": ({"idx_ptr"}, {})},
    "agent": {"_forward_kernel": ({"out_ptr"}, {"STATS": {"av_ptr", "lse_ptr"}}),
              "_backward_kernel": ({"dq_ptr", "dk_ptr", "dv_ptr", "da_ptr"},
                                   {"AB_GRAD": {"dab_ptr"}, "QB_GRAD": {"dqb_ptr"}}),
              "_backward_queries_kernel": ({"dq_ptr", "pa_ptr", "pv_ptr"}, {"QB_GRAD": {"dqb_ptr"}}),
              "_backward_keys_kernel": ({"dk_ptr", "dv_ptr", "pk_ptr"}, {"AB_GRAD": {"dab_ptr"}}),
              "pooling_grad_kernel": ({"dq_ptr"}, {}), "_agent_grad_sum_kernel": ({"da_ptr"}, {}),
              "bias_grad_sum_kernel": ({"dst_ptr"}, {})},
    "pooled_agent": {"_pooled_forward_kernel": ({"out_ptr"}, {"STATS": {"ag_ptr", "av_ptr", "lse_ptr"}}),
                     "_pooled_backward_kernel": ({"dq_ptr", "dk_ptr", "dv_ptr"},
                                                 {"AB_GRAD": {"dab_ptr"}, "QB_GRAD": {"dqb_ptr"},
                                                  "WEIGHT_GRAD": {"part_ptr"}}),
                     "weight_grad_sum_kernel": ({"dw_ptr", "db_ptr"}, {})},
    "agent_bias": {"bias_maps_kernel": ({"key_ptr", "query_ptr"}, {}),
                   "bias_maps_backward_kernel": ({"dan_ptr", "dah_ptr", "daw_ptr", "dna_ptr", "dha_ptr", "dwa_ptr"},
                                                 {"CLS": {"dac_ptr", "dca_ptr"}})},
    "short_keys": {"_forward_kernel": ({"out_ptr"}, {"STATS": {"lse_ptr"}}),
                   "_backward_kernel": ({"dq_ptr", "dk_ptr", "dv_ptr"}, {}),
                   "_kb_dq_kernel": ({"dq_ptr", "delta_ptr"}, {}), "_kb_dkv_kernel": ({"dk_ptr", "dv_ptr"}, {}),
                   "_fused_backward_kernel": ({"delta_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}, {})},
    "window": {"_forward_kernel": ({"out_ptr"}, {}),
               "_backward_kernel": ({"dq_ptr", "dk_ptr", "dv_ptr"}, {"BIAS_GRAD": {"dbias_ptr"}}),
               "_forward_items_kernel": ({"out_ptr"}, {}),
               "_backward_items_kernel": ({"dq_ptr", "dk_ptr", "dv_ptr"}, {"BIAS_GRAD": {"dbias_ptr"}})},
    "outlook": {"forward_kernel": ({"out_ptr"}, {"STATS": {"lse_ptr"}}), "grad_v_kernel": ({"dv_ptr"}, {}),
                "grad_attn_kernel": ({"da_ptr"}, {})},
    "layer_norm": {"forward_kernel": ({"y_ptr"}, {"STATS": {"mean_ptr", "rstd_ptr"}}),
                   "backward_kernel": ({"dx_ptr", "dw_ptr", "db_ptr"}, {}),
                   "sum_parts_kernel": ({"out_ptr"}, {})},
    "mlp": {"forward_kernel": ({"y_ptr"}, {})},
    "depthwise_conv": {"forward_kernel": ({"y_ptr"}, {})},
    "depthwise_conv_backward": {"backward3_kernel": ({"part_ptr"},
                                                     {"INTO": {"r_ptr"}, ("INPUT_GRAD", "!INTO"): {"dx_ptr"}}),
                                "weight_grad_kernel": ({"part_ptr"}, {}),
                                "weight_grad_sum_kernel": ({"dw_ptr", "db_ptr"}, {})},
    "ms_deform": {"_forward_kernel": ({"out_ptr"}, {}),
                  "_sample_grad_kernel": ({"gloc_ptr", "gattn_ptr"}, {"WRITE_CELLS": {"cell_ptr", "record_ptr"}}),
                  "_value_grad_kernel": ({"gvalue_ptr"}, {})},
    "neighborhood": {"_forward_kernel": ({"out_ptr"}, {"STATS": {"lse_ptr"}}),
                     "_dq_kernel": ({"dq_ptr", "delta_ptr"}, {}),
                     "_dkv_kernel": ({"dk_ptr", "dv_ptr"}, {})},
}


def _holds(condition: str | tuple[str, ...], bound: dict) -> bool:
    """Whether a WRITES condition holds for a launch's bound arguments."""
    terms = condition if isinstance(condition, tuple) else (condition,)
    return all(not bound[t[1:]] if t.startswith("!") else bound[t] for t in terms)


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"),
                    reason="torch < 2.6: the kernels stay inside opaque custom ops, whose writes inductor never reads")
@pytest.mark.parametrize("case", list(CASES))
def test_torch_compile_sees_only_the_outputs_written(case, monkeypatch):
    build, kwargs = CASES[case]
    recorder = LaunchRecorder()
    build(recorder, monkeypatch, **kwargs)
    family = WRITES[case.split(".")[0]]
    for kernel, args, kw in recorder.launches:
        name = kernel.fn.__name__
        always, flagged = family[name]
        bound = {**dict(zip(kernel.arg_names, args)), **kw}
        expected = always.union(*(written for condition, written in flagged.items() if _holds(condition, bound)))
        got = written_by(kernel, args, kw)
        assert got == expected, f"{case}: {name} counted as writing {sorted(got)}, expected {sorted(expected)}"
