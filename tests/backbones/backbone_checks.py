"""Helpers shared by the backbone test files: seeded images, non-degenerate random weights, relative error."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| relative to max|b| (b must not be degenerate)."""
    scale = b.abs().max().item()
    assert scale > 1e-3
    return (a.double() - b.double()).abs().max().item() / scale


def image(*size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """(batch, 3, H, W) standard-normal images from a seeded generator."""
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def randomize(model: torch.nn.Module, seed: int = 0, vector_std: float = 0.1) -> torch.nn.Module:
    """Non-degenerate weights (the parity fixtures' scheme; the default init makes attention almost uniform):
    weights of 2+ dims with std fan_in^-1/2, every other parameter (biases, agent biases, norms) with
    ``vector_std`` (norm weights around 1). Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p[0].numel() ** -0.5 if p.ndim >= 2 and name.endswith("weight") else vector_std
            is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if is_norm_weight else 0.0))
    return model.eval()


def resize_1d(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear (align_corners=False) resize of one axis, the 1-D form of the bilinear bias resize."""
    moved = t.movedim(dim, -1)
    shape = moved.shape
    out = F.interpolate(moved.reshape(1, -1, shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*shape[:-1], size).movedim(-1, dim)
