"""zstd:chunked and eStargz layers served from their TOC alone (chunked.py), against the full pass
and ``umoci unpack``.

The image is made by real tools: two layers by ``buildah`` (``from scratch``, ``mount``, the
rootfs_images content written in, ``commit``; the second layer deletes and replaces, so it holds
whiteouts), pushed by ``podman push --compression-format zstd:chunked`` and, as its gzip twin,
``--compression-format gzip``, then ``tar -cf`` of the layout; the twin converted to eStargz by
stargz-snapshotter's ``ctr-remote image convert --estargz`` in a containerd of the test's own.
Building needs root (mknod, chown).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pyzstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mounting import mounted, run_ocifuse, skip_or_fail
from peers import containerd, isolated_store, require_tools, run
from rootfs_images import _change, _populate, snapshot, umoci_unpack
from servers import nginx

from ocifuse import ViewOptions, image, open_rootfs
from ocifuse import chunked as chunked_module
from ocifuse.cache import IndexCache
from ocifuse.chunked import CHECKSUM_KEYS, ESTARGZ_KEY, POSITION_KEYS, TocLayer, open_toc, position
from ocifuse.errors import FileMismatch, LayerError
from ocifuse.rootfs import merge
from ocifuse.source import MemorySource, Source

BIG = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: several chunks
ZEROS = "sha256:" + "0" * 64


@dataclass(frozen=True)
class Chunked:
    """One image as a zstd:chunked layout, its archive, its gzip twin, and umoci's unpacking of the twin."""

    layout: Path  # podman's zstd:chunked OCI layout (tag v1)
    archive: Path  # tar -cf of it
    gzip: Path  # the gzip twin's layout
    unpacked: Path  # umoci unpack of the gzip twin


@pytest.fixture(scope="session")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> Chunked:
    """Build the two-layer image once per session with buildah, push it twice with podman."""
    require_tools("podman", "buildah", "umoci")
    if os.geteuid() != 0:
        skip_or_fail("building the zstd:chunked test image needs root (mknod, chown)")
    root = tmp_path_factory.mktemp("chunked")
    with isolated_store(root) as store:
        ctr = store.buildah("from", "scratch").strip()
        rootfs = Path(store.buildah("mount", ctr).strip())
        _populate(rootfs)
        (rootfs / "data/empty").write_bytes(b"")
        (rootfs / "data/big-text").write_bytes(BIG)
        store.buildah("commit", "-q", ctr, "base")
        ctr = store.buildah("from", "base").strip()
        _change(Path(store.buildah("mount", ctr).strip()))
        store.buildah("commit", "-q", ctr, "app")
        store.podman("push", "-q", "--compression-format", "zstd:chunked", "app", f"oci:{root / 'zc'}:v1")
        store.podman("push", "-q", "--compression-format", "gzip", "app", f"oci:{root / 'gz'}:v1")
    run("tar", "-cf", root / "zc.tar", "-C", root / "zc", ".")
    return Chunked(
        root / "zc", root / "zc.tar", root / "gz", umoci_unpack(root / "gz", "v1", root / "unpacked")
    )


@dataclass(frozen=True)
class Estargz:
    """The gzip twin converted to eStargz by stargz-snapshotter's ctr-remote, and umoci's unpacking of it."""

    layout: Path  # the OCI layout ctr-remote exported (tag esgz)
    archive: Path  # the archive itself
    unpacked: Path


@pytest.fixture(scope="session")
def estargz(chunked: Chunked, tmp_path_factory: pytest.TempPathFactory) -> Estargz:
    """``ctr-remote image convert --estargz --oci`` of the gzip twin, in a containerd of the test's own."""
    root = tmp_path_factory.mktemp("estargz")
    run("tar", "-cf", root / "gz.tar", "-C", chunked.gzip, ".")
    with containerd() as ctr:
        ctr("images", "import", "--no-unpack", "--base-name", "src", root / "gz.tar")  # as src:v1
        ctr("images", "convert", "--estargz", "--oci", "src:v1", "esgz:v1")
        ctr("images", "export", root / "esgz.tar", "esgz:v1")
    (root / "esgz").mkdir()
    run("tar", "-xf", root / "esgz.tar", "-C", root / "esgz")
    unpacked = umoci_unpack(root / "esgz", "esgz:v1", root / "unpacked")
    return Estargz(root / "esgz", root / "esgz.tar", unpacked)


def _manifest(layout: Path) -> tuple[Path, dict[str, object]]:
    index = json.loads((layout / "index.json").read_bytes())
    path = layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    return path, json.loads(path.read_bytes())


def _layers(layout: Path) -> list[dict[str, object]]:
    layers = _manifest(layout)[1]["layers"]
    assert isinstance(layers, list)
    return layers


def _edited(layout: Path, dest: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    """A copy of ``layout`` whose manifest's layer annotations ``edit`` changed (index.json updated)."""
    shutil.copytree(layout, dest)
    old, manifest = _manifest(dest)
    for layer in manifest["layers"]:  # type: ignore[attr-defined]
        edit(layer["annotations"])
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (dest / "blobs/sha256" / digest).write_bytes(data)
    old.unlink()
    index = json.loads((dest / "index.json").read_bytes())
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def _toc(layout: Path, layer: dict[str, object]) -> dict[str, object]:
    annotations = layer["annotations"]
    assert isinstance(annotations, dict)
    where = position(annotations)
    assert where is not None
    blob = (layout / "blobs/sha256" / str(layer["digest"])[7:]).read_bytes()
    doc = json.loads(pyzstd.decompress(blob[where.offset : where.offset + where.length]))
    assert isinstance(doc, dict)
    return doc


class Counting(Source):
    """A layer blob that counts the bytes read from it."""

    def __init__(self, inner: Source, counter: list[int]) -> None:
        self.inner, self.counter, self.size = inner, counter, inner.size

    def pread(self, offset: int, size: int) -> bytes:
        data = self.inner.pread(offset, size)
        self.counter[0] += len(data)
        return data


# -- real mounts ------------------------------------------------------------------------------


@pytest.mark.fuse
def test_toc_mount_equals_full_pass_and_umoci_unpack(chunked: Chunked, tmp_path: Path) -> None:
    """Every path, type, mode, owner, size, mtime, link, device, xattr, hardlink group and byte: the TOC
    mount (first, then with its tree cached) equals the full pass (-o verify) and umoci unpack."""
    expected, groups = snapshot(chunked.unpacked)
    cache = f"cache={tmp_path / 'cache'}"
    seen = []
    for name, options in [
        ("toc", [f"rootfs,{cache}"]),
        ("cached", [f"rootfs,{cache}"]),
        ("full", ["rootfs,verify,nocache"]),
    ]:
        with mounted(chunked.archive, tmp_path / name, options=options) as m:
            seen.append(snapshot(m.mountpoint))
    for served, served_groups in seen:
        assert sorted(served) == sorted(expected)
        for path, want in expected.items():
            assert served[path] == want, path
        assert served_groups == groups == {frozenset({"data/hard2", "data/hard3"})}
    served = seen[0][0]
    assert served["data/big-text"][10] == BIG and served["data/empty"][10] == b""
    assert served["usr/bin/ping"][1] == 0o4755 and served["dev/null"][8] == os.makedev(1, 3)
    assert served["data/small.txt"][9] == (("user.comment", b"hello xattr"),)
    assert "olddir" not in served and served["d2f"][10] == b"a directory, then a file"


@pytest.mark.fuse
def test_estargz_mount_equals_full_pass_and_umoci_unpack(estargz: Estargz, tmp_path: Path) -> None:
    """eStargz layers (ctr-remote): the TOC mount equals the full pass (-o verify) and umoci unpack,
    the TOC file and landmark the tar holds included; live from the TOCs alone."""
    expected, groups = snapshot(estargz.unpacked)
    assert "stargz.index.json" in expected and ".no.prefetch.landmark" in expected
    for name, options in [("toc", "rootfs,nocache"), ("full", "rootfs,verify,nocache")]:
        with mounted(estargz.archive, tmp_path / name, options=[options]) as m:
            served, served_groups = snapshot(m.mountpoint)
        assert sorted(served) == sorted(expected)
        for path, want in expected.items():
            assert served[path] == want, path
        assert served_groups == groups == {frozenset({"data/hard2", "data/hard3"})}


def test_estargz_first_open_reads_the_tocs_only(estargz: Estargz, monkeypatch: pytest.MonkeyPatch) -> None:
    """An eStargz image opens from its footers and TOC members; a damaged file fails alone."""
    root, counter = _open(estargz.archive, monkeypatch)
    try:
        assert _kinds(root) == [TocLayer, TocLayer]
        total = sum(int(str(layer["size"])) for layer in _layers(estargz.layout))
        assert 0 < counter[0] <= total * 0.02, (counter[0], total)
        entry = root.merged.entries["bin/busybox"]
        assert root.sources.pread(entry, 0, entry.size) == Path("/bin/busybox").read_bytes()
    finally:
        root.close()
    layer = _layers(estargz.layout)[0]
    annotations = dict(layer["annotations"])  # type: ignore[call-overload]
    raw = MemorySource((estargz.layout / "blobs/sha256" / str(layer["digest"])[7:]).read_bytes())
    assert open_toc(raw, annotations, "layer 0") is not None
    annotations[ESTARGZ_KEY] = ZEROS
    with pytest.raises(LayerError, match="eStargz TOC hashes to"):
        open_toc(raw, annotations, "layer 0")


@pytest.mark.fuse
def test_a_damaged_chunk_fails_that_file_only(chunked: Chunked, tmp_path: Path) -> None:
    """A byte flipped inside one file's frames: EIO for that file (logged), the others served."""
    layout = tmp_path / "damaged"
    shutil.copytree(chunked.layout, layout)
    layer = _layers(layout)[0]
    entry = next(e for e in _toc(layout, layer)["entries"] if e["name"] == "data/big-text")  # type: ignore[attr-defined]
    blob = layout / "blobs/sha256" / str(layer["digest"])[7:]
    data = bytearray(blob.read_bytes())
    data[(entry["offset"] + entry["endOffset"]) // 2] ^= 0x55
    blob.write_bytes(data)
    with mounted(layout, tmp_path / "mnt", args=["--rootfs", "--no-cache"]) as m:
        for _ in range(2):  # the verdict is kept
            with pytest.raises(OSError) as e:
                m.path("data", "big-text").read_bytes()
            assert e.value.errno == errno.EIO
        assert m.path("etc", "passwd").read_bytes().startswith(b"root:")
        assert m.path("bin", "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        log = m.stderr()
    assert log.count("'data/big-text' does not match its TOC") == 1


def test_a_toc_not_the_manifests_refuses_the_mount(chunked: Chunked, tmp_path: Path) -> None:
    """A TOC that does not hash to the manifest's checksum annotation: one line, exit 2."""

    def forge(annotations: dict[str, str]) -> None:
        for key in CHECKSUM_KEYS:
            if key in annotations:
                annotations[key] = "sha256:" + "0" * 64

    layout = _edited(chunked.layout, tmp_path / "forged", forge)
    (tmp_path / "mnt").mkdir()
    done = run_ocifuse("mount", "--rootfs", "--no-cache", layout, tmp_path / "mnt")
    if done.returncode == 0:
        run_ocifuse("umount", tmp_path / "mnt")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "zstd:chunked TOC hashes to" in lines[0], done.stderr


# -- in process: what is read, which pass ---------------------------------------------------------


def _open(
    layout: Path, monkeypatch: pytest.MonkeyPatch, *, verify: bool = False
) -> tuple[image.RootImage, list[int]]:
    counter = [0]
    real = image.layer_blob
    monkeypatch.setattr(image, "layer_blob", lambda *a: Counting(real(*a), counter))
    return open_rootfs(layout, ViewOptions(rootfs=True, verify=verify)), counter


def _kinds(root: image.RootImage) -> list[type]:
    return [type(layer._source) for layer in root.sources.sources]  # type: ignore[attr-defined]


def test_the_first_open_reads_the_tocs_only(chunked: Chunked, monkeypatch: pytest.MonkeyPatch) -> None:
    """Live after reading the TOCs and footers (a fraction of the layers); a file read reads its frames."""
    root, counter = _open(chunked.archive, monkeypatch)
    try:
        assert _kinds(root) == [TocLayer, TocLayer]
        total = sum(int(str(layer["size"])) for layer in _layers(chunked.layout))
        assert 0 < counter[0] <= total * 0.02, (counter[0], total)
        before = counter[0]
        entry = root.merged.entries["etc/passwd"]
        assert root.sources.pread(entry, 0, 1 << 20) == (chunked.unpacked / "etc/passwd").read_bytes()
        assert counter[0] - before < 4096
    finally:
        root.close()


def test_without_the_annotations_or_with_verify_the_layer_takes_the_full_pass(
    chunked: Chunked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No annotations, or -o verify: every layer read in full (blob hashed, diff_id checked)."""
    plain = _edited(chunked.layout, tmp_path / "plain", lambda a: a.clear())
    total = sum(int(str(layer["size"])) for layer in _layers(chunked.layout))
    for layout, verify in [(plain, False), (chunked.layout, True)]:
        root, counter = _open(layout, monkeypatch, verify=verify)
        try:
            assert TocLayer not in _kinds(root)
            assert counter[0] >= total
            entry = root.merged.entries["data/big-text"]
            assert root.sources.pread(entry, 0, len(BIG) + 1) == BIG
        finally:
            root.close()


def test_an_unusable_toc_takes_the_full_pass_with_a_warning(
    chunked: Chunked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A position annotation that cannot be used (here: a TOC type other than 1) falls back, logged once."""

    def retype(annotations: dict[str, str]) -> None:
        for key in POSITION_KEYS:
            if key in annotations:
                annotations[key] = annotations[key].rsplit(":", 1)[0] + ":2"

    layout = _edited(chunked.layout, tmp_path / "retyped", retype)
    with caplog.at_level(logging.WARNING, "ocifuse"):
        root, _ = _open(layout, monkeypatch)
    try:
        assert TocLayer not in _kinds(root)
        assert root.sources.pread(root.merged.entries["data/big-text"], 0, len(BIG)) == BIG
    finally:
        root.close()
    warnings = [r.getMessage() for r in caplog.records if "TOC is not used" in r.getMessage()]
    assert len(warnings) == 2 and "TOC of type 2" in warnings[0]


# -- the TOC's rules, on blobs made here (the format as containers/storage writes it) --------------


def _blob(
    files: dict[str, bytes], *, lie: str = "", toc_extra: list[dict[str, object]] | None = None
) -> tuple[Source, dict[str, str]]:
    """A zstd:chunked blob: each file one frame, the TOC in a skippable frame; ``lie``: a file whose
    TOC digest is wrong."""
    out = bytearray(pyzstd.compress(b"\0" * 512))  # stands for the tar headers' frames
    entries: list[dict[str, object]] = []
    for name, data in files.items():
        start = len(out)
        out += pyzstd.compress(data)
        digest = hashlib.sha256(data + (b"!" if name == lie else b"")).hexdigest()
        entries.append(
            {"type": "reg", "name": name, "mode": 0o644, "size": len(data), "digest": f"sha256:{digest}",
             "offset": start, "endOffset": len(out), "modtime": "2024-05-06T07:08:09.123456789+02:00"}
        )  # fmt: skip
    toc = pyzstd.compress(json.dumps({"version": 1, "entries": entries + (toc_extra or [])}).encode())
    out += b"\x50\x2a\x4d\x18" + len(toc).to_bytes(4, "little")
    offset = len(out)
    out += toc
    checksum = "sha256:" + hashlib.sha256(toc).hexdigest()
    plain = len(pyzstd.decompress(toc))
    return MemorySource(bytes(out)), {
        CHECKSUM_KEYS[0]: checksum,
        POSITION_KEYS[0]: f"{offset}:{len(toc)}:{plain}:1",
    }


def test_a_file_that_does_not_match_its_digest_fails_alone() -> None:
    """A file whose bytes are not its TOC digest is FileMismatch at every read; the other is served."""
    raw, annotations = _blob({"good": b"good bytes", "bad": b"bad bytes"}, lie="bad")
    opened = open_toc(raw, annotations, "layer 0")
    assert opened is not None
    members = {m.name: m for m in opened.table.members}
    assert members["good"].mtime == 1714972089  # 07:08:09 at +02:00
    good, bad = members["good"], members["bad"]
    assert opened.source.pread(good.offset, good.size) == b"good bytes"
    for _ in range(2):
        with pytest.raises(FileMismatch):
            opened.source.pread(bad.offset, 1)


@pytest.mark.parametrize(
    "extra",
    [
        {"type": "reg", "name": "../escape", "size": 0},
        {"type": "socket", "name": "s"},
        {"type": "chunk", "name": "nobody", "offset": 1, "chunkOffset": 1},
        {
            "type": "reg",
            "name": "far",
            "size": 5,
            "digest": "sha256:" + "0" * 64,
            "offset": 10**9,
            "endOffset": 10**9 + 9,
        },
        {
            "type": "reg",
            "name": "overlap",
            "size": 5,
            "digest": "sha256:" + "0" * 64,
            "offset": 20,
            "endOffset": 40,
        },
        {"type": {"reg": 1}, "name": "t"},  # a type that is no string (once a TypeError: unhashable)
        {
            "type": "reg",
            "name": "two-digests",  # the TOC's digests are checked at once, one a line: not two in one
            "size": 5,
            "digest": "sha256:" + "0" * 64 + "\nsha256:" + "1" * 64,
            "offset": 0,  # inside the first frame (the tar headers'): no other file's
            "endOffset": 9,
        },
    ],
    ids=["dotdot", "unknown-type", "stray-chunk", "outside", "overlapping", "type-object", "digest-newline"],
)
def test_an_inconsistent_toc_is_not_used(extra: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    """Names the layer policy refuses, unknown types, stray chunks, frames outside the data or
    overlapping another file's: the TOC is not used (the layer takes the full pass), logged."""
    raw, annotations = _blob({"a": b"a" * 100}, toc_extra=[extra])
    with caplog.at_level(logging.WARNING, "ocifuse"):
        assert open_toc(raw, annotations, "layer 0") is None
    assert "TOC is not used" in caplog.text


def test_a_stored_file_map_is_checked_as_the_toc_was() -> None:
    """A file map from the index cache serves what the TOC did; one whose digests the TOC could not
    hold (damaged, or another format) is refused (ValueError: the cache rebuilds it)."""
    raw, annotations = _blob({"a": b"a" * 100, "b": b"bb"})
    opened = open_toc(raw, annotations, "layer 0")
    assert opened is not None
    payload = opened.source.to_bytes()
    assert TocLayer.from_bytes(payload, raw, "layer 0").pread(0, 102) == b"a" * 100 + b"bb"
    with pytest.raises(ValueError, match="algorithm sha257"):  # same length: the framing holds
        TocLayer.from_bytes(payload.replace(b"sha256:", b"sha257:", 1), raw, "layer 0")


def test_a_forged_toc_is_refused() -> None:
    """The checksum annotation is what authenticates the TOC: another one refuses the layer."""
    raw, annotations = _blob({"a": b"a"})
    annotations[CHECKSUM_KEYS[0]] = "sha256:" + "1" * 64
    with pytest.raises(LayerError, match="TOC hashes to"):
        open_toc(raw, annotations, "layer 0")


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        (POSITION_KEYS[0], "1:2:3", "is not offset:length"),
        (POSITION_KEYS[0], f"{10**9}:5:5:1", "outside"),
        (POSITION_KEYS[0], f"8:{(150 << 20) + 1}:5:1", "at most"),
        (POSITION_KEYS[0], "LENGTH:1", "do not hold"),  # a TOC that decompresses past its stated size
        (CHECKSUM_KEYS[0], "md5:abc", "manifest-checksum"),
    ],
    ids=["fields", "outside", "too-large", "bomb", "digest"],
)
def test_annotations_that_cannot_be_used_take_the_full_pass(
    key: str, value: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Annotations that do not say where a TOC is, or one over the bound: not used, logged."""
    raw, annotations = _blob({"a": b"a" * 100})
    if value.startswith("LENGTH"):
        offset, length, _, kind = annotations[key].split(":")
        value = f"{offset}:{length}:10:{kind}"
    annotations[key] = value
    with caplog.at_level(logging.WARNING, "ocifuse"):
        assert open_toc(raw, annotations, "layer 0") is None
    assert why in caplog.text


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12)
)
_FIELDS = ["type", "name", "linkName", "mode", "size", "uid", "gid", "modtime", "devMajor", "devMinor",
           "xattrs", "digest", "offset", "endOffset", "chunkSize", "chunkOffset"]  # fmt: skip


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(_FIELDS),
            st.one_of(
                _SCALARS,
                st.sampled_from(
                    ["reg", "dir", "chunk", "hardlink", "symlink", "char", "a", "a/", "../a", "\ud800"]
                ),
                st.sampled_from(["2024-01-01T00:00:00Z", "0000-13-01T00:00:00Z", ZEROS]),
                st.dictionaries(st.text(max_size=4), st.text(max_size=8), max_size=2),
            ),
        ),
        max_size=4,
    )
)
def test_any_toc_is_served_or_not_used_never_a_crash(entries: list[dict[str, object]]) -> None:
    """Whatever an authenticated TOC holds, it is used or not (logged), never a traceback; what is
    used merges, and each file reads back as its size or fails alone."""
    raw, annotations = _blob({"a": b"a" * 100, "b": b"b" * 10}, toc_extra=entries)
    opened = open_toc(raw, annotations, "layer 0")
    if opened is not None:
        merge([opened.table])
        for member in opened.table.members:
            assert member.offset + member.size <= opened.source.size
            with contextlib.suppress(FileMismatch):
                assert len(opened.source.pread(member.offset, member.size)) == member.size


# -- fsck --layers: the TOC against the tar ------------------------------------------------------


def _retoc(layout: Path, dest: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    """A copy of ``layout`` whose first layer's TOC ``edit`` changed (its tar stream, and so its
    diff_id, unchanged: the TOC is a skippable frame); blob, footer and manifest made to match,
    as an author who wants a lazy mount to see other than the tar would write them."""
    old_manifest, _ = _manifest(layout)
    shutil.copytree(layout, dest)
    manifest_path, manifest = _manifest(dest)
    layer = manifest["layers"][0]  # type: ignore[index]
    where = position(layer["annotations"])
    assert where is not None
    blob_path = dest / "blobs/sha256" / layer["digest"][7:]
    blob = blob_path.read_bytes()
    doc = json.loads(pyzstd.decompress(blob[where.offset : where.offset + where.length]))
    edit(doc["entries"])
    plain = json.dumps(doc).encode()
    toc = pyzstd.compress(plain)
    rest = bytearray(blob[where.offset + where.length :])
    assert rest.endswith(b"GnUlInUx")  # podman's footer: the TOC's offset, lengths and type
    footer = len(rest) - 40
    rest[footer : footer + 24] = struct.pack("<QQQ", where.offset, len(toc), len(plain))
    new = blob[: where.offset - 8] + b"\x50\x2a\x4d\x18" + struct.pack("<I", len(toc)) + toc + bytes(rest)
    blob_path.unlink()
    digest = hashlib.sha256(new).hexdigest()
    (dest / "blobs/sha256" / digest).write_bytes(new)
    annotations = layer["annotations"]
    for key in CHECKSUM_KEYS:
        if key in annotations:
            annotations[key] = "sha256:" + hashlib.sha256(toc).hexdigest()
    for key in POSITION_KEYS:
        if key in annotations:
            annotations[key] = f"{where.offset}:{len(toc)}:{len(plain)}:1"
    layer.update(digest=f"sha256:{digest}", size=len(new))
    data = json.dumps(manifest).encode()
    manifest_path.unlink()
    (dest / "blobs/sha256" / hashlib.sha256(data).hexdigest()).write_bytes(data)
    index = json.loads((dest / "index.json").read_bytes())
    index["manifests"][0].update(digest=f"sha256:{hashlib.sha256(data).hexdigest()}", size=len(data))
    (dest / "index.json").write_text(json.dumps(index))
    assert old_manifest.exists()
    return dest


def _fsck(path: Path) -> list[tuple[str, str]]:
    done = run_ocifuse("fsck", "--layers", "--json", path)
    return [(f["code"], f["message"]) for f in json.loads(done.stdout)["findings"]]


def test_fsck_layers_finds_no_toc_problem_in_real_images(chunked: Chunked, estargz: Estargz) -> None:
    """podman's zstd:chunked and ctr-remote's eStargz layers: each TOC agrees with its tar."""
    assert _fsck(chunked.archive) == []
    assert _fsck(estargz.archive) == []


def test_fsck_layers_finds_a_toc_that_tells_other_than_its_tar(
    chunked: Chunked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TOC the manifest vouches for but that says other than the tar (here: a mode): the lazy mount
    serves the TOC's, -o verify the tar's (SECURITY.md), and fsck --layers names the difference."""

    def chmod(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            if entry["name"] == "etc/passwd":
                entry["mode"] = 0o100600

    layout = _retoc(chunked.layout, tmp_path / "ambiguous", chmod)
    for verify, mode in [(False, 0o600), (True, 0o644)]:
        root, _ = _open(layout, monkeypatch, verify=verify)
        try:
            meta = root.merged.entries["etc/passwd"].meta
            assert meta is not None and meta.mode == mode
        finally:
            root.close()
    found = _fsck(layout)
    assert [code for code, _ in found] == ["toc-mismatch"]
    assert "'etc/passwd'" in found[0][1]
    forged = _edited(chunked.layout, tmp_path / "forged", lambda a: a.update({CHECKSUM_KEYS[1]: ZEROS}))
    assert [code for code, _ in _fsck(forged)] == ["toc-mismatch", "toc-mismatch"]  # both layers


def test_a_cached_mount_reads_a_file_through_the_stored_map(
    chunked: Chunked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the tree cached, a layer opens on its first read from its stored file map: its TOC is
    not parsed again. A damaged map is not used: the TOC is parsed again."""
    cache = IndexCache(str(tmp_path / "cache"))
    open_rootfs(chunked.archive, ViewOptions(rootfs=True, cache=cache)).close()
    parsed: list[object] = []
    real = chunked_module.open_toc

    def counted(*args: Any) -> Any:
        parsed.append(args)
        return real(*args)

    monkeypatch.setattr(image, "open_toc", counted)
    want = (chunked.unpacked / "bin/busybox").read_bytes()
    for damage in (False, True):
        if damage:
            for stored in (tmp_path / "cache").rglob("toc-map*"):
                data = bytearray(stored.read_bytes())
                data[len(data) // 2] ^= 1
                stored.write_bytes(data)
        root = open_rootfs(chunked.archive, ViewOptions(rootfs=True, cache=cache))
        try:
            entry = root.merged.entries["bin/busybox"]
            assert root.sources.pread(entry, 0, entry.size) == want
            assert _kinds(root)[0] is TocLayer
        finally:
            root.close()
        assert len(parsed) == (1 if damage else 0)


@pytest.mark.fuse
def test_a_toc_mount_over_http_equals_umoci_unpack(chunked: Chunked, tmp_path: Path) -> None:
    """The archive on an nginx of the test's own (127.0.0.1): the layers served from their TOCs
    through HTTP ranges give the same tree."""
    require_tools("nginx")
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(chunked.archive, www / "zc.tar")
    expected, groups = snapshot(chunked.unpacked)
    args = ["--rootfs", "--no-cache"]
    with nginx(tmp_path / "nginx", www) as web, mounted(web.url("zc.tar"), tmp_path / "mnt", args=args) as m:
        served, served_groups = snapshot(m.mountpoint)
        log = m.stderr()
    assert served == expected and served_groups == groups
    assert log.count("served from its TOC") == 2
