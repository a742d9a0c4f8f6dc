"""Host-side helpers shared by the Triton backends (no kernel runs here)."""
from __future__ import annotations

import pytest
import torch

from zoo.ops.triton import broadcast_strides


@pytest.mark.parametrize("shape, target", [((1, 3, 5, 7), (2, 3, 5, 7)), ((3, 1, 7), (2, 3, 5, 7)),
                                           ((7,), (2, 3, 5, 7)), ((2, 3, 5, 7), (2, 3, 5, 7)),
                                           ((1, 1, 1, 1), (2, 3, 5, 7))])
def test_broadcast_strides_are_what_expand_gives_on_every_indexed_dim(shape, target):
    bias = torch.randn(shape)
    layouts = [bias] + ([bias.transpose(-1, -2).contiguous().transpose(-1, -2)] if bias.ndim > 1 else [])
    for t in layouts:
        expanded = t.expand(target).stride()
        ours = broadcast_strides(t.shape, t.stride(), len(target))
        # a size-1 target dim is only indexed at 0: its stride does not matter
        assert [s for s, n in zip(ours, target) if n > 1] == [s for s, n in zip(expanded, target) if n > 1]
