"""Agent-CSwin: parity with the official implementation, official checkpoints, timm interface, other input sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo
from backbone_checks import randomize, resize_1d
from zoo.backbones.agent_cswin import AgentCSWinTransformer
from zoo.convert import from_official, load_official_state_dict
from zoo.ops.triton import interpreter_missing_reason

HERE = Path(__file__).resolve().parent
FIXTURES = Path(__file__).parents[1] / "fixtures" / "parity" / "agent_attention"
CASE = "agent_cswin_tiny_224"
VARIANT_KEYS = {  # zoo name -> keys.json entry
    "agent_cswin_t": "agent_cswin_tiny_224",
    "agent_cswin_s": "agent_cswin_small_224",
    "agent_cswin_b": "agent_cswin_base_224",
    "agent_cswin_b_384": "agent_cswin_base_384",
}
# A small model for interface tests: stage 1 agent stripes (la_split 4 < 16), stage 2 global agents, stage 3 LePE
# stripes, stage 4 global LePE.
TINY = dict(img_size=64, embed_dim=8, depth=(1, 1, 1, 1), split_size=(1, 2, 2, 2), la_split_size=(4, 8, 4, 2),
            num_heads=(2, 2, 4, 4), agent_num=(4, 4, 4, 4), attn_type="AABB", num_classes=10, drop_path_rate=0.0)


def _fixture():
    meta = json.loads((FIXTURES / f"{CASE}.json").read_text())
    tensors = load_file(str(FIXTURES / f"{CASE}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    return meta, tensors, sd


def _keys():
    return json.loads((FIXTURES / "agent_cswin_keys.json").read_text())


def _assert_close(out, ref, rel=1e-5):
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 0.1, "degenerate reference"
    assert err <= rel * scale, f"max|diff| {err:.3g} > {rel} * {scale:.3g}"


def _fixture_model_kwargs(meta):
    kw = dict(meta["kwargs"])
    kw.pop("patch_size")  # the official class ignores it
    return kw


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_parity_with_official(backend, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", f"window_attention:{backend},agent_attention:{backend}")
    meta, t, sd = _fixture()
    model = from_official(meta["family"], meta["class"], meta["kwargs"], sd).eval()
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    with torch.no_grad():
        final, feats = model.forward_intermediates(t["input"], output_fmt="NHWC")
        logits = model.forward_head(final)
    _assert_close(logits, t["output"])
    for i, feat in enumerate(feats):  # official features are (B, H*W, C) after each stage's last block
        _assert_close(feat.flatten(1, 2), t[f"feat.{i}"])


def test_checkpoint_path_prefers_ema_weights(tmp_path):
    """main_ema.py checkpoints carry the EMA weights next to the raw ones; the EMA copy is loaded (as timm does)."""
    meta, t, sd = _fixture()
    raw = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "agent_cswin_release.pth"
    torch.save({"model": raw, "state_dict_ema": sd, "max_accuracy": 83.1, "epoch": 300}, path)
    model = zoo.create_model("agent_cswin_t", checkpoint_path=path, **_fixture_model_kwargs(meta)).eval()
    with torch.no_grad():
        _assert_close(model(t["input"]), t["output"])


@pytest.mark.parametrize("name", list(VARIANT_KEYS))
def test_variant_loads_official_keys_strictly(name):
    entry = _keys()[VARIANT_KEYS[name]]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = zoo.create_model(name)
        sd = {k: torch.empty(shape) for k, shape in entry["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    assert set(model.state_dict()) == set(sd)
    load_official_state_dict("agent_attention", model, {"model": sd})  # strict: raises on any mismatch


def test_from_official_full_size_kwargs():
    entry = _keys()["agent_cswin_base_384"]
    with torch.device("meta"):
        model = from_official("agent_attention", entry["official_class"], entry["official_kwargs"],
                              {k: torch.empty(s) for k, s in entry["state_dict"].items()})
    assert isinstance(model, AgentCSWinTransformer)
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    with pytest.raises(ValueError, match="hybrid_backbone must be None"):
        from_official("agent_attention", "CSWinTransformer", dict(TINY, hybrid_backbone="resnet"))


def test_pretrained_cfgs_and_names():
    for name in VARIANT_KEYS:
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert cfg.url.startswith("https://cloud.tsinghua.edu.cn/f/")
        assert cfg.first_conv == "stage1_conv_embed.0" and cfg.classifier == "head"
    assert timm.models.get_pretrained_cfg("agent_cswin_b_384").input_size == (3, 384, 384)
    assert zoo.list_models("agent_cswin*") == sorted(VARIANT_KEYS)


def test_forward_features_head_and_classifier():
    torch.manual_seed(0)
    model = zoo.create_model("agent_cswin_t", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 2, 64)
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.allclose(pooled, feats.mean((1, 2)))
        assert torch.allclose(model(x), model.head(pooled), atol=1e-6)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0, global_pool="")
        assert model(x).shape == (2, 2, 2, 64)
    assert model.num_features == 64


def test_branches_follow_split_sizes():
    model = zoo.create_model("agent_cswin_t", **TINY)
    kinds = [[(type(a).__name__, a.idx, a.window_size) for a in blk.attns]
             for blk in (model.stage1[0], model.stage2[0], model.stage3[0], model.stage4[0])]
    assert kinds == [
        [("AgentAttention", 0, (16, 4)), ("AgentAttention", 1, (4, 16))],  # agent stripes
        [("AgentAttention", -1, (8, 8))],                                    # la_split == stage size: global
        [("LePEAttention", 0, (4, 2)), ("LePEAttention", 1, (2, 4))],        # LePE stripes
        [("LePEAttention", -1, (2, 2))],                                     # last stage: global
    ]


def test_features_only():
    model = zoo.create_model("agent_cswin_t", features_only=True, out_indices=(1, 2), **TINY).eval()
    assert model.feature_info.channels() == [16, 32]
    assert model.feature_info.reduction() == [8, 16]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 8, 8), (1, 32, 4, 4)]
    assert model.model.merge3 is None and len(model.model.stage4) == 0  # pruned


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = zoo.create_model("agent_cswin_t", **TINY).train()
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7), n


def test_no_weight_decay_and_group_matcher():
    model = zoo.create_model("agent_cswin_t", **TINY)
    leaf = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")
    nwd = model.no_weight_decay()
    assert nwd == {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in leaf}
    assert len(nwd) == 3 * 6  # two stripe branches in stage 1, one global branch in stage 2
    groups = list(timm.models.group_parameters(model, model.group_matcher()).values())
    assert all(n.startswith("stage1_conv_embed") for n in groups[0])
    assert all(n.startswith("merge1.") for n in groups[2])  # merge 1 follows stage 1's block
    assert groups[-2][-2:] == ["norm.weight", "norm.bias"] and groups[-1] == ["head.weight", "head.bias"]
    assert len(groups) == 1 + 4 + 3 + 1
    coarse = list(timm.models.group_parameters(model, model.group_matcher(coarse=True)).values())
    assert len(coarse) == 1 + 4 + 1  # stem, stages (each with the merge after it; the last with the norm), head
    assert coarse[1][0].startswith("stage1.") and coarse[1][-1].startswith("merge1.")


def test_other_input_size_equals_model_built_for_it():
    """Run at 256, a model built for 128 equals the (official classification) model built for 256 with its
    row/column agent biases resized (bilinear resizing of row + column biases = sum of their 1-D resizes)."""
    kw = dict(img_size=128, embed_dim=8, depth=(1, 1, 1, 1), split_size=(1, 2, 4, 4), la_split_size=(32, 16, 8, 4),
              num_heads=(2, 2, 4, 4), agent_num=(4, 9, 4, 4), attn_type="AAAB", num_classes=10)
    small = randomize(AgentCSWinTransformer(**kw), vector_std=0.5)
    big = AgentCSWinTransformer(**dict(kw, img_size=256, la_split_size=(64, 32, 16, 8))).eval()
    big_sd = big.state_dict()
    for k, v in small.state_dict().items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            dim = {"ah_bias": 2, "aw_bias": 3, "ha_bias": 1, "wa_bias": 2}[leaf]
            v = resize_1d(v, big_sd[k].shape[dim], dim)
        assert v.shape == big_sd[k].shape, k
        big_sd[k] = v
    big.load_state_dict(big_sd)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = big(x)
        out = small(x)
        native = small(x[:, :, ::2, ::2])
    _assert_close(out, ref)
    assert (out - native).abs().max().item() > 1e-3  # the input size really changed the computation


def test_non_multiple_input_sizes_run():
    meta, _, sd = _fixture()
    model = AgentCSWinTransformer(**_fixture_model_kwargs(meta)).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        for size in ((200, 232), (97, 130)):  # 7-wide stripes padded symmetrically
            out, feats = model.forward_intermediates(torch.randn(1, 3, *size))
            assert torch.isfinite(out).all()
            assert feats[0].shape[-2:] == ((size[0] - 3) // 4 + 1, (size[1] - 3) // 4 + 1)
        with pytest.raises(ValueError, match="at least 32x32"):
            model(torch.randn(1, 3, 16, 64))


def test_stripe_padding_is_symmetric():
    """An odd-sized map pads stripes on both sides and crops back: a LePE branch is translation-consistent with
    the same branch on a map that already has the padding."""
    torch.manual_seed(0)
    blk = randomize(AgentCSWinTransformer(**TINY), vector_std=0.5).stage3[0]  # LePE stripes of width 2
    branch = blk.attns[0]  # columns (H, 2)
    q, k, v = (torch.randn(1, 4, 5, 16) for _ in range(3))  # W=5 -> padded to 6: 0 left, 1 right
    with torch.no_grad():
        out = branch(q, k, v)
        padded = branch(*(F.pad(t, (0, 0, 0, 1)) for t in (q, k, v)))[:, :, :5]
    assert torch.allclose(out, padded, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(attn_type="ABB"), "one of 'A', 'B', 'M' per stage"),
    (dict(agent_num=(4, 5, 4, 4)), "agent_num must be a positive perfect square"),
    (dict(depth=(1, 1, 1)), "need 4 stages"),
    (dict(global_pool="max"), "global_pool must be 'avg' or ''"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AgentCSWinTransformer(**dict(TINY, **kwargs))


def check_lepe_term_added_by_the_conv_kernel():
    """(Run by the test below, in Triton's interpreter with ``depthwise_conv`` on its kernel.) The branches whose
    windows are views of their attention output (row stripes, whole maps) pass it to the LePE conv's kernel as its
    residual; outputs and gradients are the bits of the sum made after the conv, in float32 and float16 autocast
    inference and in float32 training. TINY has agent stripes and global agents, LePE stripes and a global LePE."""
    import warnings

    from zoo.backbones import agent_cswin

    warnings.filterwarnings("error", message=".*cannot serve this input")  # a fallback would compare the reference
    real_lepe = agent_cswin._Branch.lepe

    def lepe_then_add(self, v, window, residual=None):
        out = real_lepe(self, v, window)
        return out if residual is None else residual + out

    model = randomize(AgentCSWinTransformer(**TINY))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(lepe, grad: bool, amp: bool):
        agent_cswin._Branch.lepe = lepe
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            y = model(x)
        if not grad:
            return [y]
        y.square().sum().backward()
        return [y.detach()] + [p.grad for p in model.parameters()]

    try:
        for grad, amp in ((False, False), (False, True), (True, False)):
            fused, separate = run(real_lepe, grad, amp), run(lepe_then_add, grad, amp)
            assert all(torch.equal(a, b) for a, b in zip(fused, separate)), (grad, amp)
    finally:
        agent_cswin._Branch.lepe = real_lepe


def test_lepe_term_added_by_the_conv_kernel_in_the_interpreter():
    if interpreter_missing_reason() is not None:
        pytest.skip(interpreter_missing_reason())
    env = {**os.environ, "TRITON_INTERPRET": "1", "ZOO_OPS_BACKEND": "depthwise_conv:triton",
           "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    code = "import test_agent_cswin as t\nt.check_lepe_term_added_by_the_conv_kernel()\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-6000:]


# ---------------------------------------------------------------------------------------------------------------
# GPU (run by the lead: pytest -m gpu tests/backbones/test_agent_cswin.py)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_parity_and_compile(no_tf32):  # (TF32 convolutions would dominate the float32 error)
    meta, t, sd = _fixture()
    model = from_official(meta["family"], meta["class"], meta["kwargs"], sd).cuda().eval()
    x = t["input"].cuda()
    with torch.no_grad():
        _assert_close(model(x).cpu(), t["output"])
        _assert_close(torch.compile(model)(x).cpu(), t["output"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["agent_cswin_t", "agent_cswin_b_384"])
def test_gpu_full_size_bf16_train_step(name):
    torch.manual_seed(0)
    model = zoo.create_model(name).cuda().train()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)
