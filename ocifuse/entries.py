"""The entry table: what a view serves (Entry, its Kind and rootfs Meta), what it left out (Skipped),
the table itself (a dict or Columns), and bounds-checked reads of entries from their sources.

Pure values: no tar parsing (tarscan.py), no storage format (tablecodec.py), no file opening
(archive.py). A table never changes once built.
"""

from __future__ import annotations

import enum
import itertools
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

from .errors import CorruptTable
from .source import Source, clip


class Kind(enum.Enum):
    """What a table entry is; the layout view serves files and directories, the rootfs view all kinds."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(frozen=True, slots=True)
class Meta:
    """What the rootfs view serves beyond an entry's bytes (the layout view has none: None).

    ``group`` is nonzero for hardlinks: every path whose entry has the same group is one inode,
    with ``nlink`` names.
    """

    mode: int  # permission bits with setuid, setgid and sticky (0o7777)
    uid: int
    gid: int
    link: bytes = b""  # a symlink's target, as stored
    rdev: int = 0  # a device's number (os.makedev)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    nlink: int = 1
    group: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """One served member: which source holds its bytes, where they start in it, how many there are.

    ``source`` indexes the owner's ``sources`` list; 0 is the archive's own (decompressed) stream.
    """

    kind: Kind
    offset: int
    size: int
    mtime: int
    source: int = 0
    meta: Meta | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A member the name policy did not serve, and why."""

    name: str
    reason: str


# A table's kinds as held in Columns.kinds and stored: one byte per entry (1 is a directory).
_KINDS = (Kind.FILE, Kind.DIR, Kind.SYMLINK, Kind.CHAR, Kind.BLOCK, Kind.FIFO)
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}
KIND_ORDER = _KINDS  # what each code of a stored kinds column means
_DIR_CODE = _KIND_CODES[Kind.DIR]
# What the columns hold of an Entry: adding a field to Entry means holding it here too, and
# storing it (with a new cache.CACHE_VERSION) or refusing to store it as ``meta`` is refused;
# tests/test_table_cache.py checks the two agree.
COLUMN_FIELDS = ("kind", "offset", "size", "mtime", "source", "meta")


class Names(Sequence[str]):
    """Sorted paths held as one UTF-8 (surrogateescape) blob and the end offset of each.

    A str is made only for the rows asked for: loading 100,000 names costs no 100,000 objects
    (nor their 12 MB), and a bisection decodes ~17 of them. ``raw`` gives the bytes themselves,
    which are the names as the kernel sees them.
    """

    __slots__ = ("_blob", "_ends")

    def __init__(self, blob: bytes | memoryview, ends: array[int]) -> None:
        self._blob = blob
        self._ends = ends

    @classmethod
    def of(cls, names: Iterable[str]) -> Names:
        """Names from strs (already sorted): encoded as one string, without a bytes object per name."""
        names = names if isinstance(names, list) else list(names)
        joined = "".join(names)
        blob = joined.encode("utf-8", "surrogateescape")
        if len(blob) == len(joined):  # every character one byte (ASCII, or an undecodable byte kept)
            del joined
            return cls(blob, array("Q", itertools.accumulate(map(len, names))))
        del joined, blob
        raw = [n.encode("utf-8", "surrogateescape") for n in names]
        return cls(b"".join(raw), array("Q", itertools.accumulate(map(len, raw))))

    def __len__(self) -> int:
        return len(self._ends)

    def raw(self, i: int, start: int = 0) -> bytes:
        """The bytes of row ``i`` (0 <= i < len) from byte ``start`` on: the name as the kernel sees it."""
        return bytes(self._blob[(self._ends[i - 1] if i else 0) + start : self._ends[i]])

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self._ends)
        return str(self._blob[self._ends[i - 1] if i else 0 : self._ends[i]], "utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def blob(self) -> tuple[bytes | memoryview, array[int]]:
        """The blob and the end offsets (what the cache stores)."""
        return self._blob, self._ends


@dataclass(frozen=True, slots=True)
class Columns:
    """An entry table in path order, column by column: what the tree and the index cache read.

    ``names`` is sorted, so a directory comes before everything under it and the paths under
    ``d/`` are the contiguous run from ``d/`` up to (not including) ``d0``. Reading a column costs
    no Entry object per member, which is what lets a 100,000-entry table load in milliseconds.
    """

    names: Names
    kinds: bytes  # an index into _KINDS per row (1: a directory)
    offsets: array[int]  # "Q"
    sizes: array[int]  # "Q"
    mtimes: array[int]  # "q"
    sources: array[int]  # "I"
    # The rootfs view's Meta per row; None when no row has any (the layout view: never stored).
    metas: list[Meta | None] | None = None
    # Columns made from a dict keep its Entry objects in row order: ``entry`` hands them out
    # rather than making a second copy of each (100,000 entries: ~10 MB less after a full walk).
    rows: list[Entry] | None = None

    @classmethod
    def of(cls, entries: Mapping[str, Entry], *, keep_rows: bool = True) -> Columns:
        """The columns of an entry dict (``keep_rows``: its Entry objects kept too, see ``rows``);
        of ColumnEntries, their own columns."""
        if isinstance(entries, ColumnEntries):
            return entries.columns
        names = sorted(entries)
        ordered = [entries[n] for n in names]
        metas = [e.meta for e in ordered]
        return cls(
            Names.of(names),
            bytes(_KIND_CODES[e.kind] for e in ordered),
            array("Q", [e.offset for e in ordered]),
            array("Q", [e.size for e in ordered]),
            array("q", [e.mtime for e in ordered]),
            array("I", [e.source for e in ordered]),
            metas if any(m is not None for m in metas) else None,
            ordered if keep_rows else None,
        )

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The row of ``name``, or -1."""
        i = bisect_left(self.names, name)
        return i if i < len(self.names) and self.names[i] == name else -1

    def entry(self, i: int) -> Entry:
        """The Entry of row ``i``."""
        if self.rows is not None:
            return self.rows[i]
        meta = None if self.metas is None else self.metas[i]
        kind = _KINDS[self.kinds[i]]
        return Entry(kind, self.offsets[i], self.sizes[i], self.mtimes[i], self.sources[i], meta)

    def fields(self, i: int) -> tuple[Kind, int, int, Meta | None]:
        """What a stat of row ``i`` shows (its kind, size, mtime and Meta), with no Entry made."""
        if self.rows is not None:
            e = self.rows[i]
            return e.kind, e.size, e.mtime, e.meta
        return (
            _KINDS[self.kinds[i]],
            self.sizes[i],
            self.mtimes[i],
            None if self.metas is None else self.metas[i],
        )

    def is_dir(self, i: int) -> bool:
        """True when row ``i`` is a directory."""
        return self.kinds[i] == _DIR_CODE


class ColumnEntries(Mapping[str, Entry]):
    """Columns seen as a mapping of path -> Entry (an Entry made per lookup; no dict of them)."""

    __slots__ = ("columns",)

    def __init__(self, columns: Columns) -> None:
        self.columns = columns

    def __getitem__(self, name: str) -> Entry:
        i = self.columns.index(name)
        if i < 0:
            raise KeyError(name)
        return self.columns.entry(i)

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns.names)

    def __len__(self) -> int:
        return len(self.columns)


class ArchiveTable:
    """The entry table of one archive: normalized path -> Entry, plus what was skipped.


    ``symlinks`` maps each symlink member's normalized name to its target as written (symlinks
    are not served; a docker-archive's ``layer.tar`` links are resolved through it).

    Held as a dict (a scan builds one) or as Columns (a table loaded from the index cache), each
    made from the other on first use. A table never changes once built.
    """

    def __init__(
        self,
        entries: dict[str, Entry],
        skipped: list[Skipped],
        end: int,
        symlinks: dict[str, str] | None = None,
    ) -> None:
        self._entries: dict[str, Entry] | None = entries
        self._columns: Columns | None = None
        self.skipped = skipped
        self.end = end
        self.symlinks = {} if symlinks is None else symlinks

    @classmethod
    def from_columns(
        cls, columns: Columns, skipped: list[Skipped], end: int, symlinks: dict[str, str] | None = None
    ) -> ArchiveTable:
        """A table over ``columns`` (no dict is built until ``entries`` is asked for)."""
        table = cls({}, skipped, end, symlinks)
        table._entries = None
        table._columns = columns
        return table

    def adopt(self, same: ArchiveTable) -> None:
        """Read the columns of ``same``, this very table held elsewhere (decoded from its stored bytes)."""
        if len(same) != len(self) or same.end != self.end:
            raise ValueError("not the same table")
        self._columns, self._entries = same.columns, None

    @property
    def entries(self) -> dict[str, Entry]:
        """Every entry by path (built from the columns on first use for a loaded table)."""
        if self._entries is None:
            c = self.columns
            self._entries = {name: c.entry(i) for i, name in enumerate(c.names)}
        return self._entries

    @property
    def columns(self) -> Columns:
        """The table in path order, column by column (built from the dict on first use)."""
        if self._columns is None:
            assert self._entries is not None
            self._columns = Columns.of(self._entries)
        return self._columns

    def __len__(self) -> int:
        return len(self._entries) if self._entries is not None else len(self.columns)

    def get(self, name: str) -> Entry | None:
        """The entry at ``name``, or None."""
        if self._entries is not None:
            return self._entries.get(name)
        i = self.columns.index(name)
        return None if i < 0 else self.columns.entry(i)

    def files(self) -> Iterator[tuple[str, Entry]]:
        """Every regular file, in path order for a loaded table."""
        if self._entries is not None:
            return ((n, e) for n, e in self._entries.items() if e.kind is Kind.FILE)
        c = self.columns
        return ((c.names[i], c.entry(i)) for i, k in enumerate(c.kinds) if k == 0)


class Sources:
    """Bounds-checked reads of table entries from a list of byte sources (``entry.source`` indexes it)."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    @staticmethod
    def clip(entry: Entry, offset: int, size: int) -> int:
        """How many of ``size`` bytes from ``offset`` lie inside ``entry`` (0 for a bad offset)."""
        return clip(entry.size, offset, size)

    def _source(self, entry: Entry) -> Source:
        """The source of ``entry``, which must hold the whole entry: else CorruptTable (EIO).

        A scanned table never fails this; a table loaded from the index cache that did would
        otherwise serve short reads, so the entry is refused as a whole instead.
        """
        source = self.sources[entry.source] if 0 <= entry.source < len(self.sources) else None
        if source is None or entry.offset + entry.size > source.size:
            raise CorruptTable(entry.offset, entry.size, -1 if source is None else source.size)
        return source

    def pread(self, entry: Entry, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of ``entry`` from ``offset``, never past the entry's end."""
        size = self.clip(entry, offset, size)
        if size == 0:
            return b""
        return self._source(entry).pread(entry.offset + offset, size)

    def pread_cached(self, entry: Entry, offset: int, size: int) -> bytearray | None:
        """Like ``pread``, but only if the bytes can be had without blocking (Source.pread_cached)."""
        size = self.clip(entry, offset, size)
        if size == 0:
            return bytearray()
        return self._source(entry).pread_cached(entry.offset + offset, size)

    def sizes(self) -> tuple[int, ...]:
        """The size of each source, in order."""
        return tuple(source.size for source in self.sources)

    def close(self) -> None:
        """Close every source."""
        for source in self.sources:
            source.close()
