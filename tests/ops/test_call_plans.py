"""zoo.ops.triton.call_plans: an eager op call recorded once is replayed from C++ with the same allocations and
launch parameters the backend would make, and every call that a replay would get wrong takes the backend. CPU: the
extension built here, its launches handed to an observer (the packed parameters) instead of the driver, and
test_fast_launch.py's stand-in kernel; GPU: real ops and models, replayed against their backends."""
from __future__ import annotations

import struct

import pytest
import torch

pytest.importorskip("triton")
fast_launch = pytest.importorskip("zoo.ops.triton.fast_launch")
if fast_launch.knobs is None:
    pytest.skip("this triton has no knobs (< 3.4): the fast path is off", allow_module_level=True)

from zoo.ops import _dispatch  # noqa: E402
from zoo.ops.triton import call_plans, cxx_launch, override_knobs  # noqa: E402
import test_cxx_launch  # noqa: E402 (where the extension can be built)
import test_fast_launch  # noqa: E402 (its stand-ins for a kernel and the driver)
from test_fast_launch import _Param  # noqa: E402

_KINDS = [1, 1, 2, 6, 0]  # x, y: pointers; n: i32; eps: fp32; BLOCK: constexpr
_STREAM = 1234  # test_fast_launch._Driver's stream


class _TwoPointerKernel(test_fast_launch._Kernel):
    params = [_Param("x"), _Param("y"), _Param("n"), _Param("eps"), _Param("BLOCK", True)]


def _load(monkeypatch, plans: str | None):
    reason = test_cxx_launch._buildable()
    if reason is not None:
        pytest.skip(reason)
    if plans is None:
        monkeypatch.delenv("ZOO_CALL_PLANS", raising=False)
    else:
        monkeypatch.setenv("ZOO_CALL_PLANS", plans)
    cxx_launch.extension.cache_clear()  # loading it turns the keys (and the plans, if asked) on
    module = cxx_launch.extension()
    if module is None:
        pytest.fail("the extension did not build on a machine with a C++ compiler")
    return module


def _reset() -> None:
    test_cxx_launch._python_keys()  # keys in Python again, plans off
    cxx_launch.extension.cache_clear()  # the next kernel compiled loads it again, with its keys


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_plans_are_on_unless_turned_off(monkeypatch, setting):
    try:
        module = _load(monkeypatch, setting)
        assert (_dispatch._plans is not None) == (setting != "0")
        if setting != "0":
            assert _dispatch._plans[0] is call_plans and _dispatch._plans[1] is module
    finally:
        _reset()


@pytest.fixture
def ext(monkeypatch):
    """The extension with plans on and its launches observed: yields (extension, the launches it made)."""
    module = _load(monkeypatch, "1")
    assert _dispatch._plans is not None
    launches = []
    module.set_launch_observer(lambda *launch: launches.append(launch))
    monkeypatch.setattr(fast_launch, "driver", test_fast_launch._Driver)
    monkeypatch.setattr(fast_launch, "_cxx_launcher",
                        lambda compiled: (module.launch, module.register_kernel(1, 128, 0, _KINDS, 1)))
    yield module, launches
    module.set_launch_observer(None)
    _reset()


@pytest.fixture
def make_op():
    """make_op(body) -> (op, backend calls): an op whose one backend is ``body(launch, x, scale, other)``, with
    ``launch`` a FastLaunch of the stand-in kernel; called as ``op(x, scale, other=None)``."""
    names = []

    def make(body):
        name = f"plan_test_{len(names)}"
        names.append(name)
        launch, calls = fast_launch.FastLaunch(_TwoPointerKernel()), []

        def backend(x, scale, other):
            calls.append(x)
            return body(launch, x, scale, other)

        _dispatch.register_backend(name, "fast", backend, priority=10)

        def op(x, scale, other=None):
            return _dispatch.dispatch(name, None, x, scale, other=other, key=_dispatch.call_key(x, scale, other))

        return op, calls

    yield make
    for name in names:
        for table in (_dispatch._REGISTRY, _dispatch._ORDER, _dispatch._CHOICES, _dispatch._VALID, _dispatch._PLANS):
            table.pop(name, None)


def _slots(raw: bytes) -> list[bytes]:
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _transposed_rows(launch, x, scale, other):
    """Allocates (C, R), launches on its rows after the first, returns the (R, C) view."""
    y = torch.empty(x.shape[::-1], dtype=x.dtype)
    launch[(3, 2)](x if other is None else other, y[1:], x.numel(), scale, BLOCK=16)
    return y.t()


def test_the_third_call_replays_the_allocations_and_launches(ext, make_op):
    module, launches = ext
    op, calls = make_op(_transposed_rows)
    xs = [torch.randn(4, 6) for _ in range(4)]
    outs = [op(x, 0.5) for x in xs]
    assert len(calls) == 2  # the first call chose and compiled, the second recorded; the others were replays
    assert isinstance(_dispatch._PLANS["plan_test_0"][next(iter(_dispatch._PLANS["plan_test_0"]))], call_plans.Plan)
    assert len(launches) == 3  # the recorded call's launch (through the C++ launcher) and two replays
    for x, out, launch in zip(xs[1:], outs[1:], launches):
        index, *grid, stream, raw = launch
        assert grid == [3, 2, 1] and stream == _STREAM
        y = out.t()
        assert out.shape == (4, 6) and out.stride() == (1, 4) and out.dtype == x.dtype
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        # what the backend's own launch packs for these tensors, byte for byte
        assert raw == module.packed(index, x, y[1:], 24, 0.5, 16)
        slots = _slots(raw)
        assert struct.unpack("<Q", slots[1])[0] == y.data_ptr() + 4 * y.stride(0)
        assert slots[4] == bytes(8)  # the trailing scratch pointer
    assert len({out.data_ptr() for out in outs}) == 4  # each replay allocated its own output


def test_views_of_one_tensor_replay_only_while_they_still_share_it(ext, make_op):
    _, launches = ext
    op, calls = make_op(_transposed_rows)  # the kernel reads `other`, of which x was a view when recorded
    for _ in range(3):
        qkv = torch.randn(4, 18)
        op(qkv[:, :6], 0.25, other=qkv)
    assert len(calls) == 2
    qkv, elsewhere = torch.randn(4, 18), torch.randn(4, 18)
    out = op(elsewhere[:, :6], 0.25, other=qkv)  # the same metadata, but x is no longer a view of qkv
    assert len(calls) == 3 and out.shape == (4, 6)
    assert struct.unpack("<Q", _slots(launches[-1][-1])[0])[0] == qkv.data_ptr()


def test_a_pointer_of_other_alignment_takes_the_backend(ext, make_op):
    op, calls = make_op(_transposed_rows)
    for _ in range(3):
        op(torch.randn(4, 6), 0.5)
    assert len(calls) == 2
    misaligned = torch.randn(25)[1:].view(4, 6)  # 4 bytes past a 16-byte boundary, the same call key
    op(misaligned, 0.5)
    assert len(calls) == 3 and calls[-1] is misaligned


def test_autocast_state_and_current_context_are_part_of_a_replay(ext, make_op):
    op, calls = make_op(_transposed_rows)
    for _ in range(3):
        op(torch.randn(4, 6), 0.5)
    assert len(calls) == 2
    torch.set_autocast_enabled("cuda", True)  # a backend may read it (a weight's cast): not the recorded state
    try:
        op(torch.randn(4, 6), 0.5)
    finally:
        torch.set_autocast_enabled("cuda", False)
    assert len(calls) == 3
    op(torch.randn(4, 6), 0.5)
    assert len(calls) == 3


_FOREIGN = torch.randn(4, 6)


def _runs_aten_op(launch, x, scale, other):
    return _transposed_rows(launch, x, scale, other) * 2


def _reads_a_foreign_tensor(launch, x, scale, other):
    y = torch.empty_like(x)
    launch[(1,)](_FOREIGN, y, x.numel(), scale, BLOCK=16)
    return y


def _returns_a_view_of_its_argument(launch, x, scale, other):
    launch[(1,)](x, x, x.numel(), scale, BLOCK=16)
    return x.view(-1)


def _launches_nothing(launch, x, scale, other):
    return torch.empty_like(x)


def _returns_a_number(launch, x, scale, other):
    return _transposed_rows(launch, x, scale, other), x.numel()


@pytest.mark.parametrize("body", [_runs_aten_op, _reads_a_foreign_tensor, _returns_a_view_of_its_argument,
                                  _launches_nothing, _returns_a_number])
def test_calls_a_replay_would_get_wrong_take_the_backend_every_time(ext, make_op, body):
    op, calls = make_op(body)
    for _ in range(5):
        op(torch.randn(4, 6), 0.5)
    assert len(calls) == 5
    assert set(_dispatch._PLANS["plan_test_0"].values()) == {_dispatch._PLAN_TRIES}  # never recorded again


def test_a_plan_the_extension_refuses_leaves_the_call_to_the_backend(ext, make_op, monkeypatch):
    module, _ = ext

    def refuse(*args):
        raise RuntimeError("zoo call plan: 65 arguments, at most 64")

    monkeypatch.setattr(module, "register_plan", refuse)
    op, calls = make_op(_transposed_rows)
    outs = [op(torch.randn(4, 6), 0.5) for _ in range(4)]
    assert len(calls) == 4 and all(out.shape == (4, 6) for out in outs)
    assert set(_dispatch._PLANS["plan_test_0"].values()) == {_dispatch._PLAN_TRIES}


def test_calls_autograd_records_are_never_planned(ext, make_op):
    op, calls = make_op(_transposed_rows)
    x = torch.randn(4, 6, requires_grad=True)
    for _ in range(4):
        op(x, 0.5)
    assert len(calls) == 4
    with torch.no_grad():  # another memo key (grad mode): planned
        for _ in range(4):
            op(x, 0.5)
    assert len(calls) == 6


def test_a_refused_replay_launch_sends_the_call_to_the_backend_for_good(ext, make_op):
    module, _ = ext
    op, calls = make_op(_transposed_rows)
    for _ in range(3):
        op(torch.randn(4, 6), 0.5)
    assert len(calls) == 2

    def refuse(*launch):
        raise RuntimeError("zoo cxx_launch: cuLaunchKernel failed with CUDA error 201")

    module.set_launch_observer(refuse)
    out = op(torch.randn(4, 6), 0.5)  # the backend's launch falls back to Triton's launcher (the stand-in's)
    assert len(calls) == 3 and out.shape == (4, 6)
    assert set(_dispatch._PLANS["plan_test_0"].values()) == {_dispatch._PLAN_TRIES}


def test_changed_launch_knobs_forget_the_plans_and_their_slots(ext, make_op):
    module, _ = ext
    op, calls = make_op(_transposed_rows)
    for _ in range(3):
        op(torch.randn(4, 6), 0.5)
    plan = next(iter(_dispatch._PLANS["plan_test_0"].values()))
    index = plan.replay.args[0]
    del plan
    with override_knobs({}, num_warps=8):  # a backend's tiles changed: its calls are recorded again
        assert _dispatch._PLANS == {}
        with pytest.raises(IndexError):  # the dropped plan's slot was released
            module.replay(index, torch.randn(4, 6), 0.5, None)
        for _ in range(2):  # recorded again, then replayed
            op(torch.randn(4, 6), 0.5)
    assert len(calls) == 3


@pytest.fixture
def body_plans():
    """Turns the planning of autograd Function bodies on (``ext`` turned plans on) and afterwards forgets the plan
    tables of the ``planned`` bodies the tests name ``plan_body_*``."""
    _dispatch._body_plans = True
    yield
    _dispatch._body_plans = False
    for name in [name for name in _dispatch._PLANS if name.startswith("plan_body_")]:
        _dispatch._PLANS.pop(name)


def _rows_body(calls):
    launch = fast_launch.FastLaunch(_TwoPointerKernel())

    def body(x, scale):
        calls.append(x)
        return _transposed_rows(launch, x, scale, None)

    return body


def test_planned_bodies_run_twice_then_replay(ext, body_plans):
    module, launches = ext
    calls = []
    body = _rows_body(calls)
    xs = [torch.randn(4, 6) for _ in range(5)]
    outs = [_dispatch.planned("plan_body_rows", body, x, 0.5) for x in xs]
    assert len(calls) == 2  # the first call ran (it may compile), the second recorded, the rest replayed
    assert isinstance(next(iter(_dispatch._PLANS["plan_body_rows"].values())), call_plans.Plan)
    assert len(launches) == 4  # the recorded call's launch and three replays
    for x, out, launch in zip(xs[1:], outs[1:], launches):
        index, *grid, stream, raw = launch
        assert grid == [3, 2, 1] and out.shape == (4, 6) and out.stride() == (1, 4)
        assert raw == module.packed(index, x, out.t()[1:], 24, 0.5, 16)
    _dispatch.planned("plan_body_rows", body, torch.randn(5, 6), 0.5)  # another key: the body again
    assert len(calls) == 3


def test_planned_bodies_of_an_autograd_function_replay_in_training(ext, body_plans):
    _, launches = ext
    calls, grads = [], []
    body, grad_body = _rows_body(calls), _rows_body(grads)

    class Rows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return _dispatch.planned("plan_body_forward", body, x, 0.5)

        @staticmethod
        def backward(ctx, grad):
            return _dispatch.planned("plan_body_backward", grad_body, grad, 2.0)

    for _ in range(4):
        x = torch.randn(4, 6, requires_grad=True)
        y = Rows.apply(x)  # grad mode on, x requires grad: autograd records the call, its body is planned
        assert y.requires_grad and y.shape == (4, 6)
        y.backward(torch.ones(4, 6))
        assert x.grad.shape == (4, 6)
    assert len(calls) == 2 and len(grads) == 2
    assert len(launches) == 2 * 3  # each body: its recording and two replays


def test_planned_bodies_stay_unplanned_when_they_run_other_aten_ops(ext, body_plans):
    launch, calls = fast_launch.FastLaunch(_TwoPointerKernel()), []

    def body(x, scale):
        calls.append(x)
        return _runs_aten_op(launch, x, scale, None)

    for _ in range(6):
        _dispatch.planned("plan_body_aten", body, torch.randn(4, 6), 0.5)
    assert len(calls) == 6
    assert set(_dispatch._PLANS["plan_body_aten"].values()) == {_dispatch._PLAN_TRIES}


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_body_plans_are_on_unless_turned_off(monkeypatch, setting):
    try:
        if setting is None:
            monkeypatch.delenv("ZOO_TRAINING_PLANS", raising=False)
        else:
            monkeypatch.setenv("ZOO_TRAINING_PLANS", setting)
        _load(monkeypatch, "1")
        assert _dispatch._plans is not None and _dispatch._body_plans == (setting != "0")
    finally:
        _reset()


def test_planned_bodies_run_as_they_are_with_body_plans_off(ext, body_plans):
    calls = []
    _dispatch._body_plans = False
    for _ in range(4):
        out = _dispatch.planned("plan_body_unplanned", lambda x: calls.append(x) or x * 2, torch.ones(3))
    assert len(calls) == 4 and out.tolist() == [2.0, 2.0, 2.0] and "plan_body_unplanned" not in _dispatch._PLANS


def test_planned_bodies_run_as_they_are_with_plans_off(body_plans):
    _reset()
    calls = []
    for _ in range(4):
        out = _dispatch.planned("plan_body_off", lambda x: calls.append(x) or x * 2, torch.ones(3))
    assert len(calls) == 4 and out.tolist() == [2.0, 2.0, 2.0] and "plan_body_off" not in _dispatch._PLANS


def test_a_call_recorded_while_another_thread_records_never_gets_a_plan_missing_a_launch(ext, make_op, monkeypatch):
    """Thread A's call is being recorded (one of its two launches made) when thread B's call, past dispatch's check
    too, would start its own recording: B's call must run its backend unrecorded, not take over the launch
    recorder and end A's recording early (A's plan would replay one of its two launches)."""
    import threading

    _, launches = ext
    both_checked, a_launched, b_done = threading.Barrier(2, timeout=10), threading.Event(), threading.Event()

    def two_launches(launch, x, scale, other):
        y = torch.empty_like(x)
        launch[(1,)](x, y, x.numel(), scale, BLOCK=16)
        if threading.current_thread().name == "A":
            a_launched.set()
            assert b_done.wait(timeout=10)
        launch[(2,)](x, y, x.numel(), scale, BLOCK=16)
        return y

    op, calls = make_op(two_launches)
    plannable = call_plans.plannable_call

    def checked_in_turn(args, kwargs):  # both calls past dispatch's check; B goes on once A has launched once
        name = threading.current_thread().name
        if name in ("A", "B"):
            both_checked.wait()
        if name == "B":
            assert a_launched.wait(timeout=10)
        return plannable(args, kwargs)

    monkeypatch.setattr(call_plans, "plannable_call", checked_in_turn)
    xa, xb = torch.randn(4, 6), torch.randn(5, 6)
    op(xa, 0.5), op(xb, 0.5)  # each key's first call: its choice
    errors = []

    def call(x, done=None):
        try:
            op(x, 0.5)
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)
        finally:
            if done is not None:
                done.set()

    threads = [threading.Thread(target=call, args=(xa,), name="A"),
               threading.Thread(target=call, args=(xb, b_done), name="B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors and not any(thread.is_alive() for thread in threads)
    for x in (xa, xb, xa, xb):  # B's next call is recorded, the others are replays: two launches each
        before = len(launches)
        op(x, 0.5)
        assert len(launches) - before == 2, f"a call of {tuple(x.shape)} made {len(launches) - before} launches"
    assert len(calls) == 2 + 2 + 1  # the two choices, A's recording, B's unrecorded call and its recording


def test_registration_checks_the_plan(ext):
    module, _ = ext
    kernel = module.register_kernel(1, 128, 0, _KINDS, 0)
    x = torch.randn(4)
    pointer = (1, True, ((0, 0),))
    with pytest.raises(RuntimeError, match="kernel arguments"):
        module.register_plan(1, 0, lambda device: 0, 0, [], [(kernel, [1, 1, 1], [pointer])], [], True)
    with pytest.raises(RuntimeError, match="out of range"):
        module.register_plan(1, 0, lambda device: 0, 0, [x], [(kernel, [1, 1, 1], [pointer, (2, True, ((1, 0),)),
                                                                                    4, 0.5, 16])], [], True)
    with pytest.raises(RuntimeError, match="does not fit"):
        module.register_plan(1, 0, lambda device: 0, 0, [x], [(kernel, [1, 1, 1], [pointer, pointer, "four", 0.5,
                                                                                    16])], [], True)
    index = module.register_plan(1, 0, lambda device: 0, 0, [x], [(kernel, [1, 1, 1], [pointer, (2, True, ((0, 8),)),
                                                                                        4, 0.5, 16])],
                                 [(0, [4], [1], 0)], False)
    with pytest.raises(TypeError, match="2 arguments given, the plan takes 1"):
        module.replay(index, x, x)
    module.release_plan(index)
    with pytest.raises(RuntimeError, match="no plan"):
        module.release_plan(index)


def _counting(replay, log):
    return lambda *args: log.append(1) or replay(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_t", "biformer_tiny",
                                  "zoo_volo_d1_224"])
def test_gpu_models_replay_their_op_calls_bitwise(name):
    """bf16 eager inference: the fourth forward (its op calls replayed) against the same forward with plans off."""
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model(name).cuda().eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"], device="cuda")

    @torch.inference_mode()
    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)

    forward()  # compiles the kernels and loads the extension
    ext = cxx_launch.extension()
    assert ext is not None
    _dispatch.use_call_plans(call_plans, ext)
    try:
        _replayed_against_backends(forward)
    finally:
        _dispatch.use_call_plans(None)


def _replayed_against_backends(forward, bodies_only: bool = False) -> None:
    """Two calls of ``forward`` (the plans recorded), a third whose plans all replay, then one with plans off: the
    third's outputs equal it bitwise. ``bodies_only``: count only the plans of autograd Function bodies (the tables
    that ``planned`` names ``op.part``)."""
    for _ in range(2):
        forward()
    plans = [p for name, table in _dispatch._PLANS.items() if not bodies_only or "." in name
             for p in table.values() if isinstance(p, call_plans.Plan)]
    assert plans, "no autograd Function body of the model was planned" if bodies_only else "no op call was planned"
    replays = []
    for plan in plans:
        plan.replay = _counting(plan.replay, replays)
    replayed = forward()
    assert len(replays) >= len(plans)
    _dispatch.use_call_plans(None)
    expected = forward()
    torch.testing.assert_close(replayed, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_replays_launch_on_the_current_stream():
    from zoo.ops import layer_norm

    x, r = torch.randn(2, 197, 192, device="cuda"), torch.randn(2, 197, 192, device="cuda")
    w, b = torch.randn(192, device="cuda"), torch.randn(192, device="cuda")
    with torch.inference_mode():
        layer_norm(x, w, b)  # compiles the kernel and loads the extension
        _dispatch.use_call_plans(call_plans, cxx_launch.extension())
        try:
            _replayed_on_a_side_stream(x, r, w, b)
        finally:
            _dispatch.use_call_plans(None)


def _replayed_on_a_side_stream(x, r, w, b) -> None:
    from zoo.ops import add_layer_norm, layer_norm

    with torch.inference_mode():
        for _ in range(3):
            expected = layer_norm(x, w, b), add_layer_norm(x, r, w, b)
        assert any(isinstance(p, call_plans.Plan) for p in _dispatch._PLANS["layer_norm"].values())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = layer_norm(x, w, b), add_layer_norm(x, r, w, b)
        torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_threads_serving_one_model_get_the_backends_outputs():
    """Four threads run bf16 eager inference of one model at once, with plans on, from its first calls (so calls are
    recorded while other threads replay, run their backends or would record): each output equals, bitwise, the
    same forward made afterwards in one thread with plans off."""
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_tiny", embed_dim=96).cuda().eval()
    inputs = [torch.randn(2, 3, 224, 224, device="cuda") for _ in range(4)]

    @torch.inference_mode()
    def forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)

    forward(inputs[0])  # compiles the kernels and loads the extension
    torch.cuda.synchronize()
    _dispatch.use_call_plans(call_plans, cxx_launch.extension())
    try:
        outputs, errors = _forwards_in_threads(forward, inputs, rounds=6)
        planned = sum(isinstance(p, call_plans.Plan) for table in _dispatch._PLANS.values() for p in table.values())
    finally:
        _dispatch.use_call_plans(None)
    assert not errors, errors
    assert planned > 0, "no op call of the model was planned"
    for x, got in zip(inputs, outputs):
        expected = forward(x)
        for out in got:
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _forwards_in_threads(forward, inputs, rounds: int) -> tuple[list[list[torch.Tensor]], list[BaseException]]:
    """Each input's ``rounds`` forwards in a thread of its own, all started together; (outputs per input, errors)."""
    import threading

    start = threading.Barrier(len(inputs), timeout=60)
    outputs: list[list[torch.Tensor]] = [[] for _ in inputs]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                outputs[i].append(forward(inputs[i]))
            torch.cuda.synchronize()
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return outputs, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_t", "biformer_tiny",
                                  "zoo_volo_d1_224"])
def test_gpu_training_steps_replay_their_function_bodies_bitwise(name):
    """bf16 eager training: a forward and backward whose autograd Functions' bodies are replayed (``planned``)
    against the same step with plans off: the loss and every parameter's gradient, bitwise."""
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model(name).cuda().train()
    x = torch.randn(2, *model.pretrained_cfg["input_size"], device="cuda")

    def step():
        torch.manual_seed(0)  # the same stochastic-depth draws in every step (Agent-Swin's default rate is 0.1)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]

    step()  # compiles the kernels and loads the extension
    _dispatch.use_call_plans(call_plans, cxx_launch.extension(), bodies=True)
    try:
        _replayed_against_backends(step, bodies_only=True)
    finally:
        _dispatch.use_call_plans(None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_norm_training_nodes_replay_their_bodies_bitwise():
    """The triton LayerNorm's eager training node under bf16 autocast, its forward and backward replayed (the
    backward's partial sums reduced by a kernel, so the whole body plans; more partial rows than the reduction's
    32-row step) against the node with plans off: the output and the three gradients, bitwise."""
    from zoo.ops import layer_norm

    torch.manual_seed(0)
    x = torch.randn(64 * 28 * 28, 96, device="cuda", requires_grad=True)
    w, b = (torch.randn(96, device="cuda", requires_grad=True) for _ in range(2))
    g = torch.randn(64 * 28 * 28, 96, device="cuda")

    def step():
        x.grad = w.grad = b.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer_norm(x, w, b, backend="triton")
        (y.float() * g).sum().backward()
        return [y.detach(), x.grad, w.grad, b.grad]

    step()  # compiles the kernels and loads the extension
    _dispatch.use_call_plans(call_plans, cxx_launch.extension(), bodies=True)
    try:
        _replayed_against_backends(step, bodies_only=True)
        _dispatch.use_call_plans(call_plans, cxx_launch.extension(), bodies=True)
        for _ in range(2):
            step()
        assert any(isinstance(p, call_plans.Plan) for p in _dispatch._PLANS["layer_norm.backward"].values())
    finally:
        _dispatch.use_call_plans(None)
