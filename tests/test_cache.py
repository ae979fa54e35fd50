"""The persistent index cache: round trip; damage ignored and rebuilt; concurrent writers; disk errors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import resource
import stat
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from cachebuild import archive_key
from mounting import skip_or_fail

from ocifuse import cache as cache_mod
from ocifuse import store
from ocifuse.cache import CACHE_VERSION, IndexCache, blob_key
from ocifuse.digest import Digest

KEY = "sha256:" + "ab" * 32
PAYLOAD = b"the payload \x00\xff" * 7


def entry_file(directory: Path, kind: str = "table", key: str = KEY) -> Path:
    """The one file the cache keeps for (kind, key)."""
    return directory / cache_mod._name(kind, key)


def stored(tmp_path: Path, kind: str = "table") -> tuple[IndexCache, Path]:
    cache = IndexCache(str(tmp_path / "cache"))
    cache.store(kind, KEY, PAYLOAD)
    return cache, entry_file(tmp_path / "cache", kind)


def test_round_trip_and_kinds_and_keys_apart(tmp_path: Path) -> None:
    cache = IndexCache(str(tmp_path / "c"))
    assert cache.load("table", KEY) is None
    cache.store("table", KEY, PAYLOAD)
    cache.store("gzip-index", KEY, b"other")
    cache.store("table", KEY + "0", b"")
    assert cache.load("table", KEY) == PAYLOAD
    assert cache.load("gzip-index", KEY) == b"other"
    assert cache.load("table", KEY + "0") == b""
    cache.store("table", KEY, b"replaced")
    assert cache.load("table", KEY) == b"replaced"
    assert {(e.kind, e.key) for e in cache.entries()} == {
        ("table", KEY),
        ("gzip-index", KEY),
        ("table", KEY + "0"),
    }


def test_directory_and_entries_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "ocifuse"
    cache = IndexCache(str(directory))
    cache.store("table", KEY, PAYLOAD)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(entry_file(directory).stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == [entry_file(directory).name]  # no temp file left


def test_disabled_cache_stores_nothing(tmp_path: Path) -> None:
    cache = IndexCache(None)
    cache.store("table", KEY, PAYLOAD)
    assert cache.load("table", KEY) is None
    assert cache.spill_path(KEY) is None
    assert cache.entries() == []
    assert cache.clear() == 0


def test_load_does_not_create_the_directory(tmp_path: Path) -> None:
    assert IndexCache(str(tmp_path / "c")).load("table", KEY) is None
    assert not (tmp_path / "c").exists()


def test_invalid_kind_is_a_programming_error(tmp_path: Path) -> None:
    cache = IndexCache(str(tmp_path))
    for kind in ("", "Table", "a/b", "spill", "x.y"):
        with pytest.raises(ValueError):
            cache.store(kind, KEY, b"")


def assert_ignored_then_rebuilt(cache: IndexCache, path: Path, kind: str = "table") -> None:
    """The damaged entry at ``path`` loads as None (and is gone); a store then loads again."""
    assert cache.load(kind, KEY) is None
    assert not path.is_symlink() and not path.exists()
    cache.store(kind, KEY, PAYLOAD)
    assert cache.load(kind, KEY) == PAYLOAD


# Every checksum an entry may carry (store.Artifact.checksum): a sha256, a crc32 (remote blocks).
CHECKSUMMED = pytest.mark.parametrize("kind", ["table", "remote-block"])


@CHECKSUMMED
def test_truncated_entries_are_ignored_and_rebuilt(tmp_path: Path, kind: str) -> None:
    cache, path = stored(tmp_path, kind)
    whole = path.read_bytes()
    for cut in range(len(whole)):
        path.write_bytes(whole[:cut])
        assert_ignored_then_rebuilt(cache, path, kind)
    path.write_bytes(whole + b"\0")  # trailing bytes: not what was written either
    assert_ignored_then_rebuilt(cache, path, kind)


@CHECKSUMMED
def test_every_flipped_byte_is_caught(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    cache, path = stored(tmp_path, kind)
    whole = path.read_bytes()
    for i in range(len(whole)):
        damaged = bytearray(whole)
        damaged[i] ^= 0x01
        path.write_bytes(bytes(damaged))
        os.chmod(path, 0o600)
        with caplog.at_level(logging.WARNING, logger="ocifuse.cache"):
            caplog.clear()
            assert_ignored_then_rebuilt(cache, path, kind)
        assert "ignored" in caplog.text


def test_entry_of_another_version_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = IndexCache(str(tmp_path / "cache"))
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", CACHE_VERSION + 1)
    cache.store("table", KEY, PAYLOAD)
    assert cache.load("table", KEY) == PAYLOAD
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", CACHE_VERSION)
    assert_ignored_then_rebuilt(cache, entry_file(tmp_path / "cache"))


def test_entry_of_another_key_under_this_name_is_ignored(tmp_path: Path) -> None:
    cache, path = stored(tmp_path)
    path.write_bytes(cache_mod.encode("table", "another key", PAYLOAD))
    os.chmod(path, 0o600)
    assert_ignored_then_rebuilt(cache, path)
    path.write_bytes(cache_mod.encode("gzip-index", KEY, PAYLOAD))
    os.chmod(path, 0o600)
    assert_ignored_then_rebuilt(cache, path)


def test_entry_readable_by_others_is_ignored(tmp_path: Path) -> None:
    cache, path = stored(tmp_path)
    os.chmod(path, 0o644)
    assert_ignored_then_rebuilt(cache, path)


def root_only() -> None:
    if os.geteuid() != 0:
        skip_or_fail("chown to another user needs root")


def test_entry_written_by_another_user_is_ignored(tmp_path: Path) -> None:
    root_only()
    cache, path = stored(tmp_path)
    os.chown(path, 4242, 4242)
    assert_ignored_then_rebuilt(cache, path)
    assert path.stat().st_uid == os.geteuid()


def test_directory_of_another_user_is_not_used(tmp_path: Path) -> None:
    root_only()
    cache, path = stored(tmp_path)
    directory = tmp_path / "cache"
    os.chown(directory, 4242, 4242)
    assert cache.load("table", KEY) is None
    cache.store("table", "new", PAYLOAD)
    assert not entry_file(directory, key="new").exists()
    assert path.exists()  # not ours to remove either
    assert cache.entries() == [] and cache.clear() == 0 and path.exists()


def test_directory_writable_by_others_is_not_used(tmp_path: Path) -> None:
    cache, path = stored(tmp_path)
    os.chmod(tmp_path / "cache", 0o777)
    assert cache.load("table", KEY) is None
    cache.store("table", "new", PAYLOAD)
    assert not entry_file(tmp_path / "cache", key="new").exists()
    os.chmod(tmp_path / "cache", 0o755)  # readable by others is allowed (systemd's CacheDirectoryMode)
    assert cache.load("table", KEY) == PAYLOAD


def test_symlink_in_place_of_an_entry_is_never_followed(tmp_path: Path) -> None:
    cache, path = stored(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    path.rename(elsewhere)  # a valid entry, but reached through a symlink
    path.symlink_to(elsewhere)
    assert cache.load("table", KEY) is None
    assert not path.is_symlink()
    # Storing over a planted symlink replaces the link; its target is never written through.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path.symlink_to(victim)
    cache.store("table", KEY, PAYLOAD)
    assert victim.read_bytes() == b"precious"
    assert not path.is_symlink() and cache.load("table", KEY) == PAYLOAD


def test_fifo_in_place_of_an_entry_does_not_hang(tmp_path: Path) -> None:
    cache, path = stored(tmp_path)
    path.unlink()
    os.mkfifo(path, 0o600)
    assert_ignored_then_rebuilt(cache, path)


def test_symlink_in_place_of_the_directory_is_never_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    IndexCache(str(real)).store("table", KEY, PAYLOAD)
    link = tmp_path / "link"
    link.symlink_to(real)
    cache = IndexCache(str(link))
    assert cache.load("table", KEY) is None
    cache.store("table", "new", PAYLOAD)
    assert not entry_file(real, key="new").exists()
    assert cache.spill_path(KEY) is None
    assert cache.entries() == [] and cache.clear() == 0
    assert entry_file(real).exists() and link.is_symlink()


def test_a_file_in_place_of_the_directory(tmp_path: Path) -> None:
    (tmp_path / "c").write_bytes(b"x")
    cache = IndexCache(str(tmp_path / "c"))
    cache.store("table", KEY, PAYLOAD)  # logged, not raised
    assert cache.load("table", KEY) is None
    assert (tmp_path / "c").read_bytes() == b"x"


def _store_with_file_size_limit(directory: str, limit: int, payload: bytes) -> None:
    # RLIMIT_FSIZE makes write(2) fail with EFBIG (Python ignores SIGXFSZ): a real disk error.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    logging.basicConfig(level=logging.WARNING)
    IndexCache(directory).store("table", KEY, payload)


def test_disk_error_on_store_is_logged_not_raised(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_store_with_file_size_limit, args=(str(directory), 4096, b"x" * 100_000))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0  # no exception escaped store
    assert list(directory.iterdir()) == []  # no entry, no temp file left behind
    assert IndexCache(str(directory)).load("table", KEY) is None


def test_disk_error_reported_as_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = IndexCache(str(tmp_path / "c"))
    cache.store("table", "x", b"")

    def failing_fsync(fd: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with caplog.at_level(logging.WARNING, logger="ocifuse.cache"):
        cache.store("table", KEY, PAYLOAD)
    assert "not stored: No space left on device" in caplog.text
    assert [p.name for p in (tmp_path / "c").iterdir()] == [entry_file(tmp_path / "c", key="x").name]


def _writer(directory: str, payload: bytes, rounds: int) -> None:
    cache = IndexCache(directory)
    for _ in range(rounds):
        cache.store("table", KEY, payload)


def _reader(directory: str, payloads: tuple[bytes, bytes], rounds: int, bad: Any) -> None:
    cache = IndexCache(directory)
    for _ in range(rounds):
        got = cache.load("table", KEY)
        if got not in payloads:
            with bad.get_lock():
                bad.value += 1


def test_two_writers_never_damage_an_entry(tmp_path: Path) -> None:
    directory = str(tmp_path / "c")
    # Two different payloads, large enough that a write takes several syscalls' time.
    a, b = os.urandom(300_000), os.urandom(200_000)
    IndexCache(directory).store("table", KEY, a)
    ctx = multiprocessing.get_context("fork")
    bad = ctx.Value("i", 0)
    procs = [
        ctx.Process(target=_writer, args=(directory, a, 200)),
        ctx.Process(target=_writer, args=(directory, b, 200)),
        ctx.Process(target=_reader, args=(directory, (a, b), 400, bad)),
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert bad.value == 0  # every load saw one whole entry (never None: the entry was never damaged)
    assert IndexCache(directory).load("table", KEY) in (a, b)
    assert [p.name for p in Path(directory).iterdir()] == [entry_file(Path(directory)).name]


def test_entries_and_clear(tmp_path: Path) -> None:
    cache = IndexCache(str(tmp_path / "c"))
    cache.store("table", KEY, PAYLOAD)
    spill = cache.spill_path("sha256:" + "cd" * 32)
    assert spill is not None and os.path.dirname(spill) == str(tmp_path / "c")
    Path(spill).write_bytes(b"s" * 1000)
    (tmp_path / "c" / ".tmp.table.dead.1.ab").write_bytes(b"t" * 10)  # a writer that died
    (tmp_path / "c" / "README").write_bytes(b"not ours")
    infos = cache.entries()
    assert sorted((e.kind, e.size) for e in infos) == sorted(
        [("table", entry_file(tmp_path / "c").stat().st_size), ("spill", 1000)]
    )
    total = sum(e.size for e in infos)
    assert cache.clear() == total + 10
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["README"]
    assert cache.load("table", KEY) is None


def test_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(
        "CACHE_DIRECTORY", f"{tmp_path}/service:{tmp_path}/second"
    )  # systemd's CacheDirectory=
    assert IndexCache.default().directory == f"{tmp_path}/service"
    monkeypatch.delenv("CACHE_DIRECTORY")
    if os.geteuid() == 0:
        assert IndexCache.default().directory == "/var/cache/ocifuse"
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_mod.default_directory() == str(tmp_path / "xdg" / "ocifuse")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.default_directory() == str(tmp_path / "home" / ".cache" / "ocifuse")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_mod.default_directory() == str(tmp_path / "home" / ".cache" / "ocifuse")


def test_open_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert cache_mod.open_cache("rel").directory == str(tmp_path / "rel")
    assert cache_mod.open_cache("rel", disabled=True).directory is None
    assert cache_mod.open_cache(None).directory == cache_mod.default_directory()


def test_file_key_follows_identity_and_both_ends(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    body = bytearray(os.urandom(3 << 20))
    path.write_bytes(body)

    first = archive_key(path)
    assert archive_key(path) == first
    st = path.stat()
    for where in (0, len(body) - 1, (1 << 20) - 1, len(body) - (1 << 20)):
        changed = bytearray(body)
        changed[where] ^= 1
        path.write_bytes(changed)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the hash tells
        assert archive_key(path) != first, where
    path.write_bytes(body)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert archive_key(path) != first
    copy = tmp_path / "b.tar"
    copy.write_bytes(body)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert archive_key(copy) != first  # another inode
    small = tmp_path / "small"
    small.write_bytes(b"tiny")
    assert archive_key(small).endswith(":" + hashlib.sha256(b"tiny").hexdigest())


def test_blob_key_is_the_digest() -> None:
    d = Digest.parse(KEY)
    assert blob_key(d) == KEY


def test_temp_files_of_dead_writers_are_swept(tmp_path: Path) -> None:
    """A writer killed mid-write (a mount stopped while indexing) leaves a temp file: the next removes it.

    Kept: the temp files of live writers, and those of unknown writers changed in the last day.
    """
    directory = tmp_path / "c"
    directory.mkdir(mode=0o700)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = gone.pid, os.getppid()
    names = {
        f".tmp.spill-{dead}-x1y2z3": False,
        f".tmp.table.{'0' * 32}.{dead}.0badf00d": False,
        f".tmp.spill-{alive}-x1y2z3": True,
        f".tmp.table.{'0' * 32}.{os.getpid()}.0badf00d": True,
        ".tmp.spill-legacy1": True,  # a writer without a pid in the name, recent
        ".tmp.spill-legacy2": False,  # ... unchanged for two days
        f".tmp.spill-{alive}-old": False,
    }
    for name in names:
        (directory / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    for name in (".tmp.spill-legacy2", f".tmp.spill-{alive}-old"):
        os.utime(directory / name, (two_days_ago, two_days_ago))
    cache = IndexCache(str(directory))
    assert cache.load("table", KEY) is None  # reading sweeps nothing
    assert len(os.listdir(directory)) == len(names)
    cache.store("table", KEY, PAYLOAD)
    left = set(os.listdir(directory))
    assert left == {n for n, keep in names.items() if keep} | {cache_mod._name("table", KEY)}


def _framed(kind: str, key: str, payload: bytes, version: int) -> bytes:
    """An entry file as cache.encode frames it, with the header's format version given."""
    kind_b, key_b = kind.encode(), key.encode()
    head = (
        cache_mod._HEADER.pack(cache_mod.MAGIC, version, len(kind_b), len(key_b), len(payload))
        + kind_b
        + key_b
    )
    return head + payload + hashlib.sha256(head + payload).digest()


def test_entries_of_the_framing_before_kinds_had_versions_still_load(tmp_path: Path) -> None:
    """Every kind starts at the framing's version (2): what an older ocifuse stored is used as it is,
    unless its kind's format changed since (its version bumped: the entry is then out of date)."""
    cache, path = stored(tmp_path)
    for kind, artifact in store.KINDS.items():
        path = entry_file(tmp_path / "cache", kind)
        path.write_bytes(_framed(kind, KEY, PAYLOAD, 2))
        os.chmod(path, 0o600)
        assert cache.load(kind, KEY) == (PAYLOAD if artifact.version == 2 else None), kind
    assert store.KINDS["rootfs-tree"].version == 3  # merged trees stored as columns since
    assert store.KINDS["remote-block"].version == 4  # a crc32 since, not a sha256


def test_remote_blocks_of_the_sha256_format_go_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote-block entry of version 3 (a sha256 where a crc32 now is): out of date, not damaged.

    Every chunk a remote archive had in the cache is one: a warning each would be hundreds."""
    cache, _ = stored(tmp_path)
    path = entry_file(tmp_path / "cache", "remote-block")
    path.write_bytes(_framed("remote-block", KEY, PAYLOAD, 3))
    os.chmod(path, 0o600)
    with caplog.at_level(logging.DEBUG):
        assert cache.load("remote-block", KEY) is None
    assert not path.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "out of date" in caplog.text


def test_each_kind_names_a_checksum_the_cache_takes() -> None:
    """A remote block's entry ends in a crc32 (4 bytes), every other kind's in a sha256."""
    assert {a.kind: a.checksum for a in store.KINDS.values() if a.checksum != "sha256"} == {
        "remote-block": "crc32"
    }
    assert all(a.checksum in cache_mod.CHECKSUMS for a in store.KINDS.values())
    assert cache_mod.encode("remote-block", KEY, PAYLOAD).endswith(
        zlib.crc32(cache_mod.encode("remote-block", KEY, PAYLOAD)[:-4]).to_bytes(4, "little")
    )


def test_a_kind_whose_version_is_bumped_rebuilds_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale entry (another version of its kind) is removed without a warning, then stored anew."""
    cache, path = stored(tmp_path)
    monkeypatch.setitem(store.KINDS, "table", dataclasses.replace(store.KINDS["table"], version=3))
    with caplog.at_level(logging.DEBUG):
        assert cache.load("table", KEY) is None
    assert not path.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "out of date" in caplog.text
    built = store.load_or_build(
        cache,
        store.KINDS["table"],
        KEY,
        name="x",
        decode=bytes,
        build=lambda: b"rebuilt",
        encode=bytes,
    )
    assert built == b"rebuilt" and cache.load("table", KEY) == b"rebuilt"
    assert path.read_bytes()[8:12] == (3).to_bytes(4, "little")  # stored under the new version
