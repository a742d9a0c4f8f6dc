"""``zoo bench``: model throughput, latency and peak memory (inference and training step); ``zoo bench ops`` for ops.

Examples::

    zoo bench biformer_tiny agent_swin_t --batch-sizes 1,64 --dtype fp32,bf16 --train --out bench/
    zoo bench resnet50 --compile --channels-last --device cuda
    zoo bench biformer_tiny --dtype bf16 --batch-sizes 128 --train --compile --compile-mode reduce-overhead
    zoo bench volo_d1_224 zoo_volo_d1_224 --dtype bf16 --batch-sizes 128 --ops-backend auto,reference --with-compile
    zoo bench official_agent_swin_t agent_swin_t --import my_official_models --dtype bf16 --batch-sizes 128
    zoo bench agent_swin_s --dtype bf16 --batch-sizes 64 --train --no-infer --compile --compile-mode reduce-overhead \
        --optimizer fused --rounds 5 --device-time
    zoo bench ops ...            (delegates to zoo.ops.bench)

Each (model, dtype, batch size, mode) is timed after warm-up iterations, with the device synchronized around every
iteration (``--no-step-sync``: once after the last of them, see below). ``dtype`` bf16/fp16 means autocast (mixed
precision, as in training), fp32 means no autocast. Peak memory is the CUDA allocator's peak during the timed
iterations (not measured on CPU). Results go to a table on stdout and to ``OUT/bench.csv`` and ``OUT/bench.json``
(with the environment: torch version, device name).
Training steps take AdamW outside any compiled graph: ``--optimizer default`` (torch's choice) or ``fused`` (one
launch a step; a compiled step's wall time then stays close to its kernel time).
``--step-graph`` (CUDA) captures each training step whole in one CUDA graph after a few eager steps: the forward, the
loss, ``backward()`` and a fused, capturable AdamW step; each timed step copies the batch into the graph's input and
replays it. The host then does the same two calls a step for any model, where an ordinary step's host work grows with
the model's parameters (AdamW's and autograd's work for each) and its graph's launches: at batch 64 on the H200
machine a compiled Agent-DeiT step took more host time than kernel time on either side, so two models' ratio read
the host's, not theirs. It takes ``--compile-mode`` ``default`` or ``max-autotune-no-cudagraphs`` (the other modes
replay graphs of their own) and no ``--block-graphs``.
``--device-time`` adds ``device_ms``, the summed kernel time of one step (CUDA, from one more, profiled pass): where
``latency_ms`` is well above it, the host (Python, launches) bounds the step and faster kernels will not show.
``--host-profile N`` shows where that host time goes: one more profiled pass per row gives, in a second table, the N
operators that took the most host time a step (self CPU time as ``torch.profiler`` counts it, and calls a step; on
CUDA the runtime's launch calls, ``cudaLaunchKernel`` and the like, rank among them with their counts): run it on an
official model beside zoo's to see what one step does more than the other. On CUDA a third table gives the same
pass's N kernels with the most device time a step (``device_ms``, launches a step): where two models' kernel time
differs.
``--host-phases`` times, without a profiler, the host's work in each phase of a step begun on an idle device:
``host_fwd_ms`` (the forward; with the loss for training), ``host_bwd_ms`` (``backward()``) and ``host_opt_ms`` (the
optimizer step), and counts a training step's ``autograd_nodes``. A training step whose phases add up to about its
latency is bound by the host; on the H200 machine an eager one costs the host tens of microseconds an operator call,
so two models' node and launch counts tell more than their kernels do.

``--ops-backend auto,reference`` runs every model once per choice of attention backend (``auto``: the dispatch's
choice; a name forces that backend on every ``zoo.ops`` op that has it), ``--with-compile`` times eager and
``torch.compile`` models in the same process; ``--compile-mode`` is ``torch.compile``'s ``mode`` (``reduce-overhead``
replays CUDA graphs: on a fast GPU the eager and the default compiled models are bound by host time, not by their
kernels, so their speeds hide what the kernels gain). ``x_base`` is each row's images/s over the baseline row's, the
baseline being the first model, eager, first ops backend, at the same mode, dtype and batch size: list a timm model
first to read every zoo row against it.

``--no-pointwise-autotune`` gives every pointwise kernel inductor generates its first heuristic launch configuration
instead of the one autotuning picks when it compiles: identical kernels of two compiled models then run alike. With
autotuning, the pick is a draw that inductor caches on disk: on the H200, compiled VOLO-D1 at batch 128 ran the same
in-place GELU kernel (28.9M bf16 values) at 42.8 us in one model and at 59-60 us in the other, in either direction,
0.24 ms of a 9 ms step (the ratio of timm's to zoo's time read 1.46 or 1.53; 1.50 with this flag).

``--rounds N`` (N > 1) times every configuration in N rounds that take the models in turn and reports the median
round, with ``latency_spread`` ((slowest - fastest round) / median): on a shared host whose speed drifts, back-to-back
runs of one model after another can differ by more than the models do. The tables print at the end; as each round of
each model (each row, without ``--rounds``) is timed, one line goes to stderr, so a run stopped by a time limit still
shows what it measured.

``--no-step-sync`` runs each round's iterations back to back and synchronizes once after the last, as a training or
serving loop does: the host then queues the next step while the GPU runs the current one, so a step whose host work
is shorter than its kernels costs only its kernel time. Synchronizing every step adds the host's share of each step
to it instead (on the H200 machine about 1.2 ms a compiled VOLO-D1 training step, for both models). Each iteration of
a round is then credited with the round's mean, so there are no per-step percentiles (``latency_p50_ms`` and
``latency_p90_ms`` are left empty).

``latency_ms`` (and images/s) is a mean over iterations, ``latency_p50_ms`` their median. They part where the host
slows in episodes: on the H200 machine a host-bound model's iterations (eager Agent-Swin-S inference, 12.1 ms) ran
at 18 ms for four to seven in a row, twice in three rounds, while the GPU-bound official model beside it held
37.0 ms; the mean showed those episodes (20.3 ms), the median did not.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["add_baseline_ratios", "bench_interleaved", "bench_model", "build_parser", "format_table", "host_profile",
           "host_rows", "kernel_rows", "main", "ops_backend", "pointwise_autotune", "time_fn", "top_kernels",
           "train_optimizer", "train_step_graph"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHS_SUFFIX = "+graphs"  # an ops backend with block graphs on (--block-graphs)
OPTIMIZERS = ("default", "fused")
STEP_GRAPH_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # the others capture CUDA graphs of their own
_TRAIN = {"optimizer": "default", "step_graph": False}  # set by train_optimizer() and train_step_graph()
_TIMING = {"step_sync": True}  # set by step_sync()
COLUMNS = ["model", "ops", "compile", "mode", "dtype", "batch_size", "img_size", "images_per_s", "x_base",
           "latency_ms", "latency_p50_ms", "latency_p90_ms", "rounds", "latency_spread", "device_ms", "host_fwd_ms",
           "host_bwd_ms", "host_opt_ms", "autograd_nodes", "peak_mem_mib", "params_m", "channels_last", "device",
           "error"]
PHASE_COLUMNS = ("host_fwd_ms", "host_bwd_ms", "host_opt_ms", "autograd_nodes")  # --host-phases only
HOST_COLUMNS = ["model", "ops", "compile", "mode", "dtype", "batch_size", "rank", "host_op", "self_cpu_ms", "calls"]
KERNEL_COLUMNS = ["model", "ops", "compile", "mode", "dtype", "batch_size", "rank", "kernel", "device_ms", "calls"]


def format_table(rows: list[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    """A plain-text table (header, rule, rows) with left-aligned columns sized to their content."""
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _csv_list(text: str, name: str, cast: Callable[[str], Any] = str, allowed: Iterable[Any] | None = None) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a comma-separated list") from None
    if not values:
        raise ValueError(f"{name}={text!r} is empty")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name}={text!r}: {bad} not accepted; accepted: {list(allowed)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The ``zoo bench`` (models) argument parser."""
    p = argparse.ArgumentParser(prog="zoo bench", description="Benchmark models (images/s, latency, peak memory). "
                                "`zoo bench ops ...` benchmarks the attention ops.")
    p.add_argument("models", nargs="+", help="zoo or timm model names")
    p.add_argument("--import", dest="imports", default=None, metavar="MODULES",
                   help="comma-separated Python modules to import first, e.g. one that registers your own timm "
                        "models (an official implementation to time beside zoo's)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8,64")
    p.add_argument("--dtype", default="fp32", help="comma-separated from fp32,bf16,fp16 (bf16/fp16 = autocast)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's pretrained_cfg)")
    p.add_argument("--model-kwargs", default=None, help="JSON dict of constructor arguments for every model")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (and training step)")
    p.add_argument("--with-compile", action="store_true", help="time both the eager and the compiled model")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled runs (reduce-overhead: CUDA graphs)")
    p.add_argument("--no-pointwise-autotune", action="store_true",
                   help="compiled runs take inductor's first heuristic launch configuration for every pointwise "
                        "kernel rather than autotuning it: the same kernel in two models then runs alike")
    p.add_argument("--ops-backend", default="auto",
                   help="comma-separated attention backends to run with: auto (dispatch's choice) or a backend name "
                        "forced on every zoo.ops op that has it, e.g. auto,reference")
    p.add_argument("--block-graphs", default="off", choices=("off", "on", "both"),
                   help="eager training of zoo models with their blocks replayed from CUDA graphs "
                        "(zoo.ops.block_graphs): on, off, or both side by side (rows whose ops column ends in "
                        "'+graphs')")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--train", action="store_true", help="also time a training step (fwd + bwd + AdamW step)")
    p.add_argument("--no-infer", action="store_true", help="skip the inference rows (with --train)")
    p.add_argument("--optimizer", default="default", choices=OPTIMIZERS,
                   help="AdamW implementation of the training step, outside any compiled graph (fused: one launch "
                        "a step)")
    p.add_argument("--step-graph", action="store_true",
                   help="capture each training step whole (forward, loss, backward, fused capturable AdamW) in one "
                        "CUDA graph and time its replays: the host's per-parameter work then no longer bounds the "
                        "step (CUDA; compile mode default or max-autotune-no-cudagraphs; no --block-graphs)")
    p.add_argument("--device-time", action="store_true",
                   help="also report each step's summed kernel time (CUDA, one profiled pass more): a latency well "
                        "above it means the host, not the GPU, bounds the step")
    p.add_argument("--no-step-sync", action="store_true",
                   help="synchronize once after each round's timed steps instead of after every step, so the host "
                        "queues a step while the GPU runs the one before (as a training loop does); no per-step "
                        "percentiles")
    p.add_argument("--host-phases", action="store_true",
                   help="also time the host's work in each phase of a step (forward; a training step's backward and "
                        "optimizer step) and count a training step's autograd nodes, over --iters more calls")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="also profile one pass more per row and list the N operators that took the most host "
                        "time a step (self CPU time, calls a step), in a second table; on CUDA also the N kernels "
                        "with the most device time a step, in a third")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every configuration in this many rounds that take the models in turn, reporting the "
                        "median round (all models stay in memory; peak memory is then not reported): side-by-side "
                        "ratios then share the machine's drift")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--out", default="bench_results", help="folder for bench.csv and bench.json")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls, the device synchronized around
    each call; under ``step_sync(False)`` the calls run back to back with one synchronization after the last, and
    each is given their mean."""
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    for _ in range(max(0, warmup)):
        fn()
    _sync(device)
    if not _TIMING["step_sync"]:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        return [(time.perf_counter() - start) / iters] * iters
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def host_profile(step: Callable[[], Any], device: torch.device, iters: int, top: int) -> dict[str, Any]:
    """Where the host time of ``step`` goes, from ``iters`` profiled calls (after the timed ones: warm).

    Returns ``{"host_top": [[name, ms a call, calls a call], ...]}``: the ``top`` host events (operators, and on
    CUDA the runtime's calls such as ``cudaLaunchKernel``) with the most self CPU time a call, most first. Self time
    is what the profiler counts inside an event and outside its children, its own overhead included, so compare two
    models profiled alike rather than read the milliseconds as the step's. On CUDA also ``"kernel_top"``, the same
    profile's ``top`` kernels (and memory copies and sets) with the most device time a call (see :func:`top_kernels`).
    """
    from torch.profiler import ProfilerActivity, profile

    if top < 1:
        raise ValueError(f"top={top} must be >= 1")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        _sync(device)
    events = prof.key_averages()
    result = {"host_top": _top_events(events, torch.autograd.DeviceType.CPU, lambda e: e.self_cpu_time_total, iters,
                                      top)}
    if device.type == "cuda":
        result["kernel_top"] = top_kernels(events, iters, top)
    return result


def top_kernels(events: Iterable[Any], iters: int, top: int) -> list[list[Any]]:
    """``[[name, device ms a call, launches a call], ...]``: the ``top`` device events of a profile's
    ``key_averages()`` (kernels, memory copies and sets) over ``iters`` calls, most device time first."""
    return _top_events(events, torch.autograd.DeviceType.CUDA, _device_us, iters, top)


def _top_events(events: Iterable[Any], device_type: Any, time_us: Callable[[Any], float], iters: int,
                top: int) -> list[list[Any]]:
    """``[[name, ms a call, count a call], ...]`` of the ``top`` events on ``device_type`` by ``time_us``."""
    ranked = sorted((e for e in events if e.device_type == device_type), key=time_us, reverse=True)[:top]
    return [[e.key, time_us(e) / iters / 1e3, e.count / iters] for e in ranked]


def _device_us(event: Any) -> float:
    # torch renamed self_cuda_time_total to self_device_time_total (2.4); both name the event's own device time
    total = getattr(event, "self_device_time_total", None)
    return total if total is not None else event.self_cuda_time_total


def _check_host_top(host_top: int) -> None:
    if host_top < 0:
        raise ValueError(f"host_top={host_top} must be >= 0 (host operators to list; 0: no host profile)")


def host_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The second table of ``--host-profile``: a row per (result row, ranked host operator)."""
    return _ranked_rows(rows, "host_top", HOST_COLUMNS)


def kernel_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The third table of ``--host-profile`` on CUDA: a row per (result row, ranked kernel)."""
    return _ranked_rows(rows, "kernel_top", KERNEL_COLUMNS)


def _ranked_rows(rows: list[dict[str, Any]], field: str, columns: list[str]) -> list[dict[str, Any]]:
    """A row per (result row, entry of its ``field`` ranking): the result row's first six ``columns``, then the rank
    and the entry's name (at most 100 characters), time and count under the last three."""
    name_key, ms_key, calls_key = columns[-3:]
    return [{**{k: row.get(k) for k in columns[:6]}, "rank": rank, name_key: name[:100], ms_key: ms, calls_key: calls}
            for row in rows for rank, (name, ms, calls) in enumerate(row.get(field) or [], 1)]


def _inference_fn(model: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> Callable[[], Any]:
    model.eval()

    @torch.inference_mode()
    def step() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            return model(x)

    return step


def _batch_loss(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None,
                autocast_cache: bool | None = None) -> torch.Tensor:
    """The training steps' loss: the forward of ``x`` (B, C, H, W) under autocast to ``amp`` (None: off; its weight
    cache as torch sets it unless ``autocast_cache`` says), then the float32 cross entropy of its logits (B, classes)
    against ``target`` (B,); a scalar with its graph recorded."""
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None, cache_enabled=autocast_cache):
        return F.cross_entropy(model(x).float(), target)


class _TrainStep:
    """A training step on a fixed batch, callable: zero the gradients, the forward under autocast with a float32
    cross entropy (:meth:`loss`), ``backward()``, then AdamW's step (``--optimizer``). Its phases are separate so that
    :func:`host_phases` can time each."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None):
        model.train()
        fused = {"fused": True} if _TRAIN["optimizer"] == "fused" else {}
        self.model, self.x, self.amp = model, x, amp
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, **fused)
        self.target = torch.randint(0, _num_outputs(model), (x.shape[0],), device=x.device)

    def loss(self) -> torch.Tensor:
        """Zero the gradients and run the forward: the scalar loss, its graph recorded."""
        self.optimizer.zero_grad(set_to_none=True)
        return _batch_loss(self.model, self.x, self.target, self.amp)

    def __call__(self) -> None:
        self.loss().backward()
        self.optimizer.step()


class _GraphedTrainStep:
    """:class:`_TrainStep`'s work replayed from one CUDA graph (``--step-graph``), callable: copy the batch into the
    graph's input, then replay the forward under autocast with a float32 cross entropy, ``backward()`` and a fused,
    capturable AdamW step. ``WARMUP`` eager steps on a side stream come first (compilation, autotuning, AdamW's
    moments), then the capture, with the gradients unset so that the backward makes them in the graph's own memory
    and every replay writes them afresh. ``loss`` is the captured loss, rewritten by each replay."""

    WARMUP = 3

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None):
        if x.device.type != "cuda":
            raise ValueError(f"step graph: device {str(x.device)!r} is not accepted; a training step is captured in a "
                             f"CUDA graph, so run on a CUDA device (--device cuda)")
        model.train()
        self.model, self.amp, self.source, self.x = model, amp, x, x.clone()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True, capturable=True)
        self.target = torch.randint(0, _num_outputs(model), (x.shape[0],), device=x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # kept off the capture's stream, as CUDA graph capture asks of warm-up work
            for _ in range(self.WARMUP):
                self.optimizer.zero_grad(set_to_none=True)
                self._forward_backward_update()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward_update()

    def _forward_backward_update(self) -> torch.Tensor:
        # autocast's weight-cast cache would hand the capture casts made outside its memory pool
        loss = _batch_loss(self.model, self.x, self.target, self.amp, autocast_cache=False)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self) -> None:
        self.x.copy_(self.source)  # a loader's batch would arrive here
        self.graph.replay()


def autograd_nodes(output: torch.Tensor) -> int:
    """How many autograd nodes the graph behind ``output`` holds: every node reachable from ``output.grad_fn``
    (the parameters' ``AccumulateGrad`` nodes included), each counted once. The engine visits each of them in
    ``backward()``, and in eager code each costs host time, a kernel or not."""
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(following for following, _ in node.next_functions)
    return len(seen)


def host_phases(step: Callable[[], Any], device: torch.device, iters: int) -> dict[str, Any]:
    """Host milliseconds of a step's phases: medians over ``iters`` calls, each begun on an idle device (synchronized
    before it) and not synchronized within, so each phase's time is what the host spends issuing its work (plus any
    wait for a full launch queue).

    Returns ``host_fwd_ms`` (the call; for a training step the forward and loss), and for a training step
    (:class:`_TrainStep`) also ``host_bwd_ms`` (``backward()``: the autograd engine's walk and its launches),
    ``host_opt_ms`` (the optimizer's step) and ``autograd_nodes`` (:func:`autograd_nodes` of one forward's loss).
    Unlike ``--host-profile``, nothing is profiled, so no profiler overhead inflates them.
    """
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    phases: dict[str, list[float]] = {"host_fwd_ms": [], "host_bwd_ms": [], "host_opt_ms": []}
    nodes = None
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        if not isinstance(step, _TrainStep):
            step()
            phases["host_fwd_ms"].append(time.perf_counter() - start)
            continue
        loss = step.loss()
        forward_end = time.perf_counter()
        if nodes is None:
            nodes = autograd_nodes(loss)
        backward_start = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        step.optimizer.step()
        phases["host_fwd_ms"].append(forward_end - start)
        phases["host_bwd_ms"].append(backward_end - backward_start)
        phases["host_opt_ms"].append(time.perf_counter() - backward_end)
    _sync(device)
    result: dict[str, Any] = {k: 1e3 * statistics.median(v) if v else None for k, v in phases.items()}
    result["autograd_nodes"] = nodes
    return result


def _num_outputs(model: torch.nn.Module) -> int:
    n = getattr(model, "num_classes", 0)
    return int(n) if n else 1000


def _input_size(model: torch.nn.Module, img_size: int | None) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    return (c, img_size, img_size) if img_size else (c, h, w)


def bench_model(model_name: str, batch_sizes: list[int], dtypes: list[str], device: str | torch.device = "cpu",
                modes: tuple[str, ...] = ("infer",), img_size: int | None = None, compile: bool | str = False,
                channels_last: bool = False, warmup: int = 3, iters: int = 10,
                model_kwargs: dict[str, Any] | None = None, device_time: bool = False,
                host_top: int = 0, phases: bool = False) -> list[dict[str, Any]]:
    """One result row per (mode, dtype, batch size): images/s, mean and p90 latency, CUDA peak memory and, with
    ``device_time`` on CUDA, ``device_ms``: the summed kernel time of one step (a profiled pass after the timing);
    with ``host_top`` > 0, ``host_top`` from :func:`host_profile` (one more pass); with ``phases``, the host time of
    each phase of a step and a training step's autograd nodes (:func:`host_phases`, ``iters`` calls more).

    ``compile``: False for eager, True or a ``torch.compile`` mode name (see ``COMPILE_MODES``) to compile; the rows'
    ``compile`` column is False or the mode. A configuration that runs out of memory gets a row with ``error='OOM'``
    (one that fails otherwise, its exception) and the sweep goes on.
    """
    _check_host_top(host_top)
    device = torch.device(device)
    subject = _Subject.build(model_name, "auto", compile, device, channels_last, img_size, model_kwargs)
    rows = []
    for mode, dtype, bs in _configurations(modes, dtypes, batch_sizes):
        row = subject.row(mode, dtype, bs)
        row.update(_measure(subject.runner, mode, DTYPES[dtype], bs, subject.chw, device, channels_last, warmup,
                            iters, device_time, host_top, phases))
        rows.append(row)
    return rows


def bench_interleaved(subjects: list[tuple[str, str, bool | str]], batch_sizes: list[int], dtypes: list[str],
                      device: str | torch.device = "cpu", modes: tuple[str, ...] = ("infer",),
                      img_size: int | None = None, channels_last: bool = False, warmup: int = 3, iters: int = 10,
                      model_kwargs: dict[str, Any] | None = None, device_time: bool = False,
                      rounds: int = 3, host_top: int = 0, phases: bool = False,
                      progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows for (model, ops backend, compile) ``subjects`` whose timings share the machine's drift.

    Every configuration (mode, dtype, batch size) is timed in ``rounds`` rounds; a round takes the subjects in
    turn, ``iters`` timed iterations each (after ``warmup`` untimed ones in the first round). A row reports the median
    round's mean latency (``latency_ms``, and ``images_per_s`` from it), the p90 over all timed iterations and
    ``latency_spread``, (slowest - fastest round) / median. A host or a GPU clock that changes speed during the run
    then moves every subject alike, which back-to-back runs of one model after another do not.

    Every model stays built for the whole run, so the CUDA allocator's peak is not one model's: ``peak_mem_mib`` is
    left empty (``bench_model`` measures it). Rows come subject by subject in the order given. ``device_time``,
    ``host_top`` and ``phases`` as for :func:`bench_model`, after the last round. ``progress``, if given, gets one
    line per subject and round as it is timed (:func:`round_line`), so a run cut short still shows its rounds.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    _check_host_top(host_top)
    device = torch.device(device)
    built = [_Subject.build(name, backend, compile, device, channels_last, img_size, model_kwargs)
             for name, backend, compile in subjects]
    results: dict[tuple[int, tuple], dict[str, Any]] = {}
    for config in _configurations(modes, dtypes, batch_sizes):
        for i, result in enumerate(_interleave(built, config, device, warmup, iters, device_time, rounds,
                                               host_top, phases, progress)):
            results[i, config] = result
    return [{**subject.row(*config), **results[i, config]}
            for i, subject in enumerate(built) for config in _configurations(modes, dtypes, batch_sizes)]


def _interleave(subjects: list[_Subject], config: tuple[str, str, int], device: torch.device, warmup: int,
                iters: int, device_time: bool, rounds: int, host_top: int = 0, phases: bool = False,
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One configuration's measurements of every subject, timed in interleaved rounds (see bench_interleaved)."""
    mode, dtype, bs = config
    steps: dict[int, Callable[[], Any]] = {}
    times: dict[int, list[list[float]]] = {i: [] for i in range(len(subjects))}
    failed: dict[int, dict[str, Any]] = {}
    for round_ in range(rounds):
        for i, subject in enumerate(subjects):
            if i in failed:
                continue
            with ops_backend(subject.backend), _failures_as_rows() as failure:
                if i not in steps:
                    steps[i] = subject.step(mode, DTYPES[dtype], bs)
                times[i].append(time_fn(steps[i], device, warmup if round_ == 0 else 0, iters))
            if failure:
                failed[i] = failure
                steps.pop(i, None)
            if progress is not None:
                progress(round_line(subject, config, round_, rounds, failure.get("error") or times[i][-1]))
    out = []
    for i, subject in enumerate(subjects):
        if i in failed:
            out.append(failed[i])
            continue
        result = {**_round_summary(times[i], bs), "peak_mem_mib": None, "device_ms": None}
        if device_time and device.type == "cuda":
            from zoo.ops.bench import device_ms  # lazy, as for ``zoo bench ops``

            with ops_backend(subject.backend):
                result["device_ms"] = device_ms(steps[i], device, iters)
        if host_top:
            with ops_backend(subject.backend):
                result.update(host_profile(steps[i], device, iters, host_top))
        if phases:
            with ops_backend(subject.backend):
                result.update(host_phases(steps[i], device, iters))
        out.append(result)
    return out


def round_line(subject: _Subject, config: tuple[str, str, int], round_: int, rounds: int,
               outcome: list[float] | str) -> str:
    """One progress line of an interleaved run: the subject, its configuration and round, and the round's mean ms
    a step (``outcome``: its seconds a timed iteration) or its error."""
    mode, dtype, bs = config
    what = _subject_label(subject.name, subject.backend, subject.compile)
    result = outcome if isinstance(outcome, str) else f"{1e3 * statistics.fmean(outcome):.2f} ms a step"
    return f"round {round_ + 1}/{rounds} {mode} {dtype} batch {bs}: {what}: {result}"


def _round_summary(rounds: list[list[float]], bs: int) -> dict[str, Any]:
    """Images/s and latencies of one subject from its rounds' per-iteration seconds: images/s and ``latency_ms``
    from the median round's mean iteration; ``latency_p50_ms`` and ``latency_p90_ms`` over every iteration (None
    under ``step_sync(False)``, whose iterations are their round's mean)."""
    means = sorted(statistics.fmean(r) for r in rounds)
    median = statistics.median(means)
    pooled = sorted(t for r in rounds for t in r)
    p50 = p90 = None
    if _TIMING["step_sync"]:  # else every iteration holds its round's mean: no per-step spread to report
        p50 = 1e3 * statistics.median(pooled)
        p90 = 1e3 * pooled[min(len(pooled) - 1, round(0.9 * (len(pooled) - 1)))]
    return {"images_per_s": bs / median, "latency_ms": 1e3 * median, "latency_p50_ms": p50, "latency_p90_ms": p90,
            "rounds": len(rounds), "latency_spread": (means[-1] - means[0]) / median}


@contextlib.contextmanager
def _failures_as_rows() -> Iterator[dict[str, Any]]:
    """Turn a configuration's OOM or error into its row's ``error`` (filled into the yielded dict): one
    configuration failing (e.g. BatchNorm at batch 1) ends no sweep."""
    failure: dict[str, Any] = {}
    try:
        yield failure
    except torch.cuda.OutOfMemoryError:
        failure["error"] = "OOM"
    except (RuntimeError, ValueError) as e:
        failure["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class _Subject:
    """A model built for benchmarking: under one ops backend, eager or compiled."""

    def __init__(self, name: str, backend: str, compile: bool | str, runner: Any, chw: tuple[int, int, int],
                 params_m: float, channels_last: bool, device: torch.device):
        self.name, self.backend, self.compile, self.runner = name, backend, compile, runner
        self.chw, self.params_m, self.channels_last, self.device = chw, params_m, channels_last, device

    @classmethod
    def build(cls, name: str, backend: str, compile: bool | str, device: torch.device, channels_last: bool,
              img_size: int | None, model_kwargs: dict[str, Any] | None) -> _Subject:
        import zoo

        if compile is True:
            compile = "default"
        if compile is not False and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: pass False, True or one of {list(COMPILE_MODES)}")
        model = zoo.create_model(name, **dict(model_kwargs or {})).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        runner = torch.compile(model, mode=compile) if compile else model
        return cls(name, backend, compile, runner, _input_size(model, img_size), params_m, channels_last, device)

    def row(self, mode: str, dtype: str, bs: int) -> dict[str, Any]:
        """A result row of this subject at one configuration, its measurements not yet filled in."""
        return {"model": self.name, "ops": self.backend, "mode": mode, "dtype": dtype, "batch_size": bs,
                "img_size": self.chw[-1], "params_m": round(self.params_m, 3), "compile": self.compile,
                "channels_last": self.channels_last, "device": str(self.device), "images_per_s": None,
                "latency_ms": None, "latency_p90_ms": None, "rounds": 1, "latency_spread": None, "device_ms": None,
                "peak_mem_mib": None, "error": None}

    def step(self, mode: str, amp: torch.dtype | None, bs: int) -> Callable[[], Any]:
        """One inference or training step on a fixed random batch."""
        return _step_fn(self.runner, mode, amp, bs, self.chw, self.device, self.channels_last)


def _configurations(modes: Iterable[str], dtypes: Iterable[str], batch_sizes: Iterable[int]) -> list[tuple]:
    """(mode, dtype, batch size) in the rows' order."""
    return [(m, d, b) for m in modes for d in dtypes for b in batch_sizes]


def _step_fn(model: torch.nn.Module, mode: str, amp: torch.dtype | None, bs: int, chw: tuple[int, int, int],
             device: torch.device, channels_last: bool) -> Callable[[], Any]:
    x = torch.randn(bs, *chw, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if mode != "train":
        return _inference_fn(model, x, amp)
    return (_GraphedTrainStep if _TRAIN["step_graph"] else _TrainStep)(model, x, amp)


def _measure(model: torch.nn.Module, mode: str, amp: torch.dtype | None, bs: int, chw: tuple[int, int, int],
             device: torch.device, channels_last: bool, warmup: int, iters: int,
             device_time: bool = False, host_top: int = 0, phases: bool = False) -> dict[str, Any]:
    with _failures_as_rows() as failure:
        fn = _step_fn(model, mode, amp, bs, chw, device, channels_last)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = time_fn(fn, device, warmup, iters)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        kernels = None
        if device_time and device.type == "cuda":
            from zoo.ops.bench import device_ms  # lazy, as for ``zoo bench ops``

            kernels = device_ms(fn, device, iters)
        host = host_profile(fn, device, iters, host_top) if host_top else {}
        if phases:
            host.update(host_phases(fn, device, iters))
        del fn
    if failure:
        return failure
    return {**_round_summary([times], bs), "latency_spread": None, "peak_mem_mib": peak, "device_ms": kernels,
            **host}


@contextlib.contextmanager
def train_optimizer(kind: str) -> Iterator[None]:
    """The AdamW implementation of the training steps built for the duration: ``default`` (torch's choice: the
    multi-tensor ``foreach`` kernels on CUDA, several launches an op) or ``fused`` (one fused kernel launch a step per
    parameter group: least host time, so a compiled step's wall time stays close to its kernel time)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer={kind!r}: choose one of {list(OPTIMIZERS)}")
    with _setting(_TRAIN, "optimizer", kind):
        yield


@contextlib.contextmanager
def train_step_graph(enabled: bool) -> Iterator[None]:
    """Whether the training steps built for the duration are captured whole in one CUDA graph and replayed
    (:class:`_GraphedTrainStep`, ``--step-graph``) or run as ordinary steps (False, the default)."""
    with _setting(_TRAIN, "step_graph", bool(enabled)):
        yield


@contextlib.contextmanager
def step_sync(enabled: bool) -> Iterator[None]:
    """Whether :func:`time_fn` synchronizes the device after every timed call (True, the default: per-step latencies)
    or only after the last (False: back-to-back steps, as a training loop runs them), for the duration."""
    with _setting(_TIMING, "step_sync", bool(enabled)):
        yield


@contextlib.contextmanager
def _setting(store: dict[str, Any], key: str, value: Any) -> Iterator[None]:
    """``store[key] = value`` for the duration, the value before restored after (an error included)."""
    before = store[key]
    store[key] = value
    try:
        yield
    finally:
        store[key] = before


@contextlib.contextmanager
def pointwise_autotune(enabled: bool) -> Iterator[None]:
    """Whether inductor autotunes the launch configuration of its pointwise kernels while compiling, for the duration
    (``enabled=True`` leaves inductor's setting alone; False takes each kernel's first heuristic configuration)."""
    if enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.autotune_pointwise": False}):
        yield


@contextlib.contextmanager
def ops_backend(name: str) -> Iterator[None]:
    """Force attention backend ``name`` on every ``zoo.ops`` op that registers it (``auto``: leave dispatch alone);
    a ``+graphs`` suffix (``auto+graphs``, what ``--block-graphs`` adds) also turns block graphs on for the duration
    (:mod:`zoo.ops.block_graphs`).

    Sets ``ZOO_OPS_BACKEND`` for the duration (ops without that backend keep their automatic choice).
    """
    if name.endswith(GRAPHS_SUFFIX):
        from zoo.ops.block_graphs import block_graphs

        with block_graphs(True), ops_backend(name[:-len(GRAPHS_SUFFIX)]):
            yield
        return
    if name == "auto":
        yield
        return
    import zoo.ops  # noqa: F401  (registers every op and backend)
    from zoo.ops import _dispatch

    ops = [op for op in sorted(_dispatch._REGISTRY) if name in _dispatch._REGISTRY[op]]
    if not ops:
        known = sorted({b for backends in _dispatch._REGISTRY.values() for b in backends})
        raise ValueError(f"--ops-backend={name!r}: no op has that backend; known: {['auto', *known]}")
    old = os.environ.get("ZOO_OPS_BACKEND")
    os.environ["ZOO_OPS_BACKEND"] = ",".join(f"{op}:{name}" for op in ops)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ZOO_OPS_BACKEND", None)
        else:
            os.environ["ZOO_OPS_BACKEND"] = old


def add_baseline_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``x_base`` on every row: its images/s over the first row with the same (mode, dtype, batch size).

    Rows come in the order models x ops backends x eager/compiled, so that first row is the first model, eager,
    with the first ops backend. Rows without a measurement (errors) get None.
    """
    base: dict[tuple, float | None] = {}
    for row in rows:
        key = (row["mode"], row["dtype"], row["batch_size"])
        base.setdefault(key, row.get("images_per_s"))
        ref, ips = base[key], row.get("images_per_s")
        row["x_base"] = ips / ref if ips and ref else None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def write_results(rows: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``bench.csv`` (one row per configuration) and ``bench.json`` (rows + environment) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "bench.csv", out / "bench.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    json_path.write_text(json.dumps({"environment": meta, "results": rows}, indent=2))
    return csv_path, json_path


def _import_modules(names: str | None) -> None:
    """Import each module of the comma-separated ``--import`` list (zoo, a parent package of this module, is already
    imported, so its names are taken first)."""
    if names is None:
        return
    import importlib

    if os.getcwd() not in sys.path:  # the `zoo` script, unlike `python -m`, does not search the current directory;
        sys.path.append(os.getcwd())  # appended, so that it never shadows an installed package
    for name in _csv_list(names, "--import"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"--import={names!r}: cannot import {name!r} ({e}); the module must be importable from "
                             f"the current directory or PYTHONPATH") from e


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zoo bench ARGS...`` (``zoo bench ops ...`` goes to :mod:`zoo.ops.bench`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ops":
        from zoo.ops import bench as ops_bench  # lazy: the ops benchmark pulls in Triton and friends

        return int(ops_bench.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    _import_modules(args.imports)
    batch_sizes = _csv_list(args.batch_sizes, "--batch-sizes", int)
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"--batch-sizes={args.batch_sizes!r}: every batch size must be >= 1")
    dtypes = _csv_list(args.dtype, "--dtype", str, DTYPES)
    modes = (() if args.no_infer else ("infer",)) + (("train",) if args.train else ())
    if not modes:
        raise ValueError("--no-infer without --train leaves nothing to benchmark")
    from zoo.evaluate import _parse_model_kwargs

    model_kwargs = _parse_model_kwargs(args.model_kwargs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = _csv_list(args.ops_backend, "--ops-backend", str)
    graphed = [b + GRAPHS_SUFFIX for b in backends]
    backends = {"off": backends, "on": graphed, "both": [*backends, *graphed]}[args.block_graphs]
    if args.rounds < 1:
        raise ValueError(f"--rounds={args.rounds}: must be >= 1")
    if args.host_profile < 0:
        raise ValueError(f"--host-profile={args.host_profile}: must be >= 0 (operators to list; 0: no profile)")
    compiled_mode = args.compile_mode
    compiles = (False, compiled_mode) if args.with_compile else (compiled_mode if args.compile else False,)
    if args.step_graph:
        _check_step_graph(args, compiles, device)
    subjects = [(name, backend, compiled) for name in args.models for backend in backends for compiled in compiles]
    with (pointwise_autotune(not args.no_pointwise_autotune), train_optimizer(args.optimizer),
          train_step_graph(args.step_graph), step_sync(not args.no_step_sync)):
        rows = _bench_subjects(args, subjects, batch_sizes, dtypes, device, modes, model_kwargs)
    add_baseline_ratios(rows)
    hidden = {"device", "channels_last"} | ({"rounds", "latency_spread"} if args.rounds == 1 else set())
    if not args.host_phases:
        hidden |= set(PHASE_COLUMNS)
    print(format_table(rows, [c for c in COLUMNS if c not in hidden]))
    if args.host_profile:
        print(format_table(host_rows(rows), HOST_COLUMNS))
        if any(row.get("kernel_top") for row in rows):
            print(format_table(kernel_rows(rows), KERNEL_COLUMNS))
    meta = {**environment(device), "inductor_pointwise_autotune": not args.no_pointwise_autotune,
            "train_optimizer": "fused, capturable" if args.step_graph else args.optimizer,
            "train_step_graph": args.step_graph, "step_sync": not args.no_step_sync}
    csv_path, json_path = write_results(rows, args.out, meta)
    print(f"wrote {csv_path} and {json_path}")
    return 0


def _check_step_graph(args: argparse.Namespace, compiles: tuple[bool | str, ...], device: torch.device) -> None:
    """``--step-graph``'s requirements, checked before any model is built: training steps, a CUDA device, compile
    modes that capture no graphs of their own, no block graphs."""
    if not args.train:
        raise ValueError("--step-graph captures training steps: add --train")
    if device.type != "cuda":
        raise ValueError(f"--step-graph with --device={str(device)!r}: a CUDA graph needs a CUDA device")
    if any(m is not False and m not in STEP_GRAPH_COMPILE_MODES for m in compiles):
        raise ValueError(f"--step-graph with --compile-mode={args.compile_mode!r}: that mode replays CUDA graphs of "
                         f"its own inside the step's capture; use one of {list(STEP_GRAPH_COMPILE_MODES)}")
    if args.block_graphs != "off":
        raise ValueError(f"--step-graph with --block-graphs={args.block_graphs!r}: block graphs would be captured "
                         f"inside the step's graph; pass --block-graphs off")


def _bench_subjects(args: argparse.Namespace, subjects: list[tuple[str, str, bool | str]], batch_sizes: list[int],
                    dtypes: list[str], device: torch.device, modes: tuple[str, ...],
                    model_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of every (model, ops backend, compile) subject: in turn, or in interleaved rounds (``--rounds``)."""
    if args.rounds > 1:
        return bench_interleaved(subjects, batch_sizes, dtypes, device, modes, args.img_size, args.channels_last,
                                 args.warmup, args.iters, model_kwargs, args.device_time, args.rounds,
                                 args.host_profile, args.host_phases, _progress_to_stderr)
    rows = []
    for name, backend, compiled in subjects:
        with ops_backend(backend):
            for row in bench_model(name, batch_sizes, dtypes, device, modes, args.img_size, compiled,
                                   args.channels_last, args.warmup, args.iters, model_kwargs, args.device_time,
                                   args.host_profile, args.host_phases):
                rows.append({**row, "ops": backend})
                _progress_to_stderr(row_line(rows[-1]))
    return rows


def row_line(row: dict[str, Any]) -> str:
    """One progress line of a run that times the models one after another: a finished row's result."""
    what = _subject_label(row["model"], row["ops"], row["compile"])
    result = row["error"] or f"{row['latency_ms']:.2f} ms a step, {row['images_per_s']:.1f} images/s"
    return f"{row['mode']} {row['dtype']} batch {row['batch_size']}: {what}: {result}"


def _subject_label(model: str, backend: str, compile: bool | str) -> str:
    """``model (backend)``, or ``model (backend, compiled MODE)``: who a progress line is about."""
    return f"{model} ({backend}{f', compiled {compile}' if compile else ''})"


def _progress_to_stderr(line: str) -> None:
    # stderr and flushed: a run that a time limit kills still leaves what it measured in its log
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
