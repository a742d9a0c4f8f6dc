"""Agent-DeiT: official parity, official checkpoints, the timm interface, other input sizes, the bias helpers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo
from backbone_checks import image, max_rel, randomize
from zoo.backbones import _agent_common as common
from zoo.backbones.agent_deit import AgentVisionTransformer
from zoo.convert import compare_state_dict, from_official, get_converter

FIXTURES = Path(__file__).parents[1] / "fixtures" / "parity" / "agent_attention"
KEYS = json.loads((FIXTURES / "agent_deit_keys.json").read_text())
VARIANTS = {"agent_deit_tiny_224": "agent_deit_tiny", "agent_deit_small_224": "agent_deit_small",
            "agent_deit_small_448": "agent_deit_small_448", "agent_deit_base_224": "agent_deit_base"}
TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, agent_num=(4, 4, 4, 4), agent_layer=2,
            num_classes=10)


def _tiny(**kw) -> AgentVisionTransformer:
    torch.manual_seed(0)
    return zoo.create_model("agent_deit_tiny", **dict(TINY, **kw)).eval()


# --- parity with the official implementation -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_parity_with_official(backend, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", f"agent_attention:{backend},downsampled_attention:{backend}")
    case = json.loads((FIXTURES / "agent_deit_tiny_224.json").read_text())
    tensors = load_file(str(FIXTURES / "agent_deit_tiny_224.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    model = from_official(case["family"], case["class"], case["kwargs"], sd).eval()
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    with torch.no_grad():
        logits = model(tensors["input"])
        patches, prefix = zip(*model.forward_intermediates(
            tensors["input"], indices=None, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True))
    assert max_rel(logits, tensors["output"]) < 1e-5
    assert len(patches) == len(case["features"]) == 6
    for i, (p, c) in enumerate(zip(patches, prefix)):
        assert max_rel(torch.cat([c, p], dim=1), tensors[f"feat.{i}"]) < 1e-5, f"block {i}"


# --- official checkpoints ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(VARIANTS))
def test_official_keys_load_strictly_with_official_param_count(case):
    entry = KEYS[case]
    with torch.device("meta"):  # full-size models: shapes and keys only, no memory or init time
        model = zoo.create_model(VARIANTS[case])
        official = from_official(entry["family"], entry["official_class"], entry["official_kwargs"])
    sd = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"].items()}
    mapped = get_converter("agent_attention").key_map(sd)  # official 5-D row/column biases -> zoo 4-D
    for m in (model, official):
        assert sum(p.numel() for p in m.parameters()) == entry["num_params"]
        assert compare_state_dict(mapped, m) == ([], [], [])
    model.load_state_dict(sd, strict=True, assign=True)  # the official layout also loads directly


def test_checkpoint_path_with_official_wrapping(tmp_path):
    # official keys (checked in full above) on a tiny config, wrapped as the release files are
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=gen) for k, v in _tiny().state_dict().items()}
    path = tmp_path / "agent_deit_t.pth"
    torch.save({"model": _official_layout(sd), "epoch": 299, "max_accuracy": 74.9}, path)
    model = zoo.create_model("agent_deit_tiny", checkpoint_path=path, **TINY)
    own = model.state_dict()
    assert set(own) == set(sd)
    assert all(torch.equal(own[k], v) for k, v in sd.items())


def _official_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A zoo state dict as the official code saves it: row/column agent biases with a leading singleton dim."""
    rowcol = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")
    return {k: v[None] if k.rsplit(".", 1)[-1] in rowcol else v for k, v in sd.items()}


def test_from_official_rejects_what_it_cannot_build():
    kwargs = dict(KEYS["agent_deit_tiny_224"]["official_kwargs"], distilled=True)
    with pytest.raises(ValueError, match="distilled"):
        from_official("agent_attention", "VisionTransformer", kwargs)
    with pytest.raises(ValueError, match="accepted"):
        from_official("agent_attention", "DistilledVisionTransformer", {})


def test_pretrained_cfgs():
    for name, size in [("agent_deit_tiny", 224), ("agent_deit_small", 224), ("agent_deit_small_448", 448),
                       ("agent_deit_base", 224)]:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == "in1k" and cfg.input_size == (3, size, size)
        assert cfg.url.startswith("https://cloud.tsinghua.edu.cn/f/") and cfg.url.endswith("/?dl=1")
        assert (cfg.crop_pct, cfg.crop_mode, cfg.interpolation) == (0.875, "squash", "bicubic")
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.classifier == "head"
    assert timm.models.get_pretrained_cfg("agent_deit_small").url != timm.models.get_pretrained_cfg(
        "agent_deit_small_448").url


# --- timm interface -----------------------------------------------------------------------------------------------

def test_forward_features_head_and_reset_classifier():
    model, x = _tiny(), image(32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 16)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats[:, 0])
        torch.testing.assert_close(model(x), model.head(pooled))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), feats[:, 1:].mean(1))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")


def test_features_only():
    model = _tiny()
    torch.manual_seed(0)
    extractor = timm.create_model("agent_deit_tiny", features_only=True, out_indices=(1, 3), **TINY).eval()
    extractor.load_state_dict(model.state_dict(), strict=False)
    assert extractor.feature_info.channels() == [16, 16] and extractor.feature_info.reduction() == [8, 8]
    x = image(32, 32)
    with torch.no_grad():
        maps = extractor(x)
        _, ref = model.forward_intermediates(x, indices=[1, 3])
    assert [tuple(m.shape) for m in maps] == [(2, 16, 4, 4)] * 2
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m, r, rtol=0, atol=0)
    default = timm.create_model("agent_deit_tiny", features_only=True, **TINY)
    assert default.feature_info.module_name() == ["blocks.1", "blocks.2", "blocks.3"]  # the last three, as timm's ViT


def test_grad_checkpointing_matches():
    model, x = _tiny(), image(32, 32)
    model.train()
    outs, grads = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(model.blocks[0].attn.an_bias.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().max() > 0


def test_no_weight_decay_and_group_matcher():
    model = _tiny()
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert set(groups[0]) == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert all(k.startswith("blocks.0.") for k in groups[1])
    assert len(groups) == 1 + 4 + 1  # stem, four blocks (the final norm joins the last), head
    assert {"norm.weight", "norm.bias"} < set(groups[4]) and set(groups[5]) == {"head.weight", "head.bias"}


# --- other input sizes -------------------------------------------------------------------------------------------

def _resized_state_dict(model: AgentVisionTransformer, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The model's weights with the position embedding and row/column agent biases resized to ``grid``."""
    old = model.patch_embed.grid_size
    sd = {}
    for k, v in model.state_dict().items():
        if k == "pos_embed":
            patch = F.interpolate(v[:, 1:].reshape(1, *old, -1).permute(0, 3, 1, 2), size=grid, mode="bilinear")
            v = torch.cat([v[:, :1], patch.flatten(2).transpose(1, 2)], 1)
        elif k.endswith("ah_bias"):
            v = F.interpolate(v, size=(grid[0], 1), mode="bilinear")
        elif k.endswith("aw_bias"):
            v = F.interpolate(v, size=(1, grid[1]), mode="bilinear")
        elif k.endswith("ha_bias"):
            v = F.interpolate(v.permute(0, 3, 1, 2), size=(grid[0], 1), mode="bilinear").permute(0, 2, 3, 1)
        elif k.endswith("wa_bias"):
            v = F.interpolate(v.permute(0, 3, 1, 2), size=(1, grid[1]), mode="bilinear").permute(0, 2, 3, 1)
        sd[k] = v
    return sd


@pytest.mark.parametrize("size", [(48, 48), (32, 56)])
def test_other_input_size_equals_model_built_for_it(size):
    model, x = randomize(_tiny()), image(*size)
    grid = (size[0] // 8, size[1] // 8)
    native = _tiny(img_size=size)
    native.load_state_dict(_resized_state_dict(model, grid))
    with torch.no_grad():
        out = model(x)
        assert max_rel(out, native(x)) < 1e-5
        assert model.forward_features(x).shape == (2, 1 + grid[0] * grid[1], 16)


def test_input_size_errors_name_the_constraint():
    with pytest.raises(ValueError, match="not a multiple of patch_size=8"):
        _tiny()(image(36, 32))
    with pytest.raises(ValueError, match="img_size"):
        AgentVisionTransformer(img_size="224")
    with pytest.raises(ValueError, match="perfect square"):
        AgentVisionTransformer(**dict(TINY, agent_num=(5, 4, 4, 4)))


# --- the shared bias helpers (used by Agent-PVT/Swin/CSwin too) against explicit interpolation matrices -------------

def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-d linear interpolation with align_corners=False (PyTorch's convention)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def _bias_params(heads=2, agents=4, hk=5, wk=6, hq=5, wq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = dict(an=(heads, agents, 7, 7), na=(heads, agents, 7, 7), ah=(heads, agents, hk, 1),
                  aw=(heads, agents, 1, wk), ha=(heads, hq, 1, agents), wa=(heads, 1, wq, agents),
                  ac=(1, heads, agents, 1), ca=(1, heads, 1, agents))
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


@pytest.mark.parametrize("key_size", [(5, 6), (8, 3)])
def test_agent_key_bias_matches_interpolation_oracle(key_size):
    p = _bias_params()
    mh, mw = _interp_matrix(7, key_size[0]), _interp_matrix(7, key_size[1])
    an = torch.einsum("ia,hnab,jb->hnij", mh, p["an"], mw)
    ah = torch.einsum("ia,hna->hni", _interp_matrix(5, key_size[0]), p["ah"][:, :, :, 0])
    aw = torch.einsum("jb,hnb->hnj", _interp_matrix(6, key_size[1]), p["aw"][:, :, 0, :])
    expected = (an + ah[..., None] + aw[..., None, :]).flatten(2)
    expected = torch.cat([p["ac"][0], expected], -1)[None]
    got = common.agent_key_bias(p["an"], p["ah"], p["aw"], key_size, ac_bias=p["ac"])
    assert got.shape == (1, 2, 4, 1 + key_size[0] * key_size[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("query_size", [(5, 6), (3, 9)])
def test_agent_query_bias_matches_interpolation_oracle(query_size):
    p = _bias_params()
    mh, mw = _interp_matrix(7, query_size[0]), _interp_matrix(7, query_size[1])
    na = torch.einsum("ia,hnab,jb->hijn", mh, p["na"], mw)
    ha = torch.einsum("ia,han->hin", _interp_matrix(5, query_size[0]), p["ha"][:, :, 0, :])
    wa = torch.einsum("jb,hbn->hjn", _interp_matrix(6, query_size[1]), p["wa"][:, 0, :, :])
    expected = (na + ha[:, :, None] + wa[:, None]).flatten(1, 2)
    expected = torch.cat([p["ca"][0], expected], 1)[None]
    got = common.agent_query_bias(p["na"], p["ha"], p["wa"], query_size, ca_bias=p["ca"])
    assert got.shape == (1, 2, 1 + query_size[0] * query_size[1], 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_agent_axis_resize_matches_oracle():
    # official downstream_agent_shape: 2x2 trained agents read as a 3x3 grid
    p = _bias_params()
    ma = _interp_matrix(2, 3)
    key = common.agent_key_bias(p["an"], p["ah"], p["aw"], (5, 6))
    got = common.agent_key_bias(p["an"], p["ah"], p["aw"], (5, 6), agents=(3, 3))
    expected = torch.einsum("ia,jb,habl->hijl", ma, ma, key[0].reshape(2, 2, 2, -1)).reshape(1, 2, 9, -1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    query = common.agent_query_bias(p["na"], p["ha"], p["wa"], (5, 6), ca_bias=p["ca"])
    got = common.agent_query_bias(p["na"], p["ha"], p["wa"], (5, 6), ca_bias=p["ca"], agents=(3, 3))
    expected = torch.einsum("ia,jb,hlab->hlij", ma, ma, query[0].reshape(2, -1, 2, 2)).reshape(1, 2, -1, 9)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_pool_agent_tokens_is_a_grid_average():
    q = torch.arange(2 * 16 * 3, dtype=torch.float64).reshape(2, 16, 3)
    agents = common.pool_agent_tokens(q, (4, 4), (2, 2))
    grid = q.reshape(2, 4, 4, 3)
    torch.testing.assert_close(agents[:, 0], grid[:, :2, :2].mean((1, 2)))
    torch.testing.assert_close(agents[:, 3], grid[:, 2:, 2:].mean((1, 2)))
    with pytest.raises(ValueError, match="do not form a 4x5 grid"):
        common.pool_agent_tokens(q, (4, 5), (2, 2))


def test_official_argument_spellings():
    assert common.as_int_list(["9", "16", "49", "49"], 4, "agent_num") == [9, 16, 49, 49]
    assert common.as_int_list("9-16-49-49", 4, "agent_num") == [9, 16, 49, 49]
    assert common.as_int_list("1111", 4, "agent_sr_ratios") == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="agent_num needs at least 4"):
        common.as_int_list([9, 16], 4, "agent_num")


# --- GPU --------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity_backends_and_compile(no_tf32):
    case = json.loads((FIXTURES / "agent_deit_tiny_224.json").read_text())
    tensors = load_file(str(FIXTURES / "agent_deit_tiny_224.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    model = from_official(case["family"], case["class"], case["kwargs"], sd).eval().cuda()
    x = tensors["input"].cuda()
    with torch.no_grad():
        assert max_rel(model(x).cpu(), tensors["output"]) < 2e-5
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert max_rel(model(x).float().cpu(), tensors["output"]) < 5e-2
        compiled = torch.compile(model)
        assert max_rel(compiled(x).cpu(), tensors["output"]) < 2e-5
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
