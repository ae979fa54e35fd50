"""The index cache as users meet it: options, ``ocifuse cache list|clear``, inspect, fsck and real mounts."""

from __future__ import annotations

import errno
import json
from contextlib import closing
from pathlib import Path

import pytest
from cachebuild import plant, stored_table
from mounting import mounted, run_ocifuse
from oci import LayoutBuilder
from tarbuild import tar_extract, tree_of

from ocifuse import archive as archive_module
from ocifuse.archive import Archive
from ocifuse.entries import ArchiveTable, Entry, Kind
from ocifuse.options import OptionError, parse


def big_layout(path: Path) -> Path:
    """A valid oci-archive with more entries than the cache's threshold (one image, many layers)."""
    builder = LayoutBuilder()
    layers = [b"layer %d\n" % i for i in range(archive_module.TABLE_CACHE_MIN_ENTRIES)]
    builder.tag(builder.image(layers), "v1")
    return builder.write_tar(path)


# -- options --------------------------------------------------------------------------------------


def test_cache_options() -> None:
    assert (parse([], fsname="a").cache, parse([], fsname="a").nocache) == (None, False)
    opts = parse(["ro,cache=/var/tmp/c\\,x"], fsname="a")
    assert (opts.cache, opts.nocache) == ("/var/tmp/c,x", False)
    assert parse(["cache=/c", "nocache"], fsname="a").nocache
    assert parse(["nocache,cache=/c"], fsname="a").nocache
    assert parse([], fsname="a", cache="/d").cache == "/d"
    assert parse(["cache=/o"], fsname="a", cache="/flag").cache == "/o"
    assert parse([], fsname="a", nocache=True).nocache
    for opts in (parse(["cache=/c"], fsname="a"), parse(["nocache"], fsname="a")):
        assert not any(o.startswith(("cache", "nocache")) for o in opts.fuse)  # ours, not libfuse's
    with pytest.raises(OptionError):
        parse(["cache="], fsname="a")


# -- inspect, fsck, cache list|clear ----------------------------------------------------------------


def test_inspect_stores_and_uses_the_table_and_cache_lists_and_clears_it(tmp_path: Path) -> None:
    archive = big_layout(tmp_path / "a.tar")
    cache = tmp_path / "cache"
    first = run_ocifuse("inspect", "--json", "--cache", cache, archive)
    assert first.returncode == 0, first.stderr
    with closing(Archive(str(archive))) as scanned:
        table = stored_table(archive, cache)
        assert table is not None and table.entries == scanned.table.entries
    listed = run_ocifuse("cache", "list", "--cache", cache)
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    size = next(cache.iterdir()).stat().st_size
    assert lines[1].split()[0] == "table" and "file:" in lines[1]
    assert lines[-1].startswith(f"total: 1 entries, {size / 1024:.1f} KiB in {cache}")
    # inspect takes the stored table: a planted one without index.json makes it fail ...
    plant(archive, cache, ArchiveTable({"oci-layout": Entry(Kind.FILE, 512, 30, 0)}, [], 0))
    assert run_ocifuse("inspect", "--cache", cache, archive).returncode == 2
    assert run_ocifuse("inspect", "--no-cache", "--cache", cache, archive).returncode == 0
    # ... fsck never trusts it: it scans, passes, and stores the fresh table in its place.
    fsck = run_ocifuse("fsck", "--cache", cache, archive)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert run_ocifuse("inspect", "--cache", cache, archive).returncode == 0
    cleared = run_ocifuse("cache", "clear", "--cache", cache)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 1 entries")
    assert list(cache.iterdir()) == []
    assert run_ocifuse("cache", "list", "--cache", cache).stdout.startswith("total: 0 entries")


def test_no_cache_stores_nothing(tmp_path: Path) -> None:
    archive = big_layout(tmp_path / "a.tar")
    cache = tmp_path / "cache"
    for command in ("inspect", "fsck"):
        done = run_ocifuse(command, "--no-cache", "--cache", cache, archive)
        assert done.returncode == 0, done.stderr
    assert not cache.exists()


def test_unusable_cache_directory_is_one_warning_not_an_error(tmp_path: Path) -> None:
    archive = big_layout(tmp_path / "a.tar")
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    done = run_ocifuse("inspect", "--json", "--cache", tmp_path / "link", archive)
    assert done.returncode == 0 and json.loads(done.stdout)
    assert done.stderr.count("index cache") == 1 and "symlink" in done.stderr
    assert list((tmp_path / "real").iterdir()) == []


# -- real mounts ----------------------------------------------------------------------------------


def test_mount_from_the_cached_table_serves_every_byte(tmp_path: Path) -> None:
    archive = big_layout(tmp_path / "a.tar")
    cache = tmp_path / "cache"
    expected = tree_of(tar_extract(archive, tmp_path / "x"))
    with mounted(archive, tmp_path / "m1", options=[f"cache={cache}"]) as m:
        assert tree_of(m.mountpoint) == expected
    assert stored_table(archive, cache) is not None
    with mounted(archive, tmp_path / "m2", options=[f"cache={cache}"]) as m:
        assert tree_of(m.mountpoint) == expected
    with mounted(archive, tmp_path / "m3", args=["--no-cache", "--cache", str(tmp_path / "c2")]) as m:
        assert tree_of(m.mountpoint) == expected
    assert not (tmp_path / "c2").exists()


def test_mount_answers_eio_for_a_cached_entry_past_the_end(tmp_path: Path) -> None:
    archive = big_layout(tmp_path / "a.tar")
    cache = tmp_path / "cache"
    expected = tree_of(tar_extract(archive, tmp_path / "x"))[0]
    with closing(Archive(str(archive))) as a:
        entries = dict(a.table.entries)
    size = archive.stat().st_size
    victim = next(n for n in entries if n.startswith("blobs/"))
    entries[victim] = Entry(Kind.FILE, size - 3, 10, 0)
    plant(archive, cache, ArchiveTable(entries, [], 0))
    with mounted(archive, tmp_path / "m", options=[f"cache={cache}"]) as m:
        with pytest.raises(OSError) as raised:
            m.path(victim).read_bytes()
        assert raised.value.errno == errno.EIO
        assert m.path("index.json").read_bytes() == expected["index.json"]
        assert m.alive()
