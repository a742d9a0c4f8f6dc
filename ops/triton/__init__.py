"""Triton kernels behind the ``triton`` backends of :mod:`zoo.ops`.

Nothing here imports triton when ``zoo.ops`` is imported: kernel modules are imported on first use, so the package
imports cleanly on machines without triton or CUDA. Whether a kernel runs in Triton's CPU interpreter is decided when
its ``@triton.jit`` decorator runs (triton reads ``TRITON_INTERPRET`` then), i.e. when its module is first imported.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_missing_reason", "interpreter_requested", "no_device_reason"]

_TRUE = ("1", "true", "yes", "on")


# Looked up once: dispatch asks at every call, also inside torch.compile regions, and dynamo refuses to trace
# importlib's find_spec (a graph break, or an error under fullgraph=True; seen on the H200 with torch 2.11).
_TRITON_MISSING = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def triton_missing_reason() -> str | None:
    """Why triton cannot be used here (not installed), or None. Does not import triton."""
    return _TRITON_MISSING


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the CPU interpreter (the same spellings triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def no_device_reason() -> str | None:
    """Why no Triton kernel can run here (triton missing; no CUDA device and no interpreter requested), or None."""
    if _TRITON_MISSING is not None:
        return _TRITON_MISSING
    if not torch.cuda.is_available() and not interpreter_requested():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return None
