"""The public model API: :func:`create_model`, :func:`list_models`, :func:`model_info`."""
from __future__ import annotations

import os
from typing import Any

import timm
import torch
from timm.models import split_model_name_tag

from zoo import registry

__all__ = ["create_model", "list_models", "model_info"]


def create_model(model_name: str, pretrained: bool = False, num_classes: int | None = None,
                 features_only: bool = False, checkpoint_path: str | os.PathLike | None = None,
                 **kwargs: Any) -> torch.nn.Module:
    """Create a zoo (or timm) model.

    Args:
        model_name: ``name`` or ``name.tag`` (the tag picks pretrained weights, e.g. ``biformer_tiny.in1k``).
        pretrained: load the manifest's weights for the tag (verified download, cached, offline-capable).
        num_classes: classifier size; a pretrained head of another size is dropped and re-initialised. With
            ``checkpoint_path`` and no ``num_classes``, the checkpoint's head size is used.
        features_only: return a timm feature extractor (``out_indices=...`` selects stages).
        checkpoint_path: weights to load: an official release file as downloaded (official wrapping and keys),
            a zoo ``.safetensors``, or a Lightning checkpoint of a zoo recipe.
        **kwargs: model constructor arguments (``in_chans``, ``drop_path_rate``, ``img_size``, ...) and timm's
            ``pretrained_cfg_overlay``.

    Returns:
        The model, in train mode like ``timm.create_model``.
    """
    model_name = registry.resolve_model_name(model_name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if features_only:  # passed only when asked, as timm.create_model does: an entrypoint need not know the argument
        kwargs["features_only"] = True
    if checkpoint_path is None:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    from zoo import convert

    state_dict = convert.read_checkpoint(checkpoint_path)
    if registry.model_family(model_name) is None:  # timm models get no zoo filter: unwrap Lightning/EMA/DDP here
        state_dict = convert.unwrap_checkpoint(state_dict)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay["state_dict"] = state_dict
    head_size = _checkpoint_num_classes(model_name, state_dict)
    if head_size is not None:
        kwargs.setdefault("num_classes", head_size)
        overlay["num_classes"] = head_size  # so timm keeps a fine-tuned head of that size
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _checkpoint_num_classes(model_name: str, checkpoint: Any) -> int | None:
    """Rows of the classifier weight in a checkpoint, using the model's ``pretrained_cfg['classifier']``."""
    from zoo import convert

    cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(classifier, (tuple, list)):  # e.g. VOLO: ('head', 'aux_head'); the first is the class head
        classifier = classifier[0] if classifier else None
    if not classifier:
        return None
    try:
        sd = convert.unwrap_checkpoint(checkpoint)
    except ValueError:
        return None
    family = registry.model_family(model_name)
    if family is not None and f"{classifier}.weight" not in sd:
        sd = convert.get_converter(family).key_map(sd)
    weight = sd.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names of the zoo's models matching a shell-style ``pattern``.

    With ``pretrained=True`` the names carry their tags (``biformer_tiny.in1k``), one per manifest entry.
    """
    names = registry.match_models(pattern, registry.zoo_model_names())
    if not pretrained:
        return names
    from zoo import hub

    refs = [f"{e.model}.{e.tag}" for e in hub.load_manifest().entries]
    return sorted(r for r in refs if split_model_name_tag(r)[0] in names or registry.match_models(pattern, [r]))


def model_info(model_name: str) -> dict[str, Any]:
    """What the zoo knows about a model: family, paper, variant config, parameter count, weights and licence."""
    arch, _ = split_model_name_tag(registry.resolve_model_name(model_name))
    family = registry.model_family(arch)
    if family is None:
        raise ValueError(f"model_name={model_name!r} is a timm model, not a zoo model; use timm's documentation")
    info = registry.get_family(family)
    from zoo import hub

    weights = [e for e in hub.load_manifest().entries if e.model == arch]
    cfg = timm.models.get_pretrained_cfg(arch)
    return {
        "name": arch,
        "family": family,
        "paper": info.paper,
        "paper_url": info.paper_url,
        "code_url": info.code_url,
        "license": info.license,
        "config": registry.variant_config(arch),
        "params": count_parameters(arch),
        "pretrained_tags": [e.tag for e in weights],
        "weights": [e.summary() for e in weights],
        "input_size": tuple(cfg.input_size) if cfg is not None else None,
    }


def count_parameters(model_name: str) -> int:
    """Parameter count of a model, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = timm.create_model(model_name)
    return sum(p.numel() for p in model.parameters())
