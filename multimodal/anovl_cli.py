"""``zoo anomaly``: AnoVL zero-shot anomaly map of one image, or the offline synthetic-defect evaluation.

    zoo anomaly IMAGE --object NAME [--tta] --out map.png [--model ViT-B-16-plus-240 --pretrained laion400m_e32]
    zoo anomaly --synthetic-eval [--per-texture 8] [--tta] [--model ... --pretrained ...] [--json results.json]

The map is written as a heat-map overlay PNG (jet colour map of the min-max normalised map, 0.3 weight over the
image, as the official visualisation) at the image's own size; the image score is printed. ``--pretrained none``
uses random weights (tests, smoke runs); ``--model-config FILE.json`` registers an open_clip model config first.
Also runnable as ``python -m zoo.multimodal.anovl_cli``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["main", "build_parser", "heatmap_overlay"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``zoo anomaly``."""
    p = argparse.ArgumentParser(prog="zoo anomaly", description="AnoVL zero-shot anomaly map (open_clip ViT).")
    p.add_argument("image", nargs="?", help="input image (any format PIL reads)")
    p.add_argument("--object", dest="object_name", help="object class named in the prompts, e.g. 'bottle'")
    p.add_argument("--out", help="output PNG: heat-map overlay of the anomaly map")
    p.add_argument("--tta", action="store_true", help="test-time adaptation of the text adapter (5 AdamW steps)")
    p.add_argument("--texture", action="store_true", help="use the texture prompt templates")
    p.add_argument("--no-augment-score", action="store_true",
                   help="score the image alone instead of averaging over the 22 official augmentations")
    p.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip model name (default: %(default)s)")
    p.add_argument("--pretrained", default="laion400m_e32",
                   help="open_clip pretrained tag, local checkpoint file, or 'none' (default: %(default)s)")
    p.add_argument("--model-config", help="open_clip model config JSON to register before loading")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the test-time adaptation")
    p.add_argument("--synthetic-eval", action="store_true",
                   help="evaluate on the offline synthetic-defect set instead of one image")
    p.add_argument("--per-texture", type=int, default=8, help="synthetic-eval images per texture")
    p.add_argument("--size", type=int, default=None, help="synthetic-eval image size (default: model input)")
    p.add_argument("--json", dest="json_out", help="synthetic-eval: also write the metrics as JSON")
    return p


def heatmap_overlay(image, anomaly_map: np.ndarray, alpha: float = 0.7):
    """Blend a jet heat map of a min-max normalised map over an image.

    Args:
        image: PIL image (any mode).
        anomaly_map: (H, W) scores at the image's size.
        alpha: weight of the image (official 0.7).

    Returns:
        RGB PIL image.
    """
    from matplotlib import colormaps
    from PIL import Image

    m = anomaly_map.astype(np.float64)
    span = m.max() - m.min()
    m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    heat = colormaps["jet"](m)[..., :3] * 255.0
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray((alpha * base + (1 - alpha) * heat).astype(np.uint8))


def _load_pipeline(args: argparse.Namespace):
    import open_clip

    from .anovl import AnoVLPipeline

    if args.model_config:
        open_clip.add_model_config(args.model_config)
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    if pretrained is None:
        import torch

        print("zoo anomaly: random weights (--pretrained none): scores are meaningless", file=sys.stderr)
        torch.manual_seed(args.seed)  # reproducible random weights
    pipe = AnoVLPipeline.from_pretrained(args.model, pretrained, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_image(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    if not args.image or not args.object_name or not args.out:
        raise ValueError("zoo anomaly needs IMAGE, --object NAME and --out PATH.png (or --synthetic-eval)")
    image = Image.open(args.image).convert("RGB")
    pipe = _load_pipeline(args)
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    out = pipe(image, args.object_name, tta=args.tta, texture=True if args.texture else None,
               augment_score=not args.no_augment_score, generator=gen)
    full = F.interpolate(out.anomaly_maps, size=(image.height, image.width), mode="bilinear", align_corners=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_overlay(image, full[0, 0].cpu().numpy()).save(out_path)
    print(f"image score: {out.image_scores[0].item():.6f}")
    print(f"anomaly map: {out_path}")
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    import torch

    from .anovl import evaluate_synthetic, make_synthetic_defect_set

    pipe = _load_pipeline(args)
    size = args.size or pipe.image_size[0]
    data = make_synthetic_defect_set(args.per_texture, size=size, seed=args.seed)
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    result = evaluate_synthetic(pipe, data, tta=args.tta, augment_score=not args.no_augment_score, generator=gen)
    result.update(model=args.model, pretrained=str(args.pretrained), tta=bool(args.tta))
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        print(f"{key:12s} {100 * result[key]:.1f}")
    print(f"{'images':12s} {int(result['num_images'])}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``zoo anomaly ...``); returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return _run_synthetic(args) if args.synthetic_eval else _run_image(args)


if __name__ == "__main__":
    sys.exit(main())
