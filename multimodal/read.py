"""READ's Similarity-as-Points (SasP) prompts and a LISA-style <SEG> -> SAM wrapper on transformers' ``SamModel``.

Facts follow the official code (rui-qian/READ @ 25492402, ``model/READ.py``: ``compute_similarity_map``,
``similarity_map_to_points``, ``generate_pred_masks``, ``model_forward``/``evaluate``; its SAM prompt encoder in
``model/segment_anything/modeling/prompt_encoder.py``).

SasP, for one <SEG> token:

1. similarity of every image-token hidden state with the <SEG> hidden state, both from the LLM's last layer
   (CLIP-Surgery weighting, which is 1 for a single <SEG>, so a plain dot product);
2. the 24 x 24 map is bilinearly shrunk by ``down_sample`` (2 -> 12 x 12), min-max normalised, and padded to the
   image's aspect ratio with the value -1 (never selected);
3. positives: cells >= 0.8 (descending), negatives: cells in [0, 0.2] (ascending), neutrals: the rest in index
   order; the first ``num_points = 30`` of positives|negatives|neutrals become points at the cell centres in
   original-image pixels (truncated to int, clamped to W-1 / H-1) with labels 1 / 0 / -1;
4. each point is refined to the centroid of ``softmax(full-res map) * exp(-squared distance)``, where the
   full-resolution map is the min-max map resized to 336 x 336, zero-padded to the aspect ratio and resized to
   (H, W).

The points go to SAM in its long-side frame (``apply_coords``); label -1 is SAM's not-a-point embedding (neutral
points therefore act as padding, as in segment-anything; transformers' ``SamPromptEncoder`` treats -1 the same way
and also appends the pad point), and the projected <SEG> embedding is appended as one more sparse prompt token;
``multimask_output=False``.

Code/paper differences and options:

* ``similarity_map_to_points(..., t=...)``: the official function ignores ``t`` and hard-codes 0.8; here ``t`` is the
  positive threshold (the same at the default). The 13B ReasonSeg setting is ``num_points=60, t=0.6``.
* The hidden state taken "at <SEG>" is, in the official (LISA) code, the one at the position *before* the <SEG>
  token (``input_ids[:, 1:] == seg`` shifted into the image-expanded sequence): the state that predicts <SEG>.
  ``seg_shift=1`` (default) follows the code; ``seg_shift=0`` takes the <SEG> token's own state (the papers'
  wording).
* Ties in the sorts use a stable sort here (the official ``argsort`` leaves their order unspecified).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "compute_similarity_map", "similarity_to_image_map", "similarity_map_to_points", "refine_points",
    "sam_preprocess_shape", "points_to_sam_frame", "postprocess_sam_masks", "seg_hidden_mask", "sam_masks_from_prompts",
    "READOutput", "READSegmenter",
]

_CLIP_SIZE = 336  # the LLaVA-1.5 CLIP input size the official full-resolution map goes through
_REFINE_RADIUS = 8  # exp(-d^2) < 1e-27 beyond it: the window is exact in float32


# --- SasP -------------------------------------------------------------------------------------------------------------

def compute_similarity_map(seg_state: torch.Tensor, image_patch_states: torch.Tensor,
                           redundant_feats: torch.Tensor | None = None) -> torch.Tensor:
    """Similarity of image-token hidden states with <SEG> hidden states (CLIP-Surgery style, as READ).

    ``w = softmax(2 * first_token @ seg^T) / mean`` over the <SEG> tokens (1 for a single one), similarity =
    ``sum_c image[n, c] * seg[t, c] * w[t]``; with ``redundant_feats`` the plain ``image @ (seg - redundant)^T``.
    Hidden states are used as they are (no normalisation).

    Args:
        seg_state: (n_t, C) or (C,) hidden states at <SEG>.
        image_patch_states: (B, N, C) or (N, C) hidden states of the image tokens.
        redundant_feats: optional (n_t, C) or (C,) features subtracted from ``seg_state``.

    Returns:
        (B, N, n_t) similarities.
    """
    seg = seg_state.unsqueeze(0) if seg_state.ndim == 1 else seg_state
    img = image_patch_states.unsqueeze(0) if image_patch_states.ndim == 2 else image_patch_states
    if seg.ndim != 2 or img.ndim != 3 or seg.shape[-1] != img.shape[-1]:
        raise ValueError(f"seg_state must be (n_t, C) and image_patch_states (B, N, C) with the same C, got "
                         f"{tuple(seg_state.shape)} and {tuple(image_patch_states.shape)}")
    if redundant_feats is not None:
        return img @ (seg - redundant_feats).t()
    prob = (2 * (img[:, :1] @ seg.t())).softmax(dim=-1)  # (B, 1, n_t)
    w = prob / prob.mean(dim=-1, keepdim=True)
    return ((img.unsqueeze(2) * seg.view(1, 1, *seg.shape)) * w.unsqueeze(-1)).sum(-1)


def _grid_side(n: int) -> int:
    side = int(n ** 0.5)
    if side * side != n:
        raise ValueError(f"the image tokens must form a square grid, got {n}")
    return side


def _aspect_pads(target: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Padding (pad_h, pad_w) of a target x target map to the image aspect (the official float expressions)."""
    h, w = shape
    scale = target / min(h, w)
    new_h, new_w = int(h * scale), int(w * scale)
    return (new_h - target) // 2, (new_w - target) // 2


def similarity_to_image_map(sim: torch.Tensor, shape: Sequence[int], clip_size: int = _CLIP_SIZE) -> torch.Tensor:
    """Full-resolution similarity map (the official inner ``get_similarity_map``).

    Min-max over tokens, reshape to the square grid, bilinear to ``clip_size``^2, zero-pad to the image aspect,
    bilinear to ``shape``.

    Args:
        sim: (N,) similarities of one <SEG>.
        shape: original image (H, W).
        clip_size: side of the square CLIP input (336 for LLaVA-1.5).

    Returns:
        (H, W) map in [0, 1] (zeros where padded).
    """
    shape = (int(shape[0]), int(shape[1]))
    side = _grid_side(sim.numel())
    sm = (sim - sim.min()) / (sim.max() - sim.min())
    sm = sm.reshape(1, 1, side, side).float()
    sm = F.interpolate(sm, (clip_size, clip_size), mode="bilinear")
    pad_h, pad_w = _aspect_pads(clip_size, shape)
    sm = F.pad(sm, (pad_w, pad_w, pad_h, pad_h))
    return F.interpolate(sm, shape, mode="bilinear")[0, 0]


def refine_points(full_map: torch.Tensor, points: torch.Tensor, radius: int = _REFINE_RADIUS) -> torch.Tensor:
    """Discrete -> continuous points: centroid of ``softmax(map) * exp(-|p - point|^2)`` per point.

    The softmax normaliser cancels in the centroid and ``exp(-d^2)`` vanishes in float32 beyond a few pixels, so
    the sum runs over a (2 radius + 1)^2 window (the official code sums over the whole image).

    Args:
        full_map: (H, W) map.
        points: (K, 2) integer (x, y) pixel positions.
        radius: half side of the window.

    Returns:
        (K, 2) float (x, y).
    """
    if points.numel() == 0:
        return points.to(full_map.dtype).reshape(0, 2)
    h, w = full_map.shape
    offsets = torch.arange(-radius, radius + 1, device=full_map.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    xs = points[:, 0].to(full_map.device).long().view(-1, 1, 1) + dx
    ys = points[:, 1].to(full_map.device).long().view(-1, 1, 1) + dy
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    values = full_map[ys.clamp(0, h - 1), xs.clamp(0, w - 1)]
    logits = values - full_map.max().detach() - (dx ** 2 + dy ** 2).to(full_map.dtype)
    weights = torch.where(inside, logits.exp(), torch.zeros_like(values))
    weights = weights / weights.sum(dim=(1, 2), keepdim=True)
    x = (xs.to(full_map.dtype) * weights).sum(dim=(1, 2))
    y = (ys.to(full_map.dtype) * weights).sum(dim=(1, 2))
    return torch.stack([x, y], dim=-1)


def _stable_order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.sort(values, descending=descending, stable=True).indices


def similarity_map_to_points(sim: torch.Tensor, shape: Sequence[int], t: float = 0.8, down_sample: int = 2,
                             num_points: int = 30, t_neg: float = 0.2, pad_value: float = -1.0,
                             refine: bool = True, clip_size: int = _CLIP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """SasP points and labels from one <SEG>'s similarity over the image tokens (READ's official defaults).

    Args:
        sim: (N,) similarities (N = side^2, 576 for LLaVA-1.5).
        shape: original image (H, W).
        t: positive threshold (cells >= t); the official code hard-codes 0.8.
        down_sample: grid shrink factor before thresholding (2: 24 -> 12).
        num_points: points kept, positives first, then negatives, then neutrals (official 30).
        t_neg: negatives are cells in [0, t_neg].
        pad_value: value of the aspect padding (-1: never selected).
        refine: move points to the softmax x Gaussian centroid on the full-resolution map (official: yes).
        clip_size: CLIP input side used by the full-resolution map.

    Returns:
        ``(points, labels)``: (K, 2) float (x, y) in original pixels and (K,) long labels (1 positive,
        0 negative, -1 neutral), K <= num_points.
    """
    if sim.ndim != 1:
        raise ValueError(f"sim must be the (N,) similarities of one <SEG>, got shape {tuple(sim.shape)}")
    if down_sample < 1:
        raise ValueError(f"down_sample must be >= 1, got {down_sample}")
    if not 0.0 <= t_neg < t:
        raise ValueError(f"thresholds must satisfy 0 <= t_neg < t, got t_neg={t_neg}, t={t}")
    shape = (int(shape[0]), int(shape[1]))
    side = _grid_side(sim.numel())
    down = side // down_sample
    sm = F.interpolate(sim.reshape(1, 1, side, side).float(), (down, down), mode="bilinear")[0, 0]
    sm = (sm - sm.min()) / (sm.max() - sm.min())
    pad_h, pad_w = _aspect_pads(down, shape)
    sm = F.pad(sm, (pad_w, pad_w, pad_h, pad_h), mode="constant", value=pad_value)
    h, w = sm.shape
    scale_h, scale_w = float(shape[0]) / h, float(shape[1]) / w
    flat = sm.reshape(-1).detach()

    positive = torch.nonzero(flat >= t).flatten()
    negative = torch.nonzero((flat >= 0) & (flat <= t_neg)).flatten()
    neutral = torch.nonzero((flat > t_neg) & (flat < t)).flatten()
    positive = positive[_stable_order(flat[positive], descending=True)]
    negative = negative[_stable_order(flat[negative], descending=False)]
    selected = torch.cat([positive, negative, neutral])[:num_points]
    labels = torch.full((selected.numel(),), -1, dtype=torch.long, device=flat.device)
    labels[torch.isin(selected, positive)] = 1
    labels[torch.isin(selected, negative)] = 0

    # cell centres in original pixels, computed as the official float32 expressions and truncated to int
    bound = torch.tensor([shape[1] - 1, shape[0] - 1], dtype=torch.float32, device=flat.device)
    x = torch.minimum(((selected % w) + 0.5) * scale_w, bound[0])
    y = torch.minimum(((selected // w) + 0.5) * scale_h, bound[1])
    points = torch.stack([x, y], dim=-1).long()
    if refine:
        return refine_points(similarity_to_image_map(sim, shape, clip_size), points), labels
    return points.float(), labels


# --- SAM wiring (transformers SamModel) -------------------------------------------------------------------------------

def sam_preprocess_shape(original_size: Sequence[int], long_side: int = 1024) -> tuple[int, int]:
    """(H, W) of the image resized so its long side is ``long_side`` (segment-anything ``ResizeLongestSide``)."""
    h, w = int(original_size[0]), int(original_size[1])
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def points_to_sam_frame(points: torch.Tensor, original_size: Sequence[int], long_side: int = 1024) -> torch.Tensor:
    """(..., 2) (x, y) in original pixels -> the resized SAM input frame (``apply_coords``)."""
    new_h, new_w = sam_preprocess_shape(original_size, long_side)
    scale = torch.tensor([new_w / original_size[1], new_h / original_size[0]], dtype=torch.float32,
                         device=points.device)
    return points.float() * scale


def postprocess_sam_masks(low_res: torch.Tensor, original_size: Sequence[int], long_side: int = 1024) -> torch.Tensor:
    """SAM low-resolution mask logits (..., h, w) -> (..., H, W) at the original size.

    Bilinear to the padded ``long_side`` square, crop the resized image area, bilinear to the original size
    (segment-anything ``Sam.postprocess_masks``).
    """
    lead = low_res.shape[:-2]
    x = low_res.reshape(-1, 1, *low_res.shape[-2:]).float()
    x = F.interpolate(x, (long_side, long_side), mode="bilinear", align_corners=False)
    in_h, in_w = sam_preprocess_shape(original_size, long_side)
    x = F.interpolate(x[..., :in_h, :in_w], (int(original_size[0]), int(original_size[1])), mode="bilinear",
                      align_corners=False)
    return x.reshape(*lead, *x.shape[-2:])


def sam_masks_from_prompts(sam: nn.Module, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                           point_labels: torch.Tensor, seg_embeddings: torch.Tensor | None,
                           original_size: Sequence[int]) -> torch.Tensor:
    """Masks of one image from SasP points plus <SEG> embeddings as extra sparse prompts.

    Args:
        sam: a transformers ``SamModel``.
        image_embeddings: (1, C, h, w) SAM image embedding of the image.
        point_coords: (S, K, 2) (x, y) in original pixels, one point set per <SEG>.
        point_labels: (S, K) labels 1 / 0 / -1 (-1: SAM's not-a-point).
        seg_embeddings: (S, C_prompt) projected <SEG> embeddings appended as sparse tokens, or None.
        original_size: (H, W) of the image.

    Returns:
        (S, H, W) mask logits (``multimask_output=False``).
    """
    long_side = sam.config.prompt_encoder_config.image_size
    coords = points_to_sam_frame(point_coords, original_size, long_side)
    sparse, dense = sam.prompt_encoder(input_points=coords[None], input_labels=point_labels[None].long(),
                                       input_boxes=None, input_masks=None)  # (1, S, K+1, C): the pad point added
    if seg_embeddings is not None:
        sparse = torch.cat([sparse, seg_embeddings.to(sparse.dtype)[None, :, None, :]], dim=2)
    # (older transformers, 4.46 among them, return a third item: the attentions or None)
    low_res = sam.mask_decoder(image_embeddings=image_embeddings,
                               image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                               multimask_output=False)[0]
    return postprocess_sam_masks(low_res[0, :, 0], original_size, long_side)


def seg_hidden_mask(input_ids: torch.Tensor, seg_token_id: int, seg_shift: int = 1) -> torch.Tensor:
    """Positions whose hidden state stands for a <SEG> token.

    Args:
        input_ids: (B, L) token ids aligned with the hidden states (image placeholders already expanded).
        seg_token_id: id of <SEG>.
        seg_shift: 1 (official LISA/READ code): the position before each <SEG>, whose state predicts it;
            0: the <SEG> position itself.

    Returns:
        (B, L) bool.
    """
    if seg_shift not in (0, 1):
        raise ValueError(f"seg_shift must be 0 or 1, got {seg_shift}")
    is_seg = input_ids == seg_token_id
    if seg_shift == 0:
        return is_seg
    return F.pad(is_seg[:, 1:], (0, 1), value=False)


@dataclass
class READOutput:
    """Output of :class:`READSegmenter`.

    Attributes:
        pred_masks: per sample (S_b, H_b, W_b) mask logits, one per <SEG>.
        seg_embeddings: per sample (S_b, C_prompt) projected <SEG> embeddings.
        points: per sample (S_b, K, 2) SasP points (x, y) in original pixels.
        point_labels: per sample (S_b, K) labels.
        lm_output: the language model's output (logits, loss when labels were given, ...).
    """
    pred_masks: list[torch.Tensor]
    seg_embeddings: list[torch.Tensor]
    points: list[torch.Tensor]
    point_labels: list[torch.Tensor]
    lm_output: Any


class READSegmenter(nn.Module):
    """LISA-style reasoning segmentation with READ's SasP prompts.

    The language model's last hidden state at <SEG> is projected by ``text_hidden_fcs`` (``Linear(H, H)``, ReLU,
    ``Linear(H, C_prompt)``, ``Dropout(0)``) into a SAM sparse prompt; the same raw state's similarity with the image
    tokens' states gives the SasP points; SAM decodes one mask per <SEG>.

    Args:
        language_model: a transformers model returning ``hidden_states`` (causal LM, LLaVA, ...).
        sam: a transformers ``SamModel``.
        seg_token_id: the <SEG> token id.
        num_points, t, down_sample: SasP settings (official 7B: 30, 0.8, 2).
        seg_shift: see :func:`seg_hidden_mask`.
        freeze_sam_encoder: compute SAM image embeddings without gradients (official: SAM's encoder is frozen).
    """

    def __init__(self, language_model: nn.Module, sam: nn.Module, seg_token_id: int, num_points: int = 30,
                 t: float = 0.8, down_sample: int = 2, seg_shift: int = 1, freeze_sam_encoder: bool = True):
        super().__init__()
        self.language_model = language_model
        self.sam = sam
        self.seg_token_id = int(seg_token_id)
        self.num_points, self.t, self.down_sample, self.seg_shift = num_points, t, down_sample, seg_shift
        self.freeze_sam_encoder = freeze_sam_encoder
        hidden = language_model.config.get_text_config().hidden_size
        prompt_dim = sam.config.prompt_encoder_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                             nn.Linear(hidden, prompt_dim), nn.Dropout(0.0))

    def sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings (B, C, h, w) of SAM-preprocessed images (B, 3, S, S)."""
        if self.freeze_sam_encoder:
            with torch.no_grad():
                return self.sam.get_image_embeddings(sam_pixel_values)
        return self.sam.get_image_embeddings(sam_pixel_values)

    def forward(self, input_ids: torch.Tensor, image_token_mask: torch.Tensor, sam_pixel_values: torch.Tensor,
                original_sizes: Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None,
                **lm_kwargs: Any) -> READOutput:
        """Masks for every <SEG> of every sample.

        Args:
            input_ids: (B, L) ids aligned with the hidden states (with <SEG> tokens).
            image_token_mask: (B, L) bool, True at the N = side^2 image-token positions of each sample.
            sam_pixel_values: (B, 3, S, S) SAM-preprocessed images (long side resized to S, normalised, padded).
            original_sizes: per sample (H, W).
            attention_mask: (B, L) LM attention mask.
            **lm_kwargs: passed to the language model (``pixel_values`` for LLaVA, ``labels``, ...).

        Returns:
            :class:`READOutput`.
        """
        if image_token_mask.shape != input_ids.shape:
            raise ValueError(f"image_token_mask must match input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(image_token_mask.shape)}")
        if len(original_sizes) != input_ids.shape[0]:
            raise ValueError(f"original_sizes: got {len(original_sizes)} sizes for {input_ids.shape[0]} samples")
        lm_output = self.language_model(input_ids=input_ids, attention_mask=attention_mask,
                                        output_hidden_states=True, **lm_kwargs)
        hidden = lm_output.hidden_states[-1]
        seg_mask = seg_hidden_mask(input_ids, self.seg_token_id, self.seg_shift)
        image_embeddings = self.sam_image_embeddings(sam_pixel_values)
        masks, embeds, all_points, all_labels = [], [], [], []
        for b in range(input_ids.shape[0]):
            seg_states = hidden[b][seg_mask[b]]  # (S_b, H)
            seg_embeds = self.text_hidden_fcs(seg_states)
            image_states = hidden[b][image_token_mask[b]]  # (N, H)
            points, labels = [], []
            for s in range(seg_states.shape[0]):
                sim = compute_similarity_map(seg_states[s:s + 1], image_states[None])[0, :, 0]
                p, lab = similarity_map_to_points(sim, original_sizes[b], self.t, self.down_sample, self.num_points)
                points.append(p)
                labels.append(lab)
            if not points:
                h, w = original_sizes[b]
                masks.append(hidden.new_zeros((0, int(h), int(w))))
                embeds.append(seg_embeds)
                all_points.append(hidden.new_zeros((0, 0, 2)))
                all_labels.append(torch.zeros((0, 0), dtype=torch.long, device=hidden.device))
                continue
            k = min(p.shape[0] for p in points)  # equal unless a degenerate map gives fewer candidates
            coords = torch.stack([p[:k] for p in points])
            labels_t = torch.stack([lab[:k] for lab in labels])
            masks.append(sam_masks_from_prompts(self.sam, image_embeddings[b:b + 1], coords, labels_t,
                                                seg_embeds, original_sizes[b]))
            embeds.append(seg_embeds)
            all_points.append(coords)
            all_labels.append(labels_t)
        return READOutput(masks, embeds, all_points, all_labels, lm_output)
