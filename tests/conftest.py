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


@pytest.fixture
def no_tf32():
    """Float32 matmuls and cuDNN convolutions without TF32 during the test, the flags restored after. (pytest 9's
    monkeypatch cannot restore ``torch.backends.cuda.matmul.allow_tf32``: the flag lives in torch's C++ state behind
    the module's ``__getattr__``, so its undo deletes an attribute that was never set and fails.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _private_zoo_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty weights cache unless it sets ZOO_CACHE itself."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.mktemp("zoo_cache")))


def _autograd_node_names(outputs) -> list[str]:
    """Type names of every autograd node behind ``outputs`` (a tensor or a list of tensors), each node once."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
    seen, stack, names = set(), [t.grad_fn for t in outputs], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.fixture
def autograd_nodes():
    """The function listing the autograd node types behind some outputs (how a test counts casts' backward nodes)."""
    return _autograd_node_names
