"""Block graphs (zoo.ops.block_graphs): eager training blocks replayed from CUDA graphs.

CPU tests cover the switch, the call keys and the capture schedule; the GPU tests compare graphed training steps of
every family with the same steps run eagerly, and the cases where a call must run eagerly instead.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zoo
from zoo.ops import block_graphs as bg
from zoo.ops import linears_as_op

FAMILIES = ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_t", "agent_cswin_t", "biformer_tiny",
            "zoo_volo_d1_224"]


@pytest.fixture(autouse=True)
def _graphs_off_after():
    yield
    bg.use_block_graphs(False)
    bg.forget_block_graphs()
    bg.block_graph_stats(reset=True)


def test_use_block_graphs_takes_a_bool():
    with pytest.raises(TypeError, match="enabled must be True or False, got 'yes'"):
        bg.use_block_graphs("yes")
    with bg.block_graphs():
        assert bg.block_graphs_enabled()
    assert not bg.block_graphs_enabled()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x, branch=None, size=(1, 1)):
        return self.norm(self.fc(x) * self.scale), x


def test_call_keys_follow_what_a_graph_reads(monkeypatch):
    """The key changes with the input's layout, the other arguments, autocast, the parameters' storage and flags,
    buffers and training flags; hooks and unhashable arguments give no key (the call runs eagerly)."""
    block, x = _Block(), torch.randn(2, 4)

    def key(*args):
        found = bg._signature(block, args)
        return None if found is None else found[0]

    base = key(x, None, (1, 1))
    assert base == key(torch.randn(2, 4), None, (1, 1))  # values are not in the key
    assert base != key(torch.randn(3, 4), None, (1, 1))
    assert base != key(torch.randn(4, 2).t(), None, (1, 1))  # strides
    assert base != key(x, None, (2, 1))
    assert base != key(x, x, (1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert base != key(x, None, (1, 1))
    with torch.autocast("cpu", dtype=torch.float16, enabled=False):
        assert base == key(x, None, (1, 1))  # a disabled region's dtype does not matter
    block.fc.weight.data = block.fc.weight.data.clone()
    moved = key(x, None, (1, 1))
    assert moved != base
    block.norm.weight.requires_grad_(False)
    assert key(x, None, (1, 1)) != moved
    block.scale = torch.ones(4)
    assert key(x, None, (1, 1)) != moved
    block.norm.eval()
    frozen = key(x, None, (1, 1))
    assert frozen is not None and frozen != moved
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not saved
    try:
        assert key(x, None, (1, 1)) != frozen  # a setting that chooses kernels
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                    deterministic=not torch.backends.cudnn.deterministic, allow_tf32=saved):
        assert key(x, None, (1, 1)) != frozen  # cuDNN's algorithms (a convolution in the block)
    monkeypatch.setenv("ZOO_OPS_BACKEND", "window_attention:reference")
    assert key(x, None, (1, 1)) != frozen
    monkeypatch.delenv("ZOO_OPS_BACKEND")
    assert key(x, None, [1, 1]) is None
    handle = block.norm.register_forward_hook(lambda *a: None)
    assert key(x, None, (1, 1)) is None
    handle.remove()
    assert key(x, None, (1, 1)) == frozen
    weight = block.fc.weight
    block.fc._parameters["weight"] = nn.Parameter(torch.zeros(8, 4))[:4]  # a view, as FSDP's flat parameters give
    assert key(x, None, (1, 1)) is None
    block.fc._parameters["weight"] = weight
    for p in block.parameters():
        p.requires_grad_(False)
    assert key(x, None, (1, 1)) is None  # nothing to differentiate
    assert key(x.requires_grad_(), None, (1, 1)) is not None


def test_capture_schedule_counts_sightings_then_caps_graphs():
    """The third sighting of a key in a row is captured; a block keeps at most MAX_GRAPHS graphs and counts a
    bounded number of keys."""
    block = _Block()
    assert bg._graphs_for(block, "a") is None  # first sighting: eager
    assert bg._graphs_for(block, "a") is None  # second
    assert bg._graphs_for(block, "a") is bg._CAPTURE  # third: the caller captures now
    entries = bg._BLOCKS[block].entries
    entries["a"] = object.__new__(bg._Graphs)
    assert bg._graphs_for(block, "a") is entries["a"]
    entries["b"] = object.__new__(bg._Graphs)
    assert bg._graphs_for(block, "c") is None
    assert bg._graphs_for(block, "c") is None
    assert bg._graphs_for(block, "c") is None  # MAX_GRAPHS (2) captured already
    entries["d"] = None
    assert bg._graphs_for(block, "d") is None  # its capture failed
    assert entries["d"] is None
    for i in range(bg._SIGHTINGS_KEPT):
        entries[("k", i)] = (1, 0)
    assert bg._graphs_for(block, "new") is None
    assert "new" not in entries


def test_capture_needs_sightings_in_a_row():
    """Two sizes taking turns are captured; a key seen once an epoch (a partial last batch) never is."""
    block = _Block()
    answers = [bg._graphs_for(block, key) for _ in range(3) for key in ("x", "y")]
    assert answers[-2:] == [bg._CAPTURE, bg._CAPTURE] and answers[:-2] == [None] * 4
    block, epoch, captured = _Block(), ["full"] * (bg._RECENT + 1) + ["last"], []
    for _ in range(4):
        for key in epoch:
            if bg._graphs_for(block, key) is bg._CAPTURE:
                captured.append(key)
                bg._BLOCKS[block].entries[key] = object.__new__(bg._Graphs)
    assert captured == ["full"]
    assert bg._BLOCKS[block].entries["last"] == (1, 4 * len(epoch))


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "zoo_volo_d1_224"])
def test_cpu_training_is_unchanged_with_block_graphs_on(name):
    """On the CPU every block runs eagerly through run_block: the loss and gradients equal those with graphs off."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=5, drop_path_rate=0.0, img_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    results = []
    for enabled in (False, True):
        with bg.block_graphs(enabled):
            model.zero_grad(set_to_none=True)
            loss = model(x).square().mean()
            loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bg.block_graph_stats()["replays"] == 0


class _Rerun:
    """A stand-in for a CUDA graph on the CPU: ``replay()`` runs ``body`` (what a captured graph would launch)."""

    def __init__(self, body):
        self.body = body

    def replay(self):
        self.body()


def _rerun_capture(block, fn, args, tensors, params):
    """A CPU double of ``_capture_graphs``: graphs whose replays recompute the block on the static buffers, with the
    same buffers, bookkeeping and gradient routing as the CUDA ones."""
    graphs = bg._Graphs.__new__(bg._Graphs)  # (its __init__ makes CUDA graphs)
    graphs.keep, graphs.busy, graphs.generation = [], False, 0
    statics, static_args, aliases, targets = bg.static_leaves(args, tensors, params)
    graphs.inputs = [s.detach() for s in statics]
    with bg._parameters_swapped(block, aliases):
        outputs, graphs.layout = bg._flatten(fn(*static_args))
    graphs.outputs = [o.detach().clone() for o in outputs]
    graphs.differentiable = [o.requires_grad for o in outputs]
    graphs.grad_outputs = [torch.zeros_like(o) for o in outputs if o.requires_grad]
    graphs.grads = [torch.zeros_like(s) if s.requires_grad else None for s in statics]
    graphs.grads += [torch.zeros_like(p) for p in params]
    live = {}

    def forward():
        with bg._parameters_swapped(block, aliases), torch.enable_grad():
            outs, _ = bg._flatten(fn(*static_args))
        for buf, o in zip(graphs.outputs, outs):
            buf.copy_(o.detach())
        live["outputs"] = [o for o in outs if o.requires_grad]

    def backward():
        grads = torch.autograd.grad(live["outputs"], targets, graphs.grad_outputs, allow_unused=True,
                                    retain_graph=True)
        buffers = [g for g in graphs.grads if g is not None]
        for buf, g in zip(buffers, grads):
            buf.zero_() if g is None else buf.copy_(g)

    graphs.forward_graph, graphs.backward_graph = _Rerun(forward), _Rerun(backward)
    return graphs


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Block graphs on, with CPU stand-ins for the CUDA graphs (the bookkeeping around them is the real code)."""
    monkeypatch.setattr(bg, "_graph_device", lambda x: True)
    monkeypatch.setattr(bg, "_capture_graphs", _rerun_capture)
    bg.use_block_graphs(True)


def _pvt(**kwargs):
    torch.manual_seed(0)
    return zoo.create_model("agent_pvt_tiny", num_classes=5, drop_path_rate=0.0, img_size=64, **kwargs).train()


def test_capture_scope_runs_the_block_on_aliases_with_its_linears_sent_to_the_op(monkeypatch):
    """Inside a capture's scope the block's layers read the parameters' aliases, autocast runs without its weight
    cache, and its nn.Linear calls go to zoo.ops.linear (whose choice then knows it is inside); all undone after."""
    import importlib

    linear_module = importlib.import_module("zoo.ops.linear")
    calls, real = [], linear_module.linear
    monkeypatch.setattr(linear_module, "linear", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    block, x = _Block(), torch.randn(2, 4)
    _, _, aliases, _ = bg.static_leaves((x,), [x], list(block.parameters()))
    with bg.capture_scope(block, aliases, [], "cpu", True, torch.bfloat16):
        assert linear_module._host_once() and not torch.is_autocast_cache_enabled()
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        block(x)
    assert len(calls) == 1 and calls[0] is aliases[id(block.fc.weight)]
    assert not linear_module._host_once() and torch.is_autocast_cache_enabled() and not torch.is_autocast_enabled("cpu")
    assert block.fc.weight is not aliases[id(block.fc.weight)]
    block(x)
    assert len(calls) == 1


def test_cpu_double_replays_match_eager_steps(cpu_graphs):
    """With the CPU double the replay path (input copies, one node a block, gradients routed to inputs and
    parameters) gives eager's loss and gradients, and the schedule captures on the third call."""
    model, x = _pvt(), torch.randn(2, 3, 64, 64)
    twin = copy.deepcopy(model)
    for step in range(4):
        results = []
        for m, enabled in ((model, True), (twin, False)):
            bg.use_block_graphs(enabled)
            m.zero_grad(set_to_none=True)
            loss = m(x * (step + 1)).square().mean()
            loss.backward()
            results.append([loss.detach()] + [p.grad for p in m.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        stats = bg.block_graph_stats()
        assert stats["captures"] == (8 if step >= 2 else 0) and stats["replays"] == 8 * max(0, step - 1), stats


def test_cpu_double_shared_parameter_gets_its_gradient_once(cpu_graphs):
    """A parameter two layers of a block share is one input of the replay: its gradient is eager's, not twice it."""
    block = _Block()
    block.fc2 = nn.Linear(4, 4)
    block.fc2.weight = block.fc.weight

    def fn(x):
        return block.fc2(block(x)[0])

    twin = copy.deepcopy(block)
    x = torch.randn(3, 4)
    for _ in range(4):
        block.zero_grad(set_to_none=True)
        bg.run_block(block, fn, x).square().sum().backward()
    twin_out = twin.fc2(twin(x)[0])
    twin_out.square().sum().backward()
    assert bg.block_graph_stats()["replays"] == 2
    torch.testing.assert_close(block.fc.weight.grad, twin.fc.weight.grad, rtol=1e-6, atol=1e-7)


def test_cpu_double_bookkeeping(cpu_graphs):
    """A second forward before the backward runs eagerly; a dropped forward frees the graphs; a backward after a
    newer replay raises."""
    model, x = _pvt(), torch.randn(2, 3, 64, 64)
    for _ in range(3):
        model(x).sum().backward()
    bg.block_graph_stats(reset=True)
    loss = model(x).sum() + model(x).sum()
    assert bg.block_graph_stats()["eager_busy"] == 8
    loss.backward()
    out = model(x)
    del out
    model(x).sum().backward()
    assert bg.block_graph_stats()["eager_busy"] == 8
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="newer replay of that block overwrote its activations"):
        loss.backward()


def test_compiled_training_forward_traces_through_run_block_with_graphs_on():
    """With block graphs on, ``torch.compile`` traces the block loops without a graph break (run_block sees the
    trace and calls the block), and the forward equals eager."""
    model, x = _pvt(), torch.randn(2, 3, 64, 64)
    with bg.block_graphs():
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------------
# GPU


def _steps(model, batches, graphs: bool, amp: bool, lr: float = 0.05):
    """SGD steps on ``batches``: per step, the loss and every parameter's gradient. Every linear layer (in captured
    blocks or not) sums its bias gradient with zoo.ops.linear's kernel, so that steps with and without graphs run the
    same kernels (that kernel's sums against ATen's: tests/ops/test_linear.py)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    with bg.block_graphs(graphs), linears_as_op():
        for x in batches:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = model(x).float().square().mean()
            loss.backward()
            out.append([loss.detach().clone()] + [p.grad.clone() for p in model.parameters()])
            optimizer.step()
    return out


def _captured_pvt(amp: bool, drop_path_rate: float = 0.0, batch: int = 2):
    """Agent-PVT-T on CUDA whose blocks were captured (three SGD steps on one batch), and that batch."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_pvt_tiny", num_classes=10, drop_path_rate=drop_path_rate).cuda().train()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    _steps(model, [x, x, x], True, amp)
    return model, x


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_steps_match(graphed, eager, eager_again, what: str):
    """Every step's loss and gradients with graphs against eager ones, within 1e-5 of each tensor's largest value
    plus twice what two eager runs differ by (atomics). A tensor whose two eager runs differ by a tenth of its size or
    more is rounding noise, a gradient that is zero in exact arithmetic (a bias before a BatchNorm): the graphed one
    must be noise of that size too, at most four times the larger eager one."""
    for step, (a_step, b_step, c_step) in enumerate(zip(graphed, eager, eager_again)):
        for i, (a, b, c) in enumerate(zip(a_step, b_step, c_step)):
            size, floor = b.abs().max().item(), (c - b).abs().max().item()
            if floor >= 0.1 * size:
                noise = max(size, c.abs().max().item())
                assert a.abs().max().item() <= 4 * noise, \
                    f"{what}, step {step}, tensor {i}: {a.abs().max():.3g} where eager runs give noise of {noise:.3g}"
                continue
            off = (a - b).abs().max().item()
            assert off <= 1e-5 * size + 2 * floor, \
                f"{what}, step {step}, tensor {i}: off by {off:.3g} (eager runs: {floor:.3g}; max {size:.3g})"


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_gpu_graphed_training_steps_match_eager(name, amp, no_tf32):
    """Five SGD steps with block graphs against the same steps run eagerly from the same weights: the losses and
    every gradient, each step (the first two steps run eagerly, the third captures, the rest replay). cuDNN takes
    its deterministic algorithms: with the others (atomic sums), two eager float32 runs of BiFormer-T gave its stem
    BatchNorm's bias gradient 2.9e-10 apart and the graphed run 8.7e-10 from one of them (at most 1.5e-5)."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=10, drop_path_rate=0.0).cuda().train()
    twins = copy.deepcopy(model), copy.deepcopy(model)
    size = model.pretrained_cfg["input_size"]
    batches = [torch.randn(2, *size, device="cuda") for _ in range(5)]
    bg.block_graph_stats(reset=True)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                    allow_tf32=torch.backends.cudnn.allow_tf32):
        graphed = _steps(model, batches, True, amp)
        stats = bg.block_graph_stats()
        eager = [_steps(twin, batches, False, amp) for twin in twins]
    assert stats["captures"] > 0 and stats["replays"] == 3 * stats["captures"], stats
    assert stats["capture_failures"] == 0 and stats["eager_busy"] == 0, stats
    _assert_steps_match(graphed, *eager, name)


@pytest.mark.gpu
def test_gpu_second_forward_before_backward_runs_eagerly():
    """Two forwards of one model before one backward (two views of a batch): the second runs eagerly, and the
    gradients equal those of the model without graphs (both inside linears_as_op, as in _steps)."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_pvt_tiny", num_classes=10, drop_path_rate=0.0).cuda().train()
    twin = copy.deepcopy(model)
    a, b = torch.randn(2, 2, 3, 224, 224, device="cuda")
    _steps(model, [a, a, a], True, True, lr=0.0)  # captured (the weights unchanged: the twin's)
    bg.block_graph_stats(reset=True)
    grads = []
    for m, enabled in ((model, True), (twin, False)):
        m.zero_grad(set_to_none=True)
        with bg.block_graphs(enabled), linears_as_op(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(a).float().square().mean() + m(b).float().square().mean()
        loss.backward()
        grads.append([p.grad for p in m.parameters()])
        if enabled:
            stats = bg.block_graph_stats()
    assert stats["replays"] > 0 and stats["eager_busy"] == stats["replays"], stats
    worst = max(_max_rel(g, h) for g, h in zip(*grads))
    assert worst <= 1e-5, worst


@pytest.mark.gpu
def test_gpu_graphs_are_free_again_when_a_forward_is_dropped():
    """A training forward whose autograd graph is dropped without a backward frees the block's graphs."""
    model, x = _captured_pvt(True)
    bg.block_graph_stats(reset=True)
    with bg.block_graphs(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        del out
        model(x).sum().backward()
    stats = bg.block_graph_stats()
    assert stats["eager_busy"] == 0 and stats["replays"] > 0, stats


@pytest.mark.gpu
def test_gpu_backward_after_a_newer_replay_raises():
    model, x = _captured_pvt(False)
    assert bg.block_graph_stats(reset=True)["captures"] == 8
    with bg.block_graphs():
        loss = model(x).sum()
        loss.backward(retain_graph=True)
        model(x).sum().backward()
        assert bg.block_graph_stats() == {"captures": 0, "replays": 16, "eager_busy": 0, "capture_failures": 0}
        with pytest.raises(RuntimeError, match="newer replay of that block overwrote its activations"):
            loss.backward()


@pytest.mark.gpu
def test_gpu_moved_parameters_are_captured_again():
    """New parameter storage (``p.data = ...``) is a new key: captured again, and the steps still match eager."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_tiny", num_classes=10, drop_path_rate=0.0).cuda().train()
    twin = copy.deepcopy(model)
    batches = [torch.randn(2, 3, 224, 224, device="cuda") for _ in range(4)]
    twin_again = copy.deepcopy(model)
    _steps(model, batches, True, True)
    _steps(twin, batches, False, True)
    _steps(twin_again, batches, False, True)
    for p in model.parameters():
        p.data = p.data.clone()
    bg.block_graph_stats(reset=True)
    graphed = _steps(model, batches, True, True)
    assert bg.block_graph_stats()["captures"] == 12
    _assert_steps_match(graphed, _steps(twin, batches, False, True), _steps(twin_again, batches, False, True),
                        "moved")


@pytest.mark.gpu
def test_gpu_stochastic_depth_draws_anew_at_every_replay():
    """With stochastic depth a replayed block draws new masks every step: the same seed gives the same output,
    another seed another one."""
    model, x = _captured_pvt(False, drop_path_rate=0.5, batch=4)
    outs = []
    with bg.block_graphs():
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            out = model(x)
            out.sum().backward()
            outs.append(out.detach())
    assert bg.block_graph_stats()["replays"] > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[2])
