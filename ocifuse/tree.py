"""The immutable inode tree a mount serves, built once from an entry table (pure): layout or rootfs view."""

from __future__ import annotations

from typing import NamedTuple

from .archive import Entry, Kind

ROOT = 1  # pyfuse3.ROOT_INODE; the root is allocated first.


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
    """A name as the kernel sees it (what ``os.fsencode`` does on Linux, inlined for 100,000 names)."""
    return name.encode("utf-8", "surrogateescape")


class Tree:
    """Inodes allocated once, root first, in sorted path order: numbers are stable and never reused.

    Paths whose entries share a nonzero ``meta.group`` (hardlinks of the rootfs view) are one
    inode, numbered where its first path sorts.
    """

    def __init__(self, entries: dict[str, Entry], root_mtime: int = 0, root: Entry | None = None) -> None:
        paths = sorted(entries)  # a parent sorts before its children: it is a prefix of theirs
        root_entry = Entry(Kind.DIR, 0, 0, root_mtime) if root is None else root
        nodes: list[Node | None] = [None, Node(ROOT, ROOT, root_entry, ())]
        first_paths = [""]
        inode_of = {"": ROOT}
        kids: dict[int, list[tuple[bytes, int]]] = {ROOT: []}
        grouped: dict[int, int] = {}
        files = total = 0
        for path in paths:
            entry = entries[path]
            parent_path, _, name = path.rpartition("/")
            parent = inode_of[parent_path]
            meta = entry.meta
            inode = grouped.get(meta.group, 0) if meta is not None and meta.group else 0
            if not inode:
                inode = len(nodes)
                if meta is not None and meta.group:
                    grouped[meta.group] = inode
                if entry.kind is Kind.DIR:
                    kids[inode] = []
                    inode_of[path] = inode
                    nodes.append(Node(inode, parent, entry, ()))
                else:
                    nodes.append(Node(inode, parent, entry, None))
                    files += 1
                    total += entry.size
                first_paths.append(path)
            kids[parent].append((_fsencode(name), inode))
        self._lookup = {parent: dict(children) for parent, children in kids.items()}
        for parent, children in kids.items():
            children.sort()
            node = nodes[parent]
            assert node is not None
            nodes[parent] = node._replace(children=tuple(children))
        self._nodes = nodes
        self.paths = first_paths
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
        """The path of ``inode`` ("" for the root; a hardlinked inode's first path)."""
        return self.paths[inode - ROOT]
