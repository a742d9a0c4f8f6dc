"""The weights manifest: every released checkpoint, where it lives, its hash, how to load it, what it scores.

The packaged manifest is ``weights_manifest.yaml`` (inside the installed ``zoo`` package, or at the root of a source
tree); ``ZOO_MANIFEST=path[:path...]`` merges a user's files over it, an entry with the same ``model.tag`` replacing
the packaged one in place (so the default tag of a model, its first entry, stays first). Every entry is validated on
load, and every problem is reported with the file, the entry (index and ``model.tag``), the field and what is
accepted. The schema is documented at the top of ``weights_manifest.yaml``; check a file with
``python -m zoo.manifest FILE...``.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import yaml

__all__ = ["ManifestError", "WeightEntry", "Manifest", "load_manifest", "read_manifest_file", "merge_entries",
           "manifest_paths", "packaged_manifest_path", "parse_hf_url", "FORMATS", "URL_SCHEMES"]

FORMATS = ("pth", "pth.tar", "pt", "ckpt", "safetensors", "bin")
URL_SCHEMES = ("https", "http", "file", "hf")
REQUIRED_FIELDS = ("model", "tag", "urls", "sha256", "format")
OPTIONAL_FIELDS = ("sha256_reason", "hf_hub_id", "hf_hub_filename", "size", "wrapping", "converter", "license",
                   "paper", "metrics", "filename")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
# The file the Hugging Face convention puts weights in, by format (used when hf_hub_filename is not given).
HF_DEFAULT_FILENAMES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}

_MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-+]*$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ManifestError(ValueError):
    """A weights manifest file is unreadable or has invalid entries; the message lists every problem."""


@dataclass
class WeightEntry:
    """One released checkpoint of the weights manifest (the schema is in ``weights_manifest.yaml``)."""
    model: str
    tag: str
    urls: list[str]
    sha256: str | None
    format: str
    sha256_reason: str | None = None
    hf_hub_id: str | None = None
    hf_hub_filename: str | None = None
    size: int | None = None
    wrapping: str | None = None
    converter: str | None = None
    license: str | None = None
    paper: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    filename: str | None = None
    origin: str = field(default="", compare=False, repr=False)  # the manifest file it came from (not a field)

    @property
    def ref(self) -> str:
        """``model.tag``, the name that addresses this checkpoint."""
        return f"{self.model}.{self.tag}"

    @property
    def cache_filename(self) -> str:
        """File name in the weights cache: ``filename`` if set, else ``model.tag[-sha256[:12]].format``.

        The ``model.tag`` part keeps distinct checkpoints apart; the hash part makes a re-released file (new hash)
        a new cache file instead of a "corrupt" old one.
        """
        if self.filename:
            return self.filename
        digest = f"-{self.sha256[:12]}" if self.sha256 else ""
        return f"{self.ref}{digest}.{self.format}"

    @property
    def sources(self) -> list[str]:
        """Where the file can be fetched, in the order tried: ``urls``, then ``hf_hub_id`` as an ``hf://`` url."""
        sources = list(self.urls)
        if self.hf_hub_id:
            repo = self.hf_hub_id
            filename = self.hf_hub_filename or HF_DEFAULT_FILENAMES[self.format]
            sources.append(f"hf://{repo}/{filename}")
        return sources

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: model, tag, urls, sha256, size, format, license, metrics, paper, hf_hub_id."""
        keys = ("model", "tag", "urls", "sha256", "size", "format", "license", "metrics", "paper", "hf_hub_id")
        data = asdict(self)
        return {k: data[k] for k in keys}


class _FieldError(Exception):
    """One invalid field of one entry (turned into a ManifestError line naming the entry)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


def parse_hf_url(url: str) -> tuple[str, str | None, str]:
    """Split ``hf://org/repo[@revision]/path/to/file`` into ``(repo_id, revision, filename)``.

    Raises:
        ValueError: the url is not of that form.
    """
    if not isinstance(url, str) or not url.startswith("hf://"):
        raise ValueError(f"url={url!r} is not an hf:// url; expected hf://org/repo[@revision]/filename")
    parts = url[len("hf://"):].split("/")
    if len(parts) < 3 or not all(parts) or ".." in parts:
        raise ValueError(f"url={url!r} is not a valid hf:// url; expected hf://org/repo[@revision]/filename")
    repo, _, revision = parts[1].partition("@")
    repo_id = f"{parts[0]}/{repo}"
    if not _HF_REPO_RE.match(repo_id) or (parts[1].endswith("@")):
        raise ValueError(f"url={url!r} names no valid Hugging Face repository; expected hf://org/repo[@revision]/filename")
    return repo_id, revision or None, "/".join(parts[2:])


# ---------------------------------------------------------------------------------------------------------------
# Field validators: each returns the normalised value or raises _FieldError saying what is accepted.

def _check_str(name: str, value: Any, *, pattern: re.Pattern | None = None, accepted: str = "a string",
               nullable: bool = True) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value or (pattern is not None and not pattern.match(value)):
        raise _FieldError(name, f"field {name!r} = {value!r} is invalid; accepted: {accepted}"
                                + (" or null" if nullable else ""))
    return value


def _check_model(value: Any) -> str:
    return _check_str("model", value, pattern=_MODEL_RE, nullable=False,
                      accepted="a lowercase model name of letters, digits, '_' and '-' (no '.')")


def _check_tag(value: Any) -> str:
    return _check_str("tag", value, pattern=_TAG_RE, nullable=False,
                      accepted="a tag of letters, digits, '_', '-' and '.', e.g. 'in1k'")


def _check_url(url: Any) -> str:
    scheme = urlsplit(url).scheme if isinstance(url, str) else None
    if scheme not in URL_SCHEMES:
        raise _FieldError("urls", f"field 'urls' has {url!r}, whose scheme {scheme!r} is not accepted; "
                                  f"accepted schemes: {', '.join(s + '://' for s in URL_SCHEMES)}")
    if scheme == "hf":
        try:
            parse_hf_url(url)
        except ValueError as e:
            raise _FieldError("urls", f"field 'urls': {e}") from None
    elif scheme in ("http", "https") and not urlsplit(url).netloc:
        raise _FieldError("urls", f"field 'urls' has {url!r}, which names no host")
    return url


def _check_urls(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _FieldError("urls", f"field 'urls' = {value!r} is invalid; accepted: a list of urls "
                                  "(primary first, then mirrors), e.g. [https://...]")
    return [_check_url(u) for u in value]


def _check_sha256(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise _FieldError("sha256", f"field 'sha256' = {value!r} is not a sha256; accepted: 64 hexadecimal "
                                    "characters, or null with a sha256_reason")
    return value.lower()


def _check_format(value: Any) -> str:
    if value not in FORMATS:
        raise _FieldError("format", f"field 'format' = {value!r} is invalid; accepted: {', '.join(FORMATS)}")
    return value


def _check_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _FieldError("size", f"field 'size' = {value!r} is invalid; accepted: a size in bytes "
                                  "(a non-negative integer) or null")
    return value


def _check_metrics(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _FieldError("metrics", f"field 'metrics' = {value!r} is invalid; accepted: a mapping with string "
                                     "keys, e.g. {top1: 81.4, dataset: imagenet-1k}, or null")
    return dict(value)


def _check_filename(value: Any) -> str | None:
    return _check_str("filename", value, pattern=_FILENAME_RE,
                      accepted="a plain file name (letters, digits, '_', '-', '.', '+'; no folders), "
                               "ending in '.<format>'")


def _check_hf_hub_id(value: Any) -> str | None:
    if value is None:
        return None
    repo = value.partition("@")[0] if isinstance(value, str) else None
    if repo is None or not _HF_REPO_RE.match(repo) or (isinstance(value, str) and value.endswith("@")):
        raise _FieldError("hf_hub_id", f"field 'hf_hub_id' = {value!r} is invalid; accepted: 'org/repo' or "
                                       "'org/repo@revision', or null")
    return value


def _check_hf_hub_filename(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or value.startswith("/") or ".." in value.split("/"):
        raise _FieldError("hf_hub_filename", f"field 'hf_hub_filename' = {value!r} is invalid; accepted: a "
                                             "file path inside the repository, e.g. model.safetensors, or null")
    return value


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "model": _check_model,
    "tag": _check_tag,
    "urls": _check_urls,
    "sha256": _check_sha256,
    "format": _check_format,
    "sha256_reason": lambda v: _check_str("sha256_reason", v, accepted="a sentence saying why no hash is known"),
    "hf_hub_id": _check_hf_hub_id,
    "hf_hub_filename": _check_hf_hub_filename,
    "size": _check_size,
    "wrapping": lambda v: _check_str("wrapping", v, accepted="the key holding the state dict, e.g. 'model'"),
    "converter": lambda v: _check_str("converter", v, accepted="a zoo.convert family name"),
    "license": lambda v: _check_str("license", v, accepted="a licence name, e.g. 'MIT'"),
    "paper": lambda v: _check_str("paper", v, accepted="the paper's title and venue"),
    "metrics": _check_metrics,
    "filename": _check_filename,
}


def _check_consistency(values: dict[str, Any]) -> list[_FieldError]:
    """Rules that involve several fields of one entry."""
    errors = []
    if values.get("sha256") is None and "sha256" in values and not values.get("sha256_reason"):
        errors.append(_FieldError("sha256_reason", "field 'sha256' is null, so 'sha256_reason' is required: a "
                                                   "sentence saying why no hash is known"))
    if values.get("urls") == [] and not values.get("hf_hub_id"):
        errors.append(_FieldError("urls", "field 'urls' is empty and 'hf_hub_id' is not set; accepted: at least "
                                          "one url, or an hf_hub_id"))
    fmt = values.get("format")
    if values.get("hf_hub_filename") and not values.get("hf_hub_id"):
        errors.append(_FieldError("hf_hub_filename", "field 'hf_hub_filename' is set but 'hf_hub_id' is not; "
                                                     "set hf_hub_id or drop hf_hub_filename"))
    if values.get("hf_hub_id") and not values.get("hf_hub_filename") and fmt in FORMATS \
            and fmt not in HF_DEFAULT_FILENAMES:
        errors.append(_FieldError("hf_hub_filename", f"field 'hf_hub_filename' is required with hf_hub_id and "
                                                     f"format {fmt!r} (the defaults are "
                                                     f"{', '.join(HF_DEFAULT_FILENAMES.values())})"))
    for name in ("filename", "hf_hub_filename"):
        if fmt in FORMATS and values.get(name) and not values[name].endswith("." + fmt):
            errors.append(_FieldError(name, f"field {name!r} = {values[name]!r} does not end in '.{fmt}' "
                                            "(the loader picks safetensors or torch.load by the suffix); make "
                                            "it match 'format'"))
    return errors


def _entry_label(index: int, raw: Any) -> str:
    model = raw.get("model") if isinstance(raw, dict) else None
    tag = raw.get("tag") if isinstance(raw, dict) else None
    return f"weights[{index}] ({model or '?'}.{tag or '?'})"


def _parse_entry(raw: Any, index: int, origin: str) -> tuple[WeightEntry | None, list[str]]:
    """Validate one raw entry; returns the entry (None if invalid) and the problems found, one line each."""
    label = _entry_label(index, raw)
    if not isinstance(raw, dict):
        return None, [f"{label}: is {type(raw).__name__} {raw!r}; accepted: a mapping of the fields "
                      f"{', '.join(ALL_FIELDS)}"]
    problems = []
    unknown = [k for k in raw if k not in ALL_FIELDS]
    for key in unknown:
        close = difflib.get_close_matches(str(key), ALL_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{label}: unknown field {key!r}{hint}; accepted fields: {', '.join(ALL_FIELDS)}")
    for key in REQUIRED_FIELDS:
        if key not in raw:
            problems.append(f"{label}: missing required field {key!r} (required: {', '.join(REQUIRED_FIELDS)}; "
                            "write 'sha256: null' with a sha256_reason when no hash is known)")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _VALIDATORS:
            try:
                values[key] = _VALIDATORS[key](value)
            except _FieldError as e:
                problems.append(f"{label}: {e}")
    problems += [f"{label}: {e}" for e in _check_consistency(values)]
    if problems:
        return None, problems
    return WeightEntry(**values, origin=origin), []


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"weights manifest {str(path)!r} cannot be read: {e.strerror or e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(f"weights manifest {str(path)!r} is not valid YAML: {e}") from e


def read_manifest_file(path: str | os.PathLike) -> list[WeightEntry]:
    """Read and validate one manifest file (a mapping with a top-level ``weights:`` list).

    Raises:
        ManifestError: unreadable file, bad YAML, or any invalid entry; the message names the file, each bad
            entry (index and ``model.tag``), the field and what is accepted.
    """
    path = Path(path)
    data = _load_yaml(path)
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) - {"weights"}:
        extra = sorted(map(str, set(data) - {"weights"})) if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"weights manifest {str(path)!r}: the top level must be a mapping with only the key "
                            f"'weights' (a list of entries); found {extra}")
    raw_entries = data.get("weights") or []
    if not isinstance(raw_entries, list):
        raise ManifestError(f"weights manifest {str(path)!r}: 'weights' must be a list of entries, "
                            f"got {type(raw_entries).__name__}")
    entries, problems, seen = [], [], {}
    for index, raw in enumerate(raw_entries):
        entry, errors = _parse_entry(raw, index, str(path))
        problems += errors
        if entry is None:
            continue
        if entry.ref in seen:
            problems.append(f"{_entry_label(index, raw)}: duplicate model.tag {entry.ref!r}, already at "
                            f"weights[{seen[entry.ref]}]; each model.tag may appear once per file")
            continue
        seen[entry.ref] = index
        entries.append(entry)
    problems += _cache_name_clashes(entries)
    if problems:
        head = f"weights manifest {str(path)!r} has {len(problems)} invalid entr{'y' if len(problems) == 1 else 'ies'}"
        raise ManifestError(head + ":\n  " + "\n  ".join(problems))
    return entries


def _cache_name_clashes(entries: list[WeightEntry]) -> list[str]:
    """Entries that would share a cache file while holding different checkpoints."""
    owner: dict[str, WeightEntry] = {}
    problems = []
    for entry in entries:
        other = owner.setdefault(entry.cache_filename, entry)
        if other is not entry and not (entry.sha256 and entry.sha256 == other.sha256):
            problems.append(f"{entry.ref}: field 'filename' = {entry.cache_filename!r} is also the cache file of "
                            f"{other.ref} (from {other.origin}); distinct checkpoints need distinct file names")
    return problems


def merge_entries(base: list[WeightEntry], overrides: list[WeightEntry]) -> list[WeightEntry]:
    """``base`` with every entry of ``overrides`` replacing the one with its ``model.tag`` in place, or appended."""
    merged = list(base)
    position = {e.ref: i for i, e in enumerate(merged)}
    for entry in overrides:
        if entry.ref in position:
            merged[position[entry.ref]] = entry
        else:
            position[entry.ref] = len(merged)
            merged.append(entry)
    return merged


@dataclass
class Manifest:
    """The merged weights manifest. ``entries`` keeps file order: a model's first entry is its default tag."""
    entries: list[WeightEntry]
    files: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[WeightEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, ref: object) -> bool:
        return any(e.ref == ref for e in self.entries)

    def models(self) -> list[str]:
        """Models that have weights, in manifest order, each once."""
        return list(dict.fromkeys(e.model for e in self.entries))

    def tags(self, model: str) -> list[str]:
        """Tags of ``model`` in manifest order (the first is the default)."""
        return [e.tag for e in self.entries if e.model == model]

    def refs(self) -> list[str]:
        """Every ``model.tag`` in manifest order."""
        return [e.ref for e in self.entries]

    def get(self, model: str, tag: str | None = None) -> WeightEntry:
        """The entry of ``model.tag``; ``tag=None`` gives the model's default (first) entry.

        ``model`` may itself be ``"model.tag"`` when ``tag`` is None.

        Raises:
            ValueError: the model has no weights (names close models) or no such tag (names its tags).
        """
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty model name or 'model.tag', got {model!r}")
        if tag is None and "." in model:
            model, tag = model.split(".", 1)
        candidates = [e for e in self.entries if e.model == model]
        if not candidates:
            close = difflib.get_close_matches(model, self.models(), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; models with weights: {', '.join(self.models()) or 'none'}"
            raise ValueError(f"model {model!r} has no pretrained weights in the weights manifest{hint} "
                             "(add an entry in a file named by ZOO_MANIFEST to use your own)")
        if tag is None:
            return candidates[0]
        for entry in candidates:
            if entry.tag == tag:
                return entry
        raise ValueError(f"model {model!r} has no weights tagged {tag!r}; available tags: "
                         f"{', '.join(e.tag for e in candidates)}")


def packaged_manifest_path() -> Path:
    """The manifest shipped with zoo: ``zoo/weights_manifest.yaml`` in a wheel, else ``<repo>/weights_manifest.yaml``."""
    here = Path(__file__).resolve().parent
    inside = here / "weights_manifest.yaml"
    return inside if inside.is_file() else here.parent / "weights_manifest.yaml"


def manifest_paths() -> list[Path]:
    """The packaged manifest followed by the files of ``ZOO_MANIFEST`` (``os.pathsep``-separated), in merge order.

    Raises:
        ManifestError: a file named by ZOO_MANIFEST does not exist.
    """
    paths = [packaged_manifest_path()]
    for item in filter(None, os.environ.get("ZOO_MANIFEST", "").split(os.pathsep)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise ManifestError(f"ZOO_MANIFEST names {item!r}, which is not a file; set ZOO_MANIFEST to manifest "
                                f"files separated by {os.pathsep!r}")
        paths.append(path)
    return paths


def _stamp(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError:
        return str(path), -1, -1
    return str(path), st.st_mtime_ns, st.st_size


_CACHE: dict[str, Any] = {"key": None, "manifest": None}
_CACHE_LOCK = threading.Lock()


def load_manifest() -> Manifest:
    """The packaged weights manifest merged with the files of ``ZOO_MANIFEST``.

    The parsed result is cached and re-read when ``ZOO_MANIFEST`` or a file's mtime or size changes. A missing
    packaged manifest (a broken install) counts as empty.

    Raises:
        ManifestError: a file is unreadable or has invalid entries.
    """
    paths = manifest_paths()
    key = tuple(_stamp(p) for p in paths)
    with _CACHE_LOCK:
        if _CACHE["key"] == key:
            return _CACHE["manifest"]
    entries: list[WeightEntry] = []
    for path in paths:
        if path.is_file():
            entries = merge_entries(entries, read_manifest_file(path))
    problems = _cache_name_clashes(entries)
    if problems:
        raise ManifestError("the merged weights manifest has clashing cache files:\n  " + "\n  ".join(problems))
    manifest = Manifest(entries, tuple(str(p) for p in paths if p.is_file()))
    with _CACHE_LOCK:
        _CACHE.update(key=key, manifest=manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m zoo.manifest FILE...``: validate manifest files (the merged manifest when none is given)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            manifest = load_manifest()
            print(f"ok: {len(manifest)} entries from {', '.join(manifest.files) or 'no file'}")
        for item in argv:
            print(f"ok: {item}: {len(read_manifest_file(item))} entries")
    except ManifestError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
