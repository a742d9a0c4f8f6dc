"""The zoo model registry: families, variants as data, and their registration with timm.

Every zoo backbone is a timm model: families declare their variants as a table of constructor arguments and
call :func:`register_variants`, which creates one timm entrypoint per variant (so ``timm.create_model(name)`` works
after ``import zoo``), records the variant config for :func:`zoo.model_info`, and refuses any name that timm already
registers (timm ships VOLO, for instance: ours must never silently replace it).

Pretrained weights never go through timm's own downloader: :func:`build_zoo_model` resolves ``name.tag`` through the
verified :mod:`zoo.hub` and hands timm a local file, so hashing, mirrors, offline mode and the file lock apply to
``timm.create_model(..., pretrained=True)`` as well.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import timm
import torch
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg, split_model_name_tag

__all__ = ["FamilyInfo", "register_family", "register_variants", "build_zoo_model", "get_family", "zoo_model_names",
           "model_family", "variant_config", "resolve_model_name"]


@dataclass(frozen=True)
class FamilyInfo:
    """What a model family is: paper, official code, licence, and the models it registered."""
    name: str
    paper: str
    paper_url: str = ""
    code_url: str = ""
    license: str = ""
    models: list[str] = field(default_factory=list)


_FAMILIES: dict[str, FamilyInfo] = {}
_MODEL_FAMILY: dict[str, str] = {}
_MODEL_CONFIG: dict[str, dict[str, Any]] = {}


def register_family(name: str, *, paper: str, paper_url: str = "", code_url: str = "", license: str = "") -> FamilyInfo:
    """Declare a model family (one model file). Idempotent: a re-import keeps the model list."""
    old = _FAMILIES.get(name)
    info = FamilyInfo(name, paper, paper_url, code_url, license, old.models if old else [])
    _FAMILIES[name] = info
    return info


def get_family(name: str) -> FamilyInfo:
    """The :class:`FamilyInfo` of a registered family; raises KeyError naming the known families."""
    if name not in _FAMILIES:
        raise KeyError(f"unknown family {name!r}; known families: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def zoo_model_names() -> list[str]:
    """Names of every model the zoo registered (sorted)."""
    return sorted(_MODEL_FAMILY)


def model_family(name: str) -> str | None:
    """Family of a zoo model name (tag allowed), or None for names the zoo does not own."""
    return _MODEL_FAMILY.get(split_model_name_tag(name)[0])


def variant_config(name: str) -> dict[str, Any]:
    """The constructor arguments a zoo variant is declared with (a copy)."""
    return dict(_MODEL_CONFIG[split_model_name_tag(name)[0]])


def _make_entrypoint(name: str, module: str, config: dict[str, Any], create_fn: Callable[..., torch.nn.Module]):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return create_fn(name, pretrained, **dict(config, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module
    entrypoint.__doc__ = f"{name}: {config}"
    return entrypoint


def register_variants(family: str, module: str, variants: dict[str, dict[str, Any]],
                      create_fn: Callable[..., torch.nn.Module]) -> None:
    """Register every variant of a family with timm and with the zoo.

    Args:
        family: family name declared with :func:`register_family`.
        module: ``__name__`` of the model file; it must define ``default_cfgs`` (timm looks them up there) and
            receives one module-level entrypoint function per variant.
        variants: ``{model_name: constructor kwargs}``, the family's variant table.
        create_fn: ``create_fn(name, pretrained, **kwargs) -> nn.Module``, usually a call of :func:`build_zoo_model`.
    """
    info = get_family(family)
    mod = sys.modules[module]
    for name, config in variants.items():
        if timm.models.is_model(name) and _MODEL_FAMILY.get(name) != family:
            raise RuntimeError(f"timm already registers a model named {name!r}; zoo models must use another name "
                               "so that timm's model is never replaced")
        entrypoint = _make_entrypoint(name, module, config, create_fn)
        setattr(mod, name, entrypoint)
        if _MODEL_FAMILY.get(name) != family:  # a re-import must not re-register (timm would warn and reset cfgs)
            timm.models.register_model(entrypoint)
        _MODEL_FAMILY[name] = family
        _MODEL_CONFIG[name] = dict(config)
        if name not in info.models:
            info.models.append(name)


def _resolve_tag(variant: str, pretrained_cfg: Any) -> str | None:
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, PretrainedCfg):
        return pretrained_cfg.tag
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag")
    cfg = resolve_pretrained_cfg(variant)
    return cfg.tag if cfg is not None else None


def build_zoo_model(model_cls: type[torch.nn.Module], variant: str, pretrained: bool, *, family: str,
                    feature_cfg: dict[str, Any] | None = None, **kwargs: Any) -> torch.nn.Module:
    """Build a zoo model through timm's ``build_model_with_cfg``, with weights from the verified zoo hub.

    ``pretrained=True`` resolves ``variant.tag`` in the weights manifest and downloads (or finds in the cache) the
    verified file; a caller's ``pretrained_cfg_overlay=dict(file=...)`` or ``dict(state_dict=...)`` wins. Loading
    goes through :func:`zoo.convert.checkpoint_filter` for the family, so official release files load as they are.
    The model's ``nn.Linear``/``nn.Conv2d`` layers keep autocast's weight copies between inference calls
    (:mod:`zoo.ops.autocast_cache`).
    """
    from zoo import convert
    from zoo.ops.autocast_cache import cache_autocast_casts

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    if pretrained and not (overlay.get("file") or overlay.get("state_dict") is not None):
        from zoo import hub

        tag = _resolve_tag(variant, pretrained_cfg)
        overlay["file"] = str(hub.fetch(f"{variant}.{tag}" if tag else variant))
    model = build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=functools.partial(convert.checkpoint_filter, family),
        feature_cfg={**dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **(feature_cfg or {})},
        **kwargs,
    )
    return cache_autocast_casts(model)


def resolve_model_name(name: str) -> str:
    """Check that ``name`` (optionally ``name.tag``) is a zoo or timm model; raise a ValueError with suggestions."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model_name must be a non-empty string, got {name!r}")
    arch, _ = split_model_name_tag(name)
    if timm.models.is_model(arch):
        return name
    known = list(dict.fromkeys(zoo_model_names() + timm.list_models()))
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `zoo list` shows the zoo's models"
    raise ValueError(f"model_name={name!r} is not a zoo or timm model{hint}")


def match_models(pattern: str, names: list[str]) -> list[str]:
    """Names matching a shell-style pattern (``*`` when empty)."""
    return [n for n in names if fnmatch.fnmatch(n, pattern or "*")]
