"""The `zoo` command, run as users run it: in a subprocess, checking output and exit codes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import toy_family

TESTS = Path(__file__).parent


def run_zoo(*args, env=None, with_toy=True):
    """Run the CLI in a fresh interpreter; the toy family is imported first when asked (it is a test plugin)."""
    prelude = "import toy_family; " if with_toy else ""
    code = prelude + "import sys; from zoo.cli import main; sys.exit(main(sys.argv[1:]))"
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                    **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
                          timeout=300)


def test_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "zoo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for verb in ("list", "info", "download", "convert", "predict", "train", "eval", "bench"):
        assert verb in out.stdout


def test_list_with_pattern():
    out = run_zoo("list", "zootest*")
    assert out.returncode == 0 and out.stdout.split() == ["zootest_toy", "zootest_toy_wide"]
    out = run_zoo("list", "no_such_model*")
    assert out.returncode == 1 and "no zoo model matches" in out.stderr


def test_unknown_model_is_one_clear_line():
    out = run_zoo("info", "zootest_toi")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("zoo: error: model_name='zootest_toi' is not a zoo or timm model; did you mean "
                               "zootest_toy, zootest_toy_wide")


def test_convert_writes_zoo_weights(tmp_path):
    sd = toy_family.official_state_dict(width=4, classes=10, seed=2)
    torch.save({"model": sd}, tmp_path / "official.pth")
    out = run_zoo("convert", "--family", "zootest", "--official-class", "ToyOfficial",
                  "--kwargs", json.dumps({"width": 4, "classes": 10}), str(tmp_path / "official.pth"),
                  str(tmp_path / "out.safetensors"))
    assert out.returncode == 0, out.stderr
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["head.weight"], sd["fc.weight"])


def test_convert_mismatch_fails_without_output(tmp_path):
    torch.save({"model": toy_family.official_state_dict(width=4)}, tmp_path / "official.pth")
    out = run_zoo("convert", "--family", "zootest", "--official-class", "ToyOfficial", "--kwargs", '{"width": 8}',
                  str(tmp_path / "official.pth"), str(tmp_path / "out.safetensors"))
    assert out.returncode == 1 and "shape mismatch" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_predict_with_checkpoint_prints_top_k(tmp_path):
    from PIL import Image

    sd = toy_family.official_state_dict(width=4, classes=1000, seed=4)
    torch.save({"model": sd}, tmp_path / "w.pth")
    rng = torch.Generator().manual_seed(0)
    img = (torch.rand(40, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(tmp_path / "a.png")
    out = run_zoo("predict", "zootest_toy", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "w.pth"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].endswith("a.png") and len(lines) == 6
    probs = [float(line.split("%")[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    # ImageNet names: a 1000-class head is labelled with timm's shipped class descriptions
    assert all(len(line.split(None, 2)) == 3 for line in lines[1:])


def test_predict_missing_image_is_a_clear_error(tmp_path):
    torch.save({"model": toy_family.official_state_dict(width=4)}, tmp_path / "w.pth")
    out = run_zoo("predict", "zootest_toy", str(tmp_path / "nope.png"), "--checkpoint", str(tmp_path / "w.pth"))
    assert out.returncode == 1 and "nope.png" in out.stderr and "does not exist" in out.stderr


def test_download_offline_miss_exits_nonzero(tmp_path):
    out = run_zoo("download", "zootest_toy.t1", env={"ZOO_OFFLINE": "1", "ZOO_CACHE": str(tmp_path),
                                                      "ZOO_MANIFEST": str(_toy_manifest(tmp_path))})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert str(tmp_path) in out.stderr


def _toy_manifest(tmp_path):
    path = tmp_path / "toy_manifest.yaml"
    path.write_text(
        "weights:\n"
        "  - model: zootest_toy\n    tag: t1\n    urls: [http://127.0.0.1:9/toy.pth]\n"
        "    sha256: null\n    sha256_reason: test file\n    format: pth\n    wrapping: model\n"
        "    converter: zootest\n    license: apache-2.0\n    paper: Toy\n    metrics: {}\n")
    return path
