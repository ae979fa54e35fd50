"""The bounded index cache: least recently used keys out after a store; prune, list; live mounts unharmed."""

from __future__ import annotations

import os
import random
import re
import time
from contextlib import closing
from pathlib import Path

import pytest
import pyzstd
from cachebuild import stored_table
from mounting import mounted, run_ocifuse
from oci import LayoutBuilder
from tarbuild import tar_extract, tree_of
from test_cache_cli import big_layout

from ocifuse import cache as cache_mod
from ocifuse import zstdsource
from ocifuse.archive import Archive
from ocifuse.cache import DEFAULT_MAX, IndexCache, default_bound, file_key
from ocifuse.options import OptionError, parse
from ocifuse.source import OpenFile
from ocifuse.units import human_size

# A time well in the past, in whole seconds: files set to PAST + n were last used in that order.
PAST = int(time.time()) - 100_000


def entry(directory: Path, kind: str, key: str) -> Path:
    return directory / cache_mod._name(kind, key)


def spill_file(directory: Path, key: str) -> Path:
    return directory / (cache_mod._SPILL_PREFIX + cache_mod._key_hash(key))


def used_at(path: Path, seconds: int) -> None:
    """Make ``path`` look last used (and written) at ``seconds``: no sleeping, no timing."""
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9), follow_symlinks=False)


def keys(cache: IndexCache) -> set[str]:
    return {e.key for e in cache.entries() if e.kind != "spill"}


def total(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def three_old_keys(tmp_path: Path, bound: int | None = None) -> tuple[IndexCache, Path, int]:
    """Keys a, b, c of one 1,000-byte table each, last used in the order a, c, b; the size of one."""
    directory = tmp_path / "c"
    cache = IndexCache(str(directory), bound)
    for key in "abc":
        cache.store("table", key, b"x" * 1000)
    for n, key in enumerate("acb"):
        used_at(entry(directory, "table", key), PAST + n)
    return cache, directory, entry(directory, "table", "a").stat().st_size


# -- the option and the default -------------------------------------------------------------------


def test_cache_max_option() -> None:
    opts = parse(["cache_max=512M"], fsname="a")
    assert opts.cache_max == 512 << 20
    assert not any(o.startswith("cache_max") for o in opts.fuse)  # ours, not libfuse's
    assert parse([], fsname="a").cache_max is None  # the default bound
    assert parse([], fsname="a", cache_max=5).cache_max == 5  # --cache-max
    assert parse(["cache_max=1G"], fsname="a", cache_max=5).cache_max == 1 << 30  # -o wins, as cache=
    assert parse(["cache_max=0"], fsname="a").cache_max == 0
    assert parse(["cache_max=1G,max_size=2G"], fsname="a").limits.max_size == 2 << 30
    with pytest.raises(OptionError, match="size in bytes"):
        parse(["cache_max=lots"], fsname="a")


def test_default_bound_is_the_smaller_of_10_gib_and_a_tenth_of_the_filesystem(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    assert default_bound(st) == min(DEFAULT_MAX, st.f_blocks * st.f_frsize // 10)
    assert IndexCache(str(tmp_path / "not" / "yet")).bound() == default_bound(st)  # made later, there
    assert IndexCache(str(tmp_path), 123).bound() == 123
    assert IndexCache(None).bound() is None


# -- eviction after a store -----------------------------------------------------------------------


def test_least_recently_used_go_first_and_the_key_stored_stays(tmp_path: Path) -> None:
    cache, directory, one = three_old_keys(tmp_path)
    cache.max_size = 3 * one  # d makes four: one must go, the least recently used (a)
    cache.store("table", "d", b"x" * 1000)
    assert keys(cache) == {"b", "c", "d"}
    cache.store("table", "e", b"x" * 1000)  # e: c goes (used before b), then the total fits
    assert keys(cache) == {"b", "d", "e"}
    cache.max_size = 10  # smaller than any entry: everything goes but the one just stored
    cache.store("table", "f", b"y" * 5000)
    assert keys(cache) == {"f"}
    assert cache.load("table", "f") == b"y" * 5000


def test_a_load_is_a_use_and_keeps_the_written_time(tmp_path: Path) -> None:
    cache, directory, one = three_old_keys(tmp_path, None)
    a = entry(directory, "table", "a")
    written = a.stat().st_mtime_ns
    assert cache.load("table", "a") == b"x" * 1000
    assert a.stat().st_mtime_ns == written  # the mtime says when it was written, still
    assert a.stat().st_atime_ns > written  # ... the atime when it was used
    cache.max_size = 2 * one
    cache.store("table", "d", b"x" * 1000)
    assert keys(cache) == {"a", "d"}  # c and b, the least recently used, went; a was just loaded


def test_the_bound_is_held_to_within_one_key(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    bound = 20_000
    cache = IndexCache(str(directory), bound)
    rng = random.Random(18)
    for n in range(60):
        key = f"k{n}"
        cache.store("table", key, rng.randbytes(rng.randint(100, 6000)))
        last = entry(directory, "table", key).stat().st_size
        assert total(directory) <= bound + last, n
        assert cache.load("table", key) is not None  # the most recently used survives
    assert total(directory) > bound // 2  # it evicts down to the bound, not to nothing


def test_a_key_goes_with_all_its_files_and_its_spill(tmp_path: Path) -> None:
    """An archive's table, its index and its spill are used together, and go together."""
    directory = tmp_path / "c"
    cache = IndexCache(str(directory))
    path = cache.spill_path("old")
    assert path is not None
    spill = Path(path)
    spill.write_bytes(b"s" * 5000)
    cache.store("zstd-index", "old", b"i" * 100)
    cache.store("table", "old", b"t" * 100)
    cache.store("table", "mid", b"t" * 3000)
    cache.store("table", "new", b"t" * 100)
    for p in (spill, entry(directory, "zstd-index", "old"), entry(directory, "table", "old")):
        used_at(p, PAST)
    used_at(entry(directory, "table", "mid"), PAST + 1000)
    # The spill was read later (a live mount, under relatime): the key's last use is its latest file's,
    # so mid is now the least recently used key, and the only one to go.
    used_at(spill, PAST + 50_000)
    cache.max_size = 6000
    cache.store("table", "newest", b"t" * 100)
    assert keys(cache) == {"old", "new", "newest"} and spill.exists()
    cache.max_size = 1000
    cache.store("table", "newest", b"t" * 100)
    assert keys(cache) == {"new", "newest"}  # old went whole: its table, its index, its spill
    assert not spill.exists()


def test_a_spill_stored_with_its_index_stays_however_large(tmp_path: Path) -> None:
    """The spill is linked before its zstd-index entry is stored: that store keeps it (same key)."""
    directory = tmp_path / "c"
    cache = IndexCache(str(directory), 1000)
    cache.store("table", "older", b"t" * 100)
    path = cache.spill_path("big")
    assert path is not None
    Path(path).write_bytes(b"s" * 50_000)
    cache.store("zstd-index", "big", b"i" * 100)
    assert Path(path).exists() and entry(directory, "zstd-index", "big").exists()
    assert keys(cache) == {"big"}  # the older key went, to make room


def test_eviction_removes_only_its_own_regular_files(tmp_path: Path) -> None:
    """A symlink or a directory named like an entry is neither followed, counted nor removed."""
    directory = tmp_path / "c"
    cache = IndexCache(str(directory), 0)
    cache.store("table", "a", b"x" * 100)
    target = tmp_path / "precious"
    target.write_bytes(b"p" * 100_000)
    link = entry(directory, "table", "planted")
    link.symlink_to(target)
    (directory / (cache_mod._SPILL_PREFIX + "0" * 32)).mkdir()
    (directory / "README").write_bytes(b"not ours" * 1000)
    (directory / ".tmp.table.x.1.ab").write_bytes(b"being written")
    cache.store("table", "b", b"x" * 100)
    assert target.read_bytes() == b"p" * 100_000 and link.is_symlink()
    assert (directory / (cache_mod._SPILL_PREFIX + "0" * 32)).is_dir()
    assert (directory / "README").exists() and (directory / ".tmp.table.x.1.ab").exists()
    assert not entry(directory, "table", "a").exists() and entry(directory, "table", "b").exists()


# -- prune, list ----------------------------------------------------------------------------------


def test_prune_by_size_and_by_age(tmp_path: Path) -> None:
    cache, directory, one = three_old_keys(tmp_path)
    cache.store("table", "d", b"x" * 1000)  # used now
    assert cache.prune(max_size=10 * one) == (0, 0)
    assert cache.prune(max_size=3 * one) == (1, one)  # a, the least recently used
    assert keys(cache) == {"b", "c", "d"}
    # Unused for longer than the one used at PAST + 1 (c), and within a bound that keeps the rest.
    assert cache.prune(older_than=time.time() - (PAST + 1.5), max_size=10 * one) == (1, one)
    assert keys(cache) == {"b", "d"}
    assert cache.prune(older_than=3600, max_size=10 * one) == (1, one)  # b: a day old
    assert keys(cache) == {"d"}  # d was used now
    assert cache.prune(max_size=0) == (1, one)  # nothing is kept from prune
    assert cache.entries() == [] and cache.prune() == (0, 0)
    assert IndexCache(str(tmp_path / "absent")).prune(max_size=0) == (0, 0)


def test_list_shows_last_use_least_recent_first_and_the_total_against_the_bound(tmp_path: Path) -> None:
    cache, directory, one = three_old_keys(tmp_path)
    infos = cache.entries()
    assert [e.key for e in infos] == ["a", "c", "b"]  # the order eviction takes them
    assert [e.used for e in infos] == [PAST, PAST + 1, PAST + 2]
    assert all(e.kind == "table" and e.size == one for e in infos)
    # Listing is no use: entry headers are read with O_NOATIME (relatime would set an atime older
    # than the mtime).
    a = entry(directory, "table", "a")
    os.utime(a, ns=(PAST * 10**9, (PAST + 10) * 10**9))
    cache.entries()
    assert a.stat().st_atime_ns == PAST * 10**9
    listed = run_ocifuse("cache", "list", "--cache", directory, "--max", "6K")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["KIND", "SIZE", "LAST", "USE", "KEY"]
    assert [line.split()[-1] for line in lines[1:-1]] == ["c", "b", "a"]  # a's mtime is now its latest
    assert re.fullmatch(r"table\s+1\.0 KiB\s+1d ago\s+c", lines[1]), lines[1]
    share = f"{100 * 3 * one / 6144:.0f}%"
    assert lines[-1] == f"total: 3 entries, {human_size(3 * one)} in {directory}; bound 6.0 KiB ({share})"


def test_cache_prune_command(tmp_path: Path) -> None:
    cache, directory, one = three_old_keys(tmp_path)
    cache.store("table", "d", b"x" * 1000)
    done = run_ocifuse("cache", "prune", "--cache", directory, "--older-than", "1h")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout
        == f"removed 3 entries, {human_size(3 * one)} from {directory}; 1 entries, {human_size(one)} left\n"
    )
    assert keys(cache) == {"d"}
    done = run_ocifuse("cache", "prune", "--cache", directory, "--max", "0")
    assert done.returncode == 0 and done.stdout.startswith("removed 1 entries") and cache.entries() == []
    for bad in (
        ["clear", "--max", "1G"],
        ["list", "--older-than", "1d"],
        ["prune", "--max", "lots"],
        ["prune", "--older-than", "7"],
    ):
        done = run_ocifuse("cache", *bad, "--cache", directory)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (bad, done.stderr)


def test_inspect_takes_cache_max(tmp_path: Path) -> None:
    """--cache-max reaches the cache of fsck and inspect: the older archive's table goes."""
    first, second = big_layout(tmp_path / "a.tar"), big_layout(tmp_path / "b.tar")
    directory = tmp_path / "c"
    for archive in (first, second):
        done = run_ocifuse("inspect", "--cache", directory, "--cache-max", "1K", archive)
        assert done.returncode == 0, done.stderr
    assert stored_table(first, directory) is None
    assert stored_table(second, directory) is not None


# -- a live user of an evicted spill ---------------------------------------------------------------


def zstd_layout(path: Path, layer_size: int) -> tuple[Path, dict[str, bytes]]:
    """An oci-archive compressed as one zstd frame (what ``zstd`` writes), and its files."""
    builder = LayoutBuilder()
    builder.tag(builder.image([random.Random(7).randbytes(layer_size), b"small layer\n"]), "v1")
    plain = builder.write_tar(path.with_suffix(".plain"))
    path.write_bytes(pyzstd.compress(plain.read_bytes()))
    return path, builder.layout_files()


def test_reads_go_on_after_the_spill_is_evicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zstdsource, "ZSTD_FRAME_INPLACE", 1 << 20)
    path, files = zstd_layout(tmp_path / "a.tar.zst", 3 << 20)
    directory = tmp_path / "c"
    with closing(Archive(str(path), IndexCache(str(directory), 1))) as archive:
        assert isinstance(archive.sources[0], zstdsource.ZstdSpill)
        with closing(OpenFile(str(path))) as f:
            key = file_key(f)
        spill = spill_file(directory, key)
        assert spill.exists()  # kept: the key just stored, however far over the bound
        IndexCache(str(directory), 1).store("table", "another archive", b"t" * 100)
        assert not spill.exists() and keys(IndexCache(str(directory))) == {"another archive"}
        for name, entry_ in archive.files():
            assert archive.pread(entry_, 0, entry_.size) == files[name], name
    # The next open builds it again.
    with closing(Archive(str(path), IndexCache(str(directory)))) as archive:
        assert spill.exists()


@pytest.mark.fuse
def test_a_mount_reads_on_after_its_spill_is_evicted(tmp_path: Path) -> None:
    """cache_max reaches the daemon; a spill evicted under a live mount leaves it serving every byte."""
    path, _ = zstd_layout(tmp_path / "a.tar.zst", 9 << 20)  # a frame over 8 MiB: spilled
    expected = tree_of(tar_extract(path.with_suffix(".plain"), tmp_path / "x"))
    directory = tmp_path / "c"
    with mounted(path, tmp_path / "m", options=[f"cache={directory}", "cache_max=1K"]) as m:
        spills = [p for p in directory.iterdir() if p.name.startswith("spill.")]
        assert len(spills) == 1 and spills[0].stat().st_size > 9 << 20
        # Another archive stored under the same small bound: the mount's spill goes.
        other = big_layout(tmp_path / "b.tar")
        done = run_ocifuse("inspect", "--cache", directory, "--cache-max", "1K", other)
        assert done.returncode == 0, done.stderr
        assert not spills[0].exists()
        assert stored_table(other, directory) is not None
        assert tree_of(m.mountpoint) == expected  # every byte read after the spill was removed
        assert m.alive()
