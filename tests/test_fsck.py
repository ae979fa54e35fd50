"""fsck: one corrupted fixture per finding code, on both backends; sha512, nesting, scale, the CLI."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oci import LayoutBuilder

from ocifuse import cli, fsck, model
from ocifuse.layout import Layout
from ocifuse.views import open_layout

Json = dict[str, Any]
Edits = dict[str, bytes | None]


@dataclass
class Fixed(LayoutBuilder):
    """A builder whose files were edited by hand (a file set to None is left out)."""

    fixed: dict[str, bytes | None] = field(default_factory=dict)

    def layout_files(self) -> dict[str, bytes]:
        return {k: v for k, v in self.fixed.items() if v is not None}


def write(b: LayoutBuilder, tmp_path: Path, backend: str, edits: Edits | None = None) -> Path:
    """Write ``b`` as a directory or an archive; ``edits`` replace (or with None, drop) files."""
    files: dict[str, bytes | None] = {**b.layout_files(), **(edits or {})}
    fixed = Fixed(fixed=files)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if backend == "directory":
        return fixed.write_dir(tmp_path / "layout")
    return fixed.write_tar(tmp_path / "layout.tar")


def check_written(b: LayoutBuilder, tmp_path: Path, backend: str, edits: Edits | None = None) -> fsck.Report:
    """Write the layout and fsck it."""
    with open_layout(write(b, tmp_path, backend, edits)) as layout:
        return fsck.check(layout)


def sample(b: LayoutBuilder | None = None) -> LayoutBuilder:
    """A small valid layout: a two-platform index under ``latest`` and an image under ``v1``."""
    b = b or LayoutBuilder()
    amd = b.image([b"amd64 layer one", b"amd64 layer two"])
    arm = b.image([b"arm64 layer"], arch="arm64")
    b.tag(b.index([{**amd, "platform": {"os": "linux", "architecture": "amd64"}}, arm]), "latest")
    b.tag(b.image([b"v1 layer"]), "v1")
    return b


def path_of(desc: Json) -> str:
    """The layout path of a descriptor's blob."""
    alg, enc = desc["digest"].split(":")
    return f"blobs/{alg}/{enc}"


def manifest(b: LayoutBuilder, layers: list[Json], config: Json | None = None, **extra: Any) -> Json:
    """Store a manifest over hand-made layer descriptors; return its descriptor."""
    cfg = config or b.json_blob({"os": "linux", "architecture": "amd64"}, model.MEDIA_CONFIG)
    doc = {"schemaVersion": 2, "mediaType": model.MEDIA_MANIFEST, "config": cfg, "layers": layers, **extra}
    return b.json_blob(doc, model.MEDIA_MANIFEST)


def codes(report: fsck.Report) -> list[str]:
    return [f.code for f in report.findings]


# -- clean layouts ---------------------------------------------------------------------------------


def test_clean_layout_has_no_findings(tmp_path: Path, backend: str) -> None:
    b = sample()
    report = check_written(b, tmp_path, backend)
    assert report.findings == ()
    assert report.ok
    # 1 index, 3 manifests, 2 distinct configs, 4 layers.
    assert report.blobs_verified == len(b.files) == 10
    assert report.bytes_verified == sum(len(v) for v in b.files.values())


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_sha512_layouts_verify(tmp_path: Path, backend: str, algorithm: str) -> None:
    b = sample(LayoutBuilder(algorithm=algorithm))
    assert check_written(b, tmp_path, backend).findings == ()
    layer = b.blob(b"sha512 layer?")
    b.tag(manifest(b, [layer]), "bad")
    report = check_written(b, tmp_path / "bad", backend, {path_of(layer): b"sha512 layer!"})
    assert codes(report) == ["digest-mismatch"]
    digest = report.findings[0].digest
    assert digest == layer["digest"]
    assert digest is not None and digest.startswith(f"{algorithm}:")


def test_nested_indexes(tmp_path: Path, backend: str) -> None:
    b = LayoutBuilder()
    deep = b.blob(b"deep layer")
    inner: Json = manifest(b, [deep])
    for depth in range(5):
        inner = b.index([inner, b.image([f"level {depth}".encode()])])
    b.tag(inner, "nested")
    assert check_written(b, tmp_path, backend).findings == ()
    report = check_written(b, tmp_path / "bad", backend, {path_of(deep): b"DEEP LAYER"})
    assert codes(report) == ["digest-mismatch"]
    assert report.findings[0].digest == deep["digest"]


def test_repeated_nested_indexes_are_walked_once(tmp_path: Path, backend: str) -> None:
    """Thirty levels of indexes, each listing the next twice: 2**30 paths, 33 blobs, each read once."""
    b = LayoutBuilder()
    d = b.image([b"bottom"])
    for _ in range(30):
        d = b.index([d, d])
    b.tag(d, "dag")
    report = check_written(b, tmp_path, backend)
    assert report.findings == ()
    assert report.blobs_verified == len(b.files) == 33


def test_many_blobs(tmp_path: Path, backend: str) -> None:
    b = LayoutBuilder()
    layers = [b.blob(i.to_bytes(4, "big"), "application/vnd.oci.image.layer.v1.tar") for i in range(5_000)]
    for i in range(0, len(layers), 1000):
        b.tag(manifest(b, layers[i : i + 1000]), f"part{i}")
    assert len(b.files) >= 5_000
    report = check_written(b, tmp_path, backend)
    assert report.findings == ()
    assert report.blobs_verified == len(b.files)


def test_every_blob_is_read_once(tmp_path: Path, backend: str) -> None:
    b = sample()
    shared = b.blob(b"shared layer")
    one, two = manifest(b, [shared]), manifest(b, [shared, shared])
    b.tag(b.index([one, two]), "a")
    b.tag(b.index([two, one]), "b")
    reads: dict[str, int] = {}
    with open_layout(write(b, tmp_path, backend)) as layout:
        real = layout.read_at

        def counting(name: str, offset: int, size: int) -> bytes:
            if offset == 0:
                reads[name] = reads.get(name, 0) + 1
            return real(name, offset, size)

        layout.read_at = counting  # type: ignore[method-assign]
        real_iter = layout.iter_blob

        def counting_iter(digest: Any, chunk: int = fsck.CHUNK) -> Iterator[bytes]:
            reads[digest.path] = reads.get(digest.path, 0) + 1
            return real_iter(digest, chunk)

        if backend == "directory":  # DirectoryLayout streams without read_at
            layout.iter_blob = counting_iter  # type: ignore[method-assign]
        report = fsck.check(layout)
    assert report.findings == ()
    blob_reads = {k: v for k, v in reads.items() if k.startswith("blobs/")}
    assert set(blob_reads) == set(b.files)
    assert set(blob_reads.values()) == {1}


def test_all_findings_are_collected(tmp_path: Path, backend: str) -> None:
    b = sample()
    l1, l2 = b.blob(b"one"), b.blob(b"two")
    b.tag(manifest(b, [l1, {**l2, "size": 4}, b.blob(b"three")]), "broken")
    b.files["blobs/sha256/junk"] = b"junk"
    report = check_written(b, tmp_path, backend, {path_of(l1): b"ONE"})
    assert sorted(codes(report)) == ["blob-invalid-path", "digest-mismatch", "size-mismatch"]
    assert not report.ok


def test_self_referencing_index_terminates(tmp_path: Path, backend: str) -> None:
    b = sample()
    fake = "sha256:" + "ab" * 32
    doc = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": model.MEDIA_INDEX,
            "manifests": [{"mediaType": model.MEDIA_INDEX, "digest": fake, "size": 10}],
        }
    ).encode()
    b.tag({"mediaType": model.MEDIA_INDEX, "digest": fake, "size": len(doc)}, "loop")
    report = check_written(b, tmp_path, backend, {"blobs/sha256/" + "ab" * 32: doc})
    assert sorted(codes(report)) == ["digest-mismatch", "size-mismatch"]


def test_empty_descriptor_with_data_is_fine(tmp_path: Path, backend: str) -> None:
    b = sample()
    empty = {**b.blob(b"{}", "application/vnd.oci.empty.v1+json"), "data": base64.b64encode(b"{}").decode()}
    b.tag(manifest(b, [], config=empty, artifactType="application/x-test"), "artifact")
    assert check_written(b, tmp_path, backend).findings == ()


def test_referrer_with_subject_is_walked(tmp_path: Path, backend: str) -> None:
    b = sample()
    subject = b.image([b"subject layer"])
    b.tag(subject, "app")
    sig = b.blob(b"signature")
    b.tag(manifest(b, [sig], subject=subject), None)
    assert check_written(b, tmp_path, backend).findings == ()
    report = check_written(b, tmp_path / "bad", backend, {path_of(sig): b"SIGNATURE"})
    assert codes(report) == ["digest-mismatch"]


def test_real_image_is_clean(real_layout: Layout) -> None:
    """skopeo's oci-archive of an umoci image (and it extracted) has nothing to report."""
    report = fsck.check(real_layout)
    assert report.findings == ()
    assert report.blobs_verified == 4  # manifest, config, two layers
    assert report.bytes_verified > 3 * 1024 * 1024


def test_real_umoci_layout_passes(real_umoci_dir: Path) -> None:
    with open_layout(real_umoci_dir) as layout:
        report = fsck.check(layout)
    assert report.ok, report.findings


def test_docker_media_types(tmp_path: Path, backend: str) -> None:
    b = LayoutBuilder()
    cfg = b.json_blob({"os": "linux", "architecture": "amd64"}, model.DOCKER_CONFIG)
    layer = b.blob(b"layer", "application/vnd.docker.image.rootfs.diff.tar.gzip")
    doc = {"schemaVersion": 2, "mediaType": model.DOCKER_MANIFEST, "config": cfg, "layers": [layer]}
    m = b.json_blob(doc, model.DOCKER_MANIFEST)
    b.tag(
        b.json_blob(
            {"schemaVersion": 2, "mediaType": model.DOCKER_LIST, "manifests": [m]}, model.DOCKER_LIST
        ),
        "d",
    )
    assert check_written(b, tmp_path, backend).findings == ()


def test_media_type_disagreement_is_invalid_document(tmp_path: Path, backend: str) -> None:
    b = sample()
    inner = b.image([b"inner"])
    index = b.json_blob(
        {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": [inner]}, model.MEDIA_INDEX
    )
    b.tag({**index, "mediaType": model.MEDIA_MANIFEST}, "liar")
    report = check_written(b, tmp_path, backend)
    assert codes(report) == ["invalid-document"]
    assert "differs from the descriptor's" in report.findings[0].message


def test_invalid_descriptor_does_not_hide_its_siblings(tmp_path: Path, backend: str) -> None:
    b = sample()
    good = b.blob(b"good layer")
    bad = {"mediaType": "application/octet-stream", "digest": "sha256:" + "0" * 64, "size": -1}
    b.tag(manifest(b, [bad, good]), "half")
    report = check_written(b, tmp_path, backend, {path_of(good): b"GOOD LAYER"})
    assert codes(report) == ["invalid-descriptor", "digest-mismatch"]
    assert report.findings[1].digest == good["digest"]


# -- one corrupted fixture per finding code --------------------------------------------------------

Case = Callable[[Path, str, pytest.MonkeyPatch], fsck.Report]
CASES: dict[str, Case] = {}


def case(code: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[code] = fn
        return fn

    return register


@case("layout-missing")
def _layout_missing(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    return check_written(sample(), tmp_path, backend, {"oci-layout": None})


@case("layout-invalid")
def _layout_invalid(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    return check_written(sample(), tmp_path, backend, {"oci-layout": b'{"imageLayoutVersion": 1}'})


@case("layout-version")
def _layout_version(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    b.layout_version = "9.9.9"
    return check_written(b, tmp_path, backend)


@case("index-missing")
def _index_missing(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    return check_written(sample(), tmp_path, backend, {"index.json": None})


@case("index-invalid")
def _index_invalid(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    return check_written(
        sample(), tmp_path, backend, {"index.json": b'{"schemaVersion": 2, "manifests": {}}'}
    )


@case("ref-duplicate")
def _ref_duplicate(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    b.tag(b.image([b"other"]), "latest")
    return check_written(b, tmp_path, backend)


@case("invalid-descriptor")
def _invalid_descriptor(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    b.tag(manifest(b, [{"mediaType": "application/octet-stream", "digest": "sha256:XYZ", "size": 1}]), "bad")
    return check_written(b, tmp_path, backend)


@case("data-mismatch")
def _data_mismatch(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    layer = {**b.blob(b"payload"), "data": base64.b64encode(b"PAYLOAD").decode()}
    b.tag(manifest(b, [layer]), "bad")
    return check_written(b, tmp_path, backend)


@case("blob-missing")
def _blob_missing(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    layer = b.blob(b"gone")
    b.tag(manifest(b, [layer]), "bad")
    return check_written(b, tmp_path, backend, {path_of(layer): None})


@case("blob-external")
def _blob_external(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    layer = b.blob(b"foreign", urls=["https://example.com/layer"])
    b.tag(manifest(b, [layer]), "foreign")
    return check_written(b, tmp_path, backend, {path_of(layer): None})


@case("subject-missing")
def _subject_missing(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    subject = {"mediaType": model.MEDIA_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 123}
    b.tag(manifest(b, [b.blob(b"sbom")], subject=subject), None)
    return check_written(b, tmp_path, backend)


@case("blob-unreadable")
def _blob_unreadable(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    layer = b.blob(b"unreadable")
    b.tag(manifest(b, [layer]), "bad")
    with open_layout(write(b, tmp_path, backend)) as layout:
        real = layout.iter_blob

        def failing(digest: Any, chunk: int = fsck.CHUNK) -> Iterator[bytes]:
            if str(digest) == layer["digest"]:
                raise OSError(5, "Input/output error")
            return real(digest, chunk)

        layout.iter_blob = failing  # type: ignore[method-assign]
        return fsck.check(layout)


@case("size-mismatch")
def _size_mismatch(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    layer = b.blob(b"sized")
    b.tag(manifest(b, [{**layer, "size": 99}]), "bad")
    return check_written(b, tmp_path, backend)


@case("digest-mismatch")
def _digest_mismatch(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    layer = b.blob(b"original")
    b.tag(manifest(b, [layer]), "bad")
    return check_written(b, tmp_path, backend, {path_of(layer): b"ORIGINAL"})


@case("unverifiable-digest")
def _unverifiable(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    enc = hashlib.blake2b(b"blake").hexdigest()
    layer = {"mediaType": "application/octet-stream", "digest": f"blake2b:{enc}", "size": 5}
    b.files[f"blobs/blake2b/{enc}"] = b"blake"
    b.tag(manifest(b, [layer]), "blake")
    return check_written(b, tmp_path, backend)


@case("document-too-large")
def _too_large(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = LayoutBuilder()
    small = b.image([])
    big = manifest(b, [b.blob(b"x" * 100) for _ in range(20)])
    b.tag(small, "small")
    b.tag(big, "big")
    mp.setattr(fsck, "MAX_JSON", big["size"] - 1)
    return check_written(b, tmp_path, backend)


@case("invalid-json")
def _invalid_json(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    b.tag(b.blob(b'{"schemaVersion": 2,', model.MEDIA_MANIFEST), "bad")
    return check_written(b, tmp_path, backend)


@case("invalid-document")
def _invalid_document(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    b.tag(b.json_blob({"schemaVersion": 2, "layers": []}, model.MEDIA_MANIFEST), "bad")
    return check_written(b, tmp_path, backend)


@case("blob-unreferenced")
def _unreferenced(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    b = sample()
    b.blob(b"orphan")
    return check_written(b, tmp_path, backend)


@case("blob-invalid-path")
def _invalid_path(tmp_path: Path, backend: str, mp: pytest.MonkeyPatch) -> fsck.Report:
    return check_written(sample(), tmp_path, backend, {"blobs/sha256/not-a-digest": b"?"})


@pytest.mark.parametrize("code", sorted(CASES))
def test_finding_code(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    report = CASES[code](tmp_path, backend, monkeypatch)
    assert codes(report) == [code], report.findings
    (f,) = report.findings
    assert f.severity is fsck.CODES[code]
    assert report.ok is (f.severity is fsck.Severity.WARNING)
    assert f.message and "\n" not in f.message


def test_every_code_has_a_test() -> None:
    archive_only = {
        "layout-unreadable",
        "archive-corrupt",
        "archive-truncated",
        "archive-changed",
        "member-skipped",
        "compressed-corrupt",  # tests/test_compressed_archive.py
        "compressed-too-large",
        "not-an-image",  # tests/test_docker_mount.py: a root filesystem tar, from every command
    }
    layers_only = {"diffid-mismatch", "layer-invalid", "layer-member-skipped"}  # fsck --layers: test_image.py
    layers_only |= {"toc-mismatch", "toc-unused"}  # tests/test_chunked.py
    archive_only |= {c for c in fsck.CODES if c.startswith("docker-")}  # tests/test_docker.py
    assert set(CASES) | archive_only | layers_only == set(fsck.CODES)
    assert set(CASES).isdisjoint(archive_only | layers_only)


# -- codes that only an archive (or no layout at all) can produce ----------------------------------


def test_layout_unreadable(tmp_path: Path) -> None:
    report = fsck.check_path(str(tmp_path / "nothing-here"))
    assert codes(report) == ["layout-unreadable"]
    assert not report.ok


def test_archive_corrupt(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(4096))
    report = fsck.check_path(str(garbage))
    assert codes(report) == ["archive-corrupt"]
    assert report.findings[0].path == str(garbage)


def test_archive_truncated(tmp_path: Path) -> None:
    b = sample()
    b.blob(os.urandom(20_000))
    tar = b.write_tar(tmp_path / "whole.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    assert codes(fsck.check_path(str(cut))) == ["archive-truncated"]


def test_archive_changed(tmp_path: Path) -> None:
    tar = sample().write_tar(tmp_path / "a.tar")
    with open_layout(tar) as layout:
        os.truncate(tar, 1024)
        report = fsck.check(layout)
    assert "archive-changed" in codes(report)
    assert not report.ok


def test_member_skipped(tmp_path: Path) -> None:
    tar = sample().write_tar(tmp_path / "a.tar")
    with tarfile.open(tar, "a") as tf:
        link = tarfile.TarInfo("blobs/sha256/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        evil = tarfile.TarInfo("../evil")
        evil.size = 4
        tf.addfile(evil, io.BytesIO(b"evil"))
    report = fsck.check_path(str(tar))
    assert codes(report) == ["member-skipped", "member-skipped"]
    assert [f.path for f in report.findings] == ["blobs/sha256/link", "../evil"]
    assert report.ok


# -- never a traceback -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["index.json", "manifest", "config", "oci-layout"]),
    content=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
        st.sampled_from(
            [
                b'{"schemaVersion": 2, "manifests": [{"digest": 1}]}',
                b'{"schemaVersion": 2, "config": {}, "layers": [null]}',
                b'{"schemaVersion": 2, "manifests": [{"mediaType": "x", "digest": "a:b", "size": -1}]}',
                b'{"config": {"Env": [1], "Labels": []}}',
            ]
        ),
    ),
)
def test_garbage_documents_never_raise(tmp_path: Path, target: str, content: bytes) -> None:
    b = LayoutBuilder()
    m = b.image([b"layer"])
    b.tag(m, "x")
    doc = json.loads(b.files[path_of(m)])
    name = {"manifest": path_of(m), "config": path_of(doc["config"])}.get(target, target)
    report = check_written(b, tmp_path, "directory", {name: content})
    for f in report.findings:
        assert f.code in fsck.CODES


# -- the command line ------------------------------------------------------------------------------


def test_cli_clean(tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(sample(), tmp_path, backend)
    assert cli.main(["fsck", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 10 blobs verified")
    assert cli.main(["fsck", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "ok": True,
        "compression": "plain",
        "blobs_verified": 10,
        "bytes_verified": report["bytes_verified"],
        "findings": [],
    }


def test_cli_findings(tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    b = sample()
    layer = b.blob(b"original")
    b.tag(manifest(b, [layer]), "bad")
    b.blob(b"orphan")
    path = write(b, tmp_path, backend, {path_of(layer): b"ORIGINAL"})
    assert cli.main(["fsck", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"error: digest-mismatch: {layer['digest']}: ")
    assert lines[1].startswith("warning: blob-unreferenced: ")
    assert lines[2].startswith("FAILED: ") and "1 error, 1 warning" in lines[2]
    assert cli.main(["fsck", "--json", str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert set(report) == {"ok", "compression", "blobs_verified", "bytes_verified", "findings"}
    for f in report["findings"]:
        assert set(f) == {"severity", "code", "digest", "path", "message"}
    first = report["findings"][0]
    assert first["severity"] == "error" and first["code"] == "digest-mismatch"
    assert first["digest"] == layer["digest"] and first["path"] == path_of(layer)


def test_cli_warnings_only_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = sample()
    b.blob(b"orphan")
    assert cli.main(["fsck", str(write(b, tmp_path, "archive"))]) == 0
    assert "blob-unreferenced" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b\x08\x00garbage", os.urandom(3000), b"not a tar\n" * 100])
def test_cli_garbage_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(content)
    assert cli.main(["fsck", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and str(path) in captured.err
    assert "Traceback" not in captured.err
    assert cli.main(["fsck", "--json", str(path)]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False
    codes = (["archive-corrupt"], ["archive-truncated"], ["compressed-corrupt"])  # the last: gzip magic
    assert [f["code"] for f in report["findings"]] in codes


def test_cli_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fsck", "--json", str(tmp_path / "absent")]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["findings"][0]["code"] == "layout-unreadable"
    assert captured.err.startswith("ocifuse: ")


def test_progress_callback_sees_every_byte(tmp_path: Path, backend: str) -> None:
    seen: list[int] = []
    with open_layout(write(sample(), tmp_path, backend)) as layout:
        report = fsck.check(layout, progress=seen.append)
    assert sum(seen) == report.bytes_verified
