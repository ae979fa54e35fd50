"""The entry table as the index cache stores it: counts, then the columns back to back (little endian)."""

from __future__ import annotations

import struct
import sys
from array import array

from .entries import _KINDS, ArchiveTable, Columns, Names, Skipped

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
    return [le_bytes(array("I", map(len, raw))), *raw]


def le_bytes(a: array[int]) -> bytes:
    """An array's bytes, little endian (the cache's byte order on every machine)."""
    if sys.byteorder == "big":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


class Cursor:
    """Bounds-checked slices of a stored payload, front to back (untrusted: ValueError when cut short)."""

    def __init__(self, payload: bytes | memoryview, what: str, pos: int = 0) -> None:
        self.view = memoryview(payload)
        self.pos = pos
        self.what = what  # how the error names the payload: "table", "tree"

    def take(self, size: int) -> memoryview:
        """The next ``size`` bytes."""
        if size < 0 or self.pos + size > len(self.view):
            raise ValueError(f"{self.what} payload cut short")
        self.pos += size
        return self.view[self.pos - size : self.pos]

    def at_end(self) -> bool:
        """Whether every byte was taken."""
        return self.pos == len(self.view)


def from_le(typecode: str, data: memoryview) -> array[int]:
    """An array of ``typecode`` from little-endian bytes."""
    a = array(typecode)
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a


def encode_table(table: ArchiveTable) -> bytes:
    """The table as the index cache stores it (see _TABLE_HEAD); ValueError if it cannot be."""
    c = table.columns
    if c.metas is not None:
        raise ValueError("a table with rootfs metadata is not stored")
    names, ends = c.names.blob()
    skipped = [text for s in table.skipped for text in (s.name, s.reason)]
    symlinks = [text for pair in table.symlinks.items() for text in pair]
    return b"".join(
        [
            _TABLE_HEAD.pack(len(c.names), len(table.skipped), len(table.symlinks), len(names), table.end),
            names,
            le_bytes(ends),
            c.kinds,
            *(le_bytes(a) for a in (c.offsets, c.sizes, c.mtimes, c.sources)),
            *_pack_strings(skipped),
            *_pack_strings(symlinks),
        ]
    )


def decode_table(payload: bytes) -> ArchiveTable:
    """A table from ``encode``'s bytes; ValueError when they do not hold one whole table."""
    view = memoryview(payload)
    if len(view) < _TABLE_HEAD.size:
        raise ValueError("table payload cut short")
    n, k, m, names_len, end = _TABLE_HEAD.unpack_from(view)
    cursor = Cursor(view, "table", _TABLE_HEAD.size)
    take = cursor.take
    blob = take(names_len)
    ends = from_le("Q", take(8 * n))
    if (ends[-1] if n else 0) != names_len:
        raise ValueError("table names do not add up")
    kinds = bytes(take(n))
    if kinds.translate(None, bytes(range(len(_KINDS)))):
        raise ValueError("unknown entry kind in table")
    offsets, sizes, mtimes, sources = (from_le(t, take(n * array(t).itemsize)) for t in _COLUMN_TYPES)
    texts = []
    for count in (k, m):
        lengths = from_le("I", take(8 * count))
        texts.append([str(take(length), "utf-8", "surrogateescape") for length in lengths])
    if not cursor.at_end():
        raise ValueError("trailing bytes after the table")
    skipped = [Skipped(name, reason) for name, reason in zip(texts[0][::2], texts[0][1::2], strict=True)]
    symlinks = dict(zip(texts[1][::2], texts[1][1::2], strict=True))
    columns = Columns(Names(blob, ends), kinds, offsets, sizes, mtimes, sources)
    return ArchiveTable.from_columns(columns, skipped, end, symlinks)
