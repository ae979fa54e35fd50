"""Random-access byte sources: one small interface (size, pread, close) over wherever bytes live.

The read core separates *where bytes come from* (this module) from *what they mean* (the tar
scan, the layout, the rootfs merge). A table entry names a source and an offset in it; ``fs.read``
asks that source, whatever it is: a byte range of an open file (an uncompressed archive or a blob
inside one), bytes made in memory (a synthesized document), or a decompressing reader.
Implementations are chosen by magic bytes, never by file name (``sniff``).
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable

from .digest import Digest
from .errors import ArchiveChanged, LayoutOpenError

# preadv2(2) flag: fail with EAGAIN instead of waiting for the disk (Linux 4.14; buffered reads 5.9).
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


def _uninitialized_bytearray() -> Callable[[int], bytearray]:
    """``bytearray(n)`` without its zero fill, for a buffer that is served only once filled whole.

    ``bytearray(n)`` memsets its n bytes: ~21 µs of a 1 MiB request here, about a tenth of what the
    daemon spends reading it (bench/README.md). CPython's ``PyByteArray_FromStringAndSize(NULL, n)``
    leaves them as malloc gave them (~0.6 µs). Those bytes are stale memory of this process, so a
    buffer from here is returned only after a read that wrote every one of its bytes. Where the C
    API cannot be called (not CPython), plain ``bytearray``.
    """
    try:
        api = ctypes.pythonapi
    except AttributeError:
        return bytearray
    # A prototype of our own, not pythonapi's shared attribute: nobody else's restype is changed.
    proto = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)
    return functools.partial(proto(("PyByteArray_FromStringAndSize", api)), None)


_new_buffer = _uninitialized_bytearray()

# Magic numbers of the compressions an input may carry (RFC 1952 2.3.1; RFC 8878 3.1.1; xz and
# bzip2 file formats). Only gzip and zstd are read; the others are named in the refusal.
MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
}


def sniff(head: bytes) -> str | None:
    """The compression whose magic ``head`` starts with, or None for anything else (plain bytes)."""
    for prefix, kind in MAGIC.items():
        if head.startswith(prefix):
            return kind
    # RFC 8878 3.1.2: a zstd stream may open with a skippable frame, magic 0x184D2A50..5F (pzstd does).
    if len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
        return "zstd"
    return None


def clip(limit: int, offset: int, size: int) -> int:
    """How many of ``size`` bytes from ``offset`` lie inside ``limit`` bytes (0 for a bad offset)."""
    return 0 if offset < 0 else max(0, min(size, limit - offset))


class Source(ABC):
    """Random-access bytes: ``size`` of them, read with ``pread``; never a byte past ``size``."""

    size: int
    # What the bytes are stored as: "plain", "gzip", "zstd", "memory" (inspect and fsck say it).
    compression: str = "plain"
    # The sha256 of the decompressed stream, for sources that decompress (a layer's DiffID).
    uncompressed_digest: Digest | None = None

    @abstractmethod
    def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset``, clipped to the source's end; short only at the end.

        Raises an OcifuseError (EIO hint) when the bytes cannot be had as they were at open.
        """

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        """The same bytes, but only if they can be had without blocking; None when they cannot.

        The FUSE loop calls this on its own thread and sends a None to a worker thread. Only
        sources that can answer from the page cache at no risk of waiting return anything.
        """
        return None

    def clip(self, offset: int, size: int) -> int:
        """How many of ``size`` bytes from ``offset`` lie inside the source (0 for a bad offset)."""
        return clip(self.size, offset, size)

    def close(self) -> None:  # noqa: B027  (most sources hold nothing of their own)
        """Release what the source holds (an fd, a decompressor); reads fail afterwards."""


class Origin(ABC):
    """Where an archive is kept: a local file (archive.FileOrigin) or a remote object (remote.RemoteObject).

    An archive is opened from one: its bytes as a Source, and an identity that keys what is
    derived from them in the index cache (a file's device, inode, size, mtime and ends; a remote
    object's URL without secrets, ETag and size).
    """

    name: str  # how messages name it: a path, or a URL without userinfo or query string
    size: int
    mtime: float  # seconds since the epoch (a mount's root directory shows it)

    @abstractmethod
    def source(self) -> Source:
        """The whole object as a Source, valid until ``close``."""

    @abstractmethod
    def identity(self) -> str | None:
        """The key of what is derived from these bytes in the index cache (None: nothing may be kept);
        raises LayoutOpenError."""

    @abstractmethod
    def close(self) -> None:
        """Release the file or connection."""


class OpenFile:
    """One regular file opened read-only for the life of a mount, with its identity at open.

    Every read checks the identity (size, mtime, inode) first: an archive truncated or rewritten
    in place under a mount answers EIO (ArchiveChanged), never bytes of another file.
    """

    def __init__(self, path: str, fd: int | None = None) -> None:
        """Open ``path`` read-only, or take ``fd``, already open on it (closed with this object)."""
        self.path = path
        if fd is None:
            try:
                # O_NONBLOCK: opening a fifo given as the archive must not wait for a writer (it is
                # refused as not a regular file); cleared again below for a regular file.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise LayoutOpenError(path, e.strerror or str(e)) from e
            else:
                os.set_blocking(fd, True)
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise LayoutOpenError(path, e.strerror or str(e)) from e
        self.fd = fd
        self.stat = st
        self.size = st.st_size
        self.is_regular = stat.S_ISREG(st.st_mode)
        self._identity = (st.st_size, st.st_mtime_ns, st.st_ino)

    def check_unchanged(self) -> None:
        """Raise ArchiveChanged when the file was truncated or rewritten in place since opening."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self._identity:
            raise ArchiveChanged(self.path)

    def close(self) -> None:
        """Close the fd (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileRange(Source):
    """``size`` bytes of an open file from byte ``start``: today's archive reads, by pread."""

    def __init__(self, file: OpenFile, start: int = 0, size: int | None = None) -> None:
        self.file = file
        self.start = start
        self.size = file.size - start if size is None else size

    def pread(self, offset: int, size: int) -> bytes:
        size = self.clip(offset, size)
        if size == 0:
            return b""
        self.file.check_unchanged()
        data = os.pread(self.file.fd, size, self.start + offset)
        if len(data) != size:
            raise ArchiveChanged(self.file.path)
        return data

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        """One ``preadv2(RWF_NOWAIT)`` (Linux 5.9 for buffered reads) straight into the buffer returned.

        None when any byte would have to come from the disk, or the read comes up short for any
        other reason: the caller then reads with ``pread`` in a worker thread, which also tells a
        truncated archive (ArchiveChanged) from an uncached one.
        """
        size = self.clip(offset, size)
        if size == 0:
            return bytearray()
        if not _RWF_NOWAIT:
            return None  # no way to ask for "only if cached": every read goes to a worker thread
        self.file.check_unchanged()
        buf = _new_buffer(size)  # not zero-filled: returned only if the preadv filled every byte
        try:
            done = os.preadv(self.file.fd, [buf], self.start + offset, _RWF_NOWAIT)
        except OSError:  # EAGAIN: not all cached; EOPNOTSUPP: no RWF_NOWAIT on this file
            return None
        return buf if done == size else None


class SubRange(Source):
    """``size`` bytes of another source from ``start`` (an uncompressed blob inside a compressed tar)."""

    def __init__(self, parent: Source, start: int, size: int) -> None:
        self.parent = parent
        self.start = start
        self.size = size
        self.compression = parent.compression

    def pread(self, offset: int, size: int) -> bytes:
        size = self.clip(offset, size)
        return self.parent.pread(self.start + offset, size) if size else b""

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        size = self.clip(offset, size)
        return self.parent.pread_cached(self.start + offset, size) if size else bytearray()


def sub_range(parent: Source, start: int, size: int) -> Source:
    """A range of ``parent``; a range of a file range is a file range (one pread, no extra hop)."""
    if isinstance(parent, FileRange):
        found = FileRange(parent.file, parent.start + start, size)
        found.compression = parent.compression  # a range of a zstd spill file is zstd's bytes
        return found
    return SubRange(parent, start, size)


class MemorySource(Source):
    """Bytes made in memory (a synthesized ``index.json`` or manifest)."""

    compression = "memory"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def pread(self, offset: int, size: int) -> bytes:
        size = self.clip(offset, size)
        return self.data[offset : offset + size]

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        return bytearray(self.pread(offset, size))


class SourceFile(io.RawIOBase):
    """A read-only, seekable file object over a Source, for libraries that want one (tarfile, rapidgzip).

    ``fileno()`` raises io.UnsupportedOperation on purpose: rapidgzip and indexed_gzip read from
    byte 0 of an object's fd when it has one, which for a blob inside a tar is the wrong byte.
    """

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a byte source has no file descriptor of its own")

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.source.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.source.size - self._pos)
        data = self.source.pread(self._pos, size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        n = len(data)
        memoryview(buffer)[:n] = data
        return n
