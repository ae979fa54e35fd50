"""Spill files: a decompressed stream written once to disk, to be read at random by pread.

Used for what cannot be entered in the middle (a zstd frame of the whole input, as ``zstd``
writes it). Bounded by ``Limits.spill_max`` and the free space; kept in the cache directory
(``Store.spill_path``) or nameless in a temporary directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile

from .errors import DecompressionLimit
from .source import OpenFile
from .streams import Limits

log = logging.getLogger(__name__)

# A spill never leaves less than this much free on its filesystem (or 10% of it, if smaller).
SPILL_RESERVE = 1 << 30
# A spill file's temporary name (where it is not nameless), with its writer's pid: see cache.py.
SPILL_TEMP_PREFIX = ".tmp.spill-"
_CHECK_FREE_EVERY = 64 << 20


class Spill:
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
        self.directory = os.path.dirname(path) if path else spill_directory()
        self.temp: str | None = None
        self._next_check = 0
        if path is None:
            self.fd = self._open()
            return
        try:
            self.fd = self._open()
        except OSError as e:  # a read-only cache directory
            self._elsewhere(str(e.strerror or e))

    def _open(self) -> int:
        """A new file in ``directory``: nameless (O_TMPFILE), else a temp file (named if it is to be kept)."""
        try:
            return os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:  # a filesystem without O_TMPFILE
            if self.path is not None:
                prefix = f"{SPILL_TEMP_PREFIX}{os.getpid()}-"
                fd, self.temp = tempfile.mkstemp(dir=self.directory, prefix=prefix)
                return fd
            with tempfile.TemporaryFile(dir=self.directory) as f:
                return os.dup(f.fileno())

    def _elsewhere(self, reason: str, old: int | None = None, size: int = 0) -> None:
        """Go on in a nameless file where a spill goes without a cache: the cache directory failed.

        ``old``: the spill so far (``size`` bytes), copied over, then closed (and its temp name removed).
        """
        log.warning(
            "%s: spill file not kept in the cache (%s: %s): spilled to %s instead, for this open only",
            self.name,
            self.directory,
            reason,
            spill_directory(),
        )
        temp, self.path, self.temp = self.temp, None, None
        self.directory, self._next_check = spill_directory(), 0
        try:
            self.fd = self._open()
            if old is not None:
                done = 0
                while done < size:
                    n = os.sendfile(self.fd, old, done, size - done)
                    if n == 0:
                        raise OSError(errno.EIO, "the spill file ended early")
                    done += n
        except OSError as e:
            raise DecompressionLimit(
                self.name, f"zstd: cannot write the spill file in {self.directory}: {e.strerror}", "cache"
            ) from e
        finally:
            if old is not None:
                os.close(old)
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

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
            if st.f_bavail * st.f_frsize < _CHECK_FREE_EVERY + reserve and self.path is not None:
                self._elsewhere("no room left for it", self.fd, written - len(data))
                self.write(data, written)
                return
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
                if self.path is not None:  # the cache's disk is full (or failing): spill elsewhere
                    self._elsewhere(str(e.strerror or e), self.fd, written - len(data))
                    self.write(data, written)
                    return
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


def spill_directory() -> str:
    """Where a spill without a cache goes: $TMPDIR if set, else /var/tmp (on disk), else /tmp."""
    if os.environ.get("TMPDIR"):
        return tempfile.gettempdir()
    if os.access("/var/tmp", os.W_OK | os.X_OK):
        return "/var/tmp"
    return tempfile.gettempdir()
