"""The ``zoo`` command line: list, info, download, convert, predict, and the train/eval/bench verbs.

Errors are printed as one clear ``zoo: error: ...`` paragraph with a non-zero exit code; ``ZOO_DEBUG=1`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main"]

# Verbs whose argument parsing belongs to another module (LightningCLI for train): argv is handed over as is.
_DELEGATED: dict[str, tuple[str, str]] = {
    "train": ("zoo.train", "Lightning training: fit/validate/test/predict with --config FILE.yaml "
              "or a shipped recipe config's name (quickstart, ...)"),
    "eval": ("zoo.evaluate", "evaluate a model on an ImageFolder (top-1/top-5, loss, images/s)"),
    "bench": ("zoo.bench", "benchmark models (images/s, latency, memory) or `zoo bench ops`"),
    "anomaly": ("zoo.multimodal.anovl_cli", "AnoVL zero-shot anomaly map for an image"),
}


def _cmd_list(args: argparse.Namespace) -> int:
    import zoo

    names = zoo.list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        print(f"no zoo model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import zoo

    info = zoo.model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key in ("name", "family", "paper", "paper_url", "code_url", "license", "params", "input_size",
                "pretrained_tags"):
        value = f"{info[key]:,}" if key == "params" else info[key]
        print(f"{key:16s} {value}")
    print(f"{'config':16s} {json.dumps(info['config'], default=str)}")
    for w in info["weights"]:
        metrics = ", ".join(f"{k}={v}" for k, v in (w.get("metrics") or {}).items())
        print(f"{'weights':16s} {w['model']}.{w['tag']}  {metrics}  sha256={w.get('sha256') or 'unknown'}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from zoo import hub

    path = hub.fetch(args.ref, cache_dir=args.cache_dir)
    print(path)
    return 0


def _parse_kwargs_arg(text: str) -> dict[str, Any] | str:
    """``--kwargs`` as JSON, ``@file.json``, or a Python-literal dict (as recorded in keys.json)."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text  # a Python repr: zoo.convert parses it, naming objects included
    if not isinstance(value, dict):
        raise ValueError(f"--kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _cmd_convert(args: argparse.Namespace) -> int:
    from zoo import convert

    import zoo  # noqa: F401  (registers the families' converters)

    model = convert.convert_file(args.family, args.official_class, _parse_kwargs_arg(args.kwargs), args.checkpoint,
                                 args.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output} ({type(model).__name__}, {n:,} parameters)")
    return 0


def _load_image_batch(paths: Sequence[str], transform: Callable) -> "Any":
    import torch
    from PIL import Image

    images = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p!r} does not exist")
        with Image.open(p) as im:
            images.append(transform(im.convert("RGB")))
    return torch.stack(images)


def _class_names(num_classes: int) -> list[str] | None:
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from timm.data import create_transform, resolve_data_config

    import zoo

    if args.checkpoint:
        model = zoo.create_model(args.model, checkpoint_path=args.checkpoint)
    else:
        model = zoo.create_model(args.model, pretrained=True)
    model.eval().to(args.device)
    transform = create_transform(**resolve_data_config({}, model=model))
    batch = _load_image_batch(args.images, transform).to(args.device)
    with torch.inference_mode():
        probs = model(batch).float().softmax(-1)
    names = _class_names(probs.shape[-1])
    k = min(args.top_k, probs.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)
    for path, ps, idx in zip(args.images, top_p.tolist(), top_i.tolist()):
        print(path)
        for p, i in zip(ps, idx):
            label = names[i] if names else f"class {i}"
            print(f"  {p * 100:6.2f}%  {i:4d}  {label}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``zoo`` argument parser (the delegated verbs are listed, their own parsers handle their arguments)."""
    parser = argparse.ArgumentParser(prog="zoo", description="zoo: attention models for vision and multimodal "
                                     "research, on timm, diffusers, open_clip and Lightning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list zoo models", description="List zoo models matching a pattern.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'biformer*'")
    p.add_argument("--pretrained", action="store_true", help="list name.tag for every released checkpoint")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a model's family, paper, config, size and weights")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("download", help="download and verify a checkpoint (MODEL.TAG) into the cache",
                       description="Download MODEL.TAG from the weights manifest (mirrors, resume, sha256 check) "
                       "and print its cached path. Honours ZOO_CACHE, ZOO_OFFLINE/HF_HUB_OFFLINE, ZOO_MANIFEST.")
    p.add_argument("ref", metavar="MODEL.TAG")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $ZOO_CACHE or the user cache)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("convert", help="convert an official checkpoint to a zoo .safetensors file",
                       description="Build the zoo model equivalent to an official constructor call, load the "
                       "official checkpoint strictly and save zoo weights.")
    p.add_argument("--family", required=True, help="zoo family, e.g. biformer, volo, agent_attention")
    p.add_argument("--official-class", required=True, help="official class name, e.g. BiFormer")
    p.add_argument("--kwargs", default="{}", help="official constructor kwargs: JSON, @file.json or a Python dict")
    p.add_argument("checkpoint", metavar="CKPT", help="official checkpoint file")
    p.add_argument("output", metavar="OUT.safetensors")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("predict", help="top-k classes for images",
                       description="Classify images with a zoo model; preprocessing from its pretrained cfg.")
    p.add_argument("model", metavar="MODEL[.TAG]")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", default=None, help="weights file (official, zoo or Lightning checkpoint)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_predict)

    for verb, (_, help_text) in _DELEGATED.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def _run_delegated(verb: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(_DELEGATED[verb][0])
    return int(module.main(argv) or 0)


def _error_message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zoo`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in _DELEGATED:
            return _run_delegated(argv[0], argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # one clear line for users; ZOO_DEBUG=1 for the traceback
        if os.environ.get("ZOO_DEBUG"):
            raise
        print(f"zoo: error: {_error_message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
