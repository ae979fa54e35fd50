"""A zstd:chunked or eStargz layer from its table of contents alone: the layer's table, and its files.

containers/storage ``pkg/chunked`` (podman ``push --compression-format zstd:chunked``) writes
each file's data as zstd frames of their own (one per content-defined chunk), followed by a TOC:
a zstd-compressed JSON document in a skippable frame (RFC 8878 3.1.2) listing every member with
its metadata, its sha256 and where its frames lie in the blob. The layer descriptor's annotations
say where the TOC is and what it hashes to; the manifest is digest-checked, so a TOC that hashes
to the annotation is the image author's. From it the layer's table is built without reading or
decompressing anything else, and a file's bytes are its own frames, decompressed on demand and
checked against the TOC's digest for the file on its first read. eStargz (stargz-snapshotter,
``ctr-remote image convert --estargz``) is the same idea in gzip: each chunk starts a gzip member,
and the TOC (``stargz.index.json``, in a tar in the last member but the footer) is located by a
51-byte footer and checked against the ``containerd.io/snapshot/stargz/toc.digest`` annotation.

The members' offsets are in a stream of this module's own: every file's bytes one after the
other, in TOC order (not the tar stream's offsets, which only a full pass knows); ``TocLayer``
serves that stream. Which layers are read this way, and the diff_id policy, is image.py's.
"""

from __future__ import annotations

import bisect
import calendar
import functools
import io
import itertools
import json
import logging
import re
import struct
import tarfile
import threading
import zlib
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .digest import Digest
from .errors import FileMismatch, InvalidDigest, LayerError
from .layer import Fields, LayerTable, Type
from .readers import kept_frames
from .source import Source
from .store import Stale
from .tarscan import header_mtime
from .zstdsource import ZSTD_FRAME_INPLACE, ZSTD_WINDOW_LOG_MAX

log = logging.getLogger(__name__)

# The layer annotations (containers/storage pkg/chunked/internal/minimal/compression.go): the
# sha256 of the compressed TOC, and "offset:length:uncompressedLength:type" of the TOC's frame
# content. containers/storage before 1.45 (podman 4.x) wrote them without "github.".
CHECKSUM_KEYS = (
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
)
POSITION_KEYS = (
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
)
MANIFEST_TYPE_CRFS = 1  # the only TOC type (minimal.ManifestTypeCRFS)
# containers/storage's own bound (compression_linux.go maxTocSize), compressed and uncompressed.
MAX_TOC = 150 << 20
# RFC 8878 3.1.2: a skippable frame's magic (0x184D2A50, little endian) and 4-byte size.
SKIPPABLE = b"\x50\x2a\x4d\x18"
# The footer: a last skippable frame ending with this magic, holding (little endian u64) the TOC's
# offset, compressed and uncompressed lengths and type, then (64-byte form) the tar-split's three.
FOOTER_MAGIC = b"GnUlInUx"
MAP_FORMAT = 1  # TocLayer.to_bytes's own format field (store.TOC_MAP's version is the one to bump)
# eStargz (stargz-snapshotter docs/estargz.md): the layer annotation with the sha256 of the TOC
# JSON, the footer's size, and the TOC's name in the tar of its gzip member.
ESTARGZ_KEY = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_FOOTER = 51
ESTARGZ_TOC = "stargz.index.json"
FOOTER_SIZES = (64, 40)
# The TOC's member types (pkg/chunked/internal/minimal): what a tar typeflag each is.
_TYPES = {
    "reg": Type.FILE,
    "dir": Type.DIR,
    "symlink": Type.SYMLINK,
    "hardlink": Type.HARDLINK,
    "char": Type.CHAR,
    "block": Type.BLOCK,
    "fifo": Type.FIFO,
}
# Go's RFC 3339 times (encoding/json of time.Time); Go's zero time is "no time" (0).
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)")
_GO_ZERO = -62135596800


class Unusable(Exception):
    """A TOC that cannot be used (malformed, oversized, inconsistent): the layer takes the full pass."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    """Where the annotations say the TOC is, and what its compressed bytes hash to."""

    checksum: Digest
    offset: int
    length: int
    uncompressed: int


def position(annotations: Mapping[str, str]) -> Position | None:
    """The TOC's position from a layer descriptor's annotations; None without them.

    Raises Unusable for annotations that are there but cannot be used.
    """
    checksum = next((annotations[k] for k in CHECKSUM_KEYS if k in annotations), None)
    where = next((annotations[k] for k in POSITION_KEYS if k in annotations), None)
    if checksum is None and where is None:
        return None
    if checksum is None or where is None:
        raise Unusable("one of the two zstd:chunked annotations is missing")
    digest = _digest("manifest-checksum", checksum)
    fields = where.split(":")
    if len(fields) != 4 or not all(f.isascii() and f.isdigit() for f in fields):
        raise Unusable(f"manifest-position {where!r} is not offset:length:uncompressed:type")
    offset, length, uncompressed, kind = map(int, fields)
    if kind != MANIFEST_TYPE_CRFS:
        raise Unusable(f"TOC of type {kind}")
    if length > MAX_TOC or uncompressed > MAX_TOC:
        raise Unusable(f"a TOC of {max(length, uncompressed)} bytes (at most {MAX_TOC})")
    return Position(checksum=digest, offset=offset, length=length, uncompressed=uncompressed)


def _decompress(data: bytes, size: int) -> bytes:
    """Exactly ``size`` bytes from the zstd frames in ``data``; never more (a bomb stops there).

    Raises ValueError when the frames are damaged or hold another number of bytes.
    """
    import pyzstd

    decompressor = pyzstd.EndlessZstdDecompressor(
        option={pyzstd.DParameter.windowLogMax: ZSTD_WINDOW_LOG_MAX}
    )
    try:
        out = decompressor.decompress(data, max_length=size + 1)
    except pyzstd.ZstdError as e:
        raise ValueError(str(e)) from e
    if len(out) != size or not decompressor.at_frame_edge:
        raise ValueError(f"frames that do not hold {size} bytes")
    return out


def _gunzip(data: bytes, skip: int, size: int) -> bytes:
    """``size`` bytes after the first ``skip`` of the gzip member that opens ``data`` (what follows
    in the member, and after it, is not read); ValueError when damaged or shorter."""
    decompressor = zlib.decompressobj(31)  # RFC 1952: a gzip header and trailer
    try:
        out = decompressor.decompress(data, skip + size)
    except zlib.error as e:
        raise ValueError(str(e)) from e
    if len(out) != skip + size:
        raise ValueError(f"a member that does not hold {skip + size} bytes")
    return out[skip:]


def _mtime(value: object) -> int:
    """Seconds since the epoch of a Go RFC 3339 time; 0 for none (Go's zero time)."""
    if value is None:
        return 0
    if not isinstance(value, str):
        raise Unusable(f"modtime {value!r}")
    return _seconds(value)


@functools.lru_cache(maxsize=4096)  # a layer's files share a few times (a build's, or the epoch)
def _seconds(value: str) -> int:
    if (m := _TIME.fullmatch(value)) is None:
        raise Unusable(f"modtime {value!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError) as e:
        raise Unusable(f"modtime {value!r}") from e
    zone = m.group(7)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return 0 if seconds == _GO_ZERO else seconds


def _text(value: object) -> str:
    """A name from the TOC, which must be a string a path can hold: JSON can spell a lone UTF-16
    surrogate (``"\\ud800"``) that no file name is (tar names hold raw bytes as \\udc80-\\udcff)."""
    if not isinstance(value, str):
        raise Unusable(f"a name that is not a string: {value!r}")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise Unusable(f"a name that is no path: {value!r}") from e
    return value


def _int(entry: Mapping[str, Any], key: str) -> int:
    value = entry.get(key, 0)
    if type(value) is not int or value < 0:
        raise Unusable(f"{entry.get('name')!r}: {key} {value!r}")
    return value


def _ints(entry: Mapping[str, Any], *keys: str) -> None:
    """Raise Unusable for the first of ``keys`` that is not a natural number (the slow path's message)."""
    for key in keys:
        _int(entry, key)


def _digest(name: str, value: object) -> Digest:
    """A file's TOC digest, which must be of an algorithm ocifuse hashes; Unusable otherwise."""
    try:
        digest = Digest.parse(value)
    except InvalidDigest as e:
        raise Unusable(f"{name!r}: {e}") from e
    if not digest.verifiable:
        raise Unusable(f"{name!r}: a digest of algorithm {digest.algorithm}")
    return digest


# Every file digest of a TOC at once (joined by newlines): what Digest.parse accepts of sha256,
# checked in one match rather than one parse per file (descriptor.md: sha256 is 64 lowercase hex).
_SHA256_LINES = re.compile(r"(?:sha256:[0-9a-f]{64}\n)*")


def _check_digests(names: list[str], digests: list[str]) -> None:
    """Raise Unusable unless every file's digest is one ocifuse hashes (all sha256: one match)."""
    lines = "\n".join(digests) + "\n" if digests else ""
    # 72 characters a line: no digest holds a newline of its own
    if len(lines) != 72 * len(digests) or _SHA256_LINES.fullmatch(lines) is None:
        for name, digest in zip(names, digests, strict=True):
            _digest(name, digest)  # the first that is not one (or sha512: then every one is)


class _Builder:
    """Reads TOC entries into the layer's rows (LayerTable.of_fields) and the files' chunks.

    An entry costs a few dict lookups and appends: no object per member or file (a TOC of 100,000
    entries is read before the mount is live). The files are columns, as TocLayer keeps them.
    """

    def __init__(self, data_end: int, *, gzip: bool = False) -> None:
        self.data_end = data_end  # file frames lie before the TOC's frame
        self.gzip = gzip  # eStargz: gzip members, whose ends the TOC does not give
        self.rows: list[Fields] = []
        # Each regular file with bytes: its name, first byte in the layer's stream, size, digest
        # (as the TOC spells it: checked by ``finish``, parsed on the file's first read), its
        # first chunk's index in the chunk lists and its number of chunks.
        self.names: list[str] = []
        self.starts: list[int] = []
        self.sizes: list[int] = []
        self.digests: list[str] = []
        self.firsts: list[int] = []
        self.counts: list[int] = []
        self.chunk_starts: list[int] = []  # each chunk's first byte in the layer's stream
        self.chunk_frames: list[tuple[int, int]] = []  # each chunk's frames: blob offset, end
        self.chunk_skips: list[int] = []  # bytes of the decompressed frames before the chunk's
        self.ranges: list[tuple[int, int, int]] = []  # a file's frames: begin, end, its index
        self.size = 0
        self._times: dict[str, int] = {}  # a layer's files share a few times (a build's, the epoch)

    def add(self, entry: object, chunks: Sequence[Mapping[str, Any]]) -> None:
        if type(entry) is not dict or type(name := entry.get("name")) is not str:
            raise Unusable(f"an entry that is not a member: {str(entry)[:80]!r}")
        if not name.isascii():
            _text(name)
        get = entry.get
        kind = _TYPES.get(t) if type(t := get("type")) is str else None
        if kind is None:
            raise Unusable(f"{name!r}: type {get('type')!r}")
        if chunks and kind is not Type.FILE:
            raise Unusable(f"{name!r}: chunks of a member that is not a file")
        # podman 4 writes the type bits in mode too (S_IFDIR, ...): the layer keeps mode & 0o7777.
        mode, uid, gid = get("mode", 0), get("uid", 0), get("gid", 0)
        major, minor = get("devMajor", 0), get("devMinor", 0)
        if not (
            type(mode) is int
            and type(uid) is int
            and type(gid) is int
            and type(major) is int
            and type(minor) is int
            and mode | uid | gid | major | minor >= 0  # all natural: none negative
        ):
            _ints(entry, "mode", "uid", "gid", "devMajor", "devMinor")
        modtime = get("modtime")
        if type(modtime) is str and modtime in self._times:
            mtime = self._times[modtime]
        else:
            mtime = _mtime(modtime)
            if type(modtime) is str:
                self._times[modtime] = mtime
        link = get("linkName", "")
        if type(link) is not str or not link.isascii():
            link = _text(link)
        xattrs = get("xattrs")
        pax = _pax(name, xattrs) if xattrs else None
        size = 0
        if kind is Type.FILE:
            size = get("size", 0)
            if type(size) is not int or size < 0:
                _ints(entry, "size")
        elif kind is Type.DIR and name.endswith("/"):
            name = name.rstrip("/") or name  # as tarfile reads a directory's name (normalize's fast path)
        offset = self.size
        if size:
            self._file(name, entry, chunks, size)
        self.rows.append((name, kind, mode, uid, gid, mtime, offset, size, link, major, minor, pax))

    def _file(
        self, name: str, entry: Mapping[str, Any], chunks: Sequence[Mapping[str, Any]], size: int
    ) -> None:
        digest: str = entry.get("digest")  # type: ignore[assignment]  # checked here, then by finish
        if type(digest) is not str:
            _digest(name, digest)  # raises
        if self.gzip:
            self._gzip_file(name, entry, chunks, size, digest)
            return
        begin, end = entry.get("offset", 0), entry.get("endOffset", 0)
        if type(begin) is not int or type(end) is not int or begin < 0:
            _ints(entry, "offset", "endOffset")
        if not begin < end <= self.data_end:
            raise Unusable(f"{name!r}: frames at {begin}..{end}, outside the blob's data")
        if not chunks:  # one chunk: the file's frames (the common case, taken fast)
            if size > ZSTD_FRAME_INPLACE:
                raise Unusable(f"{name!r}: a chunk over {ZSTD_FRAME_INPLACE} bytes")
            self.ranges.append((begin, end, len(self.names)))
            self.names.append(name)
            self.starts.append(self.size)
            self.sizes.append(size)
            self.digests.append(digest)
            self.firsts.append(len(self.chunk_starts))
            self.counts.append(1)
            self.chunk_starts.append(self.size)
            self.chunk_frames.append((begin, end))
            self.chunk_skips.append(0)
            self.size += size
            return
        # The file's chunks: the entry itself is the first (it carries the first chunk's
        # chunkSize), each TOC "chunk" entry the next; a chunk's frames end where the next
        # chunk's start, the last one's at the file's endOffset.
        starts = [0] + [_int(c, "chunkOffset") for c in chunks]
        offsets = [begin] + [_int(c, "offset") for c in chunks]
        sizes = [_int(entry, "chunkSize")] + [_int(c, "chunkSize") for c in chunks]
        if any(s + n != t for s, n, t in zip(starts, sizes, [*starts[1:], size], strict=True)):
            raise Unusable(f"{name!r}: chunks that do not tile its {size} bytes")
        offsets.append(end)
        if any(a >= b for a, b in itertools.pairwise(offsets)):
            raise Unusable(f"{name!r}: chunk frames out of order")
        ends = [*starts[1:], size]
        if any(b - a > ZSTD_FRAME_INPLACE for a, b in zip(starts, ends, strict=True)):
            raise Unusable(f"{name!r}: a chunk over {ZSTD_FRAME_INPLACE} bytes")
        self.ranges.append((begin, end, len(self.names)))
        frames = [(a, b, 0) for a, b in itertools.pairwise(offsets)]
        self.add_chunks(name, digest, size, frames, starts)

    def _gzip_file(
        self, name: str, entry: Mapping[str, Any], chunks: Sequence[Mapping[str, Any]], size: int, digest: str
    ) -> None:
        """An eStargz file (stargz-snapshotter docs/estargz.md): each chunk starts a gzip member at
        ``offset`` (``innerOffset`` bytes into it, when several share one); ``chunkSize`` 0 is
        "to the file's end". Where a member ends is known only once every offset is (``finish``)."""
        starts = [0] + [_int(c, "chunkOffset") for c in chunks]
        ends = [*starts[1:], size]
        sizes = [_int(entry, "chunkSize")] + [_int(c, "chunkSize") for c in chunks]
        sizes = [n or e - s for s, n, e in zip(starts, sizes, ends, strict=True)]
        if any(s + n != e or n <= 0 for s, n, e in zip(starts, sizes, ends, strict=True)):
            raise Unusable(f"{name!r}: chunks that do not tile its {size} bytes")
        if max(sizes) > ZSTD_FRAME_INPLACE:
            raise Unusable(f"{name!r}: a chunk over {ZSTD_FRAME_INPLACE} bytes")
        entries = [entry, *chunks]
        offsets = [_int(e, "offset") for e in entries]
        if not all(0 <= o < self.data_end for o in offsets):
            raise Unusable(f"{name!r}: chunks outside the blob's data")
        self.add_chunks(
            name,
            digest,
            size,
            [(o, -1, _int(e, "innerOffset")) for o, e in zip(offsets, entries, strict=True)],
            starts,
        )

    def add_chunks(
        self, name: str, digest: str, size: int, frames: list[tuple[int, int, int]], starts: list[int]
    ) -> None:
        """A file of ``size`` bytes whose chunks start at ``starts`` in it, each in the frames
        (blob offset, end or -1 until ``finish``, bytes to skip) of ``frames``."""
        self.names.append(name)
        self.starts.append(self.size)
        self.sizes.append(size)
        self.digests.append(digest)
        self.firsts.append(len(self.chunk_starts))
        self.counts.append(len(starts))
        self.chunk_starts.extend(self.size + s for s in starts)
        self.chunk_frames.extend((begin, end) for begin, end, _ in frames)
        self.chunk_skips.extend(skip for _, _, skip in frames)
        self.size += size

    def finish(self) -> None:
        """Every file's digest one ocifuse hashes; eStargz: each chunk's member ends at the next
        member's start (or the TOC's); zstd:chunked: no two files' frames overlap in the blob (each
        file's data is its own frames)."""
        _check_digests(self.names, self.digests)
        if self.gzip:
            starts = sorted({begin for begin, end in self.chunk_frames if end < 0} | {self.data_end})
            self.chunk_frames = [
                (begin, starts[bisect.bisect_right(starts, begin)] if end < 0 else end)
                for begin, end in self.chunk_frames
            ]
            return
        self.ranges.sort()
        for (_, end, a), (begin, _, b) in itertools.pairwise(self.ranges):
            if begin < end:
                raise Unusable(f"the frames of {self.names[a]!r} and {self.names[b]!r} overlap")


def _pax(name: str, xattrs: object) -> tarfile.TarInfo:
    """A member's TOC xattrs (base64 values) as tarfile holds PAX ``SCHILY.xattr.*`` records, for
    the layer's policy (layer._xattrs: what Linux can hold)."""
    if not isinstance(xattrs, dict):
        raise Unusable(f"{name!r}: xattrs {xattrs!r}")
    pax = {}
    for key, value in xattrs.items():
        try:
            data = _b64decode(value)
        except ValueError as e:
            raise Unusable(f"{name!r}: xattr {key!r} is not base64") from e
        # As tarfile holds a PAX record's value: str, bytes kept through surrogateescape.
        pax[f"SCHILY.xattr.{_text(key)}"] = data.decode("utf-8", "surrogateescape")
    info = tarfile.TarInfo(name)
    info.pax_headers = pax
    return info


def _b64decode(value: object) -> bytes:
    import base64
    import binascii

    if not isinstance(value, str):
        raise ValueError("not a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from e


def _entries(doc: object) -> Iterator[tuple[object, Sequence[Mapping[str, Any]]]]:
    """Each member of the TOC with the "chunk" entries that follow it (its file's later chunks)."""
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("entries"), list):
        raise Unusable("not a version 1 TOC")
    entries = doc["entries"]
    n, i = len(entries), 0
    while i < n:
        entry = entries[i]
        i += 1
        if type(entry) is dict and entry.get("type") == "chunk":
            raise Unusable(f"a chunk of {entry.get('name')!r} that follows no file of that name")
        j = i
        while j < n and type(chunk := entries[j]) is dict and chunk.get("type") == "chunk":
            if type(entry) is not dict or chunk.get("name") != entry.get("name"):
                raise Unusable(f"a chunk of {chunk.get('name')!r} that follows no file of that name")
            j += 1
        yield entry, entries[i:j] if j > i else ()
        i = j


class TocLayer(Source):
    """A zstd:chunked layer's files, one after the other, each read from its own frames.

    The first read of a file decompresses and hashes all of it against the TOC's digest; the
    verdict is kept: a file that does not match answers every read with FileMismatch (EIO),
    logged once, and the layer's other files are served. Decoded chunks are kept with the other
    zstd frames (readers.kept_frames).
    """

    compression = "zstd"

    def __init__(self, raw: Source, name: str, builder: _Builder) -> None:
        self.raw = raw
        self.name = name
        self.size = builder.size
        self._names = builder.names
        self._file_starts = builder.starts
        self._file_sizes = builder.sizes
        self._digests = builder.digests  # checked by the builder (or from_bytes); parsed on first read
        self._firsts = builder.firsts
        self._counts = builder.counts
        self._chunk_starts = builder.chunk_starts
        self._chunk_frames = builder.chunk_frames
        self._chunk_skips = builder.chunk_skips
        self._gzip = builder.gzip
        self.compression = "gzip" if builder.gzip else "zstd"
        self._verdicts = bytearray(len(builder.names))  # 0 not read yet, 1 matches, 2 does not
        self._lock = threading.Lock()
        self._id = next(_ids)

    def _chunk(self, i: int) -> bytes:
        data = kept_frames.get(self._id, i)
        if data is not None:
            return data
        begin, end = self._chunk_frames[i]
        start = self._chunk_starts[i]
        stop = self._chunk_starts[i + 1] if i + 1 < len(self._chunk_starts) else self.size
        f = bisect.bisect_right(self._file_starts, start) - 1  # files tile the stream
        comp = self.raw.pread(begin, end - begin)
        try:
            if len(comp) != end - begin:
                raise ValueError("the blob ends inside its frames")
            if self._gzip:
                data = _gunzip(comp, self._chunk_skips[i], stop - start)
            else:
                data = _decompress(comp, stop - start)
        except ValueError as e:
            kind = "gzip member" if self._gzip else "zstd frames"
            raise FileMismatch(self.name, self._names[f], f"its {kind} at {begin}..{end}: {e}") from e
        kept_frames.put(self._id, i, data)
        return data

    def _check(self, f: int) -> None:
        """Hash file ``f`` against its digest on its first read; FileMismatch when it does not match."""
        verdict = self._verdicts[f]
        name = self._names[f]
        if verdict == 0:
            digest = Digest.parse(self._digests[f])
            verifier = digest.verifier()
            first = self._firsts[f]
            try:
                for i in range(first, first + self._counts[f]):
                    verifier.update(self._chunk(i))
                found = verifier.found()
                problem = None if found == digest else f"its bytes hash to {found}, the TOC says {digest}"
            except FileMismatch as e:
                problem = str(e)
            with self._lock:
                if self._verdicts[f] == 0:
                    self._verdicts[f] = 1 if problem is None else 2
                    if problem is not None:
                        log.error(
                            "%s: %r does not match its TOC (%s); its reads fail with EIO",
                            self.name,
                            name,
                            problem,
                        )
            verdict = self._verdicts[f]
        if verdict == 2:
            raise FileMismatch(self.name, name, "its bytes do not match the TOC's digest for it")

    def _read(self, offset: int, size: int, cached: bool) -> bytes | None:
        parts = []
        i = bisect.bisect_right(self._chunk_starts, offset) - 1
        f = -1
        while size > 0:
            at = self._chunk_starts[i]
            g = bisect.bisect_right(self._file_starts, at) - 1
            if g != f:
                f = g
                if cached and self._verdicts[f] != 1:
                    return None
                self._check(f)
            data = kept_frames.get(self._id, i) if cached else self._chunk(i)
            if data is None:
                return None
            piece = data[offset - at : offset - at + size]
            parts.append(piece)
            offset += len(piece)
            size -= len(piece)
            i += 1
        return b"".join(parts)

    def pread(self, offset: int, size: int) -> bytes:
        size = self.clip(offset, size)
        data = self._read(offset, size, cached=False) if size else b""
        assert data is not None
        return data

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        """From chunks already decoded of files already verified, else None."""
        size = self.clip(offset, size)
        data = self._read(offset, size, cached=True) if size else b""
        return None if data is None else bytearray(data)

    def close(self) -> None:
        kept_frames.drop(self._id)

    def to_bytes(self) -> bytes:
        """Where each file lies, as the index cache keeps it (TOC_MAP): a cached mount reads a file
        of the layer without parsing its TOC again."""
        head = {"format": MAP_FORMAT, "size": self.size, "blob": self.raw.size, "gzip": self._gzip}
        columns = [
            self._file_starts,
            self._file_sizes,
            self._firsts,
            self._counts,
            self._chunk_starts,
            [begin for begin, _ in self._chunk_frames],
            [end for _, end in self._chunk_frames],
            self._chunk_skips,
        ]
        parts = [
            json.dumps(head).encode(),
            "\0".join(self._names).encode("utf-8", "surrogateescape"),
            "\n".join(self._digests).encode(),
            *(array("Q", c).tobytes() for c in columns),
        ]
        return b"".join(struct.pack("<Q", len(p)) + p for p in parts)

    @classmethod
    def from_bytes(cls, payload: bytes, raw: Source, name: str) -> TocLayer:
        """A map from ``to_bytes`` for the blob ``raw``; ValueError (Stale: another blob) when it is
        not one, or does not keep every file and chunk inside the stream and the blob."""
        parts, at = [], 0
        while at < len(payload):
            (n,) = struct.unpack_from("<Q", payload, at)
            parts.append(payload[at + 8 : at + 8 + n])
            at += 8 + n
        if len(parts) != 11 or at != len(payload):
            raise ValueError("not a TOC map")
        head = json.loads(parts[0])
        if head["format"] != MAP_FORMAT or head["blob"] != raw.size:
            raise Stale("for another blob or format")
        size, gzip = head["size"], head["gzip"]
        if type(size) is not int or type(gzip) is not bool:
            raise ValueError("a head of the wrong shape")
        columns = []
        for part in parts[3:]:
            column = array("Q")
            column.frombytes(part)
            columns.append(column.tolist())
        starts, sizes, firsts, counts, chunk_starts, begins, ends, skips = columns
        names = parts[1].decode("utf-8", "surrogateescape").split("\0") if parts[1] else []
        digests = parts[2].decode().split("\n") if parts[2] else []
        nfiles, nchunks = len(starts), len(chunk_starts)
        if {len(sizes), len(firsts), len(counts), len(names), len(digests)} != {nfiles}:
            raise ValueError("files of the wrong shape")
        if {len(begins), len(ends), len(skips)} != {nchunks}:
            raise ValueError("chunks of the wrong shape")
        builder = _Builder(raw.size, gzip=gzip)
        for i in range(nfiles):
            first, count, start, length = firsts[i], counts[i], starts[i], sizes[i]
            if start != builder.size or length <= 0 or first != len(builder.chunk_starts) or count <= 0:
                raise ValueError(f"file {names[i]!r} does not follow the one before")
            within = chunk_starts[first : first + count]
            if (
                len(within) != count
                or within[0] != start
                or within != sorted(within)
                or within[-1] >= start + length
            ):
                raise ValueError(f"file {names[i]!r}: chunks outside it")
            if not all(0 <= begins[j] < ends[j] <= raw.size for j in range(first, first + count)):
                raise ValueError(f"file {names[i]!r}: frames outside the blob")
            builder.chunk_starts.extend(within)
            builder.size += length
        if builder.size != size or len(builder.chunk_starts) != nchunks:
            raise ValueError("files that do not make the stream")
        try:
            _check_digests(names, digests)
        except Unusable as e:
            raise ValueError(str(e)) from e
        builder.names, builder.starts, builder.sizes, builder.digests = names, starts, sizes, digests
        builder.firsts, builder.counts = firsts, counts
        builder.chunk_frames = list(zip(begins, ends, strict=True))
        builder.chunk_skips = skips
        return cls(raw, name, builder)


_ids = itertools.count(1 << 40)  # apart from zstdsource's ids in kept_frames


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    """A layer served from its TOC: the source of its files' bytes and its table."""

    source: TocLayer
    table: LayerTable
    entries: int


def open_toc(raw: Source, annotations: Mapping[str, str], what: str) -> Opened | None:
    """The layer from its zstd:chunked or eStargz TOC; None when it has none or it cannot be used
    (logged).

    Reads the footer and the TOC only. Raises LayerError when the TOC does not hash to the
    manifest's annotation for it (the image is not what its manifest says: refused).
    """
    try:
        return read_toc(raw, annotations, what)
    except Unusable as e:
        log.warning("%s: its TOC is not used (%s): the layer is read in full", what, e)
        return None


def toc_key(annotations: Mapping[str, str], blob: str, blob_size: int) -> str | None:
    """The key of a layer's TOC map in the index cache: the TOC's digest as its annotation gives it
    (the map is made only from a TOC that hashes to it), the blob's digest and size; None without
    one. (Each file read through the map is still checked against its digest.)"""
    digest = annotations.get(ESTARGZ_KEY) or next(
        (annotations[k] for k in CHECKSUM_KEYS if k in annotations), None
    )
    return None if digest is None else f"toc:{digest}:{blob}:{blob_size}"


def read_toc(raw: Source, annotations: Mapping[str, str], what: str) -> Opened | None:
    """``open_toc``, raising Unusable (the reason) for a TOC that cannot be used."""
    stargz = annotations.get(ESTARGZ_KEY)
    where = position(annotations)
    if stargz is not None and where is not None:
        raise Unusable("both a zstd:chunked and an eStargz TOC")  # as containers/storage refuses it
    if stargz is not None:
        return _open_estargz(raw, stargz, what)
    if where is None:
        return None
    return _open(raw, where, what)


def differences(toc: Opened, table: LayerTable, stream: Source, *, block: int = 1 << 20) -> str | None:
    """The first way the layer's TOC tells other than its tar (``table``, scanned from ``stream``,
    the decompressed layer), or None when they agree: every member in the same order with the same
    metadata, and every file's bytes the same (the TOC's read from its frames, checked against its
    digests). What a lazy mount serves is then what the tar, which the diff_id covers, holds."""
    mine, theirs = toc.table.members, table.members
    if len(mine) != len(theirs):
        return f"the TOC lists {len(mine)} members, the tar holds {len(theirs)}"
    for a, b in zip(mine, theirs, strict=True):
        if replace(a, offset=0) != replace(b, offset=0):
            return f"{b.name!r}: the TOC says {replace(a, offset=0)}, the tar {replace(b, offset=0)}"
        for at in range(0, a.size, block):
            n = min(block, a.size - at)
            try:
                if toc.source.pread(a.offset + at, n) != stream.pread(b.offset + at, n):
                    return f"{a.name!r}: other bytes at {at} in the TOC's frames than in the tar"
            except FileMismatch as e:
                return str(e)
    return None


def _open(raw: Source, where: Position, what: str) -> Opened:
    # The TOC's frame: its skippable frame header (8 bytes) and content, inside the blob.
    if not 8 <= where.offset <= raw.size - where.length:
        raise Unusable(f"the TOC at {where.offset}+{where.length} lies outside the {raw.size}-byte blob")
    frame = raw.pread(where.offset - 8, where.length + 8)
    toc = frame[8:]
    if len(toc) != where.length:
        raise Unusable("the blob ends inside the TOC")
    found = Digest.of(toc, where.checksum.algorithm)
    if found != where.checksum:
        raise LayerError(
            f"{what}: its zstd:chunked TOC hashes to {found}, the manifest's annotation says {where.checksum}"
        )
    if frame[:4] != SKIPPABLE or struct.unpack("<I", frame[4:8])[0] != where.length:
        raise Unusable("the TOC is not in a skippable frame of its length")
    _check_footer(raw, where)
    try:
        doc = json.loads(_decompress(toc, where.uncompressed))
    except (ValueError, RecursionError) as e:
        raise Unusable(f"the TOC does not decompress or parse: {e}") from e
    return _build(raw, doc, _Builder(where.offset - 8), what)


def _build(
    raw: Source,
    doc: object,
    builder: _Builder,
    what: str,
    last: tuple[tarfile.TarInfo, tuple[int, int, int], Digest] | None = None,
) -> Opened:
    """The layer from a parsed TOC. ``last``: a member the TOC does not list, after its entries
    (its TarInfo, the frames of its bytes, their digest)."""
    add = builder.add
    for entry, chunks in _entries(doc):
        add(entry, chunks)
    count = len(builder.rows)
    if last is not None:
        info, frames, digest = last
        offset = builder.size
        if info.size:
            builder.add_chunks(info.name, str(digest), info.size, [frames], [0])
        builder.rows.append(
            (info.name, Type.FILE, info.mode, info.uid, info.gid, header_mtime(info), offset, info.size,
             "", 0, 0, None)
        )  # fmt: skip
    builder.finish()
    table = LayerTable.of_fields(builder.rows, builder.size)
    if table.skipped:
        first = table.skipped[0]
        raise Unusable(f"{len(table.skipped)} members the layer policy skips, {first.name!r}: {first.reason}")
    return Opened(source=TocLayer(raw, what, builder), table=table, entries=count)


def _open_estargz(raw: Source, annotation: str, what: str) -> Opened:
    """An eStargz layer (stargz-snapshotter docs/estargz.md): the footer, a gzip member whose extra
    field holds ``%016xSTARGZ`` (the TOC member's offset); the TOC member, a gzip of a tar holding
    ``stargz.index.json``, whose sha256 the annotation gives."""
    try:
        checksum = Digest.parse(annotation)
    except InvalidDigest as e:
        raise Unusable(f"toc.digest: {e}") from e
    if not checksum.verifiable:
        raise Unusable(f"toc.digest of algorithm {checksum.algorithm}")
    end = raw.size - ESTARGZ_FOOTER
    footer = raw.pread(end, ESTARGZ_FOOTER) if end > 0 else b""
    # RFC 1952 2.3.1: ID1 ID2 CM FLG(FEXTRA) ..., XLEN 26, subfield "SG" of 22 bytes.
    if (
        len(footer) != ESTARGZ_FOOTER
        or footer[:4] != b"\x1f\x8b\x08\x04"
        or footer[10:16] != b"\x1a\x00SG\x16\x00"
    ):
        raise Unusable("no eStargz footer")
    field = footer[16:38]
    if not field.endswith(b"STARGZ") or not all(c in b"0123456789abcdef" for c in field[:16]):
        raise Unusable("no eStargz footer")
    offset = int(field[:16], 16)
    if not 0 < offset < end or end - offset > MAX_TOC:
        raise Unusable(f"a TOC member at {offset} in a {raw.size}-byte blob (at most {MAX_TOC} bytes)")
    member = raw.pread(offset, end - offset)
    try:
        tar = zlib.decompressobj(31).decompress(member, MAX_TOC + 2048)  # bounded: a bomb stops there
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
            info = archive.next()
            if info is None or info.name != ESTARGZ_TOC or not info.isreg():
                raise Unusable(f"the TOC member does not open with {ESTARGZ_TOC}")
            data = tar[info.offset_data : info.offset_data + info.size]
    except (zlib.error, tarfile.TarError) as e:
        raise Unusable(f"the TOC member: {e}") from e
    if len(data) != info.size:
        raise Unusable("the TOC member is cut short")
    found = Digest.of(data, checksum.algorithm)
    if found != checksum:
        raise LayerError(
            f"{what}: its eStargz TOC hashes to {found}, the manifest's annotation says {checksum}"
        )
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise Unusable(f"the TOC does not parse: {e}") from e
    builder = _Builder(offset, gzip=True)
    # The TOC itself is the tar's last member (what a full pass, umoci or podman show): its bytes
    # are those just hashed, read again from its member when asked for.
    extra = tarfile.TarInfo(info.name)
    extra.type, extra.mode, extra.uid, extra.gid, extra.mtime = (
        info.type,
        info.mode,
        info.uid,
        info.gid,
        info.mtime,
    )
    extra.size = info.size
    return _build(raw, doc, builder, what, (extra, (offset, end, info.offset_data), checksum))


def _check_footer(raw: Source, where: Position) -> None:
    """The footer, when the blob has one, must name the same TOC as the annotations."""
    tail = raw.pread(max(0, raw.size - 72), 72)
    if not tail.endswith(FOOTER_MAGIC):
        return  # containers/storage never reads the footer: the annotations are what count
    for size in FOOTER_SIZES:
        head = tail[-size - 8 : -size]
        if len(head) == 8 and head[:4] == SKIPPABLE and struct.unpack("<I", head[4:])[0] == size:
            offset, length, uncompressed, kind = struct.unpack("<QQQQ", tail[-size : -size + 32])
            if (offset, length, uncompressed, kind) != (
                where.offset,
                where.length,
                where.uncompressed,
                MANIFEST_TYPE_CRFS,
            ):
                raise Unusable("the footer names another TOC than the annotations")
            return
    raise Unusable("a footer of an unknown size")
