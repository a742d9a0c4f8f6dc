"""Image classification over any zoo or timm model, as a LightningModule.

The recipe is thin on purpose: the backbone comes from :func:`zoo.create_model` (so pretrained tags, official
release files and earlier Lightning checkpoints all load the same way), and the training tricks are timm's
(layer-wise lr decay parameter groups, Mixup/CutMix, ModelEmaV3). Everything a run needs is an ``__init__``
argument with a type, so LightningCLI turns it into ``--model.init_args.<name>`` flags and YAML keys.

The backbone lives in ``self.model``: a Lightning checkpoint's ``state_dict`` then carries ``model.``-prefixed
keys, which ``zoo.create_model(name, checkpoint_path=ckpt)`` strips. With EMA enabled the checkpoint also carries
``state_dict_ema`` (bare model keys, timm's name for it), which loaders prefer, as they do for timm's releases.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.ops import clear_parameter_caches
from zoo.ops.block_graphs import block_graphs

__all__ = ["ImageClassifier", "warmup_cosine_factor"]

# Strategies that shard parameters: a full-copy EMA of a shard is meaningless, so EMA refuses them.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup, then cosine decay to ``min_ratio``.

    Warmup starts at ``1 / (warmup_steps + 1)`` rather than 0 so that the first step already moves the weights.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _clip_for_fused_step(precision: MixedPrecision, optimizer: torch.optim.Optimizer, clip_val: float,
                         algorithm: str | None) -> None:
    """Clip the gradients of ``optimizer`` (one that unscales in its own step, such as ``AdamW(fused=True)``) by
    ``clip_val``, by their norm or by value (``algorithm``: "norm", the default, or "value").

    Under ``16-mixed`` the gradients are unscaled first by the plugin's GradScaler (``unscale_``): its ``step`` then
    passes the fused optimizer no scale (torch's contract for such optimizers), so nothing is unscaled twice. Under
    ``bf16-mixed`` there is no scaler and the gradients are clipped as they are, as Lightning clips them for any other
    optimizer.
    """
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    # Precision's own clipping, past MixedPrecision's refusal (which is about scaled gradients, handled above)
    Precision.clip_gradients(precision, optimizer, clip_val, GradClipAlgorithmType(algorithm or "norm"))


class ImageClassifier(L.LightningModule):
    """Supervised image classification with AdamW, warmup + cosine, layer decay, EMA, Mixup/CutMix.

    Args:
        model_name: a zoo or timm model name, ``name.tag`` to pick pretrained weights (``biformer_tiny.in1k``).
        num_classes: classifier size; must match the data module's ``num_classes`` when it has one.
        model_kwargs: extra constructor arguments for the model (``depth``, ``embed_dim``, ``img_size``,
            ``drop_path_rate``, ...), passed to :func:`zoo.create_model`.
        pretrained: load the manifest's weights for the tag (downloaded once, verified, cached).
        checkpoint_path: weights to start from: an official release file, a zoo ``.safetensors`` or a Lightning
            checkpoint of this recipe. The head is re-initialised when its size differs from ``num_classes``.
        lr: peak learning rate (after warmup) of the last layer group.
        weight_decay: AdamW weight decay; biases, norms and the model's ``no_weight_decay()`` get none.
        betas: AdamW betas.
        warmup_epochs: linear warmup length in epochs (fractions allowed); converted to optimizer steps.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        layer_decay: layer-wise lr decay (e.g. 0.75 for fine-tuning ViTs); ``None`` or 1.0 disables it. Groups come
            from the model's ``group_matcher`` (timm's ``param_groups_layer_decay``).
        label_smoothing: label smoothing of the training loss (also used as Mixup's smoothing).
        mixup_alpha: Mixup beta-distribution alpha; 0 disables Mixup.
        cutmix_alpha: CutMix alpha; 0 disables CutMix. Either one > 0 switches the loss to soft-target CE.
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are enabled.
        ema_decay: decay of an exponential moving average of the weights (e.g. 0.9998); ``None`` disables it.
            With EMA, validation/test/predict use the EMA weights and checkpoints carry them as ``state_dict_ema``.
        ema_warmup: ramp the EMA decay up from 0 (timm's warmup), which suits short runs.
        grad_checkpointing: call ``model.set_grad_checkpointing(True)`` to trade compute for activation memory.
        fused_adamw: take AdamW's fused implementation (``torch.optim.AdamW(fused=True)``), one kernel a step for
            all parameters where torch's default issues dozens; eager steps on CUDA, which wait for the host, take
            less time (zoo's Agent-DeiT-T at batch 64: 19.55 -> 17.99 ms a step, H100, BENCHMARKS.md seventy-fifth
            session). Its updates equal the default's up to float rounding. Needs floating-point parameters on a
            device that torch's fused AdamW supports (CUDA, CPU, ...). ``trainer.gradient_clip_val`` works with it
            under mixed precision too (see :meth:`configure_gradient_clipping`).
        block_graphs: run the training forward with block graphs on (:mod:`zoo.ops.block_graphs`): on CUDA the zoo
            models' blocks are captured into CUDA graphs on their third step and replayed from then on, which takes
            most of an eager step's host work away (Agent-PVT-T at batch 64, bf16: 21.34 -> 14.89 ms a step, H100,
            BENCHMARKS.md eighty-fifth session). Each block's graphs keep a memory pool of their own. Validation and
            models without ``zoo.ops.block_graphs.run_block`` in their block loops are unaffected.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        grad_checkpointing: bool = False,
        fused_adamw: bool = False,
        block_graphs: bool = False,
    ) -> None:
        super().__init__()
        _check_range("num_classes", num_classes, 1, None)
        _check_range("lr", lr, 0.0, None, low_open=True)
        _check_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        _check_range("warmup_epochs", warmup_epochs, 0.0, None)
        _check_range("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        if layer_decay is not None:
            _check_range("layer_decay", layer_decay, 0.0, 1.0, low_open=True)
        if ema_decay is not None:
            _check_range("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        for name, flag in (("fused_adamw", fused_adamw), ("block_graphs", block_graphs)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.save_hyperparameters()
        self.model = self._create_backbone()
        if grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise ValueError(f"grad_checkpointing=True but model_name={model_name!r} has no "
                                 "set_grad_checkpointing(); set grad_checkpointing: false")
            self.model.set_grad_checkpointing(True)
        self.mixup = self._create_mixup()
        self.train_loss_fn: nn.Module = (SoftTargetCrossEntropy() if self.mixup is not None
                                         else nn.CrossEntropyLoss(label_smoothing=label_smoothing))
        top_k = min(5, num_classes)
        self.top_k = top_k
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acck = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acck = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        # Not a registered submodule: its weights must not enter `state_dict()` (which stays loadable as plain
        # `model.` keys) nor the optimizer, and DDP must not see it. Saved as `state_dict_ema` instead.
        self.__dict__["_ema"] = None
        self.__dict__["_pending_ema_state"] = None
        self.__dict__["_group_plan"] = self._plan_parameter_groups()

    # ------------------------------------------------------------------------------------------------ building
    def _create_backbone(self) -> nn.Module:
        import zoo

        hp = self.hparams
        return zoo.create_model(hp.model_name, pretrained=hp.pretrained, num_classes=hp.num_classes,
                                checkpoint_path=hp.checkpoint_path, **dict(hp.model_kwargs or {}))

    def _create_mixup(self) -> Mixup | None:
        hp = self.hparams
        if hp.mixup_alpha <= 0 and hp.cutmix_alpha <= 0:
            return None
        return Mixup(mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha, prob=hp.mixup_prob,
                     switch_prob=hp.mixup_switch_prob, label_smoothing=hp.label_smoothing,
                     num_classes=hp.num_classes)

    # ------------------------------------------------------------------------------------------------ EMA
    @property
    def ema(self) -> ModelEmaV3 | None:
        """The EMA of the backbone (``None`` when ``ema_decay`` is None or before training starts)."""
        return self._ema

    def _ensure_ema(self) -> ModelEmaV3 | None:
        """Create the EMA (lazily, on the model's device) and load any EMA state restored from a checkpoint."""
        if self.hparams.ema_decay is None:
            return None
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if strategy in _SHARDED_STRATEGIES:
            raise ValueError(f"ema_decay={self.hparams.ema_decay} is not supported with the sharded strategy "
                             f"{strategy}; use strategy=ddp or set model.init_args.ema_decay=null")
        device = next(self.model.parameters()).device
        if self._ema is None:
            self.__dict__["_ema"] = ModelEmaV3(self.model, decay=self.hparams.ema_decay,
                                               use_warmup=self.hparams.ema_warmup)
        elif next(self._ema.module.parameters()).device != device:
            self._ema.module.to(device)
        if self._pending_ema_state is not None:
            self._ema.module.load_state_dict(self._pending_ema_state)
            self.__dict__["_pending_ema_state"] = None
        return self._ema

    def eval_model(self) -> nn.Module:
        """The weights used for evaluation: the EMA copy when EMA is enabled, else the trained model."""
        ema = self._ensure_ema()
        return ema.module if ema is not None else self.model

    def on_fit_start(self) -> None:
        self._ensure_ema()

    def on_validation_start(self) -> None:
        self._ensure_ema()

    def on_test_start(self) -> None:
        self._ensure_ema()

    def on_predict_start(self) -> None:
        self._ensure_ema()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Update after every optimizer step only (not every micro-batch under gradient accumulation).
        ema = self._ema
        if ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            ema.update(self.model, step=self.global_step)
            # On CUDA the update's torch._foreach_lerp_ bumps no version counter, so caches of values computed from
            # the EMA weights (autocast copies, agent biases) cannot see it (the optimizer step before it only
            # happens to invalidate them); an evaluation of stale copies scored chance on the H200.
            clear_parameter_caches(ema.module)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ema is not None:
            checkpoint["state_dict_ema"] = {k: v.detach().clone() for k, v in self._ema.module.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict_ema")
        if state is None or self.hparams.ema_decay is None:
            return
        if self._ema is not None:
            self._ema.module.load_state_dict(state)
        else:
            self.__dict__["_pending_ema_state"] = state

    # ------------------------------------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the trained model (not the EMA; use :meth:`eval_model` for that)."""
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            if len(x) % 2:  # timm's batch-mode Mixup pairs samples by flipping the batch, so it needs an even size
                x, y = x[:-1], y[:-1]
            x, y = self.mixup(x, y)
        with block_graphs(True) if self.hparams.block_graphs else contextlib.nullcontext():
            logits = self.model(x)
        loss = self.train_loss_fn(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(x))
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, acc1: MulticlassAccuracy,
                  acck: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self.eval_model()(x)
        loss = F.cross_entropy(logits.float(), y)
        acc1.update(logits, y)
        acck.update(logits, y)
        n = len(x)
        self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}_acc1", acc1, on_epoch=True, prog_bar=True, batch_size=n)  # torchmetrics syncs itself
        self.log(f"{stage}_acc{self.top_k}", acck, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val", self.val_acc1, self.val_acck)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test", self.test_acc1, self.test_acck)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities and the top-k classes of each image (labels in the batch are ignored)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self.eval_model()(x).float().softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        return {"probs": probs, "topk_probs": top_p, "topk_classes": top_i}

    # ------------------------------------------------------------------------------------------------ optim
    def _plan_parameter_groups(self) -> list[tuple[dict[str, float], list[str]]]:
        """Decide each parameter's (lr, weight_decay) by name, on the unwrapped model.

        Done once at construction: under FSDP the parameters seen by ``configure_optimizers`` are flat shards
        (1-D), which would put every weight in timm's no-decay group. No weight decay on 1-D parameters (biases,
        norms) and on the model's ``no_weight_decay()`` names; layer decay groups come from ``group_matcher``.
        """
        hp = self.hparams
        no_wd = set(self.model.no_weight_decay()) if hasattr(self.model, "no_weight_decay") else set()
        if hp.layer_decay is not None and hp.layer_decay < 1.0:
            groups = param_groups_layer_decay(self.model, weight_decay=hp.weight_decay, no_weight_decay_list=no_wd,
                                              layer_decay=hp.layer_decay)
        else:
            groups = param_groups_weight_decay(self.model, weight_decay=hp.weight_decay, no_weight_decay_list=no_wd)
        names = {id(p): n for n, p in self.model.named_parameters()}
        # torch's LambdaLR scales each group's own lr, so the layer scale goes into the group's base lr
        return [({"lr": hp.lr * g.get("lr_scale", 1.0), "weight_decay": g["weight_decay"]},
                 [names[id(p)] for p in g["params"]]) for g in groups]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of the model's current parameters, each with its ``lr`` and ``weight_decay``."""
        current = {_unwrapped_name(n): p for n, p in self.model.named_parameters() if p.requires_grad}
        groups, assigned = [], set()
        for options, names in self._group_plan:
            params = [current[n] for n in names if n in current]
            assigned.update(n for n in names if n in current)
            if params:
                groups.append({"params": params, **options})
        missing = sorted(set(current) - assigned)
        if missing:  # never train with parameters silently left out of the optimizer
            raise RuntimeError(f"parameters without an optimizer group: {missing[:10]}")
        return groups

    def _schedule_steps(self) -> tuple[int, int]:
        """(warmup_steps, total_steps) in optimizer steps, from the trainer's limits."""
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the lr schedule needs a finite run: set trainer.max_epochs or trainer.max_steps")
        total = int(total)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            steps_per_epoch = total / max_epochs
        else:
            steps_per_epoch = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        warmup = round(self.hparams.warmup_epochs * steps_per_epoch)
        return min(warmup, max(0, total - 1)), total

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        fused = True if hp.fused_adamw else None  # (None, not False: torch's default choice, foreach on CUDA)
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        warmup, total = self._schedule_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as the Trainer asks; under FSDP, by the norm over all shards (``FSDP.clip_grad_norm_``); with a fused
        optimizer under mixed precision, on the unscaled gradients (:func:`_clip_for_fused_step`).

        Lightning's FSDP precision plugin refuses norm clipping because a per-shard norm would be wrong; the root
        FSDP module computes the global norm, so ``trainer.gradient_clip_val`` works with ``strategy=fsdp`` too.
        Lightning's mixed-precision plugin refuses any clipping before an optimizer that unscales gradients in its
        own step (``fused_adamw=True``); the recipe clips for it itself, so ``gradient_clip_val`` works there too.
        """
        root = self.trainer.model if self._trainer is not None else None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and hasattr(root, "clip_grad_norm_") \
                and type(self.trainer.strategy).__name__ == "FSDPStrategy":
            root.clip_grad_norm_(gradient_clip_val)
            return
        precision = self.trainer.precision_plugin if self._trainer is not None else None
        if gradient_clip_val and isinstance(precision, MixedPrecision) \
                and getattr(optimizer, "_step_supports_amp_scaling", False):
            _clip_for_fused_step(precision, optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and int(data_classes) != self.hparams.num_classes:
            raise ValueError(f"model num_classes={self.hparams.num_classes} but the data has {data_classes} classes; "
                             f"set model.init_args.num_classes={data_classes}")


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    """A parameter name without the segments that FSDP, activation checkpointing or torch.compile insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _check_range(name: str, value: float, low: float | None, high: float | None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raise a ValueError naming the argument, its value and the accepted range."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf" if high is None else f"{high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is out of range; accepted: {lo}, {hi}")
