"""inspect: refs, platforms, resolved images and referrers, on both backends; the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from oci import LayoutBuilder

from ocifuse import cli, inspect, model
from ocifuse.layout import Layout
from ocifuse.model import Platform
from ocifuse.views import open_layout

Json = dict[str, Any]
CONFIG: Json = {
    "os": "linux",
    "architecture": "amd64",
    "created": "2024-05-01T12:00:00Z",
    "author": "someone",
    "rootfs": {"type": "layers", "diff_ids": []},
    "config": {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--serve"],
        "Env": ["PATH=/bin", "MODE=prod"],
        "Labels": {"org.opencontainers.image.title": "app"},
        "WorkingDir": "/srv",
    },
}
SIGNATURE = "application/vnd.dev.sigstore.bundle.v0.3+json"


class Sample:
    """A layout with a two-platform index (``multi``), a single image (``single``), a referrer."""

    def __init__(self) -> None:
        b = self.builder = LayoutBuilder()
        self.amd = b.image([b"amd layer 1", b"amd layer 22"], config=CONFIG)
        arm_cfg = {**CONFIG, "architecture": "arm64", "variant": "v8"}
        self.arm = b.image([b"arm layer"], config=arm_cfg)
        self.amd_entry = {**self.amd, "platform": {"os": "linux", "architecture": "amd64"}}
        self.arm_entry = {**self.arm, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
        self.multi = b.tag(b.index([self.amd_entry, self.arm_entry]), "multi")
        self.single = b.tag(b.image([b"s390x layer"], arch="s390x"), "single")
        self.sig = b.image([b"sig"], subject=self.amd, artifact_type=SIGNATURE)
        b.tag(self.sig, None)

    def write(self, tmp_path: Path, backend: str) -> Path:
        """Write the layout as a directory or an archive under ``tmp_path``."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        if backend == "directory":
            return self.builder.write_dir(tmp_path / "layout")
        return self.builder.write_tar(tmp_path / "layout.tar")


AMD64 = Platform(os="linux", architecture="amd64")
ARM64 = Platform(os="linux", architecture="arm64")


def summarize(tmp_path: Path, backend: str, s: Sample | None = None, **kw: Any) -> inspect.Summary:
    s = s or Sample()
    with open_layout(s.write(tmp_path, backend)) as layout:
        return inspect.summarize(layout, **kw)


def test_ref_table_and_platforms(tmp_path: Path, backend: str) -> None:
    s = Sample()
    summary = summarize(tmp_path, backend, s, platform=AMD64)
    assert summary.layout_version == "1.0.0"
    assert [r.name for r in summary.refs] == ["multi", "single", None]
    multi = summary.refs[0]
    assert (multi.media_type, multi.digest, multi.size) == (
        model.MEDIA_INDEX,
        s.multi["digest"],
        s.multi["size"],
    )
    assert [(p.platform, p.digest, p.depth) for p in multi.platforms] == [
        ("linux/amd64", s.amd["digest"], 0),
        ("linux/arm64/v8", s.arm["digest"], 0),
    ]
    assert summary.refs[1].platforms == ()


def test_resolved_image(tmp_path: Path, backend: str) -> None:
    s = Sample()
    summary = summarize(tmp_path, backend, s, ref="multi", platform=AMD64)
    (img,) = summary.images
    assert img.ref == "multi" and img.platform == "linux/amd64"
    assert img.manifest.digest == s.amd["digest"]
    assert [v.digest for v in img.via] == [s.multi["digest"]]
    cfg = img.image_config
    assert cfg is not None
    assert cfg.created == "2024-05-01T12:00:00Z"
    assert cfg.entrypoint == ("/bin/app",) and cfg.cmd == ("--serve",)
    assert cfg.env == ("PATH=/bin", "MODE=prod")
    assert cfg.labels == {"org.opencontainers.image.title": "app"}
    assert [(layer.size, layer.media_type) for layer in img.layers] == [
        (11, "application/vnd.oci.image.layer.v1.tar"),
        (12, "application/vnd.oci.image.layer.v1.tar"),
    ]
    assert img.total_size == s.amd["size"] + img.config.size + 23
    assert [(r.digest, r.artifact_type, r.subject) for r in img.referrers] == [
        (s.sig["digest"], SIGNATURE, s.amd["digest"])
    ]


def test_platform_selects_manifest(tmp_path: Path, backend: str) -> None:
    s = Sample()
    (img,) = summarize(tmp_path, backend, s, ref="multi", platform=ARM64).images
    assert img.manifest.digest == s.arm["digest"] and img.platform == "linux/arm64/v8"
    assert img.referrers == ()


def test_ref_by_digest(tmp_path: Path, backend: str) -> None:
    s = Sample()
    (img,) = summarize(tmp_path, backend, s, ref=s.arm["digest"]).images
    assert img.manifest.digest == s.arm["digest"]


def test_no_ref_resolves_every_entry(tmp_path: Path, backend: str) -> None:
    s = Sample()
    summary = summarize(tmp_path, backend, s, platform=AMD64)
    assert [i.manifest.digest for i in summary.images] == [s.amd["digest"], s.sig["digest"]]
    why = "no manifest for linux/amd64 (it has linux/s390x)"
    assert [(u.ref, u.error) for u in summary.unresolved] == [("single", why)]


def test_host_platform_default_never_fails(tmp_path: Path, backend: str) -> None:
    summary = summarize(tmp_path, backend, platform=None)
    assert len(summary.images) + len(summary.unresolved) == 3
    assert summary.error is None


def test_not_found_is_listed_not_raised(tmp_path: Path, backend: str) -> None:
    """What was asked for and is not there: the rest is still summarized, the error names the ref."""
    s = Sample()
    summary = summarize(tmp_path, backend, s, ref="nope")
    assert summary.error is not None and summary.error.startswith("no ref 'nope'")
    assert [r.name for r in summary.refs] == ["multi", "single", None] and summary.images == ()
    assert [(u.ref, u.digest) for u in summary.unresolved] == [("nope", None)]

    windows = Platform(os="windows", architecture="amd64")
    summary = summarize(tmp_path / "2", backend, s, ref="multi", platform=windows)
    assert summary.error == "multi: no manifest for windows/amd64 (it has linux/amd64, linux/arm64/v8)"
    assert [(u.ref, u.digest) for u in summary.unresolved] == [("multi", s.multi["digest"])]
    assert len(summary.refs) == 3

    summary = summarize(tmp_path / "3", backend, s, ref="single", platform=AMD64)
    assert summary.error == "single: no manifest for linux/amd64 (it has linux/s390x)"

    summary = summarize(tmp_path / "4", backend, s, platform=windows)
    assert summary.error is not None and summary.error.startswith("no image for windows/amd64 in ")
    assert "multi: no manifest for windows/amd64 (it has linux/amd64, linux/arm64/v8)" in summary.error
    assert "single: no manifest for windows/amd64 (it has linux/s390x)" in summary.error
    assert len(summary.unresolved) == 3


def test_only_entry_without_the_platform_names_it(tmp_path: Path, backend: str) -> None:
    """One index.json entry and a --platform it lacks: the message names the ref, not a digest."""
    b = LayoutBuilder()
    amd = b.image([b"a"], config=CONFIG)
    b.tag(b.index([{**amd, "platform": {"os": "linux", "architecture": "amd64"}}]), "v1")
    path = b.write_tar(tmp_path / "one.tar") if backend == "archive" else b.write_dir(tmp_path / "d")
    with open_layout(path) as lay:
        summary = inspect.summarize(lay, platform=Platform(os="linux", architecture="s390x"))
    assert summary.error == "v1: no manifest for linux/s390x (it has linux/amd64)"


def test_nested_index_platforms(tmp_path: Path, backend: str) -> None:
    b = LayoutBuilder()
    arm = b.image([b"arm"], arch="arm64")
    inner = b.index([{**arm, "platform": {"os": "linux", "architecture": "arm64"}}])
    outer = b.tag(b.index([inner]), "nested")
    s = Sample()
    s.builder = b
    summary = summarize(tmp_path, backend, s, ref="nested", platform=ARM64)
    assert [(p.platform, p.depth) for p in summary.refs[0].platforms] == [(None, 0), ("linux/arm64", 1)]
    (img,) = summary.images
    assert img.manifest.digest == arm["digest"]
    assert [v.digest for v in img.via] == [outer["digest"], inner["digest"]]


def test_repeated_nested_indexes_stay_linear(tmp_path: Path, backend: str) -> None:
    """Thirty levels of indexes, each listing the next twice: 2**30 paths, 31 documents."""
    b = LayoutBuilder()
    bottom = b.image([b"bottom"])
    d = {**bottom, "platform": {"os": "linux", "architecture": "amd64"}}
    for _ in range(30):
        d = b.index([d, d])
    b.tag(d, "dag")
    s = Sample()
    s.builder = b
    summary = summarize(tmp_path, backend, s, ref="dag", platform=AMD64)
    assert summary.images[0].manifest.digest == bottom["digest"]
    assert len(summary.refs[0].platforms) == 2 * 30
    assert summarize(tmp_path / "2", backend, s, ref="dag", platform=ARM64).error is not None


def test_sha512_layout(tmp_path: Path, backend: str) -> None:
    b = LayoutBuilder(algorithm="sha512")
    m = b.tag(b.image([b"layer"]), "only")
    s = Sample()
    s.builder = b
    (img,) = summarize(tmp_path, backend, s, platform=AMD64).images
    assert img.manifest.digest == m["digest"] and img.manifest.digest.startswith("sha512:")


def test_artifact_without_image_config(tmp_path: Path, backend: str) -> None:
    b = LayoutBuilder()
    empty = b.blob(b"{}", "application/vnd.oci.empty.v1+json")
    doc = {"schemaVersion": 2, "mediaType": model.MEDIA_MANIFEST, "config": empty, "layers": []}
    b.tag(b.json_blob(doc, model.MEDIA_MANIFEST), "artifact")
    s = Sample()
    s.builder = b
    (img,) = summarize(tmp_path, backend, s).images
    assert img.image_config is None and img.config_error is None and img.platform is None


def test_missing_config_is_shown_not_fatal(tmp_path: Path, backend: str) -> None:
    s = Sample()
    cfg = json.loads(s.builder.files[f"blobs/sha256/{s.single['digest'][7:]}"])["config"]
    del s.builder.files[f"blobs/sha256/{cfg['digest'][7:]}"]
    (img,) = summarize(tmp_path, backend, s, ref="single").images
    assert img.image_config is None and img.config_error is not None and "not found" in img.config_error


def test_real_image(real_layout: Layout) -> None:
    summary = inspect.summarize(real_layout, ref="v1", platform=AMD64)
    assert [r.name for r in summary.refs] == ["v1"]
    (img,) = summary.images
    assert img.image_config is not None and img.image_config.cmd == ("/hello.txt",)
    assert len(img.layers) == 2
    assert img.total_size == img.manifest.size + img.config.size + sum(layer.size for layer in img.layers)


def test_real_umoci_layout_lists_both_tags(real_umoci_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "--json", str(real_umoci_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(r["name"] for r in doc["refs"]) == ["v1", "v2"]


# -- rendering and the command line ----------------------------------------------------------------


def test_text_output(tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    s = Sample()
    path = s.write(tmp_path, backend)
    assert cli.main(["inspect", str(path), "--ref", "multi", "--platform", "linux/amd64"]) == 0
    out = capsys.readouterr().out
    assert "REF" in out and "multi" in out and "linux/arm64/v8" in out
    assert f"manifest    {s.amd['digest']}" in out
    assert 'entrypoint  ["/bin/app"]' in out and 'cmd         ["--serve"]' in out
    assert "MODE=prod" in out and "org.opencontainers.image.title=app" in out
    assert SIGNATURE in out
    assert "total size" in out


def test_json_output(tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    s = Sample()
    path = s.write(tmp_path, backend)
    assert cli.main(["inspect", "--json", str(path), "--ref", "multi", "--platform", "linux/amd64"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {
        "path",
        "compression",
        "layout_version",
        "platform",
        "refs",
        "images",
        "unresolved",
        "error",
        "format",
        "problems",
    }
    assert doc["error"] is None
    assert doc["format"] == ("oci-archive" if backend == "archive" else "oci-layout")
    assert doc["problems"] == []
    assert doc["refs"][0]["platforms"][1]["platform"] == "linux/arm64/v8"
    (img,) = doc["images"]
    assert img["manifest"] == {
        "media_type": model.MEDIA_MANIFEST,
        "digest": s.amd["digest"],
        "size": s.amd["size"],
    }
    assert img["image_config"]["entrypoint"] == ["/bin/app"]
    assert img["image_config"]["labels"] == {"org.opencontainers.image.title": "app"}
    assert [layer["size"] for layer in img["layers"]] == [11, 12]
    assert img["referrers"][0]["artifact_type"] == SIGNATURE


def test_cli_every_ref(tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = Sample().write(tmp_path, backend)
    assert cli.main(["inspect", str(path), "--platform", "linux/arm64"]) == 0
    out = capsys.readouterr().out
    assert "image multi (linux/arm64/v8)" in out
    assert "not resolved for linux/arm64: single: no manifest for linux/arm64 (it has linux/s390x)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ref", "nope"], "no ref 'nope' in index.json (refs: multi, single)"),
        (["--ref", "multi", "--platform", "plan9/mips"], "multi: no manifest for plan9/mips (it has "),
        (["--platform", "plan9/mips"], "no image for plan9/mips in "),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_not_found_prints_everything(
    tmp_path: Path,
    backend: str,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
    as_json: bool,
) -> None:
    """No match: the whole summary on stdout (JSON stays JSON), one line on stderr, exit 1."""
    path = Sample().write(tmp_path, backend)
    assert cli.main(["inspect", str(path), *args, *(["--json"] if as_json else [])]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"ocifuse: {message}") and captured.err.count("\n") == 1
    if as_json:
        doc = json.loads(captured.out)
        assert [r["name"] for r in doc["refs"]] == ["multi", "single", None]
        assert doc["error"] == captured.err[len("ocifuse: ") :].strip()
        assert doc["unresolved"]
    else:
        assert "REF" in captured.out and "multi" in captured.out and "single" in captured.out
        assert "not resolved for" in captured.out


def test_cli_bad_platform_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = Sample().write(tmp_path, "archive")
    assert cli.main(["inspect", str(path), "--platform", "not-a-platform"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("ocifuse: ") and captured.err.count("\n") == 1


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\x1f\x8b\x08\x00"])
def test_cli_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    path = tmp_path / "garbage.tar"
    path.write_bytes(content)
    assert cli.main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_cli_unusable_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = Sample().write(tmp_path, "directory")
    (root / "index.json").write_bytes(b"{not json")
    assert cli.main(["inspect", str(root)]) == 2
    assert "index.json" in capsys.readouterr().err
    (root / "index.json").unlink()
    assert cli.main(["inspect", str(root)]) == 2
    assert cli.main(["inspect", str(tmp_path / "absent")]) == 2


def test_cli_damaged_manifest_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = Sample()
    s.builder.files[f"blobs/sha256/{s.single['digest'][7:]}"] = b"{}"
    path = s.write(tmp_path, "archive")
    assert cli.main(["inspect", str(path), "--ref", "single"]) == 1
    err = capsys.readouterr().err
    assert "ocifuse fsck" in err and err.count("\n") == 1


def test_many_images_read_each_document_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N images: each document is read a few times, not once per image (referrers were N**2)."""
    builder = LayoutBuilder()
    n = 60
    for i in range(n):
        builder.tag(builder.image([i.to_bytes(2, "big")]), f"t{i}")
    archive = builder.write_tar(tmp_path / "many.tar")
    reads: list[str] = []
    original = Layout.read_blob

    def counting(self: Layout, desc: model.Descriptor, limit: int = 16 << 20) -> bytes:
        reads.append(str(desc.digest))
        return original(self, desc, limit)

    monkeypatch.setattr(Layout, "read_blob", counting)
    with open_layout(archive) as layout:
        summary = inspect.summarize(layout, platform=Platform(os="linux", architecture="amd64"))
    assert len(summary.images) == n
    assert len(reads) <= 5 * 2 * n  # a manifest and a config per image, each read a few times
