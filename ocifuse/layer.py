"""The full-member scan of one layer tar: every entry type with the metadata a root filesystem serves.

The header walk is tarscan.py's (``walk``: bounded header reads, the struct fast path, the end
rules); this module is its second builder. Where the oci-archive table keeps files and
directories, a layer keeps every member in order with its type, mode, owner, times, links,
device numbers and PAX ``SCHILY.xattr.*`` attributes: rootfs.py merges layers from these.
A compressed layer's table is built by the pass that builds its index (``LayerScan`` reads the
pass's stream forward): one decompression for both.
"""

from __future__ import annotations

import base64
import enum
import io
import json
import logging
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .entries import Skipped
from .errors import InvalidDocument, LayoutOpenError, NotAnArchive
from .model import load_value
from .source import Source, SourceFile, sniff
from .store import LAYER_TABLE, Store, load_or_build
from .streams import Forward
from .tarscan import BLOCK, NAME_MAX, PlainMember, TarFile, header_mtime, is_root, normalize, refusal, walk

log = logging.getLogger(__name__)

# The payload's own format field (store.LAYER_TABLE's version is the one to bump): kept at 1 so
# that tables stored before the registry of kinds still load.
TABLE_FORMAT = 1

# Members a stored table encodes at once (to_bytes).
TO_BYTES_ROWS = 10_000
# How much of a compressed layer the scan reads at once (30,000 small files: ~0.75 -> ~0.45 s a layer).
COMPRESSED_READ_AHEAD = 256 << 10
# PAX extended attributes as GNU tar, bsdtar, Go's archive/tar and umoci write them.
XATTR_PREFIX = "SCHILY.xattr."
# xattr(7) limits: the longest name and the largest value the kernel holds.
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 1 << 16
# Owners a Linux stat can carry (uid_t is 32 bits; (uid_t)-1 means "no change", never an owner).
MAX_ID = 2**32 - 2
# Device numbers the kernel's stat can carry through FUSE (new_encode_dev: 12-bit major, 20-bit minor).
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1


class Type(enum.Enum):
    """What a layer member is (the tar typeflag, POSIX.1-2001 ustar)."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


_TYPES = {
    tarfile.REGTYPE: Type.FILE,
    tarfile.AREGTYPE: Type.FILE,
    tarfile.CONTTYPE: Type.FILE,
    tarfile.DIRTYPE: Type.DIR,
    tarfile.SYMTYPE: Type.SYMLINK,
    tarfile.LNKTYPE: Type.HARDLINK,
    tarfile.CHRTYPE: Type.CHAR,
    tarfile.BLKTYPE: Type.BLOCK,
    tarfile.FIFOTYPE: Type.FIFO,
}


# Each Type's stored value, and the Type of each value (a dict look-up, not the enum's machinery).
_TYPE_VALUES = {t: t.value for t in Type}
_TYPE_OF = {t.value: t for t in Type}


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a layer tar, as the headers describe it.

    ``name`` is normalized ("" for the layer's root, ``.`` or ``./``); ``linkname`` is a symlink's
    target exactly as stored, or a hardlink's target normalized; ``offset`` is where a file's
    data starts in the layer's (uncompressed) stream.
    """

    name: str
    type: Type
    mode: int  # permission bits with setuid, setgid and sticky (mode & 0o7777)
    uid: int
    gid: int
    mtime: int
    offset: int = 0
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


# A member as a builder other than the scan gives it (LayerTable.of_fields): its name as stored,
# type, mode, uid, gid, mtime, data offset, size, link name, device major and minor, and a TarInfo
# holding its PAX SCHILY.xattr.* records (None: it has none).
Fields = tuple[str, Type, int, int, int, int, int, int, str, int, int, "tarfile.TarInfo | None"]


class LayerTable:
    """Every member of one layer tar in archive order, plus what was skipped and why."""

    def __init__(self, members: list[Member], skipped: list[Skipped], end: int) -> None:
        self.members = members
        self.skipped = skipped
        self.end = end

    @classmethod
    def scan(cls, source: Source, name: str) -> LayerTable:
        """Read every header of the layer tar in ``source``; ``name`` names the layer in errors.

        Accepts what Go's archive/tar accepts (no end-of-archive blocks, a last member's padding
        cut short, an empty stream). Raises NotAnArchive or TruncatedArchive.
        """
        # A decompressing source costs a seek per read: read ahead far enough to take the headers of
        # many small members at once (a plain source: a pread per few headers is cheapest).
        buffer = BLOCK * 16 if source.compression == "plain" else COMPRESSED_READ_AHEAD
        with io.BufferedReader(SourceFile(source), buffer) as f:
            return cls._walk(f, name, source.size)

    @classmethod
    def _walk(cls, f: TarFile, name: str, size: int | None) -> LayerTable:
        """The table of the layer tar in ``f`` (``size`` bytes; None: a pass's stream, read forward)."""
        kind = sniff(f.read(6))
        if kind is not None:
            raise NotAnArchive(name, f"{kind}-compressed data where an uncompressed tar layer was expected")
        builder = _LayerBuilder()
        end = walk(f, name, size, builder.add, layer=True, plain=builder.add_plain)
        return cls(builder.members, builder.skipped, end)

    @classmethod
    def of_fields(cls, rows: Iterable[Fields], end: int) -> LayerTable:
        """The table of members described field by field by something other than tar headers (a
        zstd:chunked TOC: no TarInfo made for each), through the same policy as a scan; ``end``:
        the stream's size."""
        builder = _LayerBuilder()
        add = builder._add
        for row in rows:
            add(*row)
        return cls(builder.members, builder.skipped, end)

    @classmethod
    def load_or_scan(
        cls,
        source: Source,
        name: str,
        *,
        key: str | None,
        cache: Store | None,
        scanned: LayerScan | None = None,
    ) -> LayerTable:
        """The table from the store (``key``: the layer's digest), else scanned and stored.

        ``scanned``: the table as the first pass over the layer built it (LayerScan), if it did:
        then the layer is not scanned again. A stored table is used only if it parses, names a
        stream of exactly ``source.size`` bytes and keeps every member inside it; anything else is
        logged and the layer scanned again.
        """
        return load_or_build(
            cache,
            LAYER_TABLE,
            key,
            name=name,
            decode=lambda payload: cls.from_bytes(payload, source.size),
            build=lambda: cls.scan(source, name) if scanned is None else scanned.result(),
            encode=lambda table: table.to_bytes(source.size),
        )

    def to_bytes(self, size: int) -> bytes:
        """The table as the cache stores it (JSON), for a layer stream of ``size`` bytes.

        The members are encoded TO_BYTES_ROWS at a time: a layer of 300,000 files makes no list of
        300,000 lists at once (the document is the one ``json.dumps`` would write of them all).
        """
        doc = {
            "format": TABLE_FORMAT,
            "size": size,
            "end": self.end,
            "members": [],
            "skipped": [[s.name, s.reason] for s in self.skipped],
        }
        head, tail = json.dumps(doc, separators=(",", ":")).split('"members":[]', 1)
        parts = [head, '"members":[']
        value = _TYPE_VALUES.__getitem__  # (an enum's .value is a slow property)
        none: list[list[str]] = []
        for at in range(0, len(self.members), TO_BYTES_ROWS):
            rows = [
                [m.name, value(m.type), m.mode, m.uid, m.gid, m.mtime, m.offset, m.size, m.linkname,
                 m.devmajor, m.devminor, [[_b64(k), _b64(v)] for k, v in m.xattrs] if m.xattrs else none]
                for m in self.members[at : at + TO_BYTES_ROWS]
            ]  # fmt: skip
            parts.append(("," if at else "") + json.dumps(rows, separators=(",", ":"))[1:-1])
        parts += ["]", tail]
        return "".join(parts).encode()

    @classmethod
    def from_bytes(cls, payload: bytes, size: int) -> LayerTable:
        """A table from ``to_bytes``; ValueError (or TypeError, ...) when it is not one for ``size`` bytes."""
        try:
            doc: Any = load_value("cached layer table", payload)
        except InvalidDocument as e:
            raise ValueError(e.reason) from e
        if doc["format"] != TABLE_FORMAT or doc["size"] != size or not 0 <= doc["end"] <= size:
            raise ValueError("for another format or another stream")
        members = []
        for row in doc["members"]:
            name, kind, mode, uid, gid, mtime, offset, length, linkname, major, minor, xattrs = row
            mode | uid | gid | mtime | offset | length | major | minor  # noqa: B018  TypeError unless ints
            if type(name) is not str or type(linkname) is not str:
                raise ValueError("a member of the wrong shape")
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError(f"member {name!r} lies outside the layer")
            if (name and normalize(name) != name) or (
                kind == Type.HARDLINK.value and normalize(linkname) != linkname
            ):
                raise ValueError(f"member {name!r} has a name the scan refuses")
            pairs = (
                tuple(
                    (base64.b64decode(k, validate=True), base64.b64decode(v, validate=True))
                    for k, v in xattrs
                )
                if xattrs
                else ()
            )
            members.append(
                Member(
                    name, _TYPE_OF[kind], mode, uid, gid, mtime, offset, length, linkname, major, minor, pairs
                )
            )
        skipped = [Skipped(str(n), str(r)) for n, r in doc["skipped"]]
        return cls(members, skipped, doc["end"])


class LayerScan:
    """A layer's table built from a first pass's stream as it decompresses (a streams.Consumer).

    Given to compressed.open_decompressed: the pass that builds the layer's index walks its tar
    headers too, and the layer is not decompressed a second time to scan it. The table is what
    LayerTable.scan gives; a tar the scan refuses is kept as the error ``result`` raises (the
    pass itself goes on: the stream's own checks and the diff_id come first, as they do when
    the layer is scanned after its pass). ``ran``: whether a pass ran it (not for a stored index).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ran = False
        self._table: LayerTable | None = None
        self._error: LayoutOpenError | None = None

    def __call__(self, stream: Forward) -> None:
        self.ran = True
        self._table, self._error = None, None  # a pass may start over: each run starts from byte 0
        try:
            self._table = LayerTable._walk(stream, self.name, None)
        except LayoutOpenError as e:  # NotAnArchive, TruncatedArchive; the pass's own errors win
            self._error = e

    def result(self) -> LayerTable:
        """The table; raises the scan's refusal of the tar (NotAnArchive, TruncatedArchive)."""
        if self._error is not None:
            raise self._error
        assert self._table is not None, "LayerScan.result before a pass ran it"
        return self._table


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    """A member's PAX ``SCHILY.xattr.*`` attributes that Linux can hold; the others dropped, logged.

    xattr(7): a name is at most XATTR_NAME_MAX (255) bytes and cannot hold a NUL (listxattr
    separates names with NUL: one would read as two), a value at most XATTR_SIZE_MAX (64 KiB).
    """
    out = []
    for key, value in info.pax_headers.items():
        if not key.startswith(XATTR_PREFIX) or len(key) == len(XATTR_PREFIX):
            continue
        name = key[len(XATTR_PREFIX) :].encode("utf-8", "surrogateescape")
        data = value.encode("utf-8", "surrogateescape")
        if b"\0" in name or len(name) > XATTR_NAME_MAX or len(data) > XATTR_SIZE_MAX:
            log.warning("%s: xattr %r not served (a name or size Linux cannot hold)", info.name, name)
            continue
        out.append((name, data))
    return tuple(out)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _LayerBuilder:
    """Turns each TarInfo into a Member, or a Skipped note saying why it is not served."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.skipped: list[Skipped] = []
        self._modes: dict[int, int] = {}

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(Skipped(name, reason))

    def add(self, info: tarfile.TarInfo) -> None:
        """Record one member, or why it is skipped."""
        kind = _TYPES.get(info.type)
        if kind is None or info.sparse is not None:
            what = "GNU sparse member" if info.sparse is not None else f"member of tar type {info.type!r}"
            self.skip(info.name, f"{what} (not supported)")
            return
        self._add(
            info.name, kind, info.mode, info.uid, info.gid, header_mtime(info), info.offset_data, info.size,
            info.linkname, info.devmajor, info.devminor, info,
        )  # fmt: skip

    def add_plain(self, run: list[PlainMember]) -> None:
        """Record a run of plain members (tarscan's ``_plain_run``: no PAX, no xattrs), as ``add`` would.

        A file or directory with a plain name (``plain_name``) and owners in range is recorded here
        with no call but its Member's; anything else goes through ``_add``.
        """
        append, modes = self.members.append, self._modes
        for m in run:
            name, kind, uid, gid = m[0], m[1], m[6], m[7]
            if (
                (kind == b"0" or kind == b"5")
                and name[:1] not in ("", ".", "/")  # plain_name, inline
                and "/." not in name
                and "//" not in name
                and name[-1] != "/"
                and len(name) <= NAME_MAX
                and name.isascii()  # no NUL: the run cut the name at its first
                and 0 <= uid <= MAX_ID
                and 0 <= gid <= MAX_ID
            ):
                mode = modes.get(m[5])
                if mode is None:
                    mode = modes[m[5]] = m[5] & 0o7777  # one int object per mode (0o644 is no small int)
                if kind == b"0":
                    append(Member(name, Type.FILE, mode, uid, gid, m[4], m[2], m[3]))
                else:
                    append(Member(name, Type.DIR, mode, uid, gid, m[4]))
                continue
            self._add(
                name, _TYPES[kind], m.mode, uid, gid, m.mtime, m.offset_data, m.size,
                m.linkname, m.devmajor, m.devminor, None,
            )  # fmt: skip

    def _add(
        self, raw: str, kind: Type, mode: int, uid: int, gid: int, mtime: int, offset: int, size: int,
        linkname: str, devmajor: int, devminor: int, info: tarfile.TarInfo | None,
    ) -> None:  # fmt: skip
        """Record one member (``info``: its PAX headers' xattrs, if it has any), or why it is skipped."""
        name = normalize(raw)
        if name is None:
            if not is_root(raw):
                self.skip(raw, refusal(raw))
                return
            if kind is not Type.DIR:
                self.skip(raw, "the layer's root is not a directory")
                return
            name = ""
        if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
            self.skip(raw, f"owner {uid}:{gid} out of range")
            return
        if kind is Type.HARDLINK:
            target = normalize(linkname)
            if target is None:
                self.skip(raw, f"hardlink to {linkname!r}: {refusal(linkname)}")
                return
            linkname = target
        elif kind is Type.SYMLINK:
            if not linkname or "\0" in linkname:
                self.skip(raw, "symlink with an empty target or a NUL byte in it")
                return
        elif kind in (Type.CHAR, Type.BLOCK) and not (
            0 <= devmajor <= MAX_MAJOR and 0 <= devminor <= MAX_MINOR
        ):
            self.skip(raw, f"device {devmajor}:{devminor} out of range")
            return
        device = kind in (Type.CHAR, Type.BLOCK)
        xattrs = _xattrs(info) if info is not None else ()
        self.members.append(
            Member(
                name,
                kind,
                mode & 0o7777,
                uid,
                gid,
                mtime,
                offset if kind is Type.FILE else 0,
                size if kind is Type.FILE else 0,
                linkname if kind in (Type.SYMLINK, Type.HARDLINK) else "",
                devmajor if device else 0,
                devminor if device else 0,
                xattrs,
            )
        )
