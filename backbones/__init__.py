"""zoo.backbones: image backbones, one file per family; importing this package registers every model with timm."""
