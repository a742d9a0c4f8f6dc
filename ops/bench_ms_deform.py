"""Timing of :func:`zoo.ops.ms_deform_attn` backends at Focus-DETR / Deformable-DETR shapes.

``bench_ms_deform()`` returns one row (a dict) per (shape, dtype, pass, backend); the ``zoo bench ops`` harness
prints and saves them. Importable without CUDA; timing needs a CUDA device (CUDA events), or runs on CPU with a wall
clock for smoke tests. If the official Deformable-DETR extension (``MultiScaleDeformableAttention``, built from
``models/ops`` of the official repo) is importable, it is timed too as backend ``official_cuda`` (float32 only).

Shapes (R50, 4 scales, 800x1333 input, batch 2, 8 heads x 32 channels, 4 points):
    ``encoder``: every one of the 22,223 tokens is a query; ``decoder``: 900 queries; ``tiny``: a smoke test.
Locations: ``"uniform"`` draws them uniformly over [0, 1] (no locality: a worst case for caches, and the likely
setting of published timings); ``"local"`` puts them a few pixels around each query's reference point, as a trained
encoder does.

Each timed call reuses the same inputs, so ``value`` (45 MB in float32) stays largely in the H200's L2 cache across
repetitions, as it does for the official op's numbers. ``gbps`` is the compulsory traffic (every input read once,
every output written once) divided by the time: a lower bound on the traffic really moved by the gathers.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ._dispatch import select_backend
from .ms_deform import ms_deform_attn

__all__ = ["bench_ms_deform", "sweep_ms_deform_tiles", "msda_bench_inputs", "MSDA_SHAPES"]

R50_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
MSDA_SHAPES: dict[str, dict] = {
    "encoder": dict(levels=R50_LEVELS, queries=None, batch=2, heads=8, channels=32, points=4),
    "decoder": dict(levels=R50_LEVELS, queries=900, batch=2, heads=8, channels=32, points=4),
    "tiny": dict(levels=((6, 8), (3, 4)), queries=None, batch=1, heads=2, channels=8, points=2),
}
_PASSES = ("fwd", "bwd", "fwd+bwd")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def msda_bench_inputs(shape: str = "encoder", dtype: torch.dtype = torch.float32, device: str = "cuda",
                      locations: str = "uniform", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of one benchmark shape: (value [B,S,M,C], spatial_shapes [L,2], level_start_index [L],
    sampling_locations [B,Q,M,L,P,2], attention_weights [B,Q,M,L,P]); floats in ``dtype``, ints int64."""
    if shape not in MSDA_SHAPES:
        raise ValueError(f"shape={shape!r} is not a benchmark shape; known: {sorted(MSDA_SHAPES)}")
    if locations not in ("uniform", "local"):
        raise ValueError(f"locations={locations!r}; accepted: 'uniform', 'local'")
    cfg = MSDA_SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    spatial = torch.tensor(cfg["levels"], dtype=torch.int64)
    sizes = spatial[:, 0] * spatial[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens, levels = int(sizes.sum()), len(cfg["levels"])
    batch, heads, channels, points = cfg["batch"], cfg["heads"], cfg["channels"], cfg["points"]
    queries = cfg["queries"] or tokens
    value = torch.randn(batch, tokens, heads, channels, generator=g)
    loc_shape = (batch, queries, heads, levels, points, 2)
    if locations == "uniform":
        loc = torch.rand(loc_shape, generator=g)
    else:
        ref = _reference_points(cfg["levels"], queries, cfg["queries"] is None, g)      # [Q, 2]
        wh = spatial.flip(-1).to(torch.float32)                                         # [L, 2] as (W, H)
        offsets = torch.randn(loc_shape, generator=g) * 2.0 / wh[None, None, None, :, None, :]
        loc = ref[None, :, None, None, None, :] + offsets
    attn = torch.randn(batch, queries, heads, levels * points, generator=g).softmax(-1)
    attn = attn.view(batch, queries, heads, levels, points)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, attn)]
    return floats[0], spatial.to(device), starts.to(device), floats[1], floats[2]


def _reference_points(levels, queries: int, per_token: bool, g: torch.Generator) -> torch.Tensor:
    """Each token's own pixel centre (encoder queries) or random boxes' centres (decoder queries), normalised."""
    if not per_token:
        return torch.rand(queries, 2, generator=g) * 0.9 + 0.05
    centres = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    return torch.cat(centres)


def _official_cuda():
    """The official op's forward/backward, if its extension is installed here."""
    try:
        import MultiScaleDeformableAttention as msda  # noqa: N813  (the official extension's module name)
    except ImportError:
        return None
    return msda


def _timer(device: str, warmup: int, iters: int, repeats: int = 5) -> Callable[[Callable[[], object]], float]:
    """Median over ``repeats`` of the mean time (ms) of ``iters`` back-to-back calls, after ``warmup`` calls."""
    per = max(1, iters // repeats)

    def cuda_time(fn):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / per)
        return statistics.median(samples)

    def wall_time(fn):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(per):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / per)
        return statistics.median(samples)

    return cuda_time if device.startswith("cuda") else wall_time


def _kernel_ms(fn: Callable[[], object], iters: int = 10) -> float | None:
    """GPU time (ms) of the kernels one call launches, summed from the profiler: excludes Python/launch overhead,
    which can dominate small shapes (the decoder) in back-to-back timing."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for event in prof.key_averages():
        total_us += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return total_us / iters / 1e3 if total_us > 0 else None


def _compulsory_bytes(inputs: tuple[torch.Tensor, ...], out_numel: int, out_itemsize: int, pass_: str) -> int:
    """Bytes every implementation must move: inputs read once and outputs written once per pass."""
    value, _, _, loc, attn = inputs
    floats = sum(t.numel() * t.element_size() for t in (value, loc, attn))
    fwd = floats + out_numel * out_itemsize
    bwd = 2 * floats + out_numel * out_itemsize  # read inputs + grad_out, write three gradients
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _callables(backend: str, inputs: tuple[torch.Tensor, ...], official) -> dict[str, Callable[[], object]]:
    """Zero-argument callables per pass for one backend on fixed inputs."""
    value, spatial, starts, loc, attn = inputs
    grad_in = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out_shape = (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    grad_out = torch.randn(out_shape, device=value.device, dtype=value.dtype)
    if backend == "official_cuda":
        def fwd():
            return official.ms_deform_attn_forward(value, spatial, starts, loc, attn, 64)

        def bwd():
            return official.ms_deform_attn_backward(value, spatial, starts, loc, attn, grad_out, 64)

        def fwd_bwd():
            fwd()
            return bwd()
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}

    def run_forward():
        return ms_deform_attn(value, spatial, loc, attn, starts, backend=backend)

    def fwd():
        with torch.no_grad():
            return run_forward()

    graph_out = ms_deform_attn(grad_in[0], spatial, grad_in[1], grad_in[2], starts, backend=backend)

    def bwd():
        return torch.autograd.grad(graph_out, grad_in, grad_out, retain_graph=True)

    def fwd_bwd():
        out = ms_deform_attn(grad_in[0], spatial, grad_in[1], grad_in[2], starts, backend=backend)
        return torch.autograd.grad(out, grad_in, grad_out)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def bench_ms_deform(shapes: tuple[str, ...] = ("encoder", "decoder"), dtypes: tuple[str, ...] = ("float32", "bfloat16"),
                    passes: tuple[str, ...] = _PASSES, backends: tuple[str, ...] | None = None,
                    device: str = "cuda", locations: str = "uniform", warmup: int = 10, iters: int = 50
                    ) -> list[dict]:
    """Time ms_deform_attn backends; one row per (shape, dtype, pass, backend).

    Args:
        shapes: names in :data:`MSDA_SHAPES` (``encoder``, ``decoder``, ``tiny``).
        dtypes: ``float32``, ``float16``, ``bfloat16`` (every input in that dtype).
        passes: ``fwd`` (no autograd), ``bwd`` (backward of a kept graph), ``fwd+bwd``.
        backends: default: ``reference``, ``triton`` and, if installed, ``official_cuda`` (float32 only).
        device: ``cuda`` (CUDA-event timing) or ``cpu`` (wall clock; smoke tests).
        locations: ``uniform`` or ``local`` (see the module docstring).

    Returns:
        dicts with keys op, backend, shape, dtype, pass, ms (CUDA events around back-to-back calls: what an eager
        caller sees), kernel_ms (GPU time of the launched kernels from the profiler, no Python overhead; None on
        CPU), ratio_to_reference (ms / reference ms; < 1 is faster), speedup (reference ms / ms), gbps
        (compulsory bytes / ms), locations, device, torch, triton.
    """
    for name, given, accepted in (("dtypes", dtypes, _DTYPES), ("passes", passes, _PASSES)):
        bad = [x for x in given if x not in accepted]
        if bad:
            raise ValueError(f"{name}={bad} not accepted; choose from {list(accepted)}")
    official = _official_cuda() if device.startswith("cuda") else None
    backends = backends or ("reference", "triton") + (("official_cuda",) if official is not None else ())
    timer = _timer(device, warmup, iters)
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            inputs = msda_bench_inputs(shape, _DTYPES[dtype_name], device, locations)
            rows += _bench_case(shape, dtype_name, inputs, passes, backends, official, timer, device, locations)
            del inputs
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def _bench_case(shape, dtype_name, inputs, passes, backends, official, timer, device, locations) -> list[dict]:
    """Rows of one (shape, dtype): every requested backend and pass, with ratios to the reference."""
    value, _, _, loc, _ = inputs
    out_numel = value.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3]
    times: dict[tuple[str, str], float] = {}
    kernel_times: dict[tuple[str, str], float | None] = {}
    for backend in backends:
        if backend == "official_cuda" and (official is None or dtype_name != "float32"):
            continue
        if backend != "official_cuda" and not _serves(backend, inputs):
            continue
        calls = _callables(backend, inputs, official)
        for pass_ in passes:
            times[(backend, pass_)] = timer(calls[pass_])
            kernel_times[(backend, pass_)] = _kernel_ms(calls[pass_]) if device.startswith("cuda") else None
        del calls
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    rows = []
    for (backend, pass_), ms in times.items():
        ref = times.get(("reference", pass_))
        gbytes = _compulsory_bytes(inputs, out_numel, value.element_size(), pass_) / 1e9
        rows.append(dict(op="ms_deform_attn", backend=backend, shape=_describe(shape, inputs), dtype=dtype_name,
                         **{"pass": pass_}, ms=_sig(ms), kernel_ms=_sig(kernel_times[(backend, pass_)]),
                         ratio_to_reference=_sig(ms / ref) if ref else None, speedup=_sig(ref / ms) if ref else None,
                         gbps=_sig(gbytes / (ms * 1e-3)),
                         locations=locations, device=_device_name(device), torch=torch.__version__,
                         triton=triton_version))
    return rows


def _sig(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def _serves(backend: str, inputs) -> bool:
    """Whether ``backend`` itself (not a fallback) would run these inputs."""
    value, spatial, starts, loc, attn = inputs
    return select_backend("ms_deform_attn", None if backend is None else backend, value, spatial, loc, attn,
                          starts).name == backend


def _describe(shape: str, inputs) -> str:
    value, spatial, _, loc, _ = inputs
    b, s, m, c = value.shape
    return f"{shape} B{b} Q{loc.shape[1]} S{s} L{spatial.shape[0]} M{m} C{c} P{loc.shape[4]}"


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


SAMPLE_TILE_CANDIDATES = (
    {"elements": 1024, "num_warps": 2}, {"elements": 2048, "num_warps": 4},
    {"elements": 4096, "num_warps": 4}, {"elements": 4096, "num_warps": 8},
)
PIXEL_TILE_CANDIDATES = (
    {"elements": 1024, "samples": 32, "num_warps": 2}, {"elements": 2048, "samples": 16, "num_warps": 4},
    {"elements": 2048, "samples": 32, "num_warps": 4}, {"elements": 4096, "samples": 32, "num_warps": 4},
    {"elements": 4096, "samples": 32, "num_warps": 8}, {"elements": 4096, "samples": 64, "num_warps": 8},
)


def sweep_ms_deform_tiles(shape: str = "encoder", dtype: str = "float32", locations: str = "uniform",
                          device: str = "cuda", warmup: int = 5, iters: int = 30) -> list[dict]:
    """Time the triton backend under alternative tile configurations, to pick the defaults on a new GPU.

    The forward tile is timed on the forward, then the per-sample backward's tile and the value-gradient gather's
    (``pixel`` or ``dense_pixel``, whichever the shape uses) on the backward, each with the other tiles at their
    defaults. Returns rows: tile, config, default, shape, dtype, pass, ms, kernel_ms (None off CUDA).
    """
    from .triton.ms_deform import TILES, corners_per_pixel, pixel_tile_kind, use_tiles

    defaults = {kind: dict(config) for kind, config in TILES.items()}
    inputs = msda_bench_inputs(shape, _DTYPES[dtype], device, locations)
    value, spatial, _, loc, _ = inputs
    gather = pixel_tile_kind(corners_per_pixel(value.shape[1], loc.shape[1], spatial.shape[0], loc.shape[4]))
    timer = _timer(device, warmup, iters)
    on_cuda = device.startswith("cuda")
    sweeps = [("forward", c, ("fwd",)) for c in SAMPLE_TILE_CANDIDATES]
    sweeps += [("sample", c, ("bwd",)) for c in SAMPLE_TILE_CANDIDATES]
    sweeps += [(gather, c, ("bwd",)) for c in PIXEL_TILE_CANDIDATES]
    rows = []
    for kind, config, passes in sweeps:
        with use_tiles(**{kind: config}):
            calls = _callables("triton", inputs, None)
            for pass_ in passes:
                rows.append(dict(tile=kind, config=dict(config), default=config == defaults[kind], shape=shape,
                                 dtype=dtype, **{"pass": pass_}, ms=_sig(timer(calls[pass_])),
                                 kernel_ms=_sig(_kernel_ms(calls[pass_])) if on_cuda else None))
    return rows
