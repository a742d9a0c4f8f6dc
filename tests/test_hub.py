"""zoo.hub against a real HTTP server on 127.0.0.1: hashes, cache, resume, mirrors, locks, offline, HF cache."""
import hashlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from zoo import hub
from zoo.convert import read_checkpoint

PIECE = 16 * 1024


class FileServer:
    """Serves ``files`` by path. ``script[path]`` is a queue of actions, one per request: an int status to send
    instead, or ``("cut", n)`` to announce the full length but send only n bytes and close. ``honour_range`` and
    ``delay`` (seconds per 16 KiB) shape the rest; ``log`` records ``(path, Range, If-Range)`` of each request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.script: dict[str, list] = {}
        self.honour_range = True
        self.delay = 0.0
        self.log: list[tuple[str, str | None, str | None]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def requests_for(self, path: str) -> list[tuple[str, str | None, str | None]]:
        return [r for r in self.log if r[0] == path]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        state: FileServer = self.server.state
        state.log.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        queue = state.script.get(self.path)
        action = queue.pop(0) if queue else "ok"
        if isinstance(action, int):
            self.send_error(action)
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = self._range_start(state, len(data))
        if start is None:
            return
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if isinstance(action, tuple) and action[0] == "cut":
            self.wfile.write(body[:action[1]])
            self.wfile.flush()
            self.close_connection = True
            return
        for i in range(0, len(body), PIECE):
            self.wfile.write(body[i:i + PIECE])
            if state.delay:
                time.sleep(state.delay)

    def _range_start(self, state: FileServer, length: int) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if not (match and state.honour_range):
            self.send_response(200)
            return 0
        start = int(match.group(1))
        if start >= length:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{length}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{length - 1}/{length}")
        return start


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def online_env(tmp_path, monkeypatch):
    """Online, a private cache, short timeouts, and the once-only warnings reset."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ZOO_OFFLINE", raising=False)
    monkeypatch.delenv("ZOO_MANIFEST", raising=False)
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ZOO_HUB_TIMEOUT", "10")
    monkeypatch.setattr(hub, "_WARNED_UNVERIFIED", set())


def checkpoint_bytes(seed: int = 0, n: int = 60_000) -> bytes:
    """A real torch checkpoint ({"model": state dict}), about 240 KB."""
    gen = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.randn(n, generator=gen), "b": torch.arange(7.0)}}, buf)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def use_manifest(tmp_path, monkeypatch, *entries):
    path = tmp_path / "extra_manifest.yaml"
    full = [dict(dict(model="tinynet", tag="in1k", format="pth", license="MIT"), **e) for e in entries]
    path.write_text(yaml.safe_dump({"weights": full}))
    monkeypatch.setenv("ZOO_MANIFEST", str(path))


def cache_listing() -> list[str]:
    """Files in the cache other than the lock folder."""
    root = hub.cache_dir()
    return sorted(p.name for p in root.iterdir() if p.name != ".locks") if root.exists() else []


@pytest.fixture
def tiny(server, tmp_path, monkeypatch):
    """One good checkpoint served at /tiny.pth and a manifest entry tinynet.in1k for it."""
    data = checkpoint_bytes()
    server.files["/tiny.pth"] = data
    use_manifest(tmp_path, monkeypatch, dict(urls=[server.url("/tiny.pth")], sha256=sha(data), size=len(data)))
    return data


# ---------------------------------------------------------------------------------------------------------------

def test_good_file_is_verified_cached_and_loaded_without_second_request(server, tiny):
    path = hub.fetch("tinynet.in1k", progress=False)
    assert path.read_bytes() == tiny and path.parent == hub.cache_dir()
    assert path.name == f"tinynet.in1k-{sha(tiny)[:12]}.pth"
    assert cache_listing() == [path.name]  # no .part, no .part.json left
    assert len(server.log) == 1
    assert hub.fetch("tinynet", progress=False) == path  # default tag
    assert len(server.log) == 1
    state = read_checkpoint(path)["model"]
    assert torch.equal(state["b"], torch.arange(7.0))


def test_cache_dir_argument_overrides_zoo_cache(server, tiny, tmp_path):
    path = hub.fetch("tinynet.in1k", cache_dir=tmp_path / "elsewhere", progress=False)
    assert path.parent == tmp_path / "elsewhere" and path.read_bytes() == tiny
    assert cache_listing() == []


def test_wrong_hash_raises_and_leaves_nothing(server, tmp_path, monkeypatch):
    server.files["/tiny.pth"] = checkpoint_bytes()
    use_manifest(tmp_path, monkeypatch, dict(urls=[server.url("/tiny.pth")], sha256="0" * 64))
    with pytest.raises(hub.ChecksumError) as info:
        hub.fetch("tinynet.in1k", progress=False)
    message = str(info.value)
    assert "tinynet.in1k" in message and server.url("/tiny.pth") in message and "0" * 64 in message
    assert cache_listing() == []


def test_wrong_hash_makes_a_python_entry_point_exit_nonzero(server, tmp_path, monkeypatch):
    server.files["/tiny.pth"] = checkpoint_bytes()
    use_manifest(tmp_path, monkeypatch, dict(urls=[server.url("/tiny.pth")], sha256="1" * 64))
    code = "import zoo.hub, sys; zoo.hub.fetch('tinynet.in1k', progress=False)"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "ChecksumError" in proc.stderr and "tinynet.in1k" in proc.stderr
    assert len(server.log) == 1 and cache_listing() == []


def test_cut_transfer_is_resumed_with_range(server, tiny):
    server.script["/tiny.pth"] = [("cut", 100_000)]
    path = hub.fetch("tinynet.in1k", progress=False)
    assert path.read_bytes() == tiny
    first, second = server.requests_for("/tiny.pth")
    assert first[1] is None
    assert second[1] == "bytes=100000-" and second[2] == '"v1"'  # If-Range guards against a changed file


def test_partial_file_survives_a_failed_call_and_is_resumed(server, tiny):
    server.script["/tiny.pth"] = [("cut", 70_000), 503]
    with pytest.raises(hub.DownloadError, match="HTTP 503"):
        hub.fetch("tinynet.in1k", progress=False)
    part = next(hub.cache_dir().glob("*.part"))
    assert part.read_bytes() == tiny[:70_000]
    assert not any(name.endswith(".pth") for name in cache_listing())
    path = hub.fetch("tinynet.in1k", progress=False)
    assert path.read_bytes() == tiny and not part.exists()
    assert server.log[-1][1] == "bytes=70000-"


def test_server_ignoring_range_restarts_cleanly(server, tiny):
    server.honour_range = False
    server.script["/tiny.pth"] = [("cut", 50_000)]
    path = hub.fetch("tinynet.in1k", progress=False)
    assert path.read_bytes() == tiny  # not the first 50 000 bytes twice
    assert [r[1] for r in server.log] == [None, "bytes=50000-"]


def test_stale_longer_partial_is_discarded_on_416(server, tiny):
    dest = hub.cache_dir() / f"tinynet.in1k-{sha(tiny)[:12]}.pth"
    dest.parent.mkdir(parents=True)
    Path(str(dest) + ".part").write_bytes(tiny + b"junk")
    Path(str(dest) + ".part.json").write_text('{"url": "%s"}' % server.url("/tiny.pth"))
    assert hub.fetch("tinynet.in1k", progress=False).read_bytes() == tiny
    assert [r[1] for r in server.log] == [f"bytes={len(tiny) + 4}-", None]


def test_5xx_on_first_mirror_then_second(server, tmp_path, monkeypatch):
    data = checkpoint_bytes(1)
    server.files["/a.pth"] = server.files["/b.pth"] = data
    server.script["/a.pth"] = [503]
    use_manifest(tmp_path, monkeypatch, dict(urls=[server.url("/a.pth"), server.url("/b.pth")], sha256=sha(data)))
    assert hub.fetch("tinynet.in1k", progress=False).read_bytes() == data
    assert [r[0] for r in server.log] == ["/a.pth", "/b.pth"]


def test_wrong_hash_on_first_mirror_then_second(server, tmp_path, monkeypatch):
    data = checkpoint_bytes(1)
    server.files["/a.pth"], server.files["/b.pth"] = checkpoint_bytes(2), data
    use_manifest(tmp_path, monkeypatch, dict(urls=[server.url("/a.pth"), server.url("/b.pth")], sha256=sha(data)))
    assert hub.fetch("tinynet.in1k", progress=False).read_bytes() == data
    assert [r[0] for r in server.log] == ["/a.pth", "/b.pth"]


def test_all_mirrors_failing_are_all_reported(server, tmp_path, monkeypatch):
    server.files["/a.pth"] = checkpoint_bytes()
    server.script["/a.pth"] = [500]
    dead = FileServer()
    dead_url = dead.url("/x.pth")
    dead.stop()  # a closed port: connection refused
    urls = [server.url("/a.pth"), server.url("/missing.pth"), dead_url]
    use_manifest(tmp_path, monkeypatch, dict(urls=urls, sha256="2" * 64))
    with pytest.raises(hub.DownloadError) as info:
        hub.fetch("tinynet.in1k", progress=False)
    message = str(info.value)
    assert "HTTP 500" in message and "HTTP 404" in message and "connection failed" in message
    assert all(url in message for url in urls)
    assert cache_listing() == []


def _fetch_in_child(barrier, results):
    barrier.wait()
    try:
        path = hub.fetch("tinynet.in1k", progress=False)
        results.put((str(path), hub.sha256_of(path)))
    except Exception as e:  # report instead of dying silently, so the test fails with the reason
        results.put(("error", repr(e)))


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
def test_four_processes_download_once(server, tiny):
    server.delay = 0.02  # ~0.3 s transfer, so that all four ask while it runs
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(server.requests_for("/tiny.pth")) == 1
    assert {g[1] for g in got} == {sha(tiny)} and len({g[0] for g in got}) == 1


@pytest.mark.parametrize("variable", ["ZOO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_hit_makes_no_request(server, tiny, monkeypatch, variable):
    path = hub.fetch("tinynet.in1k", progress=False)
    server.stop()
    monkeypatch.setenv(variable, "1")
    assert hub.is_offline()
    assert hub.fetch("tinynet.in1k", progress=False) == path
    assert len(server.log) == 1


def test_offline_miss_fails_at_once_naming_the_path(server, tiny, monkeypatch):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(hub.OfflineError) as info:
        hub.fetch("tinynet.in1k", progress=False)
    assert time.perf_counter() - start < 2.0
    expected = hub.cache_dir() / f"tinynet.in1k-{sha(tiny)[:12]}.pth"
    message = str(info.value)
    assert str(expected) in message and "ZOO_OFFLINE" in message and server.url("/tiny.pth") in message
    assert sha(tiny) in message and server.log == []
    assert not hub.cache_dir().exists()  # nothing created either


def test_corrupt_cached_file_is_detected_and_redownloaded(server, tiny):
    path = hub.fetch("tinynet.in1k", progress=False)
    path.write_bytes(tiny[:-10] + b"0123456789")
    with pytest.warns(hub.HubWarning, match="corrupt"):
        again = hub.fetch("tinynet.in1k", progress=False)
    assert again == path and path.read_bytes() == tiny
    assert len(server.log) == 2


def test_corrupt_cached_file_offline_is_an_error(server, tiny, monkeypatch):
    path = hub.fetch("tinynet.in1k", progress=False)
    path.write_bytes(b"garbage")
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(hub.ChecksumError, match="corrupt.*cannot be downloaded again"):
        hub.fetch("tinynet.in1k", progress=False)
    assert len(server.log) == 1 and path.read_bytes() == b"garbage"


def test_entry_without_hash_warns_once_and_guards_cache_with_sidecar(server, tmp_path, monkeypatch):
    data = checkpoint_bytes(3)
    server.files["/nohash.pth"] = data
    use_manifest(tmp_path, monkeypatch, dict(urls=[server.url("/nohash.pth")], sha256=None,
                                             sha256_reason="authors publish none"))
    with pytest.warns(hub.HubWarning, match="cannot be verified"):
        path = hub.fetch("tinynet.in1k", progress=False)
    assert path.name == "tinynet.in1k.pth"
    assert Path(str(path) + ".sha256").read_text().split() == [sha(data), path.name]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second "cannot be verified" warning, and the hit is clean
        assert hub.fetch("tinynet.in1k", progress=False) == path
    path.write_bytes(b"x" + data[1:])
    with pytest.warns(hub.HubWarning, match="corrupt"):
        hub.fetch("tinynet.in1k", progress=False)
    assert path.read_bytes() == data and len(server.log) == 2


def _seed_hf_cache(hf_home: Path, repo_id: str, filename: str, data: bytes) -> None:
    commit = "c" * 40
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(data)


def _safetensors_bytes(tmp_path) -> bytes:
    from safetensors.torch import save_file

    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes()


@pytest.mark.parametrize("form", ["hf_hub_id", "hf_url"])
def test_hf_source_offline_from_preseeded_cache(tmp_path, monkeypatch, form):
    data = _safetensors_bytes(tmp_path)
    _seed_hf_cache(tmp_path / "hf", "org/tinyrepo", "model.safetensors", data)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = (dict(urls=[], hf_hub_id="org/tinyrepo") if form == "hf_hub_id"
              else dict(urls=["hf://org/tinyrepo/model.safetensors"]))
    use_manifest(tmp_path, monkeypatch, dict(source, sha256=sha(data), format="safetensors"))
    path = hub.fetch("tinynet.in1k", progress=False)
    assert path.parent == hub.cache_dir() and path.read_bytes() == data
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(12.0).reshape(3, 4))


def test_hf_source_offline_miss_says_how_to_fill_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    use_manifest(tmp_path, monkeypatch, dict(urls=[], hf_hub_id="org/absent", sha256="3" * 64,
                                             format="safetensors"))
    with pytest.raises(hub.OfflineError) as info:
        hub.fetch("tinynet.in1k", progress=False)
    message = str(info.value)
    assert "hf download org/absent model.safetensors" in message and "HF_HUB_OFFLINE" in message
    assert str(hub.cache_dir()) in message


def test_download_file_from_file_url_and_argument_checks(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello weights")
    dest = tmp_path / "out" / "x.bin"
    got = hub.download_file([src.as_uri()], dest, sha(b"hello weights"), progress=False)
    assert got == dest and dest.read_bytes() == b"hello weights"
    with pytest.raises(ValueError, match="urls="):
        hub.download_file(src.as_uri(), dest, None)
    with pytest.raises(ValueError, match="sha256='abc'"):
        hub.download_file([src.as_uri()], dest, "abc")
    with pytest.raises(ValueError, match="ref="):
        hub.fetch("")


def test_progress_bar_is_shown_when_asked(server, tiny, capsys):
    hub.fetch("tinynet.in1k", progress=True)
    assert "tinynet.in1k" in capsys.readouterr().err


def test_verify_file_sha256_of_and_env_helpers(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    assert hub.sha256_of(path) == sha(b"abc" * 1000)
    assert hub.verify_file(path, sha(b"abc" * 1000).upper())
    assert not hub.verify_file(path, "0" * 64) and not hub.verify_file(tmp_path / "none", "0" * 64)
    monkeypatch.delenv("ZOO_CACHE")
    assert hub.cache_dir().name == "weights" and "zoo" in str(hub.cache_dir())
    monkeypatch.setenv("ZOO_OFFLINE", "0")
    assert not hub.is_offline()
    monkeypatch.setenv("ZOO_OFFLINE", "True")
    assert hub.is_offline()


def test_unknown_ref_names_what_exists(tiny):
    with pytest.raises(ValueError, match="no weights tagged 'in22k'; available tags: in1k"):
        hub.fetch("tinynet.in22k")
