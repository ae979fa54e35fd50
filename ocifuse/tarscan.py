"""The one tar header walk of ocifuse, and the name policy: which member is served at which path.

The scan never reads member data: ``tarfile`` seeks over it. What the table holds is decided
here, in one place (the name policy); everything skipped is kept as a ``Skipped`` note so that
fsck, inspect and mount can all say what was left out and why. Two builders use the walk: the
oci-archive table (``scan_table``) and a layer's full-member table (layer.py).
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import tarfile
from array import array
from collections.abc import Callable, Iterable
from typing import IO, NamedTuple, Protocol
from zlib import adler32

from .entries import _KIND_CODES, ArchiveTable, Columns, Kind, Names, Skipped
from .errors import LayoutOpenError, NotAnArchive, TruncatedArchive
from .source import sniff

BLOCK = 512
# Longest header extension (PAX record block, GNU long name) the scan reads into memory.
MAX_HEADER_DATA = 1 << 20
# Most header bytes (PAX records, long names, sparse maps, header blocks) read for one member.
MAX_MEMBER_HEADERS = 4 * MAX_HEADER_DATA
# POSIX NAME_MAX: the longest name component a Linux filesystem can hold.
NAME_MAX = 255


class TarFile(Protocol):
    """What the walk reads a tar from: a file (``IO[bytes]``) or a pass's stream (streams.Forward)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class _CappedReader:
    """A read-only file wrapper that refuses header reads larger than MAX_HEADER_DATA.

    ``tarfile`` reads only headers through it (member data is skipped by seeking), so a PAX or
    GNU long-name header claiming gigabytes fails here instead of allocating gigabytes.
    """

    def __init__(self, raw: TarFile, path: str) -> None:
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


def plain_name(name: str) -> bool:
    """True for a name ``normalize`` keeps as it is if its bytes are few enough (its fast path).

    A relative name whose components are non-empty, start with no "." and hold no NUL: five
    substring tests (~0.2 us), not a regular expression (~0.8 us); a million names are a second.
    """
    return (
        name[:1] not in ("", ".", "/")
        and "/." not in name
        and "//" not in name
        and name[-1] != "/"
        and "\0" not in name
    )


def normalize(name: str) -> str | None:
    """The path a member is served at, or None when the name policy refuses it.

    ``./`` prefixes and ``.`` components (``tar -C dir .``) and trailing slashes are dropped.
    Refused: absolute names, ``..`` components, empty names, components over NAME_MAX bytes, and
    names with a NUL byte (a PAX path may hold one; a Linux name cannot, and would read as a prefix).
    """
    if plain_name(name) and (
        len(name) <= NAME_MAX if name.isascii() else len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    ):
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


_INT64 = (-(1 << 63), (1 << 63) - 1)


def header_mtime(info: tarfile.TarInfo) -> int:
    """A member's mtime as an int64: a PAX mtime may be any decimal; "nan" or "1e400" read as 0.

    Clamped to what a stored table (array "q") and stat hold, for the layout view and layers alike.
    """
    try:
        return max(_INT64[0], min(int(info.mtime), _INT64[1]))
    except (TypeError, ValueError, OverflowError):
        return 0


def scan_table(fileobj: IO[bytes], path: str, size: int) -> ArchiveTable:
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
    end = walk(fileobj, path, size, builder.add, plain=builder.add_plain, owners=False)
    return ArchiveTable.from_columns(builder.finish(), builder.skipped, end, builder.symlinks)


def walk(
    fileobj: TarFile,
    path: str,
    size: int | None,
    add: Callable[[tarfile.TarInfo], None],
    *,
    layer: bool = False,
    plain: Callable[[list[PlainMember]], None] | None = None,
    owners: bool = True,
) -> int:
    """Call ``add`` with every member of the tar in ``fileobj`` (``size`` bytes), in order; return its end.

    The one header walk of ocifuse: the oci-archive table and the layer scan are two builders
    over it. Member data is never read, only seeked over; a member whose data runs past ``size``
    raises TruncatedArchive before ``add`` sees it. ``size`` None: a stream read forward, whose
    size is known at its end only (a first pass's, streams.Forward): where it ends is found by
    reading (every seek goes forward but for a header block or two). ``layer``: accept what Go's
    archive/tar accepts and real layer tars hold (``umoci insert`` writes them): no end-of-archive
    blocks, the last member's padding cut short, an empty file or an all-zero first block (an
    empty layer). ``plain``: a builder's fast door, given runs of canonical plain headers (files and
    directories, links, devices: ``_plain_run``) instead of one TarInfo each; ``owners`` False:
    a builder that keeps no mode, owner or device number of them (they read as 0; mtime is read).
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
            # (a global PAX header may rename what follows: tarfile's then)
            if plain and getattr(tf, "firstmember", None) is None and not tf.pax_headers:
                encoding = tf.encoding or "utf-8"
                tf.offset = _plain_run(fileobj, tf.offset, size, encoding, tf.errors, owners, plain)
            may_end = layer and getattr(tf, "firstmember", None) is None
            if may_end and not _holds(fileobj, size, tf.offset + 1):
                # the last member ended at (or its padding past) the end: no end blocks
                return fileobj.seek(0, os.SEEK_END) if size is None else size
            info = _next_member(tf, reader, size)
            if info is None:
                break
            if info.size < 0:
                # tarfile would step backwards by it, and could read the same headers forever.
                raise ValueError(f"member {info.name!r} has a negative size")
            if _data_skipped(info) and not _holds(fileobj, size, info.offset_data + info.size):
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


def _holds(fileobj: TarFile, size: int | None, n: int) -> bool:
    """Whether the tar's stream holds ``n`` bytes: by ``size``, or (None) by reading its byte n-1."""
    if size is not None:
        return n <= size
    fileobj.seek(n - 1)  # forward: what lies between is seeked over, as the walk would
    return len(fileobj.read(1)) == 1


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


def _next_member(
    tf: tarfile.TarFile, reader: _CappedReader, archive_size: int | None
) -> tarfile.TarInfo | None:
    """``tf.next()``, with a fast path for the common header: a plain ustar file, directory or link.

    tarfile spends ~40 us of Python per header; this reads the same fields with one struct unpack
    (100,000 entries: the scan takes ~0.55x the time). It takes only headers that tarfile reads
    the same way and whose data lies inside the file; everything else (the first member, PAX and GNU
    headers, base-256 numbers, a bad or signed checksum, zero blocks, the end) is tarfile's.
    """
    pos = tf.offset
    if (
        getattr(tf, "firstmember", None) is not None
        or tf.pax_headers
        or (archive_size is not None and pos + BLOCK > archive_size)
    ):
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
    buf: bytes, pos: int, archive_size: int | None, encoding: str, errors: str
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
    padded = -(-numbers[3] // BLOCK) * BLOCK
    if numbers[3] < 0 or (archive_size is not None and pos + BLOCK + padded > archive_size):
        return None  # tarfile and the walk say what is wrong (a stream read forward: the walk)

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


class PlainMember(NamedTuple):
    """A member of a run of canonical plain headers, as tarfile reads it (its TarInfo's fields)."""

    name: str  # a directory's without its trailing slashes
    type: bytes  # tarfile.REGTYPE, DIRTYPE, SYMTYPE, LNKTYPE, CHRTYPE, BLKTYPE or FIFOTYPE
    offset_data: int
    size: int
    mtime: int
    mode: int
    uid: int
    gid: int
    linkname: str
    devmajor: int
    devminor: int

    def info(self) -> tarfile.TarInfo:
        """The TarInfo tarfile makes of the same header (for what a builder leaves to its ``add``)."""
        info = tarfile.TarInfo(self.name)
        info.type, info.size, info.mtime, info.mode = self.type, self.size, self.mtime, self.mode
        info.uid, info.gid, info.linkname = self.uid, self.gid, self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.uname = info.gname = ""
        info.offset, info.offset_data = self.offset_data - BLOCK, self.offset_data
        return info


# The plain ustar header as GNU tar, Go's archive/tar and Python's tarfile write it (POSIX.1-2001
# "ustar Interchange Format"): every number zero-padded octal ending in NUL (mode, uid, gid,
# devmajor and devminor may be all NUL), the checksum as "%06o\0 ", magic "ustar\0" version "00", and
# a type _plain_header takes. Groups: name mode uid gid size mtime checksum type link major minor prefix.
_NUMBER = rb"([0-7]{7}\0|\0{8})"
_CANONICAL = re.compile(
    rb"(?s)(.{100})" + _NUMBER * 3 + rb"([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 ([0-6])(.{100})"
    rb"ustar\x0000.{64}" + _NUMBER * 2 + rb"(.{155}).{12}"
)
# How much of the tar a run reads at once, at most (a run of small members grows to it); a stream
# read forward keeps FORWARD_KEEP bytes behind its position: a run never reads further ahead.
RUN_CHUNK = 1 << 20
RUN_CHUNK_FORWARD = 64 << 10


# Header numbers read by a run so far, by their field's bytes (most members share a mode, an owner, an
# mtime): a dict look-up, not an int() each; emptied when it holds this many.
_NUMBERS_KEPT = 4096


def _numbers() -> dict[bytes, int]:
    """A new memo of header numbers: the 8-byte fields of all NUL read as 0 (tarfile's nti of b"")."""
    return {bytes(8): 0}


def _number(numbers: dict[bytes, int], field: bytes) -> int:
    """The value of an octal header field (digits, then NUL or nothing), kept in ``numbers``."""
    value = numbers.get(field)
    if value is None:
        value = numbers[field] = int(field.rstrip(b"\0"), 8)
    return value


def _plain_run(
    fileobj: TarFile,
    pos: int,
    size: int | None,
    encoding: str,
    errors: str,
    owners: bool,
    take: Callable[[list[PlainMember]], None],
) -> int:
    """Hand the members of the canonical plain headers from ``pos`` on to ``take``, a list per chunk
    read; return where the first header not taken starts (tarfile's then: anything else, a bad
    checksum, the end).

    The fast path of a million-member archive: no TarInfo, no call per member, headers read many at a
    time; what it takes is exactly what tarfile (and ``_plain_header``) read from the same blocks.
    The checksum is tarfile's unsigned sum, the field as spaces: two adler32 sums of 256 bytes each
    (adler32's low half is 1 + the byte sum mod 65521, and 256 bytes sum to at most 65280).
    ``size`` None: a stream read forward (a layer's first pass): a file is taken only when its data
    was read with its header (the walk checks the rest: a stream cut short, its end). ``owners``
    False: mode, uid, gid and device numbers are not read (0); the match has checked them all the same.
    """
    out: list[PlainMember] = []
    try:
        return _run(fileobj, pos, size, encoding, errors, take, out, owners)
    finally:
        if out:
            take(out)


def _run(
    fileobj: TarFile,
    pos: int,
    size: int | None,
    encoding: str,
    errors: str,
    take: Callable[[list[PlainMember]], None],
    out: list[PlainMember],
    owners: bool = True,
) -> int:
    """``_plain_run``'s loop: ``out`` holds the members of the chunk read last (handed on after it).

    Per member (~2.5 us): one match, two adler32, a dict look-up per number (``_numbers``), the
    name decoded, the link only when there is one, and the PlainMember made as the tuple it is.
    """
    want, most = BLOCK * 16, RUN_CHUNK if size is not None else RUN_CHUNK_FORWARD
    match = _CANONICAL.match
    numbers = _numbers()
    number = numbers.get
    member = tuple.__new__
    append = out.append
    while size is None or pos + BLOCK <= size:
        if out:
            take(out[:])
            out.clear()
        if len(numbers) > _NUMBERS_KEPT:
            numbers.clear()
            numbers.update(_numbers())
        fileobj.seek(pos)
        chunk = fileobj.read(want if size is None else min(want, size - pos))
        view = memoryview(chunk)
        at, n = 0, len(chunk)
        while at + BLOCK <= n:
            m = match(chunk, at, at + BLOCK)
            if m is None:
                return pos + at
            name_f, mode, uid, gid, size_f, mtime, chksum, kind, link, major, minor, prefix = m.groups()
            # the checksum field is "%06o\0 " (the match says so): its bytes sum to its digits' + 32
            found = (
                (adler32(view[at : at + 256]) & 0xFFFF)
                + (adler32(view[at + 256 : at + BLOCK]) & 0xFFFF)
                - 2
                - sum(chksum)
                - 32
                + 256
            )
            length = int(size_f, 8)
            padded = -(-length // BLOCK) * BLOCK
            skip = padded if kind == b"0" else 0  # tarfile skips data after a regular file only
            if found != int(chksum, 8) or (
                pos + at + BLOCK + padded > size if size is not None else at + BLOCK + skip > n
            ):
                return pos + at  # tarfile says what is wrong (and reads a signed checksum)
            name = name_f.split(b"\0", 1)[0].decode(encoding, errors)
            if prefix[0]:  # decoded apart and joined, as tarfile does
                name = prefix.split(b"\0", 1)[0].decode(encoding, errors) + "/" + name
            if kind == b"5":
                name = name.rstrip("/")
            t = number(mtime)
            if t is None:
                t = _number(numbers, mtime)
            if owners:
                o, u, g, j, k = map(number, (mode, uid, gid, major, minor))
                if o is None or u is None or g is None or j is None or k is None:
                    o, u, g, j, k = (_number(numbers, f) for f in (mode, uid, gid, major, minor))
            else:
                o = u = g = j = k = 0
            append(
                member(PlainMember, (
                    name, kind, pos + at + BLOCK, length, t, o, u, g,
                    link.split(b"\0", 1)[0].decode(encoding, errors) if link[0] else "", j, k,
                ))
            )  # fmt: skip
            at += BLOCK + skip
        # a run of small members reads more at a time; a jump over data starts small again
        want = min(want * 2, most) if at - n < want else BLOCK * 16
        if n < BLOCK:
            return pos  # the end of a stream: the walk's
        pos += at
    return pos


_FILE, _DIR = _KIND_CODES[Kind.FILE], _KIND_CODES[Kind.DIR]


def _rows(names: list[str]) -> dict[str, int]:
    """Each name's last row."""
    return dict(zip(names, range(len(names)), strict=True))


class _TableBuilder:
    """Applies the name policy member by member, into columns; duplicate names: the last one wins.

    Rows are kept in archive order, one per member taken (no Entry object, no dict of every
    entry while scanning: a million members); ``finish`` keeps the last row of each name, adds
    the implied directories and sorts them into Columns.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.kinds = bytearray()
        self.offsets: array[int] = array("Q")
        self.sizes: array[int] = array("Q")
        self.mtimes: array[int] = array("q")
        self.skipped: list[Skipped] = []
        self.symlinks: dict[str, str] = {}
        # name -> its last row, kept from the first hardlink on (which looks its target up)
        self._where: dict[str, int] | None = None

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(Skipped(name, reason))

    def _put(self, name: str, kind: int, offset: int, size: int, mtime: int) -> None:
        if self._where is not None:
            self._where[name] = len(self.names)
        self.names.append(name)
        self.kinds.append(kind)
        self.offsets.append(offset)
        self.sizes.append(size)
        self.mtimes.append(mtime)

    def _row(self, name: str) -> int | None:
        """The last row of ``name`` so far, or None."""
        if self._where is None:
            self._where = _rows(self.names)
        return self._where.get(name)

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
            self._put(name, _DIR, 0, 0, mtime)
        elif info.isreg():
            if info.sparse is not None:
                self.skip(info.name, "GNU sparse member (not supported)")
                return
            self._put(name, _FILE, info.offset_data, info.size, mtime)
        elif info.islnk():
            target = normalize(info.linkname)
            row = self._row(target) if target is not None else None
            if row is None or self.kinds[row] != _FILE:
                self.skip(info.name, f"hardlink to {info.linkname!r}, not a regular member before it")
                return
            self._put(name, _FILE, self.offsets[row], self.sizes[row], mtime)
        elif info.issym():
            self.symlinks[name] = info.linkname
            self.skip(info.name, f"symlink to {info.linkname!r} (symlinks are not served)")
        else:
            self.skip(info.name, f"{_type_name(info)} (only regular files and directories are served)")

    def add_plain(self, run: list[PlainMember]) -> None:
        """Enter a run of plain members (``_plain_run``), as ``add`` would one by one.

        Files and directories with plain names (``plain_name``: nearly all) are appended to the
        columns here, with no call per member; anything else goes through ``add``.
        """
        names, kinds, offsets, sizes, mtimes = self.names, self.kinds, self.offsets, self.sizes, self.mtimes
        for m in run:
            name, kind = m[0], m[1]
            if (
                (kind == b"0" or kind == b"5")
                and self._where is None
                and not self.symlinks
                and name[:1] not in ("", ".", "/")  # plain_name, inline: a million calls are ~0.1 s
                and "/." not in name
                and "//" not in name
                and name[-1] != "/"
                and len(name) <= NAME_MAX
                and name.isascii()  # no NUL: the run cut the name at its first
            ):
                names.append(name)
                if kind == b"5":
                    kinds.append(_DIR)
                    offsets.append(0)
                    sizes.append(0)
                else:
                    kinds.append(_FILE)
                    offsets.append(m[2])
                    sizes.append(m[3])
                mtimes.append(m[4])
            elif kind == b"0" or kind == b"5":
                self._add_named(m)
            else:
                self.add(m.info())  # links, devices, fifos: rare in an image archive

    def _add_named(self, m: PlainMember) -> None:
        """Enter a plain file or directory through the name policy (``add`` for a PlainMember)."""
        served = normalize(m.name)
        if served is None:
            if not is_root(m.name):
                self.skip(m.name, refusal(m.name))
            return
        if self.symlinks:
            self.symlinks.pop(served, None)
        if m.type == tarfile.DIRTYPE:
            self._put(served, _DIR, 0, 0, m.mtime)
        else:
            self._put(served, _FILE, m.offset_data, m.size, m.mtime)

    def finish(self) -> Columns:
        """The columns: the last row of each name, and implied directories; a path that has children
        is a directory, never a file."""
        if self._where is None and len(set(self.names)) == len(self.names):
            rows = self._unique_rows()  # no name twice (the common case): no dict of every name
        else:
            rows = self._last_rows()
        names = self.names
        order = list(map(names.__getitem__, rows))
        self.names = []
        del names
        # what is no longer needed is let go before the next big thing is made (a million rows)
        kinds = bytes(map(self.kinds.__getitem__, rows))
        offsets = array("Q", map(self.offsets.__getitem__, rows))
        sizes = array("Q", map(self.sizes.__getitem__, rows))
        mtimes = array("q", map(self.mtimes.__getitem__, rows))
        del rows
        self.kinds, self.offsets, self.sizes, self.mtimes = bytearray(), array("Q"), array("Q"), array("q")
        return Columns(Names.of(order), kinds, offsets, sizes, mtimes, array("I", bytes(4 * len(kinds))))

    def _parents(self) -> set[str]:
        """The parent path of every name ("" for the root's children)."""
        return {p for p, _, _ in map(str.rpartition, self.names, itertools.repeat("/"))}

    def _implied(self, parents: set[str], row_of: Callable[[str], int | None]) -> list[int]:
        """Add the directories that ``parents`` imply (``row_of``: a path's row, if it has one); the
        rows of files that a directory replaces (skipped)."""
        dirs: set[str] = set()
        for name in parents:
            parent = name
            while parent and parent not in dirs:
                dirs.add(parent)
                parent = parent.rpartition("/")[0]
        dropped = []
        for d in sorted(dirs):
            row = row_of(d)
            if row is not None and self.kinds[row] == _FILE:
                self.skip(d, "file replaced by a directory of the same name")
                dropped.append(row)
                row = None
            if row is None:
                self._put(d, _DIR, 0, 0, 0)
        return dropped

    def _unique_rows(self) -> list[int]:
        """The rows in path order, when no name is entered twice: one sort of the rows by name."""
        names = self.names
        parents = self._parents()
        present = parents.intersection(names)  # the paths that are parents and have rows of their own
        found = {name: row for row, name in enumerate(names) if name in present} if present else {}
        dropped = self._implied(parents, found.get)
        rows: Iterable[int] = range(len(names))
        if dropped:
            gone = set(dropped)
            rows = [row for row in rows if row not in gone]
        return sorted(rows, key=names.__getitem__)

    def _last_rows(self) -> list[int]:
        """The last row of each name in path order (names entered twice: the last one wins)."""
        where = self._where if self._where is not None else _rows(self.names)
        self._where = where  # the implied directories are entered into it (``_put``)
        self._implied(self._parents(), where.get)
        self._where = None
        return list(map(where.__getitem__, sorted(where)))


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
