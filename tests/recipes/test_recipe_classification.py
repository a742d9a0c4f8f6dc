"""ImageClassifier: training reduces the loss, Mixup/CutMix targets, EMA arithmetic, layer decay, schedule."""
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from zoo.recipes.classification import ImageClassifier, warmup_cosine_factor

import zoo


def _module(tiny_kwargs, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_classes", 4)
    kw.setdefault("warmup_epochs", 0.0)
    return ImageClassifier("biformer_tiny", model_kwargs=tiny_kwargs, **kw)


def _fit(module, x, y, steps, callbacks=(), batch_size=None, **trainer_kwargs):
    """Run `steps` optimizer steps on the same batch (repeated), without logger/checkpoints."""
    ds = TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps))
    loader = DataLoader(ds, batch_size=batch_size or len(x), shuffle=False)
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, **trainer_kwargs}
    trainer = L.Trainer(max_steps=steps, max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@torch.no_grad()
def _loss(model, x, y):
    # train mode: BatchNorm normalizes with the batch's statistics, as during the steps being tested
    return torch.nn.functional.cross_entropy(model.train()(x), y).item()


def test_training_steps_reduce_loss_on_a_fixed_batch(tiny_kwargs, fixed_batch):
    x, y = fixed_batch
    module = _module(tiny_kwargs, lr=3e-3, label_smoothing=0.0, weight_decay=0.0)
    before = _loss(module.model, x, y)
    _fit(module, x, y, steps=8)
    after = _loss(module.model, x, y)
    assert after < 0.7 * before, (before, after)


class _RecordTargets(torch.nn.Module):
    """Wraps the training loss to record what it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, logits, target):
        self.calls.append((logits.detach().clone(), target.detach().clone()))
        return self.inner(logits, target)


def test_mixup_gives_soft_targets_and_trims_odd_batches(tiny_kwargs, fixed_batch):
    x, y = fixed_batch
    module = _module(tiny_kwargs, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    assert type(module.train_loss_fn).__name__ == "SoftTargetCrossEntropy"
    module.train_loss_fn = recorder = _RecordTargets(module.train_loss_fn)
    _fit(module, x[:7], y[:7], steps=2)  # odd batch: one sample is dropped so that Mixup can pair the rest
    for logits, target in recorder.calls:
        assert logits.shape == (6, 4) and target.shape == (6, 4)
        torch.testing.assert_close(target.sum(-1), torch.ones(6))
        # smoothing 0.1 over 4 classes puts 0.025 on each class at least; mixing puts mass on 2 classes
        assert target.min() >= 0.025 - 1e-6
        assert (target > 0.025 + 1e-4).sum(-1).max() >= 2
    # ...while evaluation of the same module still uses hard labels
    assert module.mixup is not None and module.mixup.num_classes == 4


class _RecordWeights(L.Callback):
    """Copies the model weights after every optimizer step (callbacks run before the module's hook)."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def test_ema_follows_timm_update_and_is_used_for_evaluation(tiny_kwargs, fixed_batch, tmp_path):
    x, y = fixed_batch
    module = _module(tiny_kwargs, ema_decay=0.5, ema_warmup=False, lr=1e-2)
    rec = _RecordWeights()
    trainer = _fit(module, x, y, steps=3, callbacks=[rec])
    w1, w2, w3 = rec.weights
    ema = module.ema.module.state_dict()
    # ModelEmaV3: decay 0 at the first step (copy), then ema = 0.5 * ema + 0.5 * model
    key = "head.weight"
    expected = 0.5 * (0.5 * w1[key] + 0.5 * w2[key]) + 0.5 * w3[key]
    torch.testing.assert_close(ema[key], expected)
    assert not torch.allclose(ema[key], w3[key])
    assert module.eval_model() is module.ema.module

    # the checkpoint carries the EMA weights, and loaders prefer them (as for timm's releases)
    ckpt = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = zoo.create_model("biformer_tiny", checkpoint_path=ckpt, **tiny_kwargs).eval()
    module.ema.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.ema.module(x), rtol=0, atol=0)

    # a module restored from the checkpoint evaluates with the same EMA weights
    restored = ImageClassifier.load_from_checkpoint(ckpt)
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.eval_model()(x), loaded(x), rtol=0, atol=0)


def test_ema_update_drops_the_caches_of_the_ema_weights(tiny_kwargs, fixed_batch):
    """After an EMA update, evaluation under autocast uses the new EMA weights even when the update bumped no version
    counter (CUDA's torch._foreach_lerp_, which timm's ModelEmaV3 uses; a ``.data`` write stands in for it here)."""
    x, y = fixed_batch
    module = _module(tiny_kwargs, ema_decay=0.5, ema_warmup=False, lr=1e-2)
    _fit(module, x, y, steps=2)
    ema = module.ema.module.eval()

    def autocast_logits(model):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return model(x).float()

    before = autocast_logits(ema)  # fills the cached bf16 copies of the EMA weights
    model_weights = dict(module.model.named_parameters())

    def update_without_version_bump(model, step=None):
        for name, p in ema.named_parameters():
            p.data.lerp_(model_weights[name].data, 0.5)

    module.ema.update = update_without_version_bump
    module.on_train_batch_end(None, (x, y), 0)
    fresh = zoo.create_model("biformer_tiny", num_classes=4, **tiny_kwargs).eval()
    fresh.load_state_dict(ema.state_dict())
    after = autocast_logits(ema)
    assert torch.equal(after, autocast_logits(fresh))
    assert (after - before).abs().max().item() > 1e-3


def test_layer_decay_scales_lr_per_layer_group(tiny_kwargs):
    module = _module(tiny_kwargs, lr=1.0, layer_decay=0.5, weight_decay=0.05)
    groups = module.parameter_groups()
    lrs = sorted({g["lr"] for g in groups})
    # stem, 4 stages x (downsample + block) grouped by timm's matcher, final norm/head: decay 0.5 per layer
    assert lrs[-1] == 1.0
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(math.isclose(r, 2.0) for r in ratios), lrs
    assert len(lrs) >= 5
    by_name = {}
    names = {id(p): n for n, p in module.model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[names[id(p)]] = g
    assert by_name["head.weight"]["lr"] == 1.0
    assert by_name["downsample_layers.0.0.weight"]["lr"] == lrs[0]
    # no weight decay on 1-d parameters (biases, norms), weight decay elsewhere
    assert by_name["head.bias"]["weight_decay"] == 0.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(module.model.parameters()))


def test_without_layer_decay_every_group_has_the_base_lr(tiny_kwargs):
    module = _module(tiny_kwargs, lr=0.25, weight_decay=0.1)
    groups = module.parameter_groups()
    assert {g["lr"] for g in groups} == {0.25}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
    # FSDP hands configure_optimizers flat 1-D shards: the decay decision must still follow the original shapes
    head = module.model.head.weight
    head.data = head.data.flatten()
    decayed = next(g for g in module.parameter_groups() if g["weight_decay"] == 0.1)
    assert any(p is head for p in decayed["params"])


def test_fused_adamw_takes_the_fused_optimizer_with_the_default_update(tiny_kwargs, fixed_batch):
    x, y = fixed_batch
    runs = {}
    for fused in (False, True):
        module = _module(tiny_kwargs, lr=3e-3, fused_adamw=fused)
        start = [p.detach().clone() for p in module.model.parameters()]
        # one step: both optimizers then see the same gradients (later ones differ by rounding, which Adam's
        # normalisation blows up to lr-sized steps for parameters whose gradient is about zero)
        trainer = _fit(module, x, y, steps=1)
        runs[fused] = (trainer.optimizers[0], start, [p.detach() for p in module.model.parameters()])
    (default, start, after), (fused, fused_start, fused_after) = runs[False], runs[True]
    assert fused.defaults["fused"] is True and not default.defaults["fused"]
    assert all(torch.equal(a, b) for a, b in zip(start, fused_start))
    assert max((a - s).abs().max().item() for a, s in zip(after, start)) > 1e-3  # the step moved the weights
    for a, b in zip(after, fused_after):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match=r"fused_adamw must be True or False, got 'yes'"):
        _module(tiny_kwargs, fused_adamw="yes")


def test_block_graphs_are_on_for_the_training_forward_only(tiny_kwargs, fixed_batch, monkeypatch):
    """``block_graphs=True``: the training step's forward runs with block graphs on (on the CPU every block then
    runs eagerly, so the step is the same), validation and the rest with them as they were."""
    from zoo.ops import block_graphs as bg

    x, y = fixed_batch
    for flag in (False, True):
        module = _module(tiny_kwargs, block_graphs=flag)
        seen = []
        forward = module.model.forward
        monkeypatch.setattr(module.model, "forward", lambda t: (seen.append(bg.block_graphs_enabled()), forward(t))[1])
        _fit(module, x, y, steps=2)
        assert seen == [flag, flag] and not bg.block_graphs_enabled()
    with pytest.raises(TypeError, match=r"block_graphs must be True or False, got 1"):
        _module(tiny_kwargs, block_graphs=1)


class _GradientsAroundClipping(L.Callback):
    """Records the gradients before clipping (``on_before_optimizer_step``) and as the optimizer's step saw them."""

    def __init__(self):
        self.before, self.at_step = None, None

    def on_fit_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda opt, args, kwargs: setattr(self, "at_step", _grads(opt)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = _grads(optimizer)


def _grads(optimizer):
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return [p.grad.detach().to("cpu", copy=True) for p in params]  # (clipping writes the gradients in place)


@pytest.mark.parametrize("precision", ["bf16-mixed", pytest.param("16-mixed", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_adamw_clips_gradients_under_mixed_precision(tiny_kwargs, fixed_batch, algorithm, precision):
    # Lightning's mixed-precision plugin refuses to clip before an optimizer that unscales in its own step (fused
    # AdamW); the recipe clips there itself, exactly as Lightning clips before the default AdamW. 16-mixed (CUDA
    # only) also scales the loss: the fused step must then get unscaled, clipped gradients and no scale of its own
    x, y = fixed_batch
    clip = 0.05 if algorithm == "norm" else 1e-3
    accelerator = "gpu" if precision == "16-mixed" else "cpu"
    seen = {}
    for fused in (False, True):
        record = _GradientsAroundClipping()
        module = _module(tiny_kwargs, fused_adamw=fused)
        _fit(module, x, y, steps=1, callbacks=[record], precision=precision, accelerator=accelerator,
             gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
        seen[fused] = record, [p.detach().cpu() for p in module.model.parameters()]
    (default, default_after), (fused, fused_after) = seen[False], seen[True]
    before, clipped = default.before, fused.at_step
    if algorithm == "norm":
        norm = lambda grads: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert norm(before) > 4 * clip and norm(clipped) == pytest.approx(clip, rel=1e-4)
    else:
        assert max(g.abs().max() for g in before) > 4 * clip and max(g.abs().max() for g in clipped) == clip
    assert all(torch.equal(a, b) for a, b in zip(default.at_step, clipped))
    for a, b in zip(default_after, fused_after):  # a second unscaling would shrink the fused step's updates
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_warmup_cosine_factor():
    assert warmup_cosine_factor(0, 4, 100) == pytest.approx(1 / 5)
    assert warmup_cosine_factor(3, 4, 100) == pytest.approx(4 / 5)
    assert warmup_cosine_factor(4, 4, 100) == pytest.approx(1.0)
    assert warmup_cosine_factor(52, 4, 100) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine_factor(100, 4, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_scheduler_steps_follow_the_trainer(tiny_kwargs, fixed_batch):
    x, y = fixed_batch
    module = _module(tiny_kwargs, lr=1e-3, warmup_epochs=0.5, min_lr_ratio=0.0)
    # 4 batches of 2 per epoch, 2 epochs: 8 steps, warmup 2 steps
    ds = TensorDataset(x, y)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(ds, batch_size=2))
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 8
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert module._schedule_steps() == (2, 8)


def test_grad_checkpointing_switch_and_argument_errors(tiny_kwargs):
    module = _module(tiny_kwargs, grad_checkpointing=True)
    assert module.model.grad_checkpointing and all(s.grad_checkpointing for s in module.model.stages)
    with pytest.raises(ValueError, match=r"layer_decay=1.5 is out of range"):
        _module(tiny_kwargs, layer_decay=1.5)
    with pytest.raises(ValueError, match=r"label_smoothing=1.0"):
        _module(tiny_kwargs, label_smoothing=1.0)
