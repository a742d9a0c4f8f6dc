"""GPU runs of `zoo train` (skipped without CUDA): bf16 on one GPU (default and fused AdamW, block graphs); DDP and FSDP
on two GPUs.

Each run is a subprocess of the real command on the shortened quickstart; the checkpoint of every strategy must load
with zoo.create_model and classify the digits as well as the run's own validation said.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

# NVLink multicast stays off on the shared H200 machines
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _fit(root, *overrides):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **NCCL_ENV)
    # the shipped config by name: these runs need no checkout beside the installed zoo
    proc = subprocess.run([sys.executable, "-m", "zoo", "train", "fit", "--config", "quickstart",
                           f"--trainer.default_root_dir={root}", "--trainer.accelerator=gpu",
                           "--trainer.precision=bf16-mixed", "--trainer.max_epochs=3",
                           "--trainer.enable_progress_bar=false", *overrides],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = root / "lightning_logs" / "version_0"
    return run, json.loads((run / "fit_summary.json").read_text())


def _checkpoint_accuracy(ckpt):
    from zoo.recipes.data import DigitsDataModule
    from zoo.train import shipped_configs

    import zoo

    kwargs = yaml.safe_load(shipped_configs()["quickstart"].read_text())["model"]["init_args"]["model_kwargs"]
    model = zoo.create_model("biformer_tiny", checkpoint_path=ckpt, **kwargs).cuda().eval()
    dm = DigitsDataModule(img_size=32, batch_size=128)
    dm.setup()
    hits = n = 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            hits += int((model(x.cuda()).argmax(-1).cpu() == y).sum())
            n += len(y)
    return hits / n


@pytest.mark.gpu
@pytest.mark.parametrize("fused_adamw, block_graphs", [(False, False), (True, False), (True, True)])
def test_quickstart_bf16_on_one_gpu(fused_adamw, block_graphs, tmp_path):
    run, summary = _fit(tmp_path, "--trainer.devices=1", f"--model.init_args.fused_adamw={str(fused_adamw).lower()}",
                        f"--model.init_args.block_graphs={str(block_graphs).lower()}")
    assert summary["world_size"] == 1 and summary["final_val_acc1"] > 0.9
    ckpt = run / "checkpoints" / "last.ckpt"
    acc = _checkpoint_accuracy(ckpt)
    assert acc == pytest.approx(summary["final_val_acc1"], abs=0.01)
    groups = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_states"][0]["param_groups"]
    assert all((group["fused"] is True) == fused_adamw for group in groups)  # the default leaves torch's choice


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_quickstart_on_two_gpus(strategy, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    extra = ["--model.init_args.ema_decay=null"] if strategy == "fsdp" else []  # EMA needs unsharded weights
    # 2 x 32 per device = the quickstart's global batch of 64
    run, summary = _fit(tmp_path, "--trainer.devices=2", f"--trainer.strategy={strategy}",
                        "--data.init_args.batch_size=32", *extra)
    assert summary["world_size"] == 2 and summary["final_val_acc1"] > 0.9
    acc = _checkpoint_accuracy(run / "checkpoints" / "last.ckpt")
    # DistributedSampler pads the 359 validation images to 360, hence the tolerance
    assert acc == pytest.approx(summary["final_val_acc1"], abs=0.01)
