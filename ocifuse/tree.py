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
from collections.abc import Mapping, Sequence
from itertools import compress
from typing import NamedTuple, overload

from .entries import ArchiveTable, ColumnEntries, Columns, Entry, Kind, Meta, Names

ROOT = 1  # pyfuse3.ROOT_INODE; the root is allocated first.
_FIRST = ROOT + 1  # the inode of the table's row 0 (without hardlink groups)


# File nodes kept at once (directories are kept for the mount's life): a million files walked by
# ``find`` cost no million Node objects; the kernel caches their attributes anyway (fs.TIMEOUT).
RECENT_FILES = 4096
# Rows of a directory's run that Tree._children checks in one piece (a bytes copy of their names).
_PIECE = 1024


class Children(Sequence[tuple[bytes, int]]):
    """A directory's (name, inode) pairs sorted by name, held as two arrays of row and inode.

    A name is read from the table's Names when asked for (8 + 8 bytes a child, not a tuple, a bytes
    and an int: a directory of a million blobs takes 16 MB, not ~200 MB and a dict); ``find`` bisects.
    Equal to any sequence of the same pairs (a tuple of them).
    """

    __slots__ = ("_names", "_start", "_rows", "_inodes")

    def __init__(self, names: Names, start: int, rows: array[int], inodes: array[int]) -> None:
        self._names, self._start, self._rows, self._inodes = names, start, rows, inodes

    def __len__(self) -> int:
        return len(self._rows)

    def name(self, i: int) -> bytes:
        """The name of child ``i`` (0 <= i < len), as the kernel sees it."""
        return self._names.raw(self._rows[i], self._start)

    def inode(self, i: int) -> int:
        """The inode of child ``i``."""
        return self._inodes[i]

    def inodes(self) -> array[int]:
        """Every child's inode, in name order (no name read)."""
        return self._inodes

    def rows(self) -> array[int]:
        """Every child's row of the table, in name order."""
        return self._rows

    @overload
    def __getitem__(self, i: int) -> tuple[bytes, int]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[bytes, int]]: ...
    def __getitem__(self, i: int | slice) -> tuple[bytes, int] | list[tuple[bytes, int]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self._rows)
        if not 0 <= i < len(self._rows):
            raise IndexError(i)
        return self.name(i), self._inodes[i]

    def find(self, name: bytes) -> int | None:
        """The inode of the child ``name``, or None."""
        lo, hi = 0, len(self._rows)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.name(mid) < name:
                lo = mid + 1
            else:
                hi = mid
        return self._inodes[lo] if lo < len(self._rows) and self.name(lo) == name else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Children({list(self)!r})"


class Node(NamedTuple):
    """One inode; ``children`` is sorted by name for directories and None for everything else."""

    inode: int
    parent: int
    entry: Entry  # a directory's entry has offset 0 and size 0
    children: Children | tuple[tuple[bytes, int], ...] | None

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
        if isinstance(entries, ArchiveTable | ColumnEntries):
            columns = entries.columns
        else:
            columns = Columns.of(entries)
        self._columns = columns
        self._root_entry = Entry(Kind.DIR, 0, 0, root_mtime) if root is None else root
        # Without hardlink groups (the layout view, always) inode = row + 2 and these stay None.
        self._inode_of_row: array[int] | None = None
        self._row_of_inode: array[int] | None = None
        is_file = columns.kinds.translate(bytes([1, 0]) + bytes([1] * 254))  # 1 for each non-directory
        if columns.metas is not None and any(m is not None and m.group for m in columns.metas):
            self._group(is_file)
        else:
            self.files = is_file.count(1)
            self.total_size = sum(compress(columns.sizes, is_file))
        self._count = (len(columns) if self._row_of_inode is None else len(self._row_of_inode) - _FIRST) + 1
        self._dirs: dict[int, Node] = {}  # every directory node made, for the mount's life
        self._dir_inodes: dict[str, int] = {"": ROOT}  # their paths
        self._files: dict[int, Node] = {}  # file nodes made lately (RECENT_FILES at most)
        self._subdirs: dict[int, int] = {}

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
        return self._count

    def node(self, inode: int) -> Node | None:
        """The node of ``inode``, or None if there is no such inode."""
        node = self._dirs.get(inode) or self._files.get(inode)
        if node is not None:
            return node
        if not 0 < inode <= self._count:
            return None
        node = self._make(inode)
        if node.children is not None:
            self._dirs[inode] = node
            self._dir_inodes[self.path_of(inode)] = inode
        else:
            if len(self._files) >= RECENT_FILES:
                self._files.clear()
            self._files[inode] = node
        return node

    def fields(self, inode: int) -> tuple[Kind, int, int, Meta | None]:
        """What a stat of existing ``inode`` shows: kind, size, mtime and Meta (no node made)."""
        if inode == ROOT:
            e = self._root_entry
            return e.kind, e.size, e.mtime, e.meta
        return self._columns.fields(self._row(inode))

    def is_dir(self, inode: int) -> bool:
        """True when ``inode`` is a directory (no node made)."""
        if inode == ROOT:
            return True
        return 0 < inode <= self._count and self._columns.is_dir(self._row(inode))

    def subdirs(self, inode: int) -> int:
        """How many directories directory ``inode`` holds (its link count is 2 more)."""
        count = self._subdirs.get(inode)
        if count is None:
            node = self.node(inode)
            children = node.children if node is not None else None
            if isinstance(children, Children):  # the children rows' kinds as one bytes (1: a directory)
                count = bytes(map(self._columns.kinds.__getitem__, children.rows())).count(1)
            else:
                count = sum(1 for _, i in children or () if self.is_dir(i))
            self._subdirs[inode] = count
        return count

    def has_xattrs(self) -> bool:
        """True if any inode has an extended attribute (one pass over the table's metas)."""
        root = self._root_entry.meta
        if root is not None and root.xattrs:
            return True
        metas = self._columns.metas
        return metas is not None and any(m is not None and m.xattrs for m in metas)

    def child(self, parent: int, name: bytes) -> Node | None:
        """The node named ``name`` in directory ``parent``, or None."""
        node = self.node(parent)
        if node is None or node.children is None:
            return None
        children = node.children
        inode = children.find(name) if isinstance(children, Children) else dict(children).get(name)
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
        parent = self._dir_inodes.get(parent_path)
        if parent is None:
            parent = self._inode(self._columns.index(parent_path))
        children = self._children(path) if self._columns.is_dir(row) else None
        return Node(inode, parent, self._columns.entry(row), children)

    def _children(self, path: str) -> Children:
        """The (name, inode) pairs directly under directory ``path``, sorted by name.

        The paths under ``path/`` are one run of the sorted names; a child directory's own run
        is skipped with one bisection, so this costs a step per child, not per descendant, and
        a piece of the run that holds only children (a directory of files) costs no step at all.
        Names are read as the bytes the kernel sees (``Names.raw``), never decoded and encoded.
        """
        names = self._columns.names
        blob, ends = names.blob()
        if path:
            lo = bisect_left(names, path + "/")
            hi = bisect_left(names, path + "0", lo)  # "0" follows "/": the first path past the run
            start = len(_fsencode(path)) + 1
        else:
            lo, hi, start = 0, len(names), 0
        depth = path.count("/") + 1 if path else 0  # the slashes in the path of a child
        rows = array("Q")
        last = b""
        ordered = True  # rows come in str order; by bytes, the kernel's order, unless a name is undecodable
        row = lo
        while row < hi:
            # A piece of the run at once: if none of its paths has a slash more than a child's and all
            # are ASCII (str order is byte order), all are children: one copy and one count, no step each.
            end = min(hi, row + _PIECE)
            piece = bytes(blob[(ends[row - 1] if row else 0) : ends[end - 1]])
            if piece.count(b"/") == depth * (end - row) and piece.isascii():
                ordered = ordered and last < names.raw(row, start)
                last = names.raw(end - 1, start)
                rows.extend(range(row, end))
                row = end
                continue
            while row < end:  # a path at a time
                raw = names.raw(row, start)
                slash = raw.find(b"/")
                if slash < 0:
                    ordered = ordered and last < raw
                    last = raw
                    rows.append(row)
                    row += 1
                else:  # under a child directory: skip that directory's whole run
                    prefix = names.raw(row)[: start + slash]
                    row = bisect_left(names, str(prefix, "utf-8", "surrogateescape") + "0", row, hi)
        if not ordered:
            rows = array("Q", sorted(rows, key=lambda r: names.raw(r, start)))
        if self._inode_of_row is None:
            inodes = array("Q", [r + _FIRST for r in rows])
        else:
            inodes = array("Q", map(self._inode_of_row.__getitem__, rows))
        return Children(names, start, rows, inodes)
