"""Layers, in order, into one merged root filesystem, as image-spec layer.md applies changesets (pure).

Each layer is a LayerTable (layer.py); the result maps every path of the merged tree to an Entry
whose ``source`` is the index of the layer that holds its bytes and whose ``offset``/``size``
point into that layer's uncompressed stream. Nothing is read here but headers already scanned.

The rules (image-spec layer.md, "Applying Changesets", "Whiteouts", "Opaque Whiteout"):
- ``.wh.NAME`` hides NAME, and everything under it, of *lower* layers; ``.wh..wh..opq`` hides
  every lower entry of its directory. Whiteouts "MUST only apply to resources in lower/parent
  layers": entries of the same layer stay, whatever the order of the members (``umoci insert
  --opaque`` writes the opaque marker before its directory). Whiteout files are never served.
- A non-directory replacing a directory, or a directory replacing a non-directory, replaces
  the whole subtree; a directory over a directory keeps the lower children ("Changeset over
  existing files": the upper directory's attributes win).
- A hardlink names an inode that exists at that point, in this layer or a lower one; its
  metadata is its target's (link(2) makes no new inode).
What cannot be applied is skipped with a Note saying why; the merge never fails.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import os
import struct
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .entries import KIND_ORDER, ColumnEntries, Columns, Entry, Kind, Meta, Names
from .errors import InvalidDocument
from .layer import LayerTable, Member, Type
from .model import load_value
from .store import Stale
from .tablecodec import Cursor, from_le, le_bytes
from .tarscan import NAME_MAX, normalize, plain_name

# The persistent cache's kind for a merged tree (keyed by the image manifest's digest).
TREE_FORMAT = 3  # 2: a hardlink to a file its own layer whites out is kept; 3: stored as columns
_LENGTH = struct.Struct("<Q")
_FILE, _DIR = KIND_ORDER.index(Kind.FILE), KIND_ORDER.index(Kind.DIR)
# Symlinks followed in one path before giving up (securejoin's limit, as umoci unpack uses it).
MAX_SYMLINKS = 255
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Implicit directories (a member whose parents have no entries of their own) are made as
# ``mkdir -p`` makes them with umask 022: mode 0755, owned by root.
IMPLICIT_MODE = 0o755

_KINDS = {
    Type.FILE: Kind.FILE,
    Type.DIR: Kind.DIR,
    Type.SYMLINK: Kind.SYMLINK,
    Type.CHAR: Kind.CHAR,
    Type.BLOCK: Kind.BLOCK,
    Type.FIFO: Kind.FIFO,
}


@dataclass(frozen=True, slots=True)
class Note:
    """A member of layer ``layer`` (0 = lowest) that was not applied, and why."""

    layer: int
    name: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Merged:
    """The merged tree: every path (root excluded) to its entry, the root's entry, and the notes.

    ``entries`` is a dict as the merge makes it, or ColumnEntries (a tree loaded from the cache,
    or stored: its columns are what the Tree reads, with no dict and no sort).
    """

    entries: Mapping[str, Entry]
    root: Entry
    notes: list[Note]
    sizes: tuple[int, ...] = ()  # the layer streams' sizes it was made for (once merged from them)

    def columns(self) -> Columns:
        """The entries in path order, column by column."""
        if isinstance(self.entries, ColumnEntries):
            return self.entries.columns
        return Columns.of(self.entries)

    def to_bytes(self, sizes: Sequence[int]) -> bytes:
        """The tree as the index cache stores it, for layer streams of these ``sizes``:
        u64 len(head) | head (JSON: format, sizes, root, metas, notes, counts) | the columns
        (names blob, name ends u64, kinds u8, offsets u64, sizes u64, mtimes i64, layers u32,
        Meta indexes u32; little endian)."""
        c = self.columns()
        metas: dict[int, int] = {}
        rows: list[list[object]] = []

        def meta_index(meta: Meta | None) -> int:
            assert meta is not None  # every entry of a merged tree has one
            found = metas.get(id(meta))
            if found is None:
                found = metas[id(meta)] = len(metas)
                rows.append(
                    [meta.mode, meta.uid, meta.gid, _b64(meta.link), meta.rdev,
                     [[_b64(k), _b64(v)] for k, v in meta.xattrs], meta.nlink, meta.group]
                )  # fmt: skip
            return found

        root = self.root
        indexes = array("I", map(meta_index, c.metas if c.metas is not None else [None] * len(c)))
        blob, ends = c.names.blob()
        head = {
            "format": TREE_FORMAT,
            "sizes": list(sizes),
            "root": [root.kind.value, root.offset, root.size, root.mtime, root.source, meta_index(root.meta)],
            "metas": rows,
            "notes": [[n.layer, n.name, n.reason] for n in self.notes],
            "count": len(c),
            "names": len(blob),
        }
        encoded = json.dumps(head, separators=(",", ":")).encode()
        columns = (ends, c.offsets, c.sizes, c.mtimes, c.sources, indexes)
        return b"".join(
            [_LENGTH.pack(len(encoded)), encoded, blob, le_bytes(ends), c.kinds, *map(le_bytes, columns[1:])]
        )

    @classmethod
    def from_bytes(cls, payload: bytes, sizes: Sequence[int] | None = None) -> Merged:
        """A tree from ``to_bytes``; ValueError (or TypeError, ...) unless it is a whole, consistent one
        for layer streams of exactly these ``sizes`` (None: the sizes it says, each an int >= 0):
        every file inside its layer, every name one the scan accepts, in order, every parent a directory."""
        cursor = Cursor(payload, "tree")
        take = cursor.take
        (head_len,) = _LENGTH.unpack(take(_LENGTH.size))
        try:
            doc: Any = load_value("cached tree", bytes(take(head_len)))
        except InvalidDocument as e:
            raise ValueError(e.reason) from e
        if doc["format"] != TREE_FORMAT:
            raise Stale("a tree of another format")
        if sizes is None:
            sizes = doc["sizes"]
            if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes):
                raise ValueError("layer sizes that are not sizes")
        if doc["sizes"] != list(sizes):
            raise ValueError("for other layers")
        metas = []
        for mode, uid, gid, link, rdev, xattrs, nlink, group in doc["metas"]:
            mode | uid | gid | rdev | nlink | group  # noqa: B018  TypeError unless ints
            pairs = tuple((_unb64(k), _unb64(v)) for k, v in xattrs)
            link = _unb64(link)
            metas.append(
                Meta(
                    mode=mode, uid=uid, gid=gid, link=link, rdev=rdev, xattrs=pairs, nlink=nlink, group=group
                )
            )
        n, names_len = doc["count"], doc["names"]
        n | names_len  # noqa: B018  TypeError unless ints
        blob = take(names_len)
        ends = from_le("Q", take(8 * n))
        kinds = bytes(take(n))
        offsets, lengths, mtimes, sources, indexes = (
            from_le(t, take(n * array(t).itemsize)) for t in ("Q", "Q", "q", "I", "I")
        )
        if not cursor.at_end():
            raise ValueError("trailing bytes after the tree")
        if (ends[-1] if n else 0) != names_len or any(a > b for a, b in itertools.pairwise(ends)):
            raise ValueError("tree names do not add up")
        if kinds.translate(None, bytes(range(len(KIND_ORDER)))):
            raise ValueError("unknown entry kind in the tree")
        if (n and (max(sources) >= len(sizes) or max(indexes) >= len(metas))) or not metas:
            raise ValueError("an entry out of range")
        names = Names(blob, ends)
        _check_rows(names, kinds, offsets, lengths, sources, [metas[i] for i in indexes], sizes)
        kind, offset, size, mtime, source, meta = doc["root"]
        offset | size | mtime | source | meta  # noqa: B018  TypeError unless ints
        if Kind(kind) is not Kind.DIR or not 0 <= meta < len(metas) or metas[meta].group:
            raise ValueError("the root is not a directory")
        root = Entry(Kind.DIR, offset, size, mtime, source, metas[meta])
        row_metas: list[Meta | None] = [metas[i] for i in indexes]
        columns = Columns(names, kinds, offsets, lengths, mtimes, sources, row_metas)
        notes = [Note(int(layer), str(name), str(reason)) for layer, name, reason in doc["notes"]]
        return cls(entries=ColumnEntries(columns), root=root, notes=notes, sizes=tuple(sizes))


def _check_rows(
    names: Names,
    kinds: bytes,
    offsets: array[int],
    lengths: array[int],
    sources: array[int],
    metas: list[Meta],
    sizes: Sequence[int],
) -> None:
    """ValueError unless every row is one the merge could have made: names sorted, each accepted by
    the scan and under a directory; files inside their layers; no directory in a hardlink group."""
    dirs = {""}
    previous = None
    blob, ends = names.blob()
    text = str(blob, "utf-8", "surrogateescape")
    # every character one byte (ASCII, or an undecodable byte kept): a name's byte offsets are its
    # character offsets, and one decoding serves every name
    one_byte = len(text) == len(blob)
    rows = map(text.__getitem__, map(slice, itertools.chain((0,), ends), ends)) if one_byte else iter(names)
    for i, name in enumerate(rows):
        if previous is not None and not previous < name:
            raise ValueError(f"entry {name!r} out of order")
        previous = name
        if not (one_byte and plain_name(name) and len(name) <= NAME_MAX) and normalize(name) != name:
            raise ValueError(f"entry {name!r} has a name the scan refuses")
        if name.rpartition("/")[0] not in dirs:
            raise ValueError(f"entry {name!r} has no directory above it")
        kind = kinds[i]
        if kind == _DIR:
            if metas[i].group:
                raise ValueError(f"directory {name!r} in a hardlink group")
            dirs.add(name)
        elif kind == _FILE and offsets[i] + lengths[i] > sizes[sources[i]]:
            raise ValueError(f"file {name!r} lies outside its layer")


class _Leaf:
    """A non-directory inode; hardlinked paths hold the same object."""

    __slots__ = ("member", "layer")

    def __init__(self, member: Member, layer: int) -> None:
        self.member = member
        self.layer = layer


class _Dir:
    """A directory: its member (None for an implicit one) and its children by name."""

    __slots__ = ("member", "layer", "children")

    def __init__(self, member: Member | None, layer: int) -> None:
        self.member = member
        self.layer = layer
        self.children: dict[str, _Dir | _Leaf] = {}


def _may_lead(node: _Dir | _Leaf | None) -> bool:
    """Whether replacing ``node`` may change what a remembered directory path leads to."""
    return isinstance(node, _Dir) or (node is not None and node.member.type is Type.SYMLINK)


def _split(path: str) -> tuple[str, str]:
    parent, _, base = path.rpartition("/")
    return parent, base


class _Merger:
    def __init__(self) -> None:
        self.root = _Dir(None, -1)
        self.notes: list[Note] = []
        self.layer = 0
        self.linked = False  # a hardlink was made
        # The directories entries went into, by path (a layer's members go to a few directories,
        # not always one after another). Forgotten whenever a directory, or a symlink that may lead
        # to one, is replaced or removed (only add, hide and parent_dir replace anything).
        self._dirs: dict[str, _Dir] = {}
        # This layer's hardlinks to lower files that its own whiteouts hide, by the link's name.
        self._hidden_targets: dict[str, _Leaf] = {}

    def note(self, name: str, reason: str) -> None:
        self.notes.append(Note(self.layer, name, reason))

    def find(self, path: str) -> _Dir | _Leaf | None:
        """The node at ``path`` now (symlinks followed in its parents, not in its last name), or None."""
        parent, base = _split(path)
        holder = self.resolve(parent) if parent else self.root
        if holder is None:
            return None
        return holder.children.get(base) if base else holder

    def resolve(self, path: str) -> _Dir | None:
        """The directory at ``path``, following symlinks as umoci's securejoin does: a target is
        resolved inside the image (absolute targets from its root, ``..`` never above it), at most
        MAX_SYMLINKS of them; None when a name is missing, not a directory, or the links loop."""
        todo = collections.deque(path.split("/"))
        stack = [self.root]
        hops = 0
        while todo:
            part = todo.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            child = stack[-1].children.get(part)
            if isinstance(child, _Dir):
                stack.append(child)
            elif isinstance(child, _Leaf) and child.member.type is Type.SYMLINK and hops < MAX_SYMLINKS:
                hops += 1
                target = child.member.linkname
                if target.startswith("/"):
                    del stack[1:]
                todo.extendleft(reversed(target.split("/")))
            else:
                return None
        return stack[-1]

    def parent_dir(self, path: str, name: str) -> _Dir | None:
        """The directory ``path``, made (as implicit directories) where missing or not a directory.

        A symlink on the way is followed (``resolve``), as umoci and moby extract through one
        (``lib -> usr/lib``, then ``lib/x`` lands in ``usr/lib``); None, with a note, when it
        leads nowhere inside the image (dangling, a file, a loop): the member is not applied.
        """
        known = self._dirs.get(path)
        if known is not None:
            return known
        node = self.root
        done: list[str] = []
        for part in path.split("/") if path else ():
            done.append(part)
            child = node.children.get(part)
            if isinstance(child, _Leaf) and child.member.type is Type.SYMLINK:
                child = self.resolve("/".join(done))
                if child is None:
                    self.note(
                        name, f"{'/'.join(done)!r} is a symlink to no directory in the image: not applied"
                    )
                    return None
            elif not isinstance(child, _Dir):
                if child is not None:
                    self.note(name, f"{path!r} is not a directory below it: replaced by a directory")
                    self._dirs.clear()  # a symlink replaced: paths resolved through it are stale
                child = node.children[part] = _Dir(None, self.layer)
            node = child
        self._dirs[path] = node
        return node

    def apply(self, table: LayerTable) -> None:
        """Apply one layer: its whiteouts to the layers below, then its entries in order."""
        self._dirs.clear()
        adds: list[Member] = []
        hides: list[tuple[Member, str, bool]] = []  # (member, path, opaque)
        for m in table.members:
            parent, base = _split(m.name)
            if not base.startswith(WHITEOUT):
                adds.append(m)
            elif base == OPAQUE:
                hides.append((m, parent, True))
            elif base.startswith(WHITEOUT + WHITEOUT):
                self.note(m.name, "AUFS metadata (.wh..wh.*), not served")
            elif base[len(WHITEOUT) :] in ("", ".", ".."):
                # image-spec#1301: ".wh." names nothing; ".wh.." and ".wh..." would name the
                # directory itself or its parent.
                self.note(m.name, f"whiteout of {base[len(WHITEOUT) :]!r}: refused")
            else:
                hides.append(
                    (m, f"{parent}/{base[len(WHITEOUT) :]}" if parent else base[len(WHITEOUT) :], False)
                )
        self._hidden_targets = {}
        if hides:
            # A hardlink of this layer to a lower file that a whiteout of this layer hides still
            # links to it: whiteouts "MUST only apply to resources in lower/parent layers" and the
            # link is of this layer (containerd and umoci, applying members in order, keep it too).
            for m in adds:
                if m.type is Type.HARDLINK:
                    target = self.find(m.linkname)
                    if isinstance(target, _Leaf):
                        self._hidden_targets[m.name] = target
            made = {m.name: m.type for m in adds}
            for m, path, opaque in hides:
                self.hide(m, path, opaque, made)
            self._dirs.clear()
        for m in adds:
            self.add(m)

    def hide(self, m: Member, path: str, opaque: bool, made: dict[str, Type]) -> None:
        """Apply one whiteout (``path`` hidden) or opaque marker (``path``'s lower children hidden)."""
        self._dirs.clear()  # a directory removed here may be one remembered
        ancestor = _split(m.name)[0]
        while ancestor:
            kind = made.get(ancestor)
            if kind is not None and kind is not Type.DIR:
                # umoci writes "dir-to-file/.wh.inner" after the file replacing the directory;
                # umoci unpack accepts it, and the file already hides the whole lower subtree.
                self.note(
                    m.name, f"whiteout under {ancestor!r}, which this layer makes a {kind.value}: ignored"
                )
                return
            ancestor = _split(ancestor)[0]
        if opaque:
            # The marker's directory exists in this layer, even if no entry of its own says so.
            marked = self.parent_dir(path, m.name)
            if marked is not None:
                marked.children.clear()
            return
        parent, base = _split(path)
        holder = self.resolve(parent)
        if holder is None:
            self.parent_dir(parent, m.name)  # as moby's UnpackLayer: the parent exists in this layer
        else:
            holder.children.pop(base, None)  # nothing to hide is fine: the name may be long gone

    def add(self, m: Member) -> None:
        """Apply one entry of the current layer."""
        if m.name == "":
            self.root.member, self.root.layer = m, self.layer
            return
        parent_path, base = _split(m.name)
        if m.type is Type.HARDLINK:
            if m.linkname == m.name:
                self.note(m.name, "hardlink to itself")
                return
            target = self.find(m.linkname)
            if target is None:
                target = self._hidden_targets.get(m.name)
            if not isinstance(target, _Leaf):
                what = "a directory" if isinstance(target, _Dir) else "nothing in this or a lower layer"
                self.note(m.name, f"hardlink to {m.linkname!r}, which is {what} at this point")
                return
            parent = self.parent_dir(parent_path, m.name)
            if parent is None:
                return
            if _may_lead(parent.children.get(base)):
                self._dirs.clear()  # what it replaces may be (or lead to) a directory remembered
            parent.children[base] = target
            self.linked = True
            return
        parent = self.parent_dir(parent_path, m.name)
        if parent is None:
            return
        existing = parent.children.get(base)
        if m.type is Type.DIR:
            if isinstance(existing, _Dir):
                existing.member, existing.layer = m, self.layer  # the lower children stay
            else:
                if existing is not None:
                    self._dirs.clear()
                parent.children[base] = _Dir(m, self.layer)
            return
        if _may_lead(existing):
            self._dirs.clear()  # a directory, or a symlink followed to one, may be one remembered
        parent.children[base] = _Leaf(m, self.layer)


class _Metas:
    """One Meta object per distinct value: most files of an image share mode, owner and no xattrs."""

    def __init__(self) -> None:
        self._made: dict[tuple[object, ...], Meta] = {}
        self._files: dict[tuple[object, ...], Meta] = {}  # a file's with one name, by mode, owner, xattrs

    def get(
        self, mode: int, uid: int, gid: int, xattrs: tuple[tuple[bytes, bytes], ...], nlink: int = 1,
        group: int = 0, link: bytes = b"", rdev: int = 0,
    ) -> Meta:  # fmt: skip
        key = (mode, uid, gid, xattrs, nlink, group, link, rdev)
        meta = self._made.get(key)
        if meta is None:
            meta = self._made[key] = Meta(
                mode=mode, uid=uid, gid=gid, link=link, rdev=rdev, xattrs=xattrs, nlink=nlink, group=group
            )
        return meta

    def directory(self, d: _Dir) -> Entry:
        m = d.member
        if m is None:
            return Entry(Kind.DIR, 0, 0, 0, max(d.layer, 0), self.get(IMPLICIT_MODE, 0, 0, ()))
        return Entry(Kind.DIR, 0, 0, m.mtime, max(d.layer, 0), self.get(m.mode, m.uid, m.gid, m.xattrs))

    def leaf(self, leaf: _Leaf, nlink: int, group: int) -> tuple[int, int, int, int, Meta]:
        """A leaf's row: kind code, offset, size, mtime and Meta (its layer is ``leaf.layer``)."""
        m = leaf.member
        if m.type is Type.FILE:
            if nlink == 1:
                key = (m.mode, m.uid, m.gid, m.xattrs)
                meta = self._files.get(key)
                if meta is None:
                    meta = self._files[key] = self.get(m.mode, m.uid, m.gid, m.xattrs)
                return _FILE, m.offset, m.size, m.mtime, meta
            return _FILE, m.offset, m.size, m.mtime, self.get(m.mode, m.uid, m.gid, m.xattrs, nlink, group)
        kind = _KINDS[m.type]
        link = m.linkname.encode("utf-8", "surrogateescape") if kind is Kind.SYMLINK else b""
        rdev = os.makedev(m.devmajor, m.devminor) if kind in (Kind.CHAR, Kind.BLOCK) else 0
        meta = self.get(m.mode, m.uid, m.gid, m.xattrs, nlink, group, link, rdev)
        return KIND_ORDER.index(kind), 0, len(link), m.mtime, meta


class _Rows:
    """The merged tree's rows as they are walked (any order), column by column: no Entry, no dict."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.kinds = bytearray()
        self.offsets: array[int] = array("Q")
        self.sizes: array[int] = array("Q")
        self.mtimes: array[int] = array("q")
        self.sources: array[int] = array("I")
        self.metas: list[Meta | None] = []

    def columns(self) -> Columns:
        """The rows sorted by path (one sort of row numbers; each column permuted once)."""
        names = self.names
        rows = sorted(range(len(names)), key=names.__getitem__)
        ordered = list(map(names.__getitem__, rows))
        self.names = []
        del names
        return Columns(
            Names.of(ordered),
            bytes(map(self.kinds.__getitem__, rows)),
            array("Q", map(self.offsets.__getitem__, rows)),
            array("Q", map(self.sizes.__getitem__, rows)),
            array("q", map(self.mtimes.__getitem__, rows)),
            array("I", map(self.sources.__getitem__, rows)),
            list(map(self.metas.__getitem__, rows)),
        )


def merge(layers: Sequence[LayerTable]) -> Merged:
    """Apply ``layers`` (lowest first) as layer.md says; an entry's ``source`` is its layer's index.

    The entries come as columns sorted by path (ColumnEntries): 500,000 files make no Entry object
    and no dict of paths; hardlinked paths have equal entries (one Meta, one ``group``).
    """
    merger = _Merger()
    for index, table in enumerate(layers):
        merger.layer = index
        merger.apply(table)
    # Count each inode's names in the final tree, then make one row per path.
    links: dict[int, int] = {}
    stack = [merger.root] if merger.linked else []  # link counts matter only if there are hardlinks
    while stack:
        for child in stack.pop().children.values():
            if isinstance(child, _Dir):
                stack.append(child)
            else:
                links[id(child)] = links.get(id(child), 0) + 1
    out = _Rows()
    names, kinds, offsets, sizes, mtimes, sources, row_metas = (
        out.names, out.kinds, out.offsets, out.sizes, out.mtimes, out.sources, out.metas
    )  # fmt: skip
    metas = _Metas()
    made: dict[int, tuple[int, int, int, int, Meta]] = {}
    groups = 0
    walk: list[tuple[str, _Dir]] = [("", merger.root)]
    while walk:
        prefix, directory = walk.pop()
        for name, child in directory.children.items():
            member = child.member
            held = "" if member is None else member.name
            # the member's own name where it is the path (the common case): no second str of it
            path = (
                held
                if len(held) == len(prefix) + len(name) and held.endswith(name) and held.startswith(prefix)
                else f"{prefix}{name}"
            )
            names.append(path)
            if isinstance(child, _Dir):
                entry = metas.directory(child)
                kinds.append(_DIR)
                offsets.append(0)
                sizes.append(0)
                mtimes.append(entry.mtime)
                sources.append(entry.source)
                row_metas.append(entry.meta)
                walk.append((f"{path}/", child))
                continue
            if links:
                row = made.get(id(child))
                if row is None:
                    nlink = links.get(id(child), 1)
                    if nlink > 1:
                        groups += 1
                    row = made[id(child)] = metas.leaf(child, nlink, groups if nlink > 1 else 0)
            else:
                row = metas.leaf(child, 1, 0)
            kinds.append(row[0])
            offsets.append(row[1])
            sizes.append(row[2])
            mtimes.append(row[3])
            sources.append(child.layer)
            row_metas.append(row[4])
    root = metas.directory(merger.root)
    merger.root.children = {}  # the merge's own tree (its nodes and members) is let go before the sort
    del made, links
    return Merged(entries=ColumnEntries(out.columns()), root=root, notes=merger.notes)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
