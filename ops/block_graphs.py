"""Eager training blocks replayed from CUDA graphs: one graph for a block's forward and one for its backward.

An eager training step of these backbones waits for the host: a block's forward and backward issue some hundred
launches and autograd nodes, and on the device machines' hosts Python and the dispatcher take longer to issue them
than the GPU takes to run them (BENCHMARKS.md, sessions 81-84: the official code's step and ours both wait for the
host). With block graphs on (:func:`use_block_graphs`, or ``ZOO_BLOCK_GRAPHS=1``), the models' block loops call
:func:`run_block`, which captures a block's forward and its backward into two CUDA graphs the third time in a row it
sees the same call (the first two run eagerly: the first compiles the block's kernels and the second records their
call plans) and replays them from then on, as one autograd node a block: the forward copies the inputs into the
graph's input buffers, replays, and returns copies of its outputs; the backward copies the output gradients in,
replays and returns fresh gradients for the inputs and the block's parameters, which autograd accumulates as usual.
The GPU runs the same kernels on the same values, with one exception: the captured blocks' linear layers take
:func:`zoo.ops.linear`'s kernel for their bias gradients (:func:`~zoo.ops.linears_as_op`; the same sums in another
float32 order, faster than ATen's, with a host cost that a capture pays once). What changes is the host's work, a few
launches a block instead of hundreds.

A call is replayed only when all of these hold, and runs the block eagerly (exactly as without block graphs)
otherwise:

- grad mode is on, the input is a CUDA tensor and something the block computes needs a gradient; not while
  ``torch.compile`` traces, under a ``torch.func`` transform or a dispatch-mode tracer, nor inside another CUDA
  graph capture (``torch.compile(mode="reduce-overhead")`` captures whole steps itself);
- neither the block nor any of its submodules has forward or backward hooks, and no global module hooks are
  registered (a replay would not call them); its parameters are plain tensors that own their storage (not FSDP's
  views of a flat parameter, nor DTensors);
- the call's key matches a captured one: the tensor arguments' shapes, strides, dtypes and ``requires_grad``, the
  other arguments, the autocast state, the parameters' and buffers' storage addresses and ``requires_grad`` flags,
  the submodules' training flags and the settings that choose kernels (TF32, matmul precision, deterministic
  algorithms, cuDNN's switches, SDPA's backends, ``ZOO_OPS_BACKEND``). A block keeps graphs for at most
  :data:`MAX_GRAPHS` keys (the rest run eagerly), so multi-scale training does not capture one per size, and captures
  a key only once it has come three times with at most :data:`_RECENT` calls of the block from one to the next ("in a
  row"), so a key that comes once an epoch (a partial last batch) runs eagerly rather than taking a graph and its
  memory;
- the block's graphs are not waiting for a backward: a second forward of the block before the first one's backward
  (two views of a batch through one model, say) runs eagerly, because a replay would overwrite the activations that
  backward reads. The graphs are free again once that backward has run or its autograd graph has been freed.

Dropout and stochastic depth draw fresh random numbers on every replay (PyTorch's CUDA graphs advance the generator's
offset at each replay). Casts under autocast happen inside the graphs (autocast's weight cache is off while they are
captured, so no cast made before the capture is baked in), and the model's one cast a forward
(:mod:`zoo.ops.autocast_cache`) does not reach into a captured block. Cached constants the block reads (index
tables, masks) are held alive by its graphs.

Costs: each block's graphs keep a private memory pool holding one call's activations, its backward's temporaries and
the gradient buffers; outputs and gradients are copied out of the graphs (bandwidth, not launches). Not supported:
a second backward through the same forward after another replay of the block (``retain_graph=True`` then a new
step; it raises), and double backward (``create_graph=True``; the replayed backward is not differentiable).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._cache import functorch_transforming, keep_cached_constants, tracing
from .autocast_cache import _PLAIN, no_forward_casts
from .linear import linears_as_op
from .mlp import calls_hooks

__all__ = ["use_block_graphs", "block_graphs_enabled", "block_graphs", "forget_block_graphs", "run_block",
           "block_graph_stats", "MAX_GRAPHS"]

MAX_GRAPHS = 2  # keys a block captures at most
_CAPTURE_AT = 3  # the sighting of a key whose call is captured (module docstring)
_RECENT = 4  # the most calls of a block from one sighting of a key to the next for both to count towards its capture
_SIGHTINGS_KEPT = 16  # keys a block counts sightings of before it stops counting new ones
_CAPTURE = object()  # _graphs_for's answer: capture this call

_ENABLED = [os.environ.get("ZOO_BLOCK_GRAPHS", "0") == "1"]
_BLOCKS: weakref.WeakKeyDictionary[nn.Module, _BlockState] = weakref.WeakKeyDictionary()
_STATS = {"captures": 0, "replays": 0, "eager_busy": 0, "capture_failures": 0}
_LOCK = threading.Lock()  # one capture at a time (captures sync the device and hold the capture stream)
_STREAMS: dict[int, torch.cuda.Stream] = {}


def use_block_graphs(enabled: bool) -> None:
    """Turn block graphs on or off for every model in this process (module docstring). Graphs captured before stay
    with their blocks (and are replayed when graphs are on again) until the blocks are freed or
    :func:`forget_block_graphs` drops them.

    Args:
        enabled: True or False.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_block_graphs: enabled must be True or False, got {enabled!r}")
    _ENABLED[0] = enabled


def forget_block_graphs() -> None:
    """Drop every captured graph and sighting count (each graph's memory pool is freed once no autograd graph of a
    replay holds it)."""
    _BLOCKS.clear()


def block_graphs_enabled() -> bool:
    """Whether block graphs are on (:func:`use_block_graphs`, ``ZOO_BLOCK_GRAPHS=1``)."""
    return _ENABLED[0]


@contextlib.contextmanager
def block_graphs(enabled: bool = True) -> Iterator[None]:
    """Context manager: block graphs on (or off) inside, the previous setting restored after."""
    before = _ENABLED[0]
    use_block_graphs(enabled)
    try:
        yield
    finally:
        use_block_graphs(before)


def block_graph_stats(reset: bool = False) -> dict[str, int]:
    """Counts since the process started (or the last reset): ``captures`` (blocks captured), ``replays`` (forward
    replays), ``eager_busy`` (calls run eagerly because the block's graphs awaited a backward) and
    ``capture_failures``.

    Args:
        reset: set the counts to zero after reading them.
    """
    out = dict(_STATS)
    if reset:
        for k in _STATS:
            _STATS[k] = 0
    return out


def run_block(block: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, replayed from the block's CUDA graphs where block graphs are on and the call qualifies
    (module docstring).

    Args:
        block: the module whose parameters, buffers and submodules ``fn`` uses (nothing else may hold state that
            ``fn`` reads: a block of a backbone).
        fn: ``block`` itself or one of its bound methods (e.g. ``forward_deferred``).
        *args: ``fn``'s arguments: tensors (the first one a tensor), None, or hashable values (sizes, flags).

    Returns:
        ``fn``'s result: a tensor or a tuple of tensors (None entries allowed).
    """
    if not _ENABLED[0] or not torch.is_grad_enabled():
        return fn(*args)
    x = args[0]
    if not isinstance(x, torch.Tensor) or not _graph_device(x) or _untraceable(x):
        return fn(*args)
    found = _signature(block, args)
    if found is None:
        return fn(*args)
    key, tensors, params = found
    graphs = _graphs_for(block, key)
    if graphs is None:
        return fn(*args)
    if graphs is _CAPTURE:
        graphs = _capture(block, key, fn, args, tensors, params)
        if graphs is None:
            return fn(*args)
    if graphs.busy:
        _STATS["eager_busy"] += 1
        return fn(*args)
    _STATS["replays"] += 1
    out = _Replay.apply(graphs, *tensors, *params)
    return graphs.unflatten(out)


def _graph_device(x: torch.Tensor) -> bool:
    return x.is_cuda


def _untraceable(x: torch.Tensor) -> bool:
    return (torch.compiler.is_compiling() or tracing() or functorch_transforming()
            or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


class _BlockState:
    """What block graphs keep for one block: its calls counted so far, and per key its _Graphs, its sightings as
    (count, the call of the last one), or None where capturing it failed."""

    __slots__ = ("calls", "entries")

    def __init__(self) -> None:
        self.calls = 0
        self.entries: dict[Any, _Graphs | tuple[int, int] | None] = {}

    def captured(self) -> int:
        """How many keys have graphs."""
        return sum(isinstance(v, _Graphs) for v in self.entries.values())


def _graphs_for(block: nn.Module, key: Any) -> Any:
    """Count this call of the block and answer what it does: the key's _Graphs to replay, :data:`_CAPTURE` to
    capture it (its third sighting in a row), or None to run eagerly (a sighting before that, a failed capture, or
    the block has its most graphs or keys)."""
    state = _BLOCKS.get(block)
    if state is None:
        state = _BLOCKS[block] = _BlockState()
    state.calls += 1
    entries = state.entries
    entry = entries.get(key)
    if isinstance(entry, _Graphs):
        return entry
    if entry is None and (key in entries or len(entries) >= _SIGHTINGS_KEPT):
        return None  # its capture failed, or the block counts no more keys
    count, last = entry or (0, 0)
    count = count + 1 if count and state.calls - last <= _RECENT else 1
    if count >= _CAPTURE_AT and state.captured() >= MAX_GRAPHS:
        return None
    entries[key] = (count, state.calls)
    return _CAPTURE if count >= _CAPTURE_AT else None


def _signature(block: nn.Module, args: tuple) -> tuple[tuple, list[torch.Tensor], list[torch.Tensor]] | None:
    """(the call's key, its tensor arguments, the block's parameters that need gradients), or None where the call
    must run eagerly (hooks, unhashable arguments, nothing to differentiate)."""
    tensors, metas = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device != args[0].device:
                return None
            tensors.append(a)
            metas.append((tuple(a.shape), a.stride(), a.dtype, a.requires_grad))
        else:
            try:
                hash(a)
            except TypeError:
                return None
            metas.append(("arg", a))
    params, state, flags, seen = [], [], [], set()
    for m in block.modules():
        if calls_hooks(m):  # (its own hooks, or global ones)
            return None
        flags.append(m.training)
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:  # (a parameter shared by two layers is one input)
                if type(p) not in _PLAIN or p._is_view():
                    return None  # FSDP's views of a flat parameter, DTensors: their storage is not theirs to key on
                seen.add(id(p))
                state.append((p.data_ptr(), p.requires_grad, p.dtype))
                if p.requires_grad:
                    params.append(p)
        for b in m._buffers.values():
            if b is not None:
                state.append((b.data_ptr(), b.dtype))
    if not params and not any(t.requires_grad for t in tensors):
        return None
    device_type = args[0].device.type
    # (a disabled autocast region still sets the dtype: not part of the key then)
    amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return (tuple(metas), amp, tuple(state), tuple(flags), args[0].device, _settings()), tensors, params


def _settings() -> tuple:
    """The process settings that choose kernels, which a graph keeps as they were at its capture: TF32 and reduced-
    precision reductions, float32 matmul precision, deterministic algorithms, cuDNN's switches (on, deterministic,
    benchmark), SDPA's enabled backends and the ``ZOO_OPS_BACKEND`` override of the zoo ops' dispatch."""
    matmul, sdpa, cudnn = torch.backends.cuda.matmul, torch.backends.cuda, torch.backends.cudnn
    return (matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction,
            matmul.allow_fp16_reduced_precision_reduction, cudnn.allow_tf32, cudnn.enabled, cudnn.deterministic,
            cudnn.benchmark, torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
            sdpa.flash_sdp_enabled(), sdpa.mem_efficient_sdp_enabled(), sdpa.math_sdp_enabled(),
            sdpa.cudnn_sdp_enabled(), os.environ.get("ZOO_OPS_BACKEND"))


class _Graphs:
    """One captured call of a block: the forward and backward graphs and their static buffers."""

    def __init__(self) -> None:
        self.forward_graph = torch.cuda.CUDAGraph()
        self.backward_graph = torch.cuda.CUDAGraph()
        self.inputs: list[torch.Tensor] = []  # the tensor arguments' buffers
        self.outputs: list[torch.Tensor] = []  # the result's tensors
        self.layout: list[int | None] = []  # the result: index into outputs per entry (None for None); -1: a tensor
        self.differentiable: list[bool] = []  # per output: whether it carries a gradient
        self.grad_outputs: list[torch.Tensor] = []  # buffers for the differentiable outputs' gradients
        self.grads: list[torch.Tensor | None] = []  # per input and parameter that needs one: its gradient's buffer
        self.keep: list[Any] = []  # what the graphs read that nothing else is sure to hold (cached constants, ...)
        self.busy = False  # a forward replayed whose backward has not run
        self.generation = 0  # forward replays so far

    def unflatten(self, out: tuple[torch.Tensor, ...]) -> Any:
        """The block's result from the replay's output tuple."""
        if self.layout == [-1]:
            return out[0]
        return tuple(None if i is None else out[i] for i in self.layout)

    def release(self, generation: int) -> None:
        """The autograd graph of forward replay ``generation`` was freed: its activations are no longer needed."""
        if generation == self.generation:
            self.busy = False


class _Claim:
    """Held by a replay's autograd node: frees the graphs for another forward when the node is freed unused."""

    __slots__ = ("graphs", "generation")

    def __init__(self, graphs: _Graphs, generation: int) -> None:
        self.graphs, self.generation = graphs, generation

    def __del__(self) -> None:
        self.graphs.release(self.generation)


class _Replay(torch.autograd.Function):
    """A block's forward and backward replayed from its graphs (one autograd node)."""

    @staticmethod
    def forward(ctx, graphs: _Graphs, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for buf, t in zip(graphs.inputs, tensors):
            buf.copy_(t)
        graphs.forward_graph.replay()
        graphs.generation += 1
        graphs.busy = True
        ctx.graphs, ctx.generation = graphs, graphs.generation
        ctx.claim = _Claim(graphs, graphs.generation)
        out = tuple(o.clone() for o in graphs.outputs)
        ctx.mark_non_differentiable(*(o for o, d in zip(out, graphs.differentiable) if not d))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        graphs: _Graphs = ctx.graphs
        if graphs.generation != ctx.generation:
            raise RuntimeError("block graphs: a backward through a block's forward replay ran after a newer replay "
                               "of that block overwrote its activations (retain_graph=True across steps?); turn "
                               "block graphs off for this (zoo.ops.use_block_graphs(False) or ZOO_BLOCK_GRAPHS=0)")
        dgrads = [g for g, d in zip(grad_outputs, graphs.differentiable) if d]
        for buf, g in zip(graphs.grad_outputs, dgrads):
            if g is None:
                buf.zero_()
            else:
                buf.copy_(g)
        graphs.backward_graph.replay()
        graphs.busy = False
        present = [g for g in graphs.grads if g is not None]
        fresh = iter(torch._foreach_mul(present, 1.0) if present else ())  # one launch: gradients autograd may keep
        return (None, *(None if g is None else next(fresh) for g in graphs.grads))


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _STREAMS.get(index)
    if stream is None:
        stream = _STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def _flatten(result: Any) -> tuple[list[torch.Tensor], list[int | None]]:
    """(the result's tensors, its layout for :meth:`_Graphs.unflatten`)."""
    if isinstance(result, torch.Tensor):
        return [result], [-1]
    if not isinstance(result, tuple) or not all(r is None or isinstance(r, torch.Tensor) for r in result):
        raise TypeError(f"run_block: fn must return a tensor or a tuple of tensors and Nones, got {type(result)}")
    outputs, layout = [], []
    for r in result:
        layout.append(None if r is None else len(outputs))
        if r is not None:
            outputs.append(r)
    return outputs, layout


def _capture(block: nn.Module, key: tuple, fn: Callable[..., Any], args: tuple, tensors: list[torch.Tensor],
             params: list[torch.Tensor]) -> _Graphs | None:
    """Capture ``fn(*args)``'s forward and backward for ``key``; None (and the key runs eagerly from now on) where
    capturing failed."""
    if not _LOCK.acquire(blocking=False):
        return None  # another thread is capturing: this call runs eagerly, and a later one captures
    try:
        graphs = _capture_graphs(block, fn, args, tensors, params)
    except Exception as e:  # noqa: BLE001  (whatever a capture refuses, the block still runs eagerly)
        _STATS["capture_failures"] += 1
        warnings.warn(f"block graphs: capturing {type(block).__name__} failed, it runs eagerly for these inputs "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", stacklevel=3)
        graphs = None
    finally:
        _LOCK.release()
    _BLOCKS[block].entries[key] = graphs
    if graphs is not None:
        _STATS["captures"] += 1
    return graphs


@contextlib.contextmanager
def _parameters_swapped(block: nn.Module, aliases: dict[int, torch.Tensor]) -> Iterator[None]:
    """Context manager: every parameter of ``block``'s modules with an entry in ``aliases`` (by id) replaced by it
    inside, restored after."""
    swapped = []
    for m in block.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in aliases:
                swapped.append((m, name, p))
                m._parameters[name] = aliases[id(p)]
    try:
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def static_leaves(args: tuple, tensors: list[torch.Tensor], params: list[torch.Tensor]
                  ) -> tuple[list[torch.Tensor], tuple, dict[int, torch.Tensor], list[torch.Tensor]]:
    """What a capture runs the block on: (copies of the tensor arguments, as leaves that require grad where those
    do; ``args`` with the copies in their places; ``id(parameter) -> its alias``, a new leaf on the same storage;
    the leaves the backward differentiates for, the copies' then the aliases'). The aliases exist because autograd
    runs a leaf's gradient on the stream where its accumulator was made, for a parameter the stream of an earlier
    eager step, and a capture must not touch another stream."""
    statics = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    it = iter(statics)
    static_args = tuple(next(it) if isinstance(a, torch.Tensor) else a for a in args)
    aliases = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    targets = [s for s in statics if s.requires_grad] + [aliases[id(p)] for p in params]
    return statics, static_args, aliases, targets


def capture_scope(block: nn.Module, aliases: dict[int, torch.Tensor], keep: list, device_type: str, amp: bool,
                  amp_dtype: torch.dtype) -> contextlib.ExitStack:
    """The contexts a block's warm-up and capture run in (entered; close the returned stack to leave them): autocast
    as the call had it but without its weight cache, the layers' own casts (:func:`no_forward_casts`), cached
    constants kept in ``keep``, the parameters swapped for their ``aliases`` and the linear layers sent to
    :func:`zoo.ops.linear` (:func:`linears_as_op`)."""
    stack = contextlib.ExitStack()
    # autocast's cache off: a cast cached before the capture (by the warm-up) would be read at its old address
    stack.enter_context(torch.autocast(device_type, dtype=amp_dtype, enabled=amp, cache_enabled=False))
    stack.enter_context(no_forward_casts())
    stack.enter_context(keep_cached_constants(keep))
    stack.enter_context(_parameters_swapped(block, aliases))
    stack.enter_context(linears_as_op())  # bias gradients summed by zoo's kernel: its host cost is paid once
    return stack


def _capture_graphs(block: nn.Module, fn: Callable[..., Any], args: tuple, tensors: list[torch.Tensor],
                    params: list[torch.Tensor]) -> _Graphs:
    graphs = _Graphs()
    device = tensors[0].device
    stream = _capture_stream(device)
    statics, static_args, aliases, targets = static_leaves(args, tensors, params)
    graphs.inputs = [s.detach() for s in statics]
    amp = torch.is_autocast_enabled(device.type)
    amp_dtype = torch.get_autocast_dtype(device.type)

    def scope() -> contextlib.ExitStack:
        return capture_scope(block, aliases, graphs.keep, device.type, amp, amp_dtype)

    # warm-up on the capture stream (cuBLAS's workspace for that stream, lazy initialisations)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), scope():
        outputs, _ = _flatten(fn(*static_args))
        diff = [o for o in outputs if o.requires_grad]
        if not diff:
            raise ValueError("no output of the block needs a gradient")
        torch.autograd.grad(diff, targets, [torch.zeros_like(o) for o in diff], allow_unused=True)
        del outputs, diff
    torch.cuda.current_stream(device).wait_stream(stream)

    pool = torch.cuda.graph_pool_handle()
    with scope():
        with torch.cuda.graph(graphs.forward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            result = fn(*static_args)
        outputs, graphs.layout = _flatten(result)
        graphs.outputs = [o.detach() for o in outputs]
        graphs.differentiable = [o.requires_grad for o in outputs]
        diff = [o for o in outputs if o.requires_grad]
        graphs.grad_outputs = [torch.empty_like(o) for o in diff]
        with torch.cuda.graph(graphs.backward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            grads = torch.autograd.grad(diff, targets, graphs.grad_outputs, allow_unused=True, retain_graph=True)
    keep = iter(grads)
    graphs.grads = [next(keep) if s.requires_grad else None for s in statics] + list(keep)
    graphs.grads = [None if g is None else g.detach() for g in graphs.grads]
    graphs.keep.append(result)  # (the forward's autograd graph: the saved activations the backward graph reads)
    return graphs
