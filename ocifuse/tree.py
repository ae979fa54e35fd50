"""The immutable inode tree a mount serves, built from an entry table (pure): layout or rootfs view.

Inodes are fixed at mount: the root is 1, then every path in sorted order, except that paths
whose entries share a nonzero ``meta.group`` (hardlinks of the rootfs view) are one inode,
numbered where its first path sorts. Nodes, and each directory's sorted children, are made on
first use from the table's Columns, so a mount of 100,000 entries does no per-entry work before
it is live; what a node says never depends on when it was made.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Mapping
from itertools import compress
from typing import NamedTuple

from .entries import ArchiveTable, Columns, Entry, Kind

ROOT = 1  # pyfuse3.ROOT_INODE; the root is allocated first.
_FIRST = ROOT + 1  # the inode of the table's row 0 (without hardlink groups)


class Node(NamedTuple):
    """One inode; ``children`` is sorted by name for directories and None for everything else."""

    inode: int
    parent: int
    entry: Entry  # a directory's entry has offset 0 and size 0
    children: tuple[tuple[bytes, int], ...] | None

    @property
    def is_dir(self) -> bool:
        """True for directories."""
        return self.children is not None


def _fsencode(name: str) -> bytes:
    """A name as the kernel sees it (what ``os.fsencode`` does on Linux)."""
    return name.encode("utf-8", "surrogateescape")


class Tree:
    """Inodes allocated once, root first, in sorted path order: numbers are stable and never reused."""

    def __init__(
        self, entries: Mapping[str, Entry] | ArchiveTable, root_mtime: int = 0, root: Entry | None = None
    ) -> None:
        columns = entries.columns if isinstance(entries, ArchiveTable) else Columns.of(entries)
        self._columns = columns
        self._root_entry = Entry(Kind.DIR, 0, 0, root_mtime) if root is None else root
        self._lookup: dict[int, dict[bytes, int]] = {}
        # Without hardlink groups (the layout view, always) inode = row + 2 and these stay None.
        self._inode_of_row: array[int] | None = None
        self._row_of_inode: array[int] | None = None
        is_file = columns.kinds.translate(bytes([1, 0]) + bytes([1] * 254))  # 1 for each non-directory
        if columns.metas is not None and any(m is not None and m.group for m in columns.metas):
            self._group(is_file)
        else:
            self.files = is_file.count(1)
            self.total_size = sum(compress(columns.sizes, is_file))
        count = len(columns) if self._row_of_inode is None else len(self._row_of_inode) - _FIRST
        self._nodes: list[Node | None] = [None] * (count + _FIRST)

    def _group(self, is_file: bytes) -> None:
        """Number the inodes of a table with hardlink groups: one per group, at its first path."""
        assert self._columns.metas is not None
        inode_of_row = array("Q")
        row_of_inode = array("Q", [0, 0])  # 0: no inode; ROOT: no row
        first_of_group: dict[int, int] = {}
        files = total = 0
        for row, meta in enumerate(self._columns.metas):
            inode = first_of_group.get(meta.group, 0) if meta is not None and meta.group else 0
            if not inode:
                inode = len(row_of_inode)
                row_of_inode.append(row)
                if meta is not None and meta.group:
                    first_of_group[meta.group] = inode
                if is_file[row]:
                    files += 1
                    total += self._columns.sizes[row]
            inode_of_row.append(inode)
        self._inode_of_row, self._row_of_inode = inode_of_row, row_of_inode
        self.files, self.total_size = files, total

    def __len__(self) -> int:
        return len(self._nodes) - 1

    def node(self, inode: int) -> Node | None:
        """The node of ``inode``, or None if there is no such inode."""
        if not 0 < inode < len(self._nodes):
            return None
        node = self._nodes[inode]
        if node is None:
            node = self._nodes[inode] = self._make(inode)
        return node

    def child(self, parent: int, name: bytes) -> Node | None:
        """The node named ``name`` in directory ``parent``, or None."""
        children = self._lookup.get(parent)
        if children is None:
            node = self.node(parent)
            if node is None or node.children is None:
                return None
            children = self._lookup[parent] = dict(node.children)
        inode = children.get(name)
        return None if inode is None else self.node(inode)

    def path_of(self, inode: int) -> str:
        """The path of ``inode`` ("" for the root; a hardlinked inode's first path)."""
        return "" if inode == ROOT else self._columns.names[self._row(inode)]

    def _row(self, inode: int) -> int:
        return inode - _FIRST if self._row_of_inode is None else self._row_of_inode[inode]

    def _inode(self, row: int) -> int:
        return row + _FIRST if self._inode_of_row is None else self._inode_of_row[row]

    def _make(self, inode: int) -> Node:
        if inode == ROOT:
            return Node(ROOT, ROOT, self._root_entry, self._children(""))
        row = self._row(inode)
        path = self._columns.names[row]
        parent_path = path.rpartition("/")[0]
        parent = ROOT if not parent_path else self._inode(self._columns.index(parent_path))
        children = self._children(path) if self._columns.is_dir(row) else None
        return Node(inode, parent, self._columns.entry(row), children)

    def _children(self, path: str) -> tuple[tuple[bytes, int], ...]:
        """The (name, inode) pairs directly under directory ``path``, sorted by name.

        The paths under ``path/`` are one run of the sorted names; a child directory's own run
        is skipped with one bisection, so this costs a step per child, not per descendant.
        Names are read as the bytes the kernel sees (``Names.raw``), never decoded and encoded.
        """
        names = self._columns.names
        if path:
            lo = bisect_left(names, path + "/")
            hi = bisect_left(names, path + "0", lo)  # "0" follows "/": the first path past the run
            start = len(_fsencode(path)) + 1
        else:
            lo, hi, start = 0, len(names), 0
        out: list[tuple[bytes, int]] = []
        row = lo
        while row < hi:
            raw = names.raw(row)
            slash = raw.find(b"/", start)
            if slash < 0:
                out.append((raw[start:], self._inode(row)))
                row += 1
            else:  # under a child directory: skip that directory's whole run
                row = bisect_left(names, str(raw[:slash], "utf-8", "surrogateescape") + "0", row, hi)
        out.sort()
        return tuple(out)
