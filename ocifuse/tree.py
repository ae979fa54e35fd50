"""The immutable inode tree a mount serves, built once from an archive's entry table (pure)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .archive import Entry, Kind

ROOT = 1  # pyfuse3.ROOT_INODE; the root is allocated first.


@dataclass(frozen=True, slots=True)
class Node:
    """One file or directory; ``children`` is sorted by name and None for files."""

    inode: int
    parent: int
    entry: Entry  # a directory's entry has offset 0 and size 0
    children: tuple[tuple[bytes, int], ...] | None

    @property
    def is_dir(self) -> bool:
        """True for directories."""
        return self.children is not None


class Tree:
    """Inodes allocated once, root first, in sorted path order: numbers are stable and never reused."""

    def __init__(self, entries: dict[str, Entry], root_mtime: int = 0) -> None:
        paths = sorted(entries)
        inode_of: dict[str, int] = {"": ROOT}
        for n, path in enumerate(paths, start=ROOT + 1):
            inode_of[path] = n
        kids: dict[int, list[tuple[bytes, int]]] = {ROOT: []}
        for path in paths:
            if entries[path].kind is Kind.DIR:
                kids[inode_of[path]] = []
        parents = [0, ROOT]
        for path in paths:
            parent_path, _, name = path.rpartition("/")
            parent = inode_of[parent_path]
            kids[parent].append((os.fsencode(name), inode_of[path]))
            parents.append(parent)
        self._nodes: list[Node | None] = [None]
        self._lookup: dict[tuple[int, bytes], int] = {}
        root_entry = Entry(Kind.DIR, 0, 0, root_mtime)
        for inode, entry in enumerate([root_entry, *(entries[p] for p in paths)], start=ROOT):
            children = kids.get(inode)
            ordered = None if children is None else tuple(sorted(children))
            self._nodes.append(Node(inode, parents[inode], entry, ordered))
        for parent, children in kids.items():
            for child_name, child in children:
                self._lookup[(parent, child_name)] = child
        self.files = sum(1 for p in paths if entries[p].kind is Kind.FILE)
        self.total_size = sum(entries[p].size for p in paths if entries[p].kind is Kind.FILE)
        self.paths = paths

    def __len__(self) -> int:
        return len(self._nodes) - 1

    def node(self, inode: int) -> Node | None:
        """The node of ``inode``, or None if there is no such inode."""
        if 0 < inode < len(self._nodes):
            return self._nodes[inode]
        return None

    def child(self, parent: int, name: bytes) -> Node | None:
        """The node named ``name`` in directory ``parent``, or None."""
        inode = self._lookup.get((parent, name))
        return None if inode is None else self._nodes[inode]

    def path_of(self, inode: int) -> str:
        """The layout-relative path of ``inode`` ("" for the root)."""
        return "" if inode == ROOT else self.paths[inode - ROOT - 1]
