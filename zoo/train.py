"""``zoo train``: LightningCLI over the zoo recipes (``fit | validate | test | predict``).

Examples::

    zoo train fit --config recipes/configs/quickstart.yaml
    zoo train fit --config recipes/configs/quickstart.yaml --trainer.max_epochs=2 --ckpt_path runs/.../last.ckpt
    zoo train validate --config runs/quickstart/lightning_logs/version_0/config.yaml --ckpt_path best.ckpt
    zoo train fit --config recipes/configs/imagenet_finetune.yaml --trainer.strategy=ddp --trainer.devices=8

Models and data modules are given by class (``model: {class_path: ImageClassifier, init_args: ...}``), so every
recipe of ``zoo.recipes`` (and a user's own LightningModule) trains through the same command. Every run gets the
:class:`~zoo.recipes.callbacks.FitReport` callback: at the end of ``fit`` it prints the validation accuracy and
writes ``fit_summary.json`` and ``learning_curves.png`` next to the logs.
"""
from __future__ import annotations

import sys
import warnings

__all__ = ["build_cli", "main"]


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
    """Build (and with ``run=True`` execute) the ``zoo train`` LightningCLI on ``args`` (``sys.argv[1:]`` if None)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from zoo.recipes.callbacks import FitReport

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
