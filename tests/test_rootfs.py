"""The layer scan (every member type and its metadata) and the layer merge (layer.md), without FUSE."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import stat
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tarbuild import (
    BLOCK,
    BROKEN,
    MTIME,
    ODD_FORMATS,
    SKIPPING,
    Member,
    dir_member,
    file_member,
    link_member,
    write_member,
)

from ocifuse import rootfs as rootfs_module
from ocifuse.entries import Entry, Kind, Sources
from ocifuse.errors import NotAnArchive, OcifuseError, TruncatedArchive
from ocifuse.fs import Operations
from ocifuse.layer import LayerScan, LayerTable, Type
from ocifuse.rootfs import Merged, merge
from ocifuse.source import MemorySource
from ocifuse.streams import Forward, Limits
from ocifuse.tree import ROOT, Tree

# security.capability of cap_net_bind_service+ep (VFS_CAP_REVISION_2)
CTX = pyfuse3.RequestContext()
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def tar_bytes(members: list[Member], *, end: bool = True, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A layer tar of ``members``; ``end=False`` leaves out the end-of-archive blocks (umoci insert)."""
    f = io.BytesIO()
    for m in members:
        write_member(f, m, fmt)  # type: ignore[arg-type]
    if end:
        f.write(b"\0" * 2 * BLOCK)
    return f.getvalue()


def scan(data: bytes) -> LayerTable:
    """Scan a layer tar held in memory; the scan of a first pass's stream agrees (forward_scan)."""
    try:
        table = LayerTable.scan(MemorySource(data), "layer")
    except OcifuseError as e:
        for chunk in FORWARD_CHUNKS:
            with pytest.raises(OcifuseError) as found:
                forward_scan(data, chunk)
            assert (type(found.value), str(found.value)) == (type(e), str(e))
        raise
    for chunk in FORWARD_CHUNKS:
        other = forward_scan(data, chunk)
        assert (other.members, other.skipped, other.end) == (table.members, table.skipped, table.end)
    return table


# Chunk sizes a pass's stream comes in: a header split across chunks, a block per chunk, gzip's READ.
FORWARD_CHUNKS = (7, BLOCK, 1 << 20)


def forward_scan(data: bytes, chunk: int) -> LayerTable:
    """The table a first pass's LayerScan builds of ``data`` decompressed in chunks of ``chunk`` bytes."""
    chunks = iter([data[i : i + chunk] for i in range(0, len(data), chunk)])
    stream = Forward(chunks, name="layer", kind="test", limits=Limits(), digest=True)
    scanner = LayerScan("layer")
    stream.run(scanner)
    assert scanner.ran and stream.size == len(data) and stream.sha256() == hashlib.sha256(data).digest()
    return scanner.result()


def special(name: str, type_: bytes, major: int = 0, minor: int = 0) -> Member:
    """A device or fifo member."""
    m = dir_member(name)
    m.info.type = type_
    m.info.mode = 0o600
    m.info.devmajor, m.info.devminor = major, minor
    return m


def whiteout(name: str) -> Member:
    """A whiteout file (an empty regular file, as layer.md writes them)."""
    return file_member(name, b"")


def layers(*tars: list[Member]) -> Merged:
    """Merge layer tars given as member lists, lowest first."""
    return merge([scan(tar_bytes(t)) for t in tars])


def content(merged: Merged, tars: list[bytes], path: str) -> bytes:
    """The bytes the merged tree serves at ``path``, read from the layer its entry names."""
    e = merged.entries[path]
    return tars[e.source][e.offset : e.offset + e.size]


# -- the scan --------------------------------------------------------------------------------------


def test_scan_keeps_every_type_and_its_metadata() -> None:
    """Files, dirs, symlinks, hardlinks, devices, fifos; setuid/sticky modes, owners, xattrs, long names."""
    exe = file_member("bin/ping", b"\x7fELF...")
    exe.info.mode, exe.info.uid, exe.info.gid = 0o4755, 1000, 1001
    exe.info.pax_headers = {"SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape")}
    tmp = dir_member("tmp/")
    tmp.info.mode = 0o1777
    long_name = "deep/" + "x" * 200 + "/" + "y" * 150
    members = [
        dir_member("./"),
        dir_member("bin/"),
        exe,
        tmp,
        link_member("bin/sh", "busybox", tarfile.SYMTYPE),
        link_member("bin/ping6", "bin/ping"),
        special("dev/null", tarfile.CHRTYPE, 1, 3),
        special("dev/sda", tarfile.BLKTYPE, 8, 0),
        special("run/fifo", tarfile.FIFOTYPE),
        file_member(long_name, b"long"),
    ]
    data = tar_bytes(members)
    table = scan(data)
    assert table.skipped == []
    by_name = {m.name: m for m in table.members}
    assert [m.name for m in table.members] == [
        "", "bin", "bin/ping", "tmp", "bin/sh", "bin/ping6", "dev/null", "dev/sda", "run/fifo", long_name
    ]  # fmt: skip
    ping = by_name["bin/ping"]
    assert (ping.type, ping.mode, ping.uid, ping.gid, ping.mtime) == (Type.FILE, 0o4755, 1000, 1001, MTIME)
    assert data[ping.offset : ping.offset + ping.size] == b"\x7fELF..."
    assert ping.xattrs == ((b"security.capability", CAP),)
    assert by_name["tmp"].type is Type.DIR and by_name["tmp"].mode == 0o1777
    assert (by_name["bin/sh"].type, by_name["bin/sh"].linkname) == (Type.SYMLINK, "busybox")
    assert (by_name["bin/ping6"].type, by_name["bin/ping6"].linkname) == (Type.HARDLINK, "bin/ping")
    null = by_name["dev/null"]
    assert (null.type, null.devmajor, null.devminor, null.mode) == (Type.CHAR, 1, 3, 0o600)
    assert (by_name["dev/sda"].type, by_name["dev/sda"].devmajor) == (Type.BLOCK, 8)
    assert by_name["run/fifo"].type is Type.FIFO
    big = by_name[long_name]
    assert data[big.offset : big.offset + big.size] == b"long"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_fast_path_agrees_with_tarfile(fmt: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain headers of every type read by the fast paths (one header, runs of them, from a file or a
    stream read forward) give the members tarfile's parse gives."""
    from ocifuse import tarscan as archive

    members = [
        dir_member("a/"),
        file_member("a/f", b"x" * 700),
        link_member("a/s", "f", tarfile.SYMTYPE),
        link_member("a/h", "a/f"),
        special("a/c", tarfile.CHRTYPE, 4, 5),
        special("a/b", tarfile.BLKTYPE, 7, 9),
        special("a/p", tarfile.FIFOTYPE),
        file_member("a/g", b"y"),
    ]
    data = tar_bytes(members * 40, fmt=fmt)  # runs of plain headers (tarscan._plain_run) too

    fast = scan(data)  # from a file, and (scan checks it) from streams read forward
    with monkeypatch.context() as m:
        m.setattr(archive, "_plain_header", lambda *args: None)
        m.setattr(archive, "_plain_run", lambda fileobj, pos, *args: pos)
        slow = scan(data)
    assert fast.members == slow.members and fast.end == slow.end
    assert len(fast.members) == len(members) * 40


def test_scan_accepts_tars_without_end_blocks_even_mid_block() -> None:
    """umoci insert writes layers without end blocks, ending mid-block: Go accepts them, so do we."""
    members = [dir_member("d/"), file_member("d/a", b"a" * 10), file_member("d/b", b"b" * 700)]
    whole = tar_bytes(members, end=False)
    cut = whole[: len(whole) - (-700 % BLOCK)]  # the last member's padding left out
    assert len(cut) % BLOCK != 0
    for data in (whole, cut):
        table = scan(data)
        assert [m.name for m in table.members] == ["d", "d/a", "d/b"]
        b = table.members[2]
        assert data[b.offset : b.offset + b.size] == b"b" * 700


@pytest.mark.parametrize("data", [b"", b"\0" * 1024, b"\0" * 10240])
def test_scan_empty_layers(data: bytes) -> None:
    """An empty stream or only end blocks is a layer with no members (Go: io.EOF at the first header)."""
    assert scan(data).members == []


def test_scan_refuses_what_is_not_a_whole_tar() -> None:
    """Data cut short, a header cut short, garbage, compressed bytes: one clear error each."""
    whole = tar_bytes([file_member("f", b"z" * 2000)], end=False)
    with pytest.raises(TruncatedArchive):
        scan(whole[:1000])
    with pytest.raises(TruncatedArchive):
        scan(whole + tar_bytes([file_member("g", b"")])[:300])
    with pytest.raises(NotAnArchive):
        scan(os.urandom(4096))
    with pytest.raises(NotAnArchive, match="gzip"):
        scan(b"\x1f\x8b\x08\x00" + bytes(600))


@pytest.mark.parametrize(
    "build",
    [*ODD_FORMATS.values(), *SKIPPING.values(), *(b for b, _ in BROKEN.values())],
    ids=[*ODD_FORMATS, *SKIPPING, *BROKEN],
)
def test_a_pass_scans_every_tar_as_the_scan_does(tmp_path: Path, build: Callable[[Path], Path]) -> None:
    """The table a first pass builds as it decompresses (LayerScan over its forward stream) is the
    table, or the refusal, that the scan of the decompressed layer gives: for odd formats, skipped
    members and broken tars (``scan`` compares the two)."""
    data = build(tmp_path).read_bytes()
    try:
        LayerTable.scan(MemorySource(data), "layer")
    except OcifuseError:
        with pytest.raises(OcifuseError):  # scan() has compared the two refusals
            scan(data)
    else:
        scan(data)  # and the two tables


def test_scan_skips_unsafe_names_with_reasons() -> None:
    """Absolute names, '..' components and hardlinks to such names are skipped, each with a reason."""
    table = scan(
        tar_bytes(
            [
                file_member("/etc/passwd", b"x"),
                file_member("a/../../escape", b"x"),
                link_member("h", "../outside"),
                file_member("ok", b"fine"),
            ]
        )
    )
    assert [m.name for m in table.members] == ["ok"]
    reasons = {s.name: s.reason for s in table.skipped}
    assert reasons["/etc/passwd"] == "absolute name"
    assert reasons["a/../../escape"] == "name contains '..'"
    assert "hardlink to '../outside'" in reasons["h"]


# -- the merge -------------------------------------------------------------------------------------


def test_merge_whiteouts_hide_lower_files_and_subtrees() -> None:
    """.wh.NAME hides a file or a whole directory of lower layers; whiteouts are never shown."""
    merged = layers(
        [dir_member("etc/"), file_member("etc/a", b"a"), file_member("etc/b", b"b"), dir_member("opt/"),
         file_member("opt/x/y", b"y")],
        [whiteout("etc/.wh.a"), whiteout(".wh.opt"), whiteout("etc/.wh.missing")],
    )  # fmt: skip
    assert sorted(merged.entries) == ["etc", "etc/b"]
    assert merged.notes == []


def test_merge_whiteout_applies_only_to_lower_layers() -> None:
    """A file and its whiteout in the same layer: the file stays (layer.md), whichever comes first."""
    for order in (
        [file_member("a", b"new"), whiteout(".wh.a")],
        [whiteout(".wh.a"), file_member("a", b"new")],
    ):
        tars = [tar_bytes([file_member("a", b"old")]), tar_bytes(order)]
        merged = merge([scan(t) for t in tars])
        assert content(merged, tars, "a") == b"new"


@pytest.mark.parametrize("marker_first", [True, False])
def test_merge_opaque_hides_lower_entries_only(marker_first: bool) -> None:
    """.wh..wh..opq empties its directory of lower entries; the same layer's entries stay, in any order."""
    upper = [dir_member("d/"), file_member("d/new", b"n"), dir_member("d/sub/")]
    marker = whiteout("d/.wh..wh..opq")
    upper = [marker, *upper] if marker_first else [*upper, marker]  # umoci writes the marker first
    merged = layers([dir_member("d/"), file_member("d/old", b"o"), file_member("d/sub/deep", b"x")], upper)
    assert sorted(merged.entries) == ["d", "d/new", "d/sub"]


def test_merge_opaque_marker_alone_makes_its_directory() -> None:
    """An opaque marker in a single-layer image (go-containerregistry#1623): its directory exists, empty."""
    merged = layers([whiteout("empty/.wh..wh..opq"), file_member("f", b"")])
    assert sorted(merged.entries) == ["empty", "f"]
    assert merged.entries["empty"].kind is Kind.DIR


def test_merge_replacements_take_whole_subtrees() -> None:
    """A file over a directory drops the subtree; a directory over a file is empty; dir over dir merges."""
    top = dir_member("keep/")
    top.info.mode, top.info.uid = 0o700, 7
    merged = layers(
        [dir_member("d2f/"), file_member("d2f/inner", b"i"), file_member("f2d", b"f"), dir_member("keep/"),
         file_member("keep/old", b"o")],
        [file_member("d2f", b"file now"), whiteout("d2f/.wh.inner"), dir_member("f2d/"),
         file_member("f2d/child", b"c"), top, file_member("keep/new", b"n")],
    )  # fmt: skip
    assert sorted(merged.entries) == ["d2f", "f2d", "f2d/child", "keep", "keep/new", "keep/old"]
    assert merged.entries["d2f"].kind is Kind.FILE and merged.entries["f2d"].kind is Kind.DIR
    keep = merged.entries["keep"].meta
    assert keep is not None and (keep.mode, keep.uid) == (0o700, 7)
    # umoci writes "dir-to-file/.wh.inner" after the file: ignored, and said so
    assert [(n.layer, n.name) for n in merged.notes] == [(1, "d2f/.wh.inner")]
    assert "ignored" in merged.notes[0].reason


@pytest.mark.parametrize("name", [".wh.", "d/.wh..", "d/.wh..."])
def test_merge_refuses_whiteouts_of_nothing_or_parents(name: str) -> None:
    """'.wh.' names nothing (image-spec#1301); '.wh..' and '.wh...' would hide '.' or '..': refused, noted."""
    merged = layers([dir_member("d/"), file_member("d/f", b"")], [whiteout(name)])
    assert sorted(merged.entries) == ["d", "d/f"]
    assert [n.name for n in merged.notes] == [name]


def test_merge_hardlinks_share_one_inode() -> None:
    """Hardlinks within and across layers: one entry, the right link count; a replaced target splits them."""
    tars = [
        tar_bytes([file_member("a", b"shared"), link_member("b", "a")]),
        tar_bytes([link_member("c", "b")]),
    ]
    merged = merge([scan(t) for t in tars])
    a, b, c = (merged.entries[p] for p in "abc")
    assert a == b == c  # one inode: the same entry, its Meta one object
    assert a.meta is b.meta is c.meta
    assert a.meta is not None and a.meta.nlink == 3 and a.meta.group != 0
    assert content(merged, tars, "c") == b"shared"
    tars.append(tar_bytes([file_member("a", b"replaced")]))
    merged = merge([scan(t) for t in tars])
    a, b = merged.entries["a"], merged.entries["b"]
    assert a != b and merged.entries["c"] == b and a.meta is not b.meta
    assert a.meta is not None and b.meta is not None and (a.meta.nlink, b.meta.nlink) == (1, 2)
    assert content(merged, tars, "b") == b"shared" and content(merged, tars, "a") == b"replaced"


def test_merge_skips_hardlinks_to_nothing() -> None:
    """A hardlink to a missing name, a later member, a directory or itself is skipped with a reason."""
    merged = layers(
        [dir_member("d/"), link_member("to-dir", "d"), link_member("early", "late"), file_member("late", b""),
         link_member("gone", "nowhere"), link_member("self", "self")],
    )  # fmt: skip
    assert sorted(merged.entries) == ["d", "late"]
    assert sorted(n.name for n in merged.notes) == ["early", "gone", "self", "to-dir"]


def test_merge_serves_symlink_loops_as_they_are() -> None:
    """Symlinks are entries with a target; loops and dangling targets are served, never followed."""
    merged = layers([link_member("a", "b", tarfile.SYMTYPE), link_member("b", "a", tarfile.SYMTYPE)])
    a = merged.entries["a"]
    assert a.kind is Kind.SYMLINK and a.meta is not None and a.meta.link == b"b" and a.size == 1


def test_merge_implicit_parents_and_root_metadata() -> None:
    """Parents with no entry of their own are 0755 root-owned directories; './' sets the root's metadata."""
    root = dir_member("./")
    root.info.mode = 0o751
    merged = layers([root, file_member("x/y/z", b"z")])
    assert merged.root.meta is not None and merged.root.meta.mode == 0o751
    x = merged.entries["x"]
    assert isinstance(x, Entry) and x.kind is Kind.DIR and x.meta is not None and x.meta.mode == 0o755


class DictStore:
    """An in-memory stand-in for the persistent cache's load/store."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], bytes] = {}

    def load(self, kind: str, key: str) -> bytes | None:
        return self.entries.get((kind, key))

    def store(self, kind: str, key: str, payload: bytes) -> None:
        self.entries[(kind, key)] = payload

    @property
    def enabled(self) -> bool:
        return True

    def spill_path(self, key: str) -> str | None:
        return None

    def lock(self, kind: str, key: str) -> contextlib.AbstractContextManager[bool]:
        return contextlib.nullcontext(False)


def test_layer_table_round_trips_through_the_cache() -> None:
    """A cached table equals the scan, every field and xattr byte; the second load reads no header."""
    exe = file_member("bin/x", b"binary")
    exe.info.pax_headers = {"SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape")}
    members = [dir_member("./"), exe, link_member("bin/y", "bin/x"), file_member("/abs", b"")]
    data = tar_bytes(
        [*members, special("dev/c", tarfile.CHRTYPE, 5, 1), link_member("s", "t", tarfile.SYMTYPE)]
    )
    store = DictStore()
    scanned = LayerTable.load_or_scan(MemorySource(data), "layer", key="sha256:x", cache=store)
    assert store.entries
    zeros = MemorySource(bytes(len(data)))  # scanned, this would be an empty layer: the table is the cache's
    assert LayerTable.load_or_scan(zeros, "layer", key="sha256:x", cache=store).members == scanned.members
    again = LayerTable.from_bytes(store.entries[("layer-table", "sha256:x")], len(data))
    assert (again.members, again.skipped, again.end) == (scanned.members, scanned.skipped, scanned.end)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.replace(b'"format":1', b'"format":2'),
        lambda d: d.replace(b"bin/x", b"../xx"),
        lambda d: d[:-5],
        lambda d: d.replace(b',"file",', b',"sock",'),
        lambda d: d.replace(b',"file",420,', b',"file","420",'),
        lambda d: d.replace(b',"file",420,0,0,1700000000,512,', b',"file",420,0,0,1700000000,99999,'),
    ],
)
def test_a_bad_cached_table_is_scanned_again(damage: Callable[[bytes], bytes]) -> None:
    """A cached table for another format, with a refused name, cut short or of an unknown type: rescanned."""
    data = tar_bytes([file_member("bin/x", b"binary")])
    store = DictStore()
    good = LayerTable.load_or_scan(MemorySource(data), "layer", key="k", cache=store)
    damaged = damage(store.entries[("layer-table", "k")])
    assert damaged != store.entries[("layer-table", "k")]
    store.entries[("layer-table", "k")] = damaged
    assert LayerTable.load_or_scan(MemorySource(data), "layer", key="k", cache=store).members == good.members
    # a table cached for a longer stream is not used for this one either
    bigger = tar_bytes([file_member("bin/x", b"binary" * 1000)])
    store.entries[("layer-table", "k")] = LayerTable.scan(MemorySource(bigger), "b").to_bytes(len(bigger))
    assert LayerTable.load_or_scan(MemorySource(data), "layer", key="k", cache=store).members == good.members


_NAMES = ["a", "b", "a/b", "a/c", "a/b/c", "b/a", "c"]


def _op(kind: str, name: str, n: int) -> Member:
    parent, _, base = name.rpartition("/")
    prefix = f"{parent}/" if parent else ""
    if kind == "file":
        return file_member(name, b"%d" % n)
    if kind == "dir":
        return dir_member(name + "/")
    if kind == "symlink":
        return link_member(name, ["a", "/a/b", "..", "b/a", "c/../a", "a/b/c"][n % 6], tarfile.SYMTYPE)
    if kind == "hardlink":
        return link_member(name, _NAMES[n % len(_NAMES)])
    if kind == "whiteout":
        return whiteout(f"{prefix}.wh.{base}")
    return whiteout(f"{name}/.wh..wh..opq")


_ops = st.lists(
    st.tuples(
        st.sampled_from(["file", "dir", "symlink", "hardlink", "whiteout", "opaque"]), st.sampled_from(_NAMES)
    ),
    max_size=8,
)


def _shape(merged: Merged) -> object:
    return sorted((p, e.kind, e.source, e.offset, e.meta and e.meta.nlink) for p, e in merged.entries.items())


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, min_size=1, max_size=4))
def test_merge_memo_never_changes_the_result(layer_ops: list[list[tuple[str, str]]]) -> None:
    """Random layers of files, dirs, links, whiteouts and opaque markers: the same tree with the
    remembered parent directories as without them; and no path is ever both a file and under one."""
    tables = [scan(tar_bytes([_op(k, n, i) for i, (k, n) in enumerate(ops)])) for ops in layer_ops]
    fast = merge(tables)
    plain = rootfs_module._Merger.parent_dir

    def forgetful(self: rootfs_module._Merger, path: str, name: str) -> rootfs_module._Dir | None:
        self._dirs.clear()
        return plain(self, path, name)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(rootfs_module._Merger, "parent_dir", forgetful)
        slow = merge(tables)
    assert _shape(fast) == _shape(slow)
    for path in fast.entries:
        parent = path.rpartition("/")[0]
        assert not parent or fast.entries[parent].kind is Kind.DIR


def _hardlinked_tree() -> tuple[Merged, list[int]]:
    tars = [
        tar_bytes([dir_member("./"), file_member("d/a", b"shared"), link_member("d/b", "d/a"),
                   link_member("s", "d/a", tarfile.SYMTYPE), special("c", tarfile.CHRTYPE, 1, 3)]),
        tar_bytes([link_member("c2", "d/b"), whiteout(".wh.nothing"), file_member("/abs", b"")]),
    ]  # fmt: skip
    return merge([scan(t) for t in tars]), [len(t) for t in tars]


def test_merged_tree_round_trips_through_the_cache() -> None:
    """A cached tree is the merge's: every entry, hardlinks still one Meta, the root, the notes."""
    merged, sizes = _hardlinked_tree()
    again = Merged.from_bytes(merged.to_bytes(sizes), sizes)
    assert again.entries == merged.entries and again.root == merged.root and again.notes == merged.notes
    assert again.entries["d/a"] == again.entries["d/b"] == again.entries["c2"]
    meta = again.entries["d/a"].meta
    assert meta is not None and meta.nlink == 3 and meta is again.entries["c2"].meta
    assert sorted(again.entries) == list(again.entries)  # stored in path order


def _damaged(data: bytes, column: str, row: int, value: bytes) -> bytes:
    """``data`` (a stored tree) with one row of one column overwritten by ``value``."""
    (head_len,) = struct.unpack_from("<Q", data)
    head = json.loads(data[8 : 8 + head_len])
    n, at = head["count"], 8 + head_len
    starts = {"names": at}
    at += head["names"]
    for name, width in (("ends", 8), ("kinds", 1), ("offsets", 8), ("sizes", 8), ("mtimes", 8)):
        starts[name] = at
        at += width * n
    width = len(value)
    where = starts[column] + row * (1 if column == "names" else width)
    return data[:where] + value + data[where + width :]


# names in path order: c c2 d d/a d/b s; the names blob is b"cc2dd/ad/bs"
@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.replace(b'"format":3', b'"format":0'),
        lambda d: d[:-3],
        lambda d: d + b"\0",
        lambda d: d.replace(b"cc2dd/ad/bs", b"cc2dd/.d/bs"),  # a refused name, in order
        lambda d: d.replace(b"cc2dd/ad/bs", b"c2cdd/ad/bs"),  # out of order
        lambda d: _damaged(d, "kinds", 2, b"\0"),  # d a file: d/a has no directory above it
        lambda d: _damaged(d, "kinds", 3, b"\x09"),  # no such kind
        lambda d: _damaged(d, "sizes", 3, struct.pack("<Q", 99999)),  # a file outside its layer
        lambda d: _damaged(d, "ends", 5, struct.pack("<Q", 99)),  # names that do not add up
    ],
)
def test_a_bad_cached_tree_is_refused(damage: Callable[[bytes], bytes]) -> None:
    """A cached tree that is not whole, or inconsistent: ValueError (then merged again)."""
    merged, sizes = _hardlinked_tree()
    good = merged.to_bytes(sizes)
    bad = damage(good)
    assert bad != good
    with pytest.raises(ValueError):
        Merged.from_bytes(bad, sizes)
    Merged.from_bytes(good, sizes)


def test_a_cached_tree_for_other_layers_is_refused() -> None:
    """A tree stored for layer streams of other sizes is not used for these."""
    merged, sizes = _hardlinked_tree()
    with pytest.raises(ValueError):
        Merged.from_bytes(merged.to_bytes(sizes), [sizes[0], sizes[1] + 512])


# -- the rootfs view's operations, without a mount (pyfuse3 handlers under trio) -------------------


def _rootfs_ops(*, own_all: bool = False) -> Operations:
    exe = file_member("bin/x", b"#!/bin/sh\n")
    exe.info.mode, exe.info.uid, exe.info.gid = 0o4755, 1000, 1001
    exe.info.pax_headers = {"SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape")}
    tars = [
        tar_bytes([exe, link_member("bin/y", "bin/x"), link_member("s", "/bin/x", tarfile.SYMTYPE),
                   special("null", tarfile.CHRTYPE, 1, 3), special("p", tarfile.FIFOTYPE)]),
    ]  # fmt: skip
    merged = merge([scan(t) for t in tars])
    tree = Tree(merged.entries, root=merged.root)
    return Operations(Sources([MemorySource(t) for t in tars]), tree, xattrs=True, own_all=own_all)


async def _lookup(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    inode = ROOT
    attr = await ops.getattr(pyfuse3.InodeT(inode), CTX)
    for part in path.split("/"):
        attr = await ops.lookup(pyfuse3.InodeT(inode), pyfuse3.FileNameT(part.encode()), CTX)
        inode = attr.st_ino
    return attr


async def test_rootfs_operations_serve_the_image_metadata() -> None:
    """Modes with setuid, owners, nlink, symlink targets, device numbers, xattrs; reads of the bytes."""
    ops = _rootfs_ops()
    x, y = await _lookup(ops, "bin/x"), await _lookup(ops, "bin/y")
    assert x.st_ino == y.st_ino and x.st_nlink == 2
    assert (x.st_mode, x.st_uid, x.st_gid) == (stat.S_IFREG | 0o4755, 1000, 1001)
    assert await ops.getxattr(x.st_ino, pyfuse3.XAttrNameT(b"security.capability"), CTX) == CAP
    assert await ops.listxattr(x.st_ino, CTX) == [b"security.capability"]
    with pytest.raises(pyfuse3.FUSEError) as missing:
        await ops.getxattr(x.st_ino, pyfuse3.XAttrNameT(b"user.none"), CTX)
    assert missing.value.errno == errno.ENODATA
    fi = await ops.open(x.st_ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 100) == b"#!/bin/sh\n"
    s = await _lookup(ops, "s")
    assert stat.S_ISLNK(s.st_mode) and s.st_size == len("/bin/x")
    assert await ops.readlink(s.st_ino, CTX) == b"/bin/x"
    with pytest.raises(pyfuse3.FUSEError) as not_link:
        await ops.readlink(x.st_ino, CTX)
    assert not_link.value.errno == errno.EINVAL
    null, fifo = await _lookup(ops, "null"), await _lookup(ops, "p")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(fifo.st_mode)


async def test_rootfs_operations_without_any_xattr_answer_enosys() -> None:
    """Layers without a single xattr: getxattr and listxattr answer ENOSYS (the kernel then stops
    asking: fs/fuse/xattr.c no_getxattr, no_listxattr); with one anywhere, every inode answers."""
    tars = [tar_bytes([file_member("bin/x", b"x"), dir_member("etc/")])]
    merged = merge([scan(t) for t in tars])
    tree = Tree(merged.entries, root=merged.root)
    ops = Operations(Sources([MemorySource(t) for t in tars]), tree, xattrs=True)
    for path in ["bin/x", "etc"]:
        inode = (await _lookup(ops, path)).st_ino
        with pytest.raises(pyfuse3.FUSEError) as get:
            await ops.getxattr(inode, pyfuse3.XAttrNameT(b"user.a"), CTX)
        with pytest.raises(pyfuse3.FUSEError) as listed:
            await ops.listxattr(inode, CTX)
        assert get.value.errno == listed.value.errno == errno.ENOSYS
    with_one = _rootfs_ops()
    assert await with_one.listxattr((await _lookup(with_one, "null")).st_ino, CTX) == []


async def test_rootfs_operations_own_all_maps_every_owner() -> None:
    """own_all (-o rootless): every uid/gid is the mounting user's; modes stay the image's."""
    x = await _lookup(_rootfs_ops(own_all=True), "bin/x")
    assert (x.st_uid, x.st_gid, stat.S_IMODE(x.st_mode)) == (os.getuid(), os.getgid(), 0o4755)


def _fuzz_layer() -> bytes:
    exe = file_member("bin/x", b"x" * 700)
    exe.info.pax_headers = {"SCHILY.xattr.user.a": "1"}
    return tar_bytes(
        [dir_member("./"), exe, link_member("bin/y", "bin/x"), link_member("s", "../x", tarfile.SYMTYPE),
         special("c", tarfile.CHRTYPE, 1, 3), whiteout("bin/.wh.z"), file_member("e", b"")],
        end=False,
    )  # fmt: skip


_LAYER = _fuzz_layer()


@settings(max_examples=400, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, len(_LAYER) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, len(_LAYER)),
)
def test_damaged_layers_are_refused_or_served_inside_themselves(
    flips: list[tuple[int, int]], cut: int
) -> None:
    """Bytes overwritten anywhere (checksums fixed up, so the headers are parsed), the tar cut anywhere:
    an OcifuseError, or a table whose every file lies inside the layer; the merge never fails."""
    data = bytearray(_LAYER)
    for at, value in flips:
        data[at] = value
    for header in range(0, len(data) - BLOCK + 1, BLOCK):  # keep checksums right where a header may be
        block = data[header : header + BLOCK]
        if block[257:263] == b"ustar\0":
            block[148:156] = b" " * 8
            data[header + 148 : header + 156] = b"%06o\0 " % sum(block)
    data = data[:cut]
    try:
        table = scan(bytes(data))
    except OcifuseError:
        return
    for m in table.members:
        assert m.offset >= 0 and m.offset + m.size <= len(data)
    merged = merge([table])
    for e in merged.entries.values():
        assert e.kind is not Kind.FILE or e.offset + e.size <= len(data)


def test_merge_follows_symlinked_parents_inside_the_image() -> None:
    """``lib -> usr/lib`` then ``lib/foo``: the file lands in usr/lib, as umoci (securejoin) and moby put it;
    whiteouts and hardlinks go through the link too; a link never leads outside the image."""
    sym = tarfile.SYMTYPE
    lower = [
        dir_member("usr/lib/"),
        file_member("usr/lib/x", b"x"),
        link_member("lib", "usr/lib", sym),
        link_member("esc", "../../..", sym),
        link_member("abs", "/usr", sym),
        link_member("dangling", "nowhere", sym),
        link_member("l1", "l2", sym),
        link_member("l2", "l1", sym),
    ]
    upper = [file_member("lib/foo", b"foo"), whiteout("lib/.wh.x"), link_member("h", "lib/foo"),
             file_member("esc/etc/f", b"f"), file_member("abs/lib/bar", b"bar"),
             file_member("dangling/f", b""), file_member("l1/f", b"")]  # fmt: skip
    merged = layers(lower, upper)
    paths = sorted(merged.entries)
    assert "usr/lib/foo" in paths and "usr/lib/bar" in paths and "etc/f" in paths and "usr/lib/x" not in paths
    assert merged.entries["lib"].kind is Kind.SYMLINK and merged.entries["h"] == merged.entries["usr/lib/foo"]
    assert not any(p.startswith(("lib/", "esc/", "abs/", "dangling/", "l1/")) for p in paths)
    assert sorted(n.name for n in merged.notes) == ["dangling/f", "l1/f"]


@pytest.mark.parametrize(("pax_mtime", "expected"), [("1e30", 2**63 - 1), ("-1e30", -(2**63)), ("nan", 0)])
def test_absurd_pax_mtime_is_clamped(pax_mtime: str, expected: int) -> None:
    """A PAX mtime past int64 is clamped (as the layout view's table does), and the table still stores."""
    m = file_member("etc/motd", b"hi\n")
    m.info.pax_headers = {"mtime": pax_mtime}
    table = scan(tar_bytes([m]))
    (member,) = [x for x in table.members if x.name == "etc/motd"]
    assert member.mtime == expected
    data = tar_bytes([m])
    again = LayerTable.from_bytes(table.to_bytes(len(data)), len(data))
    assert [x.mtime for x in again.members if x.name == "etc/motd"] == [expected]
    merged = merge([table])
    assert merged.entries["etc/motd"].mtime == expected


def test_xattrs_linux_cannot_hold_are_dropped() -> None:
    """A PAX xattr whose name holds a NUL (it would read as two names) or is too long, or whose value
    is over 64 KiB, is not served; the member and its other xattrs are."""
    m = file_member("bin/x", b"x")
    m.info.pax_headers = {
        "SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.a\0user.b": "split",
        "SCHILY.xattr.user." + "n" * 300: "long name",
        "SCHILY.xattr.user.big": "v" * (65536 + 1),
    }
    (member,) = [x for x in scan(tar_bytes([m])).members if x.name == "bin/x"]
    assert member.xattrs == ((b"security.capability", CAP),)


@pytest.mark.parametrize("whiteout_first", [False, True])
def test_a_hardlink_to_a_file_its_layer_whites_out_keeps_it(whiteout_first: bool) -> None:
    """Layer 2 links ``h`` to lower ``f`` and whites ``f`` out: ``f`` is gone, ``h`` keeps its bytes.

    The whiteout applies to the lower layer only (layer.md); the link is of this layer, in either
    member order (containerd and umoci, applying members in order, keep a link made before it).
    """
    lower = [file_member("d/f", b"lower f")]
    upper = [link_member("d/h", "d/f"), whiteout("d/.wh.f")]
    if whiteout_first:
        upper.reverse()
    tars = [tar_bytes(lower), tar_bytes(upper)]
    merged = merge([scan(t) for t in tars])
    assert "d/f" not in merged.entries
    assert content(merged, tars, "d/h") == b"lower f"
    assert merged.notes == []
