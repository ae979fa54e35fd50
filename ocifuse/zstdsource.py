"""zstd (RFC 8878) at random: a frame table read in place, or a spill file for large frames.

A stream of frames each at most ZSTD_FRAME_INPLACE bytes decompressed (the seekable format's
frames, zstd:chunked's per-chunk frames, ``pzstd`` output) is read in place through a frame
table: a read decompresses only its frames. A larger frame (what ``zstd`` writes: one frame for
the whole input) cannot be entered in the middle: its bytes are decompressed once into a spill
file (spill.py).
"""

from __future__ import annotations

import bisect
import errno
import functools
import itertools
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import CompressedDataError
from .readers import kept_frames
from .source import FileRange, OpenFile, Source
from .spill import Spill
from .store import ZSTD_INDEX, Stale, load_or_build
from .streams import READ, U64, Consumer, Forward, Head, HighWater, Limits, Opening, unpack_head

log = logging.getLogger(__name__)

# The largest zstd frame (decompressed) served in place; a stream with a larger one is spilled.
ZSTD_FRAME_INPLACE = 8 << 20
# zstd's own default window limit (RFC 8878 3.1.1.1.2 lets a frame ask for up to 3.75 TiB):
# ``zstd --long`` (2^27) is read, a frame asking for more is refused, as ``zstd -d`` refuses it.
ZSTD_WINDOW_LOG_MAX = 27
_ZSTD_FRAMES_MAGIC = b"OZF1"
_ZSTD_SPILL_MAGIC = b"OZS1"
_FRAME = struct.Struct("<QQQ")  # compressed offset, compressed size, uncompressed size
_SPILL = struct.Struct("<QQ")  # the spill file's inode and mtime_ns


@functools.cache
def _zstd_option() -> dict[int, int]:
    import pyzstd

    return {int(pyzstd.DParameter.windowLogMax): ZSTD_WINDOW_LOG_MAX}


def _zstd_error(name: str, error: Exception, at: int) -> CompressedDataError:
    text = str(error)
    if "memory" in text.lower() or "window" in text.lower():
        reason = (
            f"the frame at byte {at} needs a window over 2^{ZSTD_WINDOW_LOG_MAX} bytes "
            "(zstd --long=28 or more; zstd -d refuses it too)"
        )
    elif "checksum" in text.lower():
        reason = f"checksum mismatch in the frame at byte {at}: the compressed data is damaged"
    elif "dictionary" in text.lower():
        reason = f"the frame at byte {at} needs a dictionary (not supported)"
    elif "frame descriptor" in text.lower():
        reason = f"not zstd data at byte {at} (trailing data, or a damaged frame header)"
    else:
        reason = f"damaged frame at byte {at} ({text})"
    return CompressedDataError(name, "zstd", reason)


@dataclass(frozen=True, slots=True)
class _Frames:
    """What one pass learns: the frames that hold data (compressed offset, size, uncompressed size)."""

    frames: list[tuple[int, int, int]]
    size: int
    sha256: bytes  # the stream's sha256 (all zeros when not hashed)


class _TooLargeFrame(Exception):
    """A frame larger than ZSTD_FRAME_INPLACE: the stream must be spilled instead."""


def _zstd_pass(
    raw: Source,
    name: str,
    limits: Limits,
    progress: HighWater | None,
    spill: Spill | None,
    digest: bool,
    consumer: Consumer | None,
) -> _Frames:
    """Decompress ``raw`` once, in order: the frame table, size and sha256; the bytes into ``spill``
    and to ``consumer`` as they stream.

    Without a spill, raises _TooLargeFrame at the first frame over ZSTD_FRAME_INPLACE.
    """
    frames: list[tuple[int, int, int]] = []

    def chunks() -> Iterator[bytes]:
        fed = start = frame_size = total = 0
        pending = b""
        started = False
        import pyzstd

        d = pyzstd.ZstdDecompressor(option=_zstd_option())
        while True:
            try:
                if d.needs_input:
                    if not pending:
                        pending = raw.pread(fed, READ)
                        if not pending:
                            break
                        fed += len(pending)
                        if progress is not None:
                            progress(fed)
                    data = d.decompress(pending, max_length=READ)
                    pending = b""
                    started = True
                else:
                    data = d.decompress(b"", max_length=READ)
            except pyzstd.ZstdError as e:
                raise _zstd_error(name, e, start) from e
            if data:
                frame_size += len(data)
                total += len(data)
                yield data  # counted against max_size and hashed (Forward) before what follows
                if spill is None and frame_size > ZSTD_FRAME_INPLACE:
                    raise _TooLargeFrame
                if spill is not None:
                    spill.write(data, total)
            if d.eof:  # RFC 8878 3.1: frames follow each other; a skippable frame decodes to nothing
                pending = d.unused_data
                end = fed - len(pending)
                if frame_size:
                    frames.append((start, end - start, frame_size))
                start, frame_size, started = end, 0, False
                d = pyzstd.ZstdDecompressor(option=_zstd_option())
        if started:
            raise CompressedDataError(name, "zstd", f"truncated: the frame at byte {start} is cut short")

    forward = Forward(chunks(), name=name, kind="zstd", limits=limits, digest=digest)
    forward.run(consumer)
    return _Frames(frames, forward.size, forward.sha256())


_source_ids = itertools.count()


class ZstdFrames(Source):
    """The decompressed bytes of a zstd stream of small frames: a read decompresses its frames only."""

    compression = "zstd"

    def __init__(self, raw: Source, name: str, frames: list[tuple[int, int, int]], head: Head) -> None:
        self.raw = raw
        self.name = name
        self.frames = frames
        self.head = head
        self.size = head.size
        self.uncompressed_digest = head.digest
        self._starts: list[int] = []
        at = 0
        for _, _, usize in frames:
            self._starts.append(at)
            at += usize
        self._id = next(_source_ids)  # its frames' key in kept_frames (an id() could be reused)

    def _frame(self, i: int) -> bytes:
        data = kept_frames.get(self._id, i)
        if data is not None:
            return data
        coff, csize, usize = self.frames[i]
        comp = self.raw.pread(coff, csize)
        import pyzstd

        try:
            data = pyzstd.decompress(comp, option=_zstd_option()) if len(comp) == csize else b""
        except pyzstd.ZstdError as e:
            raise _zstd_error(self.name, e, coff) from e
        if len(data) != usize:
            raise CompressedDataError(
                self.name, "zstd", f"the frame at byte {coff} no longer decompresses to {usize} bytes"
            )
        kept_frames.put(self._id, i, data)
        return data

    def _read(self, offset: int, size: int, frame: Callable[[int], bytes | None]) -> bytes | None:
        parts = []
        i = bisect.bisect_right(self._starts, offset) - 1
        while size > 0:
            data = frame(i)
            if data is None:
                return None
            piece = data[offset - self._starts[i] : offset - self._starts[i] + size]
            parts.append(piece)
            offset += len(piece)
            size -= len(piece)
            i += 1
        return b"".join(parts)

    def pread(self, offset: int, size: int) -> bytes:
        size = self.clip(offset, size)
        if size == 0:
            return b""
        data = self._read(offset, size, self._frame)
        assert data is not None
        return data

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        """From frames already decoded (memory), else None."""
        size = self.clip(offset, size)

        def kept(i: int) -> bytes | None:
            return kept_frames.get(self._id, i)

        data = self._read(offset, size, kept) if size else b""
        return None if data is None else bytearray(data)

    def close(self) -> None:
        kept_frames.drop(self._id)


class ZstdSpill(FileRange):
    """The decompressed bytes of a zstd stream, written once to a spill file and read from it by pread."""

    compression = "zstd"

    def __init__(self, file: OpenFile, head: Head, *, kept: bool) -> None:
        super().__init__(file, 0, head.size)
        self.head = head
        self.kept = kept  # linked at its path in the cache directory (else nameless)
        self.uncompressed_digest = head.digest

    def close(self) -> None:
        """Close the spill file (a nameless or evicted one is freed with its last fd)."""
        self.file.close()


def open_zstd(o: Opening) -> Source:
    """From the stored frame table or spill file when good, else by one pass (two for a large frame)."""
    raw, name, limits, digest = o.raw, o.name, o.limits, o.digest
    high = None if o.progress is None else HighWater(o.progress)

    def build() -> Source:
        try:
            found = _zstd_pass(raw, name, limits, high, None, digest, o.consumer)
        except _TooLargeFrame:
            log.info(
                "%s: a zstd frame over %d bytes: decompressing to a spill file", name, ZSTD_FRAME_INPLACE
            )
            spilled = _spill(raw, o.spill_path, name, limits, high, digest, o.consumer)
            log.info("%s: zstd-compressed, %d bytes decompressed", name, spilled.size)
            return spilled
        log.info("%s: zstd-compressed, %d bytes decompressed", name, found.size)
        return ZstdFrames(
            raw, name, found.frames, Head(_ZSTD_FRAMES_MAGIC, found.size, raw.size, found.sha256)
        )

    def encode(source: Source) -> bytes | None:
        if isinstance(source, ZstdFrames):
            table = b"".join(_FRAME.pack(*f) for f in source.frames)
            return source.head.pack() + U64.pack(len(source.frames)) + table
        if isinstance(source, ZstdSpill) and source.kept:
            st = source.file.stat
            return source.head.pack() + _SPILL.pack(st.st_ino, st.st_mtime_ns)
        return None  # a nameless spill: nothing to find again

    return load_or_build(
        o.cache,
        ZSTD_INDEX,
        o.key,
        name=name,
        decode=lambda p: _decode(p, o),
        build=build,
        encode=encode,
        rebuild=o.rebuild,
    )


def _spill(
    raw: Source,
    path: str | None,
    name: str,
    limits: Limits,
    progress: HighWater | None,
    digest: bool,
    consumer: Consumer | None,
) -> ZstdSpill:
    """Decompress ``raw`` into a spill file (kept at ``path`` when given), in one pass, ``consumer``'s too."""
    spill = Spill(path, name, limits)
    try:
        found = _zstd_pass(raw, name, limits, progress, spill, digest, consumer)
        file = spill.finish()
    except BaseException:
        spill.discard()
        raise
    head = Head(_ZSTD_SPILL_MAGIC, found.size, raw.size, found.sha256)
    return ZstdSpill(file, head, kept=spill.path is not None)


def _decode(payload: bytes, o: Opening) -> Source:
    """The source a stored zstd entry describes: a frame table, or the spill file it names."""
    raw, name = o.raw, o.name
    head, rest = unpack_head(payload, raw, o.digest, _ZSTD_FRAMES_MAGIC, _ZSTD_SPILL_MAGIC)
    if head.magic == _ZSTD_FRAMES_MAGIC:
        if len(rest) < U64.size:
            raise ValueError("frame table cut short")
        (count,) = U64.unpack_from(rest)
        if len(rest) != U64.size + count * _FRAME.size:
            raise ValueError("frame table of the wrong length")
        frames = [_FRAME.unpack_from(rest, U64.size + i * _FRAME.size) for i in range(count)]
        if sum(f[2] for f in frames) != head.size or any(c + s > raw.size for c, s, _ in frames):
            raise ValueError("frames that do not add up to the stream")
        return ZstdFrames(raw, name, frames, head)
    path = o.spill_path
    if path is None or len(rest) != _SPILL.size:
        raise ValueError("no spill file to name")
    ino, mtime_ns = _SPILL.unpack(rest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise Stale(f"the spill file {path} is gone") from e
        raise ValueError(f"cannot open the spill file {path}: {e.strerror}") from e
    file = OpenFile(path, fd=fd)
    st = file.stat
    if (st.st_ino, st.st_mtime_ns, st.st_size) != (ino, mtime_ns, head.size) or st.st_uid != os.geteuid():
        file.close()
        raise Stale(f"the spill file {path} is another file now")
    return ZstdSpill(file, head, kept=True)
