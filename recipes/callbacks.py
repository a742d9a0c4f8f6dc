"""Callbacks of the recipes: the end-of-fit report (validation accuracy JSON + learning-curve PNG)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = ["FitReport", "plot_learning_curves"]


def _scalar(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class FitReport(L.Callback):
    """Records per-epoch train loss, val loss, val accuracy and training throughput; at the end of ``fit`` prints the
    validation accuracy and writes ``fit_summary.json`` and ``learning_curves.png`` into the run's log folder.

    Throughput (``train_images_per_s``) counts the training batches of all ranks over the wall time from the start
    of the epoch's training to its last optimizer step (validation excluded), the device synchronized at both ends.

    The history is part of the callback state, so a run resumed with ``--ckpt_path`` keeps its earlier epochs.

    Args:
        monitor: the metric to report; default: the module's ``report_metric`` attribute, else ``val_acc1``.
        filename: name of the JSON summary written in ``trainer.log_dir``.
        plot: write the learning-curve PNG.
    """

    def __init__(self, monitor: str | None = None, filename: str = "fit_summary.json", plot: bool = True) -> None:
        self._monitor = monitor
        self.monitor = monitor or "val_acc1"
        self.filename = filename
        self.plot = plot
        self.history: dict[int, dict[str, float | None]] = {}
        self._epoch_start: float | None = None
        self._samples = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Without an explicit ``monitor``, report the module's ``report_metric`` (e.g. ``val_dice``), else val_acc1."""
        if self._monitor is None:
            self.monitor = getattr(pl_module, "report_metric", None) or "val_acc1"

    def _row(self, epoch: int) -> dict[str, float | None]:
        return self.history.setdefault(epoch, {})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _synchronize(pl_module)
        self._epoch_start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += _batch_size(batch)

    def _close_training_timer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Turn the running epoch's timer into ``train_images_per_s`` (once per epoch)."""
        if self._epoch_start is None or self._samples == 0:
            return
        _synchronize(pl_module)
        seconds = time.perf_counter() - self._epoch_start
        row = self._row(trainer.current_epoch)
        row["train_images_per_s"] = self._samples * trainer.world_size / seconds
        row["train_seconds"] = seconds
        self._epoch_start = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._close_training_timer(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        row = self._row(trainer.current_epoch)
        row["val_loss"] = _scalar(m, "val_loss")
        row[self.monitor] = _scalar(m, self.monitor)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_training_timer(trainer, pl_module)
        self._row(trainer.current_epoch)["train_loss"] = _scalar(trainer.callback_metrics, "train_loss_epoch")

    def state_dict(self) -> dict[str, Any]:
        return {"history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): dict(v) for k, v in state_dict.get("history", {}).items()}

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        """The report as a dict: final and best monitored accuracy, per-epoch history, best checkpoint."""
        epochs = sorted(self.history)
        accs = [(e, self.history[e].get(self.monitor)) for e in epochs]
        accs = [(e, a) for e, a in accs if a is not None]
        best_epoch, best = max(accs, key=lambda t: t[1]) if accs else (None, None)
        ckpt = trainer.checkpoint_callback
        speeds = [self.history[e]["train_images_per_s"] for e in epochs[1:]
                  if self.history[e].get("train_images_per_s")]  # epoch 0 pays for warm-up (cudnn, allocator)
        return {
            "monitor": self.monitor,
            f"final_{self.monitor}": accs[-1][1] if accs else None,
            f"best_{self.monitor}": best,
            "best_epoch": best_epoch,
            "epochs": len(epochs),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "train_images_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
            "best_checkpoint": getattr(ckpt, "best_model_path", None) or None,
            "last_checkpoint": getattr(ckpt, "last_model_path", None) or None,
            "history": [{"epoch": e, **self.history[e]} for e in epochs],
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0 under DDP: every rank must ask, only rank 0 writes
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self.write_report(trainer, out_dir)

    def write_report(self, trainer: L.Trainer, out_dir: Path) -> None:
        """Write the JSON summary and the PNG into ``out_dir`` and print the result."""
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = self.summary(trainer)
        path = out_dir / self.filename
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, path)
        final, best = summary[f"final_{self.monitor}"], summary[f"best_{self.monitor}"]
        if final is None:
            lines = [f"validation {self.monitor}: no validation epoch completed"]
        else:
            best_txt = f"best {100 * best:.2f}% at epoch {summary['best_epoch']}"
            lines = [f"validation {self.monitor}: {100 * final:.2f}% ({best_txt})"]
        if summary["train_images_per_s"]:
            lines.append(f"training throughput: {summary['train_images_per_s']:.1f} images/s "
                         f"({summary['world_size']} device(s), {summary['strategy']}, {summary['precision']}; "
                         "median over epochs after the first)")
        lines.append(f"summary: {path}")
        if self.plot and summary["history"]:
            png = plot_learning_curves(summary["history"], out_dir / "learning_curves.png", self.monitor)
            lines.append(f"learning curves: {png}")
        print("\n".join(lines), flush=True)


def _synchronize(pl_module: L.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def _batch_size(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(x) if hasattr(x, "__len__") else 0


def plot_learning_curves(history: list[dict[str, Any]], path: str | os.PathLike, monitor: str = "val_acc1") -> Path:
    """Write a PNG with train/val loss (left) and the monitored validation accuracy (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on training machines
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        return [p[0] + 1 for p in pts], [p[1] for p in pts]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    xs, ys = series(monitor)
    if xs:
        ax_acc.plot(xs, [100 * y for y in ys], marker="o", color="tab:green")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"{monitor} (%)")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
