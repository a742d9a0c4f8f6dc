"""agent_bias_maps: the reference is the Agent backbones' bias build (resizes, sums, class-token column and row);
the ``triton`` backend (one launch forward, one autograd node with one launch backward) against it in Triton's CPU
interpreter (maps and every parameter's gradient: a class token, square and non-square grids, up- and downsized and
equal-size maps, a 56x56 query grid; eager, and traced by torch.compile as its two torch.library ops) and on the GPU
(the released models' grids, and whole models' training gradients with either backend); what the triton backend
refuses; input errors on plain CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.ops import agent_bias_maps
from zoo.ops import agent_bias as ab
from zoo.ops._dispatch import select_backend
from triton_checks import assert_close_to, run_in_interpreter

NAMES = ("an", "ah", "aw", "na", "ha", "wa", "ac", "ca")


def make_params(heads, num, key0, query0, cls, *, device="cpu", seed=0):
    """The eight bias parameters (float32 leaves requiring grad; ac/ca None without a class token)."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(an=(heads, num, 7, 7), ah=(heads, num, key0[0], 1), aw=(heads, num, 1, key0[1]),
                  na=(heads, num, 7, 7), ha=(heads, query0[0], 1, num), wa=(heads, 1, query0[1], num),
                  ac=(1, heads, num, 1), ca=(1, heads, 1, num))
    return {name: (torch.randn(shape, generator=g, dtype=torch.float64).float().to(device).requires_grad_()
                   if cls or name not in ("ac", "ca") else None) for name, shape in shapes.items()}


def build(p, key_size, query_size, backend, agents=None):
    return agent_bias_maps(p["an"], p["ah"], p["aw"], p["na"], p["ha"], p["wa"], key_size, query_size,
                           ac_bias=p["ac"], ca_bias=p["ca"], agents=agents, backend=backend)


def oracle(p, key_size, query_size):
    """float64 maps written from the definition: each 7x7 map resized by ``F.interpolate``, the sums, the class
    column and row concatenated."""
    d = {k: None if v is None else v.detach().double() for k, v in p.items()}
    heads, num = d["an"].shape[:2]
    up = lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    key = (up(d["an"], key_size) + d["ah"] + d["aw"]).reshape(heads, num, -1)
    query = (d["ha"] + d["wa"] + up(d["na"], query_size).permute(0, 2, 3, 1)).reshape(heads, -1, num)
    if d["ac"] is not None:
        key, query = torch.cat([d["ac"][0], key], -1), torch.cat([d["ca"][0], query], 1)
    return key[None], query[None]


def maps_and_grads(p, key_size, query_size, backend):
    """The two maps and every present parameter's gradient of a fixed random projection of both."""
    key, query = build(p, key_size, query_size, backend)
    g = torch.Generator().manual_seed(1)
    loss = (key * torch.randn(key.shape, generator=g).to(key.device)).sum() + \
        (query * torch.randn(query.shape, generator=g).to(query.device)).sum()
    leaves = [p[n] for n in NAMES if p[n] is not None]
    return key, query, torch.autograd.grad(loss, leaves)


CASES = [  # (heads, A, key grid, query grid, class token): construction sizes, so the triton backend serves all
    (2, 4, (14, 14), (14, 14), True),    # Agent-DeiT: one grid, a class token
    (1, 4, (7, 7), (56, 56), False),     # Agent-PVT stage 0: 7x7 keys (no resize), 56x56 queries
    (1, 9, (5, 6), (9, 4), True),        # non-square grids, a class token
    (1, 4, (7, 7), (7, 7), False),       # Agent-Swin's 7x7 windows: no resize at all
    (1, 4, (3, 3), (12, 12), False),     # a downsized key map
]


def test_reference_matches_the_float64_definition():
    for heads, num, key0, query0, cls in CASES:
        p = make_params(heads, num, key0, query0, cls)
        key, query = build(p, key0, query0, "reference")
        want_key, want_query = oracle(p, key0, query0)
        assert key.is_contiguous() and query.is_contiguous()
        assert_close_to(key, want_key, 1e-6, 1e-6, f"key {key0}")
        assert_close_to(query, want_query, 1e-6, 1e-6, f"query {query0}")


def test_triton_refuses_what_it_cannot_run():
    p = {k: None if v is None else v.detach() for k, v in make_params(2, 4, (6, 6), (6, 6), True).items()}
    args = [p[n] for n in NAMES]
    assert "agent axis" in ab._supports(*args, (6, 6), (6, 6), (3, 3))
    assert "row/column" in ab._supports(*args, (8, 8), (6, 6), None)
    assert "row/column" in ab._supports(*args, (6, 6), (6, 7), None)
    assert "float32" in ab._supports(*[None if t is None else t.double() for t in args], (6, 6), (6, 6), None)
    assert "contiguous" in ab._supports(args[0].transpose(2, 3), *args[1:], (6, 6), (6, 6), None)
    big = {k: None if v is None else v.detach() for k, v in make_params(1, 4, (80, 80), (6, 6), False).items()}
    assert "exceeds" in ab._supports(*[big[n] for n in NAMES], (80, 80), (6, 6), None)
    # automatic choice off CUDA without the interpreter: the reference, and the same numbers either way
    if not torch.cuda.is_available():
        assert select_backend("agent_bias_maps", None, *args, (6, 6), (6, 6), None).name == "reference"


def test_dense_prediction_resizes_take_the_reference():
    """Another grid than the construction one, and a resized agent axis: the reference's numbers (the model-level
    checks of these are in the backbone tests)."""
    p = make_params(2, 4, (6, 6), (6, 6), True)
    key, query = build(p, (8, 5), (8, 5), None, agents=(3, 3))
    assert key.shape == (1, 2, 9, 1 + 40) and query.shape == (1, 2, 1 + 40, 9)
    want = build(p, (8, 5), (8, 5), "reference", agents=(3, 3))
    assert torch.equal(key, want[0]) and torch.equal(query, want[1])


@pytest.mark.parametrize("change, message", [
    (dict(ah=torch.randn(2, 4, 6, 2)), "ah_bias must have shape \\(2, 4, 6, 1\\)"),
    (dict(wa=torch.randn(2, 1, 6, 5)), "wa_bias must have shape \\(2, 1, 6, 4\\)"),
    (dict(ca=None), "ac_bias and ca_bias"),
    (dict(an=torch.randn(2, 5, 7, 7)), "agent_num must be a positive perfect square"),
    (dict(na=torch.randn(2, 4, 7)), "na_bias must be a 4-d floating-point tensor"),
])
def test_input_errors_name_the_argument(change, message):
    p = {**{k: None if v is None else v.detach() for k, v in make_params(2, 4, (6, 6), (6, 6), True).items()},
         **change}
    with pytest.raises(ValueError, match=message):
        build(p, (6, 6), (6, 6), None)


def test_sizes_must_be_positive_pairs():
    p = {k: None if v is None else v.detach() for k, v in make_params(2, 4, (6, 6), (6, 6), False).items()}
    with pytest.raises(ValueError, match="key_size must be two positive ints"):
        build(p, (6, 0), (6, 6), None)
    with pytest.raises(ValueError, match="agents must be two positive ints"):
        build(p, (6, 6), (6, 6), None, agents=(3,))


# ----------------------------------------------------------------------------------------------------------------
# the kernels in Triton's CPU interpreter


def _interpreter_checks() -> None:
    """Maps within float32 rounding of the reference (the resize's weights contract differently on CPU), every
    gradient within float32 summation order; parameters that need no gradient get none."""
    for heads, num, key0, query0, cls in CASES:
        p = make_params(heads, num, key0, query0, cls)
        want = maps_and_grads(p, key0, query0, "reference")
        got = maps_and_grads(p, key0, query0, "triton")
        what = f"{heads} heads, {num} agents, {key0} keys, {query0} queries, cls {cls}"
        assert got[0].is_contiguous() and got[1].is_contiguous(), what
        for i, (x, y) in enumerate(zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]))):
            assert_close_to(x, y, 2e-6, 1e-6, f"{what} [{i}]")
        with torch.no_grad():  # inference: the same launch without an autograd node
            key, query = build(p, key0, query0, "triton")
        assert key.grad_fn is None and torch.equal(key, got[0].detach()) and torch.equal(query, got[1].detach())
    p = make_params(2, 4, (14, 14), (14, 14), True)
    for name in ("ah", "ca"):
        p[name].requires_grad_(False)
    key, query = build(p, (14, 14), (14, 14), "triton")
    (key.sum() + query.sum()).backward()
    assert p["ah"].grad is None and p["ca"].grad is None and p["an"].grad is not None


# small configurations of the Agent families (their backbone tests' shapes): a class token (DeiT), key and query
# grids of different sizes (PVT), stripe windows (CSwin); Agent-Swin's windows are checked full-size on the GPU
TINY_MODELS = {
    "agent_deit_tiny": dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, agent_num=(4, 4, 4, 4),
                            agent_layer=2),
    "agent_pvt_tiny": dict(img_size=64, embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
                           depths=(1, 1, 1, 1), agent_num=(4, 4, 4, 4)),
    "agent_cswin_t": dict(img_size=64, embed_dim=8, depth=(1, 1, 1, 1), split_size=(1, 2, 2, 2),
                          la_split_size=(4, 8, 4, 2), num_heads=(2, 2, 4, 4), agent_num=(4, 4, 4, 4),
                          attn_type="AABB"),
}


def _interpreter_model_checks() -> None:
    """A float32 training step of each small model builds its biases on the triton backend (every agent block's
    call, none falling back) with the reference's logits and bias gradients."""
    import os

    import zoo

    from zoo.ops._dispatch import _REGISTRY

    # every other op on its reference: the interpreter would run their kernels too, slowly
    others = ",".join(f"{op}:reference" for op in _REGISTRY if op != "agent_bias_maps")
    calls, maps_forward = [], ab._maps_forward
    ab._maps_forward = lambda *a: calls.append(a[-2:]) or maps_forward(*a)
    try:
        for name, config in TINY_MODELS.items():
            torch.manual_seed(0)
            model = zoo.create_model(name, num_classes=10, drop_path_rate=0.0, **config).train()
            x = torch.randn(2, 3, config["img_size"], config["img_size"], generator=torch.Generator().manual_seed(1))
            results = []
            for backend in ("triton", "reference"):
                os.environ["ZOO_OPS_BACKEND"] = f"agent_bias_maps:{backend},{others}"
                model.zero_grad(set_to_none=True)
                before = len(calls)
                out = model(x)
                out.square().sum().backward()
                results.append((out.detach(), {k: p.grad for k, p in model.named_parameters()
                                                if k.endswith("_bias") and "attn" in k and p.grad is not None},
                                len(calls) - before))
            del os.environ["ZOO_OPS_BACKEND"]
            (out, grads, launched), (want_out, want_grads, none) = results
            assert launched > 0 and none == 0, (name, launched, none)
            assert_close_to(out, want_out, 1e-5, 1e-5, f"{name} logits")
            assert grads.keys() == want_grads.keys() and len(grads) >= 6, (name, sorted(grads))
            for key, want in want_grads.items():
                if want.any():
                    assert_close_to(grads[key], want, 1e-4, 1e-4, f"{name} grad {key}")
    finally:
        ab._maps_forward = maps_forward


def _traced_checks() -> None:
    """Under torch.compile the triton backend is the two ops ``zoo::agent_bias_maps_fwd`` / ``_bwd`` (no resize,
    scatter or concatenation of the reference's left in either graph), with the reference's maps and every wanted
    gradient; a parameter that wants none gets none."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compilers import nop

    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return nop(gm, example_inputs)

    for heads, num, key0, query0, cls in CASES[:3]:
        p = make_params(heads, num, key0, query0, cls)
        want = maps_and_grads(p, key0, query0, "reference")
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(lambda *a: build(dict(zip(NAMES, a)), key0, query0, "triton"), fullgraph=True,
                                 backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        key, query = compiled(*[p[n] for n in NAMES])
        g = torch.Generator().manual_seed(1)
        loss = (key * torch.randn(key.shape, generator=g)).sum() + (query * torch.randn(query.shape, generator=g)).sum()
        grads = torch.autograd.grad(loss, [p[n] for n in NAMES if p[n] is not None])
        what = f"traced: {heads} heads, {num} agents, {key0} keys, {query0} queries, cls {cls}"
        assert len(graphs) == 2, (what, graphs)
        assert "zoo.agent_bias_maps_fwd.default" in graphs[0], (what, sorted(graphs[0]))
        assert "zoo.agent_bias_maps_bwd.default" in graphs[1], (what, sorted(graphs[1]))
        assert not any("upsample" in op or "index" in op or "cat" in op for ops in graphs for op in ops), \
            (what, graphs)
        for i, (x, y) in enumerate(zip((key, query, *grads), (want[0], want[1], *want[2]))):
            assert_close_to(x, y, 2e-6, 1e-6, f"{what} [{i}]")
    p = make_params(2, 4, (14, 14), (14, 14), True)
    p["ah"].requires_grad_(False)
    torch._dynamo.reset()
    key, query = torch.compile(lambda *a: build(dict(zip(NAMES, a)), (14, 14), (14, 14), "triton"),
                               backend="aot_eager")(*[p[n] for n in NAMES])
    (key.sum() + query.sum()).backward()
    assert p["ah"].grad is None and p["an"].grad is not None and p["ca"].grad is not None


def test_triton_interpreter_against_the_reference():
    run_in_interpreter("test_agent_bias", "_interpreter_checks", "_interpreter_model_checks", "_traced_checks")


# ----------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [(3, 49, (14, 14), (14, 14), True), (6, 49, (28, 28), (28, 28), True),
                                  (1, 49, (7, 7), (56, 56), False), (2, 16, (7, 7), (7, 7), False),
                                  (4, 9, (12, 12), (12, 12), False), (5, 49, (7, 7), (64, 64), False)])
def test_cuda_kernels_against_the_reference(case):
    """The released models' grids (Agent-DeiT at 224 and 448, Agent-PVT stage 0 at 224 and 256, Agent-Swin's
    7x7 and 12x12 windows): the maps as ATen's CUDA resize gives them, within a float32 contraction, and every
    gradient within float32 summation order (ATen's resize backward adds with atomics)."""
    heads, num, key0, query0, cls = case
    p = make_params(heads, num, key0, query0, cls, device="cuda")
    assert select_backend("agent_bias_maps", None, *[p[n] for n in NAMES], key0, query0, None).name == "triton"
    want = maps_and_grads(p, key0, query0, "reference")
    got = maps_and_grads(p, key0, query0, None)
    for i, (x, y) in enumerate(zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]))):
        assert_close_to(x, y, 1e-6, 1e-6, f"{case} [{i}]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_t"])
def test_cuda_models_train_alike_on_either_backend(name, monkeypatch, no_tf32):
    """float32 training steps (no TF32) of whole models with the fused bias build and with the reference's: the same
    logits, and the same gradients of every agent bias parameter."""
    import zoo

    model = zoo.create_model(name, drop_path_rate=0.0).cuda().train()
    x = torch.randn(2, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    target = torch.randn(2, model.num_classes, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    results = []
    for backend in ("agent_bias_maps:triton", "agent_bias_maps:reference"):
        monkeypatch.setenv("ZOO_OPS_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out * target).sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (out, grads), (want_out, want_grads) = results
    assert_close_to(out, want_out, 1e-5, 1e-5, f"{name} logits")
    assert grads.keys() == want_grads.keys()
    checked = 0
    for key, want in want_grads.items():
        if key.rsplit(".", 1)[-1] in ("an_bias", "ah_bias", "aw_bias", "na_bias", "ha_bias", "wa_bias", "ac_bias",
                                      "ca_bias") and want.any():
            # the maps' last-bit differences, carried through the blocks above, and ATen's atomic resize backward:
            # up to 4e-5 of the norm on the H200 for the smallest gradients (a wrong one is off by its whole size)
            assert_close_to(grads[key], want, 1e-4, 1e-4, f"{name} grad {key}")
            checked += 1
    assert checked >= 24, checked
