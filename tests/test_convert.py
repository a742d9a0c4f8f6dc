"""The converter: every wrapping and prefix, the mismatch report, official constructors, atomic conversion."""
import functools
from pathlib import Path

import pytest
import torch
from torch import nn

import toy_family
from zoo import convert


def _sd(seed=0):
    return toy_family.official_state_dict(seed=seed)


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": sd, "epoch": 1},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "hyper_parameters": {}},  # Lightning
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
    lambda sd: {"state_dict": {f"model._orig_mod.{k}": v for k, v in sd.items()}},
    lambda sd: {"model": {k: v + 1 for k, v in sd.items()}, "model_ema": sd},  # EMA preferred
], ids=["bare", "model", "state_dict", "module", "lightning", "compiled", "lightning+compiled", "ema"])
def test_unwrap_every_wrapping(wrap):
    sd = _sd()
    out = convert.unwrap_checkpoint(wrap(sd))
    assert sorted(out) == sorted(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k])


def test_unwrap_without_ema_takes_the_model_weights():
    sd = _sd()
    plus = {k: v + 1 for k, v in sd.items()}
    out = convert.unwrap_checkpoint({"model": plus, "model_ema": sd}, use_ema=False)
    assert torch.equal(out["fc.bias"], plus["fc.bias"])


def test_prefix_kept_when_it_belongs_to_the_model():
    sd = {"model.weight": torch.ones(2), "model.bias": torch.ones(2)}
    assert set(convert.unwrap_checkpoint(sd, model_keys={"model.weight", "model.bias"})) == set(sd)
    assert set(convert.unwrap_checkpoint(sd)) == {"weight", "bias"}


def test_unwrap_rejects_a_dict_without_weights():
    with pytest.raises(ValueError, match="no state dict: top-level keys are \\['args', 'epoch'\\]"):
        convert.unwrap_checkpoint({"epoch": 1, "args": "x"})


def test_mismatch_report_lists_each_kind():
    model = toy_family.ToyNet(width=4)
    sd = convert.get_converter("zootest").key_map(_sd())
    sd.pop("head.bias")
    sd["bogus"] = torch.zeros(1)
    sd["stem.weight"] = torch.zeros(4, 3, 5, 5)
    missing, unexpected, mismatched = convert.compare_state_dict(sd, model)
    assert missing == ["head.bias"] and unexpected == ["bogus"]
    assert mismatched == [("stem.weight", (4, 3, 5, 5), (4, 3, 3, 3))]
    err = convert.CheckpointMismatchError(missing, unexpected, mismatched)
    assert "missing in checkpoint (1):\n  head.bias" in str(err)
    assert "stem.weight: (4, 3, 5, 5) vs (4, 3, 3, 3)" in str(err)


def test_from_official_builds_and_loads_strictly():
    sd = _sd(seed=3)
    model = convert.from_official("zootest", "pkg.models.ToyOfficial", {"width": 4}, {"model": sd})
    assert torch.equal(model.stages[0].weight, sd["features.1.weight"])
    with pytest.raises(convert.CheckpointMismatchError):
        convert.from_official("zootest", "ToyOfficial", {"width": 8}, sd)
    with pytest.raises(ValueError, match="cls='Other' is not an official zootest class"):
        convert.from_official("zootest", "Other", {}, sd)
    with pytest.raises(ValueError, match="family='nope' has no converter"):
        convert.from_official("nope", "X", {}, sd)


@pytest.mark.parametrize("spec,expected", [
    ("torch.nn.LayerNorm", nn.LayerNorm),
    ("torch.nn.BatchNorm2d", nn.BatchNorm2d),
])
def test_resolve_plain_object_names(spec, expected):
    assert convert.resolve_official_object(spec) is expected


@pytest.mark.parametrize("spec", ["functools.partial(torch.nn.LayerNorm, eps=1e-6)",
                                  "functools.partial(torch.nn.LayerNorm, eps=1e-06)"])
def test_resolve_partial_layer_norm(spec):
    factory = convert.resolve_official_object(spec)
    assert isinstance(factory, functools.partial) and factory(8).eps == 1e-6


def test_resolve_timm_layer_norm_2d_class_default():
    from timm.layers import LayerNorm2d

    assert convert.resolve_official_object("timm.layers.LayerNorm2d (class default, eps=1e-6)") is LayerNorm2d


def test_resolve_kwargs_from_repr_text():
    kw = convert.resolve_official_kwargs("{'depth': [2, 2], 'norm_layer': functools.partial(torch.nn.LayerNorm, "
                                         "eps=1e-6), 'qk_scale': None}")
    assert kw["depth"] == [2, 2] and kw["qk_scale"] is None and kw["norm_layer"](4).eps == 1e-6


def test_convert_file_writes_safetensors_atomically(tmp_path):
    from safetensors.torch import load_file

    sd = _sd(seed=5)
    src = tmp_path / "official.pth"
    torch.save({"model": sd}, src)
    dst = tmp_path / "zoo.safetensors"
    convert.convert_file("zootest", "ToyOfficial", {"width": 4}, src, dst)
    out = load_file(str(dst))
    assert torch.equal(out["head.weight"], sd["fc.weight"])
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(convert.CheckpointMismatchError):
        convert.convert_file("zootest", "ToyOfficial", {"width": 8}, src, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.pth", "zoo.safetensors"]


class _Evil:
    """Unpickling this would run a shell command if the loader trusted it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _Config(dict):
    """Like the yacs CfgNode that Swin-codebase release files pickle next to the weights."""


def test_read_checkpoint_runs_no_code_and_keeps_the_weights(tmp_path):
    marker = tmp_path / "pwned"
    sd = _sd()
    path = tmp_path / "release.pth"
    torch.save({"model": sd, "config": _Config(lr=0.1, name="x"), "args": Path("x"), "evil": _Evil(marker)}, path)
    with pytest.warns(UserWarning, match="inert placeholders: .*posix.system"):
        ckpt = convert.read_checkpoint(path)
    assert not marker.exists()
    assert isinstance(ckpt["evil"], convert.InertObject) and isinstance(ckpt["config"], convert.InertObject)
    out = convert.unwrap_checkpoint(ckpt)
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_read_checkpoint_plain_file_needs_no_fallback(tmp_path):
    import warnings

    torch.save({"model": _sd(), "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "a.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert.read_checkpoint(tmp_path / "a.pth")["epoch"] == 3


def test_read_checkpoint_garbage_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not load .*junk.pth"):
        convert.read_checkpoint(tmp_path / "junk.pth")
