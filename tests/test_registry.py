"""The registry: zoo names in timm, variants as data, no clobbering of timm names, create_model paths."""
import pytest
import timm
import torch

import zoo
import toy_family
from zoo import registry


def test_variants_are_timm_models_with_their_config():
    model = timm.create_model("zootest_toy", num_classes=7)
    assert isinstance(model, toy_family.ToyNet)
    assert model.stem.out_channels == 4 and model.head.out_features == 7
    assert timm.create_model("zootest_toy_wide").stem.out_channels == 8
    assert registry.variant_config("zootest_toy") == {"width": 4}
    assert model.pretrained_cfg["classifier"] == "head"


def test_zoo_list_models_only_lists_zoo_models():
    names = zoo.list_models("zootest*")
    assert names == ["zootest_toy", "zootest_toy_wide"]
    assert "resnet18" not in zoo.list_models()


def test_register_refuses_a_name_timm_already_has():
    with pytest.raises(RuntimeError, match="timm already registers a model named 'resnet18'"):
        registry.register_variants("zootest", toy_family.__name__, {"resnet18": {}}, toy_family._create)
    assert type(timm.create_model("resnet18")).__name__ == "ResNet"


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"model_name='zootest_toi' .*did you mean zootest_toy"):
        zoo.create_model("zootest_toi")


def test_create_model_passes_through_to_timm_models():
    model = zoo.create_model("resnet18", num_classes=3)
    assert model.fc.out_features == 3


def test_features_only_gives_stage_maps():
    model = zoo.create_model("zootest_toy", features_only=True)
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [4, 8]
    assert model.feature_info.reduction() == [4, 8]


def test_checkpoint_path_loads_official_wrapping_and_infers_head_size(tmp_path):
    sd = toy_family.official_state_dict(width=4, classes=5)
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    model = zoo.create_model("zootest_toy", checkpoint_path=path)
    assert model.head.out_features == 5
    torch.testing.assert_close(model.stem.weight, sd["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.head.bias, sd["fc.bias"], rtol=0, atol=0)


def test_checkpoint_path_with_other_num_classes_reinitialises_only_the_head(tmp_path):
    sd = toy_family.official_state_dict(width=4, classes=5)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd}, path)
    model = zoo.create_model("zootest_toy", checkpoint_path=path, num_classes=3)
    assert model.head.out_features == 3
    torch.testing.assert_close(model.stages[1].weight, sd["features.2.weight"], rtol=0, atol=0)


def test_checkpoint_path_adapts_first_conv_to_in_chans(tmp_path):
    sd = toy_family.official_state_dict(width=4, classes=5)
    torch.save({"model": sd}, tmp_path / "c.pth")
    model = zoo.create_model("zootest_toy", checkpoint_path=tmp_path / "c.pth", in_chans=1)
    assert model.stem.weight.shape[1] == 1
    torch.testing.assert_close(model.stem.weight[:, 0], sd["features.0.weight"].sum(1), rtol=1e-6, atol=1e-6)


def test_pretrained_cfg_overlay_file_goes_through_the_converter(tmp_path):
    sd = toy_family.official_state_dict(width=4, classes=1000)
    torch.save({"model": sd}, tmp_path / "w.pth")
    model = timm.create_model("zootest_toy", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    torch.testing.assert_close(model.head.weight, sd["fc.weight"], rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_reports_keys(tmp_path):
    sd = toy_family.official_state_dict(width=8, classes=1000)  # wrong width for zootest_toy
    sd["extra.weight"] = torch.ones(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError) as err:
        zoo.create_model("zootest_toy", checkpoint_path=tmp_path / "bad.pth")
    text = str(err.value)
    assert "shape mismatch" in text and "stem.weight: (8, 3, 3, 3) vs (4, 3, 3, 3)" in text
    assert "unexpected in checkpoint" in text and "extra.weight" in text


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_path=.*nope.pth"):
        zoo.create_model("zootest_toy", checkpoint_path=tmp_path / "nope.pth")
