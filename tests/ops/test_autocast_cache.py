"""zoo.ops.autocast_cache: layers keep autocast's weight copies between inference calls, bitwise like nn layers,
and never serve a copy of stale or differently-typed parameters."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.ops import (AutocastCachedConv2d, AutocastCachedLinear, cache_autocast_casts, clear_parameter_caches,
                     one_cast_per_forward)

_ATTR = "_zoo_autocast_copies"


class _CountCopies(TorchDispatchMode):
    """Counts dtype-converting copies (autocast's casts) issued inside the context."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def _plain_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Flatten(2), nn.Linear(36, 5),
                         nn.Linear(5, 4, bias=False))


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    plain = _plain_net(seed)
    return plain, cache_autocast_casts(copy.deepcopy(plain))


class _ScopedNet(nn.Sequential):
    """A model class whose forward is the one cast's scope, as the zoo models' are."""

    @one_cast_per_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _scoped_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    plain = _plain_net(seed)
    scoped = copy.deepcopy(plain)
    scoped.__class__ = _ScopedNet
    return plain, cache_autocast_casts(scoped)


def _infer(model: nn.Module, x: torch.Tensor, *, counter: _CountCopies | None = None) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        if counter is None:
            return model(x)
        with counter:
            return model(x)


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_swaps_exact_layer_types_only():
    class MyLinear(nn.Linear):
        pass

    model = cache_autocast_casts(nn.Sequential(nn.Linear(2, 2), MyLinear(2, 2), nn.Conv2d(1, 1, 1), nn.Conv1d(1, 1, 1)))
    assert [type(m) for m in model] == [AutocastCachedLinear, MyLinear, AutocastCachedConv2d, nn.Conv1d]


def test_inference_calls_reuse_the_copies_bitwise():
    plain, cached = _pair()
    x = _input()
    expected = _infer(plain, x)
    first, second = _CountCopies(), _CountCopies()
    out1 = _infer(cached, x, counter=first)
    out2 = _infer(cached, x, counter=second)
    assert out1.dtype == torch.bfloat16
    assert torch.equal(out1, expected) and torch.equal(out2, expected)
    # 5 parameters cast once, plus the input's cast each call
    assert first.copies == 6 and second.copies == 1


def test_copy_weight_makes_the_cached_copy_and_keys_it():
    """A consumer's copy maker (a layout) makes the weight's copy; asking with another maker makes a new one."""
    from zoo.ops.autocast_cache import autocast_weights

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, groups=4)
    made = []

    def transposed_copy(w, dtype):  # same values, another layout: (C, 1, K, K) with the channels innermost
        made.append(dtype)
        return w.permute(1, 2, 3, 0).to(dtype).contiguous().permute(3, 0, 1, 2)

    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        w1, b1 = autocast_weights(conv, transposed_copy)
        w2, _ = autocast_weights(conv, transposed_copy)
        w3, _ = autocast_weights(conv)
    assert made == [torch.bfloat16] and w2 is w1 and (w1.stride(0), w1.stride(2), w1.stride(3)) == (1, 12, 4)
    assert torch.equal(w1, conv.weight.to(torch.bfloat16)) and b1.dtype == torch.bfloat16
    assert w3 is not w1 and w3.is_contiguous() and torch.equal(w3, w1)


@pytest.mark.parametrize("update", ["no_grad_add", "optimizer_step", "load_state_dict", "data_assignment",
                                    "dtype_round_trip", "new_parameter", "bias_removed"])
def test_copies_follow_parameter_updates(update):
    plain, cached = _pair()
    x = _input()
    _infer(cached, x)  # fills the cache
    if update == "no_grad_add":
        with torch.no_grad():
            for p in cached.parameters():
                p.add_(0.5)
    elif update == "optimizer_step":
        opt = torch.optim.SGD(cached.parameters(), lr=0.5)
        cached(x).square().sum().backward()
        opt.step()
    elif update == "load_state_dict":
        cached.load_state_dict(_plain_net(seed=7).state_dict())
    elif update == "data_assignment":
        for p in cached.parameters():
            p.data = torch.randn_like(p)
    elif update in ("new_parameter", "bias_removed"):  # other objects under the same names
        for m in cached.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight = nn.Parameter(torch.randn_like(m.weight))
                if update == "bias_removed":
                    m.bias = None
        if update == "bias_removed":
            plain = _plain_net()
            for m in plain.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.bias = None
    else:
        cached.double()
        cached.float()
    plain.load_state_dict(cached.state_dict())
    assert torch.equal(_infer(cached, x), _infer(plain, x))


def test_copies_follow_the_autocast_state():
    """A copy made under one autocast dtype is not handed out under another, nor with autocast off."""
    from zoo.ops.autocast_cache import autocast_weights

    layer = AutocastCachedLinear(8, 4)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):  # (the CPU's default autocast dtype, which it reports when off)
            w_bf16, b_bf16 = autocast_weights(layer)
            assert autocast_weights(layer)[0] is w_bf16
        weight, bias = autocast_weights(layer)
        with torch.autocast("cpu", torch.float16):
            w_fp16, b_fp16 = autocast_weights(layer)
    assert w_bf16.dtype == b_bf16.dtype == torch.bfloat16
    assert w_fp16.dtype == b_fp16.dtype == torch.float16 and torch.equal(w_fp16, layer.weight.to(torch.float16))
    assert weight is layer.weight and bias is layer.bias


def test_an_optimizer_step_invalidates_the_copies():
    """Every optimizer step drops every copy, whether or not its kernels bump the parameters' version counters. A
    ``.data`` write stands in for an update they do not record; a step that changes nothing follows."""
    plain, cached = _pair()
    x = _input()
    _infer(cached, x)
    for p in cached.parameters():
        p.data.mul_(-1.0)
    plain.load_state_dict(cached.state_dict())
    assert not torch.equal(_infer(cached, x), _infer(plain, x))
    torch.optim.AdamW(cached.parameters(), lr=0.1).step()  # no gradients: changes no parameter
    assert torch.equal(_infer(cached, x), _infer(plain, x))


def test_data_writes_need_an_explicit_clear():
    plain, cached = _pair()
    x = _input()
    _infer(cached, x)
    for p in cached.parameters():
        p.data.mul_(-1.0)  # bypasses the version counter
    plain.load_state_dict(cached.state_dict())
    assert not torch.equal(_infer(cached, x), _infer(plain, x))  # the documented hazard
    assert clear_parameter_caches(cached) == 3
    assert torch.equal(_infer(cached, x), _infer(plain, x))


def test_training_calls_use_autocast_and_drop_the_copies():
    plain, cached = _pair()
    x = _input()
    _infer(cached, x)
    assert all(_ATTR in m.__dict__ for m in cached if isinstance(m, (nn.Linear, nn.Conv2d)))
    for model in (plain, cached):
        with torch.autocast("cpu", torch.bfloat16):
            model(x).float().square().sum().backward()
    assert not any(_ATTR in m.__dict__ for m in cached)
    for p, q in zip(plain.parameters(), cached.parameters()):
        assert q.grad is not None and torch.equal(p.grad, q.grad)


def test_copy_made_in_inference_mode_serves_a_later_backward_through_frozen_layers():
    plain, cached = _pair()
    for model in (plain, cached):
        model.requires_grad_(False)
    with torch.autocast("cpu", torch.bfloat16), torch.inference_mode():
        cached(_input())
    grads = []
    for model in (plain, cached):
        x = _input().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            model(x).float().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_no_copies_without_autocast_or_for_non_float32_weights():
    _, cached = _pair()
    x = _input()
    with torch.no_grad():
        cached(x)
    assert not any(_ATTR in m.__dict__ for m in cached)
    cached.to(torch.bfloat16)
    _infer(cached, x.bfloat16())
    assert not any(_ATTR in m.__dict__ for m in cached)


def test_vmap_over_stacked_parameters_runs_uncached():
    from torch.func import functional_call, stack_module_state, vmap

    x = _input()
    outputs = []
    for nets in ([_plain_net(seed) for seed in range(3)], [_pair(seed)[1] for seed in range(3)]):
        params, buffers = stack_module_state(nets)
        base = copy.deepcopy(nets[0]).to("meta")
        with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
            outputs.append(vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers))
    assert outputs[1].shape == (3, 2, 8, 4) and torch.equal(outputs[1], outputs[0])


def test_derived_cache_takes_registered_attributes_only():
    from zoo.ops._cache import derived_cache, register_parameter_cache

    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="attr='_my_cache' is not a registered parameter cache"):
        derived_cache(layer, (layer.weight,), "_my_cache")
    attr = register_parameter_cache("_test_second_cache")
    first, second = derived_cache(layer, (layer.weight,)), derived_cache(layer, (layer.bias,), attr)
    first["w"], second["b"] = 1, 2  # two caches of one module, of different sources, kept apart
    assert derived_cache(layer, (layer.weight,)) == {"w": 1} and derived_cache(layer, (layer.bias,), attr) == {"b": 2}
    with torch.no_grad():
        layer.bias.add_(1.0)
    assert derived_cache(layer, (layer.bias,), attr) == {} and derived_cache(layer, (layer.weight,)) == {"w": 1}
    assert clear_parameter_caches(layer) == 2


def test_pickle_and_deepcopy_leave_the_copies_behind():
    _, cached = _pair()
    _infer(cached, _input())
    for clone in (copy.deepcopy(cached), pickle.loads(pickle.dumps(cached))):
        assert not any(_ATTR in m.__dict__ for m in clone)
        assert torch.equal(_infer(clone, _input()), _infer(cached, _input()))


def _zoo_model_and_plain_copy(device: str) -> tuple[nn.Module, nn.Module]:
    model = zoo.create_model("agent_deit_tiny", num_classes=10).eval().to(device)
    kinds = {type(m) for m in model.modules()}
    assert AutocastCachedLinear in kinds and AutocastCachedConv2d in kinds
    assert nn.Linear not in kinds and nn.Conv2d not in kinds
    plain = copy.deepcopy(model)
    plain_types = {AutocastCachedLinear: nn.Linear, AutocastCachedConv2d: nn.Conv2d}
    for m in plain.modules():
        m.__class__ = plain_types.get(type(m), type(m))
    return model, plain


def test_zoo_models_cache_their_layers_and_match_plain_layers():
    model, plain = _zoo_model_and_plain_copy("cpu")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = _infer(plain, x)
    assert torch.equal(_infer(model, x), expected) and torch.equal(_infer(model, x), expected)


@pytest.mark.gpu
def test_gpu_zoo_model_reuses_copies_bitwise_under_cuda_autocast():
    model, plain = _zoo_model_and_plain_copy("cuda")
    x = torch.randn(4, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    outputs, copies = [], []
    for net in (plain, model, model):
        counter = _CountCopies()
        with torch.autocast("cuda", torch.bfloat16), torch.no_grad(), counter:
            outputs.append(net(x))
        copies.append(counter.copies)
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(outputs[2], outputs[0])
    assert copies[2] < copies[1] == copies[0]  # 62 layers' casts skipped on the second call
    assert copies[1] - copies[2] >= 2 * 49


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_training_casts_together_through_accumulation(mode):
    """Compiled on CUDA (with CUDA graphs under reduce-overhead), two micro-batches' forwards before their backward
    (gradient accumulation), over two steps: the traced one cast gives the eager plain layers' gradients (to bf16
    rounding: compiled kernels round differently) and leaves nothing in its scope list."""
    from zoo.ops import autocast_cache

    model, plain = _zoo_model_and_plain_copy("cuda")
    model.train(), plain.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, mode=mode)
    xs = [torch.randn(4, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in (1, 2)]
    for _ in range(2):
        for net in (compiled, plain):
            with torch.autocast("cuda", torch.bfloat16):
                losses = [net(x).float().square().mean() for x in xs]
            sum(losses).backward()
    assert autocast_cache._TRACED == []
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert (p.grad - q.grad).abs().max() <= 3e-2 * q.grad.abs().max() + 1e-6, name
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_ema_update_needs_clear_parameter_caches():
    """timm's ModelEmaV3 writes the EMA weights with torch._foreach_lerp_, which on CUDA bumps no version counter
    (H200, torch 2.11); clear_parameter_caches (the recipe calls it after each update) makes evaluation use them."""
    from timm.utils import ModelEmaV3

    model, plain = _zoo_model_and_plain_copy("cuda")
    ema = ModelEmaV3(model, decay=0.5)
    x = torch.randn(4, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(2))

    def logits(net):
        with torch.autocast("cuda", torch.bfloat16), torch.no_grad():
            return net(x).float()

    before = logits(ema.module)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema.update(model, step=10)
    clear_parameter_caches(ema.module)
    plain.load_state_dict(ema.module.state_dict())
    after = logits(ema.module)
    assert torch.equal(after, logits(plain)) and (after - before).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# training forwards: the trainable weights cast together


def _train_step(model: nn.Module, x: torch.Tensor, counter: _CountCopies | None = None) -> torch.Tensor:
    """One bf16-autocast forward and backward (inside ``counter`` when given); returns the output."""
    with counter if counter is not None else torch.enable_grad():
        with torch.autocast("cpu", torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
    return out


def test_a_training_forward_casts_the_trainable_weights_together_bitwise(autograd_nodes):
    """Five weights and biases: ten casts and five autograd nodes fewer than autocast's per-layer casts, the same
    outputs and gradients, over two accumulated steps."""
    plain, cached = _pair()
    x = _input()
    counts, outputs = [], []
    for model in (plain, cached):
        counter = _CountCopies()
        outputs.append([_train_step(model, x, counter), _train_step(model, x * 2)])
        counts.append(counter.copies)
    assert counts[0] - counts[1] == 10
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    for p, q in zip(plain.parameters(), cached.parameters()):
        assert torch.equal(p.grad, q.grad)
    with torch.autocast("cpu", torch.bfloat16):
        nodes = [autograd_nodes(model(x)) for model in (plain, cached)]
    assert nodes[1].count("_CastTogetherBackward") == 1 and "_CastTogetherBackward" not in nodes[0]
    assert nodes[0].count("ToCopyBackward0") - nodes[1].count("ToCopyBackward0") == 5


def test_each_training_forward_casts_anew():
    """The copies live for one forward: a ``p.data`` write between steps (no version bump, no optimizer step) is
    seen by the next one, and no copy stays behind."""
    from zoo.ops import autocast_cache

    plain, cached = _pair()
    x = _input()
    for model in (plain, cached):
        _train_step(model, x)
        with torch.no_grad():
            for p in model.parameters():
                p.data.mul_(-0.5)
    assert torch.equal(_train_step(cached, x), _train_step(plain, x))
    assert autocast_cache._SCOPES.stack == []
    assert not any(_ATTR in m.__dict__ for m in cached)


def test_frozen_layers_and_no_grad_calls_keep_their_own_paths():
    plain, cached = _pair()
    x = _input()
    for model in (plain, cached):
        model[0].requires_grad_(False)
    counter = _CountCopies()
    outputs = [_train_step(plain, x), _train_step(cached, x)]
    assert torch.equal(*outputs) and _ATTR in cached[0].__dict__  # the frozen conv's copy is the inference cache's
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain[3:].parameters(), cached[3:].parameters()))
    assert torch.equal(_train_step(cached, x, counter), outputs[0])
    assert counter.copies == 3  # the input's cast, and the output's float() and its backward
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(cached(x), outputs[0])  # (a no-grad call caches copies of the trainable layers too)
    assert all(_ATTR in m.__dict__ for m in (cached[0], cached[3], cached[4]))


def test_a_training_forward_walks_the_modules_only_after_the_tree_changes(monkeypatch):
    """The one cast's list of layers is kept between training forwards and walked again after a layer is added
    (which then joins the one cast), with outputs and gradients still those of plain layers."""
    plain, cached = _scoped_pair()
    x = _input()
    walks = []
    modules = nn.Module.modules
    monkeypatch.setattr(nn.Module, "modules", lambda self: walks.append(self) or modules(self))
    _train_step(cached, x)
    _train_step(cached, x)
    assert walks.count(cached) == 1
    layer = nn.Linear(4, 3)
    plain.append(layer)
    cached.append(copy.deepcopy(layer))
    cache_autocast_casts(cached)  # swaps the new layer's class (the tree walk below is the cast's, not this one's)
    cached.zero_grad(set_to_none=True)
    walks.clear()
    counter = _CountCopies()
    outputs = [_train_step(plain, x), _train_step(cached, x, counter)]
    assert walks.count(cached) == 1 and torch.equal(*outputs)
    assert counter.copies == 3  # the one cast, the output's float() and its backward: the new layer cast with it
    for p, q in zip(plain.parameters(), cached.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_replaced_and_parametrized_weights_join_the_one_cast():
    """A weight replaced by a new Parameter after a step, and a parametrized weight (a property, not a parameter):
    the next forward casts the current tensors, and the gradients reach the new parameter and the parametrization's
    original, as with plain layers."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    plain, cached = _scoped_pair()
    x = _input()
    _train_step(cached, x)
    for model in (plain, cached):
        model.zero_grad(set_to_none=True)
        model[3].weight = nn.Parameter(torch.linspace(-1, 1, 5 * 36).reshape(5, 36))
        parametrize.register_parametrization(model[4], "weight", Double())
    outputs = [_train_step(plain, x), _train_step(cached, x)]
    assert torch.equal(*outputs)
    for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name


def test_the_scope_closes_when_the_forward_raises():
    from zoo.ops import autocast_cache

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    model = cache_autocast_casts(Fails())
    with torch.autocast("cpu", torch.bfloat16), pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 4))
    assert autocast_cache._SCOPES.stack == []


def test_data_parallel_training_keeps_the_per_layer_casts(monkeypatch):
    """Under DDP each gradient's communication starts when it is accumulated; one node for all would hold them to
    the end, so there the layers cast one by one."""
    from zoo.ops import autocast_cache

    monkeypatch.setattr(autocast_cache, "_distributed", lambda: True)
    plain, cached = _pair()
    counts = []
    for model in (plain, cached):
        counter = _CountCopies()
        _train_step(model, _input(), counter)
        counts.append(counter.copies)
    assert counts[0] == counts[1]


def test_cast_together_backward_takes_any_gradient_layout_and_missing_gradients():
    from zoo.ops.autocast_cache import _CastTogether

    a = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    c = torch.randn(2, 2, requires_grad=True)
    low = _CastTogether.apply(torch.bfloat16, a, b, c)
    assert [t.dtype for t in low] == [torch.bfloat16] * 3
    assert all(torch.equal(t, s.to(torch.bfloat16)) for t, s in zip(low, (a, b, c)))
    m = torch.randn(3, 6, dtype=torch.bfloat16)
    (low[0].t() @ m).float().sum().backward(retain_graph=True)  # a transposed gradient for a
    (low[1] * 3).float().sum().backward()  # c gets none
    want = (m.sum(1, keepdim=True).expand(3, 5)).float()
    assert torch.equal(a.grad, want) and a.grad.is_contiguous()
    assert torch.equal(b.grad, torch.full((4,), 3.0)) and c.grad is None


def test_cast_together_copies_and_gradients_are_views_of_one_buffer_each():
    """Eager calls allocate once each way: the contiguous tensors' copies share one buffer, their gradients
    another, which the parameters keep as their ``.grad`` (no copy); a channels-last weight gets its own."""
    from zoo.ops.autocast_cache import _CastTogether

    a = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    conv = torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_()
    low = _CastTogether.apply(torch.bfloat16, a, b, conv)
    assert all(torch.equal(t, s.to(torch.bfloat16)) for t, s in zip(low, (a, b, conv)))
    assert low[0]._base is not None and low[0]._base is low[1]._base and low[1].data_ptr() == low[0].data_ptr() + 30
    assert low[2]._base is None and low[2].stride() == conv.stride()
    weights = [torch.randn(t.shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i))
               for i, t in enumerate(low)]
    sum((t * w).float().sum() for t, w in zip(low, weights)).backward()
    assert all(torch.equal(p.grad, w.float()) for p, w in zip((a, b, conv), weights))
    shared = a.grad.untyped_storage().data_ptr() == b.grad.untyped_storage().data_ptr()
    assert shared and b.grad.data_ptr() == a.grad.data_ptr() + 60
    assert a.grad.dtype == torch.float32 and conv.grad.stride() == conv.stride()


def test_zoo_model_training_step_casts_together_bitwise(autograd_nodes):
    model = zoo.create_model("agent_deit_tiny", num_classes=10, img_size=64)
    plain = copy.deepcopy(model)
    plain_types = {AutocastCachedLinear: nn.Linear, AutocastCachedConv2d: nn.Conv2d}
    for m in plain.modules():
        m.__class__ = plain_types.get(type(m), type(m))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    outputs = [_train_step(net, x) for net in (plain, model)]
    assert torch.equal(*outputs)
    grads = [{name: p.grad for name, p in net.named_parameters()} for net in (plain, model)]
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    with torch.autocast("cpu", torch.bfloat16):
        nodes = [autograd_nodes(net(x)) for net in (plain, model)]
    # (the patch embedding's conv is a subclass the plain copy keeps: cast together in both)
    swapped = [m for m in model.modules() if type(m) in plain_types]
    assert len(swapped) == 1 + 12 * 5 and nodes[1].count("_CastTogetherBackward") == 1
    tensors = sum(1 + (m.bias is not None) for m in swapped)
    assert nodes[0].count("ToCopyBackward0") - nodes[1].count("ToCopyBackward0") == tensors


def _compiled_ops(model: nn.Module, x: torch.Tensor, amp: bool = True) -> tuple[torch.Tensor, dict[str, list]]:
    """Training steps of ``torch.compile(model)`` (AOTAutograd, graphs run as traced; under autocast two, the second
    without recompiling); returns the first output and the ATen ops of the forward and backward graphs, and the
    graphs themselves under "fw_graphs"."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    if amp:
        out = _train_step(compiled, x)
        with torch._dynamo.config.patch(error_on_recompile=True):  # the traced scopes' guards hold across steps
            _train_step(compiled, x)
    else:
        out = compiled(x)
        out.float().square().sum().backward()
    ops = {kind: [str(n.target) for gm in gms for n in gm.graph.nodes if n.op == "call_function"]
           for kind, gms in graphs.items()}
    ops["fw_graphs"] = graphs["fw"]
    torch._dynamo.reset()
    return out, ops


def test_compiled_training_casts_the_weights_together():
    """Under torch.compile a forward wrapped by one_cast_per_forward casts the five weights and biases by one
    multi-tensor copy forward and one backward (inductor lowers each to one foreach kernel) in place of five casts
    each way, in the model's one graph; the same outputs and gradients as eager; nothing stays in the traced scopes;
    without autocast nothing is cast."""
    from zoo.ops import autocast_cache

    plain, cached = _scoped_pair()
    assert not cached._forward_pre_hooks and not cached._forward_hooks
    x = _input()
    (want, plain_ops), (got, ops) = _compiled_ops(plain, x), _compiled_ops(cached, x)
    assert len(ops["fw_graphs"]) == len(plain_ops["fw_graphs"]) == 1
    assert torch.equal(got, want)
    for p, q in zip(plain.parameters(), cached.parameters()):  # two steps' gradients, accumulated
        assert torch.equal(p.grad, q.grad)
    for kind in ("fw", "bw"):
        count = lambda names, op: sum(op in name for name in names)
        assert count(ops[kind], "_foreach_copy") == 1 and count(plain_ops[kind], "_foreach_copy") == 0
        assert count(plain_ops[kind], "_to_copy") - count(ops[kind], "_to_copy") == 5, kind
    assert autocast_cache._TRACED == []
    _, fp32_ops = _compiled_ops(_scoped_pair()[1], x, amp=False)
    assert not any("_foreach_copy" in name or "_to_copy" in name for name in fp32_ops["fw"] + fp32_ops["bw"])


def test_compiled_hooked_models_keep_one_graph_and_their_layers_casts():
    """A model given the one cast by hooks (cache_autocast_casts on any model) keeps each layer's own casts under
    torch.compile: dynamo traces a model's own hooks as frames of their own, where a cast would be a second graph."""
    plain, cached = _pair()
    assert cached._forward_pre_hooks and cached._forward_hooks
    (want, plain_ops), (got, ops) = _compiled_ops(plain, _input()), _compiled_ops(cached, _input())
    assert torch.equal(got, want) and len(ops["fw_graphs"]) == 1
    assert ops["fw"] == plain_ops["fw"] and ops["bw"] == plain_ops["bw"]


def test_zoo_models_scope_their_forward_and_compile_to_one_graph(monkeypatch):
    """The zoo models' forward is the one cast's scope (no hooks); compiled under autocast, one graph holds one
    multi-tensor cast of every autocast-cached layer's weights, with bitwise the outputs and gradients of the same
    compiled model casting layer by layer."""
    from zoo.ops import autocast_cache

    model = zoo.create_model("agent_pvt_tiny", num_classes=10, img_size=64, depths=(1, 1, 1, 1))
    assert not model._forward_pre_hooks and not model._forward_hooks
    per_layer = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    got, ops = _compiled_ops(model, x)
    monkeypatch.setattr(autocast_cache, "_traced_casts", lambda root, args: None)
    want, layer_ops = _compiled_ops(per_layer, x)
    assert len(ops["fw_graphs"]) == 1 and sum("_foreach_copy" in name for name in ops["fw"]) == 1
    assert not any("_foreach_copy" in name for name in layer_ops["fw"])
    layers = [m for m in model.modules() if isinstance(m, (AutocastCachedLinear, AutocastCachedConv2d))]
    cast = next(n for n in ops["fw_graphs"][0].graph.nodes if "_foreach_copy" in str(n.target))
    assert len(cast.args[1]) == sum(1 + (m.bias is not None) for m in layers)
    assert torch.equal(got, want)
    for (name, p), q in zip(model.named_parameters(), per_layer.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_torch_func_transforms_keep_autocasts_casts():
    """Per-sample gradients (``vmap`` over ``grad`` of a ``functional_call``) under autocast: the training cast
    steps aside, and the results are the plain layers'."""
    from torch.func import functional_call, grad, vmap

    plain, cached = _pair()
    x = _input()
    results = []
    for model in (plain, cached):
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(p, xb, model=model):
            with torch.autocast("cpu", torch.bfloat16):
                return functional_call(model, p, (xb,)).float().square().sum()

        results.append(vmap(grad(loss), in_dims=(None, 0))(params, x[:, None]))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
