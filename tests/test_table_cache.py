"""The saved entry table: exact round trip, loaded instead of a scan, never trusted past its source."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
import tarbuild
from cachebuild import plant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tarbuild import file_member, many_members, write_archive

from ocifuse import archive as archive_module
from ocifuse.archive import Archive
from ocifuse.cache import IndexCache
from ocifuse.entries import COLUMN_FIELDS, ArchiveTable, Entry, Kind, Skipped
from ocifuse.errors import CorruptTable
from ocifuse.layout import ArchiveLayout
from ocifuse.tablecodec import decode_table, encode_table

CASES: dict[str, Callable[[Path], Path]] = {**tarbuild.ODD_FORMATS, **tarbuild.SKIPPING}


def same_table(a: ArchiveTable, b: ArchiveTable) -> None:
    assert a.entries == b.entries
    assert a.skipped == b.skipped
    assert a.symlinks == b.symlinks
    assert a.end == b.end
    assert len(a) == len(b)
    for name, entry in a.entries.items():
        assert b.get(name) == entry
    assert b.get("no/such/name") is None
    assert sorted(a.files()) == sorted(b.files())


def test_entry_fields_are_all_stored() -> None:
    """Whoever adds a field to Entry must store it in the table columns (and bump CACHE_VERSION)."""
    assert tuple(f.name for f in dataclasses.fields(Entry)) == COLUMN_FIELDS


@pytest.mark.parametrize("case", CASES)
def test_round_trip_of_real_tables(case: str, tmp_path: Path) -> None:
    with closing(Archive(str(CASES[case](tmp_path)))) as archive:
        same_table(archive.table, decode_table(encode_table(archive.table)))


def test_round_trip_of_odd_values() -> None:
    entries = {
        "d": Entry(Kind.DIR, 0, 0, -(2**63)),
        "d/\udcff\udc80ä€": Entry(Kind.FILE, 2**63, 2**64 - 1 - 2**63, 2**63 - 1, 7),
        "e": Entry(Kind.FILE, 0, 0, 0, 2**32 - 1),
    }
    skipped = [Skipped("x\0y", "name contains a NUL byte"), Skipped("", "empty name"), Skipped("\udcff", "é")]
    table = ArchiveTable(entries, skipped, 12345, {"l\udcff": "../t\0x", "m": ""})
    same_table(table, decode_table(encode_table(table)))
    empty = ArchiveTable({}, [], 0)
    same_table(empty, decode_table(encode_table(empty)))


def test_every_cut_of_a_payload_is_refused(tmp_path: Path) -> None:
    with closing(Archive(str(tarbuild.specials(tmp_path)))) as archive:
        payload = encode_table(archive.table)
    for cut in range(len(payload)):
        with pytest.raises(ValueError):
            decode_table(payload[:cut])
    with pytest.raises(ValueError):
        decode_table(payload + b"\0")


def no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> ArchiveTable:
        raise AssertionError("scanned although the table is stored")

    monkeypatch.setattr(archive_module, "scan_table", refuse)


def test_large_table_is_stored_and_loaded_instead_of_a_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = many_members(tmp_path, archive_module.TABLE_CACHE_MIN_ENTRIES)
    cache = IndexCache(str(tmp_path / "cache"))
    with closing(Archive(str(path), cache=cache)) as scanned:
        assert [e.kind for e in cache.entries()] == ["table"]
        expected = {n: scanned.pread(e, 0, e.size) for n, e in scanned.files()}
        table = scanned.table
    with monkeypatch.context() as m:
        no_scan(m)
        with closing(Archive(str(path), cache=cache)) as loaded:
            same_table(table, loaded.table)
            assert {n: loaded.pread(e, 0, e.size) for n, e in loaded.files()} == expected
            assert ArchiveLayout(loaded).read_at("files/000999", 0, 100) == b"999\n"


def test_small_plain_table_is_not_stored(tmp_path: Path) -> None:
    cache = IndexCache(str(tmp_path / "cache"))
    with closing(Archive(str(tarbuild.ustar(tmp_path)), cache=cache)):
        pass
    assert cache.entries() == []


def test_without_a_cache_nothing_is_stored(tmp_path: Path) -> None:
    path = many_members(tmp_path, archive_module.TABLE_CACHE_MIN_ENTRIES)
    for cache in (None, IndexCache(None)):
        with closing(Archive(str(path), cache=cache)):
            pass
    assert not (tmp_path / "cache").exists()


def store_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_module, "TABLE_CACHE_MIN_ENTRIES", 0)


def test_changed_archive_is_scanned_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewritten in place, size and mtime kept: the hash of the ends gives it another key."""
    store_all(monkeypatch)
    path = write_archive(tmp_path / "a.tar", [file_member("f", b"one\n")])
    cache = IndexCache(str(tmp_path / "cache"))
    with closing(Archive(str(path), cache=cache)) as a:
        assert a.pread(a.table.entries["f"], 0, 10) == b"one\n"
    st = path.stat()
    data = path.read_bytes()
    path.write_bytes(data.replace(b"one\n", b"two\n"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with closing(Archive(str(path), cache=cache)) as a:
        assert a.pread(a.table.entries["f"], 0, 10) == b"two\n"
    assert len(cache.entries()) == 2


def test_stored_entry_past_the_end_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_archive(tmp_path / "a.tar", [file_member("f", b"data\n"), file_member("g", b"more\n")])
    size = path.stat().st_size
    cache = IndexCache(str(tmp_path / "cache"))
    entries = {
        "f": Entry(Kind.FILE, size - 2, 5, 0),  # starts inside, ends past the end
        "g": Entry(Kind.FILE, size + 4096, 5, 0),  # wholly past the end
        "h": Entry(Kind.FILE, 512, 5, 0, source=3),  # a source the archive does not have
        "ok": Entry(Kind.FILE, 512, 5, 0),
    }
    plant(path, cache, ArchiveTable(entries, [], 0))
    no_scan(monkeypatch)
    with closing(Archive(str(path), cache=cache)) as a:
        for name in ("f", "g", "h"):
            e = a.table.entries[name]
            with pytest.raises(CorruptTable) as raised:
                a.pread(e, 0, 5)
            assert raised.value.errno == 5  # EIO
            with pytest.raises(CorruptTable):
                a.pread_cached(e, 0, 5)
        assert a.pread(a.table.entries["ok"], 0, 5) == b"data\n"


def test_unusable_payload_is_scanned_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload that passes the cache's checks but does not decode (a format bug) means a scan."""
    store_all(monkeypatch)
    path = write_archive(tmp_path / "a.tar", [file_member("f", b"data\n")])
    cache = IndexCache(str(tmp_path / "cache"))
    plant(path, cache, b"\xff" * 40)
    with closing(Archive(str(path), cache=cache)) as a:
        assert a.pread(a.table.entries["f"], 0, 10) == b"data\n"


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_payload_decodes_or_raises_value_error(data: st.DataObject) -> None:
    """The checksum guards the cache; decode itself still never fails other than with ValueError."""
    entries = {
        "d": Entry(Kind.DIR, 0, 0, 1),
        "d/f": Entry(Kind.FILE, 512, 3, 2),
        "g": Entry(Kind.FILE, 9, 0, 3),
    }
    payload = bytearray(encode_table(ArchiveTable(entries, [Skipped("s", "why")], 2048, {"l": "t"})))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload)))
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip" and at < len(payload):
            payload[at] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del payload[at:]
        else:
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        table = decode_table(bytes(payload))
    except ValueError:
        return
    list(table.files())
    len(table.entries)
