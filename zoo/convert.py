"""Official checkpoints -> zoo models.

A release file wraps its weights in many ways (``{"model": sd}``, ``{"state_dict": sd}``, EMA copies, ``module.``
from DDP, ``model.`` from a LightningModule, ``_orig_mod.`` from ``torch.compile``). :func:`unwrap_checkpoint` removes
the wrapping; each family registers a key map (official key names -> zoo key names) and a builder from the official
constructor (class name + kwargs); :func:`checkpoint_filter` (what timm calls while loading pretrained weights) and
:func:`from_official` (what ``zoo convert`` and the parity tests call) both go through them, so there is one path
from an official file to a zoo model.
"""
from __future__ import annotations

import ast
import functools
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["FamilyConverter", "register_converter", "get_converter", "unwrap_checkpoint", "read_checkpoint",
           "checkpoint_filter", "CheckpointMismatchError", "compare_state_dict", "from_official",
           "resolve_official_object", "resolve_official_kwargs", "adapt_state_dict", "convert_file"]

StateDict = dict[str, torch.Tensor]

# Ordered: the first wrapping key found wins. EMA first, as timm does for its release files.
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_WRAP_KEYS = ("state_dict", "model", "module", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class FamilyConverter:
    """How to turn one family's official checkpoints and constructors into zoo models.

    Attributes:
        key_map: official state dict -> zoo state dict (keys renamed, tensors reshaped if needed).
        build_official: ``(official_class_name, resolved_kwargs) -> nn.Module`` building the zoo equivalent.
        official_classes: the official class names ``build_official`` accepts (for error messages).
        fit_to_model: ``(zoo state dict, model) -> state dict`` resizing resolution-dependent tensors (position
            embeddings, bias tables) to the model, as the official fine-tuning loaders do.
    """
    key_map: Callable[[StateDict], StateDict] = lambda sd: sd
    build_official: Callable[[str, dict[str, Any]], nn.Module] | None = None
    official_classes: tuple[str, ...] = ()
    fit_to_model: Callable[[StateDict, nn.Module], StateDict] | None = None


_CONVERTERS: dict[str, FamilyConverter] = {}


def register_converter(family: str, converter: FamilyConverter) -> None:
    """Register (or replace) the converter of a family."""
    _CONVERTERS[family] = converter


def get_converter(family: str) -> FamilyConverter:
    """The converter of ``family``; raises ValueError naming the known families."""
    if family not in _CONVERTERS:
        raise ValueError(f"family={family!r} has no converter; known families: {sorted(_CONVERTERS)}")
    return _CONVERTERS[family]


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit a model; the message lists missing, unexpected and mis-shaped keys."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]],
                 context: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        super().__init__(format_mismatch_report(missing, unexpected, mismatched, context))


def format_mismatch_report(missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]],
                           context: str = "", limit: int = 20) -> str:
    """A readable multi-line report of a state-dict mismatch."""

    def block(title: str, rows: list[str]) -> list[str]:
        if not rows:
            return []
        shown = rows[:limit] + ([f"... and {len(rows) - limit} more"] if len(rows) > limit else [])
        return [f"{title} ({len(rows)}):"] + [f"  {r}" for r in shown]

    lines = [f"checkpoint does not match the model{(' ' + context) if context else ''}:"]
    lines += block("missing in checkpoint", missing)
    lines += block("unexpected in checkpoint", unexpected)
    lines += block("shape mismatch (checkpoint vs model)",
                   [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched])
    lines.append("hint: pass the family's official file unchanged (zoo unwraps it), or use `zoo convert` for "
                 "checkpoints of the official code; num_classes/in_chans differences are adapted automatically.")
    return "\n".join(lines)


def compare_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, ignore: tuple[str, ...] = ()
                       ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing, unexpected, shape-mismatched) keys of ``state_dict`` against ``model.state_dict()``.

    Keys starting with any prefix in ``ignore`` are skipped on both sides.
    """
    own = model.state_dict()

    def kept(k: str) -> bool:
        return not any(k.startswith(p) for p in ignore)

    missing = [k for k in own if k not in state_dict and kept(k)]
    unexpected = [k for k in state_dict if k not in own and kept(k)]
    mismatched = [(k, tuple(state_dict[k].shape), tuple(own[k].shape)) for k in state_dict
                  if k in own and kept(k) and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


def _strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items()}


def unwrap_checkpoint(obj: Any, use_ema: bool = True, model_keys: set[str] | None = None) -> StateDict:
    """The bare state dict inside a release or training checkpoint.

    Handles ``{"model": sd}``, ``{"state_dict": sd}`` (Lightning too), EMA entries (preferred when ``use_ema``, as
    timm does), and the ``module.`` / ``_orig_mod.`` / Lightning ``model.`` prefixes. A prefix is stripped only when
    every key carries it and, given ``model_keys``, when stripping makes more keys match the model.
    """
    sd = obj
    while isinstance(sd, Mapping) and not _is_state_dict(sd):
        keys = (_EMA_KEYS if use_ema else ()) + _WRAP_KEYS
        inner = next((sd[k] for k in keys if k in sd and isinstance(sd[k], Mapping) and sd[k]), None)
        if inner is None:
            raise ValueError(f"checkpoint has no state dict: top-level keys are {sorted(map(str, sd))[:20]}; "
                             f"expected tensors or one of {list(_EMA_KEYS + _WRAP_KEYS)}")
        sd = inner
    if not isinstance(sd, Mapping):
        raise ValueError(f"checkpoint is a {type(sd).__name__}, not a state dict")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                stripped = _strip_prefix(sd, prefix)
                if model_keys is not None and len(model_keys & set(stripped)) < len(model_keys & set(sd)):
                    continue
                sd, changed = stripped, True
    return sd


def _is_state_dict(d: Mapping) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file without running code from it.

    safetensors files load directly; pickles load with ``torch.load(weights_only=True)``. Release files of some
    official codebases also pickle non-tensor objects (a yacs config, argparse args, numpy scalars) that
    ``weights_only`` refuses; those are loaded again with :class:`_InertUnpickler`, which rebuilds tensors and
    plain containers and replaces every other object by an inert placeholder (a warning names them). Nothing in
    the file is ever called.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path={str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        replaced: set[str] = set()
        obj = torch.load(str(path), map_location="cpu", weights_only=False,
                         pickle_module=_inert_pickle_module(replaced))
    except Exception as e:
        raise ValueError(f"could not load {str(path)!r} safely (safetensors, torch.load(weights_only=True) or "
                         f"zoo's inert unpickler): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from e
    if replaced:
        warnings.warn(f"{path.name}: non-tensor objects replaced by inert placeholders: {sorted(replaced)}",
                      stacklevel=2)
    return obj


class InertObject:
    """Stands in for an object a checkpoint pickled but zoo does not trust; it keeps the pickled data as data."""

    args: tuple = ()
    items: dict | None = None
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.items = args, dict(kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # pickles of dict subclasses set items on the object
        self.items = {**(self.items or {}), key: value}

    def append(self, value: Any) -> None:  # ... and list subclasses append
        self.args = self.args + (value,)

    def extend(self, values: Any) -> None:
        self.args = self.args + tuple(values)


_TRUSTED_GLOBALS = {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"), ("torch", "device"),
}


def _inert_pickle_module(replaced: set[str]) -> Any:
    """A ``pickle``-like module for ``torch.load`` whose unpickler trusts only tensors and plain containers."""
    import types

    class _InertUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _TRUSTED_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            replaced.add(f"{module}.{name}")
            return InertObject

    mod = types.ModuleType("zoo_inert_pickle")
    mod.Unpickler = _InertUnpickler
    mod.load = lambda f, **kw: _InertUnpickler(f, **kw).load()
    mod.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})
    return mod


def _pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg if isinstance(cfg, dict) else dict(cfg.__dict__)


def _as_list(x: Any) -> list[str]:
    if not x:
        return []
    return [x] if isinstance(x, str) else list(x)


def adapt_state_dict(state_dict: StateDict, model: nn.Module) -> tuple[StateDict, tuple[str, ...]]:
    """Adapt a checkpoint to a model's head size and input channels, as timm does.

    Classifier tensors (named by ``pretrained_cfg['classifier']``) whose shape differs from the model's are dropped
    (the model keeps its fresh head); a first conv (``pretrained_cfg['first_conv']``) with other input channels is
    adapted with :func:`timm.models.adapt_input_conv`. Returns the new dict and the prefixes left to the model.
    """
    from timm.models import adapt_input_conv

    cfg = _pretrained_cfg(model)
    own = model.state_dict()
    sd = dict(state_dict)
    left: list[str] = []
    for prefix in _as_list(cfg.get("classifier")):
        for suffix in (".weight", ".bias"):
            k = prefix + suffix
            if k in sd and k in own and sd[k].shape != own[k].shape:
                sd.pop(k)
                left.append(prefix + ".")
    for prefix in _as_list(cfg.get("first_conv")):
        k = prefix + ".weight"
        if k in sd and k in own and sd[k].ndim == 4 and sd[k].shape[1] != own[k].shape[1]:
            sd[k] = adapt_input_conv(own[k].shape[1], sd[k])
    return sd, tuple(left)


def _to_zoo_keys(family: str, sd: StateDict, model: nn.Module) -> StateDict:
    """Official keys -> zoo keys (skipped when the dict already has the model's keys), then fit to the model."""
    conv = get_converter(family)
    if set(sd) != set(model.state_dict()):
        sd = conv.key_map(sd)
    return conv.fit_to_model(sd, model) if conv.fit_to_model is not None else sd


def checkpoint_filter(family: str, state_dict: Any, model: nn.Module) -> StateDict:
    """timm ``pretrained_filter_fn`` for a zoo family: unwrap, map official keys, adapt head/stem, check strictly.

    Raises:
        CheckpointMismatchError: listing missing, unexpected and mis-shaped keys when the file does not fit.
    """
    target = model.state_dict()
    sd = unwrap_checkpoint(state_dict, model_keys=set(target))
    sd = _to_zoo_keys(family, sd, model)
    sd, left = adapt_state_dict(sd, model)
    missing, unexpected, mismatched = compare_state_dict(sd, model, ignore=left)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, f"({family} {type(model).__name__})")
    if left:  # timm only relaxes strictness for its own num_classes check; ours may drop a head timm kept
        for prefix in left:
            for k, v in target.items():
                if k.startswith(prefix):
                    sd[k] = v
    return sd


# ----------------------------------------------------------------------------------------------------------------
# Official constructors: kwargs that name Python objects arrive as strings (see shared/parity/README.md).

def _layer_norm_2d(**kw: Any) -> type[nn.Module] | Callable[..., nn.Module]:
    from timm.layers import LayerNorm2d

    return functools.partial(LayerNorm2d, **kw) if kw else LayerNorm2d


_OBJECTS: dict[str, Callable[..., Any]] = {
    "torch.nn.LayerNorm": lambda **kw: functools.partial(nn.LayerNorm, **kw) if kw else nn.LayerNorm,
    "nn.LayerNorm": lambda **kw: functools.partial(nn.LayerNorm, **kw) if kw else nn.LayerNorm,
    "torch.nn.BatchNorm2d": lambda **kw: functools.partial(nn.BatchNorm2d, **kw) if kw else nn.BatchNorm2d,
    "nn.BatchNorm2d": lambda **kw: functools.partial(nn.BatchNorm2d, **kw) if kw else nn.BatchNorm2d,
    "torch.nn.GELU": lambda **kw: nn.GELU,
    "nn.GELU": lambda **kw: nn.GELU,
    "timm.layers.LayerNorm2d": _layer_norm_2d,
    "timm.layers.patch_embed.PatchEmbed": lambda **kw: __import__("timm.layers", fromlist=["PatchEmbed"]).PatchEmbed,
}


def resolve_official_object(spec: Any) -> Any:
    """Turn a string naming an official constructor argument object into the object.

    Accepts ``"torch.nn.LayerNorm"``, ``"functools.partial(torch.nn.LayerNorm, eps=1e-6)"``,
    ``"timm.layers.LayerNorm2d (class default, eps=1e-6)"``; other values are returned unchanged.
    """
    if not isinstance(spec, str):
        return spec
    s = spec.split(" (")[0].strip()
    if s.startswith("functools.partial(") and s.endswith(")"):
        inner = s[len("functools.partial("):-1]
        name, _, rest = inner.partition(",")
        kw = _parse_kwargs(rest)
        if name.strip() in _OBJECTS:
            return _OBJECTS[name.strip()](**kw)
        raise ValueError(f"official kwarg {spec!r} names an unknown object; known: {sorted(_OBJECTS)}")
    if s in _OBJECTS:
        return _OBJECTS[s]()
    return spec


def _parse_kwargs(text: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        kw[key.strip()] = ast.literal_eval(value.strip())
    return kw


def resolve_official_kwargs(kwargs: Mapping[str, Any] | str) -> dict[str, Any]:
    """Official constructor kwargs with object-naming strings resolved (accepts the dict or its ``repr``)."""
    if isinstance(kwargs, str):
        kwargs = _literal_kwargs(kwargs)
    return {k: resolve_official_object(v) for k, v in kwargs.items()}


def _literal_kwargs(text: str) -> dict[str, Any]:
    """Parse a kwargs ``repr`` whose values may name objects (``functools.partial(...)``, ``<class ...>``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        tree = ast.parse(text, mode="eval").body
        if not isinstance(tree, ast.Dict):
            raise ValueError(f"official kwargs must be a dict, got {text[:80]!r}")
        out = {}
        for k, v in zip(tree.keys, tree.values):
            seg = ast.get_source_segment(text, v)
            try:
                out[ast.literal_eval(k)] = ast.literal_eval(v)
            except ValueError:
                out[ast.literal_eval(k)] = seg
        return out


def from_official(family: str, cls: str, kwargs: Mapping[str, Any] | str,
                  state_dict: Mapping[str, torch.Tensor] | None = None, strict: bool = True) -> nn.Module:
    """Build the zoo model equivalent to an official constructor call and load official-keyed weights.

    Args:
        family: zoo family (``"biformer"``, ``"volo"``, ``"agent_attention"``, ...).
        cls: official class name (``"BiFormer"``, ``"nchwBiFormerSTL"``, a dotted path is fine).
        kwargs: the official constructor kwargs; strings naming objects (norm layers) are resolved.
        state_dict: official-keyed weights (wrapping allowed); None leaves the zoo model's random init.
        strict: raise :class:`CheckpointMismatchError` on any missing/unexpected/mis-shaped key.

    Returns:
        The zoo ``nn.Module`` (in train mode, like a freshly built model).
    """
    conv = get_converter(family)
    if conv.build_official is None:
        raise ValueError(f"family={family!r} cannot build from official constructors")
    name = cls.rsplit(".", 1)[-1]
    if conv.official_classes and name not in conv.official_classes:
        raise ValueError(f"cls={cls!r} is not an official {family} class; accepted: {list(conv.official_classes)}")
    model = conv.build_official(name, resolve_official_kwargs(kwargs))
    if state_dict is not None:
        load_official_state_dict(family, model, state_dict, strict=strict)
    return model


def load_official_state_dict(family: str, model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
                             ) -> None:
    """Unwrap and key-map an official state dict, then load it into a zoo model (strict by default)."""
    target = set(model.state_dict())
    sd = _to_zoo_keys(family, unwrap_checkpoint(state_dict, model_keys=target), model)
    missing, unexpected, mismatched = compare_state_dict(sd, model)
    if strict and (missing or unexpected or mismatched):
        raise CheckpointMismatchError(missing, unexpected, mismatched, f"({family} {type(model).__name__})")
    bad = {m[0] for m in mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k not in bad}, strict=False)


def convert_file(family: str, cls: str, kwargs: Mapping[str, Any] | str, src: str | os.PathLike,
                 dst: str | os.PathLike) -> nn.Module:
    """Convert an official checkpoint file into a zoo ``.safetensors`` file (written atomically).

    Returns the loaded zoo model. Nothing is left at ``dst`` if any step fails.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output path {str(dst)!r} must end in .safetensors")
    model = from_official(family, cls, kwargs, read_checkpoint(src))
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"family": family, "official_class": cls})
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return model
