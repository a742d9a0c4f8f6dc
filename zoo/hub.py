"""Verified downloads and the weights cache.

:func:`fetch` turns ``model.tag`` into the path of a local file whose sha256 has been checked: it looks the entry up
in the weights manifest (:mod:`zoo.manifest`), and finds the file in the cache or downloads it from the entry's urls
(primary, then mirrors, then its Hugging Face repository). What it guarantees:

* the sha256 is checked after every download and again on every cache hit; a corrupt cached file is reported,
  deleted and downloaded again (offline it is an error instead), never loaded;
* writes are atomic (a ``.part`` file in the cache folder, renamed into place once verified), so a failure never
  leaves a half-written file under the final name and never touches a good cached file;
* an interrupted transfer resumes from its ``.part`` file with an HTTP ``Range`` request (a server that ignores
  the range makes it restart cleanly);
* a file lock per cache file makes N processes (DDP ranks) asking for one file download it once;
* offline (``ZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) no connection is opened: a cache miss fails at once with the
  path where to put the file.

Environment: ``ZOO_CACHE`` (cache folder), ``ZOO_MANIFEST`` (extra manifests), ``ZOO_OFFLINE``/``HF_HUB_OFFLINE``,
``ZOO_HUB_TIMEOUT`` (seconds a connection may stall, default 30), ``HF_HOME``/``HF_HUB_CACHE``/``HF_ENDPOINT`` for
Hugging Face sources. All are read at call time.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from zoo.manifest import (Manifest, ManifestError, WeightEntry, load_manifest, manifest_paths,
                          packaged_manifest_path, parse_hf_url, read_manifest_file)

__all__ = ["fetch", "download_file", "verify_file", "sha256_of", "cache_dir", "is_offline", "HubError",
           "ChecksumError", "OfflineError", "DownloadError", "HubWarning", "load_manifest", "Manifest",
           "WeightEntry", "ManifestError", "manifest_paths", "packaged_manifest_path", "read_manifest_file",
           "entry_path"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_DEFAULT_TIMEOUT = 30.0
_MAX_ATTEMPTS_PER_URL = 5  # resumed attempts on one url, each of which must make progress
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_TRUE = {"1", "true", "yes", "on"}
_WARNED_UNVERIFIED: set[str] = set()


class HubError(RuntimeError):
    """A weights file could not be provided (base class of the hub's errors)."""


class ChecksumError(HubError):
    """A file's sha256 (or size) is not what the manifest says."""


class OfflineError(HubError):
    """Offline mode is on and the file is not in the cache."""


class DownloadError(HubError):
    """Every source of a file failed (the message lists each failure)."""


class HubWarning(UserWarning):
    """A cached file was corrupt and is re-downloaded, or a file cannot be verified (no sha256 known)."""


class _Interrupted(Exception):
    """A transfer stopped early; ``progressed`` says whether it wrote new bytes (so a resume may help)."""

    def __init__(self, message: str, progressed: bool, discard_part: bool = False):
        super().__init__(message)
        self.progressed = progressed
        self.discard_part = discard_part


# ---------------------------------------------------------------------------------------------------------------
# Small public helpers

def is_offline() -> bool:
    """True when ``ZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on (read at call time)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("ZOO_OFFLINE", "HF_HUB_OFFLINE"))


def _offline_variable() -> str:
    return next(v for v in ("ZOO_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").strip().lower() in _TRUE)


def cache_dir() -> Path:
    """The weights cache folder: ``$ZOO_CACHE``, else ``platformdirs.user_cache_dir("zoo")/weights``."""
    env = os.environ.get("ZOO_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("zoo")) / "weights"


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, as 64 lowercase hex characters."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str) -> bool:
    """True when ``path`` is a file whose sha256 is ``sha256`` (64 hex characters, any case)."""
    _check_sha256_arg(sha256, nullable=False)
    return Path(path).is_file() and sha256_of(path) == sha256.lower()


def entry_path(entry: WeightEntry, root: str | os.PathLike | None = None) -> Path:
    """Where the cache keeps ``entry``'s file (it may not exist yet)."""
    return Path(root if root is not None else cache_dir()) / entry.cache_filename


def _check_sha256_arg(sha256: object, nullable: bool = True) -> None:
    if sha256 is None and nullable:
        return
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise ValueError(f"sha256={sha256!r} is invalid; accepted: 64 hexadecimal characters"
                         + (" or None" if nullable else ""))


def _timeout() -> float:
    raw = os.environ.get("ZOO_HUB_TIMEOUT", "")
    if not raw:
        return _DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"ZOO_HUB_TIMEOUT={raw!r} is invalid; accepted: a positive number of seconds")
    return value


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


# ---------------------------------------------------------------------------------------------------------------
# Cache files: the final file, its .part, the .part's origin, the sha256 sidecar and the lock

def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _part_meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def _sidecar_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _lock_path(dest: Path) -> Path:
    # Locks live apart so that a listing of the cache shows only weights (lock files are never deleted: deleting
    # one while another process waits on it would let two processes in).
    return dest.parent / ".locks" / (dest.name + ".lock")


def _read_sidecar(dest: Path) -> str | None:
    try:
        text = _sidecar_path(dest).read_text().split()
    except OSError:
        return None
    return text[0].lower() if text and _SHA256_RE.match(text[0]) else None


def _write_sidecar(dest: Path, digest: str) -> None:
    """Record a file's hash as ``<file>.sha256`` (sha256sum format), atomically."""
    side = _sidecar_path(dest)
    tmp = side.with_name(f"{side.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {dest.name}\n")
    os.replace(tmp, side)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _ensure_dir(folder: Path) -> None:
    try:
        (folder / ".locks").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HubError(f"the weights cache folder {str(folder)!r} cannot be created or written ({e.strerror or e}); "
                       "set ZOO_CACHE to a writable folder") from e


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold the inter-process lock of one cache file."""
    import filelock

    lock = filelock.FileLock(str(_lock_path(dest)))
    try:
        lock.acquire(timeout=0.5)
    except filelock.Timeout:
        logger.info("waiting for another process to finish %s", dest)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _expected_hash(dest: Path, sha256: str | None) -> str | None:
    return sha256 if sha256 else _read_sidecar(dest)


def _cached_ok(dest: Path, sha256: str | None) -> bool:
    """Lock-free check of a cache hit whose hash is known (so a read-only shared cache works)."""
    expected = _expected_hash(dest, sha256)
    return expected is not None and dest.is_file() and sha256_of(dest) == expected


def _check_cached(dest: Path, sha256: str | None, label: str) -> bool:
    """Under the lock: True if ``dest`` is good; a corrupt file is deleted (online) or an error (offline)."""
    expected = _expected_hash(dest, sha256)
    actual = sha256_of(dest)
    if expected is None:
        # A file with no known hash and no sidecar was put there by hand: trust it, and record its hash so that
        # later corruption is caught.
        _write_sidecar(dest, actual)
        return True
    if actual == expected:
        return True
    if is_offline():
        raise ChecksumError(
            f"the cached file {str(dest)!r} for {label} is corrupt (sha256 {actual}, expected {expected}) and "
            f"{_offline_variable()} is set, so it cannot be downloaded again; put a good copy at that path, or "
            "unset ZOO_OFFLINE and HF_HUB_OFFLINE to download it.")
    warnings.warn(f"the cached file {str(dest)!r} for {label} is corrupt (sha256 {actual}, expected {expected}); "
                  "deleting it and downloading it again", HubWarning, stacklevel=4)
    _remove(dest, _sidecar_path(dest))
    return False


def _warn_unverified(label: str) -> None:
    if label in _WARNED_UNVERIFIED:
        return
    _WARNED_UNVERIFIED.add(label)
    warnings.warn(f"{label} has no sha256 in the weights manifest, so its download cannot be verified; its hash "
                  "is recorded at first download so that later corruption of the cached file is still caught",
                  HubWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------------------------------
# Putting a verified file in place

def _finalize(tmp: Path, dest: Path, sha256: str | None, actual: str, nbytes: int, size: int | None,
              source: str) -> None:
    """Check size and hash of a finished temporary file, then rename it onto ``dest`` (atomic)."""
    if size is not None and nbytes != size:
        _remove(tmp)
        raise ChecksumError(f"{source} gave {nbytes} bytes, the manifest says {size}")
    if sha256 and actual != sha256:
        _remove(tmp)
        raise ChecksumError(f"{source} gave a file with sha256 {actual}, expected {sha256}")
    if sha256:
        _remove(_sidecar_path(dest))  # a stale sidecar must not outlive a hash-checked file
    else:
        _write_sidecar(dest, actual)
    os.replace(tmp, dest)


def _place_local_file(src: Path, dest: Path, sha256: str | None, size: int | None, source: str,
                      link: bool) -> None:
    """Copy (or hard-link, sharing the bytes) a local file into the cache, verified."""
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        if link:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src, tmp)
        else:
            shutil.copyfile(src, tmp)
    except OSError as e:
        _remove(tmp)
        raise DownloadError(f"{source}: cannot copy {str(src)!r}: {e.strerror or e}") from e
    _finalize(tmp, dest, sha256, sha256_of(tmp), tmp.stat().st_size, size, source)


def _from_file_url(url: str, dest: Path, sha256: str | None, size: int | None) -> None:
    src = Path(urllib.request.url2pathname(urlsplit(url).path))
    if not src.is_file():
        raise DownloadError(f"{url}: no such file")
    _place_local_file(src, dest, sha256, size, url, link=False)


def _hf_cache_dir() -> str | None:
    """The Hugging Face cache folder from the environment at call time (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _from_hf(url: str, dest: Path, sha256: str | None, size: int | None) -> None:
    repo_id, revision, filename = parse_hf_url(url)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise DownloadError(f"{url}: huggingface_hub is not installed (pip install huggingface_hub)") from e
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=_hf_cache_dir(),
                               local_files_only=is_offline())
    except Exception as e:  # huggingface_hub raises many types (network, auth, missing entry): report, next source
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
        raise DownloadError(f"{url}: {type(e).__name__}: {first}") from e
    # HF snapshot files are links to immutable blobs: a hard link to the blob costs no disk.
    _place_local_file(Path(path).resolve(), dest, sha256, size, url, link=True)


# ---------------------------------------------------------------------------------------------------------------
# HTTP with resume

def _read_part_meta(dest: Path) -> dict:
    try:
        return json.loads(_part_meta_path(dest).read_text())
    except (OSError, ValueError):
        return {}


def _resume_offset(dest: Path, url: str) -> int:
    """Bytes of ``.part`` that may be resumed from ``url`` (only a part that came from the same url)."""
    part = _part_path(dest)
    if not part.is_file():
        return 0
    if _read_part_meta(dest).get("url") != url:
        _remove(part, _part_meta_path(dest))
        return 0
    return part.stat().st_size


def _validator(meta: dict) -> str | None:
    """An If-Range value: a strong ETag, else Last-Modified (so a changed file restarts instead of mixing)."""
    etag = meta.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return meta.get("last_modified")


def _open(url: str, offset: int, meta: dict):
    headers = {"User-Agent": "zoo-hub/0.1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if _validator(meta):
            headers["If-Range"] = _validator(meta)
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=_timeout())
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # the .part is as long as the file or longer (stale): restart clean
            raise _Interrupted("HTTP 416 on a resumed request", progressed=True, discard_part=True) from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: connection failed ({reason})") from e


_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _response_span(response, offset: int) -> tuple[int, int | None]:
    """(first byte, total size or None) of a response; 200 restarts at 0 even when a range was asked."""
    if response.status == 206:
        match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise _Interrupted(f"server answered a range other than bytes={offset}-", progressed=True,
                              discard_part=True)
        total = match.group(3)
        return offset, None if total == "*" else int(total)
    if response.status != 200:
        raise DownloadError(f"{response.url}: unexpected HTTP status {response.status}")
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _hash_prefix(path: Path, nbytes: int):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = nbytes
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest


def _http_attempt(url: str, dest: Path, size: int | None, progress: bool, label: str) -> tuple[str, int]:
    """One request: resume (or restart) ``.part`` and stream into it. Returns (sha256, bytes) when complete."""
    part, meta_path = _part_path(dest), _part_meta_path(dest)
    offset = _resume_offset(dest, url)
    meta = _read_part_meta(dest) if offset else {}
    response = _open(url, offset, meta)
    with response:
        start, total = _response_span(response, offset)
        if start == 0:
            meta = {"url": url, "etag": response.headers.get("ETag"),
                    "last_modified": response.headers.get("Last-Modified")}
            meta_path.write_text(json.dumps(meta))
        digest = _hash_prefix(part, start) if start else hashlib.sha256()
        received = start
        from tqdm.auto import tqdm

        with open(part, "ab" if start else "wb") as f, \
                tqdm(total=total or size, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=label, disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _Interrupted(f"transfer broke after {received} bytes ({e})", received > start) from e
                if not chunk:
                    break
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes", received > start)
    return digest.hexdigest(), received


def _from_http(url: str, dest: Path, sha256: str | None, size: int | None, progress: bool, label: str) -> None:
    """Download ``url`` into the cache, resuming a broken transfer while each attempt makes progress."""
    part, meta = _part_path(dest), _part_meta_path(dest)
    for attempt in range(1, _MAX_ATTEMPTS_PER_URL + 1):
        try:
            actual, nbytes = _http_attempt(url, dest, size, progress, label)
        except _Interrupted as e:
            if e.discard_part:
                _remove(part, meta)
            if not e.progressed or attempt == _MAX_ATTEMPTS_PER_URL:
                kept = f"; the partial file {str(part)!r} is kept and the next try resumes it" if part.exists() else ""
                raise DownloadError(f"{url}: {e}{kept}") from e
            logger.info("resuming %s: %s", url, e)
            continue
        _remove(meta)  # the .part is now either renamed into place or deleted as wrong
        _finalize(part, dest, sha256, actual, nbytes, size, url)
        return


# ---------------------------------------------------------------------------------------------------------------
# Sources in order, offline rules, and the one-paragraph errors

def _is_local_source(url: str) -> bool:
    return urlsplit(url).scheme in ("hf", "file")


def _fetch_source(url: str, dest: Path, sha256: str | None, size: int | None, progress: bool, label: str) -> None:
    scheme = urlsplit(url).scheme
    if scheme == "hf":
        _from_hf(url, dest, sha256, size)
    elif scheme == "file":
        _from_file_url(url, dest, sha256, size)
    elif scheme in ("http", "https"):
        _from_http(url, dest, sha256, size, progress, label)
    else:
        raise DownloadError(f"{url}: unsupported url scheme {scheme!r} (accepted: https, http, file, hf)")


def _where_to_get(sources: list[str], sha256: str | None) -> str:
    hint = f" from {sources[0]}" if sources else ""
    hf = [s for s in sources if s.startswith("hf://")]
    if hf:
        repo_id, revision, filename = parse_hf_url(hf[0])
        rev = f" --revision {revision}" if revision else ""
        hint += f" (or fill the Hugging Face cache with `hf download {repo_id} {filename}{rev}`)"
    check = f" with sha256 {sha256}" if sha256 else ""
    return f"download it{hint} on a machine that is online and put the file{check}"


def _offline_error(label: str, dest: Path, sources: list[str], sha256: str | None, tried: list[str]) -> OfflineError:
    looked = f" (also looked in the local {', '.join(tried)})" if tried else ""
    return OfflineError(
        f"{label} is not in the weights cache and {_offline_variable()} is set, so nothing is downloaded{looked}; "
        f"{_where_to_get(sources, sha256)} at {str(dest)!r}, or unset ZOO_OFFLINE and HF_HUB_OFFLINE.")


def _all_failed(label: str, dest: Path, sources: list[str], sha256: str | None,
                failures: list[HubError]) -> HubError:
    if not failures:
        return DownloadError(f"{label} has no source to download from (no urls and no hf_hub_id); "
                             f"put the file at {str(dest)!r}.")
    listed = "; ".join(f"({i}) {e}" for i, e in enumerate(failures, 1))
    all_checksum = all(isinstance(e, ChecksumError) for e in failures)
    cls = ChecksumError if all_checksum else DownloadError
    what = "every source gave a file that fails verification" if all_checksum else "every source failed"
    return cls(f"could not fetch {label} into {str(dest)!r}: {what}: {listed}. No file was put at that path. "
               f"Check the network, proxy or mirrors (add one through ZOO_MANIFEST), or "
               f"{_where_to_get(sources, sha256)} at that path.")


def _download_sources(dest: Path, sources: list[str], sha256: str | None, size: int | None, progress: bool,
                      label: str) -> Path:
    offline = is_offline()
    usable = [s for s in sources if _is_local_source(s)] if offline else sources
    failures: list[HubError] = []
    for url in usable:
        try:
            _fetch_source(url, dest, sha256, size, progress, label)
            return dest
        except HubError as e:
            logger.info("%s: %s failed: %s", label, url, e)
            failures.append(e)
    if offline:
        raise _offline_error(label, dest, sources, sha256, [urlsplit(s).scheme + " source" for s in usable])
    raise _all_failed(label, dest, sources, sha256, failures)


def _provide(dest: Path, sources: list[str], sha256: str | None, size: int | None, progress: bool | None,
             label: str) -> Path:
    """The verified file at ``dest``: a cache hit, or a download under the file's lock."""
    if sha256 is None:
        _warn_unverified(label)
    if _cached_ok(dest, sha256):
        return dest
    if is_offline() and not dest.exists() and not any(_is_local_source(s) for s in sources):
        raise _offline_error(label, dest, sources, sha256, [])  # at once: no lock, no folder, no connection
    _ensure_dir(dest.parent)
    with _locked(dest):
        # Another process may have finished the download while this one waited for the lock.
        if dest.is_file() and _check_cached(dest, sha256, label):
            return dest
        return _download_sources(dest, sources, sha256, size, _show_progress(progress), label)


def _hf_source(hf_hub_id: str, filename: str) -> str:
    return f"hf://{hf_hub_id}/{filename}"


def download_file(urls: list[str], dest: str | os.PathLike, sha256: str | None, *, progress: bool | None = None,
                  hf_hub_id: str | None = None, hf_hub_filename: str | None = None,
                  size: int | None = None) -> Path:
    """Provide a verified file at ``dest``, downloading it if it is missing or corrupt.

    Args:
        urls: sources tried in order (``https``, ``http``, ``file`` or ``hf://org/repo[@rev]/filename``); a
            failure or a wrong hash on one moves to the next.
        dest: final path of the file; its folder holds the ``.part`` file and the ``.locks`` folder.
        sha256: expected hash (64 hex characters), or None: then the file cannot be verified (a warning says
            so) and its hash is recorded in ``<dest>.sha256`` to catch later corruption.
        progress: show a progress bar; None shows one when stderr is a terminal.
        hf_hub_id: ``org/repo[@revision]`` tried after ``urls``, with ``hf_hub_filename`` (default
            ``model.safetensors``, then ``pytorch_model.bin``).
        size: expected size in bytes, checked before the hash when given.

    Returns:
        ``dest`` as a Path, verified.

    Raises:
        ChecksumError: every source gave a file with the wrong hash, or offline with a corrupt cached file.
        OfflineError: offline and the file is neither cached nor in a local (Hugging Face or file://) source.
        DownloadError: every source failed; the message lists each failure.
    """
    if isinstance(urls, str) or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"urls={urls!r} is invalid; accepted: a list of url strings")
    _check_sha256_arg(sha256)
    sources = list(urls)
    if hf_hub_id:
        names = [hf_hub_filename] if hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        sources += [_hf_source(hf_hub_id, name) for name in names]
    dest = Path(dest)
    return _provide(dest, sources, sha256.lower() if sha256 else None, size, progress, dest.name)


def fetch(ref: str, *, cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> Path:
    """The verified local file of the manifest entry ``ref`` (``"model.tag"``, or ``"model"`` for its default tag).

    Downloads it into the cache (``cache_dir``, else :func:`zoo.hub.cache_dir`) if needed; see the module
    docstring for what is guaranteed.

    Raises:
        ValueError: ``ref`` has no entry in the weights manifest (the message names what exists).
        ChecksumError, OfflineError, DownloadError: as :func:`download_file`.
    """
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"ref={ref!r} is invalid; accepted: 'model.tag' or 'model'")
    entry = load_manifest().get(ref)
    dest = entry_path(entry, cache_dir)
    return _provide(dest, entry.sources, entry.sha256, entry.size, progress, entry.ref)
