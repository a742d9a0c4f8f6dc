"""What one eager inference forward of a zoo model launches on the fast path, counted on the CPU.

Run as a script in a process started with ``TRITON_INTERPRET=1`` (and ``ZOO_OPS_BACKEND`` naming the Triton
backends to take): CPU tensors then take the Python of the CUDA path (dispatch, caches, plans, launch arguments),
while every Triton launch is recorded instead of run. Prints one JSON object: model name -> {"triton": {kernel:
launches}, "aten": {op: top-level calls}, "layer_casts": the dtype conversions made inside linear and conv2d
calls (autocast's casts of their inputs, and of their weights where the layers' cached copies are not used)}. Usage::

    launch_census.py NAME=KWARGS_JSON ...

Only the counts mean anything: the stubbed kernels write nothing, so the values flowing on are uninitialized.
"""
from __future__ import annotations

import collections
import ctypes
import json
import sys

import torch

# The ATen ops counted where Python calls them directly (not inside another ATen op): on a GPU each is a kernel
# launch or more, so the host-bound eager forward pays for each (views and allocations are left out).
COMPUTE_OPS = frozenset({
    "linear", "addmm", "matmul", "bmm", "mm", "add", "add_", "sub", "mul", "mul_", "div", "div_", "cat", "stack",
    "conv2d", "layer_norm", "gelu", "softmax", "mean", "sum", "avg_pool2d", "adaptive_avg_pool2d", "pad",
    "constant_pad_nd", "roll", "contiguous", "clone", "copy_", "to", "upsample_bilinear2d", "index", "gather"})


class _Recorder:
    """Stands in for a kernel's launcher: ``launcher[grid](*args)`` counts one launch of ``name``."""

    def __init__(self, name: str, counts: collections.Counter) -> None:
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.counts[self.name] += 1
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


def _layer_casts(events) -> int:
    count = 0
    for event in events:
        if event.name != "aten::_to_copy":
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in ("aten::linear", "aten::conv2d"):
            parent = parent.cpu_parent
        count += parent is not None
    return count


def census(name: str, kwargs: dict) -> dict:
    """The counts of the second of two eager float16-autocast inference forwards (the first fills the caches) of
    ``zoo.create_model(name, **kwargs)`` on one image of its input size."""
    import zoo
    from zoo.ops import triton as zoo_triton
    from torch.profiler import ProfilerActivity, profile

    launches = collections.Counter()
    zoo_triton._LAUNCHERS = _RecordingLaunchers(launches)
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    # float16: Triton's interpreter mishandles bfloat16 (the GPU runs bf16 through the same Python). One autocast
    # region a forward, as in a loop of them: autocast's own cache of weight casts lasts one region.
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            model(x)
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast("cpu", dtype=torch.float16):
            model(x)
    events = prof.events()
    return {"triton": dict(sorted(launches.items())), "aten": dict(sorted(_top_level_ops(events).items())),
            "layer_casts": _layer_casts(events)}


def main(specs: list[str]) -> None:
    import warnings

    # a forced backend that cannot serve a call falls back with this warning: the census would count another path
    warnings.filterwarnings("error", message=".*cannot serve this input")
    results = {}
    for spec in specs:
        name, _, kwargs = spec.partition("=")
        results[name] = census(name, json.loads(kwargs or "{}"))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
