"""READ: Similarity-as-Points parity, hand-made cases, SAM wiring and the LISA-style wrapper end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zoo.multimodal import read as R

CASE = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "read_sasp" / "sasp_576_ds2"


# --- SasP -------------------------------------------------------------------------------------------------------------

def test_parity_with_official_sasp():
    from safetensors.torch import load_file

    meta = json.loads(CASE.with_suffix(".json").read_text())
    t = load_file(str(CASE.with_suffix(".safetensors")))
    tol = meta["suggested_tolerance"]
    sim = R.compute_similarity_map(t["seg_token"], t["input"])
    torch.testing.assert_close(sim, t["similarity"], **tol["similarity"])
    points, labels = R.similarity_map_to_points(sim[0, :, 0], (480, 640), t=0.8, down_sample=2)
    assert torch.equal(labels, t["labels"].long())
    assert int((labels == 1).sum()) == meta["num_pos"] and int((labels == 0).sum()) == meta["num_neg"]
    torch.testing.assert_close(points, t["output"], **tol["output"])


def test_similarity_weights_for_several_seg_tokens():
    torch.manual_seed(0)
    img, seg = torch.randn(1, 9, 4), torch.randn(2, 4)
    sim = R.compute_similarity_map(seg, img)
    prob = torch.softmax(2 * img[0, 0] @ seg.t(), dim=-1)
    w = prob / prob.mean()
    torch.testing.assert_close(sim[0], (img[0] @ seg.t()) * w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R.compute_similarity_map(seg[0], img[0])[0, :, 0], img[0] @ seg[0], rtol=1e-6, atol=1e-6)
    red = torch.randn(2, 4)
    torch.testing.assert_close(R.compute_similarity_map(seg, img, red), img @ (seg - red).t())


def test_points_by_hand_square_image():
    # 4x4 grid, no down-sampling, square 40x40 image: cells are 10 px, centres at 5, 15, 25, 35
    values = torch.tensor([1.0, 0.9, 0.5, 0.0,
                           0.1, 0.85, 0.3, 0.2,
                           0.6, 0.4, 0.05, 0.7,
                           0.15, 0.45, 0.55, 0.65])
    points, labels = R.similarity_map_to_points(values, (40, 40), down_sample=1, num_points=30, refine=False)
    # positives >= 0.8 descending: idx 0 (1.0), 1 (0.9), 5 (0.85); negatives in [0, 0.2] ascending:
    # 3 (0.0), 10 (0.05), 4 (0.1), 12 (0.15), 7 (0.2); neutrals in index order: 2, 6, 8, 9, 11, 13, 14, 15
    order = [0, 1, 5, 3, 10, 4, 12, 7, 2, 6, 8, 9, 11, 13, 14, 15]
    expected = torch.tensor([[(i % 4) * 10 + 5, (i // 4) * 10 + 5] for i in order], dtype=torch.float32)
    assert torch.equal(points, expected)
    assert labels.tolist() == [1, 1, 1] + [0] * 5 + [-1] * 8
    few, few_labels = R.similarity_map_to_points(values, (40, 40), down_sample=1, num_points=4, refine=False)
    assert torch.equal(few, expected[:4]) and few_labels.tolist() == [1, 1, 1, 0]
    _, lower = R.similarity_map_to_points(values, (40, 40), t=0.6, down_sample=1, refine=False)
    assert int((lower == 1).sum()) == 6  # 1.0, 0.9, 0.85, 0.7, 0.65, 0.6


def test_points_by_hand_wide_image_padding():
    # 2x2 grid on a 20x40 image: the map is padded with -1 to 2x4 (one column each side), never selected;
    # cell width 40 / 4 = 10, height 20 / 2 = 10
    values = torch.tensor([0.0, 1.0, 0.5, 0.25])
    points, labels = R.similarity_map_to_points(values, (20, 40), down_sample=1, refine=False)
    assert labels.tolist() == [1, 0, -1, -1]
    # padded flat indices: (0,2)=1.0, (0,1)=0.0, (1,1)=0.5, (1,2)=0.25
    assert points.tolist() == [[25.0, 5.0], [15.0, 5.0], [15.0, 15.0], [25.0, 15.0]]


def test_refinement_window_equals_the_full_softmax_centroid():
    torch.manual_seed(0)
    sim = torch.randn(144)
    shape = (50, 70)
    full = R.similarity_to_image_map(sim, shape)
    pts = torch.tensor([[0, 0], [69, 49], [33, 20], [5, 44]])
    # the official definition over the whole image
    probs = F.softmax(full.reshape(-1), dim=0)
    gx, gy = torch.meshgrid(torch.arange(70.0), torch.arange(50.0), indexing="xy")
    gx, gy = gx.reshape(-1), gy.reshape(-1)
    ref = []
    for x, y in pts.float():
        wgt = torch.exp(-((gx - x) ** 2 + (gy - y) ** 2)) * probs
        wgt = wgt / wgt.sum()
        ref.append(torch.stack([(gx * wgt).sum(), (gy * wgt).sum()]))
    torch.testing.assert_close(R.refine_points(full, pts), torch.stack(ref), rtol=1e-5, atol=1e-4)


def test_full_resolution_map_shape_and_range():
    sim = torch.arange(16.0)
    full = R.similarity_to_image_map(sim, (30, 60), clip_size=8)
    assert full.shape == (30, 60)
    assert full.min() >= 0 and full.max() <= 1
    assert full[:, 0].abs().max() == 0  # zero padding on the sides of a wide image


def test_sasp_errors():
    with pytest.raises(ValueError, match="square"):
        R.similarity_map_to_points(torch.randn(10), (10, 10))
    with pytest.raises(ValueError, match="t_neg"):
        R.similarity_map_to_points(torch.randn(16), (10, 10), t=0.1, t_neg=0.2)
    with pytest.raises(ValueError, match="seg_state"):
        R.compute_similarity_map(torch.randn(1, 3), torch.randn(1, 9, 4))


# --- SAM wiring -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sam():
    transformers = pytest.importorskip("transformers")
    from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig, SamPromptEncoderConfig,
                                                           SamVisionConfig)

    vision = SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                             image_size=64, patch_size=16, mlp_dim=32, global_attn_indexes=[0], window_size=0,
                             num_pos_feats=4)
    prompt = SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=8, mlp_dim=16, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=8)
    torch.manual_seed(0)
    config = transformers.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    return transformers.SamModel(config).eval()


def test_sam_frame_and_postprocessing_by_hand():
    assert R.sam_preprocess_shape((480, 640)) == (768, 1024)
    pts = torch.tensor([[100.0, 50.0]])
    assert R.points_to_sam_frame(pts, (480, 640)).tolist() == [[160.0, 80.0]]
    low = torch.zeros(1, 16, 16)
    low[0, :8, :] = 1.0  # the upper half of the padded 64 x 64 square
    out = R.postprocess_sam_masks(low, (20, 40), long_side=64)
    assert out.shape == (1, 20, 40)
    # a 20 x 40 image fills the top 32 x 64 of the square: the crop keeps the ones (blurred at the crop edge)
    assert out[0, :15].min() == pytest.approx(1.0)
    assert out[0, -1].min() < 1.0


def test_postprocessing_matches_transformers_image_processor():
    from transformers import SamImageProcessor

    torch.manual_seed(0)
    low = torch.randn(1, 2, 1, 16, 16)
    proc = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    ref = proc.post_process_masks(low, original_sizes=[(30, 50)], reshaped_input_sizes=[(38, 64)],
                                  binarize=False)[0]
    assert R.sam_preprocess_shape((30, 50), 64) == (38, 64)
    torch.testing.assert_close(R.postprocess_sam_masks(low[0, :, 0], (30, 50), 64), ref[:, 0], rtol=1e-5, atol=1e-6)


def test_points_only_prompt_equals_sam_forward(tiny_sam):
    torch.manual_seed(1)
    pixel = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        emb = tiny_sam.get_image_embeddings(pixel)
        coords = torch.tensor([[[3.0, 4.0], [20.0, 9.0], [11.0, 30.0]]])
        labels = torch.tensor([[1, 0, -1]])
        ours = R.sam_masks_from_prompts(tiny_sam, emb, coords, labels, None, (32, 48))
        ref = tiny_sam(image_embeddings=emb, input_points=R.points_to_sam_frame(coords, (32, 48), 64)[None],
                       input_labels=labels[None], multimask_output=False).pred_masks
    torch.testing.assert_close(ours, R.postprocess_sam_masks(ref[0, :, 0], (32, 48), 64), rtol=1e-5, atol=1e-6)


def test_seg_embedding_is_an_extra_sparse_token(tiny_sam):
    seen = {}
    handle = tiny_sam.mask_decoder.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(sparse=kwargs["sparse_prompt_embeddings"]), with_kwargs=True)
    try:
        with torch.no_grad():
            emb = tiny_sam.get_image_embeddings(torch.randn(1, 3, 64, 64))
            seg = torch.randn(2, 8)
            coords = torch.rand(2, 5, 2) * 30
            labels = torch.tensor([[1, 1, 0, -1, -1], [1, 0, 0, 0, -1]])
            masks = R.sam_masks_from_prompts(tiny_sam, emb, coords, labels, seg, (30, 30))
    finally:
        handle.remove()
    assert masks.shape == (2, 30, 30)
    sparse = seen["sparse"]
    assert sparse.shape == (1, 2, 5 + 1 + 1, 8)  # points, SAM's pad point, <SEG>
    assert torch.equal(sparse[0, :, -1], seg)
    not_a_point = tiny_sam.prompt_encoder.not_a_point_embed.weight[0]
    assert torch.equal(sparse[0, 0, 3], not_a_point) and torch.equal(sparse[0, 0, 5], not_a_point)


def test_seg_hidden_mask_shift():
    ids = torch.tensor([[5, 7, 9, 7], [9, 5, 5, 5]])
    assert R.seg_hidden_mask(ids, 9).tolist() == [[False, True, False, False], [False, False, False, False]]
    assert R.seg_hidden_mask(ids, 9, seg_shift=0).tolist() == [[False, False, True, False],
                                                              [True, False, False, False]]


# --- LISA-style wrapper end to end ------------------------------------------------------------------------------------

def test_read_segmenter_end_to_end_with_tiny_llama(tiny_sam):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    seg_id, image_id = 39, 38
    ids = torch.randint(1, 30, (2, 30))
    ids[:, 2:18] = image_id  # 16 image tokens: a 4 x 4 grid
    ids[0, 25] = seg_id
    ids[1, 22] = ids[1, 27] = seg_id
    model = R.READSegmenter(lm, tiny_sam, seg_id, num_points=10, down_sample=1)
    sizes = [(48, 40), (30, 64)]
    out = model(ids, ids == image_id, torch.randn(2, 3, 64, 64), sizes, labels=ids)
    assert [m.shape for m in out.pred_masks] == [(1, 48, 40), (2, 30, 64)]
    assert [p.shape for p in out.points] == [(1, 10, 2), (2, 10, 2)]
    assert out.seg_embeddings[1].shape == (2, 8)
    assert out.lm_output.loss is not None
    # the <SEG> state is the one before the <SEG> token: its projection is the sparse prompt
    hidden = out.lm_output.hidden_states[-1]
    torch.testing.assert_close(out.seg_embeddings[1], model.text_hidden_fcs(hidden[1, [21, 26]]))
    loss = sum(m.sigmoid().mean() for m in out.pred_masks) + out.lm_output.loss
    loss.backward()
    for p in model.text_hidden_fcs.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_sam.vision_encoder.parameters())  # frozen SAM image encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_sam.mask_decoder.parameters())
    tiny_sam.zero_grad(set_to_none=True)


def test_read_segmenter_without_seg_token_gives_no_masks(tiny_sam):
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(1, 30, (1, 20))
    ids[0, 1:17] = 38
    model = R.READSegmenter(lm, tiny_sam, 39)
    with torch.no_grad():
        out = model(ids, ids == 38, torch.randn(1, 3, 64, 64), [(10, 12)])
    assert out.pred_masks[0].shape == (0, 10, 12)
    with pytest.raises(ValueError, match="original_sizes"):
        model(ids, ids == 38, torch.randn(1, 3, 64, 64), [(10, 12), (3, 3)])
