"""What one eager inference forward or training step of a zoo model launches on the fast path, counted on the CPU.

Run as a script in a process started with ``TRITON_INTERPRET=1`` (and ``ZOO_OPS_BACKEND`` naming the Triton
backends to take): CPU tensors then take the Python of the CUDA path (dispatch, caches, plans, launch arguments),
while every Triton launch is recorded instead of run. Prints one JSON object: model name -> {"triton": {kernel:
launches}, "aten": {op: calls not made inside another ATen op}, "casts": dtype conversions, and for an inference
forward "plans": {"planned" or why not: op calls recorded for a call plan (zoo.ops.triton.call_plans)} and
"module_reads": calls of ``nn.Module.__getattr__``, for a training step "plans": the same of its autograd Functions'
bodies}. Usage::

    launch_census.py {infer,train} NAME=KWARGS_JSON ...

Only the counts mean anything: the stubbed kernels write nothing, so the values flowing on are uninitialized.
"""
from __future__ import annotations

import collections
import ctypes
import json
import sys
import types

import torch

# The ATen ops counted where Python or an autograd node calls them directly (not inside another ATen op): on a GPU
# each is a kernel launch or more, which the host-bound eager step pays for (views, allocations and casts, counted
# apart, are left out).
COMPUTE_OPS = frozenset({
    "linear", "addmm", "matmul", "bmm", "mm", "add", "add_", "sub", "mul", "mul_", "div", "div_", "cat", "stack",
    "conv2d", "layer_norm", "gelu", "softmax", "mean", "sum", "avg_pool2d", "adaptive_avg_pool2d", "pad",
    "constant_pad_nd", "roll", "contiguous", "clone", "copy_", "upsample_bilinear2d", "index", "gather"})

# The ops under which autocast casts its operands (the float16 list's, as these models call them)
_AUTOCAST_OPS = frozenset({"aten::linear", "aten::conv2d", "aten::matmul", "aten::bmm", "aten::mm", "aten::addmm"})


class _Recorder:
    """Stands in for a kernel's launcher: ``launcher[grid](*args)`` counts one launch of ``name``, and hands it to
    the call being recorded for a plan (zoo.ops.triton.call_plans) as the C++ launcher's launches are."""

    def __init__(self, name: str, counts: collections.Counter) -> None:
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            from zoo.ops.triton import fast_launch

            self.counts[self.name] += 1
            recording = fast_launch._recorder
            if recording is not None:
                recording[1].append((0, grid, args, None, (lambda: 0, lambda device: 0), 0))
        return launch


class _RecordingLaunchers(dict):
    """A drop-in for ``zoo.ops.triton._LAUNCHERS`` (kernel id -> (kernel, launcher)) whose launchers record."""

    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def get(self, key, default=None):
        entry = dict.get(self, key)
        if entry is None:
            kernel = ctypes.cast(key, ctypes.py_object).value  # the id of a live kernel (``direct`` holds it)
            fn = getattr(kernel, "fn", kernel)
            name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
            entry = self[key] = (kernel, _Recorder(name, self.counts))
        return entry


def _top_level_ops(events) -> collections.Counter:
    counts = collections.Counter()
    for event in events:
        if not event.name.startswith("aten::") or event.name[6:] not in COMPUTE_OPS:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name[6:]] += 1
    return counts


def _casts(events) -> int:
    """The dtype conversions that copy where a GPU makes them too: ``.to(dtype)`` calls, autocast's casts and those
    of autograd's backward nodes. Not those CPU kernels make inside other ops (CPU arithmetic, concatenation and
    reductions on float16 convert their operands first; CUDA's kernels convert as they read)."""
    def caller(event):
        parent = event.cpu_parent
        while parent is not None and parent.name in ("aten::to", "aten::_to_copy"):
            parent = parent.cpu_parent
        return parent

    def on_gpu_too(event) -> bool:
        above = caller(event)
        return above is None or not above.name.startswith("aten::") or above.name in _AUTOCAST_OPS

    return sum(event.name == "aten::_to_copy" and on_gpu_too(event) for event in events)


def census(mode: str, name: str, kwargs: dict) -> dict:
    """The counts of the second of two eager float16-autocast steps (the first fills the caches) of
    ``zoo.create_model(name, **kwargs)`` on one image of its input size: an inference forward (``mode`` "infer") or a
    forward and the backward of its logits' sum (``mode`` "train")."""
    import zoo
    from zoo.ops import triton as zoo_triton
    from torch.profiler import ProfilerActivity, profile

    launches = collections.Counter()
    zoo_triton._LAUNCHERS = _RecordingLaunchers(launches)
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).train(mode == "train")
    x = torch.randn(1, *model.pretrained_cfg["input_size"])

    def step() -> None:
        # float16: Triton's interpreter mishandles bfloat16 (the GPU runs bf16 through the same Python). One autocast
        # region a step, as in a loop of them: autocast's own cache of weight casts lasts one region.
        with torch.set_grad_enabled(mode == "train"):
            with torch.autocast("cpu", dtype=torch.float16):
                y = model(x)
            if mode == "train":
                y.float().sum().backward()
                model.zero_grad(set_to_none=True)

    step()
    launches.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    result = {"triton": dict(sorted(launches.items())), "aten": dict(sorted(_top_level_ops(events).items())),
              "casts": _casts(events)}
    result["plans"] = _plan_outcomes(step, steps=1 if mode == "infer" else 2)
    if mode == "infer":
        result["module_reads"] = _module_reads(step)
    return result


def _module_reads(step) -> int:
    """The calls of ``nn.Module.__getattr__`` (an attribute that names a submodule, a parameter or a buffer, read as
    ``self.name``: a Python function, 0.70 us a call on this repository's CPU) in one more step."""
    reads = [0]
    original = torch.nn.Module.__getattr__

    def counted(module, name):
        reads[0] += 1
        return original(module, name)

    torch.nn.Module.__getattr__ = counted
    try:
        step()
    finally:
        torch.nn.Module.__getattr__ = original
    return reads[0]


# Stands in for the C++ extension where plans are registered (the census only asks whether a call has one)
_PLAN_EXTENSION = types.SimpleNamespace(register_plan=lambda *args: 0, current_context=lambda: 0,
                                        release_plan=lambda index: None, replay=lambda *args: None)


def _plan_outcomes(step, steps: int = 1) -> dict[str, int]:
    """With call plans on, ``steps`` more steps, the last recording its op calls (their choices remembered by now)
    and, in training, its autograd Functions' bodies (``zoo.ops._dispatch.planned``, which records a body the second
    time it sees its key): how many got a plan ("planned") and, by reason, how many did not."""
    from zoo.ops import _dispatch
    from zoo.ops.triton import call_plans

    outcomes = collections.Counter()
    record = call_plans.record

    def noted(ext, fn, args, kwargs):
        out, plan, retry = record(ext, fn, args, kwargs)
        outcomes[plan if isinstance(plan, str) else "planned"] += 1
        return out, plan, retry

    call_plans.record = noted
    _dispatch.use_call_plans(call_plans, _PLAN_EXTENSION, bodies=True)
    try:
        for _ in range(steps):
            step()
    finally:
        call_plans.record = record
        _dispatch.use_call_plans(None)
    return dict(outcomes)


def main(mode: str, specs: list[str]) -> None:
    import warnings

    # a forced backend that cannot serve a call falls back with this warning: the census would count another path
    warnings.filterwarnings("error", message=".*cannot serve this input")
    results = {}
    for spec in specs:
        name, _, kwargs = spec.partition("=")
        results[name] = census(mode, name, json.loads(kwargs or "{}"))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
