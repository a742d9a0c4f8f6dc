"""The weights manifest: schema validation, ZOO_MANIFEST merging, lookup by model.tag."""
import json
import os
import textwrap

import pytest
import yaml

from zoo import manifest as zm

SHA_A = "a" * 64
SHA_B = "b" * 64


def entry(**over):
    """A valid raw entry, with fields replaced (a value of ... removes the field)."""
    base = dict(model="tinynet", tag="in1k", urls=["https://example.org/tiny.pth"], sha256=SHA_A, format="pth",
                license="MIT", paper="Tiny (2024)", metrics={"top1": 50.0}, wrapping="model", converter="tiny")
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def write_manifest(path, entries):
    path.write_text(yaml.safe_dump({"weights": entries}, sort_keys=False))
    return path


def test_packaged_manifest_is_valid_and_found():
    path = zm.packaged_manifest_path()
    assert path.name == "weights_manifest.yaml" and path.is_file()
    entries = zm.read_manifest_file(path)
    assert all(isinstance(e, zm.WeightEntry) for e in entries)
    refs = [e.ref for e in entries]
    assert len(refs) == len(set(refs))


def test_valid_entry_is_normalised(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", [
        entry(sha256=SHA_A.upper(), size=1234),
        entry(tag="hf", urls=[], sha256=None, sha256_reason="authors publish none", format="safetensors",
              hf_hub_id="org/tiny@v1", metrics=None),
    ])
    first, second = zm.read_manifest_file(path)
    assert first.ref == "tinynet.in1k" and first.sha256 == SHA_A and first.size == 1234
    assert first.cache_filename == f"tinynet.in1k-{SHA_A[:12]}.pth"
    assert second.metrics == {} and second.cache_filename == "tinynet.hf.safetensors"
    assert second.sources == ["hf://org/tiny@v1/model.safetensors"]
    summary = first.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert set(summary) >= {"model", "tag", "urls", "sha256", "size", "format", "license", "metrics", "paper"}
    assert summary["metrics"] == {"top1": 50.0}


@pytest.mark.parametrize("bad, field, accepted", [
    (entry(colour="red"), "'colour'", "accepted fields"),
    (entry(sha255=SHA_A, sha256=...), "'sha256'", "did you mean 'sha256'"),
    (entry(format=...), "'format'", "missing required field"),
    (entry(sha256="abc123"), "'sha256'", "64 hexadecimal"),
    (entry(sha256=None), "'sha256_reason'", "why no hash is known"),
    (entry(urls=["ftp://example.org/x.pth"]), "'urls'", "accepted schemes"),
    (entry(urls="https://example.org/x.pth"), "'urls'", "a list of urls"),
    (entry(urls=[]), "'urls'", "hf_hub_id"),
    (entry(urls=["hf://only-org/file.pth"]), "'urls'", "hf://org/repo"),
    (entry(format="zip"), "'format'", "safetensors"),
    (entry(size=-1), "'size'", "non-negative integer"),
    (entry(size=True), "'size'", "non-negative integer"),
    (entry(metrics=[1, 2]), "'metrics'", "a mapping"),
    (entry(filename="../evil.pth"), "'filename'", "plain file name"),
    (entry(filename="tiny.safetensors"), "'filename'", "'.pth'"),
    (entry(hf_hub_filename="model.pth"), "'hf_hub_filename'", "hf_hub_id"),
    (entry(hf_hub_id="no-slash"), "'hf_hub_id'", "org/repo"),
    (entry(hf_hub_id="org/repo", format="pth"), "'hf_hub_filename'", "required with hf_hub_id"),
    (entry(model="Tiny.Net"), "'model'", "lowercase model name"),
    (entry(tag=""), "'tag'", "letters, digits"),
])
def test_each_bad_entry_is_named_with_field_and_accepted(tmp_path, bad, field, accepted):
    path = write_manifest(tmp_path / "m.yaml", [entry(tag="ok"), bad])
    with pytest.raises(zm.ManifestError) as info:
        zm.read_manifest_file(path)
    message = str(info.value)
    assert str(path) in message and "weights[1]" in message
    model, tag = bad.get("model") or "?", bad.get("tag") or "?"
    assert f"({model}.{tag})" in message
    assert field in message and accepted in message
    assert "weights[0]" not in message  # the good entry is not blamed


def test_duplicate_ref_in_one_file(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", [entry(), entry(sha256=SHA_B)])
    with pytest.raises(zm.ManifestError, match=r"weights\[1\] \(tinynet.in1k\): duplicate model.tag.*weights\[0\]"):
        zm.read_manifest_file(path)


def test_clashing_cache_filenames(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", [entry(filename="same.pth"),
                                                entry(tag="b", sha256=SHA_B, filename="same.pth")])
    with pytest.raises(zm.ManifestError, match=r"tinynet.b: field 'filename' = 'same.pth'.*tinynet.in1k"):
        zm.read_manifest_file(path)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", [entry(sha256="x"), entry(tag="t2", format="zip", size="big")])
    message = str(pytest.raises(zm.ManifestError, zm.read_manifest_file, path).value)
    assert "3 invalid entries" in message
    assert "'sha256'" in message and "'format'" in message and "'size'" in message


@pytest.mark.parametrize("text, expected", [
    ("- just a list\n", "top level must be a mapping"),
    ("weights: {a: 1}\n", "must be a list"),
    ("weights: []\nextra: 1\n", "found ['extra']"),
    ("weights: [\n", "not valid YAML"),
    ("weights:\n  - 3\n", "weights[0] (?.?): is int"),
])
def test_bad_file_structure(tmp_path, text, expected):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(zm.ManifestError) as info:
        zm.read_manifest_file(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_empty_file_has_no_entries(tmp_path):
    (tmp_path / "m.yaml").write_text("# nothing yet\n")
    assert zm.read_manifest_file(tmp_path / "m.yaml") == []


def test_zoo_manifest_merges_in_order_and_replaces_in_place(tmp_path, monkeypatch):
    first = write_manifest(tmp_path / "a.yaml", [entry(tag="in1k"), entry(tag="in22k", sha256=SHA_B)])
    second = write_manifest(tmp_path / "b.yaml", [entry(tag="in1k", urls=["https://mirror.example/t.pth"]),
                                                  entry(model="other", tag="x")])
    monkeypatch.setenv("ZOO_MANIFEST", os.pathsep.join([str(first), str(second)]))
    manifest = zm.load_manifest()
    assert str(second) in manifest.files and str(zm.packaged_manifest_path()) in manifest.files
    ours = [e for e in manifest.entries if e.model in ("tinynet", "other")]
    assert [e.ref for e in ours] == ["tinynet.in1k", "tinynet.in22k", "other.x"]
    replaced = manifest.get("tinynet")  # the default tag stays the first one
    assert replaced.tag == "in1k" and replaced.urls == ["https://mirror.example/t.pth"]
    assert replaced.origin == str(second)
    assert manifest.get("tinynet", "in22k").sha256 == SHA_B
    assert manifest.get("tinynet.in22k") is manifest.get("tinynet", "in22k")


def test_load_manifest_rereads_changed_files(tmp_path, monkeypatch):
    path = write_manifest(tmp_path / "a.yaml", [entry()])
    monkeypatch.setenv("ZOO_MANIFEST", str(path))
    assert zm.load_manifest().get("tinynet").sha256 == SHA_A
    assert zm.load_manifest() is zm.load_manifest()  # cached while nothing changes
    write_manifest(path, [entry(sha256=SHA_B)])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert zm.load_manifest().get("tinynet").sha256 == SHA_B
    monkeypatch.delenv("ZOO_MANIFEST")
    assert "tinynet.in1k" not in zm.load_manifest()


def test_zoo_manifest_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_MANIFEST", str(tmp_path / "nope.yaml"))
    with pytest.raises(zm.ManifestError, match="ZOO_MANIFEST names .*nope.yaml.*not a file"):
        zm.load_manifest()


def test_invalid_user_manifest_fails_load(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_MANIFEST", str(write_manifest(tmp_path / "a.yaml", [entry(sha256="nope")])))
    with pytest.raises(zm.ManifestError, match=r"(?s)a.yaml.*weights\[0\] \(tinynet.in1k\): field 'sha256'"):
        zm.load_manifest()


def test_get_unknown_model_and_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_MANIFEST", str(write_manifest(tmp_path / "a.yaml", [entry(), entry(tag="in22k")])))
    manifest = zm.load_manifest()
    with pytest.raises(ValueError, match="no weights tagged 'in21k'; available tags: in1k, in22k"):
        manifest.get("tinynet", "in21k")
    with pytest.raises(ValueError, match="'tinynt' has no pretrained weights.*did you mean tinynet"):
        manifest.get("tinynt")
    assert manifest.tags("tinynet") == ["in1k", "in22k"]


def test_parse_hf_url():
    assert zm.parse_hf_url("hf://org/repo/sub/model.safetensors") == ("org/repo", None, "sub/model.safetensors")
    assert zm.parse_hf_url("hf://org/repo@v2/model.bin") == ("org/repo", "v2", "model.bin")
    for bad in ("hf://org/model.bin", "hf://org/repo@/x.bin", "hf://org//x.bin", "https://org/repo/x"):
        with pytest.raises(ValueError, match="hf://org/repo"):
            zm.parse_hf_url(bad)


def test_cli_validator(tmp_path, capsys):
    good = write_manifest(tmp_path / "good.yaml", [entry()])
    bad = write_manifest(tmp_path / "bad.yaml", [entry(format="zip")])
    assert zm.main([str(good)]) == 0 and "1 entries" in capsys.readouterr().out
    assert zm.main([str(bad)]) == 1 and "'format'" in capsys.readouterr().err


def test_yaml_example_in_schema_header_is_valid(tmp_path):
    """The commented example at the top of the packaged manifest is itself a valid entry."""
    lines = zm.packaged_manifest_path().read_text().splitlines()
    start = lines.index("# Example:") + 1
    example = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        example.append(line[4:])
    path = tmp_path / "example.yaml"
    path.write_text("weights:\n" + textwrap.indent("\n".join(example), "  ") + "\n")
    (only,) = zm.read_manifest_file(path)
    assert only.ref == "biformer_tiny.in1k" and only.wrapping == "model"
