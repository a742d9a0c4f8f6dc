"""zoo.ops.autocast_cache: layers keep autocast's weight copies between inference calls, bitwise like nn layers,
and never serve a copy of stale or differently-typed parameters."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.ops import AutocastCachedConv2d, AutocastCachedLinear, cache_autocast_casts, clear_parameter_caches

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
