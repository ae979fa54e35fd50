"""pyfuse3 Operations over the immutable tree: the FUSE shell, and the one place errors become errno."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from .digest import Digest, hash_source
from .entries import Kind, Meta, Sources
from .errors import OcifuseError
from .tree import Children, Node, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])

# Nothing ever changes under a mount, so the kernel may cache names and attributes for a day.
TIMEOUT = 86400.0
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
_LATEST = 2**62 // 10**9  # the latest mtime served (seconds): its nanoseconds fit a signed 64-bit field
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# The file type bits of each kind of entry the rootfs view serves (stat(2), inode(7)).
_TYPE_BITS = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
}


# The FUSE requests this process has answered, by handler: the daemon logs them when it unmounts, so
# tests and bench/ count the kernel's round trips (a count, never a time). One increment a request.
REQUESTS: Counter[str] = Counter()


def requests_summary() -> str:
    """The requests answered so far, e.g. ``"412 FUSE requests: readdir 300, lookup 100, ..."``."""
    parts = ", ".join(f"{name} {n}" for name, n in REQUESTS.most_common())
    return f"{REQUESTS.total()} FUSE requests" + (f": {parts}" if parts else "")


def _blank_attributes() -> pyfuse3.EntryAttributes:
    """An EntryAttributes with the fields every entry shares: the kernel caches it for TIMEOUT."""
    attr = pyfuse3.EntryAttributes()
    attr.generation = 0
    attr.entry_timeout = TIMEOUT
    attr.attr_timeout = TIMEOUT
    attr.st_blksize = 128 * 1024
    return attr


def errno_of(exc: BaseException) -> int:
    """The errno a request answers for ``exc``: an ocifuse error's hint, EIO for anything else."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, OcifuseError):
        return exc.errno
    return errno.EIO


def handler(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map every exception of a request handler to a FUSEError, so no request can kill the daemon.

    OcifuseError becomes its errno hint (logged as a warning); anything unexpected is logged
    with its traceback and answered with EIO.
    """

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        REQUESTS[name] += 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OcifuseError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from e
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _erofs(fn: F) -> F:
    """A handler for a write or metadata change: the filesystem is read-only (EROFS)."""

    @functools.wraps(fn)
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return cast(F, refuse)


class Verdicts:
    """--verify: each blob is hashed in full before its first byte is served; the verdict is cached.

    The archive never changes under the mount (reads check it), so a verdict holds for the
    mount's life. Concurrent first readers of one blob wait for one hash, not several.
    """

    def __init__(self) -> None:
        self._done: dict[int, bool] = {}
        self._locks: dict[int, trio.Lock] = {}

    async def check(self, fs: Operations, node: Node) -> None:
        """Raise EIO unless ``node``'s bytes match the digest its path names (or it names none)."""
        ok = self._done.get(node.inode)
        if ok is None:
            lock = self._locks.setdefault(node.inode, trio.Lock())
            async with lock:
                ok = self._done.get(node.inode)
                if ok is None:
                    ok = await trio.to_thread.run_sync(fs.verify_blob, node)
                    self._done[node.inode] = ok
            self._locks.pop(node.inode, None)
        if not ok:
            raise pyfuse3.FUSEError(errno.EIO)


class Operations(pyfuse3.Operations):
    """A read-only view of a tree: lookups from the tree, reads by pread off the trio thread.

    The layout view's entries carry no Meta: 0555/0444, the mounting user's, no xattrs. The
    rootfs view's carry one: the image's modes, owners (or the mounting user's with
    ``own_all``), link targets, device numbers and xattrs (``xattrs=True``).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        archive: Sources,
        tree: Tree,
        *,
        verify: bool = False,
        xattrs: bool = False,
        own_all: bool = False,
    ) -> None:
        super().__init__()
        self.archive = archive
        self.tree = tree
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.verdicts = Verdicts() if verify else None
        self.xattrs = xattrs
        self._any_xattrs: bool | None = None  # xattrs and the tree has one: known at the first call
        self.own_all = own_all

    # -- helpers -----------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.tree.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        """The stat of ``node``, its mtime from the tar header (see ``_fill``)."""
        e = node.entry
        return self.attributes_of(node.inode, e.kind, e.size, e.mtime, e.meta)

    def attributes_of(
        self, inode: int, kind: Kind, size: int, mtime: int, meta: Meta | None
    ) -> pyfuse3.EntryAttributes:
        """The stat of ``inode`` from its entry's fields (Tree.fields: readdir makes no node per child)."""
        attr = _blank_attributes()
        self._fill(attr, inode, kind, size, mtime, meta)
        return attr

    def _fill(
        self, attr: pyfuse3.EntryAttributes, inode: int, kind: Kind, size: int, mtime: int, meta: Meta | None
    ) -> None:
        """Set every field of ``attr`` that differs between entries (readdir reuses one ``attr``).

        The layout view: 0555 dirs, 0444 files, the mounting user's. The rootfs view (``meta``): the
        image's type and mode bits, owner (unless ``own_all``), link count and device number;
        setuid, setgid and devices are shown as the image has them and are inert: the mount is
        always nosuid,nodev (options.FORCED).
        """
        # Plain ints, without the NewType calls (InodeT, ModeT): this runs for every entry listed.
        attr.st_ino = inode
        if meta is None:
            if kind is Kind.DIR:
                mode, nlink = DIR_MODE, 2 + self.tree.subdirs(inode)
            else:
                mode, nlink = FILE_MODE, 1
            uid, gid, rdev = self.uid, self.gid, 0
        else:
            mode = _TYPE_BITS[kind] | meta.mode
            nlink = 2 + self.tree.subdirs(inode) if kind is Kind.DIR else meta.nlink
            uid, gid = (self.uid, self.gid) if self.own_all else (meta.uid, meta.gid)
            rdev = meta.rdev
        attr.st_mode = mode
        attr.st_nlink = nlink
        attr.st_uid = uid
        attr.st_gid = gid
        attr.st_rdev = rdev
        attr.st_size = size
        attr.st_blocks = (size + 511) // 512  # st_blocks counts 512-byte units
        if not 0 <= mtime <= _LATEST:
            mtime = max(0, min(mtime, _LATEST))
        mtime_ns = mtime * 1_000_000_000
        attr.st_atime_ns = mtime_ns
        attr.st_mtime_ns = mtime_ns
        attr.st_ctime_ns = mtime_ns

    def read_node(
        self, node: Node, off: int, size: int, cached_only: bool = False
    ) -> bytes | bytearray | None:
        """Bytes of a file node, clipped to its end.

        Blocking (run in a worker thread), unless ``cached_only``: then only from the page cache,
        never waiting for the disk, and None if any byte is not there.
        """
        if cached_only:
            return self.archive.pread_cached(node.entry, off, size)
        return self.archive.pread(node.entry, off, size)

    def verify_blob(self, node: Node) -> bool:
        """Blocking: hash a blob's bytes against the digest its path names; True if they match."""
        path = self.tree.path_of(node.inode)
        digest = Digest.from_path(path)
        if digest is None or not digest.verifiable:
            return True  # not a blob, or an algorithm we cannot hash: served unverified
        entry = node.entry
        found = hash_source(lambda at, n: self.archive.pread(entry, at, n), entry.size, digest.algorithm)
        if found != digest:
            log.error("blob %s does not match its digest (hashes to %s); reads fail with EIO", digest, found)
            return False
        log.debug("blob %s verified", digest)
        return True

    # -- lookups and attributes --------------------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Find ``name`` in a directory; a missing name is a cached negative entry (st_ino 0)."""
        log.debug("lookup(%d, %r)", parent_inode, name)
        parent = self._node(parent_inode)
        if name == b".":
            return self.attributes(parent)
        if name == b"..":
            return self.attributes(self._node(parent.parent))
        node = self.tree.child(parent_inode, name)
        if node is None:
            if not parent.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = pyfuse3.InodeT(0)
            negative.entry_timeout = TIMEOUT
            return negative
        return self.attributes(node)

    @handler
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Stat an inode."""
        log.debug("getattr(%d)", inode)
        return self.attributes(self._node(inode))

    @handler
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        """Nothing to forget: every inode lives as long as the mount."""

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Sizes of the whole tree; nothing is free, since nothing can be written."""
        data = pyfuse3.StatvfsData()
        data.f_bsize = 4096
        data.f_frsize = 4096
        data.f_blocks = (self.tree.total_size + 4095) // 4096
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = len(self.tree)
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data

    # Extended attributes: ENOSYS, not ENODATA, when the view has none (the layout view; a rootfs
    # whose layers carry none): the kernel then remembers that this filesystem has none and answers
    # every later getxattr/listxattr itself with EOPNOTSUPP (fs/fuse/xattr.c: no_getxattr,
    # no_listxattr), where ENODATA would cost a round trip per call (``ls -l`` asks two or three
    # names of each file: security.selinux, system.posix_acl_access, ..._default). A rootfs whose
    # layers carry PAX SCHILY.xattr.* attributes answers each call (ENODATA for a name it lacks).

    def _xattrs(self, inode: int) -> tuple[tuple[bytes, bytes], ...]:
        """The extended attributes of ``inode``; ENOSYS if this view has none on any inode."""
        if self._any_xattrs is None:
            self._any_xattrs = self.xattrs and self.tree.has_xattrs()
        if not self._any_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        meta = self._node(inode).entry.meta
        return meta.xattrs if meta is not None else ()

    @handler
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        """An extended attribute (ENODATA if absent); ENOSYS from a view without any."""
        for key, value in self._xattrs(inode):
            if key == name:
                return value
        raise pyfuse3.FUSEError(errno.ENODATA)

    @handler
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        """The extended attribute names of an inode; ENOSYS from a view without any."""
        return [key for key, _ in self._xattrs(inode)]

    @handler
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        """A symlink's target as the layer stores it (never followed here); EINVAL for anything else."""
        node = self._node(inode)
        if node.entry.kind is not Kind.SYMLINK or node.entry.meta is None:
            raise pyfuse3.FUSEError(errno.EINVAL)  # readlink(2): not a symbolic link
        return pyfuse3.FileNameT(node.entry.meta.link)

    # -- directories -------------------------------------------------------------------------

    @handler
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        """A directory handle is its inode."""
        log.debug("opendir(%d)", inode)
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @handler
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List ``.``, ``..``, then the children, from ``start_id``; an entry's offset is its index + 1.

        ``.`` and ``..`` come first, as every Linux filesystem lists them (``ls -a``); ``..`` of the
        root is the root itself (the kernel answers ``..`` of a mount's root from the mounted-on
        directory anyway). The offsets are stable: the tree never changes, so a listing resumed at
        any offset continues exactly where it stopped.
        """
        log.debug("readdir(%d, %d)", fh, start_id)
        node = self._node(fh)
        children = node.children or ()
        count = len(children) + 2
        if start_id >= count:
            return
        tree = self.tree
        fields = tree.fields
        fill = self._fill
        reply = pyfuse3.readdir_reply
        # One EntryAttributes for the whole reply: readdir_reply copies it into the reply buffer.
        attr = _blank_attributes()
        index = start_id
        for name, inode in ((b".", node.inode), (b"..", node.parent))[index:]:
            fill(attr, inode, *fields(inode))
            if not reply(token, pyfuse3.FileNameT(name), attr, index + 1):
                return
            index += 1
        if isinstance(children, Children):
            name_of, inode_of = children.name, children.inode
        else:
            name_of, inode_of = (lambda i: children[i][0]), (lambda i: children[i][1])
        for i in range(index - 2, count - 2):
            inode = inode_of(i)
            fill(attr, inode, *fields(inode))
            if not reply(token, pyfuse3.FileNameT(name_of(i)), attr, i + 3):
                return

    @handler
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        """Nothing to release."""

    # -- files -------------------------------------------------------------------------------

    @handler
    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open for reading only (EROFS otherwise); the page cache stays valid across opens."""
        log.debug("open(%d, %#o)", inode, flags)
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if node.entry.kind is not Kind.FILE:
            raise pyfuse3.FUSEError(errno.EACCES)  # the kernel opens devices, fifos, symlinks itself
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=True)

    @handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        """pread at the member's offset + ``off``, clipped to the member.

        Bytes already in the page cache are read right here, with one RWF_NOWAIT preadv into
        the buffer that is returned: a hop to a worker thread and back costs more than the copy
        (1 GiB first read, warm archive: ~1240 -> ~1850 MiB/s). Anything that would wait for the
        disk is read off the trio thread, so readers of cold data still run in parallel and never
        stall lookups. pyfuse3 replies from any contiguous buffer (it takes the reply with
        PyObject_GetBuffer), so a bytearray is served as it is, without a copy into bytes.
        """
        log.debug("read(%d, %d, %d)", fh, off, size)
        node = self._node(fh)
        if self.verdicts is not None:
            await self.verdicts.check(self, node)
        data = self.read_node(node, off, size, True)
        if data is None:
            data = await trio.to_thread.run_sync(self.read_node, node, off, size)
        assert data is not None
        return cast(bytes, data)

    @handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        """Nothing to release: the archive fd lives as long as the mount."""

    # -- everything that would change the filesystem: EROFS (the mount is also "ro") ---------

    setattr = _erofs(pyfuse3.Operations.setattr)
    mknod = _erofs(pyfuse3.Operations.mknod)
    mkdir = _erofs(pyfuse3.Operations.mkdir)
    unlink = _erofs(pyfuse3.Operations.unlink)
    rmdir = _erofs(pyfuse3.Operations.rmdir)
    symlink = _erofs(pyfuse3.Operations.symlink)
    rename = _erofs(pyfuse3.Operations.rename)
    link = _erofs(pyfuse3.Operations.link)
    write = _erofs(pyfuse3.Operations.write)
    create = _erofs(pyfuse3.Operations.create)
    setxattr = _erofs(pyfuse3.Operations.setxattr)
    removexattr = _erofs(pyfuse3.Operations.removexattr)
