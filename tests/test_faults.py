"""Faults while mounted: the archive changed or deleted, a dead daemon, a killed reader, busy unmounts.

The rule throughout: a read gives the archive's original bytes or fails with EIO, never other
bytes; the daemon survives what happens to its readers; ``ocifuse umount`` cleans up after a dead
daemon and says clearly when a mount is busy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import Mount, is_mounted, mounted, run_ocifuse, wait_until
from oci import LayoutBuilder

pytestmark = pytest.mark.fuse

BIG = 16 * 1024 * 1024


@dataclass(frozen=True)
class Image:
    """An archive written for one test (the test may break it), and its blobs' bytes by path."""

    archive: Path
    blobs: dict[str, bytes]
    big: str  # the path of the BIG-byte layer


def build_image(directory: Path, seed: int = 7) -> Image:
    """A layout with a BIG-byte random layer and two small ones, as an oci-archive."""
    rng = random.Random(seed)
    big = rng.randbytes(BIG)
    b = LayoutBuilder()
    b.tag(b.image([b"small layer\n", rng.randbytes(70_000), big]), "v1")
    archive = b.write_tar(directory / "image.tar")
    blobs = {n: d for n, d in b.layout_files().items() if n.startswith("blobs/")}
    big_path = next(n for n, d in blobs.items() if d == big)
    return Image(archive, blobs, big_path)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    """A fresh archive for this test."""
    return build_image(tmp_path)


def read_or_errno(path: Path) -> bytes | int:
    """The file's bytes, or the errno reading it failed with."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno or -1


def assert_original_or_eio(m: Mount, image: Image) -> int:
    """Every blob reads as its original bytes or fails with EIO; returns how many failed."""
    failed = 0
    for name, data in image.blobs.items():
        got = read_or_errno(m.path(name))
        if isinstance(got, int):
            assert got == errno.EIO, f"{name}: {os.strerror(got)}"
            failed += 1
        else:
            assert got == data, f"{name}: wrong bytes"
    assert m.alive(), m.stderr()
    return failed


def test_truncated_archive_gives_eio_never_other_bytes(image: Image, tmp_path: Path) -> None:
    """Truncating the archive under the mount: reads fail with EIO; the daemon stays up."""
    with mounted(image.archive, tmp_path / "mnt") as m:
        assert m.path("index.json").read_bytes()
        os.truncate(image.archive, image.archive.stat().st_size // 2)
        assert read_or_errno(m.path(image.big)) == errno.EIO
        assert assert_original_or_eio(m, image) >= 1
        assert "archive changed since it was opened" in m.stderr()


def test_replaced_archive_still_serves_the_original(image: Image, tmp_path: Path) -> None:
    """Renaming another file over the archive: the mount keeps its fd and serves the original bytes."""
    (tmp_path / "other").mkdir()
    other = build_image(tmp_path / "other", seed=8)
    assert other.archive.stat().st_size == image.archive.stat().st_size
    with mounted(image.archive, tmp_path / "mnt") as m:
        os.rename(other.archive, image.archive)
        for name, data in image.blobs.items():
            assert m.path(name).read_bytes() == data, name
        assert m.alive()


def test_rewritten_in_place_gives_eio_never_other_bytes(image: Image, tmp_path: Path) -> None:
    """Overwriting the archive's bytes in place (same size): EIO, not the new bytes."""
    with mounted(image.archive, tmp_path / "mnt") as m:
        data = bytearray(image.archive.read_bytes())
        start = data.find(image.blobs[image.big][:4096])
        assert start > 0
        time.sleep(0.01)  # a later mtime even on a coarse clock
        with open(image.archive, "r+b") as f:
            f.seek(start)
            f.write(bytes(len(image.blobs[image.big])))
        assert read_or_errno(m.path(image.big)) == errno.EIO
        assert_original_or_eio(m, image)


def test_deleted_archive_still_serves_the_original(image: Image, tmp_path: Path) -> None:
    """Deleting the archive: its inode lives on through the mount's fd; reads serve the original."""
    with mounted(image.archive, tmp_path / "mnt") as m:
        image.archive.unlink()
        for name, data in image.blobs.items():
            assert m.path(name).read_bytes() == data, name
        assert m.alive()


def test_sigkilled_daemon_then_umount_cleans_up(image: Image, tmp_path: Path) -> None:
    """After SIGKILL the mount is dead (ENOTCONN); ``ocifuse umount`` removes it."""
    mnt = tmp_path / "mnt"
    with mounted(image.archive, mnt, clean_exit=False) as m:
        os.kill(m.pid, signal.SIGKILL)
        m.wait_exit()
        with pytest.raises(OSError) as dead:
            os.stat(m.path("index.json"))
        assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert is_mounted(mnt)
        done = run_ocifuse("umount", mnt)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
        again = run_ocifuse("umount", mnt)
        assert again.returncode != 0 and "not mounted" in again.stderr


_READER = """
import sys
with open(sys.argv[1], "rb", buffering=0) as f:
    f.read(1 << 20)
    print("reading", flush=True)
    while f.read(1 << 16):
        pass
"""


def test_reader_killed_mid_read(image: Image, tmp_path: Path) -> None:
    """Readers SIGKILLed in the middle of a large file do not disturb the daemon or later readers."""
    with mounted(image.archive, tmp_path / "mnt") as m:
        for _ in range(4):
            reader = subprocess.Popen(
                [sys.executable, "-c", _READER, os.fspath(m.path(image.big))], stdout=subprocess.PIPE
            )
            assert reader.stdout is not None
            assert reader.stdout.readline() == b"reading\n"
            reader.kill()
            reader.wait()
            reader.stdout.close()
        assert m.alive(), m.stderr()
        digest = hashlib.sha256(m.path(image.big).read_bytes()).hexdigest()
        assert image.big.endswith(digest)
        assert "Traceback" not in m.stderr()


@pytest.mark.parametrize("hold", ["cwd", "open-file"])
def test_busy_unmount_then_lazy(image: Image, tmp_path: Path, hold: str) -> None:
    """A busy mount: ``umount`` refuses with one clear line and leaves it mounted; ``--lazy`` detaches it."""
    mnt = tmp_path / "mnt"
    with mounted(image.archive, mnt) as m:
        if hold == "cwd":
            holder = subprocess.Popen(["sleep", "60"], cwd=m.path("blobs"))
        else:
            code = "import sys, time; f = open(sys.argv[1], 'rb'); print('open', flush=True); time.sleep(60)"
            holder = subprocess.Popen(
                [sys.executable, "-c", code, os.fspath(m.path("index.json"))], stdout=subprocess.PIPE
            )
            assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        try:
            busy = run_ocifuse("umount", mnt)
            assert busy.returncode != 0
            lines = busy.stderr.strip().splitlines()
            assert len(lines) == 1 and "busy" in lines[0] and "--lazy" in lines[0], busy.stderr
            assert "Traceback" not in busy.stderr
            assert is_mounted(mnt) and m.alive()
            lazy = run_ocifuse("umount", "--lazy", mnt)
            assert lazy.returncode == 0, lazy.stderr
            assert not is_mounted(mnt)
        finally:
            holder.kill()
            holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()
        wait_until(lambda: not m.alive(), 10.0, "the daemon to exit after the lazy unmount")
        assert m.process.returncode == 0, m.stderr()
