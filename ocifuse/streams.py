"""What every decompressing source shares: a first pass's bounds, stream and progress, its stored head.

A first pass reads a whole compressed stream once, in order (gzipsource.py, zstdsource.py): it
builds the index, checks the stream end to end, counts the uncompressed size (bounded by
``Limits``) and hashes the uncompressed bytes (a layer's DiffID, image-spec config.md). Its
decompressed bytes flow through one ``Forward`` stream, which a ``Consumer`` given by a layer
above may read as it goes (a layer's tar headers: layer.LayerScan), so that one decompression
serves both.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .digest import Digest
from .errors import DecompressionLimit
from .source import Source
from .store import Stale, Store

# Default bounds of one first pass (docs/compressed.md).
DEFAULT_MAX_SIZE = 64 << 30
DEFAULT_SPILL_MAX = 16 << 30
# How much a pass reads (or decompresses) at once.
READ = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds of a first pass: uncompressed bytes read (time) and spilled (disk); mount options."""

    max_size: int = DEFAULT_MAX_SIZE  # -o max_size=SIZE
    spill_max: int = DEFAULT_SPILL_MAX  # -o spill_max=SIZE


Progress = Callable[[int], None]
"""Called with each count of compressed bytes the first pass has consumed."""

Consumer = Callable[["Forward"], None]
"""Reads a first pass's decompressed stream as far as it wants, in order, while the pass runs.

Called once per pass attempt (a pass may start over: gzip's zero padding, a zstd stream that
must be spilled), each time with a new stream from byte 0. Its own failures (a stream that is not
what it reads) it keeps for its caller: an exception out of it ends the pass.
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Opening:
    """What opening a compressed stream is given (compressed.open_decompressed says each one)."""

    raw: Source  # the compressed bytes
    key: str | None  # their content key in ``cache`` (None: nothing kept)
    cache: Store | None
    name: str  # a path or a digest, naming ``raw`` in errors and log lines
    limits: Limits
    progress: Progress | None = None
    rebuild: bool = False
    digest: bool = True
    consumer: Consumer | None = None  # reads the decompressed stream in the pass, if there is one
    threads: int = 1  # CPUs the pass may decompress on (split_cpus); gzip only

    @property
    def spill_path(self) -> str | None:
        """Where a spill of these bytes is kept, if anywhere (Store.spill_path)."""
        return self.cache.spill_path(self.key) if self.cache is not None and self.key is not None else None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset and cgroups' cpusets set it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def pass_order(sizes: Sequence[int]) -> list[int]:
    """The order to start first passes in: the largest stream first (the earlier of equal ones).

    Run a few at a time, a big stream started last would run alone at the end, the other CPUs idle.
    """
    return sorted(range(len(sizes)), key=lambda i: -sizes[i])


# The fewest threads a gzip pass decodes on in parallel. rapidgzip's parallel decoding starts each
# chunk without its window (the chunk is decoded with markers, then resolved): with 1 MiB chunks
# (gzipsource.GZIP_CHUNK) that spends about twice the CPU of decoding in order (bench/README.md),
# so 2 threads decode no faster than 1, and 3 or more do. One thread, beside the thread that
# hashes and scans (ReadAhead), already uses more than one CPU.
PARALLEL_MIN = 3
# The most threads one pass decodes on: each holds chunks in flight (a 400 MiB pass's peak RSS here:
# 61 MB on 1 thread, 128 MB on 2, 202 MB on 8, docs/compressed.md), about 18 MB a thread.
PARALLEL_MAX = 16


def split_cpus(cpus: int, sizes: Sequence[int], at_once: int, parallel: Sequence[bool]) -> list[int]:
    """How many threads each stream's first pass decompresses on; ``sizes``: their compressed sizes.

    The passes run ``at_once`` at a time at most, in ``pass_order``. A stream whose ``parallel``
    flag is set can decompress on several threads (gzip: rapidgzip decodes its chunks in
    parallel); the others use one (zstd, plain) whatever they are given. Every pass gets one
    thread; the CPUs that the first passes to start leave over (``cpus`` less the passes running
    at once) go to the largest parallel ones among them, in proportion to their size, largest
    remainder first, as many of them as each get PARALLEL_MIN threads (or none), PARALLEL_MAX at
    most (memory). So the
    decompressing threads never outnumber ``cpus``: a pass that starts when another ends gets one
    thread, no more than the one it replaces had.
    """
    n = len(sizes)
    running = min(n, max(1, cpus), max(1, at_once))
    spare = cpus - running
    first = [i for i in pass_order(sizes)[:running] if parallel[i] and sizes[i] > 0]
    while first:
        threads = [1] * n
        total = sum(sizes[i] for i in first)
        shares = {i: spare * sizes[i] / total for i in first}
        for i in first:
            threads[i] += int(shares[i])
        left = spare - sum(int(shares[i]) for i in first)
        for i in sorted(first, key=lambda i: int(shares[i]) - shares[i])[:left]:  # stable: larger first
            threads[i] += 1
        if all(threads[i] >= PARALLEL_MIN for i in first):
            return [min(t, PARALLEL_MAX) for t in threads]
        first.pop()  # the smallest one's share goes to the larger ones
    return [1] * n


def too_large(name: str, kind: str, limits: Limits) -> DecompressionLimit:
    """The error of a pass past ``limits.max_size`` uncompressed bytes (a decompression bomb)."""
    return DecompressionLimit(
        name,
        f"{kind}: decompresses to more than {limits.max_size} bytes, the max_size bound "
        "(-o max_size=SIZE raises it)",
        "max_size",
    )


# How far back a reader of a pass's stream may seek (a tar walk goes back one or two header blocks).
FORWARD_KEEP = 64 << 10


class Forward:
    """A first pass's decompressed stream as a file read forward: the pass's one loop.

    ``chunks`` yields the decompressed bytes in order (a decompressor's loop: it raises for
    damaged data). Every byte is counted against ``limits.max_size`` and hashed (``digest``) as
    it is pulled, whether a reader reads it or seeks over it: a forward seek reads and discards
    (the last FORWARD_KEEP bytes are kept for a seek back). ``run`` hands the stream to a
    consumer, then reads the rest to the end. Once the decompressor has failed, every read
    raises its error again, and ``run`` raises it even if the consumer caught it.
    """

    def __init__(
        self, chunks: Iterator[bytes], *, name: str, kind: str, limits: Limits, digest: bool
    ) -> None:
        self._chunks = chunks
        self._name = name
        self._kind = kind
        self._limits = limits
        self._sha = hashlib.sha256() if digest else None
        self._kept: collections.deque[tuple[int, bytes]] = collections.deque()  # (start, bytes)
        self._pos = 0
        self.size = 0  # bytes decompressed so far; the stream's size once ``eof``
        self.eof = False
        self.failed: BaseException | None = None

    def _pull(self) -> bool:
        """Decompress the next chunk (counted, hashed, kept); False at the stream's end."""
        if self.failed is not None:
            raise self.failed
        if self.eof:
            return False
        try:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                return False
            self.size += len(chunk)
            if self.size > self._limits.max_size:
                raise too_large(self._name, self._kind, self._limits)
        except BaseException as e:
            self.failed = e
            raise
        if self._sha is not None:
            self._sha.update(chunk)
        kept = self._kept
        kept.append((self.size - len(chunk), chunk))
        low = self._pos - FORWARD_KEEP  # nothing before it is read again
        while kept and kept[0][0] + len(kept[0][1]) <= low:
            kept.popleft()
        return True

    def sha256(self) -> bytes:
        """The stream's sha256 so far (all zeros when not hashed)."""
        return NO_DIGEST if self._sha is None else self._sha.digest()

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes from the position; fewer only at the end."""
        if size < 0:
            raise io.UnsupportedOperation("a pass's stream is read by the size")
        want = self._pos + size
        while self.size < want and self._pull():
            pass
        pos, kept = self._pos, self._kept
        if pos >= min(want, self.size):
            return b""
        i = len(kept) - 1  # the chunk that holds pos: reads are near the end (small chunks: many kept)
        while i >= 0 and kept[i][0] > pos:
            i -= 1
        if i < 0:
            raise io.UnsupportedOperation(f"byte {pos} of the stream is no longer kept")
        parts = []
        while pos < want and i < len(kept):
            start, chunk = kept[i]
            parts.append(chunk[pos - start : want - start])
            pos = min(start + len(chunk), want)
            i += 1
        self._pos = pos
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        """Move the position: back within the kept bytes, forward any distance (decompressed on read)."""
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            self._to_end()
            offset += self.size
        elif whence != io.SEEK_SET:
            raise ValueError(f"invalid whence {whence}")
        if offset < 0:
            raise ValueError("negative seek position")
        if offset < min(self._pos, self.size) and (not self._kept or offset < self._kept[0][0]):
            raise io.UnsupportedOperation(f"cannot seek back to byte {offset}: the stream is read forward")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def run(self, consumer: Consumer | None) -> None:
        """Hand the stream to ``consumer`` (if any), then read it to the end: the whole pass."""
        if consumer is not None:
            try:
                consumer(self)
            except Exception:
                if self.failed is None:
                    raise
            if self.failed is not None:
                raise self.failed
        self._to_end()

    def _to_end(self) -> None:
        """Decompress the rest, keeping only its last bytes."""
        self._pos = max(self._pos, self.size)
        while self._pull():
            self._pos = max(self._pos, self.size)


class ReadAhead:
    """An iterator run in a thread of its own, up to ``depth`` items ahead of its reader.

    A pass's decompressor (rapidgzip releases the GIL) then runs while the thread that reads the
    stream hashes it and walks its tar headers (Python, holding the GIL): the two overlap on two
    CPUs where one thread would do them in turn. The items come out in order; an exception the
    iterator raises comes out where it stood. ``close`` stops the thread and waits for it (before
    the decompressor it uses is closed).
    """

    _END = object()

    def __init__(self, items: Iterator[bytes], depth: int = 4) -> None:
        self._items = items
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # the reader's to raise
            self._put(_Raised(e))

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        assert isinstance(item, bytes)
        return item

    def close(self) -> None:
        """Stop the thread (it ends at its next item) and wait for it."""
        self._stop.set()  # a put waiting on a full queue sees it within 0.1 s
        self._thread.join()


@dataclass(frozen=True, slots=True)
class _Raised:
    error: BaseException


class HighWater:
    """Turns positions into Progress increments, never counting a byte twice (a spill pass re-reads)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.high = 0

    def __call__(self, position: int) -> None:
        if position > self.high:
            self.progress(position - self.high)
            self.high = position


# -- the index payloads ---------------------------------------------------------------------------

# Every payload starts with: magic, uncompressed size, compressed size, sha256 of the uncompressed
# stream. The cache checks version and checksum; these fields check the entry belongs to ``raw``.
_HEAD = struct.Struct("<4sQQ32s")
NO_DIGEST = bytes(32)
U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Head:
    """The head of a stored index: which format, the stream's sizes and (if hashed) its sha256."""

    magic: bytes
    size: int
    compressed_size: int
    sha256: bytes

    def pack(self) -> bytes:
        """The head's bytes, as a payload starts with them."""
        return _HEAD.pack(self.magic, self.size, self.compressed_size, self.sha256)

    @property
    def digest(self) -> Digest | None:
        """The stream's sha256; None when the pass that built the entry did not hash (all zeros)."""
        return None if self.sha256 == NO_DIGEST else Digest("sha256", self.sha256.hex())


def unpack_head(payload: bytes, raw: Source, digest: bool, *magics: bytes) -> tuple[Head, bytes]:
    """The head and the rest of a stored payload for ``raw``.

    Raises ValueError for a payload of another format, Stale for one of other bytes (another
    compressed size) or without the digest asked for (built by a pass that did not hash).
    """
    if len(payload) < _HEAD.size:
        raise ValueError("payload cut short")
    head = Head(*_HEAD.unpack_from(payload))
    if head.magic not in magics:
        raise ValueError(f"format {head.magic!r}, not one of {magics!r}")
    if head.compressed_size != raw.size:
        raise Stale(f"built for {head.compressed_size} compressed bytes, not {raw.size}")
    if digest and head.digest is None:
        raise Stale("built without the stream's digest")
    return head, payload[_HEAD.size :]
