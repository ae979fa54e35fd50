"""The persistent index: content-keyed, versioned, checksummed entries in one private directory.

What takes seconds to build (a tar entry table of 100,000 members, a gzip seek-point index) is
stored here once and loaded on the next open. An entry is never trusted beyond what it proves:
its file is read with ``O_NOFOLLOW`` from a directory this user owns and no one else may write,
it must be a regular file owned by this user, carry this version, this kind and this key, and its
checksum must match. Anything else is logged, removed and rebuilt. Writes are atomic (a temp file
in the same directory, fsync for the kinds worth it, rename), so two processes storing one entry
at once leave one whole entry, never a mix; a failing disk is one warning, after which the process
stores nothing more, never an error of the mount. An absent entry is built under a lock file of
its own (``lock``, flock): of the processes opening one new archive at once, one builds it and the
others wait, then load it.

The directory is bounded (``-o cache_max=SIZE``; by default the smaller of 10 GiB and 10% of its
filesystem): after each store, the least recently used keys go, each with all its files (its
entries of every kind and its spill file: used together, useless apart), until the total is within
the bound again. The key just stored always stays, so the directory holds at most the bound plus
one key's files. A key's last use is the latest access time of its files, which a load sets on the
entry it reads (futimens on the open fd, its mtime kept: the mtime says when it was written, and a
zstd-index entry names its spill file by inode and mtime). Removing what a live mount uses does it
no harm: an entry is read whole when it is loaded, and a spill file is read through the fd the
mount holds open, which keeps its data until the mount closes it.

Entry file layout (little endian)::

    magic "OCIFUSE\\x1a" | u32 version | u16 len(kind) | u16 len(key) | u64 len(payload)
    | kind | key | payload | checksum over everything before it

The checksum is the kind's (store.Artifact.checksum): a sha256 (SHA-NI: ~1 GB/s, 3x blake2b
here), or for remote blocks, bulk data loaded at disk speed, a crc32 (~3.6 GB/s here): the
directory is writable by this user only, so what a checksum guards against is damage (a torn or
lost write, a bad sector), which a crc32 detects, not forgery (docs/security.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .digest import Digest
from .errors import LayoutOpenError
from .source import OpenFile
from .store import KINDS, Stale
from .units import human_age, human_size

log = logging.getLogger(__name__)

# The framing's version, which every entry carried before kinds had versions of their own; an
# entry's header now carries its kind's version (store.KINDS), and each kind starts at this one.
# Bump a kind's version in store.py when its payload changes; bump this when the framing does.
CACHE_VERSION = 2

MAGIC = b"OCIFUSE\x1a"
_HEADER = struct.Struct("<8sIHHQ")
# Each checksum (store.Artifact.checksum): its size and how it is taken over an entry's pieces.
CHECKSUMS: dict[str, int] = {"sha256": 32, "crc32": 4}
# How much of each end of an outer archive ``file_key`` hashes.
KEY_SPAN = 1 << 20
# Kinds name files: lowercase words joined by dashes ("table", "gzip-index").
_KIND = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# An entry's file name: its kind, a dot, 32 hex digits of the key's hash.
_ENTRY_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*\.[0-9a-f]{32}")
_TMP_PREFIX = ".tmp."
_SPILL_PREFIX = "spill."
# The lock file of an entry being built: ".lock.<kind>.<hash>" (IndexCache.lock).
_LOCK_PREFIX = ".lock."
# What a lock's holder writes in it when it leaves with its entry unstored (IndexCache.lock).
_UNSTORED = b"built, not stored\n"
# What ``clear`` removes besides entries (never a name not ours).
_OURS = (_TMP_PREFIX, _SPILL_PREFIX, _LOCK_PREFIX)
# The writer's pid in a temp file's name: ".tmp.<kind>.<hash>.<pid>.<hex>" (store), ".tmp.spill-<pid>-..."
_TMP_PID = re.compile(r"\.tmp\.(?:spill-(\d+)-.*|.*\.(\d+)\.[0-9a-f]{8})")
# A temp file is left over when its writer is dead, or unchanged this long (a writer writes on;
# a pid may be reused, and one of another pid namespace looks alive or dead by chance).
STALE_TEMP_AGE = 24 * 3600
# The default bound of the directory: the smaller of DEFAULT_MAX and 1/DEFAULT_MAX_SHARE of its
# filesystem (docs/cache.md says why).
DEFAULT_MAX = 10 << 30
DEFAULT_MAX_SHARE = 10
# A process counts the directory again (listdir and a stat per file) once it has stored this share
# of the bound since it last counted, and whenever its running total passes the bound: not on
# every store (thousands of remote blocks per GiB read). Others' stores since the count are unseen
# until then, so N writers at once can hold the directory over its bound by about N/16 of it.
_RECOUNT_SHARE = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheEntryInfo:
    """One file of the cache directory, as ``ocifuse cache list`` shows it."""

    kind: str  # the entry's kind; "spill" for a spill file, "?" for an unreadable entry
    key: str  # the entry's key; a spill file's name hash
    size: int  # bytes on disk
    mtime: float  # when it was written (seconds since the epoch)
    used: float  # when its key was last used (loaded or stored): eviction goes by it, oldest first
    name: str  # the file's name in the directory


@dataclass(frozen=True, slots=True, kw_only=True)
class _File:
    """A file of the cache directory, as eviction sees it (no header read)."""

    name: str
    group: str  # the hash of its key: a key's entries and spill file are used, and go, together
    size: int
    mtime: float
    used_ns: int  # its last use: its atime (set by a load), or its mtime if later (a write)


def _key_hash(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _name(kind: str, key: str) -> str:
    """The file name of entry (kind, key): the key is hashed, since keys hold ':' and '/'."""
    return f"{kind}.{_key_hash(key)}"


def version_of(kind: str) -> int:
    """The format version of entries of ``kind``: its version in store.KINDS, never below the framing's."""
    return max(CACHE_VERSION, KINDS[kind].version)


def encode(kind: str, key: str, payload: bytes) -> bytes:
    """The bytes of one entry file (what ``store`` writes)."""
    return b"".join(_framed(kind, key, payload))


def _framed(kind: str, key: str, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """An entry file's bytes in three pieces (head, payload, checksum): written as they are, no copy."""
    kind_b, key_b = kind.encode(), key.encode()
    head = _HEADER.pack(MAGIC, version_of(kind), len(kind_b), len(key_b), len(payload)) + kind_b + key_b
    return head, payload, _checksum(kind, head, payload)


def _checksum(kind: str, head: bytes, payload: bytes) -> bytes:
    """The checksum of an entry of ``kind`` whose bytes are ``head`` then ``payload``."""
    if KINDS[kind].checksum == "crc32":  # zlib releases the GIL over the payload, as hashlib does
        return zlib.crc32(payload, zlib.crc32(head)).to_bytes(4, "little")
    h = hashlib.sha256(head)
    h.update(payload)
    return h.digest()


def _head(head: bytes, kind: str | None = None) -> tuple[int, int, int]:
    """(len(kind), len(key), len(payload)) of an entry's first bytes; ValueError when not an entry of ours.

    With ``kind``: Stale when the entry is of another format version than this ocifuse writes for it.
    """
    if len(head) < _HEADER.size:
        raise ValueError("truncated")
    magic, version, kind_len, key_len, payload_len = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise ValueError("not a cache entry")
    if kind is not None and version != version_of(kind):
        raise Stale(f"format version {version}, this ocifuse reads {version_of(kind)}")
    return kind_len, key_len, payload_len


class IndexCache:
    """Content-keyed, versioned, checksummed entries in one directory; None directory = disabled."""

    def __init__(self, directory: str | None, max_size: int | None = None) -> None:
        self.directory = directory
        self.max_size = max_size  # the bound in bytes (-o cache_max); None: default_bound()
        self._warned = False
        self._swept = False
        # Why this process stores nothing more here (a full or read-only disk): said once, as a warning.
        self._no_store: str | None = None
        # The directory's total as last counted, plus what this process stored since (None: count it).
        self._total: int | None = None
        self._uncounted = 0  # bytes stored since the last count

    @classmethod
    def default(cls, max_size: int | None = None) -> IndexCache:
        """$XDG_CACHE_HOME/ocifuse (~/.cache/ocifuse); /var/cache/ocifuse for root."""
        return cls(default_directory(), max_size)

    def __repr__(self) -> str:
        return f"IndexCache({self.directory!r}, max_size={self.max_size!r})"

    def bound(self) -> int | None:
        """The bound of the directory in bytes: ``max_size``, else the default for its filesystem.

        None when the cache is disabled.
        """
        if self.directory is None:
            return None
        if self.max_size is not None:
            return self.max_size
        path = os.path.abspath(self.directory)
        while True:  # the filesystem it is (or would be) on
            try:
                return default_bound(os.statvfs(path))
            except OSError:
                if os.path.dirname(path) == path:
                    return DEFAULT_MAX
                path = os.path.dirname(path)

    @property
    def enabled(self) -> bool:
        """False for ``-o nocache``: nothing is loaded or stored (a directory may still prove unusable)."""
        return self.directory is not None

    # -- the directory ---------------------------------------------------------------------------

    def _unusable(self, reason: str, *, unsafe: bool = False) -> None:
        """Say once why the directory is not used: a warning, unless it is the default and out of reach.

        A default the user did not ask for that cannot be made or opened (no home directory, as for
        ``nobody``; a read-only one) is only a debug line: everything works without the cache. One
        asked for (``--cache DIR``, ``-o cache=DIR``) is warned about, and so is any directory that
        is there but ``unsafe`` (a symlink, another user's, writable by others): someone may be
        tampering with it.
        """
        if self._warned:
            return
        self._warned = True
        quiet = not unsafe and self.directory == default_directory()
        (log.debug if quiet else log.warning)("index cache %s not used: %s", self.directory, reason)

    def _dir_fd(self, create: bool) -> int | None:
        """The cache directory's fd, or None when it is disabled, missing (and not created) or unsafe.

        Safe means: the directory itself, not a symlink to one (O_NOFOLLOW), owned by this euid,
        and writable by no one else (who could otherwise plant, swap or remove entries).
        """
        if self.directory is None:
            return None
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.directory, flags)
            except FileNotFoundError:
                if not create:
                    return None
                # XDG base directory spec: directories it creates are 0700; so is ours.
                os.makedirs(os.path.dirname(os.path.abspath(self.directory)), mode=0o700, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.directory, 0o700)
                fd = os.open(self.directory, flags)
        except OSError as e:
            symlink = e.errno in (errno.ELOOP, errno.ENOTDIR)
            self._unusable(
                "a symlink or not a directory (give the real path)" if symlink else str(e.strerror or e),
                unsafe=symlink,
            )
            return None
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            self._unusable(str(e.strerror or e))
            return None
        if st.st_uid != os.geteuid():
            self._unusable(f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})", unsafe=True)
        elif st.st_mode & 0o022:
            mode = stat.S_IMODE(st.st_mode)
            self._unusable(f"writable by others (mode {mode:o}; chmod 700 it)", unsafe=True)
        else:
            return fd
        os.close(fd)
        return None

    @contextlib.contextmanager
    def _open_dir(self, create: bool) -> Iterator[int | None]:
        """``_dir_fd`` as a context: the fd is closed at the end; the first write sweeps left-over temps."""
        fd = self._dir_fd(create)
        try:
            if fd is not None and create and not self._swept:
                self._swept = True
                _sweep(fd)
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    # -- entries ---------------------------------------------------------------------------------

    def load(self, kind: str, key: str) -> bytes | None:
        """The payload stored under (kind, key), or None: absent, damaged, foreign, or disabled.

        A damaged entry (truncated, bad checksum, other version, not a regular file of this
        user's, a symlink) is logged and removed, so the caller rebuilds and stores it again.
        """
        name = _name(_check_kind(kind), key)
        with self._open_dir(create=False) as dfd:
            if dfd is None:
                return None
            try:
                payload = _read_entry(name, dfd, kind, key)
            except FileNotFoundError:
                return None
            except OSError as e:
                problem = "a symlink" if e.errno == errno.ELOOP else (e.strerror or str(e))
                self._discard(dfd, name, kind, key, problem)
                return None
            except Stale as e:
                log.info("index cache entry %s %s out of date (%s): rebuilding it", kind, key, e)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)
                return None
            except ValueError as e:
                self._discard(dfd, name, kind, key, str(e))
                return None
        log.debug("index cache hit: %s %s (%d bytes)", kind, key, len(payload))
        return payload

    def _discard(self, dfd: int, name: str, kind: str, key: str, problem: str) -> None:
        log.warning("index cache entry %s %s ignored (%s): rebuilding it", kind, key, problem)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dfd)  # unlink never follows a symlink; the directory is ours

    def store(self, kind: str, key: str, payload: bytes) -> None:
        """Store ``payload`` under (kind, key): atomically, mode 0600; errors are logged, never raised."""
        name = _name(_check_kind(kind), key)
        if self._no_store is not None:
            return
        pieces = _framed(kind, key, payload)
        size = sum(len(piece) for piece in pieces)
        with self._open_dir(create=True) as dfd:
            if dfd is None:
                return
            tmp = f"{_TMP_PREFIX}{name}.{os.getpid()}.{os.urandom(4).hex()}"
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dfd,
                )
                try:
                    for piece in pieces:
                        view = memoryview(piece)
                        while view:
                            view = view[os.write(fd, view) :]
                    if KINDS[kind].durable:  # store.Artifact.durable says which kinds are worth it
                        os.fsync(fd)
                finally:
                    os.close(fd)
                # rename(2) is atomic: readers see the old entry or the new one, never part of one,
                # and of two writers the last rename wins with a whole entry.
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)  # nothing half-written stays behind
                # A full, read-only or failing disk stays so for a while: one warning, and this
                # process goes on without storing (what it loads still serves; damaged is refused).
                self._no_store = str(e.strerror or e)
                log.warning(
                    "index cache entry %s %s not stored: %s; nothing more is stored in %s by this "
                    "process, which works on without it",
                    kind,
                    key,
                    self._no_store,
                    self.directory,
                )
                return
            except BaseException:  # a mount stopped (daemon._Stopped) while it stored: no part stays
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            log.debug("index cache stored: %s %s (%d bytes)", kind, key, len(payload))
            self._evict(dfd, size, keep=_key_hash(key))

    def _evict(self, dfd: int, added: int, *, keep: str) -> None:
        """Remove the least recently used keys until the directory is within its bound; never ``keep``.

        ``added``: the bytes just stored. The directory is counted again only when the running
        total passes the bound or a share of it was stored since the last count (_RECOUNT_SHARE).
        """
        try:
            bound = self.max_size if self.max_size is not None else default_bound(os.fstatvfs(dfd))
        except OSError:
            return
        if self._total is not None:
            self._total += added
            self._uncounted += added
            if self._total <= bound and self._uncounted <= bound // _RECOUNT_SHARE:
                return
        files = _files(dfd)
        count, freed = _prune(dfd, files, bound=bound, keep=keep)
        self._total, self._uncounted = sum(f.size for f in files) - freed, 0
        if count:
            log.info(
                "index cache: %d least recently used files removed (%s) to stay within %s",
                count,
                human_size(freed),
                human_size(bound),
            )

    def spill_path(self, key: str) -> str | None:
        """Where a large derived file (a zstd spill) for ``key`` may live; None when disabled or unsafe.

        The directory is checked (ours, private) and created; open the path with O_NOFOLLOW.
        """
        if self._no_store is not None:
            return None
        with self._open_dir(create=True) as dfd:
            if dfd is None or self.directory is None:
                return None
        # A spill is linked into the directory outside ``store``, just before the zstd-index entry
        # naming it is stored under the same key: that store counts the directory again, spill and all.
        self._total = None
        return os.path.join(self.directory, _SPILL_PREFIX + _key_hash(key))

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[bool]:
        """Held while (kind, key) is built; gives True when the holder before built it and stored nothing.

        A lock file per entry, ``flock``ed: the kernel releases it when its holder dies, however it
        dies, and the next waiter then builds it while the others wait on. A holder that leaves
        with the entry still absent (not worth storing, a full disk, a build that failed) says so
        in the file: its waiters then build at once, side by side, rather than one after another
        for nothing. The holder removes the file; a waiter that then holds a removed file (and no
        such word) takes the one there now. Without a usable directory (or one this process no
        longer writes) nothing is locked.
        """
        entry = _name(_check_kind(kind), key)
        name = _LOCK_PREFIX + entry
        with self._open_dir(create=True) as dfd:
            held = None if dfd is None or self._no_store is not None else _acquire(dfd, name, kind, key)
            if dfd is None or held is None:
                yield False
                return
            fd, unstored = held
            try:
                yield unstored
            finally:
                try:
                    os.stat(entry, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    with contextlib.suppress(OSError):
                        os.pwrite(fd, _UNSTORED, 0)
                except OSError:
                    pass
                _release(dfd, name, fd)

    def entries(self) -> list[CacheEntryInfo]:
        """Every entry and spill file in the directory (``ocifuse cache list``), least recently used first."""
        out: list[CacheEntryInfo] = []
        with self._open_dir(create=False) as dfd:
            if dfd is None:
                return out
            files = _files(dfd)
            used = _group_use(files)
            # Least recently used first, a key's files together: the order eviction takes them.
            for f in sorted(files, key=lambda f: (used[f.group], f.group, f.name)):
                if f.name.startswith(_SPILL_PREFIX):
                    kind, key = "spill", f.group
                else:
                    kind, key = _peek(f.name, dfd)
                out.append(
                    CacheEntryInfo(
                        kind=kind, key=key, size=f.size, mtime=f.mtime, used=used[f.group] / 1e9, name=f.name
                    )
                )
        return out

    def prune(self, *, max_size: int | None = None, older_than: float | None = None) -> tuple[int, int]:
        """Remove keys unused for ``older_than`` seconds, then the least recently used down to a bound.

        The bound is ``max_size``, else the cache's own (``bound()``). Returns (files removed, bytes freed).
        """
        bound = max_size if max_size is not None else self.bound()
        with self._open_dir(create=False) as dfd:
            if dfd is None:
                return 0, 0
            cutoff = None if older_than is None else time.time_ns() - int(older_than * 1e9)
            return _prune(dfd, _files(dfd), bound=bound, cutoff_ns=cutoff)

    def clear(self) -> int:
        """Remove every entry, spill and temp file; returns the bytes freed."""
        freed = 0
        with self._open_dir(create=False) as dfd:
            if dfd is None:
                return 0
            for name in os.listdir(dfd):
                if not (name.startswith(_OURS) or _ENTRY_NAME.fullmatch(name)):
                    continue  # not ours
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        continue
                    os.unlink(name, dir_fd=dfd)
                except OSError as e:
                    log.warning("index cache: cannot remove %s: %s", name, e.strerror or e)
                    continue
                freed += st.st_size if stat.S_ISREG(st.st_mode) else 0
        return freed


def default_bound(st: os.statvfs_result) -> int:
    """The default bound of a cache on filesystem ``st``: the smaller of 10 GiB and 10% of its size."""
    return min(DEFAULT_MAX, st.f_blocks * st.f_frsize // DEFAULT_MAX_SHARE)


def _files(dfd: int) -> list[_File]:
    """The entry and spill files of the directory (regular files; no temp files, no names not ours)."""
    out: list[_File] = []
    for name in os.listdir(dfd):
        if name.startswith(_SPILL_PREFIX):
            group = name[len(_SPILL_PREFIX) :]
        elif _ENTRY_NAME.fullmatch(name):
            group = name.rpartition(".")[2]
        else:
            continue  # a temp file (being written, or swept), or not ours
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            used = max(st.st_atime_ns, st.st_mtime_ns)
            out.append(_File(name=name, group=group, size=st.st_size, mtime=st.st_mtime, used_ns=used))
    return out


def _group_use(files: list[_File]) -> dict[str, int]:
    """Each key's last use: the latest of its files'."""
    used: dict[str, int] = {}
    for f in files:
        used[f.group] = max(used.get(f.group, 0), f.used_ns)
    return used


def _prune(
    dfd: int, files: list[_File], *, bound: int | None, cutoff_ns: int | None = None, keep: str | None = None
) -> tuple[int, int]:
    """Remove whole keys, least recently used first: those last used before ``cutoff_ns``, then more
    until the files total at most ``bound``; never the key ``keep``. Returns (files removed, bytes freed).

    ``unlink`` removes a name and never follows a symlink (only regular files are listed anyway).
    A file gone meanwhile (another process pruning) is skipped; one that cannot be removed is a warning.
    """
    used = _group_use(files)
    total = sum(f.size for f in files)
    by_group: dict[str, list[_File]] = {}
    for f in files:
        by_group.setdefault(f.group, []).append(f)
    count = freed = 0
    for group in sorted(by_group, key=lambda g: (used[g], g)):
        stale = cutoff_ns is not None and used[group] < cutoff_ns
        if not stale and (bound is None or total <= bound):
            break  # sorted by last use: every key after this one is newer still
        if group == keep:
            continue
        for f in by_group[group]:
            try:
                os.unlink(f.name, dir_fd=dfd)
            except FileNotFoundError:  # gone meanwhile (another process pruning)
                total -= f.size
                continue
            except OSError as e:
                log.warning("index cache: cannot remove %s: %s", f.name, e.strerror or e)
                continue
            total -= f.size
            log.debug(
                "index cache: removed %s (%d bytes, last used %s ago)",
                f.name,
                f.size,
                human_age(time.time() - used[group] / 1e9),
            )
            count += 1
            freed += f.size
    return count, freed


def _sweep(dfd: int) -> None:
    """Remove temp files left by writers that died (a mount stopped while it indexed, a crash)."""
    now = time.time()
    for name in os.listdir(dfd):
        if name.startswith(_LOCK_PREFIX):
            _sweep_lock(dfd, name)
        if not name.startswith(_TMP_PREFIX):
            continue
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            continue
        found = _TMP_PID.fullmatch(name)
        pid = int(found.group(1) or found.group(2)) if found else None
        if not stat.S_ISREG(st.st_mode) or (now - st.st_mtime < STALE_TEMP_AGE and _alive(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dfd)
            log.info("index cache: removed %s, left by a writer that stopped (%d bytes)", name, st.st_size)


def _sweep_lock(dfd: int, name: str) -> None:
    """Remove a lock file its holder left (it died while building): one no one holds."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _release(dfd, name, fd)
    except OSError:  # held: being built
        os.close(fd)


def _acquire(dfd: int, name: str, kind: str, key: str) -> tuple[int, bool] | None:
    """Lock file ``name``, waiting for its holder; None when it cannot be made.

    Returns its fd and whether the holder before left it built and not stored (IndexCache.lock).

    ``flock`` (not ``fcntl`` record locks): it locks an open file description, so two threads of one
    process, each with its own open, exclude each other as two processes do.
    """
    waited = False
    while True:
        try:
            fd = os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dfd
            )
        except OSError as e:  # a read-only or full disk: built without a lock (the store will say why)
            log.debug("index cache: no lock for %s %s: %s", kind, key, e.strerror or e)
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    log.info("index cache: %s %s being built by another process: waiting for it", kind, key)
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.pread(fd, len(_UNSTORED), 0) == _UNSTORED:
                return fd, True
            st = os.fstat(fd)
            try:
                now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return fd, False
        os.close(fd)  # its holder removed it when done: lock the one there now (or a new one)


def _release(dfd: int, name: str, fd: int) -> None:
    """Remove lock file ``name`` (when it is still the one ``fd`` holds), then unlock it."""
    try:
        st = os.fstat(fd)
        now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists (None, an unknown writer: assumed alive)."""
    if pid is None or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: another user's process
    return True


def _check_kind(kind: str) -> str:
    """``kind`` if the registry (store.KINDS) has it; ValueError for any other (a bug, never input)."""
    if not _KIND.fullmatch(kind) or kind not in KINDS:
        raise ValueError(f"invalid cache entry kind {kind!r}")
    return kind


def _read_entry(name: str, dfd: int, kind: str, key: str) -> bytes:
    """The payload of entry file ``name``; OSError (ELOOP for a symlink) or ValueError saying why not.

    The payload is read straight into the bytes returned (one copy of a 10 MB table, not three).
    """
    # O_NONBLOCK: a FIFO planted in place of an entry must not hang the mount (it is refused below).
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_uid != os.geteuid():
            raise ValueError(f"written by uid {st.st_uid}, not by this user")
        if st.st_mode & 0o077:
            raise ValueError(f"mode {stat.S_IMODE(st.st_mode):o}, not 600")
        want = _HEADER.size + len(kind.encode()) + len(key.encode())
        head = _pread_all(fd, want, 0)
        kind_len, key_len, payload_len = _head(head)
        if head[_HEADER.size :] != kind.encode() + key.encode() or _HEADER.size + kind_len + key_len != want:
            raise ValueError("entry of another kind or key")
        size = CHECKSUMS[KINDS[kind].checksum]
        if st.st_size != want + payload_len + size:
            _head(head, kind)  # of another format version (one with another checksum): Stale
            raise ValueError("truncated" if st.st_size < want + payload_len + size else "trailing bytes")
        payload = _pread_all(fd, payload_len, want)
        checksum = _pread_all(fd, size, want + payload_len)
        if len(payload) != payload_len or len(checksum) != size:
            raise ValueError("truncated")
        if _checksum(kind, head, payload) != checksum:
            raise ValueError("checksum mismatch")
        _head(head, kind)  # whole and ours: of this format version, or Stale
        # Its last use, for eviction: the atime, set on the fd that was read (nothing to follow, no
        # name to race); the mtime stays when it was written.
        with contextlib.suppress(OSError):
            os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
        return payload
    finally:
        os.close(fd)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes from ``offset`` (fewer only at the end of the file)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]  # Linux returns at most 0x7ffff000 bytes per read
    done = len(data)
    while done < size and (more := os.pread(fd, size - done, offset + done)):
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def _peek(name: str, dfd: int) -> tuple[str, str]:
    """An entry file's kind and key from its header, ("?", "") when it has no readable one."""
    # O_NOATIME (the owner's to ask): listing is no use of an entry, and must not make it look recent.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(name, flags | os.O_NOATIME, dir_fd=dfd)
        except PermissionError:  # EPERM: not this user's file
            fd = os.open(name, flags, dir_fd=dfd)
    except OSError:
        return "?", ""
    try:
        head = os.pread(fd, _HEADER.size + 2 * 65535, 0)
    except OSError:
        return "?", ""
    finally:
        os.close(fd)
    try:
        kind_len, key_len, _ = _head(head)
    except ValueError:
        return "?", ""
    if len(head) < _HEADER.size + kind_len + key_len:
        return "?", ""
    kind = head[_HEADER.size : _HEADER.size + kind_len].decode(errors="replace")
    key = head[_HEADER.size + kind_len : _HEADER.size + kind_len + key_len].decode(errors="replace")
    return kind, key


def default_directory() -> str:
    """$XDG_CACHE_HOME/ocifuse, else ~/.cache/ocifuse; /var/cache/ocifuse for root (FHS 5.5).

    Under systemd, a unit's ``CacheDirectory=ocifuse`` sets $CACHE_DIRECTORY (systemd.exec(5)),
    which is the same directory for both managers, made by systemd with the unit's owner and mode.
    """
    service = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]  # ":"-separated if several
    if os.path.isabs(service):
        return service
    if os.geteuid() == 0:
        return "/var/cache/ocifuse"
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # XDG base directory spec: a relative value is invalid, ignore it
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ocifuse")


def open_cache(
    directory: str | None = None, *, disabled: bool = False, max_size: int | None = None
) -> IndexCache:
    """The cache a command asked for: none (``nocache``), ``directory`` (``cache=DIR``), or the default.

    ``max_size`` bounds it (``cache_max=SIZE``); None: the default bound.
    """
    if disabled:
        return IndexCache(None)
    return IndexCache(os.path.abspath(directory) if directory else default_directory(), max_size)


def file_key(file: OpenFile) -> str:
    """An outer archive's identity: (st_dev, st_ino, st_size, st_mtime_ns) + sha256 of its first and last MiB.

    The identity tells files apart cheaply; the hash catches a file rewritten in place with its
    size and mtime kept (``touch -r``), unless the change lies wholly between the two ends.
    """
    st = file.stat
    try:
        ends = ends_sha256(lambda offset, size: os.pread(file.fd, size, offset), st.st_size)
    except OSError as e:
        raise LayoutOpenError(file.path, f"cannot read the archive ({e.strerror or e})") from e
    return f"file:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{ends}"


def ends_sha256(pread: Callable[[int, int], bytes], size: int) -> str:
    """sha256 (hex) of an object's first and last KEY_SPAN bytes (once each when they overlap)."""
    h = hashlib.sha256()
    head = pread(0, min(KEY_SPAN, size))
    h.update(head)
    tail_start = max(len(head), size - KEY_SPAN)
    if tail_start < size:
        h.update(pread(tail_start, size - tail_start))
    return h.hexdigest()


def blob_key(digest: Digest) -> str:
    """A blob's key: its digest (so images sharing a layer share the entry)."""
    return str(digest)


def cache_main(
    action: str,
    directory: str | None,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
) -> int:
    """``ocifuse cache list|clear|prune [--cache DIR]``: 0 done (an absent cache is an empty one).

    ``list`` shows the files least recently used first (the order eviction takes them) and the
    total against the bound (``max_size``, else the default); ``prune`` removes what is unused for
    ``older_than`` seconds, then the least recently used until the total is within the bound.
    """
    cache = open_cache(directory, max_size=max_size)
    if action == "clear":
        count = len(cache.entries())
        freed = cache.clear()
        print(f"removed {count} entries, {human_size(freed)} from {cache.directory}")
        return 0
    if action == "prune":
        count, freed = cache.prune(older_than=older_than)
        left = cache.entries()
        print(
            f"removed {count} entries, {human_size(freed)} from {cache.directory}; "
            f"{len(left)} entries, {human_size(sum(e.size for e in left))} left"
        )
        return 0
    entries = cache.entries()
    now = time.time()
    if entries:
        print(f"{'KIND':<12} {'SIZE':>10} {'LAST USE':>8}  KEY")
    for e in entries:
        print(f"{e.kind:<12} {human_size(e.size):>10} {human_age(now - e.used) + ' ago':>8}  {e.key}")
    total = sum(e.size for e in entries)
    bound = cache.bound()
    share = f" ({100 * total / bound:.0f}%)" if bound else ""
    print(
        f"total: {len(entries)} entries, {human_size(total)} in {cache.directory}; "
        f"bound {human_size(bound or 0)}{share}"
    )
    return 0
