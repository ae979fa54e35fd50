"""The portable index: ``ocifuse index`` on one machine, ``-o index=`` on another with an empty cache.

The archive is the real image (umoci's gzip layers, skopeo's oci-archive), plain and compressed
as a whole; a URL is served by nginx on 127.0.0.1. That nothing is decompressed first is proved
by a spy on the first passes (gzip and zstd) in process, and by the mount's debug log.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import RealImage
from dockerbuild import DockerArchive, layer_tar
from mounting import mounted, run_ocifuse
from peers import compress
from servers import Nginx, nginx
from tarbuild import tree_of

from ocifuse import gzipsource, portable, zstdsource
from ocifuse.cache import IndexCache
from ocifuse.entries import Kind
from ocifuse.layout import TableLayout, ViewOptions
from ocifuse.makeindex import build_index
from ocifuse.views import open_layout, open_rootfs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The line a first pass over gzip data logs (gzipsource.GzipSource._build), at INFO.
FIRST_PASS = re.compile(r"gzip-compressed, \d+ bytes decompressed")


@pytest.fixture(scope="module")
def archives(real_image: RealImage, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real image's archive plain (gzip layers), as .tar.gz and as .tar.zst; an index of each."""
    root = tmp_path_factory.mktemp("portable")
    found = {"plain": root / "image.tar"}
    shutil.copy(real_image.archive, found["plain"])
    found["gzip"] = compress("gzip", found["plain"], root / "image.tar.gz")
    found["zstd"] = compress("zstd", found["plain"], root / "image.tar.zst")
    for kind, archive in list(found.items()):
        recorder, skipped = build_index(str(archive))
        assert skipped == []
        found[f"{kind}-index"] = root / f"{kind}.idx"
        found[f"{kind}-index"].write_bytes(recorder.encode())
    return found


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every first pass over compressed data (gzip or zstd) from now on, by what it decompressed."""
    ran: list[str] = []

    def spy(original: Callable[..., Any], name_at: int) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            ran.append(str(args[name_at]))
            return original(*args, **kwargs)

        return counted

    gzip_build = gzipsource.GzipSource._build.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(gzipsource.GzipSource, "_build", classmethod(spy(gzip_build, 2)))
    monkeypatch.setattr(zstdsource, "_zstd_pass", spy(zstdsource._zstd_pass, 1))
    return ran


def _rootfs_files(path: str, options: ViewOptions) -> dict[str, bytes]:
    """Every regular file of the image's root filesystem, with its bytes."""
    image = open_rootfs(path, options)
    try:
        return {
            "/" + name: image.sources.pread(entry, 0, entry.size)
            for name, entry in image.merged.entries.items()
            if entry.kind is Kind.FILE
        }
    finally:
        image.close()


def _layout_files(path: str, options: ViewOptions) -> dict[str, bytes]:
    """Every regular file of the layout view, with its bytes."""
    with open_layout(path, options) as layout:
        assert isinstance(layout, TableLayout)
        return {name: layout.read_at(name, 0, entry.size) for name, entry in layout.table.files()}


# -- in process: what is read from an index, and what is refused ---------------------------------


@pytest.mark.parametrize("kind", ["plain", "gzip", "zstd"])
def test_an_index_opens_with_nothing_decompressed_first(
    kind: str, archives: dict[str, Path], real_image: RealImage, tmp_path: Path, passes: list[str]
) -> None:
    """Made with one cache, used with another that is empty: no first pass, the bytes the archive's."""
    cache = IndexCache(str(tmp_path / "empty-cache"))
    options = ViewOptions(cache=cache, index=str(archives[f"{kind}-index"]))
    files = _rootfs_files(str(archives[kind]), options)
    for path in ("/hello.txt", "/data/big.bin"):  # tag v1's files
        assert files[path] == real_image.files[path]
    assert _layout_files(str(archives[kind]), options) == tree_of(real_image.layout_dir)[0]
    assert passes == []
    # Nothing of the index was copied into the cache (what a cache holds, this machine built).
    assert {e.kind for e in cache.entries()} <= {"table"}


def test_a_docker_archive_of_two_images(tmp_path: Path, passes: list[str]) -> None:
    """Its member digests (hashes of the stored layers) and both images' trees come from the index."""
    d = DockerArchive()
    base = layer_tar({"etc/motd": b"hello\n"})
    top = layer_tar({"app/data.txt": b"application data\n" * 100})
    d.add_image([base], ["localhost/base:latest"], compress=True)
    d.add_image([base, top], ["localhost/app:v1"], compress=True)
    archive = d.write(tmp_path / "docker.tar")
    recorder, skipped = build_index(str(archive))
    assert skipped == [] and ("docker-digests", portable.ARCHIVE) in recorder.records
    (tmp_path / "docker.idx").write_bytes(recorder.encode())
    passes.clear()
    options = ViewOptions(cache=IndexCache(str(tmp_path / "empty")), index=str(tmp_path / "docker.idx"))
    app = _rootfs_files(str(archive), replace(options, ref="localhost/app:v1"))
    assert app == {"/etc/motd": b"hello\n", "/app/data.txt": b"application data\n" * 100}
    assert _rootfs_files(str(archive), replace(options, ref="localhost/base:latest")) == {
        "/etc/motd": b"hello\n"
    }
    assert passes == []


def test_without_an_index_the_first_pass_runs(
    archives: dict[str, Path], real_image: RealImage, tmp_path: Path, passes: list[str]
) -> None:
    """The control: the spy sees the passes an index saves (the outer archive's and each layer's)."""
    files = _rootfs_files(str(archives["gzip"]), ViewOptions(cache=IndexCache(str(tmp_path / "c"))))
    assert files["/hello.txt"] == real_image.files["/hello.txt"]
    assert len(passes) >= 2


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_index_of_another_archive_is_refused_with_one_warning(
    archives: dict[str, Path],
    real_image: RealImage,
    tmp_path: Path,
    passes: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = ViewOptions(cache=IndexCache(str(tmp_path / "c")), index=str(archives["plain-index"]))
    with caplog.at_level(logging.WARNING):
        files = _rootfs_files(str(archives["gzip"]), options)
    assert files["/data/big.bin"] == real_image.files["/data/big.bin"]
    [warning] = _warnings(caplog)
    assert "not used: made for" in warning and str(archives["plain"]) in warning
    assert passes  # built as without an index


def _flip(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0x01
    return bytes(damaged)


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "a flipped byte in a payload": lambda d: _flip(d, len(d) - 100),
    "a flipped byte in the directory": lambda d: _flip(d, 20),
    "a flipped byte in the checksum": lambda d: _flip(d, len(d) - 1),
    "truncated": lambda d: d[: len(d) // 2],
    "cut to its header": lambda d: d[:16],
    "empty": lambda d: b"",
    "another format version": lambda d: d[:8] + b"\x02" + d[9:],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_index_is_refused_with_one_warning(
    damage: str,
    archives: dict[str, Path],
    real_image: RealImage,
    tmp_path: Path,
    passes: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = tmp_path / "damaged.idx"
    index.write_bytes(DAMAGE[damage](archives["gzip-index"].read_bytes()))
    options = ViewOptions(cache=IndexCache(str(tmp_path / "c")), index=str(index))
    with caplog.at_level(logging.WARNING):
        files = _rootfs_files(str(archives["gzip"]), options)
    assert files["/data/big.bin"] == real_image.files["/data/big.bin"]
    [warning] = _warnings(caplog)
    assert f"index {index} not used: " in warning
    assert passes


def _forged(directory: bytes, payload: bytes = b"") -> bytes:
    """An index of this directory and payload with a right checksum: only its content is wrong."""
    head = struct.pack("<8sII", portable.MAGIC, portable.FORMAT, len(directory)) + directory + payload
    return head + hashlib.sha256(head).digest()


_ARCHIVE = '{"archive":{"size":1,"ends":"00","name":"x"},"records":'
FORGED = {
    "JSON nested deep": b"[" * 100_000 + b"]" * 100_000,
    "not JSON": b"\xff\xfe",
    "a list": b"[]",
    "a record past the end": (_ARCHIVE + '[["table",2,"archive",0,5,"00"]]}').encode(),
    "a negative size": (_ARCHIVE + '[["table",2,"archive",0,-1,"00"]]}').encode(),
    "a size that is no number": (_ARCHIVE + '[["table",2,"archive",0,"1","00"]]}').encode(),
    "a short record": (_ARCHIVE + '[["table",2]]}').encode(),
    "a checksum that is no hex": (_ARCHIVE + '[["table",2,"archive",0,1,"zz"]]}').encode(),
}


@pytest.mark.parametrize("forged", sorted(FORGED))
def test_a_forged_directory_is_refused_with_one_warning(
    forged: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = tmp_path / "forged.idx"
    index.write_bytes(_forged(FORGED[forged], b"x"))
    with caplog.at_level(logging.WARNING):
        assert portable.open_index(str(index)) is None
    [warning] = _warnings(caplog)
    assert "unusable directory" in warning


def test_an_index_too_large_is_not_read(
    archives: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(portable, "MAX_SIZE", 1000)
    with caplog.at_level(logging.WARNING):
        assert portable.open_index(str(archives["gzip-index"])) is None
    assert "more than the" in caplog.text


def test_a_record_changed_after_the_check_is_not_used(
    archives: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each record is checked again when read: the file may change after it was checked whole."""
    index = tmp_path / "changing.idx"
    shutil.copy(archives["gzip-index"], index)
    opened = portable.open_index(str(index))
    assert opened is not None
    (kind, key), record = next(iter(opened._records.items()))
    assert opened.get(kind, key) is not None
    with open(index, "r+b") as f:
        f.seek(opened._base + record.offset)
        byte = f.read(1)
        f.seek(opened._base + record.offset)
        f.write(bytes([byte[0] ^ 1]))
    with caplog.at_level(logging.WARNING):
        assert opened.get(kind, key) is None
    assert "does not match its checksum" in caplog.text


def test_a_layout_directory_has_no_index(real_image: RealImage, tmp_path: Path) -> None:
    done = run_ocifuse("index", real_image.layout_dir, "-o", tmp_path / "x.idx")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "layout directory" in done.stderr
    assert not (tmp_path / "x.idx").exists()


# -- the command line and a server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def web(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx serving the compressed archive and its index, made by ``ocifuse index`` of the URL."""
    www = tmp_path_factory.mktemp("www")
    shutil.copy(archives["gzip"], www / "image.tar.gz")
    shutil.copy(archives["plain"], www / "image.tar")
    with nginx(tmp_path_factory.mktemp("nginx"), www) as server:
        done = run_ocifuse("index", server.url("image.tar.gz"), "-o", www / "image.tar.gz.idx")
        assert done.returncode == 0, done.stderr
        assert "index of " + server.url("image.tar.gz") in done.stdout
        yield server


def test_an_index_made_of_a_url_is_the_one_made_of_the_file(web: Nginx, archives: dict[str, Path]) -> None:
    """The identity is the bytes', wherever they lie: one index serves a file and its URL alike."""
    url_index = portable.open_index(web.url("image.tar.gz.idx"))
    file_index = portable.open_index(str(archives["gzip-index"]))
    assert url_index is not None and file_index is not None
    assert url_index.identity == file_index.identity
    assert set(url_index._records) == set(file_index._records)


def test_inspect_and_fsck_with_an_index(web: Nginx, archives: dict[str, Path], tmp_path: Path) -> None:
    """inspect takes the table from the index; fsck checks the index is for the archive, and builds all."""
    url, index = web.url("image.tar.gz"), web.url("image.tar.gz.idx")
    plain = run_ocifuse("inspect", "--no-cache", url)
    done = run_ocifuse("inspect", "--no-cache", "--index", index, url)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == plain.stdout
    done = run_ocifuse("fsck", "--no-cache", "--index", index, url)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    other = run_ocifuse("fsck", "--no-cache", "--index", index, web.url("image.tar"))
    assert other.returncode == 0
    assert other.stderr.count("\n") == 1 and "not used: made for" in other.stderr


@pytest.mark.fuse
def test_a_fresh_machine_mounts_a_url_rootfs_with_an_index_url(
    web: Nginx, real_image: RealImage, tmp_path: Path
) -> None:
    """-o index=URL, an empty cache: the mount decompresses nothing first, and serves the image's bytes."""
    url, index = web.url("image.tar.gz"), web.url("image.tar.gz.idx")
    options = [f"index={index}", f"cache={tmp_path / 'fresh-cache'}"]
    with mounted(url, tmp_path / "mnt", options=options, args=["--rootfs", "-d"]) as m:
        for path in ("/hello.txt", "/data/big.bin"):
            assert m.path(path.lstrip("/")).read_bytes() == real_image.files[path]
        log = m.stderr()
    assert not FIRST_PASS.search(log), log
    assert "from the index" in log
    # The control: the same mount without the index, on another empty cache, makes its first passes.
    with mounted(
        url, tmp_path / "mnt", options=[f"cache={tmp_path / 'other'}"], args=["--rootfs", "-d"]
    ) as m:
        assert m.path("hello.txt").read_bytes() == real_image.files["/hello.txt"]
        log = m.stderr()
    assert FIRST_PASS.search(log)
