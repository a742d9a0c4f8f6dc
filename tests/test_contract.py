"""Contracts over the whole registry and manifest (timm's "test every registered model" idea, kept cheap)."""
import warnings

import pytest
import timm
import torch

import zoo
from zoo import convert, hub, registry

ZOO_MODELS = [n for n in zoo.list_models() if not n.startswith("zootest")]
REQUIRED_CFG = ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "num_classes")


def test_every_family_registered_models():
    families = {registry.model_family(n) for n in ZOO_MODELS}
    assert {"biformer", "volo", "agent_attention"} <= families
    assert len(ZOO_MODELS) >= 34


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_pretrained_cfg_is_complete(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg is not None, name
    for field in REQUIRED_CFG:
        assert getattr(cfg, field) not in (None, ""), f"{name}: pretrained_cfg.{field} is empty"
    assert cfg.input_size[0] == 3 and len(cfg.mean) == 3 and len(cfg.std) == 3


def test_every_timm_pretrained_tag_has_a_manifest_entry_with_the_same_url():
    manifest = hub.load_manifest()
    for ref in timm.list_pretrained():
        arch, tag = timm.models.split_model_name_tag(ref)
        if arch not in ZOO_MODELS:
            continue
        entry = manifest.get(arch, tag)
        cfg = timm.models.get_pretrained_cfg(ref)
        if cfg.url:
            assert cfg.url in entry.urls, f"{ref}: cfg url {cfg.url} is not among the manifest urls"


def test_every_manifest_entry_names_a_zoo_model_and_its_converter():
    for entry in hub.load_manifest().entries:
        assert entry.model in ZOO_MODELS, entry.ref
        assert timm.models.get_pretrained_cfg(entry.ref) is not None, f"{entry.ref} has no timm pretrained cfg"
        assert entry.converter == registry.model_family(entry.model), entry.ref
        convert.get_converter(entry.converter)
        assert entry.sha256 or entry.sha256_reason, entry.ref


def test_every_released_model_has_weights_in_the_manifest():
    with_weights = {e.model for e in hub.load_manifest().entries}
    assert set(ZOO_MODELS) == with_weights


def test_model_info_reports_params_and_weights():
    info = zoo.model_info("biformer_tiny")
    assert info["family"] == "biformer" and info["params"] == 13_142_760
    assert info["pretrained_tags"] == ["in1k"] and info["weights"][0]["metrics"]["top1"] == 81.4
    with pytest.raises(ValueError, match="timm model, not a zoo model"):
        zoo.model_info("resnet18")


def test_list_models_pretrained_gives_refs():
    refs = zoo.list_models("biformer*", pretrained=True)
    assert "biformer_tiny.in1k" in refs and all("." in r for r in refs)


def test_pretrained_goes_through_the_hub_offline(monkeypatch, tmp_path):
    """timm.create_model(pretrained=True) resolves through zoo.hub: offline, a missing file names where to put it."""
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    with pytest.raises(hub.OfflineError, match=str(tmp_path)):
        timm.create_model("biformer_tiny", pretrained=True)


def test_pretrained_loads_a_cached_official_file(monkeypatch, tmp_path):
    """A file in the cache at the manifest's path loads with pretrained=True (official wrapping, offline)."""
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    kwargs = dict(depths=[1, 1, 1, 1])
    ref_model = zoo.create_model("biformer_tiny", **kwargs)
    entry = hub.load_manifest().get("biformer_tiny", "in1k")
    path = hub.entry_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": ref_model.state_dict(), "epoch": 300}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hub.HubWarning)  # the manifest has no hash for this release file
        model = zoo.create_model("biformer_tiny.in1k", pretrained=True, **kwargs)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl_nchw", "zoo_volo_d1_224", "agent_deit_tiny",
                                  "agent_pvt_tiny", "agent_swin_t", "agent_cswin_t"])
def test_forward_on_the_meta_device(name):
    # shape inference and deferred init run models on "meta", where autocast queries and caches must not break
    model = zoo.create_model(name, num_classes=7).to("meta").eval()
    size = model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        out = model(torch.empty(2, 3, size, size, device="meta"))
    assert out.shape == (2, 7) and out.device.type == "meta"


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl_nchw", "zoo_volo_d1_224", "agent_deit_tiny",
                                  "agent_pvt_tiny", "agent_swin_t", "agent_cswin_t"])
def test_empty_batch_gives_empty_outputs(name):
    # e.g. a detector's last, empty shard: every reshape must spell its sizes (-1 is ambiguous for 0 elements)
    model = zoo.create_model(name, num_classes=7).eval()
    size = model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        assert model(torch.empty(0, 3, size, size)).shape == (0, 7)
        feats = model.forward_intermediates(torch.empty(0, 3, size, size), intermediates_only=True)
    assert all(f.shape[0] == 0 for f in feats) and len(feats) >= 3
