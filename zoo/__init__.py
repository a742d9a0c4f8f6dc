"""zoo: a PyTorch model zoo for recent attention research in vision and multimodal learning.

``import zoo`` registers every zoo backbone with timm, so both ``zoo.create_model(name)`` and
``timm.create_model(name)`` work.
"""
from __future__ import annotations

from zoo import backbones as _backbones  # noqa: F401  (registers the models)
from zoo.api import create_model, list_models, model_info

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "__version__"]
