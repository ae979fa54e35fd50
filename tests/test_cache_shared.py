"""The index cache as shared state: many openers at once, a full, read-only or deleted directory, other users.

- Concurrent: of the processes (and threads) that open one new archive at once, one builds each
  entry while the others wait on its lock file, then load it; a lock whose holder died is free.
- Faults: a full disk (tmpfs ``size=1m``), a read-only one (a tmpfs remounted ``ro``), a directory
  deleted under a live mount: the mount works on, one warning says why, nothing half-written stays.
- Shared machines: root's daemon never uses a directory another user owns or can write; another
  user's daemon never writes into root's.

The tmpfs and other-user cases need root (CI runs as root); elsewhere they skip, and fail with CI=true.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cachebuild import archive_key
from mounting import (
    Mount,
    MountSpec,
    is_mounted,
    mounted,
    run_ocifuse,
    skip_or_fail,
    start,
    teardown,
    wait_live,
)
from oci import LayoutBuilder
from tarbuild import tar_extract, tree_of
from test_cache_bound import zstd_layout
from test_cache_cli import big_layout

from ocifuse import cache as cache_mod
from ocifuse import spill as spill_mod
from ocifuse import zstdsource
from ocifuse.archive import Archive
from ocifuse.cache import IndexCache
from ocifuse.store import TABLE, load_or_build

KEY = "file:1:2:3:4:" + "ab" * 32
PAYLOAD = b"the table" * 1000
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
# How long a helper waits for what must happen (a generous bound, never a measurement).
PATIENCE = 120.0


def root_only() -> None:
    """Skip without root (a tmpfs to mount, another user to act as); fail in CI, which runs as root."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (mounting a tmpfs, acting as another user)")


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m", *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` on ``where`` holding an empty private directory ``c``; always unmounted."""
    root_only()
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True)
    try:
        (where / "c").mkdir(mode=0o700)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where / "c"
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def leftovers(directory: Path) -> list[str]:
    """What a writer left that is not a whole entry: temp, lock and spill files."""
    return sorted(p.name for p in directory.iterdir() if not cache_mod._ENTRY_NAME.fullmatch(p.name))


def count(text: str, what: str) -> int:
    return len(re.findall(what, text))


# -- one builds, the others wait and load ---------------------------------------------------------


def _waiters(path: Path) -> int:
    """How many flock waiters /proc/locks shows on the file at ``path``."""
    try:
        ino = path.stat().st_ino
    except FileNotFoundError:
        return 0
    waiting = re.compile(rf"->\s+FLOCK\s+\S+\s+\S+\s+\d+\s+[0-9a-f]+:[0-9a-f]+:{ino}\s")
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if waiting.search(line))


def _open_one(directory: str, others: int, builds: Any, right: Any) -> None:
    """Load or build the entry; the builder holds its lock until ``others`` openers wait on it."""
    cache = IndexCache(directory)
    lock_file = Path(directory) / (cache_mod._LOCK_PREFIX + cache_mod._name(TABLE.kind, KEY))

    def build() -> bytes:
        with builds.get_lock():
            builds.value += 1
        deadline = time.monotonic() + PATIENCE
        while _waiters(lock_file) < others:  # every other opener is now blocked on this lock
            if time.monotonic() > deadline:
                raise RuntimeError("the other openers never waited")
            time.sleep(0.01)
        return PAYLOAD

    value = load_or_build(cache, TABLE, KEY, name="t", decode=bytes, build=build, encode=lambda v: v)
    if value == PAYLOAD:
        with right.get_lock():
            right.value += 1


def test_of_many_processes_one_builds_and_the_others_load(tmp_path: Path) -> None:
    directory = str(tmp_path / "c")
    ctx = multiprocessing.get_context("fork")
    builds, right = ctx.Value("i", 0), ctx.Value("i", 0)
    n = 4
    procs = [ctx.Process(target=_open_one, args=(directory, n - 1, builds, right)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(PATIENCE)
    assert [p.exitcode for p in procs] == [0] * n
    assert (builds.value, right.value) == (1, n)
    assert leftovers(tmp_path / "c") == []  # the lock file went with its build


def test_of_many_threads_one_builds_and_the_others_load(tmp_path: Path) -> None:
    """flock locks an open file description: threads of one process exclude each other too."""
    directory = str(tmp_path / "c")
    builds, right = multiprocessing.Value("i", 0), multiprocessing.Value("i", 0)
    n = 3
    threads = [threading.Thread(target=_open_one, args=(directory, n - 1, builds, right)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PATIENCE)
    assert (builds.value, right.value) == (1, n)
    assert leftovers(tmp_path / "c") == []


def _open_unstored(directory: str, others: int, builds: Any, together: Any) -> None:
    """Build a value not worth storing: the first waits for the others, who then build side by side."""
    cache = IndexCache(directory)
    lock_file = Path(directory) / (cache_mod._LOCK_PREFIX + cache_mod._name(TABLE.kind, KEY))

    def build() -> bytes:
        with builds.get_lock():
            builds.value += 1
            first = builds.value == 1
        if first:
            deadline = time.monotonic() + PATIENCE
            while _waiters(lock_file) < others:
                if time.monotonic() > deadline:
                    raise RuntimeError("the other openers never waited")
                time.sleep(0.01)
        else:
            together.wait()  # broken (and this process fails) if the others built one after another
        return PAYLOAD

    load_or_build(cache, TABLE, KEY, name="t", decode=bytes, build=build, encode=lambda v: None)


def test_when_the_builder_stores_nothing_the_others_build_side_by_side(tmp_path: Path) -> None:
    directory = str(tmp_path / "c")
    ctx = multiprocessing.get_context("fork")
    builds, together = ctx.Value("i", 0), ctx.Barrier(2, timeout=PATIENCE)
    procs = [ctx.Process(target=_open_unstored, args=(directory, 2, builds, together)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(PATIENCE * 2)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert builds.value == 3
    assert leftovers(tmp_path / "c") == []


def _hold_lock(directory: str, ready: Any) -> None:
    with IndexCache(directory).lock(TABLE.kind, KEY):
        ready.set()
        time.sleep(3600)  # killed


def test_a_lock_whose_holder_died_is_free(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(directory), ready))
    holder.start()
    try:
        assert ready.wait(PATIENCE)
        lock_file = directory / (cache_mod._LOCK_PREFIX + cache_mod._name(TABLE.kind, KEY))
        with open(lock_file, "rb") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # held
    finally:
        holder.kill()  # dies holding it: the kernel releases it
        holder.join(PATIENCE)
    assert lock_file.exists()
    cache = IndexCache(str(directory))
    built = load_or_build(cache, TABLE, KEY, name="t", decode=bytes, build=lambda: PAYLOAD, encode=bytes)
    assert built == PAYLOAD and cache.load(TABLE.kind, KEY) == PAYLOAD
    assert leftovers(directory) == []


def test_a_lock_file_left_by_a_dead_holder_is_swept(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir(mode=0o700)
    left = directory / (cache_mod._LOCK_PREFIX + cache_mod._name(TABLE.kind, "another key"))
    left.write_bytes(b"")
    IndexCache(str(directory)).store(TABLE.kind, KEY, PAYLOAD)  # the first store sweeps
    assert not left.exists() and leftovers(directory) == []


def gz_layout(path: Path, layer_size: int) -> tuple[Path, Path]:
    """An oci-archive gzipped by ``gzip -1`` (a layer of random bytes: the pass is real work), its tar."""
    builder = LayoutBuilder()
    builder.tag(builder.image([random.Random(5).randbytes(layer_size), b"small\n"]), "v1")
    plain = builder.write_tar(path.with_suffix(".plain"))
    with open(path, "wb") as out:
        subprocess.run(["gzip", "-1", "-c", str(plain)], stdout=out, check=True)
    return path, plain


def rchar(pid: int) -> int:
    """The bytes process ``pid`` has read through read(2)/pread(2) so far (proc(5), /proc/PID/io)."""
    text = Path(f"/proc/{pid}/io").read_text()
    found = re.search(r"^rchar: (\d+)$", text, re.M)
    assert found is not None, text
    return int(found.group(1))


@pytest.mark.fuse
def test_daemons_mounting_one_new_tar_gz_at_once_decompress_it_about_once(tmp_path: Path) -> None:
    """Four first mounts at once, one cache: all live, every byte right, the archive read about once.

    The test holds the gzip index's lock until all four daemons wait on it (so they do run at
    once, however slowly they start), then lets it go as a holder killed mid-build does: one of
    them builds the index while the others wait and load it, then the same for the table.
    """
    archive, plain = gz_layout(tmp_path / "a.tar.gz", 24 << 20)
    expected = tree_of(tar_extract(plain, tmp_path / "x"))
    with mounted(archive, tmp_path / "alone", options=[f"cache={tmp_path / 'c1'}"]) as m:
        one = rchar(m.pid)  # what one first mount reads: the gzip pass and the table's scan
    n = 4
    directory = tmp_path / "c2"
    directory.mkdir(mode=0o700)
    lock_file = directory / (cache_mod._LOCK_PREFIX + cache_mod._name("gzip-index", archive_key(archive)))
    started: list[Mount] = []
    problems: list[str] = []
    try:
        gate = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)
            for i in range(n):
                started.append(start(MountSpec(archive, tmp_path / f"m{i}", [f"cache={directory}"])))
            deadline = time.monotonic() + PATIENCE
            while _waiters(lock_file) < n:
                assert all(m.alive() for m in started) and time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            os.close(gate)
        for m in started:
            wait_live(m)
        together = sum(rchar(m.pid) for m in started)
        for m in started:
            assert tree_of(m.mountpoint) == expected
            assert m.alive()
    finally:
        for m in started:
            problems += teardown(m)
    assert not problems, problems
    # Without the locks each would read what one does (n times); with them, one decompresses and
    # the others load (each still hashes the archive's ends for its key and reads the entries).
    assert together <= 2 * one, (together, one)
    assert leftovers(directory) == []


@pytest.mark.fuse
def test_a_daemon_waiting_for_a_lock_stops_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM while start-up waits on another's lock: the daemon exits, nothing mounted, nothing left."""
    archive, _ = gz_layout(tmp_path / "a.tar.gz", 1 << 20)
    directory = tmp_path / "c"
    directory.mkdir(mode=0o700)
    lock_file = directory / (cache_mod._LOCK_PREFIX + cache_mod._name("gzip-index", archive_key(archive)))
    gate = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    m = None
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        m = start(MountSpec(archive, tmp_path / "m", [f"cache={directory}"]))
        deadline = time.monotonic() + PATIENCE
        while _waiters(lock_file) < 1:
            assert m.alive() and time.monotonic() < deadline, m.stderr()
            time.sleep(0.05)
        m.process.send_signal(signal.SIGTERM)
        assert m.wait_exit() != 0
        assert not is_mounted(m.mountpoint)
    finally:
        os.close(gate)
        if m is not None:
            assert not teardown(m, clean_exit=False)
    assert [p.name for p in directory.iterdir()] == [lock_file.name]  # the test's own


# -- a full, read-only or deleted directory -------------------------------------------------------


def test_a_full_disk_is_one_warning_and_nothing_half_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tmpfs(tmp_path / "fs") as directory:
        cache = IndexCache(str(directory), 10 << 20)  # a bound over the disk's size: the disk fills
        with caplog.at_level(logging.WARNING, logger="ocifuse.cache"):
            for i in range(10):  # 3 of 300 KiB fit in 1 MiB
                cache.store(TABLE.kind, f"key {i}", os.urandom(300_000))
        assert count(caplog.text, "not stored: No space left on device") == 1
        assert leftovers(directory) == []
        stored = [i for i in range(10) if cache.load(TABLE.kind, f"key {i}") is not None]
        assert stored and len(stored) < 10  # what was stored still loads


def test_a_spill_on_a_full_disk_goes_elsewhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spill's write fails with ENOSPC midway: it moves to /var/tmp, nameless; every byte is right."""
    monkeypatch.setattr(zstdsource, "ZSTD_FRAME_INPLACE", 1 << 20)
    monkeypatch.setattr(spill_mod, "SPILL_RESERVE", 0)  # no room check first: the write itself fails
    monkeypatch.setattr(spill_mod, "_CHECK_FREE_EVERY", 0)
    path, files = zstd_layout(tmp_path / "a.tar.zst", 3 << 20)
    with tmpfs(tmp_path / "fs") as directory:
        with (
            caplog.at_level(logging.WARNING),
            closing(Archive(str(path), IndexCache(str(directory)))) as archive,
        ):
            assert isinstance(archive.sources[0], zstdsource.ZstdSpill)
            assert not archive.sources[0].kept
            for name, entry in archive.files():
                assert archive.pread(entry, 0, entry.size) == files[name], name
        assert count(caplog.text, "spill file not kept in the cache .*No space left on device") == 1
        assert count(caplog.text, "WARNING") == 1
        assert leftovers(directory) == []


def test_a_spill_on_a_filesystem_without_o_tmpfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without O_TMPFILE (EOPNOTSUPP, as on some network filesystems) a spill is written under a temp
    name and renamed: kept whole, nothing else left, and the next open loads it."""
    real_open = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    monkeypatch.setattr(zstdsource, "ZSTD_FRAME_INPLACE", 1 << 20)
    path, files = zstd_layout(tmp_path / "a.tar.zst", 3 << 20)
    directory = tmp_path / "c"
    for _ in range(2):  # built, then loaded
        with closing(Archive(str(path), IndexCache(str(directory)))) as archive:
            spill = archive.sources[0]
            assert isinstance(spill, zstdsource.ZstdSpill) and spill.kept
            for name, entry in archive.files():
                assert archive.pread(entry, 0, entry.size) == files[name], name
        assert [p.name.split(".")[0] for p in sorted(directory.iterdir())] == ["spill", "table", "zstd-index"]


@pytest.mark.fuse
def test_a_mount_with_its_cache_on_a_full_disk(tmp_path: Path) -> None:
    """A spill that does not fit in the cache's filesystem goes to /var/tmp: one warning, every byte."""
    path, _ = zstd_layout(tmp_path / "a.tar.zst", 9 << 20)  # a frame over 8 MiB: spilled
    expected = tree_of(tar_extract(path.with_suffix(".plain"), tmp_path / "x"))
    with tmpfs(tmp_path / "fs") as directory:
        with mounted(path, tmp_path / "m", options=[f"cache={directory}"]) as m:
            assert tree_of(m.mountpoint) == expected
            assert count(m.stderr(), "(?i)warning") == 1, m.stderr()
            assert "spill file not kept in the cache" in m.stderr()
        assert leftovers(directory) == []


@pytest.mark.fuse
def test_a_mount_with_its_cache_on_a_read_only_disk(tmp_path: Path) -> None:
    archive, plain = gz_layout(tmp_path / "a.tar.gz", 1 << 20)
    expected = tree_of(tar_extract(plain, tmp_path / "x"))
    with tmpfs(tmp_path / "fs", read_only=True) as directory:
        with mounted(archive, tmp_path / "m", options=[f"cache={directory}"]) as m:
            assert tree_of(m.mountpoint) == expected
            stderr = m.stderr()
            assert count(stderr, "(?i)warning") == 1, stderr
            assert "Read-only file system" in stderr
        assert list(directory.iterdir()) == []


@pytest.mark.fuse
def test_a_cache_deleted_under_a_live_mount(tmp_path: Path) -> None:
    """rm -rf of the cache (its spill too): the mount serves every byte; the next one makes it again."""
    path, _ = zstd_layout(tmp_path / "a.tar.zst", 9 << 20)
    expected = tree_of(tar_extract(path.with_suffix(".plain"), tmp_path / "x"))
    directory = tmp_path / "c"
    with mounted(path, tmp_path / "m", options=[f"cache={directory}"]) as m:
        assert any(p.name.startswith("spill.") for p in directory.iterdir())
        shutil.rmtree(directory)
        assert tree_of(m.mountpoint) == expected
        assert m.alive() and "warning" not in m.stderr().lower()
    done = run_ocifuse("inspect", "--cache", directory, big_layout(tmp_path / "b.tar"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert [p for p in directory.iterdir() if p.name.startswith("table.")]


# -- other users ----------------------------------------------------------------------------------


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory every user can read (pytest's tmp_path is root's only), removed after."""
    root_only()
    top = Path(tempfile.mkdtemp(prefix="ocifuse-shared-", dir="/tmp"))
    try:
        top.chmod(0o755)
        big_layout(top / "a.tar").chmod(0o644)
        yield top
    finally:
        shutil.rmtree(top)


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """``ocifuse ARGV`` run as nobody:nogroup (HOME /nonexistent: no default cache)."""
    ocifuse = Path(sys.executable).parent / "ocifuse"
    return subprocess.run(
        [*NOBODY, str(ocifuse), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
        env={**os.environ, "HOME": "/nonexistent"},
    )


def test_root_never_uses_a_directory_another_user_owns_or_can_write(shared: Path) -> None:
    nobodys = shared / "nobodys"
    nobodys.mkdir(mode=0o700)
    os.chown(nobodys, 65534, 65534)
    group_writable = shared / "group"
    group_writable.mkdir()
    group_writable.chmod(0o770)
    os.chown(group_writable, 0, 65534)
    for directory, why in ((nobodys, "owned by uid 65534"), (group_writable, "writable by others")):
        done = run_ocifuse("inspect", "--cache", directory, shared / "a.tar")
        assert done.returncode == 0, done.stderr
        assert len(done.stderr.splitlines()) == 1 and why in done.stderr, done.stderr  # one warning
        assert list(directory.iterdir()) == []


def test_another_user_never_writes_into_roots_cache(shared: Path) -> None:
    roots = shared / "roots"
    IndexCache(str(roots)).store(TABLE.kind, KEY, PAYLOAD)
    roots.chmod(0o755)  # readable by all, as systemd's CacheDirectoryMode= may make it
    before = {p.name: p.stat().st_mtime_ns for p in roots.iterdir()}
    done = as_nobody("inspect", "--cache", roots, shared / "a.tar")
    assert done.returncode == 0, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "owned by uid 0" in done.stderr, done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in roots.iterdir()} == before
    # Even one everyone may write: it is not nobody's, so nobody does not use it (nor root: others write it).
    roots.chmod(0o777)
    done = as_nobody("inspect", "--cache", roots, shared / "a.tar")
    assert done.returncode == 0 and "owned by uid 0" in done.stderr, done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in roots.iterdir()} == before


def test_a_users_own_cache_is_theirs_alone(shared: Path) -> None:
    """nobody's cache works for nobody; its entries, owned by nobody, are not root's to trust."""
    nobodys = shared / "nobodys"
    nobodys.mkdir(mode=0o700)
    os.chown(nobodys, 65534, 65534)  # as a user's ~/.cache/ocifuse
    done = as_nobody("inspect", "--cache", nobodys, shared / "a.tar")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    entries = list(nobodys.iterdir())
    assert entries and all(p.stat().st_uid == 65534 and p.stat().st_mode & 0o077 == 0 for p in entries)
    done = run_ocifuse("inspect", "--cache", nobodys, shared / "a.tar")
    assert done.returncode == 0 and "owned by uid 65534" in done.stderr, done.stderr
