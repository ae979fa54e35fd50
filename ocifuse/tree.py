"""The immutable inode tree a mount serves, built once from an archive's entry table (pure)."""

from __future__ import annotations

from typing import NamedTuple

from .archive import Entry, Kind

ROOT = 1  # pyfuse3.ROOT_INODE; the root is allocated first.


class Node(NamedTuple):
    """One file or directory; ``children`` is sorted by name and None for files."""

    inode: int
    parent: int
    entry: Entry  # a directory's entry has offset 0 and size 0
    children: tuple[tuple[bytes, int], ...] | None

    @property
    def is_dir(self) -> bool:
        """True for directories."""
        return self.children is not None


def _fsencode(name: str) -> bytes:
    """A name as the kernel sees it (what ``os.fsencode`` does on Linux, inlined for 100,000 names)."""
    return name.encode("utf-8", "surrogateescape")


class Tree:
    """Inodes allocated once, root first, in sorted path order: numbers are stable and never reused."""

    def __init__(self, entries: dict[str, Entry], root_mtime: int = 0) -> None:
        paths = sorted(entries)  # a parent sorts before its children: it is a prefix of theirs
        inode_of = {path: inode for inode, path in enumerate(paths, start=ROOT + 1)}
        inode_of[""] = ROOT
        parents = [0, ROOT]
        kids: dict[int, list[tuple[bytes, int]]] = {ROOT: []}
        for inode, path in enumerate(paths, start=ROOT + 1):
            parent_path, _, name = path.rpartition("/")
            parent = inode_of[parent_path]
            parents.append(parent)
            kids[parent].append((_fsencode(name), inode))
            if entries[path].kind is Kind.DIR:
                kids[inode] = []
        self._lookup = {parent: dict(children) for parent, children in kids.items()}
        nodes: list[Node | None] = [None, Node(ROOT, ROOT, Entry(Kind.DIR, 0, 0, root_mtime), ())]
        files = total = 0
        for inode, path in enumerate(paths, start=ROOT + 1):
            entry = entries[path]
            children = kids.get(inode)
            nodes.append(Node(inode, parents[inode], entry, None if children is None else ()))
            if children is None:
                files += 1
                total += entry.size
        for parent, children in kids.items():
            children.sort()
            node = nodes[parent]
            assert node is not None
            nodes[parent] = node._replace(children=tuple(children))
        self._nodes = nodes
        self.paths = paths
        self.files = files
        self.total_size = total

    def __len__(self) -> int:
        return len(self._nodes) - 1

    def node(self, inode: int) -> Node | None:
        """The node of ``inode``, or None if there is no such inode."""
        if 0 < inode < len(self._nodes):
            return self._nodes[inode]
        return None

    def child(self, parent: int, name: bytes) -> Node | None:
        """The node named ``name`` in directory ``parent``, or None."""
        children = self._lookup.get(parent)
        inode = None if children is None else children.get(name)
        return None if inode is None else self._nodes[inode]

    def path_of(self, inode: int) -> str:
        """The layout-relative path of ``inode`` ("" for the root)."""
        return "" if inode == ROOT else self.paths[inode - ROOT - 1]
