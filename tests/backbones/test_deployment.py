"""Deployment paths of every family: weights cast to bfloat16 or float16 (``model.to(dtype)``, no autocast: the
routing descriptors, the agent biases and their caches, the outlook and window ops all take low-precision
parameters, and the result stays close to float32) and ``torch.export`` of the classifier and of the feature
pyramid."""
from __future__ import annotations

import pytest
import timm
import torch

import zoo
from test_agent_cswin import TINY as CSWIN
from test_agent_deit import TINY as DEIT
from test_agent_pvt import TINY as PVT
from test_agent_swin import TINY as SWIN
from test_biformer import TINY_MODELS as BIFORMER
from test_volo import TINY as VOLO

CASES = {
    "biformer_tiny": (BIFORMER["biformer_tiny"], 64),
    "biformer_stl_nchw": (BIFORMER["biformer_stl_nchw"], 64),
    "zoo_volo_d1_224": (VOLO, 64),
    "agent_deit_tiny": (DEIT, 32),
    "agent_pvt_tiny": (PVT, 64),
    "agent_swin_t": (SWIN, 64),
    "agent_cswin_t": (CSWIN, 64),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_weights_match_float32(name, dtype):
    kwargs, size = CASES[name]
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        low = model.to(dtype)(x.to(dtype))
        again = model(x.to(dtype))  # the second call goes through the remembered dispatch and bias caches
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.03  # measured 0.004-0.010
    assert torch.equal(again, low)


@pytest.mark.parametrize("features_only", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_gives_the_eager_output(name, features_only):
    # the deployment path, for the classifier and for the feature pyramid a detector takes (ops dispatch to their
    # CPU backends while tracing)
    kwargs, size = CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=features_only, **kwargs).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)
