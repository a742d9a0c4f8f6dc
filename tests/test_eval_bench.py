"""`zoo eval` (ImageFolder top-1/top-5/loss) and `zoo bench` (CSV/JSON, ops delegation)."""
import copy
import csv
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import zoo
from zoo import bench, evaluate

TINY = dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 32, 64], head_dim=16, n_win=[4, 2, 1, 1],
            topks=[4, 2, 1, -2], global_heads=2, auto_pad=True)


class _IndexModel(torch.nn.Module):
    """Logits read from the input: pixel [0, 0, 0] holds a class index, pixel [0, 0, 1] a margin."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        idx = x[:, 0, 0, 0].long()
        return F.one_hot(idx, self.num_classes).float() * x[:, 0, 0, 1:2] + 0.01 * torch.arange(self.num_classes)


def test_evaluate_model_counts_top1_top5_and_loss():
    torch.manual_seed(0)
    n, k = 20, 7
    y = torch.arange(n) % k
    pred = y.clone()
    pred[::4] = (y[::4] + 1) % k  # 5 of 20 predictions wrong
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 0] = pred.float()
    x[:, 0, 0, 1] = torch.rand(n) * 3
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    result = evaluate.evaluate_model(_IndexModel(k), loader)
    logits = _IndexModel(k)(x)
    assert result["images"] == n and result["num_classes"] == k
    assert result["top1"] == pytest.approx(15 / 20)
    top5 = logits.topk(5, -1).indices.eq(y[:, None]).any(-1).float().mean().item()
    assert result["top5"] == pytest.approx(top5) and result["top5"] > result["top1"]
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert result["images_per_s"] > 0


def test_evaluate_model_rejects_labels_beyond_the_head():
    loader = DataLoader(TensorDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 5])), batch_size=2)
    with pytest.raises(ValueError, match="class index 5 but the model has 3 classes"):
        evaluate.evaluate_model(_IndexModel(3), loader)


def _image_folder(root, classes=("a", "b", "c"), per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_eval_main_on_image_folder_matches_a_manual_evaluation(tmp_path, capsys):
    import timm.data
    from safetensors.torch import save_file
    from torchvision.datasets import ImageFolder

    data = _image_folder(tmp_path / "val")
    torch.manual_seed(0)
    model = zoo.create_model("biformer_tiny", num_classes=3, **TINY).eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "res.json"
    rc = evaluate.main(["biformer_tiny", "--data", str(data), "--checkpoint", str(weights), "--model-kwargs",
                        json.dumps(TINY), "--img-size", "32", "--batch-size", "4", "--workers", "0",
                        "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top1 %" in printed and "biformer_tiny" in printed
    result = json.loads(out.read_text())

    cfg = timm.data.resolve_data_config({"img_size": 32}, model=model)
    ds = ImageFolder(str(data), transform=timm.data.create_transform(**cfg))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    with torch.no_grad():
        logits = model(x)
    assert result["images"] == 9 and result["num_classes"] == 3
    assert result["top1"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert result["top5"] == 1.0  # 3 classes: the top-3 always holds the label
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)


def test_lightning_checkpoint_supplies_model_kwargs():
    ckpt = {"hyper_parameters": {"model_name": "biformer_tiny.in1k", "model_kwargs": {"depths": [1, 1, 1, 1]}}}
    assert evaluate.lightning_model_kwargs(ckpt, "biformer_tiny") == {"depths": [1, 1, 1, 1]}
    assert evaluate.lightning_model_kwargs(ckpt, "agent_deit_tiny") == {}
    assert evaluate.lightning_model_kwargs({"state_dict": {}}, "biformer_tiny") == {}


def test_bench_main_writes_csv_and_json(tmp_path, capsys):
    rc = bench.main(["biformer_tiny", "--model-kwargs", json.dumps(TINY), "--batch-sizes", "2,3", "--dtype", "fp32",
                     "--img-size", "32", "--train", "--warmup", "0", "--iters", "2", "--device", "cpu",
                     "--device-time", "--out", str(tmp_path)])
    assert rc == 0
    assert "images_per_s" in capsys.readouterr().out
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["batch_size"]) for r in rows] == [("infer", "2"), ("infer", "3"), ("train", "2"),
                                                            ("train", "3")]
    n_params = sum(p.numel() for p in zoo.create_model("biformer_tiny", **TINY).parameters()) / 1e6
    for r in rows:
        ips, lat = float(r["images_per_s"]), float(r["latency_ms"])
        assert ips > 0 and ips == pytest.approx(int(r["batch_size"]) / (lat / 1e3), rel=1e-6)
        assert float(r["params_m"]) == pytest.approx(n_params, abs=1e-3)
        assert r["img_size"] == "32" and r["error"] == ""
        assert r["device_ms"] == ""  # kernel time is profiled on CUDA only
    report = json.loads((tmp_path / "bench.json").read_text())
    # a configuration that cannot run is reported, not fatal: BatchNorm cannot train on one 1x1 sample
    rows = bench.bench_model("biformer_tiny", [1], ["fp32"], "cpu", ("train",), img_size=32, warmup=0, iters=1,
                             model_kwargs=TINY)
    assert rows[0]["error"].startswith("ValueError: Expected more than 1 value per channel")
    assert report["environment"]["torch"] == torch.__version__ and len(report["results"]) == 4


def test_bench_training_steps_take_the_chosen_adamw(tmp_path, monkeypatch):
    built = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            built.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    args = ["biformer_tiny", "--model-kwargs", json.dumps(TINY), "--batch-sizes", "2", "--dtype", "fp32",
            "--img-size", "32", "--train", "--no-infer", "--warmup", "0", "--iters", "1", "--device", "cpu"]
    assert bench.main(args + ["--optimizer", "fused", "--out", str(tmp_path / "fused")]) == 0
    assert bench.main(args + ["--out", str(tmp_path / "default")]) == 0
    assert built == [dict(lr=1e-6, fused=True), dict(lr=1e-6)]
    report = json.loads((tmp_path / "fused" / "bench.json").read_text())
    assert report["environment"]["train_optimizer"] == "fused" and report["results"][0]["error"] in (None, "")
    assert bench._TRAIN["optimizer"] == "default"  # the setting ends with the run
    with pytest.raises(ValueError, match=r"optimizer='adam': choose one of \['default', 'fused'\]"):
        with bench.train_optimizer("adam"):
            pass
    with pytest.raises(SystemExit):
        bench.main(args + ["--optimizer", "sgd"])


def test_step_graph_is_refused_where_it_cannot_capture(tmp_path):
    args = ["biformer_tiny", "--model-kwargs", json.dumps(TINY), "--batch-sizes", "2", "--img-size", "32",
            "--step-graph", "--out", str(tmp_path)]
    with pytest.raises(ValueError, match=r"--step-graph captures training steps: add --train"):
        bench.main(args + ["--device", "cuda"])
    with pytest.raises(ValueError, match=r"--step-graph with --device='cpu': a CUDA graph needs a CUDA device"):
        bench.main(args + ["--train", "--device", "cpu"])
    with pytest.raises(ValueError, match=r"--compile-mode='reduce-overhead': that mode replays CUDA graphs of its own"
                                         r".*\['default', 'max-autotune-no-cudagraphs'\]"):
        bench.main(args + ["--train", "--device", "cuda", "--with-compile", "--compile-mode", "reduce-overhead"])
    with pytest.raises(ValueError, match=r"--step-graph with --block-graphs='both'.*pass --block-graphs off"):
        bench.main(args + ["--train", "--device", "cuda", "--block-graphs", "both"])
    model = zoo.create_model("biformer_tiny", **TINY)
    with pytest.raises(ValueError, match=r"step graph: device 'cpu' is not accepted.*run on a CUDA device"):
        bench._GraphedTrainStep(model, torch.randn(2, 3, 32, 32), None)
    with bench.train_step_graph(True):
        assert bench._TRAIN["step_graph"] is True
        with pytest.raises(ValueError, match=r"step graph: device 'cpu'"):  # what the rows' builder then makes
            bench._step_fn(model, "train", None, 2, (3, 32, 32), torch.device("cpu"), False)
        assert isinstance(bench._step_fn(model, "infer", None, 2, (3, 32, 32), torch.device("cpu"), False),
                          type(bench._inference_fn))
    assert bench._TRAIN["step_graph"] is False  # the setting ends with the block


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_step_graph_replays_what_an_eager_step_computes(compiled):
    """Each replay of the captured step gives the loss, gradients and AdamW update that the same step run eagerly
    gives from the same parameters, optimizer state and batch; a new batch is copied in before the replay."""
    torch.manual_seed(0)
    model = zoo.create_model("biformer_tiny", **TINY).cuda()
    twin = zoo.create_model("biformer_tiny", **TINY).cuda()
    run = torch.compile if compiled else (lambda m: m)
    step = bench._GraphedTrainStep(run(model), torch.randn(4, 3, 32, 32, device="cuda"), None)
    twin_step = run(twin)
    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-6, fused=True)
    for batch in range(2):
        step.source = torch.randn(4, 3, 32, 32, device="cuda")
        twin.load_state_dict(model.state_dict())  # the warm-up steps (and the replay before) moved the parameters
        optimizer.load_state_dict(copy.deepcopy(step.optimizer.state_dict()))  # its own moments, not shared
        step()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(twin_step(step.source).float(), step.target)
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        assert torch.allclose(step.loss, loss, rtol=1e-6, atol=0), (batch, step.loss, loss)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            for ours, eager in ((p.grad, q.grad), (p, q)):
                bound = 1e-5 * eager.abs().max().item() + 1e-12
                assert (ours - eager).abs().max().item() <= bound, (batch, name)


def test_time_fn_runs_warmup_then_timed_iterations():
    calls = []
    times = bench.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_bench_argument_errors_name_the_value():
    with pytest.raises(ValueError, match=r"--dtype='fp8'.*accepted: \['fp32', 'bf16', 'fp16'\]"):
        bench.main(["resnet18", "--dtype", "fp8"])
    with pytest.raises(ValueError, match="--batch-sizes='1,x'"):
        bench.main(["resnet18", "--batch-sizes", "1,x"])


def test_bench_ops_delegates_to_the_ops_benchmark(monkeypatch):
    seen = []
    fake = types.ModuleType("zoo.ops.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    import zoo.ops

    monkeypatch.setitem(sys.modules, "zoo.ops.bench", fake)
    monkeypatch.setattr(zoo.ops, "bench", fake, raising=False)
    assert bench.main(["ops", "--op", "routing", "--quick"]) == 3
    assert seen == [["--op", "routing", "--quick"]]


def test_ops_backend_forces_a_backend_on_every_op_that_has_it(monkeypatch):
    import zoo.ops._dispatch as dispatch

    monkeypatch.setenv("ZOO_OPS_BACKEND", "user:setting")
    with bench.ops_backend("reference"):
        forced = dict(item.split(":") for item in os.environ["ZOO_OPS_BACKEND"].split(","))
    assert forced == {op: "reference" for op in dispatch._REGISTRY if "reference" in dispatch._REGISTRY[op]}
    assert "routing_attention" in forced and os.environ["ZOO_OPS_BACKEND"] == "user:setting"  # restored
    with bench.ops_backend("triton"):
        assert set(os.environ["ZOO_OPS_BACKEND"].split(",")) >= {"routing_attention:triton", "ms_deform_attn:triton"}
        assert "masked_attention" not in os.environ["ZOO_OPS_BACKEND"]  # no triton backend: automatic choice
    with bench.ops_backend("auto"):
        assert os.environ["ZOO_OPS_BACKEND"] == "user:setting"
    with pytest.raises(ValueError, match=r"--ops-backend='cutlass': no op has that backend; known: \['auto'"):
        with bench.ops_backend("cutlass"):
            pass


def test_bench_runs_models_x_backends_x_compile_with_ratios_to_the_first(monkeypatch, tmp_path, capsys):
    on = "reduce-overhead"
    speed = {("timm_m", "auto", False): 100.0, ("timm_m", "auto", on): 250.0, ("timm_m", "reference", False): 100.0,
             ("timm_m", "reference", on): 250.0, ("zoo_m", "auto", False): 300.0, ("zoo_m", "auto", on): 600.0,
             ("zoo_m", "reference", False): 50.0, ("zoo_m", "reference", on): 80.0}

    def fake_bench_model(name, batch_sizes, dtypes, device, modes, img_size, compile, *rest):
        backend = "reference" if "reference" in os.environ.get("ZOO_OPS_BACKEND", "") else "auto"
        return [{"model": name, "mode": "infer", "dtype": "fp32", "batch_size": 2, "compile": compile,
                 "images_per_s": speed[name, backend, compile], "latency_ms": 2e3 / speed[name, backend, compile],
                 "error": None}]

    written = []
    monkeypatch.setattr(bench, "bench_model", fake_bench_model)
    monkeypatch.setattr(bench, "write_results", lambda rows, out, meta: (written.extend(rows), ("a", "b"))[1])
    monkeypatch.delenv("ZOO_OPS_BACKEND", raising=False)
    assert bench.main(["timm_m", "zoo_m", "--ops-backend", "auto,reference", "--with-compile", "--compile-mode", on,
                       "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "x_base" in printed.out
    # a progress line as each model's row is done
    assert printed.err.splitlines()[-1] == ("infer fp32 batch 2: zoo_m (reference, compiled reduce-overhead): "
                                            "25.00 ms a step, 80.0 images/s")
    got = [(r["model"], r["ops"], r["compile"], r["x_base"]) for r in written]
    assert got == [("timm_m", "auto", False, 1.0), ("timm_m", "auto", on, 2.5),
                   ("timm_m", "reference", False, 1.0), ("timm_m", "reference", on, 2.5),
                   ("zoo_m", "auto", False, 3.0), ("zoo_m", "auto", on, 6.0),
                   ("zoo_m", "reference", False, 0.5), ("zoo_m", "reference", on, 0.8)]
    assert "ZOO_OPS_BACKEND" not in os.environ


def test_bench_block_graphs_both_adds_graphed_rows(monkeypatch, tmp_path):
    """``--block-graphs both``: each backend also as ``BACKEND+graphs``, timed with block graphs on (and only
    then)."""
    from zoo.ops import block_graphs

    seen = []

    def fake_bench_model(name, *args):
        seen.append((os.environ.get("ZOO_OPS_BACKEND", "auto")[:9], block_graphs.block_graphs_enabled()))
        return [{"model": name, "mode": "train", "dtype": "fp32", "batch_size": 2, "compile": False,
                 "images_per_s": 1.0, "latency_ms": 2e3, "error": None}]

    written = []
    monkeypatch.setattr(bench, "bench_model", fake_bench_model)
    monkeypatch.setattr(bench, "write_results", lambda rows, out, meta: (written.extend(rows), ("a", "b"))[1])
    monkeypatch.delenv("ZOO_OPS_BACKEND", raising=False)
    assert bench.main(["m", "--ops-backend", "auto,reference", "--block-graphs", "both", "--device", "cpu"]) == 0
    assert [r["ops"] for r in written] == ["auto", "reference", "auto+graphs", "reference+graphs"]
    assert [enabled for _, enabled in seen] == [False, False, True, True]
    assert seen[1][0] == seen[3][0] != "auto"  # the reference backend forced in both of its rows
    assert not block_graphs.block_graphs_enabled()


def test_no_pointwise_autotune_holds_for_the_runs_and_is_recorded(monkeypatch, tmp_path):
    import torch._inductor.config as inductor_config

    before = inductor_config.triton.autotune_pointwise
    seen, meta = [], {}

    def fake_bench_model(name, *args):
        seen.append(inductor_config.triton.autotune_pointwise)
        return [{"model": name, "mode": "infer", "dtype": "fp32", "batch_size": 2, "compile": "default",
                 "images_per_s": 1.0, "latency_ms": 2e3, "error": None}]

    monkeypatch.setattr(bench, "bench_model", fake_bench_model)
    monkeypatch.setattr(bench, "write_results", lambda rows, out, m: (meta.update(m), ("a", "b"))[1])
    assert bench.main(["m", "--compile", "--no-pointwise-autotune", "--device", "cpu"]) == 0
    assert seen == [False] and meta["inductor_pointwise_autotune"] is False
    assert inductor_config.triton.autotune_pointwise == before
    assert bench.main(["m", "--compile", "--device", "cpu"]) == 0
    assert seen == [False, before] and meta["inductor_pointwise_autotune"] is True


class _FakeSubject:
    """A bench subject whose steps log their calls; time_fn is replaced by a scripted clock in these tests."""

    def __init__(self, name, backend, log):
        self.name, self.backend, self.log, self.compile = name, backend, log, False

    def row(self, mode, dtype, bs):
        return {"model": self.name, "ops": self.backend, "mode": mode, "dtype": dtype, "batch_size": bs}

    def step(self, mode, amp, bs):
        if self.name == "broken" and mode == "train":
            raise RuntimeError("CUDA error: no training here\nsecond line")
        return lambda: self.log.append(self.name)


def test_interleaved_rounds_take_the_subjects_in_turn_and_report_the_median_round(monkeypatch):
    log, clock = [], {}
    monkeypatch.setattr(bench._Subject, "build", classmethod(
        lambda cls, name, backend, compile, *rest: _FakeSubject(name, backend, log)))
    per_round = {"a": [0.010, 0.030, 0.020], "broken": [0.005, 0.006, 0.007]}  # seconds a step, round by round

    def scripted_time_fn(fn, device, warmup, iters):
        for _ in range(warmup + iters):
            fn()
        name = log[-1]
        n = clock[name] = clock.get(name, -1) + 1
        return [per_round[name][n % 3]] * iters  # the same three rounds in each configuration

    monkeypatch.setattr(bench, "time_fn", scripted_time_fn)
    monkeypatch.setenv("ZOO_OPS_BACKEND", "user:setting")
    lines = []
    rows = bench.bench_interleaved([("a", "auto", False), ("broken", "auto", False)], [4], ["fp32"], "cpu",
                                   ("infer", "train"), warmup=1, iters=2, rounds=3, progress=lines.append)
    # infer: round 1 warms each subject up, later rounds only time; train: "broken" fails once and is dropped
    assert log == ["a"] * 3 + ["broken"] * 3 + ["a", "a", "broken", "broken"] * 2 + ["a"] * 7
    assert [(r["model"], r["mode"]) for r in rows] == [("a", "infer"), ("a", "train"), ("broken", "infer"),
                                                      ("broken", "train")]
    a_infer, a_train, b_infer, b_train = rows
    assert a_infer["latency_ms"] == pytest.approx(20.0) and a_infer["images_per_s"] == pytest.approx(4 / 0.020)
    assert a_infer["latency_p90_ms"] == pytest.approx(30.0) and a_infer["rounds"] == 3
    assert a_infer["latency_p50_ms"] == pytest.approx(20.0)
    assert a_infer["latency_spread"] == pytest.approx((0.030 - 0.010) / 0.020)
    assert a_infer["peak_mem_mib"] is None and a_infer["device_ms"] is None
    assert b_infer["latency_ms"] == pytest.approx(6.0)
    assert b_train["error"] == "RuntimeError: CUDA error: no training here" and b_train.get("latency_ms") is None
    assert os.environ["ZOO_OPS_BACKEND"] == "user:setting"
    # one progress line a subject and round, as each is timed: a run cut short keeps what it measured
    assert lines[:2] == ["round 1/3 infer fp32 batch 4: a (auto): 10.00 ms a step",
                         "round 1/3 infer fp32 batch 4: broken (auto): 5.00 ms a step"]
    assert lines[5] == "round 3/3 infer fp32 batch 4: broken (auto): 7.00 ms a step"
    assert lines[6:9] == ["round 1/3 train fp32 batch 4: a (auto): 10.00 ms a step",
                          "round 1/3 train fp32 batch 4: broken (auto): RuntimeError: CUDA error: no training here",
                          "round 2/3 train fp32 batch 4: a (auto): 30.00 ms a step"]
    assert len(lines) == 10
    with pytest.raises(ValueError, match="rounds=0 must be >= 1"):
        bench.bench_interleaved([("a", "auto", False)], [4], ["fp32"], rounds=0)


def test_round_summary_mean_and_median_part_where_a_few_iterations_stall():
    """A host-bound model whose host stalls for a few iterations: the mean (images/s, latency_ms) counts the stall,
    the pooled median and p90 read the iterations as they mostly ran."""
    rounds = [[0.010] * 8 + [0.050, 0.060], [0.012] * 10, [0.011] * 10]
    row = bench._round_summary(rounds, 4)
    assert row["latency_ms"] == pytest.approx(12.0) and row["images_per_s"] == pytest.approx(4 / 0.012)
    assert row["latency_p50_ms"] == pytest.approx(11.0) and row["latency_p90_ms"] == pytest.approx(12.0)
    assert row["latency_spread"] == pytest.approx((0.019 - 0.011) / 0.012)


def test_cli_rounds_time_real_models_in_turn(tmp_path, capsys):
    rc = bench.main(["biformer_tiny", "biformer_tiny", "--model-kwargs", json.dumps(TINY), "--batch-sizes", "2",
                     "--img-size", "32", "--rounds", "2", "--warmup", "0", "--iters", "1", "--device", "cpu",
                     "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert rc == 0 and "latency_spread" in printed.out
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    progress = [line for line in printed.err.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in progress] == [f"round {r}/2 infer fp32 batch 2" for r in (1, 1, 2, 2)]
    assert [r["rounds"] for r in rows] == [2, 2] and all(r["images_per_s"] > 0 and r["error"] is None for r in rows)
    assert rows[0]["x_base"] == 1.0
    with pytest.raises(ValueError, match="--rounds=0: must be >= 1"):
        bench.main(["biformer_tiny", "--rounds", "0"])


def test_add_baseline_ratios_uses_the_first_row_of_each_mode_dtype_batch():
    rows = [dict(mode="infer", dtype="bf16", batch_size=8, images_per_s=100.0),
            dict(mode="train", dtype="bf16", batch_size=8, images_per_s=20.0),
            dict(mode="infer", dtype="bf16", batch_size=8, images_per_s=250.0),
            dict(mode="train", dtype="bf16", batch_size=8, images_per_s=None),
            dict(mode="train", dtype="bf16", batch_size=8, images_per_s=30.0)]
    bench.add_baseline_ratios(rows)
    assert [r["x_base"] for r in rows] == [1.0, 1.0, 2.5, None, 1.5]


def test_bench_model_compiles_with_the_mode_asked_for(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: (seen.append(mode), model)[1])
    rows = bench.bench_model("biformer_tiny", [2], ["fp32"], "cpu", img_size=32, compile="reduce-overhead", warmup=0,
                             iters=1, model_kwargs=TINY)
    assert seen == ["reduce-overhead"] and rows[0]["compile"] == "reduce-overhead" and rows[0]["images_per_s"] > 0
    assert bench.bench_model("biformer_tiny", [2], ["fp32"], "cpu", img_size=32, compile=True, warmup=0, iters=1,
                             model_kwargs=TINY)[0]["compile"] == "default" and seen[-1] == "default"
    with pytest.raises(ValueError, match=r"compile='fast': pass False, True or one of \['default', 'reduce-overhead'"):
        bench.bench_model("biformer_tiny", [2], ["fp32"], "cpu", compile="fast", model_kwargs=TINY)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_device_time_is_the_kernel_share_of_the_step():
    rows = bench.bench_model("biformer_tiny", [8], ["bf16"], "cuda", ("infer", "train"), img_size=64, warmup=2,
                             iters=3, model_kwargs=TINY, device_time=True)
    for r in rows:
        assert r["error"] is None and 0 < r["device_ms"] <= 1.05 * r["latency_ms"], r


def test_bench_imports_a_module_that_registers_models(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_bench_models.py").write_text(
        "import timm, torch\n"
        "from timm.models import register_model\n"
        "@register_model\n"
        "def my_bench_mlp(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None):\n"
        "    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))\n"
        "    model.pretrained_cfg = {'input_size': (3, 8, 8)}\n"
        "    return model\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # --import appends the current directory to it
    monkeypatch.chdir(tmp_path)  # found there, as a user's module next to where they run `zoo bench`
    rc = bench.main(["my_bench_mlp", "--import", "my_bench_models", "--batch-sizes", "4", "--warmup", "0", "--iters",
                     "2", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    row, = report["results"]
    assert row["model"] == "my_bench_mlp" and row["img_size"] == 8 and row["error"] is None and row["images_per_s"] > 0
    with pytest.raises(ValueError, match=r"--import='no_such_module_x': cannot import 'no_such_module_x'"):
        bench.main(["my_bench_mlp", "--import", "no_such_module_x"])


def test_host_profile_ranks_operators_by_self_time_with_calls_a_step():
    """Two matrix products and one sum a step: addmm is counted twice a step and sum once (over 3 profiled steps), and
    the ranking is by self CPU time, most first (which event leads is the host's timing: not asserted)."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(256, 256), torch.randn(256, 256), torch.randn(256)

    def step():
        torch.addmm(bias, a, b)
        torch.addmm(bias, b, a)
        a.sum()

    host = bench.host_profile(step, torch.device("cpu"), iters=3, top=50)["host_top"]
    calls = {name: n for name, _, n in host}
    assert calls["aten::addmm"] == 2 and calls["aten::sum"] == 1
    times = [ms for _, ms, _ in host]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert len(bench.host_profile(step, torch.device("cpu"), iters=1, top=2)["host_top"]) == 2
    with pytest.raises(ValueError, match="top=0 must be >= 1"):
        bench.host_profile(step, torch.device("cpu"), iters=1, top=0)


def test_top_kernels_rank_device_events_by_device_time_a_call():
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(key="gemm", device_type=cuda, self_device_time_total=3000.0, count=8),
              SimpleNamespace(key="aten::mm", device_type=cpu, self_device_time_total=0.0, count=8),
              SimpleNamespace(key="gelu", device_type=cuda, self_device_time_total=5000.0, count=4),
              SimpleNamespace(key="memset", device_type=cuda, self_device_time_total=None, self_cuda_time_total=100.0,
                              count=12)]
    assert bench.top_kernels(events, iters=4, top=5) == [["gelu", 1.25, 1.0], ["gemm", 0.75, 2.0],
                                                         ["memset", 0.025, 3.0]]
    assert bench.top_kernels(events, iters=4, top=1) == [["gelu", 1.25, 1.0]]
    table = bench.kernel_rows([{"model": "m", "ops": "auto", "compile": False, "mode": "infer", "dtype": "bf16",
                                "batch_size": 2, "kernel_top": bench.top_kernels(events, 4, 2)}])
    assert [(r["rank"], r["kernel"], r["device_ms"], r["calls"]) for r in table] == [(1, "gelu", 1.25, 1.0),
                                                                                  (2, "gemm", 0.75, 2.0)]
    assert table[0]["model"] == "m" and bench.kernel_rows([{"model": "m"}]) == []


@pytest.mark.parametrize("rounds", ["1", "2"])
def test_bench_host_profile_prints_a_second_table_and_keeps_it_in_the_json(rounds, tmp_path, capsys):
    rc = bench.main(["biformer_tiny", "--model-kwargs", json.dumps(TINY), "--batch-sizes", "2", "--img-size", "32",
                     "--warmup", "1", "--iters", "2", "--device", "cpu", "--host-profile", "4", "--rounds", rounds,
                     "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    row, = json.loads((tmp_path / "bench.json").read_text())["results"]
    names = [name for name, _, _ in row["host_top"]]
    assert len(names) == 4 == len(set(names)) and any(name.startswith("aten::") for name in names)
    times = [ms for _, ms, _ in row["host_top"]]
    assert times == sorted(times, reverse=True) and all(calls > 0 for *_, calls in row["host_top"])
    table = bench.host_rows([row])
    assert [r["rank"] for r in table] == [1, 2, 3, 4] and table[0]["host_op"] == row["host_top"][0][0]
    assert "host_op" in out and "self_cpu_ms" in out and row["host_top"][0][0] in out
    with pytest.raises(ValueError, match=r"--host-profile=-1: must be >= 0"):
        bench.main(["biformer_tiny", "--host-profile", "-1"])
    with pytest.raises(ValueError, match=r"host_top=-2 must be >= 0"):
        bench.bench_model("biformer_tiny", [2], ["fp32"], host_top=-2, model_kwargs=TINY)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_host_profile_counts_the_runtime_launches():
    """On CUDA the runtime's launch calls rank among the host events: three elementwise kernels a step, three
    launches a step (whichever launch entry point the build's runtime records)."""
    x = torch.randn(1 << 16, device="cuda")

    def step():
        x.add_(1.0)
        x.mul_(0.5)
        x.abs_()  # (a third kernel: sub_ of a scalar runs add's, one row of two launches)

    profiled = bench.host_profile(step, torch.device("cuda"), iters=4, top=1000)
    calls = {name: n for name, _, n in profiled["host_top"]}
    launches = sum(n for name, n in calls.items() if name.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    assert launches == 3 and calls["aten::add_"] == 1, calls
    kernels = profiled["kernel_top"]  # the three elementwise kernels, once a step each
    assert len(kernels) == 3 and all(n == 1 and ms > 0 for _, ms, n in kernels), kernels


def test_time_fn_without_step_sync_synchronizes_once_and_credits_the_mean(monkeypatch):
    syncs, calls = [], []
    monkeypatch.setattr(bench, "_sync", lambda device: syncs.append(len(calls)))
    clock = iter([10.0, 10.9])  # the timed stretch: 0.9 s for 3 calls
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    with bench.step_sync(False):
        times = bench.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=3)
        row = bench._round_summary([times, [0.5] * 3], 6)
    assert syncs == [2, 5]  # after the warm-up and after the last timed call only
    assert times == pytest.approx([0.3, 0.3, 0.3])
    assert row["latency_ms"] == pytest.approx(400.0) and row["images_per_s"] == pytest.approx(6 / 0.4)
    assert row["latency_p50_ms"] is None and row["latency_p90_ms"] is None
    assert bench._TIMING["step_sync"] is True  # the setting ends with the block
    syncs.clear()
    calls.clear()
    clock = iter([0.0, 0.1, 1.0, 1.4])
    bench.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=0, iters=2)
    assert syncs == [0, 1, 2]  # by default around every timed call


def test_bench_no_step_sync_is_recorded_and_leaves_no_percentiles(tmp_path):
    args = ["biformer_tiny", "--model-kwargs", json.dumps(TINY), "--batch-sizes", "2", "--dtype", "fp32",
            "--img-size", "32", "--warmup", "0", "--iters", "2", "--device", "cpu"]
    assert bench.main(args + ["--no-step-sync", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "bench.json").read_text())
    row = report["results"][0]
    assert report["environment"]["step_sync"] is False and row["latency_ms"] > 0
    assert row["latency_p50_ms"] is None and row["latency_p90_ms"] is None
    assert bench.main(args + ["--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["environment"]["step_sync"] is True and report["results"][0]["latency_p50_ms"] > 0


def test_autograd_nodes_counts_each_node_of_the_graph_once():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    loss = torch.nn.functional.cross_entropy(layer(x), torch.tensor([0, 1, 2, 0, 1]))
    # NllLoss, LogSoftmax, Addmm, T (the weight's transpose), and the weight's and bias's AccumulateGrad
    assert bench.autograd_nodes(loss) == 6
    shared = layer(x)
    assert bench.autograd_nodes(shared * 2 + shared) == 6  # Add, Mul, Addmm, T, two AccumulateGrad: reached twice
    assert bench.autograd_nodes(torch.randn(3)) == 0


def test_host_phases_times_each_phase_of_a_training_step(monkeypatch):
    model = zoo.create_model("biformer_tiny", **TINY)
    step = bench._TrainStep(model, torch.randn(2, 3, 32, 32), None)
    before = [p.detach().clone() for p in model.parameters()]
    row = bench.host_phases(step, torch.device("cpu"), iters=2)
    assert all(row[k] > 0 for k in ("host_fwd_ms", "host_bwd_ms", "host_opt_ms"))
    assert row["autograd_nodes"] == bench.autograd_nodes(step.loss())
    assert row["autograd_nodes"] > 2 * len(before)  # an AccumulateGrad a parameter, and the layers' own nodes
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the optimizer stepped
    infer = bench.host_phases(bench._inference_fn(model, torch.randn(2, 3, 32, 32), None), torch.device("cpu"), 2)
    assert infer["host_fwd_ms"] > 0 and infer["host_bwd_ms"] is None and infer["autograd_nodes"] is None
    with pytest.raises(ValueError, match="iters=0 must be >= 1"):
        bench.host_phases(step, torch.device("cpu"), iters=0)


@pytest.mark.parametrize("rounds", ["1", "2"])
def test_bench_host_phases_fill_their_columns(rounds, tmp_path, capsys):
    args = ["biformer_tiny", "--model-kwargs", json.dumps(TINY), "--batch-sizes", "2", "--dtype", "fp32",
            "--img-size", "32", "--train", "--warmup", "0", "--iters", "1", "--rounds", rounds, "--device", "cpu",
            "--host-phases", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    assert "host_bwd_ms" in capsys.readouterr().out
    infer, train = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert infer["host_fwd_ms"] > 0 and infer["host_bwd_ms"] is None and infer["autograd_nodes"] is None
    assert train["host_fwd_ms"] > 0 and train["host_bwd_ms"] > 0 and train["host_opt_ms"] > 0
    assert train["autograd_nodes"] > 100
    assert bench.main(args[:-3] + ["--out", str(tmp_path)]) == 0
    assert "host_bwd_ms" not in capsys.readouterr().out  # hidden unless asked for
