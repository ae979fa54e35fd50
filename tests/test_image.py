"""open_rootfs: layers resolved, checked against the config, scanned and merged; bad images refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import pyzstd
from mounting import OCIFUSE, require_fuse, run_ocifuse
from oci import LayoutBuilder
from tarbuild import file_member, link_member
from test_rootfs import tar_bytes, whiteout

from ocifuse import inspect, model, open_layout, views
from ocifuse import options as mount_options
from ocifuse.cache import IndexCache
from ocifuse.errors import (
    CompressedDataError,
    DecompressionLimit,
    DiffIdMismatch,
    InvalidDocument,
    LayerError,
    NotAnArchive,
    NotFound,
    TruncatedArchive,
)
from ocifuse.fsck import check
from ocifuse.image import RootImage
from ocifuse.model import Platform
from ocifuse.options import OptionError
from ocifuse.streams import Limits


def open_rootfs(path: str, **options: Any) -> RootImage:
    """The front door's rootfs view of ``path`` (views.open_rootfs), options as keywords."""
    return views.open_rootfs(path, views.ViewOptions(**options))


TAR = "application/vnd.oci.image.layer.v1.tar"


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def image(
    tmp_path: Path,
    layers: list[bytes],
    *,
    diff_ids: list[str] | None = None,
    media_types: list[str] | None = None,
    drop: set[int] = frozenset(),  # type: ignore[assignment]
    extra: list[dict[str, Any]] | None = None,
    form: str = "archive",
    forged: dict[int, bytes] | None = None,
) -> Path:
    """A one-image layout with these layer blobs (``drop``: left out of the layout), as a tar or directory.

    ``forged``: layers whose blob file holds these other bytes under the digest of the real ones.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    b = LayoutBuilder()
    descs = []
    for i, data in enumerate(layers):
        desc = b.blob(data, (media_types or [TAR] * len(layers))[i], **(extra[i] if extra else {}))
        if i in drop:
            del b.files[f"blobs/sha256/{desc['digest'][7:]}"]
        if forged and i in forged:
            b.files[f"blobs/sha256/{desc['digest'][7:]}"] = forged[i]
        descs.append(desc)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids if diff_ids is not None else [_sha(x) for x in layers],
        },
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": model.MEDIA_MANIFEST,
        "config": b.json_blob(config, model.MEDIA_CONFIG),
        "layers": descs,
    }
    b.tag(
        b.json_blob(manifest, model.MEDIA_MANIFEST, platform={"os": "linux", "architecture": "amd64"}), "v1"
    )
    return b.write_tar(tmp_path / "image.tar") if form == "archive" else b.write_dir(tmp_path / "image")


@pytest.mark.parametrize("form", ["archive", "directory"])
def test_open_rootfs_merges_layers_and_reads_bytes(tmp_path: Path, form: str) -> None:
    """Two layers from an archive or a directory: the merged tree, and bytes read from the right layer."""
    one = tar_bytes([file_member("etc/a", b"lower a"), file_member("etc/b", b"lower b")])
    two = tar_bytes([file_member("etc/a", b"upper a"), whiteout("etc/.wh.b"), link_member("etc/c", "etc/a")])
    img = open_rootfs(str(image(tmp_path, [one, two], form=form)), ref="v1")
    try:
        entries = img.merged.entries
        assert sorted(entries) == ["etc", "etc/a", "etc/c"]
        a = entries["etc/a"]
        assert img.sources.pread(a, 0, 100) == b"upper a" and entries["etc/c"] == a
        assert a.meta is not None and a.meta.group and entries["etc/c"].meta is a.meta  # one inode
        assert img.merged.notes == []
    finally:
        img.close()


def test_open_rootfs_refuses_a_diff_id_mismatch_naming_the_layer(tmp_path: Path) -> None:
    """config.md: diff_ids[i] is layer i's uncompressed digest; a mismatch refuses unless told to serve."""
    one, two = tar_bytes([file_member("a", b"1")]), tar_bytes([file_member("b", b"2")])
    path = str(image(tmp_path, [one, two], diff_ids=[_sha(one), _sha(b"something else")]))
    with pytest.raises(DiffIdMismatch) as caught:
        open_rootfs(path)
    assert (
        caught.value.index == 1 and "layer 1" in str(caught.value) and "ignore_diff_ids" in str(caught.value)
    )
    img = open_rootfs(path, ignore_diff_ids=True)
    img.close()


def test_open_rootfs_refuses_a_diff_id_count_mismatch(tmp_path: Path) -> None:
    """Fewer diff_ids than layers: which diff_id belongs to which layer is unknown; refused."""
    one = tar_bytes([file_member("a", b"1")])
    with pytest.raises(LayerError, match="1 layers, the config's rootfs.diff_ids 0"):
        open_rootfs(str(image(tmp_path, [one], diff_ids=[])))


def test_open_rootfs_refuses_a_layer_that_is_not_a_tar(tmp_path: Path) -> None:
    """A layer blob of garbage: one line naming the layer."""
    garbage = b"this is not a tar archive at all" * 40
    with pytest.raises(NotAnArchive, match="layer 0"):
        open_rootfs(str(image(tmp_path, [garbage])))


def test_open_rootfs_refuses_absent_non_distributable_layers(tmp_path: Path) -> None:
    """A non-distributable layer left out of the archive: a clear refusal, with its urls."""
    one = tar_bytes([file_member("a", b"1")])
    nondist = "application/vnd.oci.image.layer.nondistributable.v1.tar"
    urls = [{"urls": ["https://example.com/layer"]}]
    path = str(image(tmp_path, [one], media_types=[nondist], drop={0}, extra=urls))
    with pytest.raises(LayerError, match="non-distributable and not in the archive.*example.com/layer"):
        open_rootfs(path)


def test_open_rootfs_refuses_unknown_media_types(tmp_path: Path) -> None:
    """A layer whose media type is not a layer (or one compressed with what no layer type names)."""
    one = tar_bytes([file_member("a", b"1")])
    with pytest.raises(LayerError, match="media type 'application/x-other' is not a layer"):
        open_rootfs(str(image(tmp_path, [one], media_types=["application/x-other"])))


def test_open_rootfs_refuses_a_config_without_diff_ids(tmp_path: Path) -> None:
    """A config with no rootfs.diff_ids list: the image is not one a rootfs can be made of."""
    b = LayoutBuilder()
    b.tag(b.image([tar_bytes([])], config={"os": "linux", "architecture": "amd64"}), "v1")
    with pytest.raises(InvalidDocument, match="diff_ids"):
        open_rootfs(str(b.write_tar(tmp_path / "x.tar")))


def test_open_rootfs_skips_hostile_members_with_notes(tmp_path: Path) -> None:
    """Traversal, '..' in whiteouts, hardlinks to missing names: skipped and noted, never served."""
    hostile = tar_bytes(
        [
            file_member("../../etc/shadow", b"x"),
            file_member("/abs", b"x"),
            whiteout("d/.wh.."),
            link_member("h", "missing"),
            link_member("s", "../../../../etc/passwd", tarfile.SYMTYPE),
            file_member("ok", b"fine"),
        ]
    )
    img = open_rootfs(str(image(tmp_path, [hostile])))
    try:
        assert sorted(img.merged.entries) == ["ok", "s"]  # a symlink is served as it is, never followed
        assert sorted(n.name for n in img.merged.notes) == ["../../etc/shadow", "/abs", "d/.wh..", "h"]
    finally:
        img.close()


def test_mount_refusal_is_one_line(tmp_path: Path) -> None:
    """``ocifuse mount --rootfs`` of an image with a bad diff_id: exit 2, one line naming the layer."""
    require_fuse()
    one = tar_bytes([file_member("a", b"1")])
    path = image(tmp_path, [one], diff_ids=[_sha(b"other")])
    (tmp_path / "mnt").mkdir()
    done = run_ocifuse("mount", "--rootfs", "--no-cache", path, tmp_path / "mnt")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "layer 0" in done.stderr, done.stderr


def _codes(path: Path, layers: bool = True) -> list[tuple[str, str | None]]:
    with open_layout(path) as layout:
        report = check(layout, layers=layers)
    return [(f.code, f.digest) for f in report.findings]


def test_fsck_layers_finds_a_diff_id_mismatch(tmp_path: Path) -> None:
    """fsck --layers: diffid-mismatch names the layer; plain fsck cannot see it (the blobs are intact)."""
    one, two = tar_bytes([file_member("a", b"1")]), tar_bytes([file_member("b", b"2")])
    path = image(tmp_path, [one, two], diff_ids=[_sha(one), _sha(b"other")])
    assert _codes(path, layers=False) == []
    assert _codes(path) == [("diffid-mismatch", _sha(two))]


def test_fsck_layers_finds_bad_layers_and_skipped_members(tmp_path: Path) -> None:
    """A layer that is not a tar is layer-invalid; hostile members are layer-member-skipped warnings."""
    garbage = b"not a tar" * 100
    hostile = tar_bytes([file_member("../x", b""), link_member("h", "missing"), whiteout(".wh.")])
    path = image(tmp_path, [hostile, garbage])
    found = _codes(path)
    assert found.count(("layer-member-skipped", _sha(hostile))) == 3
    assert ("layer-invalid", _sha(garbage)) in found and len(found) == 4
    done = subprocess.run(
        [str(OCIFUSE), "fsck", "--layers", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1 and "error: layer-invalid" in done.stdout


def test_fsck_layers_passes_a_good_image(tmp_path: Path) -> None:
    """A clean image: no findings with or without --layers."""
    one = tar_bytes([file_member("a", b"1"), link_member("b", "a")])
    assert _codes(image(tmp_path, [one])) == []
    assert _codes(image(tmp_path / "again", [one]), layers=False) == []


GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [(GZIP, gzip.compress), (ZSTD, pyzstd.compress), (DOCKER_GZIP, gzip.compress)],
    ids=["gzip", "zstd", "docker-gzip"],
)
def test_open_rootfs_reads_compressed_layers(tmp_path: Path, media_type: str, compress: Any) -> None:
    """gzip and zstd layers (OCI and Docker media types): merged, read at any offset, diff_id checked."""
    lower = tar_bytes([file_member("big", bytes(range(256)) * 4096), file_member("gone", b"x")])
    upper = tar_bytes([whiteout(".wh.gone"), file_member("new", b"new")])
    blobs = [compress(lower), compress(upper)]
    path = image(tmp_path, blobs, diff_ids=[_sha(lower), _sha(upper)], media_types=[media_type] * 2)
    img = open_rootfs(str(path))
    try:
        assert sorted(img.merged.entries) == ["big", "new"]
        big = img.merged.entries["big"]
        assert img.sources.pread(big, 500_000, 300) == (bytes(range(256)) * 4096)[500_000:500_300]
    finally:
        img.close()
    with pytest.raises(DiffIdMismatch, match="layer 1"):  # the digest of the compressed blob is no diff_id
        open_rootfs(
            str(
                image(
                    tmp_path / "bad",
                    blobs,
                    diff_ids=[_sha(lower), _sha(blobs[1])],
                    media_types=[media_type] * 2,
                )
            )
        )


def test_open_rootfs_refuses_damaged_compressed_layers(tmp_path: Path) -> None:
    """A gzip layer cut short, or one that decompresses to something that is not a tar: one line each."""
    layer = tar_bytes([file_member("f", os.urandom(100_000))])
    cut = gzip.compress(layer)[:-2000]
    with pytest.raises(CompressedDataError, match="layer 0"):
        open_rootfs(str(image(tmp_path / "cut", [cut], diff_ids=[_sha(layer)], media_types=[GZIP])))
    junk = b"no tar in here " * 100
    with pytest.raises(NotAnArchive, match="layer 0"):
        open_rootfs(
            str(image(tmp_path / "junk", [gzip.compress(junk)], diff_ids=[_sha(junk)], media_types=[GZIP]))
        )


def test_rootfs_options_belong_together() -> None:
    """rootfs-only options without rootfs: one OptionError each, before mounting; verify goes with both."""
    for given_options, message in (
        (["rootless"], "rootfs view only"),
        (["ref=v1"], "rootfs view only"),
        (["rootfs,platform=linux"], "OS/ARCH"),
    ):
        with pytest.raises(OptionError, match=message):
            mount_options.parse(given_options, fsname="x")
    opts = mount_options.parse(
        ["rootfs,ref=a\\,b,platform=linux/arm64/v8,rootless,ignore_diff_ids,verify"], fsname="x"
    )
    assert (opts.rootfs, opts.ref, opts.platform, opts.rootless, opts.ignore_diff_ids, opts.verify) == (
        True, "a,b", model.Platform.parse("linux/arm64/v8"), True, True, True
    )  # fmt: skip


def _forgery(plain: bytes, blob: bytes, compression: str) -> bytes:
    """A hostile archive's layer claiming the genuine one's digest: other bytes, of ``blob``'s size.

    Same size, or the descriptor's size check alone would refuse it; some spelling of "genuine"
    at some level compresses to exactly that size.
    """
    for spelling in (b"Genuine", b"genuinE", b"GENUINE", b"hostile", b"gEnuine"):
        other = plain.replace(b"genuine", spelling)
        for level in range(1, 20):
            if compression == "none":
                out = other
            elif compression == "gzip":
                out = gzip.compress(other, compresslevel=min(level, 9), mtime=0)
            else:
                out = pyzstd.compress(other, level)
            if len(out) == len(blob):
                return out
    pytest.fail(f"no forgery of {len(blob)} {compression} bytes")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_a_forged_layer_leaves_nothing_in_the_cache(tmp_path: Path, compression: str) -> None:
    """A layer blob that is not its digest is refused, and stores no index, table or tree under it.

    Cache entries are keyed by the digests an archive claims: were they stored before the blob was
    hashed, a hostile archive would decide what a later mount of the genuine image serves.
    """
    plain = tar_bytes([file_member("etc/motd", b"genuine motd\n"), file_member("etc/shadow", b"genuine")])
    blob = {"none": plain, "gzip": gzip.compress(plain, mtime=0), "zstd": pyzstd.compress(plain)}[compression]
    media = {"none": TAR, "gzip": TAR + "+gzip", "zstd": TAR + "+zstd"}[compression]
    evil = _forgery(plain, blob, compression)
    cache = IndexCache(str(tmp_path / "cache"))
    hostile = image(
        tmp_path / "hostile", [blob], media_types=[media], diff_ids=[_sha(plain)], forged={0: evil}
    )
    with pytest.raises(LayerError, match="hashes to"):
        open_rootfs(str(hostile), ref="v1", cache=cache)
    assert cache.entries() == []
    genuine = image(tmp_path / "genuine", [blob], media_types=[media], diff_ids=[_sha(plain)])
    for _ in range(2):  # the first open builds and stores, the second reads the cache
        img = open_rootfs(str(genuine), ref="v1", cache=cache)
        try:
            entry = img.merged.entries["etc/motd"]
            assert img.sources.pread(entry, 0, entry.size) == b"genuine motd\n"
        finally:
            img.close()
    assert cache.entries() != []


def test_a_forged_layer_is_refused_without_a_cache(tmp_path: Path) -> None:
    """With no cache (nocache) the first pass still hashes the blob: a forged layer is refused."""
    plain = tar_bytes([file_member("etc/motd", b"genuine motd\n")])
    hostile = image(tmp_path, [plain], forged={0: _forgery(plain, plain, "none")})
    with pytest.raises(LayerError, match="hashes to"):
        open_rootfs(str(hostile), ref="v1")


def test_verify_hashes_layers_even_when_cached(tmp_path: Path) -> None:
    """-o verify: a layer is hashed at open even when its table and tree come from the cache."""
    plain = tar_bytes([file_member("etc/motd", b"genuine motd\n")])
    cache = IndexCache(str(tmp_path / "cache"))
    open_rootfs(str(image(tmp_path / "genuine", [plain])), ref="v1", cache=cache).close()
    hostile = image(tmp_path / "hostile", [plain], forged={0: _forgery(plain, plain, "none")})
    open_rootfs(str(hostile), ref="v1", cache=cache).close()  # trusted: what the cache holds was hashed
    with pytest.raises(LayerError, match="hashes to"):
        open_rootfs(str(hostile), ref="v1", cache=cache, verify=True)


def test_more_layers_than_served_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest listing more layers than MAX_LAYERS (one blob many times) is refused in one line."""
    monkeypatch.setattr("ocifuse.image.MAX_LAYERS", 3)
    layer = tar_bytes([file_member("etc/a", b"a")])
    with pytest.raises(LayerError, match="lists 4 layers; at most 3"):
        open_rootfs(str(image(tmp_path, [layer] * 4)), ref="v1")
    open_rootfs(str(image(tmp_path / "ok", [layer] * 3)), ref="v1").close()


@pytest.mark.parametrize("asked", ["linux/arm64", "windows/amd64"])
def test_a_platform_the_only_image_is_not_for_is_refused_with_what_there_is(
    tmp_path: Path, asked: str
) -> None:
    """index.json names one linux/amd64 manifest: --platform of another is refused, as inspect does."""
    path = str(image(tmp_path, [tar_bytes([file_member("f", b"x")])]))
    with pytest.raises(NotFound, match=rf"^v1: no manifest for {asked} \(it has linux/amd64\)$"):
        open_rootfs(path, platform=Platform.parse(asked))
    open_rootfs(path, platform=Platform.parse("linux/amd64")).close()
    with open_layout(path) as layout:
        summary = inspect.summarize(layout, platform=Platform.parse(asked))
    assert summary.error == f"v1: no manifest for {asked} (it has linux/amd64)"


def test_a_platform_an_index_lacks_is_refused_with_the_platforms_it_has(tmp_path: Path) -> None:
    b = LayoutBuilder()
    amd = b.image([b"a"], config={"architecture": "amd64", "os": "linux"})
    arm = b.image([b"b"], config={"architecture": "arm64", "os": "linux"})
    b.tag(
        b.index(
            [
                {**amd, "platform": {"os": "linux", "architecture": "amd64"}},
                {**arm, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ]
        ),
        "multi",
    )
    path = str(b.write_tar(tmp_path / "multi.tar"))
    with pytest.raises(
        NotFound, match=r"^multi: no manifest for linux/s390x \(it has linux/amd64, linux/arm64/v8\)$"
    ):
        open_rootfs(path, platform=Platform.parse("linux/s390x"))


def test_mount_refuses_a_platform_the_image_is_not_for_in_one_line(tmp_path: Path) -> None:
    """mount --rootfs resolves as inspect does: the same refusal, with the platforms there are."""
    require_fuse()
    path = image(tmp_path, [tar_bytes([file_member("f", b"x")])])
    (tmp_path / "mnt").mkdir()
    done = run_ocifuse("mount", "-f", "--rootfs", "--platform", "linux/arm64", path, tmp_path / "mnt")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ocifuse: v1: no manifest for linux/arm64 (it has linux/amd64)"
    ]


def _compressed_outer(tmp_path: Path, kind: str) -> tuple[Path, list[bytes]]:
    """A one-image oci-archive of two gzip layers of random bytes, then gzip- or zstd-compressed whole."""
    rng = random.Random(7)
    files = [tar_bytes([file_member(f"f{i}", rng.randbytes(10 << 20))]) for i in range(2)]
    plain = image(
        tmp_path,
        [gzip.compress(f, 1) for f in files],
        diff_ids=[_sha(f) for f in files],
        media_types=[GZIP] * 2,
    )
    data = plain.read_bytes()
    out = tmp_path / f"image.tar.{kind}"
    out.write_bytes(
        gzip.compress(data, 1) if kind == "gz" else pyzstd.compress(data)
    )  # zstd: one frame, spilled
    return out, files


class _ArchiveReads:
    """Bytes read from one file by pread (the archive): everything the read core reads of it."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ino = path.stat().st_ino
        self.total = 0
        real = os.pread

        def pread(fd: int, size: int, offset: int) -> bytes:
            data = real(fd, size, offset)
            if os.fstat(fd).st_ino == self.ino:
                self.total += len(data)
            return data

        monkeypatch.setattr(os, "pread", pread)


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_second_rootfs_open_of_a_compressed_archive_decompresses_nothing(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--rootfs of a .tar.gz/.tar.zst: its index, table, layers' indexes and tree come from the cache."""
    from ocifuse import gzipsource, zstdsource
    from ocifuse.cache import KEY_SPAN

    path, files = _compressed_outer(tmp_path, kind)
    cache = IndexCache(str(tmp_path / "cache"))
    reads = _ArchiveReads(path, monkeypatch)
    open_rootfs(str(path), cache=cache).close()
    assert reads.total >= path.stat().st_size  # the first open decompressed it all
    stored = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert any(name.startswith("spill.") for name in stored) == (kind == "zst")

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("decompressed again")

    monkeypatch.setattr(gzipsource.GzipSource, "_build", no_pass)
    monkeypatch.setattr(zstdsource, "_zstd_pass", no_pass)
    reads.total = 0
    img = open_rootfs(str(path), cache=cache)
    try:
        # The archive's identity (its first and last MiB), and where each layer's index starts.
        # No layer is read until a file is: the archive's identity (its first and last MiB), and
        # the chunks that hold index.json, the manifest and the config (resolving reads them).
        assert reads.total <= 2 * KEY_SPAN + 3 * gzipsource.GZIP_CHUNK < path.stat().st_size // 3
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stored  # no spill
        entry = img.merged.entries["f1"]
        with tarfile.open(fileobj=io.BytesIO(files[1])) as tf:
            member = tf.extractfile("f1")
            assert member is not None
            assert img.sources.pread(entry, 0, entry.size) == member.read()
    finally:
        img.close()


@pytest.mark.parametrize(("kind", "option"), [("gz", "max_size"), ("zst", "max_size"), ("zst", "spill_max")])
def test_rootfs_of_a_compressed_archive_keeps_the_limits(tmp_path: Path, kind: str, option: str) -> None:
    """-o max_size / spill_max bound the outer archive's pass for --rootfs as for the layout view."""
    from ocifuse.errors import DecompressionLimit
    from ocifuse.streams import Limits

    path, _ = _compressed_outer(tmp_path, kind)
    with pytest.raises(DecompressionLimit, match=f"the {option} bound"):
        open_rootfs(str(path), limits=Limits(**{option: 1 << 20}))


class _Decompressed:
    """Bytes rapidgzip and pyzstd put out, counted: a pass's and a read's through an index alike."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from ocifuse import gzipsource

        self.total = 0
        counter = self

        class Counting:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def read(self, size: int = -1) -> bytes:
                data: bytes = self._inner.read(size)
                counter.total += len(data)
                return data

            def readinto(self, buf: Any) -> int:
                n: int = self._inner.readinto(buf)
                counter.total += n
                return n

            def decompress(self, data: bytes, max_length: int = -1) -> bytes:
                out: bytes = self._inner.decompress(data, max_length)
                counter.total += len(out)
                return out

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

        real_reader, real_decompressor, real_decompress = (
            gzipsource._gzip_reader,
            pyzstd.ZstdDecompressor,
            pyzstd.decompress,
        )

        def decompress(data: bytes, *args: Any, **kwargs: Any) -> bytes:
            out: bytes = real_decompress(data, *args, **kwargs)
            counter.total += len(out)
            return out

        monkeypatch.setattr(
            gzipsource, "_gzip_reader", lambda raw, threads=1: Counting(real_reader(raw, threads))
        )
        monkeypatch.setattr(pyzstd, "ZstdDecompressor", lambda **kw: Counting(real_decompressor(**kw)))
        monkeypatch.setattr(pyzstd, "decompress", decompress)


def _one_pass_layers() -> list[bytes]:
    """Two layer tars: many small members of every kind, a PAX xattr, a long name, files across
    1 MiB chunks; the second without end-of-archive blocks (umoci insert)."""
    rng = random.Random(17)
    exe = file_member("usr/bin/tool", rng.randbytes(3 << 20))
    exe.info.pax_headers = {"SCHILY.xattr.security.capability": "x"}
    lower = tar_bytes(
        [
            *(file_member(f"etc/f{i}", rng.randbytes(rng.randrange(0, 3000))) for i in range(400)),
            exe,
            link_member("usr/bin/same", "usr/bin/tool"),
            link_member("usr/bin/link", "tool", tarfile.SYMTYPE),
            file_member("d/" + "n" * 150, b"long name"),
            file_member("usr/lib/big", bytes(range(256)) * 9000),
        ]
    )
    upper = tar_bytes(
        [whiteout("etc/.wh.f1"), *(file_member(f"var/g{i}", rng.randbytes(700)) for i in range(200))],
        end=False,
    )
    return [lower, upper]


def _zstd_frames(data: bytes) -> bytes:
    """zstd in frames of 100,000 bytes (pzstd, zstd:chunked write many): a frame table, read in place."""
    return b"".join(pyzstd.compress(data[i : i + 100_000]) for i in range(0, len(data), 100_000))


_COMPRESS: dict[str, tuple[str, Any]] = {
    "gzip": (GZIP, lambda data: gzip.compress(data, 1)),
    "zstd": (ZSTD, pyzstd.compress),
    "zstd-frames": (ZSTD, _zstd_frames),
    "zstd-spill": (ZSTD, pyzstd.compress),  # the first layer: one frame over 8 MiB
}


@pytest.mark.parametrize("compression", list(_COMPRESS))
def test_a_first_open_decompresses_each_layer_once(
    tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first open: one pass per compressed layer builds its index, hashes its diff_id and scans its
    tar; the tables stored and the bytes served are the ones a scan of the plain layer gives."""
    from ocifuse.cache import blob_key
    from ocifuse.digest import Digest
    from ocifuse.layer import LayerTable
    from ocifuse.source import MemorySource
    from ocifuse.zstdsource import ZSTD_FRAME_INPLACE

    media_type, compress = _COMPRESS[compression]
    plains = _one_pass_layers()
    if compression == "zstd-spill":
        plains[0] += bytes(9 << 20)  # zero blocks after the end: the layer's tar ends before its stream
    blobs = [compress(p) for p in plains]
    path = image(tmp_path, blobs, diff_ids=[_sha(p) for p in plains], media_types=[media_type] * 2)
    cache = IndexCache(str(tmp_path / "cache"))
    decompressed = _Decompressed(monkeypatch)
    scans: list[str] = []
    real_scan = LayerTable.scan

    def scan(source: Any, name: str) -> LayerTable:
        scans.append(name)
        return real_scan(source, name)

    monkeypatch.setattr(LayerTable, "scan", scan)
    img = open_rootfs(str(path), cache=cache)
    try:
        assert scans == []  # no layer scanned through its index: its pass built the table
        total = sum(len(p) for p in plains)
        if (
            compression == "zstd-spill"
        ):  # a large frame: the pass in place stops there, the spill pass reads all
            assert total < decompressed.total <= total + ZSTD_FRAME_INPLACE + (1 << 20)
        else:
            assert decompressed.total == total
        for blob, plain in zip(blobs, plains, strict=True):
            stored = cache.load("layer-table", blob_key(Digest.parse(_sha(blob))))
            assert stored == real_scan(MemorySource(plain), "layer").to_bytes(len(plain))
        tool = img.merged.entries["usr/bin/tool"]
        with tarfile.open(fileobj=io.BytesIO(plains[0])) as tf:
            member = tf.extractfile("usr/bin/tool")
            assert member is not None
            assert img.sources.pread(tool, 0, tool.size) == member.read()
        assert "etc/f1" not in img.merged.entries and "var/g199" in img.merged.entries
    finally:
        img.close()


def test_a_layer_whose_index_or_table_is_stored_is_opened_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index stored, not the table: the table is scanned through the index. The table stored,
    not the index: the index's pass scans nothing. Either way the same tree."""
    from ocifuse.layer import LayerScan

    plains = _one_pass_layers()
    path = image(
        tmp_path,
        [gzip.compress(p, 1) for p in plains],
        diff_ids=[_sha(p) for p in plains],
        media_types=[GZIP] * 2,
    )
    cache_dir = tmp_path / "cache"
    cache = IndexCache(str(cache_dir))
    first = open_rootfs(str(path), cache=cache)
    entries = sorted(first.merged.entries)
    first.close()
    walks: list[str] = []
    real_call = LayerScan.__call__

    def walk(self: LayerScan, stream: Any) -> None:
        walks.append(self.name)
        real_call(self, stream)

    monkeypatch.setattr(LayerScan, "__call__", walk)
    for drop in ("layer-table", "gzip-index"):
        for e in cache.entries():
            if e.kind in (drop, "rootfs-tree"):
                (cache_dir / e.name).unlink()
        decompressed = _Decompressed(monkeypatch)
        img = open_rootfs(str(path), cache=cache)
        try:
            assert sorted(img.merged.entries) == entries
            assert walks == []
            if drop == "gzip-index":  # one pass, the table from the cache
                assert decompressed.total == sum(len(p) for p in plains)
            else:  # the table scanned through the index, as before (seeking over big files' data)
                assert decompressed.total > 0
        finally:
            img.close()
        assert {e.kind for e in cache.entries()} >= {"layer-table", "gzip-index", "rootfs-tree"}


_OPEN = tar_bytes([file_member("etc/a", os.urandom(50_000)), file_member("etc/b", b"b" * 3000)], end=False)
_TAR = _OPEN + bytes(1024)
_GZ = gzip.compress(_TAR, mtime=0)  # one stream: two compress calls a second apart differ in MTIME


@pytest.mark.parametrize(
    ("blob", "plain", "error", "message"),
    [
        (gzip.compress(_TAR) + b"garbage!", _TAR, CompressedDataError, "trailing data"),
        (gzip.compress(_TAR)[:-3000], _TAR, CompressedDataError, "gzip"),
        (pyzstd.compress(_TAR)[:-100], _TAR, CompressedDataError, "truncated"),
        (gzip.compress(_TAR[:30_000]), _TAR[:30_000], TruncatedArchive, "etc/a runs past the end"),
        (gzip.compress(_OPEN + b"x" * 512), _OPEN + b"x" * 512, NotAnArchive, "invalid tar header"),
        (pyzstd.compress(b"no tar " * 500), b"no tar " * 500, NotAnArchive, "not a tar"),
        (gzip.compress(_GZ), _GZ, NotAnArchive, "gzip-compressed data"),
        (gzip.compress(_TAR), _TAR, DecompressionLimit, "max_size"),
    ],
    ids=[
        "gzip-trailing",
        "gzip-cut",
        "zstd-cut",
        "tar-cut",
        "tar-trailing",
        "not-a-tar",
        "gzip-in-gzip",
        "max-size",
    ],
)
def test_a_layer_pass_keeps_every_refusal(
    tmp_path: Path, blob: bytes, plain: bytes, error: type[Exception], message: str
) -> None:
    """The pass that scans a layer as it decompresses refuses what the pass and the scan refused:
    the stream's end and bounds first, then the tar, each naming the layer."""
    media = ZSTD if blob.startswith(b"\x28\xb5\x2f\xfd") else GZIP
    path = image(tmp_path, [blob], diff_ids=[_sha(plain)], media_types=[media])
    limits = Limits(max_size=len(plain) - 1) if error is DecompressionLimit else Limits()
    with pytest.raises(error, match=message) as found:
        open_rootfs(str(path), cache=IndexCache(str(tmp_path / "cache")), limits=limits)
    assert "layer 0" in str(found.value)


def test_a_layer_that_cannot_be_served_is_judged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the tree cached, a layer opens on its first read; its failure is kept, not redone per read."""
    from ocifuse import image as image_module

    layer = tar_bytes([file_member("f", b"x" * 100)])
    cache = IndexCache(str(tmp_path / "cache"))
    open_rootfs(str(image(tmp_path / "whole", [layer])), cache=cache).close()
    img = open_rootfs(str(image(tmp_path / "gone", [layer], drop={0})), cache=cache)  # the tree cached
    opened: list[tuple[Any, ...]] = []
    real = image_module.layer_blob

    def counted(*args: Any) -> Any:
        opened.append(args)
        return real(*args)

    monkeypatch.setattr(image_module, "layer_blob", counted)
    try:
        entry = img.merged.entries["f"]
        for _ in range(3):
            with pytest.raises(LayerError, match="not in the layout"):
                img.sources.pread(entry, 0, 10)
        assert len(opened) == 1
    finally:
        img.close()


@pytest.mark.parametrize("media_type", [TAR, GZIP])
def test_every_layer_open_verdict_comes_before_a_refused_table(tmp_path: Path, media_type: str) -> None:
    """Each layer's table is built right after its own pass, while the others' run; the verdicts keep
    their order: a later layer's diff_id mismatch is raised before an earlier layer's tar refusal."""
    garbage = b"this is not a tar archive at all" * 40
    blob = garbage if media_type == TAR else gzip.compress(garbage)
    good = tar_bytes([file_member("b", b"2")])
    path = image(
        tmp_path / "order",
        [blob, good],
        diff_ids=[_sha(garbage), _sha(b"another")],
        media_types=[media_type, TAR],
    )
    with pytest.raises(DiffIdMismatch) as caught:
        open_rootfs(str(path), cache=IndexCache(str(tmp_path / "cache")))
    assert caught.value.index == 1
    path = image(
        tmp_path / "tar", [blob, good], diff_ids=[_sha(garbage), _sha(good)], media_types=[media_type, TAR]
    )
    with pytest.raises(NotAnArchive, match="layer 0"):
        open_rootfs(str(path), cache=IndexCache(str(tmp_path / "cache")))
