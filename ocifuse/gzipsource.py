"""gzip (RFC 1952; multi-member, e.g. pigz) at random: rapidgzip's seek points, one pass to build them.

rapidgzip keeps one seek point every GZIP_CHUNK compressed bytes, each with its 32 KiB window.
Readers are not thread-safe (they release the GIL): a small pool per source, one reader per
worker thread at a time, drawing on the process's budget (readers.py).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import sys
import threading
import weakref
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: every archive open and mount would pay for it otherwise
    import rapidgzip

from .errors import CompressedDataError
from .readers import ReaderPool
from .source import Source, SourceFile, sub_range
from .store import GZIP_INDEX, Stale, load_or_build
from .streams import (
    READ,
    U64,
    Consumer,
    Forward,
    Head,
    HighWater,
    Limits,
    Opening,
    Progress,
    ReadAhead,
    unpack_head,
)

log = logging.getLogger(__name__)

# Compressed bytes between two gzip seek points (rapidgzip's chunk_size). 1 MiB: a random 64 KiB
# read decompresses ~1.5 MiB on average (p99 ~3 ms here); the index holds one 32 KiB window per
# point, stored zlib-compressed (gztool's format). A reader must reopen with the same value.
GZIP_CHUNK = 1 << 20
# Decompressing readers per gzip source: concurrent reads beyond this wait for one (2 CPUs here).
MAXREADERS = 2
_GZIP_MAGIC = b"OGZ3"  # 2: rapidgzip's index in gztool's format; 3: the stream's end (u64) first


_open_readers: weakref.WeakSet[rapidgzip.RapidgzipFile] = weakref.WeakSet()


@atexit.register
def _close_readers() -> None:
    """rapidgzip's threads must be gone before the interpreter is: close what is still open."""
    for reader in list(_open_readers):
        with contextlib.suppress(Exception):
            reader.close()


def _gzip_reader(raw: Source, threads: int = 1) -> rapidgzip.RapidgzipFile:
    # SourceFile: rapidgzip reads from byte 0 of an object's fileno() when it has one; a blob
    # inside an archive starts elsewhere. A reader that serves reads has parallelization=1: it
    # decodes one chunk a read needs, and has no thread of its own, so one made before the mount
    # daemon forks still reads in the child (with 2, rapidgzip's thread pool stays in the parent
    # and the child's first read hangs; tests/test_compressed_archive.py mounts in the background
    # to keep it so). A first pass given spare CPUs (``threads``) decodes its chunks in parallel,
    # and is closed once its index is exported (GzipSource._pass).
    import rapidgzip

    reader = rapidgzip.RapidgzipFile(SourceFile(raw), parallelization=threads, chunk_size=GZIP_CHUNK)
    _open_readers.add(reader)
    return reader


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = -1


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """fd 2 to /dev/null while rapidgzip reads in a first pass.

    rapidgzip writes some errors to std::cerr itself (a stream cut in its footer: "Unexpected end
    of file when getting block ...") before it raises; the exception becomes our one line, and its
    own would be a second one. Counted, so that passes running at once in several threads (the
    rootfs view opens layers in parallel) restore fd 2 once, when the last one ends.
    """
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            sys.stderr.flush()
            _quiet_saved = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(null, 2)
            os.close(null)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                os.dup2(_quiet_saved, 2)
                os.close(_quiet_saved)


def _gzip_error(name: str, error: Exception, at: int) -> CompressedDataError:
    """rapidgzip's exception as one line a user can act on."""
    text = str(error)
    if "CRC32" in text:
        reason = "CRC mismatch: the compressed data is damaged"
    elif "gzip/zlib header" in text or "wrapper" in text:
        reason = f"not gzip data after byte {at} (trailing data, or a damaged member header)"
    elif "valid file format" in text:
        reason = "not a gzip stream (damaged header)"
    else:
        reason = f"damaged or truncated gzip data near byte {at}"
    return CompressedDataError(name, "gzip", reason)


def _zero_tail(raw: Source) -> int:
    """How many zero bytes ``raw`` ends with."""
    count = 0
    while count < raw.size:
        size = min(READ, raw.size - count)
        chunk = raw.pread(raw.size - count - size, size)
        stripped = chunk.rstrip(b"\0")
        count += len(chunk) - len(stripped)
        if stripped or len(chunk) != size:
            break
    return count


def _last_checkpoint(offsets: dict[int, int], size: int) -> int:
    """The compressed bit offset of the last seek point with data after it (a deflate block's start)."""
    before = [bit for bit, out in offsets.items() if out < size]
    return max(before) if before else min(offsets, default=0)


# Deflate blocks that decode to (almost) nothing, to align a bit offset on a byte boundary
# (RFC 1951 3.2.6, fixed Huffman codes; bits in stream order): an empty block (header, end-of-block
# code 256), 10 bits; a block of one literal 144 (9-bit code 110010000), 19 bits.
_EMPTY_BLOCK = "010" + "0000000"
_LITERAL_BLOCK = "010" + "110010000" + "0000000"


def _aligned(chunk: bytes, bit: int) -> tuple[bytes, int]:
    """``chunk`` (raw bytes from byte ``bit // 8``) as a deflate stream starting at ``bit``.

    Returns the stream and how many bytes precede ``chunk``'s second byte in it: blocks that
    decode to one byte at most are put in front, so that its bytes keep the original's byte
    boundaries (zlib tells where a stream ends only to the byte, and offers no bit offset).
    """
    shift = bit % 8
    if shift == 0:
        return chunk, 0
    odd = shift % 2
    # 19 bits = 3 (mod 8), 10 bits = 2 (mod 8): 3 * odd + 2 * n = shift (mod 8)
    n = ((shift - 3 * odd) % 8) // 2
    bits = _LITERAL_BLOCK * odd + _EMPTY_BLOCK * n
    prefix = int(bits[::-1], 2) if bits else 0
    value = prefix | ((int.from_bytes(chunk, "little") >> shift) << len(bits))
    lead = (len(bits) - shift) // 8
    return value.to_bytes(lead + len(chunk), "little"), lead


_GZIP_HEADER = b"\x1f\x8b"


def _gzip_end(raw: Source, name: str, bit: int | None, limits: Limits, padding: int) -> int:
    """Where the gzip stream in ``raw`` ends, decoded from seek point ``bit`` (a deflate block's start).

    ``bit`` None: from the first member's start (zlib then reads every byte of the stream).

    zlib reads the deflate data from there (a window of zeros stands in for the real one: only
    where the blocks end matters here, not what they hold), skips the 8-byte trailer (RFC 1952
    2.3.1; rapidgzip has checked it), then reads each member that follows (ID1 ID2 = 1f 8b), whole.
    Raises CompressedDataError for a member cut short or damaged, and for anything but the
    ``padding`` zeros after the end (named by its offset, as ``gzip -t`` judges it).
    """
    inside = bit is not None  # zlib starts inside a member and will not read its trailer
    if bit is None:
        at, pos, data, d = 0, 0, b"", zlib.decompressobj(31)
    else:
        at = bit // 8
        data, lead = _aligned(raw.pread(at, READ), bit)
        pos = at - lead  # raw's offset of data[0]
        d = zlib.decompressobj(-15, zdict=bytes(32768))
    budget = limits.max_size
    while True:
        try:
            while not d.eof:
                if not data:
                    data = raw.pread(pos, READ)
                    if not data:
                        raise CompressedDataError(name, "gzip", f"truncated: the stream stops at byte {pos}")
                budget -= len(d.decompress(data, READ))
                if budget < 0:
                    raise CompressedDataError(name, "gzip", f"a member after byte {at} does not end")
                if d.eof:
                    pos += len(data) - len(d.unused_data)
                else:
                    pos += len(data) - len(d.unconsumed_tail)
                    data = d.unconsumed_tail
        except zlib.error as e:
            raise CompressedDataError(name, "gzip", f"damaged member after byte {at} ({e})") from e
        if inside:
            pos += 8
            inside = False
        if pos > raw.size:
            raise CompressedDataError(name, "gzip", f"truncated: the stream stops at byte {raw.size}")
        if raw.pread(pos, 2) != _GZIP_HEADER:
            break
        at, data, d = pos, b"", zlib.decompressobj(31)  # a member of its own: zlib checks its CRC
    if pos < raw.size - padding:
        raise CompressedDataError(name, "gzip", f"trailing data after the gzip stream's end at byte {pos}")
    return pos


def _gzip_pass_error(
    name: str, error: Exception, raw: Source, reader: rapidgzip.RapidgzipFile, limits: Limits, padding: int
) -> CompressedDataError:
    """rapidgzip's error in a first pass as one line; for bytes after the stream, where it ends.

    rapidgzip reads bytes after the last member as a member or as deflate data, and its error
    says neither that nor where: zlib reads on from its last seek point to tell.
    """
    if "CRC32" not in str(error):
        offsets = reader.available_block_offsets()
        try:
            end = _gzip_end(raw, name, max(offsets, default=None), limits, padding)
        except CompressedDataError as found:
            return found
        log.debug("%s: rapidgzip: %s, though the stream ends well at byte %d", name, error, end)
    return _gzip_error(name, error, reader.tell_compressed() // 8)


class GzipSource(Source):
    """The decompressed bytes of a gzip stream, read through rapidgzip with an imported index."""

    compression = "gzip"

    def __init__(self, raw: Source, name: str, index: bytes, head: Head, end: int) -> None:
        self.raw = raw
        # Readers see the stream only, not the zero padding after it (rapidgzip refuses that).
        self._stream = raw if end == raw.size else sub_range(raw, 0, end)
        self.end = end
        self.name = name
        self.size = head.size
        self.uncompressed_digest = head.digest
        self.head = head
        self._index = index
        self._pool = ReaderPool(self._new_reader, MAXREADERS)

    def _new_reader(self) -> rapidgzip.RapidgzipFile:
        reader = _gzip_reader(self._stream)
        try:
            reader.import_index(io.BytesIO(self._index))
        except BaseException:
            reader.close()
            raise
        return reader

    @classmethod
    def open(cls, o: Opening) -> GzipSource:
        """From the stored index when there is a good one (and no ``rebuild``), else by one pass."""
        raw, name, digest = o.raw, o.name, o.digest

        def decode(payload: bytes) -> GzipSource:
            head, rest = unpack_head(payload, raw, digest, _GZIP_MAGIC)
            if len(rest) < U64.size:
                raise ValueError("gzip index cut short")
            (end,) = U64.unpack_from(rest)
            if end > raw.size:
                raise Stale(f"the stream ends at byte {end}, past the blob's end")
            source = cls(raw, name, rest[U64.size :], head, end)
            try:
                source._pool.add(source._new_reader())  # the index must import
            except (ValueError, RuntimeError, OSError) as e:
                source.close()
                raise ValueError(f"the index does not import: {e}") from e
            return source

        return load_or_build(
            o.cache,
            GZIP_INDEX,
            o.key,
            name=name,
            decode=decode,
            build=lambda: cls._build(raw, name, o.limits, o.progress, digest, o.consumer, o.threads),
            encode=lambda source: source.head.pack() + U64.pack(source.end) + source._index,
            rebuild=o.rebuild,
        )

    @classmethod
    def _build(
        cls,
        raw: Source,
        name: str,
        limits: Limits,
        progress: Progress | None,
        digest: bool,
        consumer: Consumer | None,
        threads: int,
    ) -> GzipSource:
        # RFC 1952 2.2: nothing follows the last member; gzip(1) ignores zero bytes there (block
        # padding) and warns of anything else. rapidgzip refuses most runs of zeros and lets up to
        # 9 other bytes pass unseen: it is given the stream with 4 of the zeros at most (a last
        # ISIZE < 2^24 ends in zeros itself; 9 when the first try fails: an empty last member),
        # and _gzip_end finds where the stream really ends.
        padding = _zero_tail(raw)
        tries = [raw.size - padding + min(padding, 4)]
        if padding > 4:
            tries.append(raw.size - padding + min(padding, 9))
        for i, length in enumerate(tries):
            try:
                stream = raw if length == raw.size else sub_range(raw, 0, length)
                shown = progress if i == 0 else None
                source = cls._pass(raw, stream, name, limits, shown, digest, padding, consumer, threads)
                log.info(
                    "%s: gzip-compressed, %d bytes decompressed on %d thread%s",
                    name, source.size, threads, "" if threads == 1 else "s",
                )  # fmt: skip
                return source
            except CompressedDataError:
                if i + 1 == len(tries):
                    raise
                log.debug("%s: trying again with %d more zero bytes", name, tries[i + 1] - length)
        raise AssertionError("unreachable")

    @classmethod
    def _pass(
        cls,
        raw: Source,
        stream: Source,
        name: str,
        limits: Limits,
        progress: Progress | None,
        digest: bool,
        padding: int,
        consumer: Consumer | None,
        threads: int,
    ) -> GzipSource:
        """One pass of rapidgzip over ``stream`` (``raw`` without all of its zero padding), on ``threads``.

        rapidgzip's index is the same whatever the threads: a seek point at each chunk's start
        (every GZIP_CHUNK compressed bytes), each with its window (tests/test_parallel_gzip.py).
        """
        reader = _gzip_reader(stream, threads)
        high = None if progress is None else HighWater(progress)

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    with _quiet_stderr():
                        data = reader.read(READ)
                except (ValueError, RuntimeError) as e:
                    raise _gzip_pass_error(name, e, raw, reader, limits, padding) from e
                if not data:
                    return
                if high is not None:
                    high(reader.tell_compressed() // 8)
                yield data

        # rapidgzip decompresses in a thread of its own while this one hashes and scans: on one
        # thread (a reader with threads=1 decodes in the thread that reads it) they take turns.
        ahead = ReadAhead(chunks())
        try:
            forward = Forward(ahead, name=name, kind="gzip", limits=limits, digest=digest)
            try:
                forward.run(consumer)
            finally:
                ahead.close()  # the reader is this thread's again
            size = forward.size
            # rapidgzip ends quietly at some truncations and trailing bytes: find the end ourselves.
            end = _gzip_end(raw, name, _last_checkpoint(reader.block_offsets(), size), limits, padding)
            if end > stream.size:
                raise CompressedDataError(
                    name, "gzip", f"truncated: the stream stops at byte {stream.size} of {end}"
                )
            if high is not None:
                high(raw.size)
            out = io.BytesIO()
            # gztool's format keeps each 32 KiB window zlib-compressed: ~10x smaller than
            # indexed_gzip's raw windows (0.6% of the uncompressed size instead of 6% at 1.5:1).
            # After a read to the end, rapidgzip exports the seek points it made: no second pass.
            import rapidgzip

            reader.export_index(out, rapidgzip.IndexFormat.GZTOOL)
        except BaseException:
            reader.close()
            raise
        head = Head(_GZIP_MAGIC, size, raw.size, forward.sha256())
        source = cls(raw, name, out.getvalue(), head, end)
        if threads == 1:
            source._pool.add(reader)  # it stands at the end: a reader less to make
        else:
            reader.close()  # its threads would not survive the daemon's fork; reads get readers of their own
        return source

    def pread(self, offset: int, size: int) -> bytes:
        size = self.clip(offset, size)
        if size == 0:
            return b""
        reader = self._pool.acquire(offset, size)
        ok = False
        try:
            buf = bytearray(size)
            view = memoryview(buf)
            got = 0
            reader.file.seek(offset)
            while got < size:
                n = reader.file.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != size:
                raise CompressedDataError(
                    self.name, "gzip", f"stream ends at byte {offset + got}, before its indexed end"
                )
            ok = True
            return bytes(buf)
        except (ValueError, RuntimeError) as e:
            raise _gzip_error(self.name, e, offset) from e
        finally:
            self._pool.release(reader, ok)

    def close(self) -> None:
        self._pool.close()
