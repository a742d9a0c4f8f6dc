"""How many kernels an eager inference forward or training step launches on the fast path, counted on the CPU.

Eager steps of these backbones on a GPU wait for the host, which pays for every launch; the fusions that cut
launches (the pooled agent launch, residual sums made by the next norm, the agent-bias and weight-cast caches, the
fused q/kv projection, single-launch backwards) can regress without any output changing. CI has no GPU, so
``launch_census.py`` runs the CUDA path's Python in Triton's CPU interpreter with the Triton backends forced and each
launch recorded instead of run, and these tests pin what a step launches: for a forward, Triton kernels, the ATen ops
our Python calls directly, the dtype casts and the module attribute reads through ``nn.Module.__getattr__``; for a
training step (whose ATen calls are mostly autograd's), the Triton kernels. Thin widths at full depth: the counts
follow the depths, not the widths. A change that moves a count on purpose updates it here, with the reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.ops.triton import triton_missing_reason

HERE = Path(__file__).resolve().parent

# The ops whose Triton backend the steps below take (on a GPU some take another backend at some sizes, by the speed
# rules in ops/: Agent-PVT's 3,136- and 784-token stages the separate kernels, wide norms ATen's; training steps the
# norms' reference, ATen's, at these models' sizes).
ATTENTION_OPS = ("pooled_agent_attention", "agent_attention", "agent_bias_maps", "depthwise_conv", "window_attention",
                 "outlook_attention", "routing_attention", "downsampled_attention")
TRITON_OPS = {"infer": ("layer_norm", "add_layer_norm", *ATTENTION_OPS), "train": ATTENTION_OPS}

THIN = {"agent_deit_tiny": {"embed_dim": 48}, "agent_pvt_tiny": {"embed_dims": [16, 32, 80, 128]},
        "agent_swin_t": {"embed_dim": 48}, "agent_cswin_t": {"embed_dim": 32},
        "zoo_volo_d1_224": {"embed_dims": [96, 192, 192, 192]}, "biformer_tiny": {"embed_dims": [32, 64, 128, 256]}}

# Per model, an inference forward: Triton launches by kernel, top-level ATen calls by op, dtype casts.
EXPECTED = {
    # 12 blocks: norm1 and the norm2 that makes the attention sum (one norm kernel each), the pooled agent launch
    # (agents, both attentions, the value conv in place); qkv, proj, fc1, fc2 and the head GEMMs; GELU. The class
    # token's concatenation, the position-embedding add, the last block's deferred sum and the final norm; the patch
    # embedding. Casts: the image into the patch conv, the final norm's float32 output into the head.
    "agent_deit_tiny": (
        {"agent._pooled_forward_kernel": 12, "layer_norm.forward_kernel": 2 * 12},
        {"linear": 4 * 12 + 1, "gelu": 12, "cat": 1, "add": 2, "layer_norm": 1, "conv2d": 1},
        2),
    # depths 2, 2, 2, 2: two norm kernels and one pooled launch a block; per block one GEMM for q and kv together
    # (the cached fused weights), proj, fc1, fc2, and the head; a patch embedding (conv, ATen norm) and a
    # position-embedding add a stage, each stage's last deferred sum; the head's mean. Casts: the four stage inputs
    # into their patch convs, the stage-4 tokens into the head.
    "agent_pvt_tiny": (
        {"agent._pooled_forward_kernel": 8, "layer_norm.forward_kernel": 2 * 8},
        {"linear": 4 * 8 + 1, "gelu": 8, "add": 4 + 4, "layer_norm": 4, "conv2d": 4, "mean": 1},
        5),
    # depths 2, 2, 6, 2, the last stage's two blocks window attention, the others agent attention; three patch
    # mergings (concatenation, norm kernel, reduction GEMM); each stage's last deferred sum; patch embedding conv and
    # norm, the final norm, the head's mean. Cast: the image into the patch conv.
    "agent_swin_t": (
        {"agent._pooled_forward_kernel": 10, "window._forward_items_kernel": 2,
         "layer_norm.forward_kernel": 2 * 12 + 3},
        {"linear": 4 * 12 + 3 + 1, "gelu": 12, "cat": 3, "add": 4, "layer_norm": 2, "conv2d": 1, "mean": 1},
        1),
    # 4 outlookers (four outlook launches each, one per residue class of pixels; a mean of 2x2 windows each), 14
    # transformer and 2 class-attention blocks (a short-key attention launch each), two norm kernels a block. GEMMs:
    # outlookers v, attn, proj, fc1, fc2; transformers qkv, proj, fc1, fc2; class attention q, kv, proj, fc1, fc2;
    # the head and the token head. Adds: the four block sequences' last deferred sums, the class blocks' MLP sums,
    # the position embedding and the token head's half (with its mul); concatenations: the class token, the class
    # blocks' outputs; convs: the stem's three (after a channels-last copy of the image, which on a GPU its
    # space-to-depth conv does without), the patch projection, the downsampling. Casts: the image into the stem, the
    # final norm's float32 output into both heads.
    "zoo_volo_d1_224": (
        {"outlook.forward_kernel": 4 * 4, "short_keys._forward_kernel": 14 + 2,
         "layer_norm.forward_kernel": 2 * (4 + 14 + 2)},
        {"linear": 5 * 4 + 4 * 14 + 5 * 2 + 2, "gelu": 4 + 14 + 2, "add": 4 + 2 + 1 + 1, "mul": 1, "mean": 4,
         "cat": 1 + 2, "conv2d": 3 + 1 + 1, "contiguous": 1, "layer_norm": 1},
        3),
    # depths 2, 2, 8, 2: a position conv and a LePE conv a block (both with their residual in the kernel), two norm
    # kernels; routing in three kernels in the first 12 blocks, the last stage's single region short-key attention;
    # qkv, proj, fc1, fc2 and the head; each block's MLP residual add (its position conv reads the whole sum); the
    # stem's two convs and GELU after a channels-last copy of the image, three downsampling convs, the head's mean.
    # Cast: the image into the stem.
    "biformer_tiny": (
        {"depthwise_conv.forward_kernel": 2 * 14, "layer_norm.forward_kernel": 2 * 14,
         "routing._region_sums_kernel": 12, "routing._route_topk_kernel": 12, "routing._forward_kernel": 12,
         "short_keys._forward_kernel": 2},
        {"linear": 4 * 14 + 1, "gelu": 14 + 1, "add": 14, "conv2d": 5, "contiguous": 1, "mean": 1},
        1),
    # depths 2, 4, 18, 1: the first six blocks one agent branch each (agents pooled by a mean, or where the windows
    # overlap by a matmul and a division), the third stage two LePE stripe branches a block (window attention,
    # concatenated), the last stage one global branch. The LePE conv's kernel adds each branch's attention output,
    # but the column stripes' (whose windows of the output would be a copy): they add it after (Agent-CSwin is not
    # among the models whose eager speed was tuned). Two norm kernels a block, each stage's last deferred sum; qkv,
    # proj, fc1, fc2 and the head; the stem conv, three merging convs, ATen norms after each and at the end.
    "agent_cswin_t": (
        {"agent._forward_kernel": 2 + 4, "window._forward_kernel": 2 * 18 + 1,
         "depthwise_conv.forward_kernel": 2 + 4 + 2 * 18 + 1, "layer_norm.forward_kernel": 2 * 25},
        {"linear": 4 * 25 + 1, "gelu": 25, "add": 18 + 4, "cat": 18, "layer_norm": 1 + 3 + 1,
         "conv2d": 1 + 3, "mean": 4 + 1, "matmul": 2, "div_": 2},
        1),
}


# Per model, calls of nn.Module.__getattr__ in an inference forward. Blocks and their layers read their submodules
# from the module dict (``self.name`` goes through that Python function: 0.70 against 0.04 us a read on this
# repository's CPU, and a thin Agent-DeiT-T forward made 277 such reads before); what is left is read once a forward
# or a stage (stems and their BatchNorms, embeddings, merges, heads), Agent-PVT's q and kv parameters for its cached
# fused projection (8 blocks x 4; a parameter is read as an attribute, since a parametrized one is a property) and
# BiFormer's stage-3 attention projections.
MODULE_READS = {"agent_deit_tiny": 13, "agent_pvt_tiny": 70, "agent_swin_t": 41, "agent_cswin_t": 27,
                "zoo_volo_d1_224": 41, "biformer_tiny": 35}


# Per model, a training step (forward and backward): Triton launches by kernel.
EXPECTED_TRAINING = {
    # each agent block: the pooled launch and its one-launch backward (with the value conv's weight-gradient total),
    # the two biases' gradients summed over the batch, the agent-bias maps and their backward
    "agent_deit_tiny": {"agent._pooled_forward_kernel": 12, "agent._pooled_backward_kernel": 12,
                        "depthwise_conv.weight_grad_sum_kernel": 12, "agent.bias_grad_sum_kernel": 2 * 12,
                        "agent_bias.bias_maps_kernel": 12, "agent_bias.bias_maps_backward_kernel": 12},
    "agent_pvt_tiny": {"agent._pooled_forward_kernel": 8, "agent._pooled_backward_kernel": 8,
                       "depthwise_conv.weight_grad_sum_kernel": 8, "agent.bias_grad_sum_kernel": 2 * 8,
                       "agent_bias.bias_maps_kernel": 8, "agent_bias.bias_maps_backward_kernel": 8},
    # and the last stage's window attention, forward and backward
    "agent_swin_t": {"agent._pooled_forward_kernel": 10, "agent._pooled_backward_kernel": 10,
                     "depthwise_conv.weight_grad_sum_kernel": 10, "agent.bias_grad_sum_kernel": 2 * 10,
                     "agent_bias.bias_maps_kernel": 10, "agent_bias.bias_maps_backward_kernel": 10,
                     "window._forward_items_kernel": 2, "window._backward_items_kernel": 2},
    # agent branches: forward and backward of the agent kernel, its biases' batch sums and the bias maps; every
    # branch's LePE conv: forward, the 3x3 backward pass and its weight-gradient total; LePE branches: window
    # attention forward and backward
    "agent_cswin_t": {"agent._forward_kernel": 6, "agent._backward_kernel": 6, "agent.bias_grad_sum_kernel": 2 * 6,
                      "agent_bias.bias_maps_kernel": 6, "agent_bias.bias_maps_backward_kernel": 6,
                      "depthwise_conv.forward_kernel": 43, "depthwise_conv.backward3_kernel": 43,
                      "depthwise_conv.weight_grad_sum_kernel": 43,
                      "window._forward_kernel": 37, "window._backward_kernel": 37},
    # outlookers: the four residue-class launches forward and for the values' gradient, one for the attention's;
    # transformer and class-attention blocks: the short-key attention and its fused backward
    "zoo_volo_d1_224": {"outlook.forward_kernel": 4 * 4, "outlook.grad_v_kernel": 4 * 4,
                        "outlook.grad_attn_kernel": 4, "short_keys._forward_kernel": 14 + 2,
                        "short_keys._fused_backward_kernel": 14 + 2},
    # 3x3 position convs: forward, the backward pass, its weight total; 5x5 LePE: forward, its input gradient by the
    # forward kernel with the taps reversed, the tiled weight gradient and its total. Routing in the first 12 blocks:
    # three forward kernels; backward: where 2x2-token regions leave routed tiles idle (the third stage's 8 blocks)
    # the masked dq and dkv kernels, else (the first two stages' 4 blocks) the inverse routing, dq and dkv kernels;
    # the last stage's short-key attention and its backward
    "biformer_tiny": {"depthwise_conv.forward_kernel": 14 + 2 * 14, "depthwise_conv.backward3_kernel": 14,
                      "depthwise_conv.weight_grad_kernel": 14, "depthwise_conv.weight_grad_sum_kernel": 2 * 14,
                      "routing._region_sums_kernel": 12, "routing._route_topk_kernel": 12,
                      "routing._forward_kernel": 12, "routing._masked_dq_kernel": 8, "routing._masked_dkv_kernel": 8,
                      "routing._inverse_routing_kernel": 4, "routing._dq_kernel": 4, "routing._dkv_kernel": 4,
                      "short_keys._forward_kernel": 2, "short_keys._fused_backward_kernel": 2},
}


def _census(mode: str) -> dict:
    """Every model's counts for ``mode`` ("infer" or "train"), from one interpreter process."""
    if triton_missing_reason() is not None:
        pytest.skip(triton_missing_reason())
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "ZOO_OPS_BACKEND": ",".join(f"{op}:triton" for op in TRITON_OPS[mode])}
    specs = [f"{name}={json.dumps(kwargs)}" for name, kwargs in THIN.items()]
    proc = subprocess.run([sys.executable, str(HERE / "launch_census.py"), mode, *specs], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def inference_census() -> dict:
    return _census("infer")


@pytest.fixture(scope="module")
def training_census() -> dict:
    return _census("train")


@pytest.mark.parametrize("name", EXPECTED)
def test_eager_inference_forward_launches(inference_census, name):
    """Triton launches, top-level ATen calls and casts of one eager float16-autocast inference forward."""
    triton, aten, casts = EXPECTED[name]
    got = inference_census[name]
    assert got["triton"] == triton, f"{name}: Triton launches {got['triton']}"
    assert got["aten"] == aten, f"{name}: top-level ATen calls {got['aten']}"
    assert got["casts"] == casts, f"{name}: dtype casts {got['casts']}"


@pytest.mark.parametrize("name", EXPECTED)
def test_eager_inference_op_calls_all_get_call_plans(inference_census, name):
    """Every op call of an inference forward that is recorded for a call plan gets one: its backend allocates,
    takes views and launches kernels, nothing else (an ATen op added to a backend's body would show here)."""
    plans = inference_census[name]["plans"]
    assert set(plans) == {"planned"} and plans["planned"] >= 2, f"{name}: call plans {plans}"


@pytest.mark.parametrize("name", MODULE_READS)
def test_eager_inference_forward_reads_submodules_from_their_dicts(inference_census, name):
    """Calls of nn.Module.__getattr__ in one eager inference forward (a block reading ``self.attn`` would show)."""
    assert inference_census[name]["module_reads"] == MODULE_READS[name]


@pytest.mark.parametrize("name", EXPECTED_TRAINING)
def test_eager_training_step_triton_launches(training_census, name):
    """Triton launches of one eager float16-autocast training step (forward and backward)."""
    got = training_census[name]["triton"]
    assert got == EXPECTED_TRAINING[name], f"{name}: Triton launches {got}"


# Per model, the distinct (body, call key) pairs of a training step's autograd Functions (zoo.ops._dispatch.planned),
# each recorded once, since blocks of one shape share a plan: Agent-DeiT-T's are the bias maps and the pooled
# attention, forward and backward, at its one shape; Agent-PVT-T's the same at four stage shapes; the others' follow
# their stage shapes and branch kinds likewise (Agent-CSwin-T's include the unpooled agent attention's node).
TRAINING_BODY_PLANS = {"agent_deit_tiny": 4, "agent_pvt_tiny": 16, "agent_swin_t": 14, "agent_cswin_t": 24,
                       "zoo_volo_d1_224": 6, "biformer_tiny": 24}


@pytest.mark.parametrize("name", TRAINING_BODY_PLANS)
def test_eager_training_function_bodies_all_get_call_plans(training_census, name):
    """Every autograd Function body of a training step gets a call plan when recorded: it allocates, takes views and
    launches kernels, nothing else (an ATen op added to a body's launch code would show here)."""
    plans = training_census[name]["plans"]
    assert plans == {"planned": TRAINING_BODY_PLANS[name]}, f"{name}: body plans {plans}"
