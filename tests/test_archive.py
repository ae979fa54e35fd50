"""The tar entry table: every odd format, the name policy, errors, bounded preads, changes underneath."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import IO, Any

import pytest
import tarbuild
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tarbuild import (
    BROKEN,
    HUGE,
    HUGE_MARKER,
    HUGE_NAME,
    HUGE_SIZE,
    LONG_NAME,
    ODD_FORMATS,
    SKIPPED_NAMES,
    SKIPPING,
    UTF8_NAME,
    dir_member,
    file_member,
    link_member,
    tar_extract,
    tree_of,
    write_archive,
)

from ocifuse import open_layout
from ocifuse import tarscan as archive_module
from ocifuse.archive import Archive
from ocifuse.entries import Entry, Kind
from ocifuse.errors import ArchiveChanged, LayoutOpenError, NotAnArchive, OcifuseError
from ocifuse.tarscan import normalize, scan_table


def _served(archive: Archive) -> tuple[dict[str, bytes], set[str]]:
    files = {name: archive.pread(e, 0, e.size) for name, e in archive.files()}
    dirs = {name for name, e in archive.table.entries.items() if e.kind is Kind.DIR}
    return files, dirs


@pytest.mark.parametrize("case", ODD_FORMATS)
def test_odd_format_serves_what_tar_extracts(case: str, tmp_path: Path) -> None:
    """Files, bytes and directories served equal GNU ``tar -x`` of the same archive; nothing skipped."""
    path = ODD_FORMATS[case](tmp_path)
    expected_files, expected_dirs = tree_of(tar_extract(path, tmp_path / "extracted"))
    archive = Archive(str(path))
    try:
        files, dirs = _served(archive)
        assert archive.table.skipped == []
    finally:
        archive.close()
    assert sorted(files) == sorted(expected_files)
    assert dirs == expected_dirs
    for name, data in expected_files.items():
        assert files[name] == data, name
    assert {"oci-layout", "index.json", "blobs"} <= set(files) | dirs


@pytest.mark.parametrize("case", ["gnu_longname", "pax_longname"])
def test_long_and_utf8_names(case: str, tmp_path: Path) -> None:
    """Names over 100 and over 255 bytes, and UTF-8 names, are served under their full path."""
    with closing(Archive(str(ODD_FORMATS[case](tmp_path)))) as archive:
        entries = archive.table.entries
        assert len(LONG_NAME) > 255 and LONG_NAME in entries
        assert UTF8_NAME in entries
        assert all(len(n) == len("blobs/sha512/") + 128 for n in entries if n.startswith("blobs/sha512/"))
        assert archive.pread(entries[LONG_NAME], 0, 100) == b"a file with a long name\n"


def test_dot_prefix_is_stripped_and_root_is_not_an_entry(tmp_path: Path) -> None:
    """``./`` prefixes are dropped; the ``./`` member is the root, neither served nor skipped."""
    with closing(Archive(str(tarbuild.dot_prefix(tmp_path)))) as archive:
        names = set(archive.table.entries)
        assert "" not in names and "." not in names
        assert not any(n.startswith(".") for n in names)
        assert "index.json" in names and archive.table.skipped == []


def test_implied_directories_are_entries(tmp_path: Path) -> None:
    """Directories that only appear in member paths are still directory entries."""
    with closing(Archive(str(tarbuild.implied_dirs(tmp_path)))) as archive:
        entries = archive.table.entries
        assert entries["blobs"].kind is Kind.DIR
        assert entries["blobs/sha256"].kind is Kind.DIR


@pytest.mark.parametrize("repeat", [False, True])
def test_a_file_under_which_paths_lie_is_a_directory(tmp_path: Path, repeat: bool) -> None:
    """A file whose path is another member's parent is skipped and served as an implied directory,
    whether no name repeats (rows sorted by name, no dict) or one does (the last row of each name)."""
    members = [file_member("x", b"file"), file_member("x/y", b"y"), file_member("b/c", b"c")]
    members += [file_member("b/c", b"c2")] if repeat else []
    path = write_archive(tmp_path / "a.tar", members, tarfile.USTAR_FORMAT)
    with open(path, "rb") as f:
        table = scan_table(f, str(path), os.path.getsize(path))
    assert list(table.columns.names) == ["b", "b/c", "x", "x/y"]
    assert [table.columns.kinds[i] for i in range(4)] == [1, 0, 1, 0]
    assert [s.name for s in table.skipped] == ["x"]
    assert table.columns.sizes[1] == (2 if repeat else 1) and table.columns.mtimes[2] == 0


def test_duplicates_last_one_wins(tmp_path: Path) -> None:
    """The later of two members with one name is served (as ``tar -x`` leaves it)."""
    with closing(Archive(str(tarbuild.duplicates(tmp_path)))) as archive:
        e = archive.table.entries["index.json"]
        assert archive.pread(e, 0, e.size) != b"{}"
        assert archive.pread(e, 0, e.size).startswith(b'{"schemaVersion"')


def test_hardlinks_share_the_target_bytes(tmp_path: Path) -> None:
    """A hardlink is served from its target's offset, with its target's size."""
    with closing(Archive(str(tarbuild.hardlinks(tmp_path)))) as archive:
        entries = archive.table.entries
        blobs = [n for n in entries if n.startswith("blobs/sha256/")]
        assert blobs
        for name in blobs:
            target = entries["payload/" + name.rsplit("/", 1)[1]]
            assert (entries[name].offset, entries[name].size) == (target.offset, target.size)


def test_hardlink_to_a_later_member_or_a_directory_is_skipped(tmp_path: Path) -> None:
    """Only a regular member before the link can be its target (what ``tar -x`` can link to)."""
    members = [
        dir_member("d/"),
        link_member("to-dir", "d"),
        link_member("to-later", "later"),
        file_member("later", b"x"),
        link_member("./ok", "./later"),
    ]
    path = write_archive(tmp_path / "links.tar", members)
    with closing(Archive(str(path))) as archive:
        assert {s.name for s in archive.table.skipped} == {"to-dir", "to-later"}
        assert archive.pread(archive.table.entries["ok"], 0, 10) == b"x"


def test_file_replaced_by_directory_of_same_name(tmp_path: Path) -> None:
    """A path that is a file member and also has children is a directory; the file is recorded as skipped."""
    path = write_archive(tmp_path / "clash.tar", [file_member("a", b"file"), file_member("a/b", b"child")])
    with closing(Archive(str(path))) as archive:
        assert archive.table.entries["a"].kind is Kind.DIR
        assert archive.table.entries["a/b"].kind is Kind.FILE
        assert [s.name for s in archive.table.skipped] == ["a"]


@pytest.mark.parametrize("case", HUGE)
def test_member_over_8_gib(case: str, tmp_path: Path) -> None:
    """A member over 8 GiB (PAX size record or GNU base-256) has its size and is readable at its end."""
    path = HUGE[case](tmp_path)
    assert os.stat(path).st_blocks * 512 < 64 << 20  # sparse: the test costs no disk
    with closing(Archive(str(path))) as archive:
        entry = archive.table.entries[HUGE_NAME]
        assert entry.size == HUGE_SIZE > 8 << 30
        assert archive.pread(entry, HUGE_SIZE - len(HUGE_MARKER), 4096) == HUGE_MARKER
        assert archive.pread(entry, 0, 16) == b"\0" * 16
        assert archive.pread(entry, HUGE_SIZE, 10) == b""
        after = archive.table.entries["after-huge.txt"]
        assert after.offset > HUGE_SIZE
        assert archive.pread(after, 0, 100) == b"a member after the huge one\n"


@pytest.mark.parametrize("case", SKIPPING)
def test_skipped_members_are_recorded_not_served(case: str, tmp_path: Path) -> None:
    """Unsafe names, symlinks, devices, fifos, sparse members: recorded in ``skipped``, never served."""
    with closing(Archive(str(SKIPPING[case](tmp_path)))) as archive:
        skipped = {s.name for s in archive.table.skipped}
        assert skipped == SKIPPED_NAMES[case]
        assert all(s.reason for s in archive.table.skipped)
        served = set(archive.table.entries)
        assert not {normalize(n) for n in skipped} & served
        assert not any(n.startswith(("/", "../")) or "/../" in n or n == "" for n in served)
        assert {"oci-layout", "index.json"} <= served  # the layout around them is still served
        assert "dev" not in served  # a directory only implied by skipped members does not exist


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a", "a"),
        ("./a/b", "a/b"),
        ("a//b/./c/", "a/b/c"),
        ("blobs/", "blobs"),
        (".", None),
        ("./", None),
        ("", None),
        ("/etc/passwd", None),
        ("..", None),
        ("a/../b", None),
        ("a/" + "x" * 255, "a/" + "x" * 255),
        ("a/" + "x" * 256, None),
        ("é" * 128, None),  # 256 bytes in UTF-8
    ],
)
def test_normalize(name: str, expected: str | None) -> None:
    """The name policy: ./ and empty components dropped; absolute, .., empty, over-long refused."""
    assert normalize(name) == expected


@pytest.mark.parametrize("case", BROKEN)
def test_broken_archives_raise_an_error_naming_the_file(case: str, tmp_path: Path) -> None:
    """Each broken archive raises its LayoutOpenError subclass, naming the file, from both entry points."""
    build, expected = BROKEN[case]
    path = build(tmp_path)
    for opener in (Archive, open_layout):
        with pytest.raises(expected) as info:
            opener(str(path))
        assert isinstance(info.value, OcifuseError)
        assert info.value.path == str(path)
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_a_gzipped_archive_serves_what_the_plain_one_does(tmp_path: Path) -> None:
    """``gzip`` around an oci-archive changes nothing served (tests/test_compressed_archive.py: the tools)."""
    packed = Archive(str(tarbuild.gzipped(tmp_path)))  # writes pax.tar too: open the plain one after
    plain = Archive(str(tarbuild.pax(tmp_path)))
    try:
        assert (plain.compression, packed.compression) == ("plain", "gzip")
        assert plain.table.entries.keys() == packed.table.entries.keys()
        for name, entry in plain.files():
            assert packed.pread(packed.table.entries[name], 0, entry.size) == plain.pread(
                entry, 0, entry.size
            )
    finally:
        plain.close()
        packed.close()


def test_a_gzipped_non_tar_says_both(tmp_path: Path) -> None:
    with pytest.raises(NotAnArchive, match="gzip-compressed, but not a tar archive"):
        Archive(str(tarbuild.gzipped_not_a_tar(tmp_path)))


def test_garbage_is_an_error_not_silent_truncation(tmp_path: Path) -> None:
    """An invalid header mid-archive is reported at its byte offset, not taken as the end."""
    with pytest.raises(NotAnArchive, match="invalid tar header at byte 1024"):
        Archive(str(tarbuild.garbage_after_member(tmp_path)))


def test_missing_file_and_directory_are_layout_open_errors(tmp_path: Path) -> None:
    """A path that does not exist, or is a directory, is a LayoutOpenError naming it."""
    with pytest.raises(LayoutOpenError, match="no-such.tar"):
        Archive(str(tmp_path / "no-such.tar"))
    with pytest.raises(NotAnArchive, match="not a regular file"):
        Archive(str(tmp_path))


def test_cut_at_every_block_never_tracebacks(tmp_path: Path) -> None:
    """Cutting the sample archive at any block boundary or mid-block gives a table or an OcifuseError."""
    data = tarbuild.pax(tmp_path).read_bytes()
    cut = tmp_path / "cut.tar"
    for at in sorted({*range(0, len(data), 512), *range(100, len(data), 4096), len(data) - 1}):
        cut.write_bytes(data[:at])
        with suppress(OcifuseError):
            Archive(str(cut)).close()


class _CountingReader:
    """Counts the bytes read through it, to prove the scan seeks over member data."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def test_scan_never_reads_member_data(tmp_path: Path) -> None:
    """Scanning an archive with 8 MiB of member data reads only headers (a few KiB)."""
    members = [file_member(f"m{i}", os.urandom(1 << 20)) for i in range(8)]
    path = write_archive(tmp_path / "big.tar", members)
    with open(path, "rb", buffering=0) as f:
        reader = _CountingReader(f)
        table = scan_table(reader, str(path), os.path.getsize(path))  # type: ignore[arg-type]
    assert len(table.entries) == 8
    assert reader.bytes_read < 64 * 1024


# -- bounded preads --------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> tuple[Archive, Entry]:
    """An archive with member ``f`` of 10 bytes followed by another member."""
    path = write_archive(tmp_path / "s.tar", [file_member("f", b"0123456789"), file_member("g", b"NEXT")])
    archive = Archive(str(path))
    return archive, archive.table.entries["f"]


@pytest.mark.parametrize(
    ("offset", "size", "expected"),
    [
        (0, 10, b"0123456789"),
        (0, 4096, b"0123456789"),
        (7, 100, b"789"),
        (9, 1, b"9"),
        (10, 5, b""),
        (11, 5, b""),
        (1 << 40, 5, b""),
        (3, 0, b""),
        (-1, 5, b""),
    ],
)
def test_pread_is_clipped_to_the_entry(
    small: tuple[Archive, Entry], offset: int, size: int, expected: bytes
) -> None:
    """No pread returns bytes beyond the entry's end (the next member's header or data)."""
    archive, entry = small
    try:
        assert archive.pread(entry, offset, size) == expected
    finally:
        archive.close()


@pytest.mark.parametrize(
    "change",
    [
        lambda p: os.truncate(p, 512),
        lambda p: os.truncate(p, os.path.getsize(p) + 512),
        lambda p: os.utime(p, ns=(0, 1_000_000_000)),
    ],
    ids=["truncated", "grown", "rewritten-in-place"],
)
def test_archive_changed_under_an_open_archive(tmp_path: Path, change: Callable[[Path], None]) -> None:
    """Truncating or rewriting the file after opening makes reads raise ArchiveChanged, not serve junk."""
    path = tarbuild.pax(tmp_path)
    with closing(Archive(str(path))) as archive:
        entry = archive.table.entries["index.json"]
        assert archive.pread(entry, 0, 1) == b"{"
        change(path)
        with pytest.raises(ArchiveChanged) as info:
            archive.pread(entry, 0, entry.size)
        assert info.value.path == str(path)


def test_replacing_the_file_by_rename_keeps_serving_the_old_one(tmp_path: Path) -> None:
    """The open fd keeps the original file: a rename over it changes nothing for the open archive."""
    path = tarbuild.pax(tmp_path)
    with closing(Archive(str(path))) as archive:
        entry = archive.table.entries["index.json"]
        before = archive.pread(entry, 0, entry.size)
        other = tmp_path / "other.tar"
        other.write_bytes(b"\0" * 4096)
        os.replace(other, path)
        assert archive.pread(entry, 0, entry.size) == before


def test_files_lists_only_regular_files(tmp_path: Path) -> None:
    """``files()`` yields regular files, never directories."""
    with closing(Archive(str(tarbuild.pax(tmp_path)))) as archive:
        names = [n for n, _ in archive.files()]
        assert "index.json" in names and "blobs" not in names
        assert all(e.kind is Kind.FILE for _, e in archive.files())


def test_close_is_idempotent(tmp_path: Path) -> None:
    """Closing twice is harmless."""
    archive = Archive(str(tarbuild.pax(tmp_path)))
    archive.close()
    archive.close()
    assert archive.fd == -1


# -- scale ---------------------------------------------------------------------------------------------


def test_hundred_thousand_members(tmp_path: Path) -> None:
    """A 100,000-member archive scans into a table of all of them (members are not kept by tarfile)."""
    path = tarbuild.many_members(tmp_path, 100_000)
    with closing(Archive(str(path))) as archive:
        assert len(archive.table.entries) == 100_001  # the files and their implied directory
        last = archive.table.entries["files/099999"]
        assert archive.pread(last, 0, 100) == b"99999\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 8 * 1024), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_headers_give_a_table_or_an_ocifuse_error(
    tmp_path: Path, flips: list[tuple[int, int]]
) -> None:
    """Bytes overwritten anywhere in the first headers give a table or an OcifuseError, nothing else."""
    data = bytearray(tarbuild.pax(tmp_path).read_bytes())
    for at, value in flips:
        data[at] = value
    path = tmp_path / "flipped.tar"
    path.write_bytes(bytes(data))
    with suppress(OcifuseError):
        Archive(str(path)).close()


# -- the scan's fast paths agree with the slow ones ------------------------------------------------


def _scan_outcome(path: Path) -> object:
    """The table of ``path`` (entries, skipped, end), or the error class and message it raises."""
    try:
        with open(path, "rb") as f:
            table = scan_table(f, str(path), os.path.getsize(path))
    except OcifuseError as e:
        return type(e), str(e)
    return table.entries, table.skipped, table.end


def _both_ways(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """The scan with the plain-header fast paths (one header, a run of them), then with every header
    left to tarfile."""
    fast = _scan_outcome(path)
    with monkeypatch.context() as m:
        m.setattr(archive_module, "_plain_header", lambda *args: None)
        m.setattr(archive_module, "_plain_run", lambda fileobj, pos, *args: pos)  # the runs too
        slow = _scan_outcome(path)
    return fast, slow


@pytest.mark.parametrize("case", [*ODD_FORMATS, *SKIPPING])
def test_fast_header_path_matches_tarfile(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain ustar headers parsed by the fast path give exactly the table tarfile's parse gives."""
    fast, slow = _both_ways({**ODD_FORMATS, **SKIPPING}[case](tmp_path), monkeypatch)
    assert fast == slow


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 4 * 512 - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fast_header_path_matches_tarfile_on_corrupt_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flips: list[tuple[int, int]]
) -> None:
    """Bytes overwritten in ustar headers (checksums fixed up): both parses agree, table or error."""
    data = bytearray(tarbuild.ustar(tmp_path).read_bytes())
    for at, value in flips:
        data[at] = value
    for header in range(0, 4 * 512, 512):  # keep checksums right so the fast path is really exercised
        block = data[header : header + 512]
        block[148:156] = b" " * 8
        data[header + 148 : header + 156] = b"%06o\0 " % sum(block)
    path = tmp_path / "flipped.tar"
    path.write_bytes(bytes(data))
    fast, slow = _both_ways(path, monkeypatch)
    assert fast == slow


def _reference_normalize(name: str) -> str | None:
    """The name policy spelled out step by step, without normalize's shortcut for plain names."""
    if name.startswith("/") or "\0" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or any(len(os.fsencode(p)) > 255 for p in parts):
        return None
    return "/".join(parts)


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", ".x", "é", "\0", "x" * 200, "\udcff"]), max_size=6))
def test_normalize_matches_the_spelled_out_policy(parts: list[str]) -> None:
    """normalize's shortcut for already-normal names never changes what the policy decides."""
    name = "/".join(parts)
    assert normalize(name) == _reference_normalize(name)


def test_runs_of_plain_headers_match_tarfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of plain headers (``_plain_run``: many members, no TarInfo each) between members tarfile
    reads give exactly the table tarfile's parse gives: duplicates, a file under a file, refused
    names, a prefix-field name, a hardlink to a member of a run, implied directories."""
    path = tmp_path / "runs.tar"
    long_dir = "p" * 90 + "/" + "q" * 60  # a name ustar splits into prefix and name
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:

        def add(name: str, data: bytes | None = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = kind, link, 1234567
            if data is not None and kind == tarfile.REGTYPE:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data or b""))

        add("first")
        for i in range(300):
            add(f"d{i % 7}/f{i}", b"y" * (i % 700))
        add("d1/", None, tarfile.DIRTYPE)
        add("d1/f1", b"again")  # a duplicate: the last one wins
        add("d2/f2/under", b"z")  # a file under a file: the file gives way to a directory
        add("../escape", b"no")
        add("./", None, tarfile.DIRTYPE)
        add(f"{long_dir}/file", b"long")
        add("link", None, tarfile.LNKTYPE, "d3/f3")  # tarfile's, to a member of a run
        add("sym", None, tarfile.SYMTYPE, "d4/f4")
        add("after/f", b"after")
    runs: list[int] = []
    plain_run: Callable[..., int] = archive_module._plain_run

    def counting(*args: Any) -> int:
        *head, take = args

        def counted(run: list[archive_module.PlainMember]) -> None:
            runs.append(len(run))
            take(run)

        return plain_run(*head, counted)

    monkeypatch.setattr(archive_module, "_plain_run", counting)
    fast = _scan_outcome(path)
    assert sum(runs) >= 300  # the runs took most members
    monkeypatch.setattr(archive_module, "_plain_run", plain_run)
    assert fast == _both_ways(path, monkeypatch)[1]
    assert isinstance(fast, tuple)
    entries = fast[0]
    assert isinstance(entries, dict)
    assert entries["link"].offset == entries["d3/f3"].offset
    assert entries["d1/f1"].size == 5 and entries["d2/f2"].kind is Kind.DIR
    assert f"{long_dir}/file" in entries and "escape" not in entries
