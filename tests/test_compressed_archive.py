"""Compressed oci-archives (``.tar.gz``, ``.tar.zst``): fsck, inspect and mount read them as plain ones."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RealImage
from mounting import MountSpec, background_mount, mounted, mounted_many, run_ocifuse, start, teardown
from peers import (
    BOMB_COMPRESSORS,
    COMPRESSORS,
    bomb,
    compress,
    compress_bytes,
    decompress,
    require_tools,
    run,
)
from tarbuild import tar_extract, tree_of

from ocifuse import cli, fsck, zstdsource
from ocifuse.archive import Archive
from ocifuse.cache import IndexCache
from ocifuse.errors import ArchiveChanged, DecompressionLimit
from ocifuse.streams import Limits
from ocifuse.views import open_layout

TAG = "v1"


def _kind(name: str) -> str:
    return COMPRESSORS[name].kind


@pytest.fixture(scope="module")
def archives(real_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """skopeo's oci-archive, compressed by each tool."""
    require_tools("gzip", "pigz", "zstd", "pzstd")
    root = tmp_path_factory.mktemp("compressed")
    return {name: compress(name, real_archive, root / f"image.{name}") for name in COMPRESSORS}


@pytest.fixture(scope="module")
def reference(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``tar -x`` of each archive decompressed by its tool's own ``-d``."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, path in archives.items():
        plain = decompress(_kind(name), path, root / f"{name}.tar")
        out[name] = tar_extract(plain, root / name)
    return out


# -- the read core --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_every_file_equals_tar_x_of_the_decompressed_archive(
    name: str, archives: dict[str, Path], reference: dict[str, Path]
) -> None:
    expected = tree_of(reference[name])[0]
    with open_layout(archives[name]) as layout:
        assert layout.compression == _kind(name)
        assert sorted(layout.file_names()) == sorted(expected)
        for path, data in expected.items():
            assert layout.read_at(path, 0, len(data) + 1) == data


def test_a_plain_archive_stays_a_file_range(real_archive: Path) -> None:
    """Uncompressed: the archive's own fd, read by pread (and pread_cached), nothing between."""
    from ocifuse.source import FileRange

    archive = Archive(str(real_archive))
    try:
        assert archive.compression == "plain"
        assert type(archive.sources[0]) is FileRange
    finally:
        archive.close()


def test_the_second_open_reads_the_index_from_the_cache(archives: dict[str, Path], tmp_path: Path) -> None:
    cache = IndexCache(str(tmp_path / "cache"))
    for name in ("gzip", "zstd"):
        seen: list[int] = []
        first = Archive(str(archives[name]), cache, progress=seen.append)
        first.close()
        assert sum(seen) == archives[name].stat().st_size
        seen.clear()
        second = Archive(str(archives[name]), cache, progress=seen.append)
        try:
            assert seen == []  # nothing decompressed to open it
            assert second.compression == _kind(name)
            assert second.table.entries.keys() == first.table.entries.keys()
        finally:
            second.close()


def test_an_archive_changed_underneath_fails_reads(archives: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "image.tar.gz"
    shutil.copy(archives["gzip"], copy)
    layout = open_layout(str(copy))
    try:
        big = max(layout.file_names(), key=layout.size_of)
        with open(copy, "r+b") as f:
            f.truncate(copy.stat().st_size - 100)
        with pytest.raises(ArchiveChanged):
            for offset in range(0, layout.size_of(big), 1 << 20):
                layout.read_at(big, offset, 4096)
    finally:
        layout.close()


# -- fsck and inspect -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gzip", "zstd"])
def test_fsck_and_inspect_say_the_compression(
    name: str, archives: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(archives[name])
    assert cli.main(["fsck", "--json", path]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["compression"] == _kind(name) and report["blobs_verified"] >= 3
    assert cli.main(["fsck", path]) == 0
    assert f"ok: {_kind(name)}-compressed archive, " in capsys.readouterr().out
    assert cli.main(["inspect", "--json", path]) == 0
    assert json.loads(capsys.readouterr().out)["compression"] == _kind(name)
    assert cli.main(["inspect", path]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{path} (oci-layout 1.0.0, {_kind(name)}-compressed)"


def _bad(archives: dict[str, Path], tmp: Path, how: str) -> tuple[Path, str]:
    """A damaged or hostile compressed archive, and the fsck code it must give."""
    data = bytearray(archives["gzip"].read_bytes())
    out = tmp / f"bad-{how}.tar.gz"
    code = "compressed-corrupt"
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "crc":
        data[-6] ^= 0x10
    elif how == "trailing-garbage":
        data += b"garbage after the stream\n"
    elif how == "not-a-tar":
        data = bytearray(compress_bytes("gzip", b"just text\n" * 1000))
        code = "archive-corrupt"
    elif how == "zstd-truncated":
        data = bytearray(archives["zstd"].read_bytes())[:-50]
        out = tmp / "bad.tar.zst"
    elif how == "xz":
        data = bytearray(subprocess.run(["xz", "-c"], input=bytes(10240), capture_output=True).stdout)
        out = tmp / "bad.tar.xz"
    out.write_bytes(bytes(data))
    return out, code


BAD = ["truncated", "crc", "trailing-garbage", "not-a-tar", "zstd-truncated", "xz"]


@pytest.mark.parametrize("how", BAD)
def test_bad_input_is_one_line_and_a_stable_code(
    how: str, archives: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tools("xz")
    path, code = _bad(archives, tmp_path, how)
    assert cli.main(["fsck", "--json", str(path)]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [f["code"] for f in report["findings"]] == [code]
    # Said even when it cannot be opened: what the file is stored as, by its magic bytes.
    assert report["compression"] == {"zstd-truncated": "zstd", "xz": "xz"}.get(how, "gzip")
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith(f"ocifuse: {path}: ")
    assert cli.main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1


def test_a_bomb_stops_at_max_size(tmp_path: Path) -> None:
    """A tar of zeros compresses ~1000:1; max_size stops the first pass, in time and disk."""
    for kind in sorted(BOMB_COMPRESSORS):
        path = bomb(kind, 64 << 20, tmp_path / f"bomb.tar.{kind}")
        assert path.stat().st_size < 200_000
        with pytest.raises(DecompressionLimit, match=r"-o max_size=SIZE") as info:
            Archive(str(path), limits=Limits(max_size=8 << 20))
        assert fsck.open_failure(info.value).codes == {"compressed-too-large"}


def test_a_spill_is_bounded(
    archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A single-frame .tar.zst bigger than the in-place limit spills, within spill_max."""
    monkeypatch.setattr(zstdsource, "ZSTD_FRAME_INPLACE", 1 << 20)
    with pytest.raises(DecompressionLimit, match="spill_max"):
        Archive(str(archives["zstd"]), IndexCache(str(tmp_path / "c")), limits=Limits(spill_max=1 << 20))
    archive = Archive(str(archives["zstd"]), IndexCache(str(tmp_path / "c")))
    try:
        assert isinstance(archive.sources[0], zstdsource.ZstdSpill)
    finally:
        archive.close()


def _spilling(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` has a spill file open in ``directory`` that is not whole yet."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            # O_TMPFILE: "DIR/#1234 (deleted)"; a named temp file: "DIR/.tmp.spill-..."
            if target.startswith(f"{directory}/") and not os.path.basename(target).startswith("spill."):
                return True
    return False


@pytest.mark.fuse
def test_a_mount_stopped_while_it_spills_leaves_nothing_behind(tmp_path: Path) -> None:
    """SIGTERM during the first pass (a systemd stop, a start timeout): no partial file stays in the cache.

    The daemon dies of the signal, as it would have, once what it wrote is gone.
    """
    require_tools("zstd")
    archive = tmp_path / "zeros.tar.zst"  # one frame (zstd's own): the outer archive is spilled
    with open(archive, "wb") as out:
        make = subprocess.Popen(["zstd", "-q", "-1", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert make.stdin is not None
        for _ in range(1536):  # 1.5 GiB: seconds of spilling on a loaded machine
            make.stdin.write(bytes(1 << 20))
        make.stdin.close()
        assert make.wait() == 0
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    m = start(MountSpec(archive, tmp_path / "mnt", options=[f"cache={cache}"]))
    try:
        deadline = time.monotonic() + 60
        while not _spilling(m.process.pid, cache):
            assert m.process.poll() is None, m.stderr()
            assert time.monotonic() < deadline, "no spill started"
            time.sleep(0.005)
        m.process.send_signal(signal.SIGTERM)
        status = m.process.wait(30)
        assert os.listdir(cache) == []
        assert status == -signal.SIGTERM, m.stderr()
        assert "SIGTERM: stopped while opening" in m.stderr()
    finally:
        problems = teardown(m, clean_exit=False)
    assert not problems


# -- real mounts ----------------------------------------------------------------------------------


@pytest.mark.fuse
def test_mounts_equal_tar_x(archives: dict[str, Path], reference: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for first in (True, False):
        specs = [MountSpec(archives[n], tmp_path / n, [f"cache={cache}"]) for n in sorted(COMPRESSORS)]
        with mounted_many(specs) as mounts:
            for name, m in zip(sorted(COMPRESSORS), mounts, strict=True):
                assert tree_of(m.mountpoint)[0] == tree_of(reference[name])[0], name
                # Said once, when it is decompressed; a mount from the cache decompresses nothing.
                said = f"{_kind(name)}-compressed, " in m.stderr()
                assert said == first, (name, m.stderr())


@pytest.mark.fuse
def test_skopeo_and_umoci_read_the_mount_of_a_tar_gz(
    archives: dict[str, Path], real_image: RealImage, tmp_path: Path
) -> None:
    require_tools("skopeo", "umoci")
    with mounted(archives["gzip"], tmp_path / "mnt") as m:
        run("skopeo", "copy", "--quiet", f"oci:{m.mountpoint}:{TAG}", f"dir:{tmp_path / 'from-mount'}")
        run(
            "skopeo",
            "copy",
            "--quiet",
            f"oci-archive:{real_image.archive}:{TAG}",
            f"dir:{tmp_path / 'plain'}",
        )
        assert tree_of(tmp_path / "from-mount")[0] == tree_of(tmp_path / "plain")[0]
        run("umoci", "unpack", "--image", f"{m.mountpoint}:{TAG}", tmp_path / "bundle")
    for path, data in real_image.files.items():
        if not path.startswith("/etc/app"):  # only in tag v2
            assert (tmp_path / "bundle" / "rootfs" / path.lstrip("/")).read_bytes() == data


@pytest.mark.fuse
def test_mount_refuses_a_bomb_in_one_line(tmp_path: Path) -> None:
    path = bomb("gzip", 32 << 20, tmp_path / "bomb.tar.gz")
    with background_mount(path, tmp_path / "mnt", options=["max_size=4M"]) as result:
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "max_size" in lines[0], result.stderr


@pytest.mark.fuse
def test_a_live_mount_answers_eio_when_the_archive_changes(archives: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "image.tar.gz"
    shutil.copy(archives["gzip"], copy)
    with mounted(copy, tmp_path / "mnt") as m:
        blobs = sorted((m.mountpoint / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
        with open(copy, "r+b") as f:
            f.truncate(copy.stat().st_size // 2)
        with pytest.raises(OSError) as info:
            blobs[-1].read_bytes()
        assert info.value.errno == errno.EIO
        assert m.alive() and sorted(os.listdir(m.mountpoint)) == ["blobs", "index.json", "oci-layout"]


@pytest.mark.fuse
@pytest.mark.parametrize("name", ["gzip", "zstd"])
def test_a_background_mount_serves_after_the_fork(
    name: str, archives: dict[str, Path], reference: dict[str, Path], tmp_path: Path
) -> None:
    """The index is built (and its first reader made) before the daemon forks; the child reads with it."""
    with background_mount(archives[name], tmp_path / "mnt", options=[f"cache={tmp_path / 'c'}"]) as result:
        assert result.returncode == 0, result.stderr
        assert tree_of(tmp_path / "mnt")[0] == tree_of(reference[name])[0]


@pytest.mark.parametrize("cut", [4, 9, 1000])
def test_a_cut_footer_is_one_line_from_the_command(
    archives: dict[str, Path], tmp_path: Path, cut: int
) -> None:
    """rapidgzip prints its own line for some truncations; the command still says one line (fd 2)."""
    data = archives["gzip"].read_bytes()
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(data[:-cut])
    done = run_ocifuse("fsck", "--no-cache", path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(f"ocifuse: {path}: gzip: ")
