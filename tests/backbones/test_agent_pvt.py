"""Agent-PVT: official parity, official checkpoints, the timm interface, other input sizes, 'B' and sr stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.pvt_v2 import Attention as TimmPvtAttention

import zoo
from backbone_checks import image, max_rel, randomize
from zoo.backbones.agent_pvt import AgentPyramidVisionTransformer, SpatialReductionAttention
from zoo.convert import compare_state_dict, from_official, get_converter
from zoo.ops import clear_parameter_caches

FIXTURES = Path(__file__).parents[1] / "fixtures" / "parity" / "agent_attention"
KEYS = json.loads((FIXTURES / "agent_pvt_keys.json").read_text())
VARIANTS = {"agent_pvt_tiny_224": "agent_pvt_tiny", "agent_pvt_small_224": "agent_pvt_small",
            "agent_pvt_medium_224": "agent_pvt_medium", "agent_pvt_medium_256": "agent_pvt_medium_256",
            "agent_pvt_large_224": "agent_pvt_large"}
TINY = dict(img_size=64, embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
            depths=(1, 1, 1, 1), agent_num=(4, 4, 4, 4), num_classes=10)


def _tiny(**kw) -> AgentPyramidVisionTransformer:
    torch.manual_seed(0)
    return zoo.create_model("agent_pvt_tiny", **dict(TINY, **kw)).eval()


# --- parity with the official implementation -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_parity_with_official(backend, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", f"agent_attention:{backend}")
    case = json.loads((FIXTURES / "agent_pvt_tiny_224.json").read_text())
    tensors = load_file(str(FIXTURES / "agent_pvt_tiny_224.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    model = from_official(case["family"], case["class"], case["kwargs"], sd).eval()
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    with torch.no_grad():
        logits = model(tensors["input"])
        stages = model.forward_intermediates(tensors["input"], output_fmt="NLC", intermediates_only=True)
    assert max_rel(logits, tensors["output"]) < 1e-5
    assert len(stages) == 4
    for i, s in enumerate(stages):
        assert max_rel(s, tensors[f"feat.{i}"]) < 1e-5, f"stage {i}"


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
    sd = randomize(_tiny(), seed=3).state_dict()
    path = tmp_path / "agent_pvt_t.pth"
    rowcol = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")  # saved with the official leading singleton dim
    official = {k: v[None] if k.rsplit(".", 1)[-1] in rowcol else v for k, v in sd.items()}
    torch.save({"model": official, "epoch": 299, "max_accuracy": 78.4}, path)
    model = zoo.create_model("agent_pvt_tiny", checkpoint_path=path, **TINY)
    own = model.state_dict()
    assert set(own) == set(sd)
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    assert model.block1[0].norm1.eps == 1e-6 and model.patch_embed1.norm.eps == 1e-5  # official norm eps


def test_pretrained_cfgs():
    for name, size in [("agent_pvt_tiny", 224), ("agent_pvt_small", 224), ("agent_pvt_medium", 224),
                       ("agent_pvt_medium_256", 256), ("agent_pvt_large", 224)]:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == "in1k" and cfg.input_size == (3, size, size)
        assert cfg.url.startswith("https://cloud.tsinghua.edu.cn/f/") and cfg.url.endswith("/?dl=1")
        assert (cfg.crop_pct, cfg.crop_mode, cfg.interpolation) == (0.875, "squash", "bicubic")
        assert cfg.first_conv == "patch_embed1.proj" and cfg.classifier == "head"


# --- timm interface -----------------------------------------------------------------------------------------------

def test_forward_features_head_and_reset_classifier():
    model, x = _tiny(), image(64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 16, 2, 2)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.mean((2, 3)))
        torch.testing.assert_close(model(x), model.head(pooled))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 16, 2, 2)


def test_features_only():
    model = _tiny()
    torch.manual_seed(0)
    extractor = timm.create_model("agent_pvt_tiny", features_only=True, **TINY).eval()
    extractor.load_state_dict(model.state_dict(), strict=False)
    assert extractor.feature_info.channels() == [8, 16, 16, 16]
    assert extractor.feature_info.reduction() == [4, 8, 16, 32]
    x = image(64, 64)
    with torch.no_grad():
        maps = extractor(x)
        final, ref = model.forward_intermediates(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m, r, rtol=0, atol=0)
    torch.testing.assert_close(final, ref[-1])
    two = timm.create_model("agent_pvt_tiny", features_only=True, out_indices=(0, 1), **TINY)
    assert two.feature_info.channels() == [8, 16] and not hasattr(two.model, "block3")  # later stages pruned


def test_grad_checkpointing_matches():
    model, x = _tiny(), image(64, 64)
    model.train()
    outs, grads = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(model.block1[0].attn.ha_bias.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().max() > 0


def test_no_weight_decay_and_group_matcher():
    model = _tiny()
    assert model.no_weight_decay() == set()
    fine = timm.models.group_parameters(model, model.group_matcher())
    assert set(fine[0]) == {"pos_embed1", "patch_embed1.proj.weight", "patch_embed1.proj.bias",
                            "patch_embed1.norm.weight", "patch_embed1.norm.bias"}
    assert all(k.startswith("block1.0.") for k in fine[1])
    assert "patch_embed2.proj.weight" in fine[2] and "block2.0.attn.q.weight" in fine[2]
    assert len(fine) == 1 + 4 + 1  # stem, one group per block (with its stage's embedding), head
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1


# --- other input sizes ---------------------------------------------------------------------------------------------

def _resized_state_dict(model: AgentPyramidVisionTransformer, grids: list[tuple[int, int]]) -> dict:
    """Weights with position embeddings and row/column agent biases bilinearly resized to the stage ``grids``."""
    sd = {}
    for k, v in model.state_dict().items():
        stage = int(k[len("pos_embed")]) - 1 if k.startswith("pos_embed") else int(k[len("block")]) - 1 \
            if k.startswith("block") else None
        if k.startswith("pos_embed"):
            old = getattr(model, f"patch_embed{stage + 1}").grid_size
            v = F.interpolate(v.reshape(1, *old, -1).permute(0, 3, 1, 2), size=grids[stage], mode="bilinear")
            v = v.flatten(2).transpose(1, 2)
        elif k.endswith("ah_bias"):
            v = F.interpolate(v, size=(grids[stage][0], 1), mode="bilinear")
        elif k.endswith("aw_bias"):
            v = F.interpolate(v, size=(1, grids[stage][1]), mode="bilinear")
        elif k.endswith("ha_bias"):
            v = F.interpolate(v.permute(0, 3, 1, 2), size=(grids[stage][0], 1), mode="bilinear").permute(0, 2, 3, 1)
        elif k.endswith("wa_bias"):
            v = F.interpolate(v.permute(0, 3, 1, 2), size=(1, grids[stage][1]), mode="bilinear").permute(0, 2, 3, 1)
        sd[k] = v
    return sd


@pytest.mark.parametrize("size", [(96, 96), (64, 128)])
def test_other_input_size_equals_model_built_for_it(size):
    model, x = randomize(_tiny()), image(*size)
    grids = [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]
    native = _tiny(img_size=size)
    native.load_state_dict(_resized_state_dict(model, grids))
    with torch.no_grad():
        assert max_rel(model(x), native(x)) < 1e-5
        assert [tuple(f.shape[-2:]) for f in model.forward_intermediates(x, intermediates_only=True)] == grids


def test_input_size_errors():
    with pytest.raises(ValueError, match="needs at least 32x32"):
        _tiny()(image(16, 64))
    with pytest.raises(ValueError, match="attn_type"):
        AgentPyramidVisionTransformer(**dict(TINY, attn_type="AACA"))
    with pytest.raises(ValueError, match="num_stages must be 4"):
        AgentPyramidVisionTransformer(**dict(TINY, num_stages=3))


def test_dense_prediction_agent_shapes():
    # official downstream_agent_shape: another agent grid than trained, biases resized along the agent axis
    model = randomize(_tiny())
    same = _tiny(agent_shapes=[(2, 2)] * 4)
    dense = _tiny(agent_shapes=[(3, 3), (3, 3), (3, 3), None])
    same.load_state_dict(model.state_dict())
    dense.load_state_dict(model.state_dict())
    x = image(64, 64)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(same(x), ref, rtol=0, atol=0)  # the trained grid is the identity case
        out = dense(x)
    assert torch.isfinite(out).all() and max_rel(out, ref) > 1e-2  # 9 agents instead of 4 change the result


# --- 'B' (spatial-reduction) stages and agent stages with a reduced key grid -----------------------------------------

def test_spatial_reduction_attention_matches_timm_pvt_v2():
    torch.manual_seed(0)
    ours = SpatialReductionAttention(16, num_heads=2, qkv_bias=True, sr_ratio=2).eval()
    timm_attn = TimmPvtAttention(16, num_heads=2, sr_ratio=2, qkv_bias=True).eval()
    timm_attn.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        assert max_rel(ours(x, (8, 8)), timm_attn(x, [8, 8])) < 1e-6


def test_mixed_stages_and_agent_sr_run_and_train():
    model = _tiny(attn_type="ABAB", sr_ratios=(4, 2, 2, 1), agent_sr_ratios="2111")
    assert model.block1[0].attn.ah_bias.shape == (1, 4, 8, 1)  # keys on the sr=2 grid of 16x16
    assert model.block1[0].attn.ha_bias.shape == (1, 16, 1, 4)
    assert isinstance(model.block2[0].attn, SpatialReductionAttention)
    model.train()
    out = model(image(64, 64))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(image(96, 64)).shape == (2, 10)  # reduced key grid at another size


def test_compiled_training_fuses_the_q_and_kv_projections_and_matches_eager():
    # under torch.compile the sr-1 agent blocks project q and kv in one GEMM; the sr-2 block keeps its two layers
    model = _tiny(agent_sr_ratios="2111").train()
    x = image(64, 64)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=capture, fullgraph=True)
    out = compiled(x)
    linears = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is F.linear]
    # four blocks: proj, fc1, fc2 each; q + kv in the sr-2 block, one fused GEMM in the three others; the head
    assert len(linears) == 4 * 3 + 2 + 3 + 1
    attn = model.block2[0].attn
    params = [attn.q.weight, attn.kv.weight, attn.kv.bias, model.block1[0].attn.q.weight]
    got = torch.autograd.grad(out.square().sum(), params)
    eager = model(x)
    want = torch.autograd.grad(eager.square().sum(), params)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
        assert g.abs().max() > 0
    torch._dynamo.reset()


def test_inference_projects_q_and_kv_in_one_kept_gemm_that_follows_the_parameters():
    model = _tiny()
    attn = model.block1[0].attn
    x = image(32, 32)
    calls = []
    hook = attn.q.register_forward_hook(lambda *_: calls.append("q"))
    with torch.no_grad():
        fused = model(x)
        kept = attn._fused_weights()
        assert attn._fused_weights() is kept  # kept, not concatenated again
        torch.testing.assert_close(kept[0], torch.cat([attn.q.weight, attn.kv.weight]), rtol=0, atol=0)
        with torch.autocast("cpu", torch.bfloat16):
            assert attn._fused_weights()[0].dtype == torch.bfloat16  # one entry per compute dtype
        assert attn._fused_weights() is kept
        attn.kv.weight.mul_(3.0)  # an in-place update: a new version
        changed = model(x)
        assert attn._fused_weights() is not kept
    assert not calls  # no separate q layer call without autograd
    separate = model(x)  # with autograd: the two layers
    assert calls and separate.grad_fn is not None
    torch.testing.assert_close(separate.detach(), changed, rtol=1e-5, atol=1e-6)
    assert (changed - fused).abs().max().item() > 1e-4
    hook.remove()
    assert clear_parameter_caches(model) >= len(model.block1) + len(model.block4)
    assert "_zoo_fused_projection" not in attn.__dict__


# --- GPU --------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity_backends_and_compile(no_tf32):
    case = json.loads((FIXTURES / "agent_pvt_tiny_224.json").read_text())
    tensors = load_file(str(FIXTURES / "agent_pvt_tiny_224.safetensors"))
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
