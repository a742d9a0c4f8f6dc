"""ConTEXTual Net 3D: parity with the official ContextUNETR, the gating attention, the text encoder, and a CPU
overfit on small phantoms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from zoo.multimodal.grounding.contextual_net import ContextualNet3D, LanguageGate, official_state_dict
from zoo.multimodal.grounding.data import GroundingDataset, cases_from_phantom
from zoo.multimodal.grounding.metrics import dice_ce_loss, dice_score
from zoo.multimodal.grounding.phantoms import REPORT_WORDS, make_petct_phantom
from zoo.multimodal.grounding.text_encoder import build_tiny_text_encoder, scrub_stated_values

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "parity" / "contextual_net_3d"


@pytest.fixture(scope="module")
def tiny_encoder():
    return build_tiny_text_encoder(REPORT_WORDS, hidden_size=32, max_length=24)


def test_parity_with_official_contextunetr():
    from safetensors.torch import load_file

    meta = json.loads((FIXTURES / "contextual_net_3d_f4.json").read_text())
    tensors = load_file(str(FIXTURES / "contextual_net_3d_f4.safetensors"))
    state = official_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("sd.")})
    model = ContextualNet3D(in_channels=2, out_channels=2, feature_size=4, text_dim=16).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(tensors["input"], tensors["tokens"])
    err = (out - tensors["output"]).abs().max().item()
    assert err <= meta["tolerance"]["atol"], err
    assert tensors["output"].abs().max().item() > 0.5  # a non-degenerate reference


def test_official_size_and_keys():
    model = ContextualNet3D()  # feature size 48, Llama-2-7B width
    assert sum(p.numel() for p in model.parameters()) == 17_041_536  # official ContextUNETR, LLaMA excluded
    widths = [getattr(model, f"lang_proj{n}").out_features for n in range(1, 6)]
    assert widths == [384, 192, 96, 48, 48]
    official = {f"module.{k}": v for k, v in model.state_dict().items()}
    official["module.llama_model.embed_tokens.weight"] = torch.zeros(2, 2)
    assert official_state_dict(official).keys() == model.state_dict().keys()


def test_gate_equals_multihead_attention_reference():
    torch.manual_seed(0)
    gate = LanguageGate(8).double()
    with torch.no_grad():
        gate.multihead_attn.in_proj_bias.normal_()
        gate.multihead_attn.out_proj.bias.normal_()
    mha = nn.MultiheadAttention(8, num_heads=1).double()  # sequence-first, as the official module calls it
    mha.load_state_dict(gate.multihead_attn.state_dict())
    vision = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    tokens = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    voxels = vision.flatten(2).permute(2, 0, 1)  # (N, B, C)
    for token_mask, padding in ((None, None), (mask, ~mask)):
        att, _ = mha(voxels, tokens.transpose(0, 1), tokens.transpose(0, 1), key_padding_mask=padding)
        want = (voxels * torch.tanh(att)).permute(1, 2, 0).reshape(vision.shape)
        torch.testing.assert_close(gate(tokens, vision, token_mask), want, rtol=1e-12, atol=1e-12)


def test_input_checks_and_text_dependence(tiny_encoder):
    torch.manual_seed(0)
    net = ContextualNet3D(feature_size=4, text_dim=tiny_encoder.hidden_size)
    x = torch.rand(2, 2, 32, 32, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.rand(1, 2, 32, 32, 48), torch.rand(1, 5, 32))
    with pytest.raises(ValueError, match="one bottleneck voxel"):
        net(torch.rand(1, 2, 32, 32, 32), torch.rand(1, 5, 32))
    with pytest.raises(ValueError, match="text_dim=32"):
        net(x, torch.rand(2, 5, 16))
    tokens, mask = tiny_encoder(["left upper nodal lesion", "right lower osseous lesion"])
    tokens.requires_grad_(True)
    out = net(x, tokens, mask)
    assert out.shape == (2, 2, 32, 32, 64)
    same_image = net(x[:1].expand(2, -1, -1, -1, -1), tokens, mask)
    assert (same_image[0] - same_image[1]).abs().max() > 1e-3  # the sentence changes the segmentation
    out.square().mean().backward()
    assert tokens.grad.abs().sum() > 0


def test_text_encoder_pads_like_the_official_forward(tiny_encoder):
    ids, mask = tiny_encoder.tokenize(["left upper lesion", "right"])
    assert ids.shape == mask.shape == (2, 24)
    assert mask.sum(1).tolist() == [5, 3]  # [CLS] words [SEP]
    assert ids[0, 5:].eq(0).all() and ids[1, 3:].eq(0).all()
    hidden, token_mask = tiny_encoder(["left upper lesion"])
    assert hidden.shape == (1, 24, 32) and token_mask.dtype == torch.bool
    assert not any(p.requires_grad for p in tiny_encoder.parameters())
    tiny_encoder.train()
    assert not tiny_encoder.model.training  # frozen encoders stay in eval mode


def test_scrub_stated_values():
    sentence = "Left node on axial slice 88 (PET 188) with SUV max 6.2..."
    assert scrub_stated_values(sentence, 88, 6.2) == "Left node on axial slice  (PET 1) with SUV max"
    assert scrub_stated_values("SUV max 12 on slice 40", 40, 12.0) == "SUV max 12 on slice"  # float '12.0'
    assert scrub_stated_values(sentence, mode="all_numbers") == "Left node on axial slice (PET ) with SUV max ..."


def test_overfits_and_grounds_small_phantoms_on_cpu(tiny_encoder):
    """Two phantoms (32x32x64) with two lesions each: every sentence, numbers scrubbed, names one lesion by side and
    level. The network must segment the named lesion (Dice >= 0.8) and leave the other one out. About 10 s on two
    idle cores."""
    phantoms = [make_petct_phantom(seed=seed, n_lesions=2, radius=(5.0, 6.0)) for seed in range(2)]
    cases = [case for phantom in phantoms for case in cases_from_phantom(phantom, labels="planted")]
    others = [torch.from_numpy(phantom.masks[1 - n]) for phantom in phantoms for n in range(2)]
    data = GroundingDataset(cases)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    y = torch.stack([data[i]["label"] for i in range(len(data))])
    assert torch.equal(x[0], x[1]) and not torch.equal(y[0], y[1])  # same scan, two sentences, two targets
    tokens, mask = tiny_encoder([c.text for c in cases])
    torch.manual_seed(0)
    # padding tokens masked (an option; the official model attends to them): the sentence's words then carry the
    # whole attention, which makes the side/level choice quicker to learn (about 60 steps with this seed)
    net = ContextualNet3D(in_channels=2, feature_size=8, text_dim=tiny_encoder.hidden_size, mask_padding_tokens=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(300):
        logits = net(x, tokens, mask)  # instance norm only: train and eval modes compute the same
        if dice_score(logits.argmax(1), y).min() >= 0.85:
            break
        optimizer.zero_grad()
        dice_ce_loss(logits, y).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        pred = net(x, tokens, mask).argmax(1)
    dice = dice_score(pred, y)
    assert dice.min() >= 0.8, (step, dice)
    assert dice_score(pred, torch.stack(others)).max() < 0.2  # the lesion the sentence does not name stays out
