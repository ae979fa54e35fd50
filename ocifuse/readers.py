"""The process's one budget of decompressor memory: pooled gzip readers and decoded zstd frames.

Every decompressing source of the process draws on it, whatever the number of layers or mounts:
at most IDLE_READERS idle gzip readers stay open (least recently used closed first) and at most
ZSTD_KEPT_BYTES of decoded zstd frames are kept.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: every archive open and mount would pay for it otherwise
    import rapidgzip

from .errors import OcifuseError

# Idle gzip readers kept open in the whole process, across sources (~1 MiB each: a decoded chunk
# and its buffers): past this, the least recently used idle one is closed. A reader in use is never
# closed, and one continuing a sequential read is the most recently used: a ``cat`` of one blob
# keeps its reader whatever the number of layers.
IDLE_READERS = 8
# A read this far past where a reader stopped continues its stream (kernel read-ahead: 1 MiB requests).
SEQUENTIAL_AHEAD = 4 << 20
# Bytes of decoded zstd frames kept in memory, in the whole process (4 of the largest frames
# served in place, zstdsource.ZSTD_FRAME_INPLACE), least recently used first out: a sequential
# read needs the frame it is in.
ZSTD_KEPT_BYTES = 4 * (8 << 20)


class IdleReaders:
    """The process's idle gzip readers, least recently used first: at most IDLE_READERS stay open.

    Lock order: a pool's condition, then this lock; eviction takes this lock alone, then the pool's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: OrderedDict[_Reader, ReaderPool] = OrderedDict()

    def idle(self, reader: _Reader, pool: ReaderPool) -> None:
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


_idle_readers = IdleReaders()


@dataclass(slots=True, eq=False)
class _Reader:
    """A pooled reader: where its stream stands after its last (or current) read, and whether in use."""

    file: rapidgzip.RapidgzipFile
    position: int = -1
    busy: bool = False


class ReaderPool:
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


class KeptFrames:
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


kept_frames = KeptFrames()
