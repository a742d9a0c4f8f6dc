"""`zoo train`: a shortened quickstart really learns; its checkpoint loads in zoo.create_model; resume; validate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from zoo.recipes.classification import ImageClassifier
from zoo.recipes.data import DigitsDataModule

import zoo

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "configs" / "quickstart.yaml"
# 2 epochs of 10 batches (validation on 192 images): a fraction of the quickstart, still far above chance (10%) on the digits
SHORT = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=10", "--trainer.limit_val_batches=3",
         "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--model.init_args.warmup_epochs=0.5"]


def _quickstart_model_kwargs():
    return yaml.safe_load(QUICKSTART.read_text())["model"]["init_args"]["model_kwargs"]


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """One `zoo train fit` subprocess (through the `zoo` command) on the shortened quickstart; its log folder."""
    root = tmp_path_factory.mktemp("train")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    # the config by its shipped name, run outside the checkout: what a `pip install` without the repository has
    proc = subprocess.run([sys.executable, "-m", "zoo", "train", "fit", "--config", "quickstart",
                           f"--trainer.default_root_dir={root}", *SHORT],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "validation val_acc1:" in proc.stdout, proc.stdout[-2000:]
    return root / "lightning_logs" / "version_0"


def test_fit_learns_and_writes_report(fitted_run):
    summary = json.loads((fitted_run / "fit_summary.json").read_text())
    assert summary["epochs"] == 2 and summary["global_step"] == 20
    assert summary["final_val_acc1"] > 0.4, summary  # 10 classes: chance is 0.1
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert all(h["train_loss"] is not None and h["val_loss"] is not None for h in summary["history"])
    png = (fitted_run / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (fitted_run / "config.yaml").is_file()
    assert (fitted_run / "checkpoints" / "last.ckpt").is_file()


def test_checkpoint_loads_in_create_model_with_identical_logits(fitted_run):
    ckpt = fitted_run / "checkpoints" / "last.ckpt"
    model = zoo.create_model("biformer_tiny", checkpoint_path=ckpt, **_quickstart_model_kwargs()).eval()
    assert model.num_classes == 10  # head size read from the checkpoint
    module = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert module.ema is None or module.eval_model() is module.ema.module
    reference = module.eval_model().eval()
    dm = DigitsDataModule(img_size=32, batch_size=32)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        got, want = model(x), reference(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got.argmax(-1) == y).float().mean() > 0.4


def test_resume_continues_from_the_checkpoint(fitted_run, tmp_path):
    from zoo.train import build_cli

    ckpt = fitted_run / "checkpoints" / "last.ckpt"
    first = json.loads((fitted_run / "fit_summary.json").read_text())
    args = ["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}", *SHORT,
            "--trainer.max_epochs=3", "--trainer.limit_val_batches=2", f"--ckpt_path={ckpt}"]
    cli = build_cli(args)
    assert cli.trainer.global_step == 30  # 20 restored + 10 new
    summary = json.loads((Path(cli.trainer.log_dir) / "fit_summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert summary["history"][:2] == first["history"]  # the report's history travels in the checkpoint


def test_validate_reproduces_the_logged_accuracy(fitted_run, tmp_path):
    from zoo.train import build_cli

    first = json.loads((fitted_run / "fit_summary.json").read_text())
    cli = build_cli(["validate", "--config", str(fitted_run / "config.yaml"), "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                     f"--ckpt_path={fitted_run / 'checkpoints' / 'last.ckpt'}"])
    # validation of the restored checkpoint (EMA weights) gives exactly the accuracy logged at its epoch
    assert float(cli.trainer.callback_metrics["val_acc1"]) == pytest.approx(first["final_val_acc1"], abs=1e-6)


@pytest.mark.parametrize("name, extra", [
    ("imagenet_finetune.yaml", ["--model.init_args.pretrained=false", "--data.init_args.root=/nonexistent"]),
    ("digits_biformer_tiny.yaml", []),
])
def test_shipped_configs_instantiate(name, extra, tmp_path):
    from zoo.train import build_cli

    cli = build_cli(["--config", str(QUICKSTART.parent / name), "--trainer.accelerator=cpu",
                     "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path}", *extra], run=False)
    config = yaml.safe_load((QUICKSTART.parent / name).read_text())["model"]["init_args"]
    assert isinstance(cli.model, ImageClassifier)
    assert cli.model.hparams.model_name == config["model_name"]
    assert cli.model.hparams.layer_decay == config.get("layer_decay")
    assert cli.model.model.num_classes == config["num_classes"]
    assert cli.trainer.max_epochs == yaml.safe_load((QUICKSTART.parent / name).read_text())["trainer"]["max_epochs"]


def test_config_names_resolve_to_the_installed_recipe_configs(tmp_path, monkeypatch):
    from zoo.train import resolve_config_args, shipped_configs

    shipped = shipped_configs()
    assert shipped["quickstart"].read_text() == QUICKSTART.read_text()
    assert set(shipped) == {p.stem for p in QUICKSTART.parent.glob("*.yaml")}
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "quickstart", "-c", "grounding.yaml", "--config=imagenet_finetune", "--x=1"]
    assert resolve_config_args(args) == ["fit", "--config", str(shipped["quickstart"]), "-c",
                                         str(shipped["grounding"]), f"--config={shipped['imagenet_finetune']}",
                                         "--x=1"]
    (tmp_path / "quickstart").write_text("trainer: {max_epochs: 1}\n")  # a file of that name is the user's config
    inline = "trainer: {max_epochs: 1}"
    assert resolve_config_args(["--config", "quickstart", "--config", inline, "--config", "no/such.yaml"]) == [
        "--config", "quickstart", "--config", inline, "--config", "no/such.yaml"]


def test_unknown_config_name_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "fit", "--config", "quikstart"]) == 1
    err = capsys.readouterr().err
    assert "--config 'quikstart' is neither a file nor a recipe config installed with zoo" in err
    assert "quickstart" in err.split("one of:")[1]
