"""A tiny model family registered through the zoo registry, for testing the framework itself."""
import torch
from timm.models import generate_default_cfgs
from torch import nn

from zoo.convert import FamilyConverter, register_converter
from zoo.registry import build_zoo_model, register_family, register_variants

FAMILY = "zootest"


class ToyNet(nn.Module):
    """Conv stem + two conv stages + linear head; official keys use `features.*`/`fc.*` (see key map)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: int = 8, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 2 * width
        self.stem = nn.Conv2d(in_chans, width, 3, 2, 1)
        self.stages = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.Conv2d(width, 2 * width, 3, 2, 1))
        self.head = nn.Linear(2 * width, num_classes) if num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=width, reduction=4, module="stages.0"),
                             dict(num_chs=2 * width, reduction=8, module="stages.1")]

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def official_to_zoo(sd):
    """Official `features.0/1/2` + `fc` -> zoo `stem`, `stages.0/1`, `head`."""
    rename = {"features.0.": "stem.", "features.1.": "stages.0.", "features.2.": "stages.1.", "fc.": "head."}
    out = {}
    for k, v in sd.items():
        for old, new in rename.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def build_official(cls_name, kwargs):
    return ToyNet(num_classes=kwargs.get("classes", 1000), width=kwargs.get("width", 8),
                  in_chans=kwargs.get("in_chans", 3))


def _cfg(**kw):
    return dict(num_classes=1000, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                interpolation="bilinear", first_conv="stem", classifier="head", **kw)


register_family(FAMILY, paper="Toy", license="apache-2.0")
default_cfgs = generate_default_cfgs({"zootest_toy.t1": _cfg(url="http://127.0.0.1:9/none.pth"),
                                      "zootest_toy_wide": _cfg()})
VARIANTS = {"zootest_toy": dict(width=4), "zootest_toy_wide": dict(width=8)}


def _create(name, pretrained, **kwargs):
    return build_zoo_model(ToyNet, name, pretrained, family=FAMILY, feature_cfg=dict(out_indices=(0, 1)), **kwargs)


register_variants(FAMILY, __name__, VARIANTS, _create)
register_converter(FAMILY, FamilyConverter(key_map=official_to_zoo, build_official=build_official,
                                           official_classes=("ToyOfficial",)))


def official_state_dict(width=4, classes=1000, in_chans=3, seed=0):
    """An official-keyed random state dict of the toy family."""
    g = torch.Generator().manual_seed(seed)
    ref = ToyNet(num_classes=classes, width=width, in_chans=in_chans).state_dict()
    inv = {"stem.": "features.0.", "stages.0.": "features.1.", "stages.1.": "features.2.", "head.": "fc."}
    out = {}
    for k, v in ref.items():
        for new, old in inv.items():
            if k.startswith(new):
                k = old + k[len(new):]
                break
        out[k] = torch.randn(v.shape, generator=g)
    return out
