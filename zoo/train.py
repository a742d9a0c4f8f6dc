"""``zoo train``: LightningCLI over the zoo recipes (``fit | validate | test | predict``).

Examples::

    zoo train fit --config recipes/configs/quickstart.yaml
    zoo train fit --config quickstart          (a recipe config installed with zoo, by name: no checkout needed)
    zoo train fit --config recipes/configs/quickstart.yaml --trainer.max_epochs=2 --ckpt_path runs/.../last.ckpt
    zoo train validate --config runs/quickstart/lightning_logs/version_0/config.yaml --ckpt_path best.ckpt
    zoo train fit --config recipes/configs/imagenet_finetune.yaml --trainer.strategy=ddp --trainer.devices=8

Models and data modules are given by class (``model: {class_path: ImageClassifier, init_args: ...}``), so every
recipe of ``zoo.recipes`` (and a user's own LightningModule) trains through the same command. Every run gets the
:class:`~zoo.recipes.callbacks.FitReport` callback: at the end of ``fit`` it prints the validation accuracy and
writes ``fit_summary.json`` and ``learning_curves.png`` next to the logs.

A ``--config`` value that is not a file but the name of a recipe config installed with zoo (``quickstart`` or
``quickstart.yaml``: :func:`shipped_configs`) runs that config, so a ``pip install`` without the repository's checkout
has the recipes too.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

__all__ = ["build_cli", "main", "shipped_configs", "resolve_config_args"]

_CONFIG_FLAGS = ("--config", "-c")
_CONFIG_NAME = re.compile(r"[\w.-]+")  # a bare name: no folder, not inline YAML


def shipped_configs() -> dict[str, Path]:
    """The recipe configs installed with zoo (``zoo/recipes/configs/*.yaml``): name without ``.yaml`` -> path."""
    from importlib.resources import files

    folder = files("zoo.recipes") / "configs"
    return {entry.name[:-len(".yaml")]: Path(str(entry)) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")}


def _resolve_config(value: str) -> str:
    if Path(value).exists() or not _CONFIG_NAME.fullmatch(value):
        return value  # a file, or a path or inline YAML that LightningCLI reports on itself
    shipped = shipped_configs()
    name = value[:-len(".yaml")] if value.endswith(".yaml") else value
    if name in shipped:
        return str(shipped[name])
    raise ValueError(f"--config {value!r} is neither a file nor a recipe config installed with zoo; give a YAML "
                     f"file's path or one of: {', '.join(shipped)}")


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config NAME`` / ``--config=NAME`` / ``-c NAME`` that names no file but a shipped recipe
    config (:func:`shipped_configs`) replaced by that config's installed path; ValueError for a bare name that is
    neither."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and i + 1 < len(resolved):
            resolved[i + 1] = _resolve_config(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + _resolve_config(arg[len("--config="):])
    return resolved


def _import_recipes() -> None:
    """Import the recipe modules so that short class names (``ImageClassifier``) resolve in configs."""
    import zoo  # noqa: F401  (registers the zoo backbones with timm)
    from zoo.recipes import callbacks, classification, data  # noqa: F401


def _quiet_known_warnings() -> None:
    # The digits data lives in memory: worker processes would only slow it down, so Lightning's hint is noise.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # `zoo train` hands LightningCLI the arguments after the verb, while sys.argv still holds the verb itself
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")


def build_cli(args: list[str] | None = None, run: bool = True):
    """Build (and with ``run=True`` execute) the ``zoo train`` LightningCLI on ``args`` (``sys.argv[1:]`` if None;
    a ``--config`` may name a shipped recipe config, see :func:`resolve_config_args`)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from zoo.recipes.callbacks import FitReport

    args = resolve_config_args(sys.argv[1:] if args is None else args)
    _import_recipes()
    _quiet_known_warnings()
    return LightningCLI(
        L.LightningModule, L.LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},  # reruns into the same folder must not be refused
        trainer_defaults={"callbacks": [FitReport()]},  # always present, on top of the config's callbacks
        parser_kwargs={"prog": "zoo train"},
        args=args, run=run,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zoo train ARGS...``; returns the process exit status."""
    if argv is None:
        argv = sys.argv[1:]
    build_cli(list(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
