"""The ops benchmark harness on CPU with tiny shapes (`--device cpu --quick`)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import zoo.ops

from zoo.ops import bench
from zoo.ops.triton import triton_missing_reason
from triton_checks import require_triton

MY_OPS = "downsampled_attention,cross_attention,masked_attention,neighborhood_attention"
SDPA_TARGET_OPS = "agent_attention,window_attention,downsampled_attention,cross_attention"
# the cases whose cost target is one plain SDPA over the same token counts, each with its "<case>.sdpa" row
SDPA_TARGET_CASES = ("agent_deit_s", "agent_swin_t.s0", "agent_swin_t.s1", "agent_swin_t.s2", "agent_swin_s.s2",
                     "pvt_s.s0", "volo_d1.attn", "lookupvit_b.mhbc")


def test_cli_quick_cpu_writes_table_csv_and_json(tmp_path, capsys):
    rc = bench.main(["--device", "cpu", "--quick", "--iters", "2", "--warmup", "0", "--ops", MY_OPS,
                     "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "time_ms" in printed and "nat_t.s0" in printed and "x_sdpa" in printed and "pvt_s.s0.sdpa" in printed
    rows = json.loads((tmp_path / "ops_bench.json").read_text())["rows"]
    with (tmp_path / "ops_bench.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    # the plain-SDPA ratio reaches both files
    csv_by_key = {(r["case"], r["backend"], r["mode"]): r for r in csv_rows}
    json_x = {(r["case"], r["backend"], r["mode"]): r["x_sdpa"] for r in rows if "x_sdpa" in r}
    assert json_x and all(float(csv_by_key[k]["x_sdpa"]) == pytest.approx(v) for k, v in json_x.items())
    assert csv_by_key[("croc_7b.attn", "reference", "fwd")]["x_sdpa"] == ""  # no SDPA target for masked attention
    assert csv_by_key[("nat_t.s0", "reference", "fwd")]["device_ms"] == ""  # kernel time is measured on CUDA only
    assert csv_by_key[("nat_t.s0", "reference", "fwd")]["x_sdpa_dev"] == ""
    # the neighbourhood target is the dense SDPA under the neighbourhood mask; the unmasked dense row is no target
    for case in ("nat_t.s0", "dinat_t.s1"):
        for mode in ("fwd", "fwd+bwd"):
            masked = csv_by_key[(f"{case}.masked", "sdpa", mode)]
            assert float(masked["x_sdpa"]) == pytest.approx(1.0)
            ref = csv_by_key[(case, "reference", mode)]
            assert float(ref["x_sdpa"]) == pytest.approx(float(ref["time_ms"]) / float(masked["time_ms"]), rel=1e-6)
    assert csv_by_key[("nat_t.s0.dense", "sdpa", "fwd")]["x_sdpa"] == ""
    by_key = {(r["case"], r["backend"], r["mode"]): r for r in rows}
    for case in ("pvt_s.s0", "lookupvit_b.mhbc", "nat_t.s0", "dinat_t.s1", "croc_7b.attn"):
        for mode in ("fwd", "fwd+bwd"):
            ref = by_key[(case, "reference", mode)]
            assert ref["status"] == "ok" and ref["time_ms"] > 0 and ref["tflops"] > 0 and ref["gbps"] > 0
            assert ref["vs_reference"] == pytest.approx(1.0)
    # dense baselines ride along with their case and compare against its reference
    dense = by_key[("nat_t.s0.dense", "sdpa", "fwd")]
    assert dense["status"] == "ok" and dense["vs_reference"] > 0
    # flex cannot run on CPU: reported as skipped with the backend's reason, never timed as a fallback (where this
    # torch has it: an unavailable backend gets no row)
    if "flex" in zoo.ops.available_backends("neighborhood_attention"):
        flex = by_key[("nat_t.s0", "flex", "fwd+bwd")]
        assert (flex["status"].startswith("skipped:") and "no backward on CPU" in flex["status"]
                and "time_ms" not in flex)
    else:
        assert ("nat_t.s0", "flex", "fwd+bwd") not in by_key
    assert by_key[("pvt_s.s0", "sdpa", "fwd")]["status"] == "ok"


def test_missing_op_and_failing_backend_become_rows(monkeypatch):
    fake = bench.Case("fake.case", "no_such_attention", "nothing", 1, {})
    broken = bench.Case("broken.case", "downsampled_attention", "broken builder", 1, {"tokens": 4})
    monkeypatch.setattr(bench, "CASES", [fake, broken])
    rows = bench.run(["fake.case", "broken.case"], device="cpu", quick=True, warmup=0, iters=1, modes=("fwd",))
    assert rows[0]["status"] == "skipped: no_such_attention is not in zoo.ops"
    backends = zoo.ops.available_backends("downsampled_attention")  # a row each: the builder fails before them
    assert all(r["status"].startswith("error: KeyError") for r in rows[1:]) and len(rows) == 1 + len(backends)


def test_cli_rejects_bad_arguments(capsys):
    assert bench.main(["--device", "cpu", "--ops", "nope_attention"]) == 2
    assert "unknown ['nope_attention']" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--batch", "0"]) == 2
    assert bench._selected("all") is None and bench._selected(None) is None  # every case
    assert bench._selected("routing_attention, volo_d1.s1") == ["routing_attention", "volo_d1.s1"]
    assert bench.main(["--list"]) == 0
    assert "focus_detr.enc" in capsys.readouterr().out


def test_every_case_has_a_builder_and_valid_quick_shapes():
    names = [c.name for c in bench.CASES]
    assert len(names) == len(set(names))
    for case in bench.CASES:
        assert case.op in bench.BUILDERS
        assert case.baseline_for is None or case.baseline_for in names
        params, batch = bench._case_params(case, quick=True, batch=None)
        args, kwargs, flops = bench.BUILDERS[case.op](params, batch, torch.float32, torch.device("cpu"), False)
        assert flops > 0 and all(torch.isfinite(t).all() for t in args if isinstance(t, torch.Tensor))


def test_inference_only_ops_time_the_reference_and_skip_the_kernel_for_training(monkeypatch):
    """mlp at its model shapes (quick): the reference in both modes; its triton backend has no backward, so a
    training row is skipped with that reason, never timed as a fallback."""
    import importlib

    require_triton()
    # let the triton rows reach the dispatch check
    monkeypatch.setattr(importlib.import_module("zoo.ops.mlp"), "_kernels_interpreted", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench, "_backends", lambda op: ["triton", "reference"])
    rows = bench.run(["mlp"], device="cpu", quick=True, warmup=0, iters=1, modes=("fwd+bwd",))
    by_key = {(r["case"], r["backend"]): r for r in rows}
    cases = [c.name for c in bench.CASES if c.op == "mlp"]
    assert len(cases) == 3 and {r["case"] for r in rows} == set(cases)
    for case in cases:
        ref, kernel = by_key[(case, "reference")], by_key[(case, "triton")]
        assert ref["status"] == "ok" and ref["time_ms"] > 0 and ref["tflops"] > 0
        assert kernel["status"].startswith("skipped:") and "no backward kernel" in kernel["status"]


def _expect_x_sdpa(rows: list[dict], cases) -> int:
    """Check every timed row of ``cases`` against its case's "<case>.sdpa" row; returns how many were checked."""
    by_key = {(r["case"], r["backend"], r["mode"]): r for r in rows}
    checked = 0
    for case in cases:
        for mode in ("fwd", "fwd+bwd"):
            base = by_key[(f"{case}.sdpa", "sdpa", mode)]
            assert base["status"] == "ok" and base["time_ms"] > 0 and base["tflops"] > 0
            assert base["x_sdpa"] == pytest.approx(1.0)
            timed = [r for r in rows if r["case"] == case and r["mode"] == mode and "time_ms" in r]
            assert any(r["backend"] == "reference" for r in timed)
            for r in timed:
                assert r["x_sdpa"] == pytest.approx(r["time_ms"] / base["time_ms"], rel=1e-12)
                checked += 1
    return checked


def test_quick_cpu_plain_sdpa_baselines_and_x_sdpa():
    rows = bench.run(SDPA_TARGET_OPS.split(","), device="cpu", quick=True, warmup=0, iters=2)
    names = {r["case"] for r in rows}
    assert {f"{c}.sdpa" for c in SDPA_TARGET_CASES} <= names
    assert _expect_x_sdpa(rows, SDPA_TARGET_CASES) >= 4 * len(SDPA_TARGET_CASES)
    # the plain-SDPA rows keep the "vs reference of the accompanied case" ratio, like the dense_sdpa rows
    by_key = {(r["case"], r["backend"], r["mode"]): r for r in rows}
    base, ref = by_key[("pvt_s.s0.sdpa", "sdpa", "fwd")], by_key[("pvt_s.s0", "reference", "fwd")]
    assert base["vs_reference"] == pytest.approx(ref["time_ms"] / base["time_ms"])
    table = bench.format_table(rows)
    assert "x_sdpa" in table.splitlines()[0] and "agent_swin_t.s2.sdpa" in table


def test_x_sdpa_is_op_time_over_baseline_time_per_mode(monkeypatch):
    """With fixed times (distinct per mode) the ratio must be exactly op / baseline of the same mode."""
    times = {("pvt_s.s0", "sdpa", "fwd"): 3.0, ("pvt_s.s0", "sdpa", "fwd+bwd"): 10.0,
             ("pvt_s.s0", "reference", "fwd"): 6.0, ("pvt_s.s0", "reference", "fwd+bwd"): 12.0,
             ("pvt_s.s0.sdpa", "sdpa", "fwd"): 2.0, ("pvt_s.s0.sdpa", "sdpa", "fwd+bwd"): 8.0}

    def fake_measure(case, backend, mode, *args):  # kernel time: a tenth of the step, plus 1 for the reference
        t = times[(case.name, backend, mode)]
        return {"status": "ok", "time_ms": t, "device_ms": t / 10 + (backend == "reference"), "tflops": 1.0,
                "gbps": 1.0}

    monkeypatch.setattr(bench, "_measure", fake_measure)
    monkeypatch.setattr(bench, "_backends", lambda op: ["sdpa"] if op == "sdpa_plain" else ["sdpa", "reference"])
    rows = bench.run(["pvt_s.s0"], device="cpu", quick=True, warmup=0, iters=1)
    got = {(r["case"], r["backend"], r["mode"]): (r["x_sdpa"], r["vs_reference"]) for r in rows}
    assert got == {("pvt_s.s0", "sdpa", "fwd"): (1.5, 2.0), ("pvt_s.s0", "sdpa", "fwd+bwd"): (1.25, 1.2),
                   ("pvt_s.s0", "reference", "fwd"): (3.0, 1.0), ("pvt_s.s0", "reference", "fwd+bwd"): (1.5, 1.0),
                   ("pvt_s.s0.sdpa", "sdpa", "fwd"): (1.0, 3.0), ("pvt_s.s0.sdpa", "sdpa", "fwd+bwd"): (1.0, 1.5)}
    dev = {(r["case"], r["backend"], r["mode"]): r["x_sdpa_dev"] for r in rows}
    assert dev == pytest.approx({("pvt_s.s0", "sdpa", "fwd"): 1.5, ("pvt_s.s0", "sdpa", "fwd+bwd"): 1.25,
                                 ("pvt_s.s0", "reference", "fwd"): 1.6 / 0.2,
                                 ("pvt_s.s0", "reference", "fwd+bwd"): 2.2 / 0.8,
                                 ("pvt_s.s0.sdpa", "sdpa", "fwd"): 1.0, ("pvt_s.s0.sdpa", "sdpa", "fwd+bwd"): 1.0})
    # a baseline that failed leaves its case without the ratio instead of a wrong one
    monkeypatch.setattr(bench, "_measure", lambda case, backend, mode, *a: (
        {"status": "oom"} if (case.name, mode) == ("pvt_s.s0.sdpa", "fwd") else fake_measure(case, backend, mode)))
    rows = bench.run(["pvt_s.s0"], device="cpu", quick=True, warmup=0, iters=1)
    assert all(("x_sdpa" in r) == (r["mode"] == "fwd+bwd") for r in rows if r["status"] == "ok")


def test_plain_sdpa_builder_shapes_flops_and_calls():
    dev, f32 = torch.device("cpu"), torch.float32
    by_name = {c.name: c for c in bench.CASES}
    # agent: N queries over the same N keys
    (q, k, v), kw, flops = bench.BUILDERS["sdpa_plain"](by_name["agent_deit_s.sdpa"].params, 2, f32, dev, False)
    assert q.shape == k.shape == v.shape == (2, 6, 197, 64) and kw == {}
    assert flops == 2.0 * 2 * 6 * 197 * 197 * 128
    # window 7 over a 14x14 map: the 4 windows batched, 49 x 49 each
    (q, k, v), _, flops = bench.BUILDERS["sdpa_plain"](by_name["agent_swin_s.s2.sdpa"].params, 2, f32, dev, False)
    assert q.shape == k.shape == (8, 12, 49, 32)
    args, _, wflops = bench.BUILDERS["window_attention"](by_name["agent_swin_s.s2"].params, 2, f32, dev, False)
    assert flops == wflops  # same attention products as the (unshifted) window op
    # downsampled: tokens queries over kv_tokens keys
    (q, k, v), _, _ = bench.BUILDERS["sdpa_plain"](by_name["pvt_s.s0.sdpa"].params, 1, f32, dev, False)
    assert q.shape == (1, 1, 3136, 64) and k.shape == v.shape == (1, 1, 49, 64)
    # cross: both directions, two plain SDPA calls on the op's four tensors
    params, batch = bench._case_params(by_name["lookupvit_b.mhbc.sdpa"], quick=True, batch=None)
    args, _, flops = bench.BUILDERS["sdpa_plain"](params, batch, f32, dev, False)
    q, k, v, v_rev = args
    assert q.shape == v_rev.shape == (1, 2, 4, 16) and k.shape == v.shape == (1, 2, 16, 16)
    assert flops == 2 * 2.0 * 1 * 2 * 4 * 16 * 32
    out_q, out_k = bench.sdpa_plain(*args)
    torch.testing.assert_close(out_q, torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
    torch.testing.assert_close(out_k, torch.softmax(k @ q.transpose(-1, -2) / 4, -1) @ v_rev)
    # selecting an op brings its plain-SDPA target along
    assert [c.name for c in bench.select_cases(["window_attention"])] == ["agent_swin_s.s2", "agent_swin_s.s2.sdpa"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rows_carry_the_kernel_time_next_to_the_step_time():
    rows = bench.run(ops=["pvt_s.s0"], backends=["reference"], dtype=torch.float16, device="cuda", quick=True,
                     warmup=1, iters=3)
    timed = [r for r in rows if r["status"] == "ok"]
    # kernels of one stream run one after another inside the synchronised step: their sum cannot exceed it (a sum
    # that also counted the CPU-side op rows of the profile would come out about twice the kernels' time)
    assert timed and all(0 < r["device_ms"] <= 1.05 * r["time_ms"] for r in timed)


def test_roofline_floor_is_the_slower_of_flops_and_bytes():
    assert bench.roofline_ms(2e12, 1e9, (1e15, 1e12)) == (pytest.approx(2.0), "flops")
    assert bench.roofline_ms(1e12, 3e9, (1e15, 1e12)) == (pytest.approx(3.0), "bytes")


def test_device_peaks_by_gpu_name(monkeypatch):
    assert bench.device_peaks(torch.device("cpu"), torch.bfloat16) is None
    for name, bf16, fp32, bandwidth in (("NVIDIA H200", 989e12, 67e12, 4.8e12),
                                        ("NVIDIA H100 PCIe", 756e12, 51e12, 2.0e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12, 67e12, 3.35e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.device_peaks(torch.device("cuda"), torch.bfloat16) == (bf16, bandwidth)
        assert bench.device_peaks(torch.device("cuda"), torch.float32) == (fp32, bandwidth)
    for unknown in ("Tesla T4", "NVIDIA H200 NVL", "NVIDIA H100 NVL"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=unknown: name)
        assert bench.device_peaks(torch.device("cuda"), torch.float16) is None


def test_cli_peaks_give_floor_columns_consistent_with_throughput(tmp_path, capsys):
    rc = bench.main(["--device", "cpu", "--quick", "--iters", "2", "--warmup", "0", "--ops", "pvt_s.s0",
                     "--peak-tflops", "0.05", "--peak-gbps", "20", "--out", str(tmp_path)])
    assert rc == 0
    assert "floor_ms" in capsys.readouterr().out
    rows = [r for r in json.loads((tmp_path / "ops_bench.json").read_text())["rows"] if r["status"] == "ok"]
    assert rows
    for r in rows:
        # tflops and gbps are the row's work and traffic over its time: the floor is that work at the peaks
        by_flops = r["time_ms"] * r["tflops"] / 0.05
        by_bytes = r["time_ms"] * r["gbps"] / 20
        assert r["floor_ms"] == pytest.approx(max(by_flops, by_bytes), rel=1e-9)
        assert r["bound"] == ("flops" if by_flops >= by_bytes else "bytes")
        assert r["x_floor"] == pytest.approx(r["time_ms"] / r["floor_ms"], rel=1e-9)  # no device_ms on CPU
    with (tmp_path / "ops_bench.csv").open() as f:
        assert all(row["floor_ms"] and row["bound"] for row in csv.DictReader(f) if row["status"] == "ok")


@pytest.mark.parametrize("argv", [["--peak-tflops", "10"], ["--peak-tflops", "10", "--peak-gbps", "0"]])
def test_cli_rejects_half_or_bad_peaks(argv, capsys):
    assert bench.main(["--device", "cpu", "--quick", *argv]) == 2
    assert "--peak-tflops and --peak-gbps" in capsys.readouterr().err


def test_compiled_rows_time_the_traced_call_and_skip_fallbacks_and_graph_breaks(tmp_path, monkeypatch, capsys):
    """``--compile``: every row compiles its own graph (dynamo counts them) and is marked compiled in both files; a
    backend that falls back inside the graph is skipped with dispatch's reason, and a call that breaks the graph is
    skipped and says so, never timed."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rc = bench.main(["--device", "cpu", "--quick", "--iters", "1", "--warmup", "0", "--ops", "agent_pvt_t.s0.dwconv",
                     "--compile", "--out", str(tmp_path)])
    assert rc == 0 and "compiled=True" in capsys.readouterr().out
    rows = json.loads((tmp_path / "ops_bench.json").read_text())["rows"]
    with (tmp_path / "ops_bench.csv").open() as f:
        assert [r["compiled"] for r in csv.DictReader(f)] == ["True", "True"]
    assert [(r["backend"], r["mode"], r["status"], r["compiled"]) for r in rows] == [
        ("reference", "fwd", "ok", True), ("reference", "fwd+bwd", "ok", True)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2

    monkeypatch.setattr(bench, "_backends", lambda op: ["triton"])  # no CUDA, no interpreter: it falls back
    (row,) = bench.run(["agent_pvt_t.s0.dwconv"], device="cpu", quick=True, warmup=0, iters=1, modes=("fwd+bwd",),
                       compiled=True)
    why = triton_missing_reason() or "no CUDA device"
    assert row["status"].startswith("skipped:") and why in row["status"] and "time_ms" not in row

    real = bench._op_function

    def breaking(op):
        fn = real(op)

        def call(*args, **kwargs):
            torch._dynamo.graph_break()
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(bench, "_backends", lambda op: ["reference"])
    monkeypatch.setattr(bench, "_op_function", breaking)
    (row,) = bench.run(["agent_pvt_t.s0.dwconv"], device="cpu", quick=True, warmup=0, iters=1, modes=("fwd",),
                       compiled=True)
    assert row["status"].startswith("skipped: graph break under torch.compile") and "time_ms" not in row
    (row,) = bench.run(["agent_pvt_t.s0.dwconv"], device="cpu", quick=True, warmup=0, iters=1, modes=("fwd",))
    assert row["status"] == "ok" and row["compiled"] is False  # eager rows do not look for graph breaks
