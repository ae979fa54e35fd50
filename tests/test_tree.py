"""The inode tree, made lazily from table columns, equals the tree built eagerly from the entry dict."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from unittest import mock

import pytest
import tarbuild
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocifuse import tree as tree_module
from ocifuse.archive import Archive
from ocifuse.entries import ArchiveTable, Entry, Kind, Meta
from ocifuse.tablecodec import decode_table, encode_table
from ocifuse.tree import ROOT, Node, Tree


def reference(entries: Mapping[str, Entry], root: Entry) -> tuple[dict[int, Node], dict[int, str]]:
    """Every node, built the plain way: inodes in sorted path order (one per hardlink group, at its
    first path), children sorted by their bytes; and each inode's (first) path."""
    nodes = {ROOT: Node(ROOT, ROOT, root, ())}
    paths = {ROOT: ""}
    inode_of = {"": ROOT}
    kids: dict[int, list[tuple[bytes, int]]] = {ROOT: []}
    grouped: dict[int, int] = {}
    for path in sorted(entries):
        entry = entries[path]
        parent_path, _, name = path.rpartition("/")
        group = entry.meta.group if entry.meta is not None else 0
        inode = grouped.get(group, 0) if group else 0
        if not inode:
            inode = len(nodes) + 1
            if group:
                grouped[group] = inode
            nodes[inode] = Node(inode, inode_of[parent_path], entry, () if entry.kind is Kind.DIR else None)
            paths[inode] = path
            if entry.kind is Kind.DIR:
                kids[inode] = []
                inode_of[path] = inode
        kids[inode_of[parent_path]].append((name.encode("utf-8", "surrogateescape"), inode))
    for inode, children in kids.items():
        nodes[inode] = nodes[inode]._replace(children=tuple(sorted(children)))
    return nodes, paths


def assert_same_tree(
    entries: Mapping[str, Entry], tree: Tree, root_mtime: int = 0, root: Entry | None = None
) -> None:
    expected, first_path = reference(entries, Entry(Kind.DIR, 0, 0, root_mtime) if root is None else root)
    assert len(tree) == len(expected)
    assert tree.node(0) is None and tree.node(len(expected) + 1) is None and tree.node(-1) is None
    # Ask in reverse order too: a node must not depend on which nodes were made before it.
    for inode in sorted(expected, reverse=True):
        assert tree.node(inode) == expected[inode], inode
    for inode, node in expected.items():
        assert tree.path_of(inode) == first_path[inode]
        for name, child in node.children or ():
            assert tree.child(inode, name) == expected[child]
        assert tree.child(inode, b"no such name") is None
    files = [n.entry for n in expected.values() if n.children is None]
    assert tree.files == len(files)
    assert tree.total_size == sum(e.size for e in files)


def with_dirs(files: dict[str, Entry]) -> dict[str, Entry]:
    """Add every implied directory (what the scan's finish does)."""
    out = dict(files)
    for name in files:
        parent = name.rpartition("/")[0]
        while parent:
            out.setdefault(parent, Entry(Kind.DIR, 0, 0, 7))
            parent = parent.rpartition("/")[0]
    return out


# Components around "/" in sort order ("-", "." below, "0" above); non-ASCII and undecodable bytes, whose
# order as str and as bytes differs ("€" < "\udc80" as str; b"\xe2..." > b"\x80" as bytes).
COMPONENT = st.sampled_from(["a", "a-b", "a.c", "a0", "b", "ä", "€", "\udc80", "\udcff", "0", "-"])
PATHS = st.lists(st.lists(COMPONENT, min_size=1, max_size=4).map("/".join), max_size=40)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(PATHS, st.integers(min_value=0, max_value=2**40))
def test_lazy_tree_equals_the_eager_one(paths: list[str], root_mtime: int) -> None:
    files = {p: Entry(Kind.FILE, 512 * i, i, i) for i, p in enumerate(paths)}
    # A path that has children is a directory (the scan's rule).
    entries = {p: e for p, e in with_dirs(files).items() if not any(q.startswith(p + "/") for q in files)}
    entries = with_dirs(entries)
    assert_same_tree(entries, Tree(entries, root_mtime), root_mtime)
    table = decode_table(encode_table(ArchiveTable(entries, [], 0)))
    assert_same_tree(entries, Tree(table, root_mtime), root_mtime)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(PATHS, st.integers(min_value=1, max_value=4))
def test_children_found_in_small_pieces_equal_the_eager_ones(paths: list[str], piece: int) -> None:
    """Tree._children checks a directory's run a piece at a time (a piece of only children, ASCII,
    at once): pieces of 1-4 rows, so pieces that end inside a child directory's run, hold
    undecodable names, or children and deeper paths at once, list what the eager tree does."""
    files = {p: Entry(Kind.FILE, 512 * i, i, i) for i, p in enumerate(paths)}
    entries = {p: e for p, e in with_dirs(files).items() if not any(q.startswith(p + "/") for q in files)}
    entries = with_dirs(entries)
    with mock.patch.object(tree_module, "_PIECE", piece):
        assert_same_tree(entries, Tree(entries, 5), 5)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(PATHS, st.lists(st.integers(min_value=0, max_value=3), max_size=40), st.sampled_from(list(Kind)))
def test_hardlink_groups_are_one_inode(paths: list[str], groups: list[int], kind: Kind) -> None:
    """The rootfs view: entries sharing a meta.group are one inode (numbered at the first path)."""
    files = {
        p: Entry(kind, 512 * i, i, i, 0, Meta(0o644, 0, 0, group=groups[i] if i < len(groups) else 0))
        for i, p in enumerate(paths)
    }
    entries = {p: e for p, e in with_dirs(files).items() if not any(q.startswith(p + "/") for q in files)}
    entries = with_dirs(entries)
    root = Entry(Kind.DIR, 0, 0, 99, 0, Meta(0o755, 1, 2))
    assert_same_tree(entries, Tree(entries, root=root), root=root)
    if entries:
        with pytest.raises(ValueError):
            encode_table(ArchiveTable(entries, [], 0))  # rootfs metadata is never stored


@pytest.mark.parametrize("case", [*tarbuild.ODD_FORMATS, *tarbuild.SKIPPING])
def test_tree_of_real_archives(case: str, tmp_path: Path) -> None:
    make = tarbuild.ODD_FORMATS.get(case) or tarbuild.SKIPPING[case]
    with closing(Archive(str(make(tmp_path)))) as archive:
        entries = archive.table.entries
        assert_same_tree(entries, Tree(archive.table, 5), 5)
        assert_same_tree(entries, Tree(decode_table(encode_table(archive.table)), 5), 5)


def test_wide_directory(tmp_path: Path) -> None:
    with closing(Archive(str(tarbuild.many_members(tmp_path, 3000)))) as archive:
        assert_same_tree(archive.table.entries, Tree(archive.table))
