"""The ops benchmark harness on CPU with tiny shapes (`--device cpu --quick`)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from zoo.ops import bench

MY_OPS = "downsampled_attention,cross_attention,masked_attention,neighborhood_attention"


def test_cli_quick_cpu_writes_table_csv_and_json(tmp_path, capsys):
    rc = bench.main(["--device", "cpu", "--quick", "--iters", "2", "--warmup", "0", "--ops", MY_OPS,
                     "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "time_ms" in printed and "nat_t.s0" in printed
    rows = json.loads((tmp_path / "ops_bench.json").read_text())["rows"]
    with (tmp_path / "ops_bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    by_key = {(r["case"], r["backend"], r["mode"]): r for r in rows}
    for case in ("pvt_s.s0", "lookupvit_b.mhbc", "nat_t.s0", "dinat_t.s1", "croc_7b.attn"):
        for mode in ("fwd", "fwd+bwd"):
            ref = by_key[(case, "reference", mode)]
            assert ref["status"] == "ok" and ref["time_ms"] > 0 and ref["tflops"] > 0 and ref["gbps"] > 0
            assert ref["vs_reference"] == pytest.approx(1.0)
    # dense baselines ride along with their case and compare against its reference
    dense = by_key[("nat_t.s0.dense", "sdpa", "fwd")]
    assert dense["status"] == "ok" and dense["vs_reference"] > 0
    # flex cannot run on CPU: reported as skipped with the backend's reason, never timed as a fallback
    flex = by_key[("nat_t.s0", "flex", "fwd+bwd")]
    assert flex["status"].startswith("skipped:") and "no backward on CPU" in flex["status"] and "time_ms" not in flex
    assert by_key[("pvt_s.s0", "sdpa", "fwd")]["status"] == "ok"


def test_missing_op_and_failing_backend_become_rows(monkeypatch):
    fake = bench.Case("fake.case", "no_such_attention", "nothing", 1, {})
    broken = bench.Case("broken.case", "downsampled_attention", "broken builder", 1, {"tokens": 4})
    monkeypatch.setattr(bench, "CASES", [fake, broken])
    rows = bench.run(["fake.case", "broken.case"], device="cpu", quick=True, warmup=0, iters=1, modes=("fwd",))
    assert rows[0]["status"] == "skipped: no_such_attention is not in zoo.ops"
    assert all(r["status"].startswith("error: KeyError") for r in rows[1:]) and len(rows) == 3


def test_cli_rejects_bad_arguments(capsys):
    assert bench.main(["--device", "cpu", "--ops", "nope_attention"]) == 2
    assert "unknown ['nope_attention']" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--batch", "0"]) == 2
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
