"""The read core over both backends: header, index, blobs, size and digest checks, confinement."""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import closing
from pathlib import Path

import pytest
from conftest import LayoutFactory, RealImage
from oci import LayoutBuilder
from tarbuild import ODD_FORMATS, SKIPPED_NAMES, specials

from ocifuse import open_layout
from ocifuse.digest import Digest
from ocifuse.errors import (
    BlobNotFound,
    DigestMismatch,
    FileMissing,
    InvalidDocument,
    LayoutOpenError,
    SizeMismatch,
    TooLarge,
)
from ocifuse.layout import ArchiveLayout, DirectoryLayout, Layout
from ocifuse.model import REF_NAME, Descriptor, Manifest

LAYER = os.urandom(300_000)


def image_builder(algorithm: str = "sha256") -> tuple[LayoutBuilder, Descriptor]:
    """A layout with one tagged image whose second layer is LAYER; returns it and that layer's descriptor."""
    b = LayoutBuilder(algorithm=algorithm)
    b.tag(b.image([b"small layer", LAYER]), "v1")
    return b, Descriptor.from_json("layer", b.blob(LAYER))


def test_header_and_index(any_layout: LayoutFactory) -> None:
    """oci-layout and index.json parse into their values."""
    b, _ = image_builder()
    layout = any_layout(b)
    assert layout.header().image_layout_version == "1.0.0"
    index = layout.index()
    assert [d.ref_name for d in index.manifests] == ["v1"]


def test_missing_oci_layout_is_file_missing(any_layout: LayoutFactory) -> None:
    """A layout without oci-layout raises FileMissing naming it."""
    b, _ = image_builder()
    b.layout_version = None
    with pytest.raises(FileMissing) as info:
        any_layout(b).header()
    assert info.value.name == "oci-layout"


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[]", b"{}", b'{"imageLayoutVersion": 1}'],
    ids=["junk", "array", "empty", "int"],
)
def test_invalid_oci_layout(any_layout: LayoutFactory, content: bytes) -> None:
    """oci-layout must be an object with a string imageLayoutVersion."""
    b, _ = image_builder()
    b.files["oci-layout"] = content
    with pytest.raises(InvalidDocument):
        any_layout(b).header()


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b'{"schemaVersion": 2}', b'{"schemaVersion": 1, "manifests": []}', b"[" * 100_000],
    ids=["empty", "unclosed", "no-manifests", "version-1", "deep"],
)
def test_invalid_index_json(any_layout: LayoutFactory, content: bytes) -> None:
    """A broken index.json is InvalidDocument (deep nesting included)."""
    b, _ = image_builder()
    b.files["index.json"] = content
    with pytest.raises(InvalidDocument) as info:
        any_layout(b).index()
    assert info.value.name == "index.json"


def test_blob_size_has_blob_and_missing_blob(any_layout: LayoutFactory) -> None:
    """Sizes come from the backend; a digest without a file is BlobNotFound."""
    b, layer = image_builder()
    layout = any_layout(b)
    assert layout.blob_size(layer.digest) == len(LAYER)
    assert layout.has_blob(layer.digest)
    missing = Digest.of(b"not stored")
    assert not layout.has_blob(missing)
    with pytest.raises(BlobNotFound) as info:
        layout.blob_size(missing)
    assert info.value.digest == str(missing)
    with pytest.raises(BlobNotFound):
        list(layout.iter_blob(missing))


@pytest.mark.parametrize("chunk", [1, 4096, 1 << 20])
def test_iter_blob_streams_in_chunks(any_layout: LayoutFactory, chunk: int) -> None:
    """iter_blob yields the blob's bytes in chunks no larger than asked."""
    b, layer = image_builder()
    layout = any_layout(b)
    if chunk == 1:
        chunks = list(layout.iter_blob(Digest.of(b"small layer"), chunk))
        assert chunks == [bytes([c]) for c in b"small layer"]
        return
    chunks = list(layout.iter_blob(layer.digest, chunk))
    assert all(len(c) <= chunk for c in chunks)
    assert b"".join(chunks) == LAYER


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_read_blob_verifies(any_layout: LayoutFactory, algorithm: str) -> None:
    """read_blob returns bytes whose size and digest match the descriptor."""
    b, layer = image_builder(algorithm)
    assert layer.digest.algorithm == algorithm
    assert any_layout(b).read_blob(layer) == LAYER


def test_read_blob_size_mismatch(any_layout: LayoutFactory) -> None:
    """A descriptor whose size differs from the blob's raises SizeMismatch with both sizes."""
    b, layer = image_builder()
    wrong = Descriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size + 1)
    with pytest.raises(SizeMismatch) as info:
        any_layout(b).read_blob(wrong)
    assert (info.value.expected, info.value.found) == (layer.size + 1, layer.size)


def test_read_blob_digest_mismatch(any_layout: LayoutFactory) -> None:
    """A blob whose bytes changed (same size) raises DigestMismatch."""
    b, layer = image_builder()
    b.files[layer.digest.path] = bytes(len(LAYER))
    with pytest.raises(DigestMismatch) as info:
        any_layout(b).read_blob(layer)
    assert info.value.expected == str(layer.digest)
    assert info.value.found == str(Digest.of(bytes(len(LAYER))))


def test_read_blob_unverifiable_algorithm_is_read_unverified(any_layout: LayoutFactory) -> None:
    """A well-formed unknown algorithm's blob is served (size-checked) but not judged corrupt."""
    b, _ = image_builder()
    digest = Digest.parse("b3:" + "a" * 64)
    b.files[digest.path] = b"whatever"
    layout = any_layout(b)
    assert layout.read_blob(Descriptor(media_type="x", digest=digest, size=8)) == b"whatever"


def test_read_blob_limit_is_too_large(any_layout: LayoutFactory) -> None:
    """read_blob refuses to hold more than its limit in memory."""
    b, layer = image_builder()
    with pytest.raises(TooLarge):
        any_layout(b).read_blob(layer, limit=1000)


def test_document_parses_the_manifest(any_layout: LayoutFactory) -> None:
    """document() of index.json's entry is the Manifest."""
    b, layer = image_builder()
    layout = any_layout(b)
    doc = layout.document(layout.index().manifests[0])
    assert isinstance(doc, Manifest)
    assert doc.layers[1].digest == layer.digest


def test_list_blobs_and_file_names(any_layout: LayoutFactory) -> None:
    """Every file under blobs/ is listed with its digest, or None when its path names no digest."""
    b, _ = image_builder()
    b.files["blobs/sha256/not-a-digest"] = b"x"
    b.files["blobs/README"] = b"y"
    layout = any_layout(b)
    listed = dict(layout.list_blobs())
    expected = {n: Digest.from_path(n) for n in b.files}
    assert listed == expected
    assert listed["blobs/sha256/not-a-digest"] is None
    assert set(layout.file_names()) == set(b.layout_files())


def test_both_backends_agree(tmp_path: Path) -> None:
    """The archive and the directory of one layout list the same files with the same bytes."""
    b, _ = image_builder()
    with (
        closing(open_layout(str(b.write_tar(tmp_path / "l.tar")))) as a,
        closing(DirectoryLayout(str(b.write_dir(tmp_path / "l")))) as d,
    ):
        assert sorted(a.file_names()) == sorted(d.file_names())
        for name in a.file_names():
            assert a.read_small(name) == d.read_small(name)
        assert a.skipped == d.skipped == []


@pytest.mark.parametrize("name", ["../x", "blobs/../index.json", "/index.json", "", "blobs/", "blobs"])
def test_unsafe_or_non_file_names_are_missing(any_layout: LayoutFactory, name: str) -> None:
    """Names with ``..``, absolute or empty names, and directories are FileMissing in both backends."""
    b, _ = image_builder()
    layout = any_layout(b)
    with pytest.raises(FileMissing):
        layout.size_of(name)
    with pytest.raises(FileMissing):
        layout.read_at(name, 0, 10)


def test_read_at_is_clipped(any_layout: LayoutFactory) -> None:
    """read_at returns at most the bytes left in the file."""
    b, layer = image_builder()
    layout = any_layout(b)
    assert layout.read_at(layer.digest.path, len(LAYER) - 3, 100) == LAYER[-3:]
    assert layout.read_at(layer.digest.path, len(LAYER) + 10, 100) == b""


def test_context_manager_closes(tmp_path: Path) -> None:
    """``with open_layout(...)`` closes the backend on exit."""
    b, _ = image_builder()
    with open_layout(b.write_tar(tmp_path / "l.tar")) as layout:
        assert isinstance(layout, ArchiveLayout)
    assert layout.archive.fd == -1
    with open_layout(b.write_dir(tmp_path / "l")) as dlayout:
        assert isinstance(dlayout, DirectoryLayout)
    assert dlayout._root == -1


def test_concurrent_reads_share_one_fd(tmp_path: Path) -> None:
    """Threads reading different offsets of one archive get their own bytes (pread, no shared position)."""
    b, layer = image_builder()
    with open_layout(b.write_tar(tmp_path / "l.tar")) as layout:
        errors: list[str] = []

        def reader(start: int) -> None:
            for off in range(start, len(LAYER), 4096 * 8):
                if layout.read_at(layer.digest.path, off, 4096) != LAYER[off : off + 4096]:
                    errors.append(f"offset {off}")

        threads = [threading.Thread(target=reader, args=(i * 4096,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


# -- the directory backend never leaves its directory --------------------------------------------------


def _dir_layout(tmp_path: Path) -> tuple[Path, Descriptor]:
    b, layer = image_builder()
    return b.write_dir(tmp_path / "layout"), layer


def test_blob_symlink_out_of_the_directory_is_missing(tmp_path: Path) -> None:
    """blobs/sha256/<hex> as a symlink to /etc/passwd is BlobNotFound, never its content."""
    root, layer = _dir_layout(tmp_path)
    blob = root / layer.digest.path
    blob.unlink()
    blob.symlink_to("/etc/passwd")
    with DirectoryLayout(str(root)) as layout:
        assert not layout.has_blob(layer.digest)
        with pytest.raises(FileMissing):
            layout.read_at(layer.digest.path, 0, 100)
        with pytest.raises(BlobNotFound):
            list(layout.iter_blob(layer.digest))
        assert layer.digest.path not in set(layout.file_names())


def test_symlink_inside_the_directory_is_not_followed_either(tmp_path: Path) -> None:
    """Even a symlink to another file of the layout is refused: no symlink is ever followed."""
    root, layer = _dir_layout(tmp_path)
    (root / "index-link.json").symlink_to("index.json")
    with DirectoryLayout(str(root)) as layout, pytest.raises(FileMissing):
        layout.size_of("index-link.json")


def test_blobs_directory_symlink_is_not_followed(tmp_path: Path) -> None:
    """A ``blobs`` that is a symlink to a directory elsewhere (holding the right blobs) serves nothing."""
    root, layer = _dir_layout(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (root / "blobs").rename(elsewhere)
    (root / "blobs").symlink_to(elsewhere)
    with DirectoryLayout(str(root)) as layout:
        assert not layout.has_blob(layer.digest)
        assert list(layout.list_blobs()) == []
        assert layout.index().manifests  # index.json is still a plain file


def test_index_json_symlink_is_missing(tmp_path: Path) -> None:
    """index.json as a symlink (even to a valid index) is FileMissing."""
    root, _ = _dir_layout(tmp_path)
    (root / "index.json").rename(tmp_path / "real-index.json")
    (root / "index.json").symlink_to(tmp_path / "real-index.json")
    with DirectoryLayout(str(root)) as layout, pytest.raises(FileMissing):
        layout.index()


def test_fifo_blob_is_missing_and_does_not_hang(tmp_path: Path) -> None:
    """A fifo where a blob should be is refused at once (no open that waits for a writer)."""
    root, layer = _dir_layout(tmp_path)
    blob = root / layer.digest.path
    blob.unlink()
    os.mkfifo(blob)
    with DirectoryLayout(str(root)) as layout:
        assert not layout.has_blob(layer.digest)
        assert layer.digest.path not in set(layout.file_names())


def test_blob_that_is_a_directory_is_missing(tmp_path: Path) -> None:
    """A directory at a blob's path is not a blob."""
    root, layer = _dir_layout(tmp_path)
    blob = root / layer.digest.path
    blob.unlink()
    blob.mkdir()
    with DirectoryLayout(str(root)) as layout:
        assert not layout.has_blob(layer.digest)


# -- open_layout -------------------------------------------------------------------------------------------


def test_open_layout_detects_the_backend(tmp_path: Path) -> None:
    """A directory opens as DirectoryLayout, a file as ArchiveLayout; str and Path both work."""
    b, _ = image_builder()
    tar = b.write_tar(tmp_path / "l.tar")
    d = b.write_dir(tmp_path / "l")
    with open_layout(tar) as a, open_layout(str(d)) as dl:
        assert isinstance(a, ArchiveLayout) and isinstance(dl, DirectoryLayout)
        assert a.path == str(tar) and dl.path == str(d)


def test_open_layout_missing_path(tmp_path: Path) -> None:
    """A path that does not exist is a LayoutOpenError naming it."""
    with pytest.raises(LayoutOpenError) as info:
        open_layout(tmp_path / "nothing")
    assert info.value.path == str(tmp_path / "nothing")


def test_archive_layout_reports_skipped_members(tmp_path: Path) -> None:
    """ArchiveLayout.skipped is the archive's record of members it did not serve."""
    with open_layout(specials(tmp_path)) as layout:
        assert {s.name for s in layout.skipped} == SKIPPED_NAMES["specials"]
        assert layout.index().manifests


@pytest.mark.parametrize("case", ODD_FORMATS)
def test_odd_formats_are_valid_layouts(case: str, tmp_path: Path) -> None:
    """Every odd-format fixture opens as a layout whose blobs all verify."""
    with open_layout(ODD_FORMATS[case](tmp_path)) as layout:
        assert layout.header().image_layout_version == "1.0.0"
        assert layout.index().manifests
        blobs = [(n, d) for n, d in layout.list_blobs() if d is not None]
        assert len(blobs) >= 4
        for _, digest in blobs:
            v = digest.verifier()
            for chunk in layout.iter_blob(digest):
                v.update(chunk)
            v.check()


# -- the real image (umoci + skopeo) ------------------------------------------------------------------------


def test_real_image_reads_in_both_backends(real_layout: Layout, real_image: RealImage) -> None:
    """skopeo's archive and its extraction: ref v1, a manifest, and every blob verifying."""
    assert real_layout.header().image_layout_version == "1.0.0"
    (entry,) = real_layout.index().manifests
    assert entry.annotations.get(REF_NAME) == "v1"
    manifest = real_layout.document(entry)
    assert isinstance(manifest, Manifest)
    assert len(manifest.layers) == 2  # hello.txt, then big.bin
    sizes = {real_layout.blob_size(d.digest) for d in manifest.layers}
    assert max(sizes) > len(real_image.files["/data/big.bin"]) // 2  # random bytes barely compress
    for desc in manifest.descriptors:
        h = hashlib.new(desc.digest.algorithm)
        for chunk in real_layout.iter_blob(desc.digest):
            h.update(chunk)
        assert h.hexdigest() == desc.digest.encoded
    assert real_layout.skipped == []


def test_real_archive_and_directory_list_the_same_files(real_archive: Path, real_layout_dir: Path) -> None:
    """Both backends of the real image hold the same files."""
    with open_layout(real_archive) as a, open_layout(real_layout_dir) as d:
        assert sorted(a.file_names()) == sorted(d.file_names())


def test_umoci_layout_has_both_tags(real_umoci_dir: Path) -> None:
    """umoci's own layout directory has refs v1 and v2."""
    with open_layout(real_umoci_dir) as layout:
        assert {d.ref_name for d in layout.index().manifests} == {"v1", "v2"}
