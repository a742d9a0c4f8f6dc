"""AnoVL: zero-shot anomaly maps from a stock open_clip ViT (V-V attention, state prompts, test-time adaptation).

Facts follow the official code (hq-deng/AnoVL @ 3a70bfda: ``open_clip/transformer.py``, ``prompt_ensemble.py``,
``model.py``, ``vl_test.py``, ``utils.py``). The official repository ships a patched copy of open_clip; here the
*stock* open_clip model is used unchanged (its weights load as usual) and the patched forward is computed from the
stock blocks' own modules (``ln_1``, ``attn.in_proj_*``/``attn.out_proj``, ``ln_2``, ``mlp``).

What the official code computes:

* **Dual path** (training free): the last 12 residual blocks (``for i in range(1, 13)`` over ``resblocks[-i]``:
  all blocks of a ViT-B) carry two token streams. The *original* path is the stock block. The *V-V* path adds,
  at every dual block, the value-value attention ``softmax(scale * v v^T) v`` (projected by ``out_proj``) computed
  from ``ln_1`` of the **original** path's tokens, and skips the MLP. Both start from the tokens entering the first
  dual block.
* **Outputs**: all tokens of the V-V path after the last block, with token 0 replaced by the original path's CLS,
  go through ``ln_post`` and ``proj`` -> ``image_features`` (B, 1+N, D). The anomaly map reads the V-V patch
  tokens after the last block (``ln_post(tokens[:, 1:]) @ proj``; the official ``features_list=[3, 6, 9, 12]``
  and ``layer == 6`` pick exactly these).
* **State prompts**: 7 normal and 7 anomalous state phrases with the object name, times 66 templates (22
  "industrial photo" + 22 "industrial image" + 22 "manufacturing image" for objects; the texture classes use
  "industrial photo" + "textural photo" + "surface picture"). Per state: mean of the *unnormalised* text
  embeddings, then L2-normalised -> ``text_features`` (D, 2); the per-prompt normalised embeddings
  ``text_features_list`` (P, D, 2), P = 462, feed the test-time adapter.
* **Map**: L2-normalised patch tokens ``@ text_features``, softmax over {normal, anomalous} **without a logit
  scale**, anomalous probability, replicate-pad 1 + 3x3 mean, bilinear (``align_corners=True``) to the image size.
* **Image score**: the same softmax on the CLS feature, averaged over 22 copies of the image (itself, 8 small
  rotations, 8 translations, a horizontal flip, a grey copy and 3 quarter turns), as ``vl_test.py`` does for MVTec.
* **Test-time adaptation**: a ``TextAdapter`` (``Linear(D, 2P)`` on the L2-normalised token, tanh, ``@`` the 2P
  prompt embeddings; ``x <- 0.5 x + 0.5 adapter(x)``) reset per image, AdamW lr 1e-3, 5 steps, each on the clean
  tokens and one noisy copy (``N(0, 0.05 * 1.1)``); loss = entropy of the clean map + 0.5 (-log p_anomalous(noisy)
  - log p_normal(clean)). The official loop creates one AdamW per object class and never resets it, so its moment
  estimates carry over from image to image while the adapter weights are reset; ``AnoVLPipeline`` does the same
  per object name by default (``tta_fresh_optimizer=True`` gives a fresh optimizer per image).

Per-layer tokens: the official dual path updates its token tensors *in place* (``x += x_res``,
``x_ori += x_ori_res``) after appending them to the per-layer list, so every stored V-V tensor ends up equal to
the final V-V tokens (CLS replaced) and every stored original-path tensor but the last holds the next block's
post-attention state. ``layer_tokens="official"`` (default) reproduces those values; ``"per_layer"`` returns the
tokens each block actually produced (what the paper describes). The map is the same in both modes.

Not reproduced: the VisA tiling of non-square images into two overlapping squares, and non-ViT towers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.ops import downsampled_attention

__all__ = [
    "STATE_NORMAL", "STATE_ANOMALOUS", "TEXTURE_CLASSES", "CLASS_RENAMES", "prompt_templates", "state_prompts",
    "encode_state_prompts", "value_value_attention", "DualPathOutput", "dual_path_forward", "patch_tokens_for_map",
    "anomaly_probabilities", "smooth_and_upsample", "anomaly_map_from_tokens", "cls_anomaly_score",
    "augment_for_image_score", "TextAdapter", "tta_loss", "reset_adapter", "test_time_adapt", "AnoVLPipelineOutput",
    "AnoVLPipeline", "SyntheticDefectSet", "make_synthetic_defect_set", "evaluate_synthetic",
]

# --- domain-aware state prompts (prompt_ensemble.py) ------------------------------------------------------------------

STATE_NORMAL: tuple[str, ...] = (
    "normal {}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
STATE_ANOMALOUS: tuple[str, ...] = (
    "damaged {}", "abnormal {}", "imperfect {}", "blemished {}",
    "{} with flaw", "{} with defect", "{} with damage",
)
# MVTec classes that get the texture template families.
TEXTURE_CLASSES: tuple[str, ...] = ("carpet", "leather", "grid", "tile", "wood")
CLASS_RENAMES: dict[str, str] = {"macaroni1": "macaroni", "macaroni2": "macaroni"}

# The 22 template shapes shared by every family; "{kind}" is the family ("industrial photo", ...), "{art}" its
# indefinite article, "{}" the state phrase.
_TEMPLATE_SHAPES: tuple[str, ...] = (
    "a cropped {kind} of the {{}}", "a cropped {kind} of a {{}}",
    "a close-up {kind} of a {{}}", "a close-up {kind} of the {{}}",
    "a bright {kind} of a {{}}", "a bright {kind} of the {{}}",
    "a dark {kind} of the {{}}", "a dark {kind} of a {{}}",
    "a jpeg corrupted {kind} of a {{}}", "a jpeg corrupted {kind} of the {{}}",
    "a blurry {kind} of the {{}}", "a blurry {kind} of a {{}}",
    "{art} {kind} of a {{}}", "{art} {kind} of the {{}}",
    "{art} {kind} of a small {{}}", "{art} {kind} of the small {{}}",
    "{art} {kind} of a large {{}}", "{art} {kind} of the large {{}}",
    "{art} {kind} of the {{}} for visual inspection", "{art} {kind} of a {{}} for visual inspection",
    "{art} {kind} of the {{}} for anomaly detection", "{art} {kind} of a {{}} for anomaly detection",
)
_OBJECT_FAMILIES = ("industrial photo", "industrial image", "manufacturing image")
_TEXTURE_FAMILIES = ("industrial photo", "textural photo", "surface picture")


def _family_templates(kind: str) -> list[str]:
    article = "an" if kind[0] in "aeiou" else "a"
    return [shape.format(kind=kind, art=article) for shape in _TEMPLATE_SHAPES]


def prompt_templates(texture: bool) -> list[str]:
    """The 66 sentence templates (each with one ``{}`` for a state phrase) for an object or a texture class."""
    families = _TEXTURE_FAMILIES if texture else _OBJECT_FAMILIES
    return [t for kind in families for t in _family_templates(kind)]


def state_prompts(object_name: str, texture: bool | None = None) -> tuple[list[str], list[str]]:
    """The normal and anomalous prompt sentences for one object, in the official order (template-major).

    Args:
        object_name: the class name as written in the prompts (``macaroni1``/``macaroni2`` become ``macaroni``).
        texture: use the texture template families; None decides as the official code does (MVTec's carpet,
            leather, grid, tile and wood).

    Returns:
        ``(normal, anomalous)``: two lists of 66 * 7 = 462 sentences.
    """
    if not isinstance(object_name, str) or not object_name.strip():
        raise ValueError(f"object_name must be a non-empty string, got {object_name!r}")
    if texture is None:
        texture = object_name in TEXTURE_CLASSES
    name = CLASS_RENAMES.get(object_name, object_name)
    templates = prompt_templates(texture)
    sentences = []
    for states in (STATE_NORMAL, STATE_ANOMALOUS):
        phrases = [s.format(name) for s in states]
        sentences.append([t.format(p) for t in templates for p in phrases])
    return sentences[0], sentences[1]


@torch.no_grad()
def encode_state_prompts(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], object_name: str,
                         texture: bool | None = None, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Text features of the two states for one object (``encode_text_with_prompt_ensemble``).

    Args:
        model: an open_clip CLIP model (``encode_text``).
        tokenizer: the model's open_clip tokenizer.
        object_name, texture: see :func:`state_prompts`.
        batch_size: prompts per ``encode_text`` call.

    Returns:
        ``text_features`` (D, 2): per state the L2-normalised mean of the unnormalised prompt embeddings
        (column 0 normal, 1 anomalous); ``text_features_list`` (P, D, 2): every prompt's L2-normalised embedding.
    """
    device = next(model.parameters()).device
    means, per_prompt = [], []
    for sentences in state_prompts(object_name, texture):
        chunks = [model.encode_text(tokenizer(sentences[i:i + batch_size]).to(device))
                  for i in range(0, len(sentences), batch_size)]
        emb = torch.cat(chunks).float()
        means.append(F.normalize(emb.mean(dim=0), dim=-1))
        per_prompt.append(emb / emb.norm(dim=-1, keepdim=True))
    return torch.stack(means, dim=1), torch.stack(per_prompt, dim=2)


# --- dual-path vision forward (open_clip/transformer.py surgery) -----------------------------------------------------

def value_value_attention(x: torch.Tensor, attn: nn.MultiheadAttention,
                          with_original: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V-V self-attention and the ordinary self-attention of one stock block, from its own weights.

    ``qkv = x @ in_proj_weight^T + in_proj_bias``; V-V: ``softmax(scale * v v^T) v``, original:
    ``softmax(scale * q k^T) v``, ``scale = head_dim^-0.5``, both through ``out_proj``. Both are plain full
    attentions (``q = k = v`` for the V-V one), computed by :func:`zoo.ops.downsampled_attention`.

    Args:
        x: normalised tokens (B, L, C) (the block's ``ln_1`` output).
        attn: the block's ``nn.MultiheadAttention`` (packed ``in_proj_weight``, ``out_proj``).
        with_original: also compute the original attention.

    Returns:
        ``(vv, original)``: (B, L, C) each; ``original`` is None when not requested.
    """
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise TypeError(f"value_value_attention needs an nn.MultiheadAttention with a packed in_proj_weight, "
                        f"got {type(attn).__name__}")
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    scale = (x.shape[-1] // heads) ** -0.5
    vv = attn.out_proj(downsampled_attention(v, v, v, num_heads=heads, scale=scale))
    if not with_original:
        return vv, None
    ori = attn.out_proj(downsampled_attention(q, k, v, num_heads=heads, scale=scale))
    return vv, ori


def _check_vit(visual: nn.Module) -> None:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "_embeds") or getattr(visual, "proj", None) is None:
        raise TypeError("AnoVL needs an open_clip VisionTransformer tower (visual.transformer.resblocks, "
                        f"visual._embeds, visual.proj); got {type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None:
        raise TypeError("AnoVL does not support open_clip towers with attentional pooling (attn_pool)")


def _standard_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _, ori = value_value_attention(block.ln_1(x), block.attn)
    x = x + block.ls_1(ori)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@dataclass
class DualPathOutput:
    """What the dual-path forward of the vision tower returns.

    Attributes:
        image_features: ``ln_post(tokens) @ proj`` of all final tokens (V-V patches, original-path CLS),
            (B, 1+N, D).
        vv_tokens: final V-V path tokens before ``ln_post`` (B, 1+N, width), CLS replaced by the original one.
        original_tokens: final original-path tokens (B, 1+N, width) (the stock model's last hidden state).
        layer_tokens: per listed layer ``[vv, original]`` in the official order ``[vv_l1, ori_l1, vv_l2, ...]``,
            (B, 1+N, width) each (a single-path layer contributes one tensor), see ``layer_tokens`` mode.
    """
    image_features: torch.Tensor
    vv_tokens: torch.Tensor
    original_tokens: torch.Tensor
    layer_tokens: list[torch.Tensor] = field(default_factory=list)


def dual_path_forward(visual: nn.Module, pixel_values: torch.Tensor, features_list: Sequence[int] = (3, 6, 9, 12),
                      num_vv_blocks: int = 12, layer_tokens: str = "official") -> DualPathOutput:
    """Run a stock open_clip ViT with AnoVL's training-free dual path.

    Args:
        visual: ``model.visual`` of an open_clip CLIP with a VisionTransformer tower (unchanged).
        pixel_values: normalised images (B, 3, H, W) at the tower's image size.
        features_list: 1-based block indices whose tokens are collected (official: 3 6 9 12).
        num_vv_blocks: how many of the last blocks carry the V-V path (official: 12; all blocks when the tower is
            shallower).
        layer_tokens: ``"official"`` reproduces the values the official code stores (in-place aliasing, see the
            module docstring); ``"per_layer"`` stores what each block produced.

    Returns:
        :class:`DualPathOutput`.
    """
    _check_vit(visual)
    if layer_tokens not in ("official", "per_layer"):
        raise ValueError(f"layer_tokens must be 'official' or 'per_layer', got {layer_tokens!r}")
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    bad = [i for i in features_list if not 1 <= int(i) <= depth]
    if bad:
        raise ValueError(f"features_list entries must be block indices in 1..{depth}, got {list(features_list)}")
    if num_vv_blocks < 1:
        raise ValueError(f"num_vv_blocks must be >= 1, got {num_vv_blocks}")
    first_dual = max(0, depth - num_vv_blocks)  # 0-based index of the first dual block
    official = layer_tokens == "official"

    x = visual._embeds(pixel_values)
    x_vv = None
    final_vv = object()  # placeholder for "the final V-V tokens" (official in-place aliasing)
    stored: dict[int, list[Any]] = {}  # layer -> [vv or marker, original]
    awaiting_mid: int | None = None  # official: layer whose stored original tensor the next block edits in place
    for i, block in enumerate(blocks):
        layer = i + 1
        if i < first_dual:
            x = _standard_block(block, x)
            if layer in features_list:
                # official: the tensor entering the first dual block is the V-V carrier and is edited in place
                stored[layer] = [final_vv if official and i == first_dual - 1 else x]
            continue
        vv_res, ori_res = value_value_attention(block.ln_1(x), block.attn)
        mid = x + block.ls_1(ori_res)
        if awaiting_mid is not None:
            stored[awaiting_mid][1] = mid
            awaiting_mid = None
        x_vv = (x if x_vv is None else x_vv) + block.ls_1(vv_res)  # the V-V path skips the MLP
        x = mid + block.ls_2(block.mlp(block.ln_2(mid)))
        if layer in features_list:
            stored[layer] = [final_vv if official else x_vv, x]
            awaiting_mid = layer if official else None

    tokens = torch.cat([x[:, :1], x_vv[:, 1:]], dim=1)
    out_tokens = [tokens if t is final_vv else t for layer in sorted(stored) for t in stored[layer]]
    image_features = visual.ln_post(tokens) @ visual.proj
    return DualPathOutput(image_features, tokens, x, out_tokens)


@torch.no_grad()
def _cls_features(visual: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``ln_post(cls) @ proj`` of the original path only (all a CLS score needs), (B, D)."""
    _check_vit(visual)
    x = visual._embeds(pixel_values)
    for block in visual.transformer.resblocks:
        x = _standard_block(block, x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def patch_tokens_for_map(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``ln_post(tokens[:, 1:]) @ proj`` as a square grid (the official ``LinearLayer`` + ``resize_tokens``).

    Args:
        visual: the tower (its ``ln_post`` and ``proj``).
        tokens: (B, 1+N, width) with N a square number.

    Returns:
        (B, h, w, D) with h = w = sqrt(N).
    """
    patches = visual.ln_post(tokens[:, 1:]) @ visual.proj
    b, n, d = patches.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the patch grid must be square, got {n} patch tokens")
    return patches.view(b, side, side, d)


# --- maps and scores --------------------------------------------------------------------------------------------------

def anomaly_probabilities(tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Softmax over {normal, anomalous} of cosine similarities, without a logit scale.

    Args:
        tokens: (..., D) features (normalised here).
        text_features: (D, 2) state features (unit columns).

    Returns:
        (..., 2) probabilities (column 1 = anomalous).
    """
    tokens = tokens / tokens.norm(dim=-1, keepdim=True)
    return (tokens @ text_features).softmax(dim=-1)


def smooth_and_upsample(prob_map: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Replicate-pad 1, 3x3 mean, bilinear (align_corners=True) to the image size.

    Args:
        prob_map: (B, 1, h, w) anomalous probabilities on the patch grid.
        image_size: output (H, W) or one int.

    Returns:
        (B, 1, H, W).
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    x = F.avg_pool2d(F.pad(prob_map, (1, 1, 1, 1), mode="replicate"), 3, stride=1, padding=0)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def anomaly_map_from_tokens(tokens: torch.Tensor, text_features: torch.Tensor,
                            image_size: int | tuple[int, int]) -> torch.Tensor:
    """Pixel anomaly map from grid tokens (the official post-processing).

    Args:
        tokens: (B, h, w, D) projected patch tokens.
        text_features: (D, 2).
        image_size: output size.

    Returns:
        (B, 1, H, W) anomalous probability per pixel.
    """
    prob = anomaly_probabilities(tokens, text_features)[..., 1].unsqueeze(1)
    return smooth_and_upsample(prob, image_size)


def cls_anomaly_score(cls_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Anomalous probability of CLS features (B, D) -> (B,)."""
    return anomaly_probabilities(cls_features, text_features)[..., 1]


def _affine(x: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    theta = torch.tensor(matrix, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=True)


def augment_for_image_score(images: torch.Tensor) -> torch.Tensor:
    """The 22 copies the official MVTec image score averages over (``utils.aug``), for one normalised image each.

    Copies: the image, rotations by +-pi/16, +-pi/8, +-3pi/16, +-pi/4 and translations by (+-0.2, +-0.2),
    (+-0.1, +-0.1) (normalised units; affine grid, bilinear, reflection padding, align_corners=True), a
    horizontal flip, a grey copy (0.299 R + 0.587 G + 0.114 B on the normalised tensor, repeated on 3
    channels), and quarter turns by 90, 180, 270 degrees. (The official order is shuffled; the mean does not
    depend on it.)

    Args:
        images: (B, 3, H, W) normalised, square.

    Returns:
        (22, B, 3, H, W).
    """
    copies = [images]
    for angle in (-math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16,
                  math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4):
        c, s = math.cos(angle), math.sin(angle)
        copies.append(_affine(images, [[c, -s, 0.0], [s, c, 0.0]]))
    for a, b in ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1),
                 (0.1, -0.1)):
        copies.append(_affine(images, [[1.0, 0.0, a], [0.0, 1.0, b]]))
    copies.append(images.flip(-1))
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    copies.append((images * weights).sum(dim=1, keepdim=True).expand_as(images))
    # the official kornia rotation by 90/180/270 degrees; the set is symmetric, so the turn direction is irrelevant
    copies.extend(torch.rot90(images, k, dims=(-2, -1)) for k in (1, 2, 3))
    return torch.stack(copies)


# --- test-time adaptation (model.py TextAdapter, vl_test.py loss_func / weight_reset) --------------------------------

class TextAdapter(nn.Module):
    """AnoVL's text adapter: ``x <- 0.5 x + 0.5 tanh(Linear(x / |x|)) @ E``, E = the 2P prompt embeddings.

    Args:
        text_features_list: (P, D, 2) per-prompt normalised embeddings; E = [normal prompts; anomalous prompts].
    """

    def __init__(self, text_features_list: torch.Tensor):
        super().__init__()
        if text_features_list.ndim != 3 or text_features_list.shape[-1] != 2:
            raise ValueError(f"text_features_list must be (P, D, 2), got {tuple(text_features_list.shape)}")
        prompts = torch.cat([text_features_list[..., 0], text_features_list[..., 1]], dim=0)
        self.register_buffer("prompt_embeddings", prompts.detach().clone(), persistent=False)
        self.ad = nn.Linear(prompts.shape[1], prompts.shape[0])

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``tanh(ad(x / |x|)) @ E`` for (..., D) -> (..., D)."""
        return torch.tanh(self.ad(x / x.norm(dim=-1, keepdim=True))) @ self.prompt_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapted tokens (..., D)."""
        return 0.5 * x + 0.5 * self.residual(x)


def reset_adapter(adapter: TextAdapter, generator: torch.Generator | None = None) -> None:
    """Re-draw the adapter's Linear as ``nn.Linear.reset_parameters`` does (the official ``weight_reset``)."""
    lin = adapter.ad
    bound = 1.0 / math.sqrt(lin.in_features)
    with torch.no_grad():
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
        nn.init.uniform_(lin.bias, -bound, bound, generator=generator)


def tta_loss(probs: torch.Tensor) -> torch.Tensor:
    """The official ``loss_func``: entropy of the clean map + 0.5 * (-log p_anom(noisy) - log p_norm(clean)).

    Args:
        probs: (2, h, w, 2) state probabilities of [clean, noisy] tokens.

    Returns:
        scalar loss.
    """
    clean, noisy = probs[:1], probs[1:]
    entropy = -(clean * clean.log()).sum(-1).mean()
    hard = -(noisy[..., 1].log() + clean[..., 0].log()).mean()
    return entropy + 0.5 * hard


def test_time_adapt(tokens: torch.Tensor, text_features: torch.Tensor, adapter: TextAdapter,
                    optimizer: torch.optim.Optimizer | None = None, steps: int = 5, lr: float = 1e-3,
                    noise_std: float = 0.05 * 1.1, noises: Sequence[torch.Tensor] | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Adapt ``adapter`` on one image's tokens and return the adapted (still un-normalised) tokens.

    Each step feeds ``[tokens, tokens + noise]`` through the adapter, takes the state probabilities and
    minimises :func:`tta_loss`. The adapter is used as given (reset it first with :func:`reset_adapter`).

    Args:
        tokens: (1, h, w, D) projected patch tokens of one image (no grad needed).
        text_features: (D, 2).
        adapter: the :class:`TextAdapter` to train.
        optimizer: optimiser over the adapter's parameters; None makes ``AdamW(lr)``.
        steps: optimisation steps (official 5).
        lr: learning rate of the default optimiser (official 1e-3).
        noise_std: std of the Gaussian feature noise (official 0.05 * 1.1).
        noises: optional explicit noise tensors, one (1, h, w, D) per step (replaces sampling).
        generator: random generator for the noise.

    Returns:
        adapted tokens (1, h, w, D), computed without noise after the last step.
    """
    if tokens.ndim != 4 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be one image's grid (1, h, w, D), got {tuple(tokens.shape)}")
    if noises is not None and len(noises) < steps:
        raise ValueError(f"noises must hold one tensor per step ({steps}), got {len(noises)}")
    tokens = tokens.detach()
    if optimizer is None:
        optimizer = torch.optim.AdamW(adapter.parameters(), lr)
    with torch.enable_grad():
        for step in range(steps):
            noise = noises[step] if noises is not None else torch.normal(
                0.0, noise_std, tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
            pair = torch.cat([tokens, tokens + noise.to(tokens)], dim=0)
            loss = tta_loss(anomaly_probabilities(adapter(pair), text_features))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return adapter(tokens)


# --- pipeline ---------------------------------------------------------------------------------------------------------

@dataclass
class AnoVLPipelineOutput:
    """Output of :class:`AnoVLPipeline`.

    Attributes:
        anomaly_maps: (B, 1, S, S) anomalous probability per pixel at the model's input size S (or the
            ``output_size`` asked for).
        image_scores: (B,) image-level anomaly scores in [0, 1].
    """
    anomaly_maps: torch.Tensor
    image_scores: torch.Tensor


@dataclass
class _TTAState:
    adapter: TextAdapter
    optimizer: torch.optim.Optimizer


class AnoVLPipeline:
    """Zero-shot anomaly localisation with any open_clip ViT CLIP (AnoVL).

    Args:
        model: an open_clip CLIP with a VisionTransformer tower (stock weights, not modified).
        tokenizer: its open_clip tokenizer.
        features_list: blocks whose tokens the dual path collects (official 3 6 9 12).
        num_vv_blocks: last blocks carrying the V-V path (official 12).
        image_mean, image_std: normalisation; defaults to the tower's ``image_mean``/``image_std`` or OpenAI's.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 features_list: Sequence[int] = (3, 6, 9, 12), num_vv_blocks: int = 12,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None):
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        _check_vit(model.visual)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.features_list = tuple(int(i) for i in features_list)
        self.num_vv_blocks = int(num_vv_blocks)
        self.image_mean = tuple(image_mean or getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN)
        self.image_std = tuple(image_std or getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD)
        size = model.visual.image_size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self._text_cache: dict[tuple[str, bool | None], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tta: dict[tuple[str, bool | None], _TTAState] = {}
        self._progress_config: dict[str, Any] = {}
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                        **kwargs: Any) -> "AnoVLPipeline":
        """Build the pipeline from an open_clip model name and a pretrained tag or local checkpoint file.

        Args:
            model_name: an open_clip model name (official: ``ViT-B-16-plus-240``), including configs added with
                ``open_clip.add_model_config``.
            pretrained: an open_clip pretrained tag (official: ``laion400m_e32``; needs the open_clip/HF cache
                when offline), a local checkpoint path, or None for random weights.
            device: where the model runs.
            **kwargs: pipeline arguments (``features_list``, ``num_vv_blocks``, ``image_mean``, ``image_std``);
                any other keyword goes to ``open_clip.create_model_and_transforms``.
        """
        import open_clip

        own = {k: kwargs.pop(k) for k in ("features_list", "num_vv_blocks", "image_mean", "image_std")
               if k in kwargs}
        if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"model_name {model_name!r} is not an open_clip model; register a config with "
                             "open_clip.add_model_config or pick one of open_clip.list_models()")
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device,
                                                            **kwargs)
        return cls(model, open_clip.get_tokenizer(model_name), **own)

    # diffusers-style helpers
    def to(self, device: str | torch.device) -> "AnoVLPipeline":
        """Move the model (and cached text features) to ``device``."""
        self.model.to(device)
        self._text_cache = {k: (a.to(device), b.to(device)) for k, (a, b) in self._text_cache.items()}
        self._tta.clear()
        return self

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return next(self.model.parameters()).device

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm progress bar (e.g. ``disable=True``)."""
        self._progress_config = kwargs

    def progress_bar(self, iterable: Iterable | None = None, total: int | None = None):
        """A tqdm progress bar configured by :meth:`set_progress_bar_config`."""
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, **self._progress_config)

    def reset_tta(self) -> None:
        """Forget the per-object adapters and their optimiser states."""
        self._tta.clear()

    def state_text_features(self, object_name: str, texture: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(text_features (D, 2), text_features_list (P, D, 2))`` of an object (see encode_state_prompts)."""
        key = (object_name, texture)
        if key not in self._text_cache:
            self._text_cache[key] = encode_state_prompts(self.model, self.tokenizer, object_name, texture)
        return self._text_cache[key]

    def preprocess(self, images: Any) -> torch.Tensor:
        """PIL images / uint8 arrays (H, W[, 3]) / float tensors in [0, 1] -> normalised (B, 3, S, S).

        PIL images are resized with PIL bilinear to (S, S) as the official ``Resize((S, S))``; tensors (B, 3, H, W)
        or (3, H, W) are resized with antialiased bilinear interpolation.
        """
        import torchvision.transforms.functional as TF
        from PIL import Image

        if isinstance(images, (Image.Image, np.ndarray)) or (torch.is_tensor(images) and images.ndim == 3):
            images = [images]
        tensors = []
        for im in images:
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im)
            if isinstance(im, Image.Image):
                im = TF.to_tensor(TF.resize(im.convert("RGB"), list(self.image_size),
                                            interpolation=TF.InterpolationMode.BILINEAR))
            elif torch.is_tensor(im):
                if im.ndim != 3 or im.shape[0] != 3 or not im.is_floating_point():
                    raise ValueError(f"image tensors must be float (3, H, W) in [0, 1], got {im.dtype} "
                                     f"{tuple(im.shape)}")
                if tuple(im.shape[-2:]) != self.image_size:
                    im = TF.resize(im, list(self.image_size), antialias=True)
            else:
                raise TypeError(f"images must be PIL images, numpy arrays or float tensors, got {type(im).__name__}")
            tensors.append(im)
        batch = torch.stack(tensors).to(self.device, torch.float32)
        return TF.normalize(batch, self.image_mean, self.image_std)

    def _tta_state(self, key: tuple[str, bool | None], text_list: torch.Tensor, lr: float,
                   fresh: bool) -> _TTAState:
        if fresh or key not in self._tta:
            adapter = TextAdapter(text_list).to(self.device)
            self._tta[key] = _TTAState(adapter, torch.optim.AdamW(adapter.parameters(), lr))
        state = self._tta[key]
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        return state

    @torch.no_grad()
    def __call__(self, images: Any = None, object_name: str | Sequence[str] = "object", tta: bool = False, *,
                 pixel_values: torch.Tensor | None = None, texture: bool | None = None, augment_score: bool = True,
                 tta_steps: int = 5, tta_lr: float = 1e-3, tta_noise_std: float = 0.05 * 1.1,
                 tta_fresh_optimizer: bool = False, generator: torch.Generator | None = None,
                 output_size: int | tuple[int, int] | None = None) -> AnoVLPipelineOutput:
        """Anomaly maps and image scores.

        Args:
            images: PIL image(s), uint8 array(s) or float tensor(s) in [0, 1] (see :meth:`preprocess`).
            object_name: the object class in the prompts, one for all images or one per image.
            tta: run the test-time text adapter per image (official: 5 AdamW steps, lr 1e-3).
            pixel_values: already normalised (B, 3, S, S) input instead of ``images``.
            texture: use the texture prompt families (None: the official MVTec texture list decides).
            augment_score: average the image score over the 22 official augmentations (False: the image alone).
            tta_steps, tta_lr, tta_noise_std: test-time adaptation settings.
            tta_fresh_optimizer: a new AdamW per image; False (official) keeps one per object name, whose
                moments carry over between images while the adapter weights are reset.
            generator: random generator for the adapter reset and the noise (None: the global generator).
            output_size: size of the returned maps (default: the model's input size).

        Returns:
            :class:`AnoVLPipelineOutput`.
        """
        if (images is None) == (pixel_values is None):
            raise ValueError("give exactly one of images or pixel_values")
        x = self.preprocess(images) if pixel_values is None else pixel_values.to(self.device, torch.float32)
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"pixel_values must be (B, 3, {self.image_size[0]}, {self.image_size[1]}), "
                             f"got {tuple(x.shape)}")
        names = [object_name] * x.shape[0] if isinstance(object_name, str) else list(object_name)
        if len(names) != x.shape[0]:
            raise ValueError(f"object_name: got {len(names)} names for {x.shape[0]} images")
        size = output_size or self.image_size
        maps, scores = [], []
        for i in self.progress_bar(range(x.shape[0]), total=x.shape[0]):
            text, text_list = self.state_text_features(names[i], texture)
            image = x[i:i + 1]
            out = dual_path_forward(self.model.visual, image, self.features_list, self.num_vv_blocks)
            if augment_score:
                aug = augment_for_image_score(image)[:, 0]
                score = cls_anomaly_score(_cls_features(self.model.visual, aug), text).mean()
            else:
                score = cls_anomaly_score(out.image_features[:, 0], text)[0]
            tokens = patch_tokens_for_map(self.model.visual, out.vv_tokens)
            if tta:
                state = self._tta_state((names[i], texture), text_list, tta_lr, tta_fresh_optimizer)
                reset_adapter(state.adapter, generator)
                tokens = test_time_adapt(tokens, text, state.adapter, state.optimizer, tta_steps,
                                         noise_std=tta_noise_std, generator=generator)
            maps.append(anomaly_map_from_tokens(tokens, text, size))
            scores.append(score)
        return AnoVLPipelineOutput(torch.cat(maps), torch.stack(scores))


# --- offline evaluation on synthetic defects --------------------------------------------------------------------------

@dataclass
class SyntheticDefectSet:
    """Images with pasted defects and their masks.

    Attributes:
        images: (N, 3, S, S) float in [0, 1].
        masks: (N, S, S) bool, True on defect pixels (all False for normal images).
        labels: (N,) 1 for images with a defect.
        names: (N,) texture name of each image (used as the prompt object).
    """
    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    names: list[str]


def _texture_sources() -> dict[str, np.ndarray]:
    """Grey textures a package ships: scikit-image's brick, grass, gravel (512 x 512)."""
    try:
        from skimage import data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the synthetic defect set uses scikit-image's bundled textures; "
                          "install scikit-image (pip install scikit-image)") from err
    return {name: getattr(data, name)().astype(np.float32) / 255.0 for name in ("brick", "grass", "gravel")}


def _defect_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ellipse, rectangle or thick scratch covering roughly 1-6 % of the image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    kind = rng.integers(3)
    if kind == 0:
        ry, rx = rng.uniform(0.06, 0.14, size=2) * size
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if kind == 1:
        hy, hx = rng.uniform(0.05, 0.12, size=2) * size
        return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
    angle = rng.uniform(0, math.pi)
    dist = np.abs((xx - cx) * math.sin(angle) - (yy - cy) * math.cos(angle))
    along = np.abs((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle))
    return (dist <= size * 0.02) & (along <= size * rng.uniform(0.15, 0.3))


def make_synthetic_defect_set(num_per_texture: int = 8, size: int = 224, seed: int = 0) -> SyntheticDefectSet:
    """A small anomaly-detection set from packaged textures, half of it with pasted defects.

    For each texture (scikit-image's brick, grass, gravel) ``num_per_texture`` random crops are made (crop side
    between 160 and 320 px of the 512 px texture, resized to ``size``); every second one gets a defect: a random
    ellipse, rectangle or scratch region filled with a crop of a *different* texture, contrast-inverted, so the
    defect differs in structure and intensity.

    Args:
        num_per_texture: images per texture (even numbers give half normal, half defective).
        size: image side in pixels.
        seed: numpy seed; the set is a pure function of the arguments.

    Returns:
        :class:`SyntheticDefectSet` with ``3 * num_per_texture`` images.
    """
    if num_per_texture < 2:
        raise ValueError(f"num_per_texture must be >= 2 (normal and defective images), got {num_per_texture}")
    rng = np.random.default_rng(seed)
    sources = _texture_sources()
    names = list(sources)
    images, masks, labels, out_names = [], [], [], []

    def crop(tex: np.ndarray) -> torch.Tensor:
        side = int(rng.integers(160, 321))
        y, x = rng.integers(0, tex.shape[0] - side + 1), rng.integers(0, tex.shape[1] - side + 1)
        patch = torch.from_numpy(np.ascontiguousarray(tex[y:y + side, x:x + side]))[None, None]
        return F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]

    for name in names:
        for k in range(num_per_texture):
            img = crop(sources[name])
            mask = np.zeros((size, size), dtype=bool)
            if k % 2 == 1:
                mask = _defect_mask(size, rng)
                other = names[(names.index(name) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
                filler = 1.0 - crop(sources[other])
                img = torch.where(torch.from_numpy(mask), filler, img)
            images.append(img.clamp(0, 1).expand(3, size, size))
            masks.append(torch.from_numpy(mask))
            labels.append(int(mask.any()))
            out_names.append(name)
    return SyntheticDefectSet(torch.stack(images), torch.stack(masks), torch.tensor(labels), out_names)


def evaluate_synthetic(pipeline: AnoVLPipeline, dataset: SyntheticDefectSet | None = None, tta: bool = False,
                       augment_score: bool = True, aupro_method: str = "mvtec",
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """Pixel AUROC, AUPRO (FPR <= 0.3) and image AUROC of a pipeline on a synthetic defect set.

    Args:
        pipeline: the AnoVL pipeline to evaluate.
        dataset: the set (default: ``make_synthetic_defect_set()``).
        tta: use test-time adaptation.
        augment_score: average image scores over the 22 augmentations.
        aupro_method: ``"mvtec"`` (exact) or ``"anovl"`` (the official 200-threshold evaluation), see
            :func:`zoo.multimodal.metrics.aupro`.
        generator: random generator for test-time adaptation.

    Returns:
        ``{"pixel_auroc", "aupro", "image_auroc", "num_images"}``; AUROCs/AUPRO in [0, 1].
    """
    from .metrics import aupro, image_auroc, pixel_auroc

    dataset = dataset or make_synthetic_defect_set()
    maps, scores = [], []
    for i in range(len(dataset.names)):
        out = pipeline(dataset.images[i:i + 1], dataset.names[i], tta=tta, texture=True, augment_score=augment_score,
                       generator=generator, output_size=tuple(dataset.masks.shape[-2:]))
        maps.append(out.anomaly_maps[:, 0].cpu())
        scores.append(out.image_scores.cpu())
    maps_t, scores_t = torch.cat(maps).numpy(), torch.cat(scores).numpy()
    masks = dataset.masks.numpy()
    return {
        "pixel_auroc": pixel_auroc(masks, maps_t),
        "aupro": aupro(masks, maps_t, method=aupro_method),
        "image_auroc": image_auroc(dataset.labels.numpy(), scores_t),
        "num_images": float(len(dataset.names)),
    }
