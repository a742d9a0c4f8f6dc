"""``zoo eval``: top-1/top-5, loss and throughput of a model on an ImageFolder.

Examples::

    zoo eval biformer_tiny.in1k --data /data/imagenet/val
    zoo eval resnet18 --data val/ --checkpoint runs/.../last.ckpt --batch-size 128 --amp --json result.json

``--data`` is a folder of class folders (``DIR/<class>/<image>``), in the class order the model was trained with
(sorted folder names, as ImageFolder and ImageNet's synsets use). The transform is timm's eval transform resolved
from the model's ``pretrained_cfg`` (resize, center crop, normalize), with ``--img-size``/``--crop-pct`` overrides.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["build_parser", "evaluate_model", "lightning_model_kwargs", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``zoo eval`` argument parser."""
    p = argparse.ArgumentParser(prog="zoo eval", description="Evaluate a model on an ImageFolder (top-1/top-5).")
    p.add_argument("model", help="zoo or timm model name, optionally name.tag (pretrained weights of that tag)")
    p.add_argument("--data", required=True, help="ImageFolder root: DIR/<class>/<image>")
    p.add_argument("--checkpoint", default=None,
                   help="weights to evaluate: official file, zoo .safetensors or Lightning checkpoint")
    p.add_argument("--no-pretrained", action="store_true",
                   help="without --checkpoint, evaluate random weights instead of the pretrained ones")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the weights' own)")
    p.add_argument("--model-kwargs", default=None,
                   help='JSON dict of constructor arguments, e.g. \'{"depth": [1,1,2,1]}\' (a Lightning checkpoint '
                        "of a zoo recipe provides its own)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--img-size", type=int, default=None, help="override the model's input size")
    p.add_argument("--crop-pct", type=float, default=None, help="override the model's center-crop ratio")
    p.add_argument("--amp", action="store_true", help="autocast to --amp-dtype")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (smoke tests)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    return p


def lightning_model_kwargs(checkpoint: dict[str, Any], model_name: str) -> dict[str, Any]:
    """``model_kwargs`` saved by a zoo recipe in a Lightning checkpoint, if it trained ``model_name``'s architecture."""
    from timm.models import split_model_name_tag

    hp = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hp, dict) or not hp.get("model_name"):
        return {}
    if split_model_name_tag(hp["model_name"])[0] != split_model_name_tag(model_name)[0]:
        return {}
    return dict(hp.get("model_kwargs") or {})


def _parse_model_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs={text!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs={text!r} must be a JSON object (a dict of constructor arguments)")
    return value


def _build_model(args: argparse.Namespace) -> torch.nn.Module:
    import zoo
    from zoo import convert

    kwargs: dict[str, Any] = {}
    if args.checkpoint:
        kwargs.update(lightning_model_kwargs(convert.read_checkpoint(args.checkpoint), args.model))
    kwargs.update(_parse_model_kwargs(args.model_kwargs))
    pretrained = not args.checkpoint and not args.no_pretrained
    return zoo.create_model(args.model, pretrained=pretrained, num_classes=args.num_classes,
                            checkpoint_path=args.checkpoint, **kwargs)


def _build_loader(model: torch.nn.Module, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    import timm.data
    from torchvision.datasets import ImageFolder

    root = Path(args.data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data={args.data!r} is not a folder; expected DIR/<class>/<image>")
    overrides = {"img_size": args.img_size, "crop_pct": args.crop_pct}
    cfg = timm.data.resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    dataset = ImageFolder(str(root), transform=timm.data.create_transform(**cfg, is_training=False))
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.workers, pin_memory=torch.cuda.is_available())


def _amp_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: str | torch.device = "cpu",
                   amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy (fractions), mean cross-entropy loss and throughput of ``model`` over ``loader``.

    Throughput counts the whole loop (data loading included): what a user of this loader would see.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    num_classes = None
    start = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        num_classes = logits.shape[-1]
        if int(y.max()) >= num_classes:
            raise ValueError(f"the data has class index {int(y.max())} but the model has {num_classes} classes; "
                             "pass --num-classes or evaluate on a folder with the model's classes")
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, num_classes), dim=-1).indices
        hits = top.eq(y[:, None])
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=-1).sum())
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if n == 0:
        raise ValueError("the data loader gave no images")
    return {"images": n, "top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n,
            "seconds": seconds, "images_per_s": n / seconds, "num_classes": num_classes}


def format_result(result: dict[str, Any]) -> str:
    """One-row table of an evaluation result."""
    from zoo.bench import format_table

    row = {"model": result["model"], "images": result["images"], "top1 %": f"{100 * result['top1']:.2f}",
           "top5 %": f"{100 * result['top5']:.2f}", "loss": f"{result['loss']:.4f}",
           "img/s": f"{result['images_per_s']:.1f}", "device": result["device"], "amp": result["amp"] or "-"}
    return format_table([row])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zoo eval ARGS...``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _build_model(args)
    loader = _build_loader(model, args)
    result = evaluate_model(model, loader, device, _amp_dtype(args.amp_dtype) if args.amp else None,
                            args.channels_last)
    result = {"model": args.model, "checkpoint": args.checkpoint, "data": str(args.data), "device": device,
              "amp": args.amp_dtype if args.amp else None, "batch_size": args.batch_size, **result}
    print(format_result(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
