"""``zoo bench ops`` / ``python -m zoo.ops.bench``: time every op on every available backend at released shapes.

For each case of :data:`CASES` (an op at the shape one released model runs it at) and each backend of that op that
is available here, it measures the forward (under ``no_grad``) and the forward + backward, and reports the median
time, the achieved TFLOP/s (model FLOPs: the attention products only; forward + backward counts 3x the forward)
and GB/s (minimal traffic: every input and output tensor once; forward + backward counts 3x), the speed-up over the
op's ``reference`` backend, and the peak memory above the inputs. ``time_ms`` is a synchronised step, host included;
on CUDA ``device_ms`` is the step's summed kernel time (``torch.profiler``): where ``time_ms`` is well above it the op
is bound by host (launch) time, not by the GPU. ``dense_sdpa`` rows are "one dense SDPA over all
tokens" baselines; their ratio is against the reference of the case they accompany.

``sdpa_plain`` rows (case name ``<case>.sdpa``) are the cost targets of agent, window, downsampled and cross attention:
one plain ``F.scaled_dot_product_attention`` call (no mask, no bias) with the op's batch, heads, head dim and query /
key token counts (agent: N queries over the same N keys; window: every window as its own batch entry,
``(B * windows, heads, w*w, w*w)``; downsampled: ``tokens`` queries over ``kv_tokens`` keys; cross: the pair of calls
m->n and n->m, timed together as one row). Every row of such a case, the baseline included, gets
``x_sdpa`` = its time / the baseline's time in the same mode (fwd, fwd+bwd): the target is ``x_sdpa <= 1.2``; on
CUDA ``x_sdpa_dev`` is the same ratio of kernel times (``device_ms``), which host time does not blur. The
neighbourhood cases' target is the dense SDPA with the neighbourhood as a boolean mask (``<case>.masked`` rows,
``dense_sdpa`` cases marked ``target``): there the same columns read ``x_sdpa <= 1/3``.

``floor_ms`` is the roofline floor of a row: its FLOPs at the device's peak throughput or its minimal bytes at peak
memory bandwidth, whichever takes longer (``bound`` says which), from datasheet peaks for known GPUs (H200, H100
SXM/PCIe; see :data:`GPU_PEAKS`) or ``--peak-tflops`` / ``--peak-gbps``. ``x_floor`` is the row's kernel time
(``device_ms``, else ``time_ms``) over that floor: how far the op is from what the hardware allows for its work and
traffic.

``--compile`` times every call compiled by ``torch.compile`` (inductor, one compile per row): what each backend
costs inside a model's traced graph, where the ops' kernels run as ``torch.library`` ops, their backward formulas
compile with the graph, and the ``reference`` backend's tensor ops are fused by inductor. A row whose call breaks the
graph is skipped and says where.

Ops are found by name in :mod:`zoo.ops` and backends through the dispatch registry; an op that does not exist, a
backend that is unavailable or falls back for this input, and a call that fails are reported as rows with a
status instead of stopping the run. CUDA timing uses CUDA events; ``--device cpu`` uses wall time (use ``--quick``
there: the released shapes are GPU-sized).

Examples::

    python -m zoo.ops.bench --dtype bfloat16 --out bench_out
    zoo bench ops --ops neighborhood_attention,masked_attention --batch 32
    zoo bench ops --ops depthwise_conv --mode fwd+bwd --batch 64 --compile
    python -m zoo.ops.bench --device cpu --quick --iters 2
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["CASES", "Case", "select_cases", "run", "format_table", "write_results", "main", "device_ms"]


# --- the cases: one released-model shape per row --------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """An op at one shape. ``params`` feed the op's builder; ``quick`` overrides them for ``--quick`` runs."""
    name: str
    op: str
    model: str
    batch: int
    params: dict[str, Any]
    quick: dict[str, Any] = field(default_factory=dict)
    baseline_for: str | None = None  # dense_sdpa / sdpa_plain rows: the case they accompany
    target: bool = False  # a dense_sdpa baseline that is its case's cost target (x_sdpa's denominator), as every
    # sdpa_plain baseline is


_IMG_QUICK = {"batch": 1}
CASES: list[Case] = [
    # BiFormer-T at 224: maps 56/28/14, 7x7 regions, top-k 1/4/16, head dim 32, scale = C ** -0.5
    Case("biformer_t.s0", "routing_attention", "BiFormer-T stage 0", 128,
         dict(hw=56, channels=64, heads=2, regions=7, topk=1), dict(hw=14, regions=7, topk=1, batch=1)),
    Case("biformer_t.s1", "routing_attention", "BiFormer-T stage 1", 128,
         dict(hw=28, channels=128, heads=4, regions=7, topk=4), dict(hw=14, channels=32, heads=1, batch=1)),
    Case("biformer_t.s2", "routing_attention", "BiFormer-T stage 2", 128,
         dict(hw=14, channels=256, heads=8, regions=7, topk=16), dict(channels=32, heads=1, batch=1)),
    Case("biformer_t.s0.dense", "dense_sdpa", "BiFormer-T stage 0, dense over all tokens", 128,
         dict(tokens=56 * 56, heads=2, dim=32), dict(tokens=196, batch=1), baseline_for="biformer_t.s0"),
    Case("biformer_t.s1.dense", "dense_sdpa", "BiFormer-T stage 1, dense over all tokens", 128,
         dict(tokens=28 * 28, heads=4, dim=32), dict(tokens=196, heads=1, batch=1), baseline_for="biformer_t.s1"),
    Case("biformer_t.s2.dense", "dense_sdpa", "BiFormer-T stage 2, dense over all tokens", 128,
         dict(tokens=14 * 14, heads=8, dim=32), dict(heads=1, batch=1), baseline_for="biformer_t.s2"),
    # BiFormer-B at 224: widths 96/192/384 (head dim 32: 3/6/12 heads), same maps, regions and top-k as -T
    Case("biformer_b.s0", "routing_attention", "BiFormer-B stage 0", 128,
         dict(hw=56, channels=96, heads=3, regions=7, topk=1), dict(hw=14, channels=32, heads=1, topk=1, batch=1)),
    Case("biformer_b.s1", "routing_attention", "BiFormer-B stage 1", 128,
         dict(hw=28, channels=192, heads=6, regions=7, topk=4), dict(hw=14, channels=32, heads=1, batch=1)),
    Case("biformer_b.s2", "routing_attention", "BiFormer-B stage 2", 128,
         dict(hw=14, channels=384, heads=12, regions=7, topk=16), dict(channels=32, heads=1, batch=1)),
    Case("biformer_b.s0.dense", "dense_sdpa", "BiFormer-B stage 0, dense over all tokens", 128,
         dict(tokens=56 * 56, heads=3, dim=32), dict(tokens=196, heads=1, batch=1), baseline_for="biformer_b.s0"),
    Case("biformer_b.s1.dense", "dense_sdpa", "BiFormer-B stage 1, dense over all tokens", 128,
         dict(tokens=28 * 28, heads=6, dim=32), dict(tokens=196, heads=1, batch=1), baseline_for="biformer_b.s1"),
    Case("biformer_b.s2.dense", "dense_sdpa", "BiFormer-B stage 2, dense over all tokens", 128,
         dict(tokens=14 * 14, heads=12, dim=32), dict(heads=1, batch=1), baseline_for="biformer_b.s2"),
    # VOLO-D1 stage 1: 28x28, C 192, 6 heads, kernel 3, stride 2, padding 1
    Case("volo_d1.s1", "outlook_attention", "VOLO-D1 outlooker", 128,
         dict(hw=28, channels=192, heads=6, kernel=3, stride=2), dict(hw=8, channels=12, heads=2, batch=1)),
    # Agent attention: DeiT-S (197 tokens, 6 heads x 64, 49 agents); Swin-T 'A' stages (global, 9/16 agents); each
    # with its cost target "<case>.sdpa": one plain SDPA over the same token counts (window: the 2x2 windows batched)
    Case("agent_deit_s", "agent_attention", "Agent-DeiT-S block", 128,
         dict(tokens=197, heads=6, dim=64, agents=49), dict(tokens=50, heads=2, dim=16, agents=9, batch=1)),
    Case("agent_deit_s.sdpa", "sdpa_plain", "Agent-DeiT-S, plain SDPA over the same 197 tokens", 128,
         dict(tokens=197, heads=6, dim=64), dict(tokens=50, heads=2, dim=16, batch=1), baseline_for="agent_deit_s"),
    Case("agent_swin_t.s0", "agent_attention", "Agent-Swin-T stage 0", 128,
         dict(tokens=56 * 56, heads=3, dim=32, agents=9), dict(tokens=196, heads=1, dim=16, agents=9, batch=1)),
    Case("agent_swin_t.s0.sdpa", "sdpa_plain", "Agent-Swin-T stage 0, plain SDPA over the same tokens", 128,
         dict(tokens=56 * 56, heads=3, dim=32), dict(tokens=196, heads=1, dim=16, batch=1),
         baseline_for="agent_swin_t.s0"),
    Case("agent_swin_t.s1", "agent_attention", "Agent-Swin-T stage 1", 128,
         dict(tokens=28 * 28, heads=6, dim=32, agents=16), dict(tokens=64, heads=1, dim=16, agents=16, batch=1)),
    Case("agent_swin_t.s1.sdpa", "sdpa_plain", "Agent-Swin-T stage 1, plain SDPA over the same tokens", 128,
         dict(tokens=28 * 28, heads=6, dim=32), dict(tokens=64, heads=1, dim=16, batch=1),
         baseline_for="agent_swin_t.s1"),
    Case("agent_swin_t.s2", "agent_attention", "Agent-Swin-T stage 2", 128,
         dict(tokens=14 * 14, heads=12, dim=32, agents=49), dict(tokens=49, heads=1, dim=16, agents=9, batch=1)),
    Case("agent_swin_t.s2.sdpa", "sdpa_plain", "Agent-Swin-T stage 2, plain SDPA over the same tokens", 128,
         dict(tokens=14 * 14, heads=12, dim=32), dict(tokens=49, heads=1, dim=16, batch=1),
         baseline_for="agent_swin_t.s2"),
    # Agent-PVT-T stage 0: one head, so only batch-many (batch, head) programs in the fused kernel
    Case("agent_pvt_t.s0", "agent_attention", "Agent-PVT-T stage 0", 128,
         dict(tokens=56 * 56, heads=1, dim=64, agents=9), dict(tokens=196, heads=1, dim=16, agents=9, batch=1)),
    Case("agent_pvt_t.s0.sdpa", "sdpa_plain", "Agent-PVT-T stage 0, plain SDPA over the same tokens", 128,
         dict(tokens=56 * 56, heads=1, dim=64), dict(tokens=196, heads=1, dim=16, batch=1),
         baseline_for="agent_pvt_t.s0"),
    # window attention: Agent-Swin-S/B stage 2 ('B' blocks: Swin window 7 on the 14x14 map)
    Case("agent_swin_s.s2", "window_attention", "Agent-Swin-S stage 2 ('B': Swin window 7)", 128,
         dict(hw=14, heads=12, dim=32, window=7), dict(heads=1, dim=16, batch=1)),
    Case("agent_swin_s.s2.sdpa", "sdpa_plain", "Agent-Swin-S stage 2, plain SDPA over the windows batched", 128,
         dict(tokens=7 * 7, heads=12, dim=32, windows=(14 // 7) ** 2), dict(heads=1, dim=16, batch=1),
         baseline_for="agent_swin_s.s2"),
    # Focus-DETR R50, 4-level encoder at 800x1333 (22,223 tokens), 8 heads x 32, 4 points; and 900 decoder queries
    Case("focus_detr.enc", "ms_deform_attn", "Focus-DETR R50 encoder (800x1333)", 2,
         dict(levels=((100, 167), (50, 84), (25, 42), (13, 21)), queries=None, heads=8, dim=32, points=4),
         dict(levels=((8, 10), (4, 5)), heads=2, dim=8, points=2, batch=1)),
    Case("focus_detr.dec", "ms_deform_attn", "Focus-DETR R50 decoder, 900 queries", 2,
         dict(levels=((100, 167), (50, 84), (25, 42), (13, 21)), queries=900, heads=8, dim=32, points=4),
         dict(levels=((8, 10), (4, 5)), queries=20, heads=2, dim=8, points=2, batch=1)),
    # PVT-S / Agent-PVT-S stage 0 spatial reduction: 56x56 queries, sr 8 -> 7x7 keys, 1 head x 64
    Case("pvt_s.s0", "downsampled_attention", "PVT-S stage 0 (sr 8)", 128,
         dict(tokens=56 * 56, kv_tokens=49, heads=1, dim=64), dict(tokens=196, kv_tokens=16, dim=16, batch=1)),
    Case("pvt_s.s0.sdpa", "sdpa_plain", "PVT-S stage 0, plain SDPA 3136 queries over 49 keys", 128,
         dict(tokens=56 * 56, kv_tokens=49, heads=1, dim=64), dict(tokens=196, kv_tokens=16, dim=16, batch=1),
         baseline_for="pvt_s.s0"),
    Case("pvt_s.s2", "downsampled_attention", "PVT-S stage 2 (sr 2)", 128,
         dict(tokens=14 * 14, kv_tokens=49, heads=5, dim=64), dict(tokens=64, kv_tokens=16, dim=16, batch=1)),
    Case("pvt_s.s2.sdpa", "sdpa_plain", "PVT-S stage 2, plain SDPA 196 queries over 49 keys", 128,
         dict(tokens=14 * 14, kv_tokens=49, heads=5, dim=64), dict(tokens=64, kv_tokens=16, dim=16, batch=1),
         baseline_for="pvt_s.s2"),
    # VOLO-D1 at 224: self-attention over its 14x14 tokens (12 heads x 32, head_dim ** -0.5) in 14 of its blocks
    Case("volo_d1.attn", "downsampled_attention", "VOLO-D1 self-attention (196 tokens)", 128,
         dict(tokens=14 * 14, kv_tokens=14 * 14, heads=12, dim=32), dict(tokens=40, kv_tokens=40, dim=16, batch=1)),
    Case("volo_d1.attn.sdpa", "sdpa_plain", "VOLO-D1, plain SDPA over the same 196 tokens", 128,
         dict(tokens=14 * 14, heads=12, dim=32), dict(tokens=40, dim=16, batch=1), baseline_for="volo_d1.attn"),
    # LookupViT-B/16 at 384 (assumed: 24x24 lookup tokens, 7x7 compressed, 12 heads x 64; the paper's table is unknown)
    Case("lookupvit_b.mhbc", "cross_attention", "LookupViT-B MHBC (assumed 576 lookup / 49 compressed)", 128,
         dict(m=49, n=576, heads=12, dim=64), dict(m=4, n=16, heads=2, dim=16, batch=1)),
    Case("lookupvit_b.mhbc.sdpa", "sdpa_plain", "LookupViT-B MHBC, plain SDPA pair (49->576 + 576->49, 2 calls)", 128,
         dict(tokens=49, kv_tokens=576, heads=12, dim=64, pair=True),
         dict(tokens=4, kv_tokens=16, heads=2, dim=16, batch=1), baseline_for="lookupvit_b.mhbc"),
    # NAT-T stage 0 (56x56, 2 heads x 32, k 7) and DiNAT-T stage 1 (28x28, k 7, dilation 4)
    Case("nat_t.s0", "neighborhood_attention", "NAT-T stage 0 (k7)", 128,
         dict(spatial=(56, 56), heads=2, dim=32, kernel=7, dilation=1), dict(spatial=(8, 8), heads=1, dim=16,
                                                                              kernel=3, batch=1)),
    Case("dinat_t.s1", "neighborhood_attention", "DiNAT-T stage 1 (k7, dilation 4)", 128,
         dict(spatial=(28, 28), heads=4, dim=32, kernel=7, dilation=4), dict(spatial=(8, 8), heads=1, dim=16,
                                                                               kernel=3, dilation=2, batch=1)),
    Case("nat_t.s0.dense", "dense_sdpa", "NAT-T stage 0, dense over all tokens", 128,
         dict(tokens=56 * 56, heads=2, dim=32), dict(tokens=64, heads=1, dim=16, batch=1), baseline_for="nat_t.s0"),
    # the neighbourhood target's baseline: one SDPA over all tokens with the neighbourhood as a boolean mask
    Case("nat_t.s0.masked", "dense_sdpa", "NAT-T stage 0, dense SDPA with the neighbourhood mask", 128,
         dict(tokens=56 * 56, heads=2, dim=32, neighborhood=((56, 56), 7, 1)),
         dict(tokens=64, heads=1, dim=16, neighborhood=((8, 8), 3, 1), batch=1), baseline_for="nat_t.s0",
         target=True),
    Case("dinat_t.s1.masked", "dense_sdpa", "DiNAT-T stage 1, dense SDPA with the neighbourhood mask", 128,
         dict(tokens=28 * 28, heads=4, dim=32, neighborhood=((28, 28), 7, 4)),
         dict(tokens=64, heads=1, dim=16, neighborhood=((8, 8), 3, 2), batch=1), baseline_for="dinat_t.s1",
         target=True),
    # Croc-7B (Vicuna-7B: 32 heads x 128): prefix (prompt + 576 image tokens) bidirectional, causal text, padding
    Case("croc_7b.attn", "masked_attention", "Croc-7B LLM layer (L 1024)", 4,
         dict(length=1024, heads=32, dim=128, prefix=(612, 640, 700, 600), valid=(1024, 900, 1000, 800)),
         dict(length=40, heads=2, dim=16, prefix=(10,), valid=(33,), batch=1)),
    Case("croc_7b.causal_dense", "dense_sdpa", "Croc-7B layer, plain causal SDPA", 4,
         dict(tokens=1024, heads=32, dim=128, causal=True), dict(tokens=40, heads=2, dim=16, causal=True, batch=1),
         baseline_for="croc_7b.attn"),
    # BiFormer-T's block LayerNorms at 224 (channels last): 56x56x64, 28x28x128, 14x14x256, 7x7x512
    Case("biformer_t.s0.ln", "layer_norm", "BiFormer-T stage 0 LayerNorm (C 64)", 128,
         dict(tokens=56 * 56, channels=64), dict(tokens=49, batch=1)),
    Case("biformer_t.s1.ln", "layer_norm", "BiFormer-T stage 1 LayerNorm (C 128)", 128,
         dict(tokens=28 * 28, channels=128), dict(tokens=49, batch=1)),
    Case("biformer_t.s2.ln", "layer_norm", "BiFormer-T stage 2 LayerNorm (C 256)", 128,
         dict(tokens=14 * 14, channels=256), dict(tokens=49, batch=1)),
    Case("biformer_t.s3.ln", "layer_norm", "BiFormer-T stage 3 LayerNorm (C 512)", 128,
         dict(tokens=7 * 7, channels=512), dict(batch=1)),
    # stage-0 MLPs at 224 (tokens x C -> hidden -> C, exact GELU): the narrow ones the fused kernel serves
    Case("agent_pvt_t.s0.mlp", "mlp", "Agent-PVT-T stage 0 MLP (64 -> 512 -> 64)", 128,
         dict(tokens=56 * 56, channels=64, hidden=512), dict(tokens=49, batch=1)),
    Case("agent_swin_t.s0.mlp", "mlp", "Agent-Swin-T stage 0 MLP (96 -> 384 -> 96)", 128,
         dict(tokens=56 * 56, channels=96, hidden=384), dict(tokens=49, batch=1)),
    Case("biformer_t.s0.mlp", "mlp", "BiFormer-T stage 0 MLP (64 -> 192 -> 64)", 128,
         dict(tokens=56 * 56, channels=64, hidden=192), dict(tokens=49, batch=1)),
    # stage-0 depthwise convs plus residual at 224: x a slice of a projection `proj` channels wide, as the models pass
    # v (Agent-Swin per 7x7 window, Agent-PVT on the 56x56 grid, BiFormer's 5x5 LePE) or the block input (BiFormer's
    # position-embedding conv)
    Case("agent_swin_t.s0.dwconv", "depthwise_conv", "Agent-Swin-T stage 0 value conv (64 windows of 7x7, C 96)", 128,
         dict(windows=64, hw=7, channels=96, kernel=3, proj=3), dict(windows=4, batch=1)),
    Case("agent_pvt_t.s0.dwconv", "depthwise_conv", "Agent-PVT-T stage 0 value conv (56x56, C 64)", 128,
         dict(hw=56, channels=64, kernel=3, proj=2), dict(hw=8, batch=1)),
    Case("biformer_t.s0.lepe", "depthwise_conv", "BiFormer-T stage 0 LePE (56x56, C 64, 5x5)", 128,
         dict(hw=56, channels=64, kernel=5, proj=3), dict(hw=8, batch=1)),
    Case("biformer_t.s0.pos", "depthwise_conv", "BiFormer-T stage 0 position-embedding conv (56x56, C 64)", 128,
         dict(hw=56, channels=64, kernel=3, proj=1), dict(hw=8, batch=1)),
]


# --- builders: (params, batch, dtype, device, grad) -> (args, kwargs, forward FLOPs) ---------------------------------

def _rand(shape, dtype, device, grad, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _dense_flops(b, h, nq, nk, d, dv):
    return 2.0 * b * h * nq * nk * (d + dv)


def _build_routing(p, b, dtype, dev, grad):
    hw, c = p["hw"], p["channels"]
    q, k, v = (_rand((b, hw, hw, c), dtype, dev, grad) for _ in range(3))
    region = hw // p["regions"]
    kw = dict(num_heads=p["heads"], region_size=region, topk=p["topk"], scale=c ** -0.5)
    return (q, k, v), kw, 2.0 * b * hw * hw * p["topk"] * region * region * 2 * c


def _build_outlook(p, b, dtype, dev, grad):
    hw, c, ks, stride = p["hw"], p["channels"], p["kernel"], p["stride"]
    grid = (hw + 2 - ks) // stride + 1
    v = _rand((b, hw, hw, c), dtype, dev, grad)
    attn = _rand((b, grid, grid, p["heads"] * ks ** 4), dtype, dev, grad)
    kw = dict(num_heads=p["heads"], kernel_size=ks, stride=stride, padding=1)
    return (v, attn), kw, 2.0 * b * grid * grid * ks ** 4 * c


def _build_agent(p, b, dtype, dev, grad):
    n, h, d, a = p["tokens"], p["heads"], p["dim"], p["agents"]
    q, k, v = (_rand((b, h, n, d), dtype, dev, grad) for _ in range(3))
    agent = _rand((b, h, a, d), dtype, dev, grad)
    kw = dict(agent_bias=_rand((1, h, a, n), dtype, dev, grad, 0.1),
              query_bias=_rand((1, h, n, a), dtype, dev, grad, 0.1))
    return (q, k, v, agent), kw, 2 * _dense_flops(b, h, n, a, d, d)


def _build_window(p, b, dtype, dev, grad):
    hw, h, d, w = p["hw"], p["heads"], p["dim"], p["window"]
    q, k, v = (_rand((b, h, hw, hw, d), dtype, dev, grad) for _ in range(3))
    kw = dict(bias=_rand((h, w * w, w * w), dtype, dev, grad, 0.1))
    return (q, k, v, w), kw, _dense_flops(b, h, hw * hw, w * w, d, d)


def _build_ms_deform(p, b, dtype, dev, grad):
    levels, h, d, pts = p["levels"], p["heads"], p["dim"], p["points"]
    tokens = sum(y * x for y, x in levels)
    nq = p["queries"] or tokens
    value = _rand((b, tokens, h, d), dtype, dev, grad)
    shapes = torch.tensor(levels, dtype=torch.int64, device=dev)
    loc = torch.rand((b, nq, h, len(levels), pts, 2), device=dev).to(dtype).requires_grad_(grad)
    weights = torch.rand((b, nq, h, len(levels) * pts), device=dev).softmax(-1)
    weights = weights.view(b, nq, h, len(levels), pts).to(dtype).requires_grad_(grad)
    # per sampled point and channel: 4 bilinear taps (multiply-add) and the attention weight (multiply-add)
    return (value, shapes, loc, weights), {}, 10.0 * b * nq * h * len(levels) * pts * d


def _build_downsampled(p, b, dtype, dev, grad):
    n, m, h, d = p["tokens"], p["kv_tokens"], p["heads"], p["dim"]
    q = _rand((b, h, n, d), dtype, dev, grad)
    k, v = (_rand((b, h, m, d), dtype, dev, grad) for _ in range(2))
    return (q, k, v), {}, _dense_flops(b, h, n, m, d, d)


def _build_cross(p, b, dtype, dev, grad):
    m, n, h, d = p["m"], p["n"], p["heads"], p["dim"]
    q, v_q = (_rand((b, h, m, d), dtype, dev, grad) for _ in range(2))
    k, v_k = (_rand((b, h, n, d), dtype, dev, grad) for _ in range(2))
    return (q, k, v_k, v_q), {}, 2.0 * b * h * m * n * 3 * d  # shared similarity once, two value products


def _build_neighborhood(p, b, dtype, dev, grad):
    spatial, h, d = tuple(p["spatial"]), p["heads"], p["dim"]
    q, k, v = (_rand((b, h, *spatial, d), dtype, dev, grad) for _ in range(3))
    kernel = (p["kernel"],) * len(spatial)
    kw = dict(kernel_size=kernel, dilation=p.get("dilation", 1))
    return (q, k, v), kw, _dense_flops(b, h, math.prod(spatial), math.prod(kernel), d, d)


def _spans(values, b, dev):
    return torch.tensor([values[i % len(values)] for i in range(b)], dtype=torch.int64, device=dev)


def _build_masked(p, b, dtype, dev, grad):
    length, h, d = p["length"], p["heads"], p["dim"]
    q, k, v = (_rand((b, h, length, d), dtype, dev, grad) for _ in range(3))
    prefix, valid = _spans(p["prefix"], b, dev), _spans(p["valid"], b, dev)
    rows = torch.arange(length, device=dev)[:, None]
    cols = torch.arange(length, device=dev)[None, :]
    visible = ((cols <= rows) | (cols < prefix[:, None, None])) & (cols < valid[:, None, None])
    flops = 2.0 * h * visible.sum().item() * 2 * d
    return (q, k, v), dict(causal=True, prefix_len=prefix, valid_len=valid), flops


def _build_layer_norm(p, b, dtype, dev, grad):
    n, c = p["tokens"], p["channels"]
    x = _rand((b, n, c), dtype, dev, grad)
    weight, bias = _rand((c,), dtype, dev, grad), _rand((c,), dtype, dev, grad)
    return (x, weight, bias), {}, 8.0 * b * n * c  # ~8 FLOPs per element (mean, variance, scale, shift)


def _build_mlp(p, b, dtype, dev, grad):
    n, c, hidden = p["tokens"], p["channels"], p["hidden"]
    x = _rand((b, n, c), dtype, dev, grad)
    w1, w2 = _rand((hidden, c), dtype, dev, grad, c ** -0.5), _rand((c, hidden), dtype, dev, grad, hidden ** -0.5)
    b1, b2 = _rand((hidden,), dtype, dev, grad), _rand((c,), dtype, dev, grad)
    return (x, w1, b1, w2, b2), {}, 4.0 * b * n * c * hidden  # two products of 2 * n * c * hidden


def _build_depthwise_conv(p, b, dtype, dev, grad):
    items, hw, c, k = b * p.get("windows", 1), p["hw"], p["channels"], p["kernel"]
    x = _rand((items, hw, hw, p["proj"] * c), dtype, dev, grad)[..., -c:]
    weight, bias = _rand((c, 1, k, k), dtype, dev, grad, 1.0 / k), _rand((c,), dtype, dev, grad)
    residual = _rand((items, hw, hw, c), dtype, dev, grad)
    return (x, weight, bias), dict(residual=residual), 2.0 * items * hw * hw * c * k * k


def _build_dense(p, b, dtype, dev, grad):
    n, h, d = p["tokens"], p["heads"], p["dim"]
    q, k, v = (_rand((b, h, n, d), dtype, dev, grad) for _ in range(3))
    causal = bool(p.get("causal", False))
    if "neighborhood" in p:  # (spatial, kernel, dilation): the boolean mask a dense implementation would use
        from .neighborhood import neighborhood_mask

        spatial, kernel, dilation = p["neighborhood"]
        mask = neighborhood_mask(spatial, kernel, dilation, device=dev)
        return (q, k, v), dict(attn_mask=mask), _dense_flops(b, h, n, n, d, d)
    return (q, k, v), dict(is_causal=causal), _dense_flops(b, h, n, n, d, d) / (2 if causal else 1)


def _build_sdpa_plain(p, b, dtype, dev, grad):
    """Plain SDPA: ``tokens`` queries over ``kv_tokens`` keys (default: the same), ``windows`` x the batch; with
    ``pair`` also the reverse call (kv_tokens queries over tokens keys, the cross-attention pair)."""
    nq, h, d = p["tokens"], p["heads"], p["dim"]
    nk, bw = p.get("kv_tokens", nq), b * p.get("windows", 1)
    q = _rand((bw, h, nq, d), dtype, dev, grad)
    k, v = (_rand((bw, h, nk, d), dtype, dev, grad) for _ in range(2))
    if not p.get("pair", False):
        return (q, k, v), {}, _dense_flops(bw, h, nq, nk, d, d)
    v_rev = _rand((bw, h, nq, d), dtype, dev, grad)  # values on the query set, read by the reverse call
    return (q, k, v, v_rev), {}, 2 * _dense_flops(bw, h, nq, nk, d, d)


def sdpa_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_rev: torch.Tensor | None = None):
    """One plain SDPA call (no mask, no bias); with ``v_rev`` also the reverse call ``sdpa(k, q, v_rev)``."""
    out = F.scaled_dot_product_attention(q, k, v)
    if v_rev is None:
        return out
    return out, F.scaled_dot_product_attention(k, q, v_rev)


BUILDERS: dict[str, Callable] = {
    "routing_attention": _build_routing, "outlook_attention": _build_outlook, "agent_attention": _build_agent,
    "window_attention": _build_window, "ms_deform_attn": _build_ms_deform,
    "downsampled_attention": _build_downsampled, "cross_attention": _build_cross,
    "neighborhood_attention": _build_neighborhood, "masked_attention": _build_masked, "dense_sdpa": _build_dense,
    "sdpa_plain": _build_sdpa_plain, "layer_norm": _build_layer_norm, "mlp": _build_mlp,
    "depthwise_conv": _build_depthwise_conv,
}
_SDPA_OPS = ("dense_sdpa", "sdpa_plain")  # baselines timed here directly, not through the dispatch registry


# --- timing ----------------------------------------------------------------------------------------------------------

def _tensors(out) -> list[torch.Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _grad_inputs(args, kwargs) -> list[torch.Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]


def _step(fn: Callable[[], Any], backward: bool, inputs: list[torch.Tensor]) -> Callable[[], None]:
    if not backward:
        def forward():
            with torch.no_grad():
                fn()
        return forward
    grads_out: list[torch.Tensor] = []

    def forward_backward():
        outs = _tensors(fn())
        if not grads_out:
            grads_out.extend(torch.randn_like(o) for o in outs)
        torch.autograd.grad(outs, inputs, grads_out)  # no .grad accumulation kernels in the timing
    return forward_backward


def _median_ms(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_ms(step: Callable[[], None], device: torch.device, iters: int) -> float:
    """Mean summed kernel time of one step on a CUDA device (the GPU's own cost, without host overhead)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1e3


def _fallback_reason(fn: Callable[[], Any]) -> str | None:
    """Run once; the dispatch warning text if the requested backend fell back, else None."""
    from . import _dispatch

    _dispatch._WARNED.clear()  # the warning is issued once per reason: make sure this call can see it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()  # with the inputs' requires_grad as in the timed mode: some backends refuse only for training
    for w in caught:
        text = str(w.message)
        if "falling back" in text:
            # "op: backend 'x' cannot serve this input (REASON); falling back" -> REASON
            return text.partition("cannot serve this input (")[2].rpartition("); falling back")[0] or text
    return None


# --- one row ---------------------------------------------------------------------------------------------------------

def _op_function(op: str) -> Callable | None:
    if op == "dense_sdpa":
        return F.scaled_dot_product_attention
    if op == "sdpa_plain":
        return sdpa_plain
    import zoo.ops as ops

    return getattr(ops, op, None)


def _backends(op: str) -> list[str]:
    if op in _SDPA_OPS:
        return ["sdpa"]
    from . import _dispatch

    try:
        return _dispatch.available_backends(op)
    except ValueError:
        return []


def _case_params(case: Case, quick: bool, batch: int | None) -> tuple[dict, int]:
    params = dict(case.params)
    default_batch = case.batch
    if quick:
        params.update({k: v for k, v in case.quick.items() if k != "batch"})
        default_batch = case.quick.get("batch", 1)
    return params, batch or default_batch


# Vendor datasheet peaks by a substring of the CUDA device name (SXM boards and the H100 PCIe card): dense 16-bit
# tensor-core FLOP/s, float32 FLOP/s without TF32 (the kernels keep float32 IEEE), memory bytes/s. NVL boards differ
# from their SXM namesakes and are left to --peak-tflops / --peak-gbps.
GPU_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (989e12, 67e12, 4.8e12),
    "H100 80GB HBM3": (989e12, 67e12, 3.35e12),
    "H100 PCIe": (756e12, 51e12, 2.0e12),
}


def device_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float] | None:
    """(peak FLOP/s for ``dtype``, peak memory bytes/s) of a known CUDA device, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "NVL" in name:
        return None
    for key, (half, single, bandwidth) in GPU_PEAKS.items():
        if key in name:
            return (single if dtype == torch.float32 else half), bandwidth
    return None


def roofline_ms(flops: float, nbytes: float, peaks: tuple[float, float]) -> tuple[float, str]:
    """The least time ``flops`` FLOPs and ``nbytes`` bytes of memory traffic can take at ``peaks`` (FLOP/s, bytes/s),
    in ms, and which of the two sets it (``"flops"`` or ``"bytes"``)."""
    t_flops, t_bytes = flops / peaks[0], nbytes / peaks[1]
    return max(t_flops, t_bytes) * 1e3, ("flops" if t_flops >= t_bytes else "bytes")


def _compiled(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` under ``torch.compile`` (inductor), in a fresh dynamo state: every row compiles its own graph (the rows'
    calls share one code object, whose cache would otherwise fill and fall back to eager)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters["graph_break"].clear()
    return torch.compile(fn)


def _graph_breaks() -> str | None:
    """The graph breaks of the calls compiled since :func:`_compiled`, as one line, or None."""
    breaks = torch._dynamo.utils.counters["graph_break"]
    return "; ".join(str(reason).splitlines()[0][:120] for reason in breaks) or None


def _measure(case: Case, backend: str, mode: str, params: dict, batch: int, dtype: torch.dtype,
             device: torch.device, warmup: int, iters: int, peaks: tuple[float, float] | None = None,
             compiled: bool = False) -> dict:
    backward = mode == "fwd+bwd"
    args, kwargs, flops = BUILDERS[case.op](params, batch, dtype, device, backward)
    op_fn = _op_function(case.op)
    call_kwargs = kwargs if case.op in _SDPA_OPS else {**kwargs, "backend": backend}
    fn = lambda: op_fn(*args, **call_kwargs)  # noqa: E731
    if compiled:
        fn = _compiled(fn)
    if case.op not in _SDPA_OPS:
        # (compiled: dispatch's warning breaks the graph, so it runs, and is caught, in the first call)
        reason = _fallback_reason(fn)
        if reason is not None:
            return {"status": f"skipped: {reason}"}
    # the first call outside the timed region builds masks (and compiles); its outputs give the traffic's bytes
    out_bytes = sum(t.numel() * t.element_size() for t in _tensors(fn()))
    step = _step(fn, backward, _grad_inputs(args, kwargs))
    if compiled:
        step()  # the step's own graph (a backward, or the forward under no_grad) compiles here, untimed
        breaks = _graph_breaks()
        if breaks:
            return {"status": f"skipped: graph break under torch.compile: {breaks}"}
    tensor_bytes = sum(t.numel() * t.element_size() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = _median_ms(step, device, warmup, iters)
    factor = 3.0 if backward else 1.0
    work, traffic = factor * flops, factor * (tensor_bytes + out_bytes)
    row = {"status": "ok", "time_ms": ms, "tflops": work / (ms * 1e-3) / 1e12, "gbps": traffic / (ms * 1e-3) / 1e9}
    if device.type == "cuda":
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        row["device_ms"] = device_ms(step, device, iters)
    if peaks is not None:
        row["floor_ms"], row["bound"] = roofline_ms(work, traffic, peaks)
        row["x_floor"] = row.get("device_ms", ms) / row["floor_ms"]
    return row


def _run_row(case, backend, mode, params, batch, dtype, device, warmup, iters, peaks=None, compiled=False) -> dict:
    row = {"case": case.name, "op": case.op, "model": case.model, "backend": backend, "mode": mode,
           "dtype": str(dtype).replace("torch.", ""), "device": device.type, "batch": batch, "compiled": compiled}
    try:
        row.update(_measure(case, backend, mode, params, batch, dtype, device, warmup, iters, peaks, compiled))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # one broken backend must not stop the benchmark
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _is_target(case: Case) -> bool:
    """Whether ``case`` is the cost target of the case it accompanies (the denominator of ``x_sdpa``)."""
    return case.op == "sdpa_plain" or case.target


def _add_ratios(rows: list[dict]) -> None:
    """Per mode: ``vs_reference`` = reference time of the (accompanied) case / this row's time; ``x_sdpa`` = this
    row's time / the time of its case's target baseline (rows of cases without one get none), ``x_sdpa_dev`` the
    same with kernel times where both rows have them."""
    by_name = {c.name: c for c in CASES}
    ref = {(r["case"], r["mode"]): r["time_ms"] for r in rows if r["backend"] == "reference" and "time_ms" in r}
    targets = {(by_name[r["case"]].baseline_for, r["mode"]): r for r in rows
               if _is_target(by_name[r["case"]]) and "time_ms" in r}
    for r in rows:
        if "time_ms" not in r:
            continue
        case = by_name[r["case"]]
        key = (case.baseline_for or r["case"], r["mode"])
        if key in ref:
            r["vs_reference"] = ref[key] / r["time_ms"]
        if key not in targets or (r["op"] == "dense_sdpa" and not case.target):
            continue
        base = targets[key]
        r["x_sdpa"] = r["time_ms"] / base["time_ms"]
        if r.get("device_ms") and base.get("device_ms"):
            r["x_sdpa_dev"] = r["device_ms"] / base["device_ms"]


def select_cases(ops: list[str] | None) -> list[Case]:
    """Cases whose op or name is in ``ops`` (all when None), plus the dense baselines that accompany them."""
    if not ops:
        return list(CASES)
    chosen = {c.name for c in CASES if c.op in ops or c.name in ops}
    return [c for c in CASES if c.name in chosen or c.baseline_for in chosen]


def run(ops: list[str] | None = None, backends: list[str] | None = None, dtype: torch.dtype = torch.bfloat16,
        device: str = "cuda", batch: int | None = None, quick: bool = False, warmup: int = 5, iters: int = 20,
        modes: tuple[str, ...] = ("fwd", "fwd+bwd"), log: Callable[[str], None] | None = None,
        peaks: tuple[float, float] | None = None, compiled: bool = False) -> list[dict]:
    """Benchmark the cases whose op or case name is in ``ops`` (all when None); returns one dict per row.

    ``compiled`` times every call under ``torch.compile`` (see the module docstring); each row resets dynamo's caches
    (``torch._dynamo.reset()``), so functions compiled earlier in the process compile again on their next call.
    Rows carry ``case, op, model, backend, mode, dtype, device, batch, compiled, status`` and, when measured,
    ``time_ms`` (median), ``tflops``, ``gbps``, ``vs_reference`` (speed-up over the reference backend), ``x_sdpa``
    (time over the case's target SDPA baseline, for the cases that have one; ``x_sdpa_dev`` the same in kernel time),
    ``peak_mib`` (CUDA: peak allocation above the inputs), ``device_ms`` (CUDA: summed kernel time of one step) and,
    where peaks are known (``peaks`` = (FLOP/s, bytes/s), else :func:`device_peaks`), ``floor_ms``, ``bound`` and
    ``x_floor`` (see the module docstring).
    """
    dev = torch.device(device)
    peaks = peaks or device_peaks(dev, dtype)
    rows = []
    for case in select_cases(ops):
        params, b = _case_params(case, quick, batch)
        names = _backends(case.op)
        if _op_function(case.op) is None or not names:
            rows.append({"case": case.name, "op": case.op, "model": case.model, "backend": "-", "mode": "-",
                         "status": f"skipped: {case.op} is not in zoo.ops"})
            continue
        for backend in names:
            if backends and backend not in backends and case.op not in _SDPA_OPS:
                continue
            for mode in modes:
                rows.append(_run_row(case, backend, mode, params, b, dtype, dev, warmup, iters, peaks, compiled))
                if log:
                    log(_format_row(rows[-1]))
    _add_ratios(rows)
    return rows


# --- output ----------------------------------------------------------------------------------------------------------

COLUMNS = [("case", 22, "{}"), ("backend", 10, "{}"), ("mode", 8, "{}"), ("batch", 5, "{}"), ("time_ms", 10, "{:.3f}"),
           ("device_ms", 9, "{:.3f}"), ("tflops", 8, "{:.2f}"), ("gbps", 8, "{:.1f}"), ("floor_ms", 8, "{:.3f}"),
           ("bound", 5, "{}"), ("x_floor", 7, "{:.1f}x"), ("vs_reference", 12, "{:.2f}x"), ("x_sdpa", 7, "{:.2f}x"),
           ("x_sdpa_dev", 10, "{:.2f}x"), ("peak_mib", 9, "{:.0f}"), ("status", 0, "{}")]


def _format_row(row: dict) -> str:
    cells = []
    for key, width, fmt in COLUMNS:
        value = row.get(key)
        text = "" if value is None else fmt.format(value)
        if key == "status" and text == "ok":
            text = ""
        cells.append(text.ljust(width) if width else text)
    return " ".join(cells).rstrip()


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    header = " ".join(k.ljust(w) if w else k for k, w, _ in COLUMNS)
    return "\n".join([header, "-" * len(header)] + [_format_row(r) for r in rows])


def environment(device: str) -> dict:
    """Versions and device name recorded with every result file."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def write_results(rows: list[dict], out_dir: Path, env: dict) -> tuple[Path, Path]:
    """Write ``ops_bench.csv`` and ``ops_bench.json`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["case", "op", "model", "backend", "mode", "dtype", "device", "batch", "compiled", "time_ms", "device_ms",
            "tflops", "gbps", "floor_ms", "bound", "x_floor", "vs_reference", "x_sdpa", "x_sdpa_dev", "peak_mib",
            "status"]
    csv_path, json_path = out_dir / "ops_bench.csv", out_dir / "ops_bench.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return csv_path, json_path


# --- CLI -------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench ops", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=None, help="comma-separated op or case names, or all (the default); see --list")
    p.add_argument("--backends", default=None, help="comma-separated backends to run (default: all available)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="batch size for every case (default: per case)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke runs)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both")
    p.add_argument("--out", type=Path, default=None, help="directory for ops_bench.csv and ops_bench.json")
    p.add_argument("--compile", action="store_true",
                   help="time every call under torch.compile (inductor): each backend inside a traced graph")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of the device for the roofline floor (default: vendor figure for known GPUs)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak memory GB/s for the roofline floor (give both peaks, or neither)")
    return p


def _split(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _selected(ops: str | None) -> list[str] | None:
    """The ``--ops`` names, or None (every case) for none given or ``all``."""
    names = _split(ops)
    return None if names == ["all"] else names


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``zoo bench ops ...``); returns the exit status."""
    args = _parser().parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:22} {c.op:24} batch {c.batch:<4} {c.model}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: CUDA is not available here; use --device cpu --quick", file=sys.stderr)
        return 2
    if args.batch is not None and args.batch < 1:
        print(f"--batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    known = {c.op for c in CASES} | {c.name for c in CASES}
    ops = _selected(args.ops)
    unknown = sorted(set(ops or ()) - known)
    if unknown:
        print(f"--ops: unknown {unknown}; known ops and cases: {sorted(known)}", file=sys.stderr)
        return 2
    given = [v for v in (args.peak_tflops, args.peak_gbps) if v is not None]
    if len(given) == 1 or any(v <= 0 for v in given):
        print(f"--peak-tflops and --peak-gbps: give both, each > 0 (got {args.peak_tflops}, {args.peak_gbps})",
              file=sys.stderr)
        return 2
    peaks = (args.peak_tflops * 1e12, args.peak_gbps * 1e9) if given else None
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if device == "cpu" and not args.quick:
        print("note: the released shapes are GPU-sized; on CPU add --quick", file=sys.stderr)
    modes = ("fwd", "fwd+bwd") if args.mode == "both" else (args.mode,)
    env = {**environment(device), "compiled": args.compile}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(format_table([]))
    rows = run(ops, _split(args.backends), dtype, device, args.batch, args.quick, args.warmup, args.iters, modes,
               log=print, peaks=peaks, compiled=args.compile)
    print()
    print(format_table(rows))
    if args.out is not None:
        for path in write_results(rows, args.out, env):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
