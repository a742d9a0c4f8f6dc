"""Suite-wide settings: offline, a private cache, and the `gpu` marker's skip."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _private_zoo_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty weights cache unless it sets ZOO_CACHE itself."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.mktemp("zoo_cache")))
