"""The portable index: what the index cache would hold for one archive, in one file a fleet shares.

``ocifuse index ARCHIVE -o FILE`` (makeindex.py) opens the archive through the front door with a
``RecordingStore``, which keeps every artifact stored during the open, and writes them here;
``-o index=PATH|URL`` reads them back through an ``IndexedStore``, consulted after the local
cache. Nothing in the file is trusted before it is checked:

- its size is bounded (MAX_SIZE) before anything is read, and so is its directory;
- a magic, a format version, and a sha256 over the whole file (a flipped or missing byte);
- the identity of the archive it was made from, which must be the archive's being opened: its
  size and the sha256 of its first and last MiB (cache.ends_sha256). Unlike the cache's keys
  (device and inode, or URL and ETag), it is the same wherever the bytes lie: a local file, an
  http(s) or s3 URL, on any machine. Only what is derived from the outer archive itself (its
  entry table, gzip seek points or zstd frame table, docker-archive member digests) rides on it;
- what is derived from a layer or an image is kept under its digest, as in the cache (a layer's
  table and index under the blob's digest, a merged tree under the manifest's): it is looked up
  only when the archive's own documents (read through the checked table) name that digest, and
  each payload is still decoded as untrusted input (store.load_or_build), as a cache entry is;
- each record's own sha256 is checked again when it is read (the file may change after it was).

A mismatched, stale or damaged index is one warning, then ignored: everything is built as without
it. Spill files (large zstd frames decompressed to disk) are not portable: an index holds none,
and a layer that needs one is decompressed by the machine that mounts it.

File layout (little endian)::

    MAGIC | u32 format version | u32 len(directory) | directory (JSON) | payloads | sha256 of all before

The directory: ``{"archive": {"size", "ends", "name"}, "records": [[kind, version, key, offset,
size, sha256], ...]}``, offsets counted from the first payload byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import struct
import tempfile
import weakref
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from .cache import ends_sha256, version_of
from .errors import OcifuseError
from .source import Origin
from .store import KINDS, REMOTE_BLOCK, Store
from .urls import RemoteOptions, is_url, redact

log = logging.getLogger(__name__)

MAGIC = b"OCIFIDX\x1a"
FORMAT = 1
_HEAD = struct.Struct("<8sII")
_CHECKSUM = 32
# The largest index read (untrusted input, and a URL's is downloaded whole before it is checked):
# an archive of 30 GB and 100,000 files has an index of about 100-200 MiB (a gzip seek point every
# few MiB with its 32 KiB window, compressed; its entry tables and trees).
MAX_SIZE = 1 << 30
MAX_DIRECTORY = 16 << 20
# The key in the file of what is derived from the outer archive (its identity is the file's own).
ARCHIVE = "archive"
# What an index holds: every kind but the blocks of a remote object (remote.py keeps them locally).
PORTABLE_KINDS = frozenset(k for k in KINDS if k != REMOTE_BLOCK.kind)
_PART = 8 << 20


class UnusableIndex(OcifuseError):
    """An index file that cannot be used (its one-line reason); a warning, never an error of a mount."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """An archive's identity wherever its bytes lie: its size and the sha256 of its ends."""

    size: int
    ends: str

    def __str__(self) -> str:
        return f"{self.size} bytes, ends {self.ends[:16]}"


def identity_of(origin: Origin) -> Identity:
    """The portable identity of an open archive (reads its first and last MiB)."""
    source = origin.source()
    return Identity(size=origin.size, ends=ends_sha256(source.pread, origin.size))


@dataclass(frozen=True, slots=True)
class _Record:
    offset: int
    size: int
    sha256: bytes


class PortableIndex:
    """An index file, checked whole (size bound, magic, version, checksum); records read on demand."""

    def __init__(self, fd: int, name: str) -> None:
        """Check the index file open at ``fd``, owned once this returns; UnusableIndex says why not."""
        self.name = name
        self._fd = fd
        self._broken = False
        size = os.fstat(fd).st_size
        if size > MAX_SIZE:
            raise UnusableIndex(f"{size} bytes, more than the {MAX_SIZE >> 20} MiB an index may have")
        if size < _HEAD.size + _CHECKSUM:
            raise UnusableIndex("truncated (not even a header)")
        head = os.pread(fd, _HEAD.size, 0)
        magic, version, dir_len = _HEAD.unpack(head)
        if magic != MAGIC:
            raise UnusableIndex("not an ocifuse index")
        if version != FORMAT:
            raise UnusableIndex(f"index format {version}, this ocifuse reads {FORMAT}")
        if dir_len > MAX_DIRECTORY or _HEAD.size + dir_len + _CHECKSUM > size:
            raise UnusableIndex("truncated, or a directory of the wrong length")
        h = hashlib.sha256()
        done = 0
        while done < size - _CHECKSUM:
            chunk = os.pread(fd, min(_PART, size - _CHECKSUM - done), done)
            if not chunk:
                raise UnusableIndex("truncated while read")
            h.update(chunk)
            done += len(chunk)
        if h.digest() != os.pread(fd, _CHECKSUM, size - _CHECKSUM):
            raise UnusableIndex("checksum mismatch (damaged, truncated or altered)")
        self._base = _HEAD.size + dir_len
        payload_end = size - _CHECKSUM - self._base
        try:
            directory = json.loads(os.pread(fd, dir_len, _HEAD.size))
            archive = directory["archive"]
            self.identity = Identity(size=_int(archive["size"]), ends=_str(archive["ends"]))
            self.archive_name = _str(archive.get("name", "?"))
            self._records: dict[tuple[str, str], _Record] = {}
            stale = 0
            for row in directory["records"]:
                kind, rversion, key, offset, rsize, digest = row
                kind, key = _str(kind), _str(key)
                offset, rsize = _int(offset), _int(rsize)
                if offset + rsize > payload_end:
                    raise ValueError("a record past the end of the file")
                if kind not in PORTABLE_KINDS or _int(rversion) != version_of(kind):
                    stale += 1  # a kind this ocifuse does not know, or of another format version
                    continue
                self._records[(kind, key)] = _Record(offset, rsize, bytes.fromhex(_str(digest)))
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:  # JSON nested deep
            raise UnusableIndex(f"unusable directory ({e})") from e
        if stale:
            log.warning(
                "index %s: %d records written by another version of ocifuse ignored (they are built)",
                name,
                stale,
            )
        weakref.finalize(self, _close_quietly, fd)  # the fd is the index's from here on

    def __len__(self) -> int:
        return len(self._records)

    def get(self, kind: str, key: str) -> bytes | None:
        """The payload of record (kind, key), checked against its sha256; None when absent or damaged."""
        record = self._records.get((kind, key))
        if record is None or self._broken:
            return None
        try:
            data = os.pread(self._fd, record.size, self._base + record.offset)
        except OSError as e:
            data, why = b"", e.strerror or str(e)
        else:
            why = "a record that does not match its checksum (the file changed)"
        if len(data) == record.size and hashlib.sha256(data).digest() == record.sha256:
            return data
        self._broken = True
        log.warning("index %s: %s: ignored from now on", self.name, why)
        return None


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not a size: {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def open_index(spec: str, remote: RemoteOptions | None = None) -> PortableIndex | None:
    """The index at ``spec`` (a path or a URL), checked; None (and one warning) when it cannot be used."""
    shown = redact(spec) if is_url(spec) else spec
    try:
        fd = _fetch(spec, remote) if is_url(spec) else _open_local(spec)
        try:
            return PortableIndex(fd, shown)
        except BaseException:
            _close_quietly(fd)
            raise
    except UnusableIndex as e:
        log.warning("index %s not used: %s", shown, e)
    except OcifuseError as e:
        log.warning("index %s not used: %s", shown, str(e).removeprefix(f"{shown}: "))
    except OSError as e:
        log.warning("index %s not used: %s", shown, e.strerror or e)
    return None


def _open_local(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang the mount
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnusableIndex("not a regular file")
    return fd


def _fetch(url: str, options: RemoteOptions | None) -> int:
    """The index at ``url`` downloaded into a nameless temporary file (at most MAX_SIZE bytes)."""
    from .remote import RemoteObject  # the client only for a URL

    obj = RemoteObject(url, options, None)
    try:
        if obj.size > MAX_SIZE:
            raise UnusableIndex(f"{obj.size} bytes, more than the {MAX_SIZE >> 20} MiB an index may have")
        with tempfile.TemporaryFile() as f:
            for start in range(0, obj.size, _PART):
                f.write(obj.fetch(start, min(obj.size, start + _PART)))
            f.flush()
            return os.dup(f.fileno())
    finally:
        obj.close()


class IndexedStore:
    """The local cache, then a portable index for what it lacks; what is built goes to the cache only.

    What is loaded from the index is not copied into the cache: a cache entry under a layer's
    digest is one this machine built from a blob it hashed (image.VerifiedStore), and stays so.
    """

    def __init__(self, index: PortableIndex, cache: Store | None, archive_key: str, local: bool) -> None:
        """``archive_key``: the key the archive's own artifacts are asked under; ``local``: whether
        the cache may keep them under it (False when the archive has no cache identity of its own)."""
        self.index = index
        self.cache = cache if cache is not None and cache.enabled else None
        self.archive_key = archive_key
        self._local = local

    @property
    def enabled(self) -> bool:
        """Always: the index is there to be read."""
        return True

    def _cache_for(self, key: str) -> Store | None:
        return self.cache if key != self.archive_key or self._local else None

    def load(self, kind: str, key: str) -> bytes | None:
        """The cache's entry, else the index's record (the archive's own under ARCHIVE)."""
        cache = self._cache_for(key)
        found = cache.load(kind, key) if cache is not None else None
        if found is None:
            found = self.index.get(kind, ARCHIVE if key == self.archive_key else key)
            if found is not None:
                log.debug("%s %s from the index %s", kind, key, self.index.name)
        return found

    def store(self, kind: str, key: str, payload: bytes) -> None:
        """Into the cache (the index is read-only)."""
        cache = self._cache_for(key)
        if cache is not None:
            cache.store(kind, key, payload)

    def spill_path(self, key: str) -> str | None:
        """The cache's (an index holds no spill files)."""
        cache = self._cache_for(key)
        return cache.spill_path(key) if cache is not None else None

    def lock(self, kind: str, key: str) -> AbstractContextManager[bool]:
        """The cache's lock for what the cache would keep; none for what only the index holds."""
        cache = self._cache_for(key)
        return cache.lock(kind, key) if cache is not None else contextlib.nullcontext(False)


def with_index(origin: Origin, cache: Store | None, index: PortableIndex) -> tuple[IndexedStore, str] | None:
    """The store and the archive's key for ``origin`` with ``index``; None (one warning) when the
    index is for another archive, or another version of this one."""
    found = identity_of(origin)
    if found != index.identity:
        log.warning(
            "index %s not used: made for %s (%s), not for %s (%s)",
            index.name,
            index.archive_name,
            index.identity,
            origin.name,
            found,
        )
        return None
    local = origin.identity() if cache is not None and cache.enabled else None
    key = local if local is not None else f"{ARCHIVE}:{found.size}:{found.ends}"
    log.info("%s: index %s (%d records)", origin.name, index.name, len(index))
    return IndexedStore(index, cache, key, local is not None), key


class RecordingStore:
    """A store in memory that keeps every portable artifact stored in it: what ``ocifuse index`` writes."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}
        self.identity: Identity | None = None
        self.name = ""

    @property
    def enabled(self) -> bool:
        """Always."""
        return True

    def bind(self, origin: Origin) -> str:
        """Take ``origin``'s identity as the archive's; its artifacts are kept under ARCHIVE."""
        self.identity = identity_of(origin)
        self.name = origin.name
        return ARCHIVE

    def load(self, kind: str, key: str) -> bytes | None:
        """What was stored (a layer shared by two images is built once)."""
        return self.records.get((kind, key))

    def store(self, kind: str, key: str, payload: bytes) -> None:
        """Keep it, unless it is a remote object's block (not portable, and large)."""
        if kind in PORTABLE_KINDS:
            self.records[(kind, key)] = payload

    def spill_path(self, key: str) -> str | None:
        """None: a spill is not portable (a nameless temp file, and its zstd entry is not stored)."""
        return None

    def lock(self, kind: str, key: str) -> AbstractContextManager[bool]:
        """No lock: one process records in memory."""
        return contextlib.nullcontext(False)

    def encode(self) -> bytes:
        """The index file's bytes."""
        if self.identity is None:
            raise ValueError("no archive was opened")
        rows: list[list[Any]] = []
        offset = 0
        for (kind, key), payload in sorted(self.records.items()):
            digest = hashlib.sha256(payload).hexdigest()
            rows.append([kind, version_of(kind), key, offset, len(payload), digest])
            offset += len(payload)
        archive = {"size": self.identity.size, "ends": self.identity.ends, "name": self.name}
        directory = json.dumps({"archive": archive, "records": rows}, separators=(",", ":")).encode()
        h = hashlib.sha256()
        parts = [_HEAD.pack(MAGIC, FORMAT, len(directory)), directory]
        parts += [payload for _, payload in sorted(self.records.items())]
        for part in parts:
            h.update(part)
        data = b"".join(parts) + h.digest()
        if len(data) > MAX_SIZE:
            raise ValueError(f"the index would be {len(data)} bytes, more than {MAX_SIZE >> 20} MiB")
        return data
