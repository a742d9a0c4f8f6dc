"""zoo.ops: the shared attention operators.

Every model computes attention through these functions; each has a plain-PyTorch ``reference`` backend (the
definition) and optional fast backends chosen by :mod:`zoo.ops._dispatch`. See ``available_backends(op_name)``.
"""
from ._dispatch import BackendUnavailable, available_backends, dispatch, register_backend, registered_backends

__all__ = ["available_backends", "registered_backends", "register_backend", "dispatch", "BackendUnavailable"]
from .agent import agent_attention  # noqa: F401
