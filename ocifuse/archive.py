"""Scan a tar archive's headers once into an entry table; serve member bytes with ``pread``.

The scan never reads member data: ``tarfile`` seeks over it. What the table holds is decided
here, in one place (the name policy); everything skipped is kept as a ``Skipped`` note so that
fsck, inspect and mount can all say what was left out and why.
"""

from __future__ import annotations

import enum
import io
import itertools
import logging
import os
import re
import struct
import sys
import tarfile
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, overload

from .compressed import Limits, Progress, open_decompressed
from .errors import CorruptTable, LayoutOpenError, NotAnArchive, TruncatedArchive
from .source import FileRange, OpenFile, Source, SourceFile, clip, sniff

if TYPE_CHECKING:
    from .cache import IndexCache

log = logging.getLogger(__name__)

BLOCK = 512
# Longest header extension (PAX record block, GNU long name) the scan reads into memory.
MAX_HEADER_DATA = 1 << 20
# Most header bytes (PAX records, long names, sparse maps, header blocks) read for one member.
MAX_MEMBER_HEADERS = 4 * MAX_HEADER_DATA
# POSIX NAME_MAX: the longest name component a Linux filesystem can hold.
NAME_MAX = 255
# A scanned table is stored in the index cache from this many entries on (a plain archive): below
# it, scanning the headers costs about what hashing the archive's ends and reading an entry does.
TABLE_CACHE_MIN_ENTRIES = 1000


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


class _CappedReader:
    """A read-only file wrapper that refuses header reads larger than MAX_HEADER_DATA.

    ``tarfile`` reads only headers through it (member data is skipped by seeking), so a PAX or
    GNU long-name header claiming gigabytes fails here instead of allocating gigabytes.
    """

    def __init__(self, raw: IO[bytes], path: str) -> None:
        self._raw = raw
        self._path = path
        self.budget = MAX_MEMBER_HEADERS

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_HEADER_DATA:
            raise NotAnArchive(self._path, f"a tar header claims {size} bytes of header data")
        # Many small reads add up too (a GNU sparse map read block by block): one budget per member.
        self.budget -= size
        if self.budget < 0:
            raise NotAnArchive(self._path, f"a member's headers take more than {MAX_MEMBER_HEADERS} bytes")
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


# Relative names whose components are non-empty, start with no "." and hold no NUL.
_PLAIN_NAME = re.compile(r"[^/\0.][^/\0]*(?:/[^/\0.][^/\0]*)*")


def normalize(name: str) -> str | None:
    """The path a member is served at, or None when the name policy refuses it.

    ``./`` prefixes and ``.`` components (``tar -C dir .``) and trailing slashes are dropped.
    Refused: absolute names, ``..`` components, empty names, components over NAME_MAX bytes, and
    names with a NUL byte (a PAX path may hold one; a Linux name cannot, and would read as a prefix).
    """
    if _PLAIN_NAME.fullmatch(name) and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX:
        return name  # already normal: no "", "." or ".." component, no NUL, short (the common case)
    if name.startswith("/") or "\0" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        return None
    return "/".join(parts)


def is_root(name: str) -> bool:
    """True for names of the archive root itself (``.``, ``./``), not for empty or ``..`` names."""
    return bool(name) and not name.startswith("/") and all(p in ("", ".") for p in name.split("/"))


def refusal(name: str) -> str:
    """Why the name policy (``normalize``) refuses ``name``."""
    if name.startswith("/"):
        return "absolute name"
    if "\0" in name:
        return "name contains a NUL byte"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "name contains '..'"
    if not parts:
        return "empty name"
    return f"a name component is longer than {NAME_MAX} bytes"


# A table's kinds as held in Columns.kinds and stored: one byte per entry (1 is a directory).
_KINDS = (Kind.FILE, Kind.DIR, Kind.SYMLINK, Kind.CHAR, Kind.BLOCK, Kind.FIFO)
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}
_DIR_CODE = _KIND_CODES[Kind.DIR]
# What the columns hold of an Entry: adding a field to Entry means holding it here too, and
# storing it (with a new cache.CACHE_VERSION) or refusing to store it as ``meta`` is refused;
# tests/test_table_cache.py checks the two agree.
COLUMN_FIELDS = ("kind", "offset", "size", "mtime", "source", "meta")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def header_mtime(info: tarfile.TarInfo) -> int:
    """A member's mtime as an int64: a PAX mtime may be any decimal; "nan" or "1e400" read as 0.

    Clamped to what a stored table (array "q") and stat hold, for the layout view and layers alike.
    """
    try:
        return max(_INT64[0], min(int(info.mtime), _INT64[1]))
    except (TypeError, ValueError, OverflowError):
        return 0


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
        """Names from strs (already sorted)."""
        raw = [n.encode("utf-8", "surrogateescape") for n in names]
        return cls(b"".join(raw), array("Q", itertools.accumulate(map(len, raw))))

    def __len__(self) -> int:
        return len(self._ends)

    def raw(self, i: int) -> bytes:
        """The bytes of row ``i`` (0 <= i < len): the name as the kernel sees it."""
        return bytes(self._blob[self._ends[i - 1] if i else 0 : self._ends[i]])

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
    def of(cls, entries: Mapping[str, Entry]) -> Columns:
        """The columns of an entry dict."""
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
            ordered,
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

    def is_dir(self, i: int) -> bool:
        """True when row ``i`` is a directory."""
        return self.kinds[i] == _DIR_CODE


# The stored table (the index cache's "table" payload): counts, then the columns back to back.
#   u64 entries | u64 skipped | u64 symlinks | u64 len(names) | u64 end
#   names: the sorted paths, UTF-8 (surrogateescape), back to back
#   name_ends u64[n] | kinds u8[n] | offsets u64[n] | sizes u64[n] | mtimes i64[n] | sources u32[n]
#   skipped: u32[2k] byte lengths of each (name, reason), then those bytes back to back
#   symlinks: u32[2m] byte lengths of each (name, target), then those bytes back to back
_TABLE_HEAD = struct.Struct("<QQQQQ")
_COLUMN_TYPES = ("Q", "Q", "q", "I")
assert [array(t).itemsize for t in _COLUMN_TYPES] == [8, 8, 8, 4]


def _pack_strings(texts: list[str]) -> list[bytes]:
    """u32 byte lengths of ``texts``, then the texts themselves (UTF-8, surrogateescape)."""
    raw = [t.encode("utf-8", "surrogateescape") for t in texts]
    return [_le(array("I", map(len, raw))), *raw]


def _le(a: array[int]) -> bytes:
    """An array's bytes, little endian (the cache's byte order on every machine)."""
    if sys.byteorder == "big":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _from_le(typecode: str, data: memoryview) -> array[int]:
    a = array(typecode)
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a


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

    def encode(self) -> bytes:
        """The table as the index cache stores it (see _TABLE_HEAD); ValueError if it cannot be."""
        c = self.columns
        if c.metas is not None:
            raise ValueError("a table with rootfs metadata is not stored")
        names, ends = c.names.blob()
        skipped = [text for s in self.skipped for text in (s.name, s.reason)]
        symlinks = [text for pair in self.symlinks.items() for text in pair]
        return b"".join(
            [
                _TABLE_HEAD.pack(len(c.names), len(self.skipped), len(self.symlinks), len(names), self.end),
                names,
                _le(ends),
                c.kinds,
                *(_le(a) for a in (c.offsets, c.sizes, c.mtimes, c.sources)),
                *_pack_strings(skipped),
                *_pack_strings(symlinks),
            ]
        )

    @classmethod
    def decode(cls, payload: bytes) -> ArchiveTable:
        """A table from ``encode``'s bytes; ValueError when they do not hold one whole table."""
        view = memoryview(payload)
        if len(view) < _TABLE_HEAD.size:
            raise ValueError("table payload cut short")
        n, k, m, names_len, end = _TABLE_HEAD.unpack_from(view)
        pos = _TABLE_HEAD.size

        def take(size: int) -> memoryview:
            nonlocal pos
            if size < 0 or pos + size > len(view):
                raise ValueError("table payload cut short")
            pos += size
            return view[pos - size : pos]

        blob = take(names_len)
        ends = _from_le("Q", take(8 * n))
        if (ends[-1] if n else 0) != names_len:
            raise ValueError("table names do not add up")
        kinds = bytes(take(n))
        if kinds.translate(None, bytes(range(len(_KINDS)))):
            raise ValueError("unknown entry kind in table")
        offsets, sizes, mtimes, sources = (_from_le(t, take(n * array(t).itemsize)) for t in _COLUMN_TYPES)
        texts = []
        for count in (k, m):
            lengths = _from_le("I", take(8 * count))
            texts.append([str(take(length), "utf-8", "surrogateescape") for length in lengths])
        if pos != len(view):
            raise ValueError("trailing bytes after the table")
        skipped = [Skipped(name, reason) for name, reason in zip(texts[0][::2], texts[0][1::2], strict=True)]
        symlinks = dict(zip(texts[1][::2], texts[1][1::2], strict=True))
        columns = Columns(Names(blob, ends), kinds, offsets, sizes, mtimes, sources)
        return cls.from_columns(columns, skipped, end, symlinks)

    @classmethod
    def scan(cls, fileobj: IO[bytes], path: str, size: int) -> ArchiveTable:
        """Read every header of the tar in ``fileobj`` (``size`` bytes long) into a table.

        Raises NotAnArchive or TruncatedArchive, naming ``path``.
        """
        kind = sniff(fileobj.read(6))
        fileobj.seek(0)
        if kind is not None:
            raise NotAnArchive(path, f"{kind}-compressed; an oci-archive is a plain tar (decompress it)")
        if size == 0:
            raise NotAnArchive(path, "empty file, not a tar archive")
        builder = _TableBuilder()
        end = walk(fileobj, path, size, builder.add)
        return cls(builder.finish(), builder.skipped, end, builder.symlinks)


def walk(
    fileobj: IO[bytes], path: str, size: int, add: Callable[[tarfile.TarInfo], None], *, layer: bool = False
) -> int:
    """Call ``add`` with every member of the tar in ``fileobj`` (``size`` bytes), in order; return its end.

    The one header walk of ocifuse: the oci-archive table and the layer scan are two builders
    over it. Member data is never read, only seeked over; a member whose data runs past ``size``
    raises TruncatedArchive before ``add`` sees it. ``layer``: accept what Go's archive/tar accepts
    and real layer tars hold (``umoci insert`` writes them): no end-of-archive blocks, the last
    member's padding cut short, an empty file or an all-zero first block (an empty layer).
    Raises NotAnArchive, TruncatedArchive or LayoutOpenError, naming ``path``.
    """
    if layer:
        fileobj.seek(0)
        if size == 0 or not fileobj.read(BLOCK).strip(b"\0"):
            return 0  # Go's reader: io.EOF at the first header, or two zero blocks: no members
        fileobj.seek(0)
    reader = _CappedReader(fileobj, path)
    try:
        # tarfile.open reads the first member: its errors are the loop's errors.
        tf = tarfile.open(fileobj=reader, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
    except tarfile.ReadError as e:
        raise NotAnArchive(path, f"not a tar archive ({e})") from e
    except OSError as e:
        raise LayoutOpenError(path, f"cannot read the archive ({e})") from e
    except (tarfile.TarError, ValueError, OverflowError, UnicodeError, EOFError) as e:
        raise NotAnArchive(path, f"corrupt tar header ({e})") from e
    try:
        while True:
            reader.budget = MAX_MEMBER_HEADERS
            if layer and tf.offset >= size and getattr(tf, "firstmember", None) is None:
                return size  # the last member ended at (or its padding past) the end: no end blocks
            info = _next_member(tf, reader, size)
            if info is None:
                break
            if info.size < 0:
                # tarfile would step backwards by it, and could read the same headers forever.
                raise ValueError(f"member {info.name!r} has a negative size")
            if info.offset_data + info.size > size and _data_skipped(info):
                # never seek to a size the file does not have (lseek fails past 2**63)
                raise TruncatedArchive(path, f"truncated tar archive: {info.name} runs past the end")
            add(info)
            tf.members.clear()  # keep memory flat: the table is all we keep
    except LayoutOpenError:
        raise
    except OSError as e:
        raise LayoutOpenError(path, f"cannot read the archive ({e})") from e
    except tarfile.ReadError as e:
        raise TruncatedArchive(path, f"truncated tar archive ({e})") from e
    except (tarfile.TarError, ValueError, OverflowError, UnicodeError, EOFError) as e:
        raise NotAnArchive(path, f"corrupt tar header ({e})") from e
    end: int = tf.offset
    fileobj.seek(end)
    trailer = fileobj.read(BLOCK)
    if trailer and trailer.strip(b"\0"):
        if len(trailer) < BLOCK:  # tarfile ends quietly at a header cut short
            raise TruncatedArchive(path, f"truncated tar archive: header at byte {end} is cut short")
        raise NotAnArchive(path, f"invalid tar header at byte {end}")
    return end


# A ustar header: name mode uid gid size mtime chksum type linkname magic version uname gname
# devmajor devminor prefix (POSIX.1-2001 pax, "ustar Interchange Format").
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")


# Header-only types (no data follows, for tarfile and Go's archive/tar alike) and regular files.
_PLAIN_TYPES = (
    tarfile.REGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
)


def _nti(field: bytes) -> int:
    """A header number as tarfile's ``nti`` reads a non-base-256 one; ValueError where it fails."""
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _next_member(tf: tarfile.TarFile, reader: _CappedReader, archive_size: int) -> tarfile.TarInfo | None:
    """``tf.next()``, with a fast path for the common header: a plain ustar file, directory or link.

    tarfile spends ~40 us of Python per header; this reads the same fields with one struct unpack
    (100,000 entries: the scan takes ~0.55x the time). It takes only headers that tarfile reads
    the same way and whose data lies inside the file; everything else (the first member, PAX and GNU
    headers, base-256 numbers, a bad or signed checksum, zero blocks, the end) is tarfile's.
    """
    pos = tf.offset
    if getattr(tf, "firstmember", None) is not None or tf.pax_headers or pos + BLOCK > archive_size:
        return tf.next()
    reader.seek(pos)
    buf = reader.read(BLOCK)
    info = _plain_header(buf, pos, archive_size, tf.encoding or "utf-8", tf.errors)
    if info is None:
        reader.budget += BLOCK  # tarfile reads the same block again, its own way
        reader.seek(pos)
        return tf.next()
    tf.offset = info.offset_data + (-(-info.size // BLOCK) * BLOCK if info.type == tarfile.REGTYPE else 0)
    return info


def _plain_header(
    buf: bytes, pos: int, archive_size: int, encoding: str, errors: str
) -> tarfile.TarInfo | None:
    """The member of a plain ustar header (a file, directory, link, device or fifo) at ``pos``, or None."""
    if len(buf) != BLOCK:
        return None
    (name, mode, uid, gid, size, mtime, chksum, kind, link, magic, _, uname, gname, major, minor, prefix) = (
        _USTAR.unpack(buf)
    )
    if magic != b"ustar\0" or kind not in _PLAIN_TYPES:
        return None
    try:
        numbers = [_nti(f) for f in (mode, uid, gid, size, mtime, chksum, major, minor)]
    except ValueError:
        return None  # base-256 or invalid: tarfile's
    if numbers[5] != sum(buf) - sum(buf[148:156]) + 256:  # tarfile's unsigned sum, the field as spaces
        return None
    if numbers[3] < 0 or pos + BLOCK + -(-numbers[3] // BLOCK) * BLOCK > archive_size:
        return None  # tarfile and the builder say what is wrong

    def text(field: bytes) -> str:
        return field.split(b"\0", 1)[0].decode(encoding, errors)

    info = tarfile.TarInfo(f"{text(prefix)}/{text(name)}" if prefix[:1] != b"\0" else text(name))
    info.type = kind
    if kind == tarfile.DIRTYPE:
        info.name = info.name.rstrip("/")
    info.mode, info.uid, info.gid, info.size, info.mtime, info.chksum, info.devmajor, info.devminor = numbers
    info.linkname, info.uname, info.gname = text(link), text(uname), text(gname)
    info.offset, info.offset_data = pos, pos + BLOCK
    return info


class _TableBuilder:
    """Applies the name policy member by member; duplicate names: the last one wins."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.skipped: list[Skipped] = []
        self.symlinks: dict[str, str] = {}

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(Skipped(name, reason))

    def add(self, info: tarfile.TarInfo) -> None:
        """Enter one member into the table, or note why it is skipped."""
        name = normalize(info.name)
        if name is None:
            if not is_root(info.name):
                self.skip(info.name, refusal(info.name))
            return  # "." or "./": the root itself
        mtime = header_mtime(info)
        if self.symlinks and not info.issym():
            self.symlinks.pop(name, None)  # duplicate names: the last member wins
        if info.isdir():
            self.entries[name] = Entry(Kind.DIR, 0, 0, mtime)
        elif info.isreg():
            if info.sparse is not None:
                self.skip(info.name, "GNU sparse member (not supported)")
                return
            self.entries[name] = Entry(Kind.FILE, info.offset_data, info.size, mtime)
        elif info.islnk():
            target = normalize(info.linkname)
            found = self.entries.get(target) if target is not None else None
            if found is None or found.kind is not Kind.FILE:
                self.skip(info.name, f"hardlink to {info.linkname!r}, not a regular member before it")
                return
            self.entries[name] = Entry(Kind.FILE, found.offset, found.size, mtime)
        elif info.issym():
            self.symlinks[name] = info.linkname
            self.skip(info.name, f"symlink to {info.linkname!r} (symlinks are not served)")
        else:
            self.skip(info.name, f"{_type_name(info)} (only regular files and directories are served)")

    def finish(self) -> dict[str, Entry]:
        """Add implied directories; a path that has children is a directory, never a file."""
        dirs: set[str] = set()
        for name in self.entries:
            parent = name.rpartition("/")[0]
            while parent and parent not in dirs:
                dirs.add(parent)
                parent = parent.rpartition("/")[0]
        for d in sorted(dirs):
            found = self.entries.get(d)
            if found is not None and found.kind is Kind.FILE:
                self.skip(d, "file replaced by a directory of the same name")
                found = None
            if found is None:
                self.entries[d] = Entry(Kind.DIR, 0, 0, 0)
        return self.entries


def _data_skipped(info: tarfile.TarInfo) -> bool:
    """True when tarfile seeks over ``info.size`` bytes of data after the header (its _proc_builtin).

    Not for sparse members: their ``size`` is the expanded size, larger than the data stored.
    """
    return info.sparse is None and (info.isreg() or info.type not in tarfile.SUPPORTED_TYPES)


def _type_name(info: tarfile.TarInfo) -> str:
    if info.ischr():
        return "character device"
    if info.isblk():
        return "block device"
    if info.isfifo():
        return "fifo"
    return f"member of tar type {info.type!r}"


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

    def close(self) -> None:
        """Close every source."""
        for source in self.sources:
            source.close()


class Archive(Sources):
    """An open archive: its file held open for its life, its table, and bounds-checked reads.

    ``sources[0]`` is the archive's byte stream, which the table's offsets point into; entries
    with another ``source`` index read from the other sources of the list.
    """

    def __init__(
        self,
        path: str,
        cache: IndexCache | None = None,
        *,
        rescan: bool = False,
        limits: Limits | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Open ``path`` and scan its headers, or load its table from ``cache`` when one is stored.

        A gzip- or zstd-compressed archive is decompressed once to index it (or its index is loaded
        from ``cache``): ``sources[0]`` is then the decompressed stream (compressed.py), bounded by
        ``limits`` and reported to ``progress``. ``rescan`` (fsck): scan and index again even when
        stored, and store the fresh ones. Raises LayoutOpenError (NotAnArchive, TruncatedArchive,
        CompressedDataError, DecompressionLimit) naming ``path``.
        """
        self.path = path
        self.file = OpenFile(path)
        try:
            if not self.file.is_regular:
                raise NotAnArchive(path, "not a regular file")
            key = None
            if cache is not None and cache.directory is not None:
                from .cache import file_key

                key = file_key(self.file)
            stream = open_decompressed(
                FileRange(self.file),
                key=key,
                cache=cache,
                name=path,
                limits=limits,
                progress=progress,
                rebuild=rescan,
                digest=False,  # no one asks for an outer archive's uncompressed digest
            )
            super().__init__([stream])
            try:
                self.table = self._load_or_scan(cache, key, rescan)
            except BaseException:
                stream.close()
                raise
        except BaseException:
            self.file.close()
            raise

    @property
    def compression(self) -> str:
        """How the archive is stored: "plain", "gzip" or "zstd"."""
        return self.sources[0].compression

    def _scan(self) -> ArchiveTable:
        stream = self.sources[0]
        if stream.compression == "plain":  # a plain tar: buffered reads of its fd, nothing between
            with os.fdopen(os.dup(self.file.fd), "rb", buffering=BLOCK * 16) as f:
                return ArchiveTable.scan(f, self.path, self.file.size)
        try:
            with io.BufferedReader(SourceFile(stream), buffer_size=BLOCK * 128) as f:
                return ArchiveTable.scan(f, self.path, stream.size)
        except (NotAnArchive, TruncatedArchive) as e:
            raise type(e)(self.path, f"{stream.compression}-compressed, but {e.reason}") from e

    def _load_or_scan(self, cache: IndexCache | None, key: str | None, rescan: bool) -> ArchiveTable:
        """The table stored in ``cache`` under ``key`` (the file identity), else a scan (stored if worth it).

        A stored table is trusted only as far as its checksum and key go: every read still checks
        its entry against the source's size (``_source``).
        """
        if cache is None or key is None:
            return self._scan()
        payload = None if rescan else cache.load("table", key)
        if payload is not None:
            try:
                return ArchiveTable.decode(payload)
            except ValueError as e:  # a format bug (the checksum held): scan again, say so
                log.warning("stored table of %s unusable (%s): scanning", self.path, e)
        table = self._scan()
        if len(table) >= TABLE_CACHE_MIN_ENTRIES or self.sources[0].compression != "plain":
            try:
                data = table.encode()
            except (ValueError, OverflowError) as e:  # a lone surrogate in a name, a value too large
                log.info("table of %s not stored (%s)", self.path, e)
            else:
                cache.store("table", key, data)
        return table

    @property
    def fd(self) -> int:
        """The archive's open fd (-1 once closed)."""
        return self.file.fd

    def files(self) -> Iterator[tuple[str, Entry]]:
        """Every regular file in the table."""
        return self.table.files()

    def close(self) -> None:
        """Close every source and the archive's fd."""
        super().close()
        self.file.close()
