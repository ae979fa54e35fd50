"""Random access into compressed bytes: gzip by seek points (rapidgzip), zstd by frames or a spill file.

``open_decompressed(raw, ...)`` returns a Source of the decompressed bytes of ``raw``, chosen by
magic bytes (``source.sniff``), never by name; ``raw`` itself when it is not compressed. The first
open reads the whole compressed stream once, in order: that one pass builds the index, checks the
stream end to end (CRC, truncation, trailing data), counts the uncompressed size, and hashes the
uncompressed bytes (a layer's DiffID, image-spec config.md ``rootfs.diff_ids``). The index is saved
in the cache under the caller's key, so a later open reads none of the stream. Nothing is served
before that pass has checked the whole stream: damaged bytes are never served as good.

- gzip (RFC 1952; multi-member, e.g. pigz): rapidgzip's seek points, one every GZIP_CHUNK
  compressed bytes, each with its 32 KiB window. Readers are not thread-safe (they release the
  GIL): a small pool, one reader per worker thread at a time.
- zstd (RFC 8878): a stream of frames each at most ZSTD_FRAME_INPLACE bytes decompressed (the
  seekable format's frames, zstd:chunked's per-chunk frames, ``pzstd`` output) is read in place
  through a frame table: a read decompresses only its frames. A larger frame (what ``zstd`` writes:
  one frame for the whole input) cannot be entered in the middle: its bytes are decompressed once
  into a spill file in the cache directory, bounded by ``Limits.spill_max`` and the free space.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import errno
import functools
import hashlib
import io
import itertools
import logging
import os
import struct
import sys
import tempfile
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # imported where used: every archive open and mount would pay for them otherwise
    import rapidgzip

from .digest import Digest
from .errors import CompressedDataError, DecompressionLimit, OcifuseError
from .source import FileRange, OpenFile, Source, SourceFile, sniff, sub_range

log = logging.getLogger(__name__)

# Compressed bytes between two gzip seek points (rapidgzip's chunk_size). 1 MiB: a random 64 KiB
# read decompresses ~1.5 MiB on average (p99 ~3 ms here); the index holds one 32 KiB window per
# point, stored zlib-compressed (gztool's format). A reader must reopen with the same value.
GZIP_CHUNK = 1 << 20
# Decompressing readers per gzip source: concurrent reads beyond this wait for one (2 CPUs here).
MAX_READERS = 2
# Idle gzip readers kept open in the whole process, across sources (~1 MiB each: a decoded chunk
# and its buffers): past this, the least recently used idle one is closed. A reader in use is never
# closed, and one continuing a sequential read is the most recently used: a ``cat`` of one blob
# keeps its reader whatever the number of layers.
IDLE_READERS = 8
# A read this far past where a reader stopped continues its stream (kernel read-ahead: 1 MiB requests).
SEQUENTIAL_AHEAD = 4 << 20
# The largest zstd frame (decompressed) served in place; a stream with a larger one is spilled.
ZSTD_FRAME_INPLACE = 8 << 20
# Bytes of decoded zstd frames kept in memory, in the whole process (4 of the largest frames
# served in place), least recently used first out: a sequential read needs the frame it is in.
ZSTD_KEPT_BYTES = 4 * ZSTD_FRAME_INPLACE
# zstd's own default window limit (RFC 8878 3.1.1.1.2 lets a frame ask for up to 3.75 TiB):
# ``zstd --long`` (2^27) is read, a frame asking for more is refused, as ``zstd -d`` refuses it.
ZSTD_WINDOW_LOG_MAX = 27
# Default bounds of one first pass (documented in README.md, "Compressed archives").
DEFAULT_MAX_SIZE = 64 << 30
DEFAULT_SPILL_MAX = 16 << 30
# A spill never leaves less than this much free on its filesystem (or 10% of it, if smaller).
SPILL_RESERVE = 1 << 30
_READ = 1 << 20
# A spill file's temporary name (where it is not nameless), with its writer's pid: see cache.py.
SPILL_TEMP_PREFIX = ".tmp.spill-"
_CHECK_FREE_EVERY = 64 << 20


class IndexStore(Protocol):
    """What open_decompressed needs of the persistent cache (cache.IndexCache has it)."""

    def load(self, kind: str, key: str) -> bytes | None:
        """The payload stored under (kind, key), or None."""

    def store(self, kind: str, key: str, payload: bytes) -> None:
        """Store a payload (atomically; errors are logged, never raised)."""

    def spill_path(self, key: str) -> str | None:
        """Where a large derived file for ``key`` may live; None when the cache is disabled."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds of a first pass: uncompressed bytes read (time) and spilled (disk); mount options."""

    max_size: int = DEFAULT_MAX_SIZE  # -o max_size=SIZE
    spill_max: int = DEFAULT_SPILL_MAX  # -o spill_max=SIZE


Progress = Callable[[int], None]
"""Called with each count of compressed bytes the first pass has consumed."""


def open_decompressed(
    raw: Source,
    *,
    key: str | None,
    cache: IndexStore | None,
    name: str,
    limits: Limits | None = None,
    progress: Progress | None = None,
    rebuild: bool = False,
    digest: bool = True,
) -> Source:
    """A Source of the decompressed bytes of ``raw`` (``raw`` itself when it is not compressed).

    ``key`` names ``raw``'s content in ``cache`` (cache.blob_key / cache.file_key); with no key or
    no cache the index is built and not kept; ``rebuild`` (fsck) builds it even when stored, which
    checks the whole stream again. ``name`` (a path or a digest) names ``raw`` in errors.
    The result's ``uncompressed_digest`` is the sha256 of the decompressed stream (a layer's DiffID);
    ``digest=False`` (an outer archive, which needs none) skips hashing: 0.5-1 s less per GiB here.

    Raises CompressedDataError (damaged, truncated, trailing data, xz/bzip2) or DecompressionLimit.
    """
    kind = sniff(raw.pread(0, 8))
    if kind is None:
        return raw
    limits = limits or Limits()
    store = cache if key is not None else None
    if kind == "gzip":
        return GzipSource.open(
            raw,
            key=key,
            cache=store,
            name=name,
            limits=limits,
            progress=progress,
            rebuild=rebuild,
            digest=digest,
        )
    if kind == "zstd":
        return _open_zstd(
            raw,
            key=key,
            cache=store,
            name=name,
            limits=limits,
            progress=progress,
            rebuild=rebuild,
            digest=digest,
        )
    raise CompressedDataError(name, kind, "not supported (ocifuse reads gzip and zstd)")


# -- the index payloads ---------------------------------------------------------------------------

# Every payload starts with: magic, uncompressed size, compressed size, sha256 of the uncompressed
# stream. The cache checks version and checksum; these fields check the entry belongs to ``raw``.
_HEAD = struct.Struct("<4sQQ32s")
_NO_DIGEST = bytes(32)
_GZIP_MAGIC = b"OGZ3"  # 2: rapidgzip's index in gztool's format; 3: the stream's end (u64) first
_ZSTD_FRAMES_MAGIC = b"OZF1"
_ZSTD_SPILL_MAGIC = b"OZS1"
_U64 = struct.Struct("<Q")
_FRAME = struct.Struct("<QQQ")  # compressed offset, compressed size, uncompressed size
_SPILL = struct.Struct("<QQ")  # the spill file's inode and mtime_ns


@dataclass(frozen=True, slots=True)
class _Head:
    magic: bytes
    size: int
    compressed_size: int
    sha256: bytes

    def pack(self) -> bytes:
        return _HEAD.pack(self.magic, self.size, self.compressed_size, self.sha256)

    @property
    def digest(self) -> Digest | None:
        """The stream's sha256; None when the pass that built the entry did not hash (all zeros)."""
        return None if self.sha256 == _NO_DIGEST else Digest("sha256", self.sha256.hex())


def _unpack_head(
    payload: bytes | None, raw: Source, digest: bool, *magics: bytes
) -> tuple[_Head, bytes] | None:
    """The head and the rest of a cached payload, or None when it is not for ``raw`` (or lacks a digest)."""
    if payload is None or len(payload) < _HEAD.size:
        return None
    head = _Head(*_HEAD.unpack_from(payload))
    if head.magic not in magics or head.compressed_size != raw.size or (digest and head.digest is None):
        return None
    return head, payload[_HEAD.size :]


# -- gzip -----------------------------------------------------------------------------------------

_open_readers: weakref.WeakSet[rapidgzip.RapidgzipFile] = weakref.WeakSet()


@atexit.register
def _close_readers() -> None:
    """rapidgzip's threads must be gone before the interpreter is: close what is still open."""
    for reader in list(_open_readers):
        with contextlib.suppress(Exception):
            reader.close()


def _gzip_reader(raw: Source) -> rapidgzip.RapidgzipFile:
    # SourceFile: rapidgzip reads from byte 0 of an object's fileno() when it has one; a blob
    # inside an archive starts elsewhere. parallelization=1: faster than 2 on 2 CPUs (bench/README),
    # and a reader with no thread of its own: one made before the mount daemon forks still reads in
    # the child (with 2, rapidgzip's thread pool stays in the parent and the child's first read
    # hangs; tests/test_compressed_archive.py mounts in the background to keep it so).
    import rapidgzip

    reader = rapidgzip.RapidgzipFile(SourceFile(raw), parallelization=1, chunk_size=GZIP_CHUNK)
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
        size = min(_READ, raw.size - count)
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
        data, lead = _aligned(raw.pread(at, _READ), bit)
        pos = at - lead  # raw's offset of data[0]
        d = zlib.decompressobj(-15, zdict=bytes(32768))
    budget = limits.max_size
    while True:
        try:
            while not d.eof:
                if not data:
                    data = raw.pread(pos, _READ)
                    if not data:
                        raise CompressedDataError(name, "gzip", f"truncated: the stream stops at byte {pos}")
                budget -= len(d.decompress(data, _READ))
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


class _IdleReaders:
    """The process's idle gzip readers, least recently used first: at most IDLE_READERS stay open.

    Lock order: a pool's condition, then this lock; eviction takes this lock alone, then the pool's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: OrderedDict[_Reader, _ReaderPool] = OrderedDict()

    def idle(self, reader: _Reader, pool: _ReaderPool) -> None:
        """``reader`` of ``pool`` is idle now (the most recently used)."""
        with self._lock:
            self._idle[reader] = pool
            self._idle.move_to_end(reader)

    def busy(self, reader: _Reader) -> None:
        """``reader`` is in use, or gone: not a candidate for closing."""
        with self._lock:
            self._idle.pop(reader, None)

    def trim(self) -> None:
        """Close the least recently used idle readers beyond IDLE_READERS."""
        while True:
            with self._lock:
                if len(self._idle) <= IDLE_READERS:
                    return
                reader, pool = self._idle.popitem(last=False)
            pool.evict(reader)


_idle_readers = _IdleReaders()


@dataclass(slots=True, eq=False)
class _Reader:
    """A pooled reader: where its stream stands after its last (or current) read, and whether in use."""

    file: rapidgzip.RapidgzipFile
    position: int = -1
    busy: bool = False


class _ReaderPool:
    """Up to ``limit`` reader objects, each used by one thread at a time; the rest wait.

    A read that continues a reader's stream (at its position, or up to SEQUENTIAL_AHEAD past it:
    the kernel's read-ahead sends the next requests before the first is answered) goes to that
    reader, waiting for it if busy: it has the chunk decoded, and two readers taking turns on one
    stream would each decode every chunk.
    """

    def __init__(self, make: Callable[[], rapidgzip.RapidgzipFile], limit: int) -> None:
        self._make = make
        self._limit = limit
        self._readers: list[_Reader] = []
        self._creating = 0
        self._closed = False
        self._cond = threading.Condition()

    def add(self, file: rapidgzip.RapidgzipFile) -> None:
        """Adopt a reader made elsewhere (the one that built the index)."""
        reader = _Reader(file)
        with self._cond:
            self._readers.append(reader)
            _idle_readers.idle(reader, self)
        _idle_readers.trim()

    def evict(self, reader: _Reader) -> None:
        """Close ``reader`` if it is still idle here (the process has too many idle readers)."""
        with self._cond:
            if reader.busy or reader not in self._readers:
                return
            self._readers.remove(reader)
            _idle_readers.busy(reader)  # idle again since it was picked: registered again
        reader.file.close()

    def acquire(self, offset: int, size: int) -> _Reader:
        """The reader for a read of ``size`` bytes at ``offset`` (marked busy until ``release``)."""
        with self._cond:
            while True:
                if self._closed:
                    raise OcifuseError("read after close")
                follows = [r for r in self._readers if r.position <= offset < r.position + SEQUENTIAL_AHEAD]
                idle = [r for r in self._readers if not r.busy]
                if follows:
                    reader = follows[0]
                    if reader.busy:
                        self._cond.wait()
                        continue
                elif idle:
                    # The idle reader least likely to be continued: the one that stopped earliest.
                    reader = min(idle, key=lambda r: r.position)
                elif len(self._readers) + self._creating < self._limit:
                    self._creating += 1
                    break
                else:
                    self._cond.wait()
                    continue
                reader.busy, reader.position = True, offset + size
                _idle_readers.busy(reader)
                return reader
        try:
            reader = _Reader(self._make(), offset + size, busy=True)
        finally:
            with self._cond:
                self._creating -= 1
                self._cond.notify_all()
        with self._cond:
            self._readers.append(reader)
        return reader

    def release(self, reader: _Reader, ok: bool) -> None:
        """Give a reader back; one whose read failed is closed and forgotten (its state is unknown)."""
        with self._cond:
            reader.busy = False
            if not ok or self._closed:
                with contextlib.suppress(ValueError):
                    self._readers.remove(reader)
            else:
                _idle_readers.idle(reader, self)
            self._cond.notify_all()
        if not ok or self._closed:
            reader.file.close()
        else:
            _idle_readers.trim()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle = [r for r in self._readers if not r.busy]
            self._readers = [r for r in self._readers if r.busy]
            for reader in idle:
                _idle_readers.busy(reader)
            self._cond.notify_all()
        for reader in idle:
            reader.file.close()


class GzipSource(Source):
    """The decompressed bytes of a gzip stream, read through rapidgzip with an imported index."""

    compression = "gzip"

    def __init__(self, raw: Source, name: str, index: bytes, head: _Head, end: int) -> None:
        self.raw = raw
        # Readers see the stream only, not the zero padding after it (rapidgzip refuses that).
        self._stream = raw if end == raw.size else sub_range(raw, 0, end)
        self.end = end
        self.name = name
        self.size = head.size
        self.uncompressed_digest = head.digest
        self.head = head
        self._index = index
        self._pool = _ReaderPool(self._new_reader, MAX_READERS)

    def _new_reader(self) -> rapidgzip.RapidgzipFile:
        reader = _gzip_reader(self._stream)
        try:
            reader.import_index(io.BytesIO(self._index))
        except BaseException:
            reader.close()
            raise
        return reader

    @classmethod
    def open(
        cls,
        raw: Source,
        *,
        key: str | None,
        cache: IndexStore | None,
        name: str,
        limits: Limits,
        progress: Progress | None,
        rebuild: bool = False,
        digest: bool = True,
    ) -> GzipSource:
        """From the cached index when there is a good one (and no ``rebuild``), else by one pass."""
        if cache is not None and key is not None and not rebuild:
            found = _unpack_head(cache.load("gzip-index", key), raw, digest, _GZIP_MAGIC)
            if found is not None and len(found[1]) >= _U64.size and _U64.unpack_from(found[1])[0] <= raw.size:
                (end,) = _U64.unpack_from(found[1])
                source = cls(raw, name, found[1][_U64.size :], found[0], end)
                try:
                    source._pool.add(source._new_reader())  # the index must import: else rebuild
                except (ValueError, RuntimeError, OSError) as e:
                    log.warning("%s: cached gzip index unusable (%s): rebuilding it", name, e)
                    source.close()
                else:
                    log.debug("%s: gzip index from the cache", name)
                    return source
        source = cls._build(raw, name, limits, progress, digest)
        if cache is not None and key is not None:
            cache.store("gzip-index", key, source.head.pack() + _U64.pack(source.end) + source._index)
        return source

    @classmethod
    def _build(
        cls, raw: Source, name: str, limits: Limits, progress: Progress | None, digest: bool
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
                return cls._pass(raw, stream, name, limits, progress if i == 0 else None, digest, padding)
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
    ) -> GzipSource:
        """One pass of rapidgzip over ``stream`` (``raw`` without all of its zero padding)."""
        reader = _gzip_reader(stream)
        try:
            sha = hashlib.sha256() if digest else None
            size = consumed = 0
            buf = bytearray(_READ)
            view = memoryview(buf)
            while True:
                try:
                    with _quiet_stderr():
                        n = reader.readinto(buf)
                except (ValueError, RuntimeError) as e:
                    raise _gzip_pass_error(name, e, raw, reader, limits, padding) from e
                if not n:
                    break
                size += n
                if size > limits.max_size:
                    raise DecompressionLimit(
                        name,
                        f"gzip: decompresses to more than {limits.max_size} bytes, the max_size bound "
                        "(-o max_size=SIZE raises it)",
                        "max_size",
                    )
                if sha is not None:
                    sha.update(view[:n])
                if progress is not None:
                    done = reader.tell_compressed() // 8
                    progress(done - consumed)
                    consumed = done
            # rapidgzip ends quietly at some truncations and trailing bytes: find the end ourselves.
            end = _gzip_end(raw, name, _last_checkpoint(reader.block_offsets(), size), limits, padding)
            if end > stream.size:
                raise CompressedDataError(
                    name, "gzip", f"truncated: the stream stops at byte {stream.size} of {end}"
                )
            if progress is not None:
                progress(raw.size - consumed)
            out = io.BytesIO()
            # gztool's format keeps each 32 KiB window zlib-compressed: ~10x smaller than
            # indexed_gzip's raw windows (0.6% of the uncompressed size instead of 6% at 1.5:1).
            import rapidgzip

            reader.export_index(out, rapidgzip.IndexFormat.GZTOOL)
        except BaseException:
            reader.close()
            raise
        head = _Head(_GZIP_MAGIC, size, raw.size, _NO_DIGEST if sha is None else sha.digest())
        source = cls(raw, name, out.getvalue(), head, end)
        source._pool.add(reader)
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


# -- zstd -----------------------------------------------------------------------------------------

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


class _Frames:
    """What one pass learns: the frames that hold data (compressed offset, size, uncompressed size)."""

    def __init__(self, digest: bool) -> None:
        self.frames: list[tuple[int, int, int]] = []
        self.size = 0
        self.sha = hashlib.sha256() if digest else None

    def sha256(self) -> bytes:
        """The stream's sha256 (all zeros when not hashed)."""
        return _NO_DIGEST if self.sha is None else self.sha.digest()


class _TooLargeFrame(Exception):
    """A frame larger than ZSTD_FRAME_INPLACE: the stream must be spilled instead."""


class _HighWater:
    """Turns positions into Progress increments, never counting a byte twice (a spill pass re-reads)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.high = 0

    def __call__(self, position: int) -> None:
        if position > self.high:
            self.progress(position - self.high)
            self.high = position


def _zstd_pass(
    raw: Source, name: str, limits: Limits, progress: _HighWater | None, spill: _Spill | None, digest: bool
) -> _Frames:
    """Decompress ``raw`` once, in order: the frame table, size and sha256; the bytes into ``spill``.

    Without a spill, raises _TooLargeFrame at the first frame over ZSTD_FRAME_INPLACE.
    """
    out = _Frames(digest)
    fed = start = frame_size = 0
    pending = b""
    started = False
    import pyzstd

    d = pyzstd.ZstdDecompressor(option=_zstd_option())
    while True:
        try:
            if d.needs_input:
                if not pending:
                    pending = raw.pread(fed, _READ)
                    if not pending:
                        break
                    fed += len(pending)
                    if progress is not None:
                        progress(fed)
                data = d.decompress(pending, max_length=_READ)
                pending = b""
                started = True
            else:
                data = d.decompress(b"", max_length=_READ)
        except pyzstd.ZstdError as e:
            raise _zstd_error(name, e, start) from e
        if data:
            frame_size += len(data)
            out.size += len(data)
            if out.size > limits.max_size:
                raise DecompressionLimit(
                    name,
                    f"zstd: decompresses to more than {limits.max_size} bytes, the max_size bound "
                    "(-o max_size=SIZE raises it)",
                    "max_size",
                )
            if spill is None and frame_size > ZSTD_FRAME_INPLACE:
                raise _TooLargeFrame
            if out.sha is not None:
                out.sha.update(data)
            if spill is not None:
                spill.write(data, out.size)
        if d.eof:  # RFC 8878 3.1: frames follow each other; a skippable frame decodes to nothing
            pending = d.unused_data
            end = fed - len(pending)
            if frame_size:
                out.frames.append((start, end - start, frame_size))
            start, frame_size, started = end, 0, False
            d = pyzstd.ZstdDecompressor(option=_zstd_option())
    if started:
        raise CompressedDataError(name, "zstd", f"truncated: the frame at byte {start} is cut short")
    return out


class _KeptFrames:
    """Decoded zstd frames of every ZstdFrames source, least recently used first out (ZSTD_KEPT_BYTES)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bytes = 0

    def get(self, source: int, frame: int) -> bytes | None:
        with self._lock:
            data = self._kept.get((source, frame))
            if data is not None:
                self._kept.move_to_end((source, frame))
            return data

    def put(self, source: int, frame: int, data: bytes) -> None:
        with self._lock:
            old = self._kept.pop((source, frame), None)
            self._bytes += len(data) - (0 if old is None else len(old))
            self._kept[source, frame] = data
            while self._bytes > ZSTD_KEPT_BYTES and len(self._kept) > 1:
                self._bytes -= len(self._kept.popitem(last=False)[1])

    def drop(self, source: int) -> None:
        """Forget a closed source's frames."""
        with self._lock:
            for key in [k for k in self._kept if k[0] == source]:
                self._bytes -= len(self._kept.pop(key))


_kept_frames = _KeptFrames()
_source_ids = itertools.count()


class ZstdFrames(Source):
    """The decompressed bytes of a zstd stream of small frames: a read decompresses its frames only."""

    compression = "zstd"

    def __init__(self, raw: Source, name: str, frames: list[tuple[int, int, int]], head: _Head) -> None:
        self.raw = raw
        self.name = name
        self.frames = frames
        self.size = head.size
        self.uncompressed_digest = head.digest
        self._starts: list[int] = []
        at = 0
        for _, _, usize in frames:
            self._starts.append(at)
            at += usize
        self._id = next(_source_ids)  # its frames' key in _kept_frames (an id() could be reused)

    def _frame(self, i: int) -> bytes:
        data = _kept_frames.get(self._id, i)
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
        _kept_frames.put(self._id, i, data)
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
            return _kept_frames.get(self._id, i)

        data = self._read(offset, size, kept) if size else b""
        return None if data is None else bytearray(data)

    def close(self) -> None:
        _kept_frames.drop(self._id)


class ZstdSpill(FileRange):
    """The decompressed bytes of a zstd stream, written once to a spill file and read from it by pread."""

    compression = "zstd"

    def __init__(self, file: OpenFile, head: _Head) -> None:
        super().__init__(file, 0, head.size)
        self.uncompressed_digest = head.digest


class _Spill:
    """A spill file being written: nameless until whole (O_TMPFILE), then linked into the cache directory.

    A process killed while it writes leaves nothing behind: the kernel frees a nameless file with
    its last fd. Where the filesystem has no O_TMPFILE, a temp file named with the writer's pid
    stands in (cache.IndexCache sweeps those of dead writers). Without a cache (``-o nocache``) the
    spill stays nameless, in $TMPDIR if set, else /var/tmp (disk; /tmp is often a tmpfs in RAM).
    """

    def __init__(self, path: str | None, name: str, limits: Limits) -> None:
        self.path = path
        self.name = name
        self.limits = limits
        directory = os.path.dirname(path) if path else _spill_directory()
        self.directory = directory
        self.temp: str | None = None
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:  # a filesystem without O_TMPFILE
            if path is not None:
                prefix = f"{SPILL_TEMP_PREFIX}{os.getpid()}-"
                self.fd, self.temp = tempfile.mkstemp(dir=directory, prefix=prefix)
            else:
                with tempfile.TemporaryFile(dir=directory) as f:
                    self.fd = os.dup(f.fileno())
        self._next_check = 0

    def write(self, data: bytes, written: int) -> None:
        """Append ``data`` (``written`` bytes in all, with it), within spill_max and the free space."""
        if written > self.limits.spill_max:
            raise DecompressionLimit(
                self.name,
                f"zstd: a stream with large frames is spilled to disk to be read at random, and it "
                f"decompresses to more than {self.limits.spill_max} bytes, the spill_max bound "
                "(-o spill_max=SIZE raises it)",
                "spill_max",
            )
        if written >= self._next_check:
            self._next_check = written + _CHECK_FREE_EVERY
            st = os.statvfs(self.directory)
            reserve = min(SPILL_RESERVE, st.f_blocks * st.f_frsize // 10)
            if st.f_bavail * st.f_frsize < _CHECK_FREE_EVERY + reserve:
                raise DecompressionLimit(
                    self.name,
                    f"zstd: no room to spill the decompressed stream in {self.directory} (it would leave "
                    f"less than {reserve} bytes free; -o cache=DIR puts it elsewhere)",
                    "cache",
                )
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                raise DecompressionLimit(
                    self.name, f"zstd: cannot write the spill file in {self.directory}: {e.strerror}", "cache"
                ) from e
            view = view[n:]

    def finish(self) -> OpenFile:
        """The spill, whole, as an OpenFile: on disk (fsync) and linked at its cache path first.

        ``path`` becomes None when it cannot be linked there (no /proc): then it is served nameless.
        """
        if self.path is not None:
            # The cache entry naming this spill is fsynced when stored: after a power loss it
            # must not describe a file whose blocks were never written.
            os.fsync(self.fd)
            try:
                if self.temp is None:  # a nameless file gets a name through /proc (open(2), O_TMPFILE)
                    temp = f"{SPILL_TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
                    dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:  # a dir_fd makes it linkat(AT_SYMLINK_FOLLOW); link(2) would link the symlink
                        os.link(f"/proc/self/fd/{self.fd}", temp, dst_dir_fd=dfd, follow_symlinks=True)
                    finally:
                        os.close(dfd)
                    self.temp = os.path.join(self.directory, temp)
                os.rename(self.temp, self.path)  # atomic: a reader sees the old spill or this one
                self.temp = None
            except OSError as e:
                log.warning("%s: spill file not kept in %s: %s", self.name, self.directory, e.strerror or e)
                self.path = None
                if self.temp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(self.temp)
                    self.temp = None
        return OpenFile(self.path or f"{self.name} (spill)", fd=self.fd)

    def discard(self) -> None:
        os.close(self.fd)
        if self.temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)


def _spill_directory() -> str:
    """Where a spill without a cache goes: $TMPDIR if set, else /var/tmp (on disk), else /tmp."""
    if os.environ.get("TMPDIR"):
        return tempfile.gettempdir()
    if os.access("/var/tmp", os.W_OK | os.X_OK):
        return "/var/tmp"
    return tempfile.gettempdir()


def _open_zstd(
    raw: Source,
    *,
    key: str | None,
    cache: IndexStore | None,
    name: str,
    limits: Limits,
    progress: Progress | None,
    rebuild: bool = False,
    digest: bool = True,
) -> Source:
    """From the cached frame table or spill file when good, else by one pass (two for a large frame)."""
    if cache is not None and key is not None and not rebuild:
        cached = _cached_zstd(raw, key, cache, name, digest)
        if cached is not None:
            return cached
    high = None if progress is None else _HighWater(progress)
    try:
        found = _zstd_pass(raw, name, limits, high, None, digest)
    except _TooLargeFrame:
        log.info("%s: a zstd frame over %d bytes: decompressing to a spill file", name, ZSTD_FRAME_INPLACE)
        return _spill_zstd(raw, key=key, cache=cache, name=name, limits=limits, progress=high, digest=digest)
    head = _Head(_ZSTD_FRAMES_MAGIC, found.size, raw.size, found.sha256())
    if cache is not None and key is not None:
        table = b"".join(_FRAME.pack(*f) for f in found.frames)
        cache.store("zstd-index", key, head.pack() + _U64.pack(len(found.frames)) + table)
    return ZstdFrames(raw, name, found.frames, head)


def _spill_zstd(
    raw: Source,
    *,
    key: str | None,
    cache: IndexStore | None,
    name: str,
    limits: Limits,
    progress: _HighWater | None,
    digest: bool,
) -> Source:
    path = cache.spill_path(key) if cache is not None and key is not None else None
    spill = _Spill(path, name, limits)
    try:
        found = _zstd_pass(raw, name, limits, progress, spill, digest)
        file = spill.finish()
    except BaseException:
        spill.discard()
        raise
    head = _Head(_ZSTD_SPILL_MAGIC, found.size, raw.size, found.sha256())
    if cache is not None and key is not None and spill.path is not None:
        st = file.stat
        cache.store("zstd-index", key, head.pack() + _SPILL.pack(st.st_ino, st.st_mtime_ns))
    return ZstdSpill(file, head)


def _cached_zstd(raw: Source, key: str, cache: IndexStore, name: str, digest: bool) -> Source | None:
    found = _unpack_head(cache.load("zstd-index", key), raw, digest, _ZSTD_FRAMES_MAGIC, _ZSTD_SPILL_MAGIC)
    if found is None:
        return None
    head, rest = found
    if head.magic == _ZSTD_FRAMES_MAGIC:
        if len(rest) < _U64.size:
            return None
        (count,) = _U64.unpack_from(rest)
        if len(rest) != _U64.size + count * _FRAME.size:
            return None
        frames = [_FRAME.unpack_from(rest, _U64.size + i * _FRAME.size) for i in range(count)]
        if sum(f[2] for f in frames) != head.size or any(c + s > raw.size for c, s, _ in frames):
            return None
        log.debug("%s: zstd frame table from the cache", name)
        return ZstdFrames(raw, name, frames, head)
    path = cache.spill_path(key)
    if path is None or len(rest) != _SPILL.size:
        return None
    ino, mtime_ns = _SPILL.unpack(rest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("%s: cannot open the spill file %s: %s", name, path, e.strerror)
        return None
    file = OpenFile(path, fd=fd)
    st = file.stat
    if (st.st_ino, st.st_mtime_ns, st.st_size) != (ino, mtime_ns, head.size) or st.st_uid != os.geteuid():
        file.close()
        return None
    log.debug("%s: zstd spill file from the cache: %s", name, path)
    return ZstdSpill(file, head)
