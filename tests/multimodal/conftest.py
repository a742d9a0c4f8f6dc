"""Tiny random models for the multimodal tests (no weights are downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"

# A 12-block ViT (AnoVL's dual path covers the last 12 blocks), 32 px images, 4x4 patches of 8 px; the real CLIP
# vocabulary so the bundled BPE tokenizer works, a short context and one text block to stay fast.
TINY_CLIP_NAME = "zoo-test-tiny-anovl"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> Path:
    """Register the tiny open_clip config once; returns its JSON file."""
    import open_clip

    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tiny_clip_config, tmp_path_factory) -> Path:
    """A random tiny CLIP saved as a local open_clip checkpoint (a state dict file)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    path = tmp_path_factory.mktemp("open_clip_ckpt") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path
