"""A tiny reduced BiFormer (32x32 inputs, ~60k parameters) and small data for the recipe tests."""
import pytest
import torch

# biformer_tiny shrunk for 32x32 inputs: stage maps 8, 4, 2, 1; one block per stage.
TINY_KWARGS = dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 32, 64], head_dim=16, n_win=[4, 2, 1, 1],
                   topks=[4, 2, 1, -2], global_heads=2, auto_pad=True)


@pytest.fixture
def tiny_kwargs():
    return {k: list(v) if isinstance(v, list) else v for k, v in TINY_KWARGS.items()}


@pytest.fixture
def fixed_batch():
    """A fixed batch of 8 images of 4 classes whose class decides the image (learnable in a few steps)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 4
    x = torch.randn(8, 3, 32, 32, generator=g) * 0.1 + y.view(-1, 1, 1, 1).float() - 1.5
    return x, y
