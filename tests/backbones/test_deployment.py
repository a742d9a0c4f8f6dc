"""Deployment paths of every family, one tiny model each: bfloat16 autocast and channels-last inputs and models;
weights cast to bfloat16 or float16 (``model.to(dtype)``, no autocast: the routing descriptors, the agent biases and
their caches, the outlook and window ops all take low-precision parameters, and the result stays close to float32);
``torch.compile`` as one graph; ``torch.export`` of the classifier and of the feature pyramid; ``torch.func``
ensembles (stacked parameters, one vmapped call: outputs, and gradients through ``torch.func.grad``)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import zoo
from backbone_checks import image, randomize
from test_agent_cswin import TINY as CSWIN
from test_agent_deit import TINY as DEIT
from test_agent_pvt import TINY as PVT
from test_agent_swin import TINY as SWIN
from test_biformer import TINY_MODELS as BIFORMER
from test_volo import TINY as VOLO

CASES = {
    "biformer_tiny": (BIFORMER["biformer_tiny"], 64),
    "biformer_stl_nchw": (BIFORMER["biformer_stl_nchw"], 64),
    "zoo_volo_d1_224": (VOLO, 64),
    "agent_deit_tiny": (DEIT, 32),
    "agent_pvt_tiny": (PVT, 64),
    "agent_swin_t": (SWIN, 64),
    "agent_cswin_t": (CSWIN, 64),
}

# torch.compile backend of the one-graph test: aot_eager (dynamo + AOTAutograd, no code generation), except where
# torch 2.14's CPU aot_eager miscomputes SDPA fed by in-graph pooled queries (the agent op's sdpa backend)
COMPILE_BACKEND = {"agent_pvt_tiny": "eager", "agent_swin_t": "eager", "agent_cswin_t": "eager"}


def _random_model(name: str) -> torch.nn.Module:
    kwargs, _ = CASES[name]
    torch.manual_seed(0)
    return randomize(zoo.create_model(name, **kwargs))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_and_channels_last(name):
    model, x = _random_model(name), image(CASES[name][1], CASES[name][1])
    cl_x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        cl_input = model(cl_x)
        cl_model = model.to(memory_format=torch.channels_last)(cl_x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert _relative(low, ref) < 0.05  # measured 0.6-1.5%
    for what, out in (("channels_last input", cl_input), ("channels_last model", cl_model)):
        assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), what


def _compiled_graphs() -> int:
    """Graphs dynamo compiled since the last ``counters.clear()``."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", list(CASES))
def test_torch_compile_captures_one_graph_matching_eager(name):
    # fullgraph: no graph breaks anywhere in the model (inductor runs in the GPU tests); one compilation for three
    # calls: a cache write in traced code is replayed after the call and used to recompile every model once
    model, x = _random_model(name), image(CASES[name][1], CASES[name][1], batch=1)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=COMPILE_BACKEND.get(name, "aot_eager"), fullgraph=True)
    with torch.no_grad():
        outs = [compiled(x) for _ in range(3)]
        expected = model(x)
    assert _compiled_graphs() == 1
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_compiled_model_is_traced_once(name):
    # on CUDA the ops trace their Triton paths; dynamo alone (backend "eager") is what decides recompilations
    model, x = _random_model(name).cuda().eval(), image(CASES[name][1], CASES[name][1], batch=2).cuda()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outs = [compiled(x) for _ in range(3)]
        expected = model(x)
    assert _compiled_graphs() == 1
    for out in outs:
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_weights_match_float32(name, dtype):
    kwargs, size = CASES[name]
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        low = model.to(dtype)(x.to(dtype))
        again = model(x.to(dtype))  # the second call goes through the remembered dispatch and bias caches
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.03  # measured 0.004-0.010
    assert torch.equal(again, low)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_over_stacked_models_equals_each_model(name):
    """torch.func ensembling without autograd: two models' parameters stacked, one vmapped call. The ops see
    vmap's batched tensors (no storage, no addresses), and the parameter caches (agent biases, Swin's window bias)
    are built inside the transform and never kept."""
    first = _random_model(name)
    second = randomize(zoo.create_model(name, **CASES[name][0]), seed=1)
    x = image(CASES[name][1], CASES[name][1], batch=1)
    with torch.no_grad():
        params, buffers = torch.func.stack_module_state([first, second])
        base = copy.deepcopy(first).to("meta")
        out = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(params, buffers)
        ref = torch.stack([first(x), second(x)])
    assert (ref[0] - ref[1]).abs().max().item() > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert zoo.ops.clear_parameter_caches(base) == 0


@pytest.mark.parametrize("name", list(CASES))
def test_vmapped_gradients_of_stacked_models_equal_each_models_backward(name):
    """torch.func ensemble training: per-model parameter gradients from one vmap over torch.func.grad equal each
    model's own backward (float32; the batched reference ops sum in another order, measured up to 1.2e-5)."""
    models = [_random_model(name), randomize(zoo.create_model(name, **CASES[name][0]), seed=1)]
    x = image(CASES[name][1], CASES[name][1], batch=1)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    grads = torch.func.vmap(torch.func.grad(
        lambda p, b: torch.func.functional_call(base, (p, b), (x,)).square().sum()))(params, buffers)
    for i, model in enumerate(models):
        model(x).square().sum().backward()
        for key, p in model.named_parameters():
            scale = p.grad.abs().max().item()
            assert (grads[key][i] - p.grad).abs().max().item() <= 5e-5 * scale + 1e-12, (key, i)


@pytest.mark.parametrize("features_only", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_gives_the_eager_output(name, features_only):
    # the deployment path, for the classifier and for the feature pyramid a detector takes (ops dispatch to their
    # CPU backends while tracing)
    kwargs, size = CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=features_only, **kwargs).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def _assert_bitwise_equal(one: tuple[list, dict], layers: tuple[list, dict]) -> None:
    """The features and parameter gradients of one cast against per-layer casts: bitwise equal, None where the other
    is None."""
    (features, grads), (layer_features, layer_grads) = one, layers
    assert all(torch.equal(a, b) for a, b in zip(features, layer_features))
    assert grads.keys() == layer_grads.keys()
    for k, g in grads.items():
        assert (g is None) == (layer_grads[k] is None), k
        assert g is None or torch.equal(g, layer_grads[k]), k


def _compiled_feature_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[list, dict, list[str]]:
    """One bf16-autocast training step of ``torch.compile(model)`` (AOTAutograd, the graphs run as traced): the
    features, the parameters' gradients and the ATen ops of the forward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    forward_ops = []

    def keep_forward(gm, example_inputs):
        forward_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep_forward,
                                                         bw_compiler=lambda gm, _: make_boxed_func(gm.forward)))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        features = compiled(x)
    sum(f.float().square().mean() for f in features).backward()
    torch._dynamo.reset()
    return features, {k: p.grad for k, p in model.named_parameters()}, forward_ops


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["agent_deit_tiny"])  # (the decorator is shared: one family keeps the suite short)
def test_compiled_feature_pyramid_training_casts_the_weights_once(name, device, monkeypatch):
    # a detector trains the backbone through forward_intermediates (timm's features_only): compiled under autocast,
    # that call casts every cached layer's weights in one multi-tensor copy, with bitwise the features and gradients
    # of per-layer casts (which data-parallel training keeps; on CUDA torch 2.11 once gave the one cast's weights
    # all-zero gradients under compile)
    from zoo.ops import autocast_cache

    kwargs, size = CASES[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    results = []
    for per_layer in (False, True):
        monkeypatch.setattr(autocast_cache, "_distributed", lambda per_layer=per_layer: per_layer)
        torch.manual_seed(0)
        model = timm.create_model(name, features_only=True, **kwargs).to(device).train()
        results.append(_compiled_feature_step(model, x))
    (one, one_grads, one_ops), (layers, layer_grads, layer_ops) = results
    assert sum("_foreach_copy" in op for op in one_ops) == 1 and not any("_foreach_copy" in op for op in layer_ops)
    _assert_bitwise_equal((one, one_grads), (layers, layer_grads))
    assert any(g is not None and g.abs().sum() > 0 for g in one_grads.values())


@pytest.mark.parametrize("name", list(CASES))
def test_feature_pyramid_training_casts_the_weights_once(name, monkeypatch, autograd_nodes):
    # eager training through timm's features_only wrapper under autocast casts the weights once too (one autograd
    # node), with bitwise the features and gradients of per-layer casts (which data-parallel training keeps)
    from zoo.ops import autocast_cache

    kwargs, size = CASES[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    results = []
    for per_layer in (False, True):
        monkeypatch.setattr(autocast_cache, "_distributed", lambda per_layer=per_layer: per_layer)
        torch.manual_seed(0)
        model = timm.create_model(name, features_only=True, **kwargs).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model(x)
        sum(f.float().square().mean() for f in features).backward()
        results.append((features, {k: p.grad for k, p in model.named_parameters()}, autograd_nodes(features)))
    (one, one_grads, one_nodes), (layers, layer_grads, layer_nodes) = results
    assert one_nodes.count("_CastTogetherBackward") == 1 and "_CastTogetherBackward" not in layer_nodes
    assert layer_nodes.count("ToCopyBackward0") > one_nodes.count("ToCopyBackward0")
    _assert_bitwise_equal((one, one_grads), (layers, layer_grads))
