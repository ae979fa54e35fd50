"""fs.Operations handlers called directly under trio, without a mount: the edge cases of every request."""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest
import trio
from oci import LayoutBuilder
from tarbuild import MTIME, Member, dir_member, layout_members, sample_builder, write_archive

from ocifuse import fs
from ocifuse.archive import Archive
from ocifuse.errors import FileMissing
from ocifuse.fs import Operations
from ocifuse.tree import ROOT, Node, Tree

CTX = pyfuse3.RequestContext()
ROOT_INODE = pyfuse3.InodeT(ROOT)
OTHER_MTIME = 1_234_567_890
# Extra files beside the layout: sizes around the 512-byte block, a nested directory, a UTF-8 name.
EXTRA = {
    "notes/empty": b"",
    "notes/one": b"1",
    "notes/block": b"b" * 512,
    "notes/block-and-one": b"c" * 513,
    "notes/deep/er/file.txt": b"deep\n",
    "notes/café.txt": "ünïcode\n".encode(),
}


@dataclass
class Mounted:
    """An archive opened as a mount would open it: the archive, its tree and the Operations."""

    path: Path
    files: dict[str, bytes]
    archive: Archive
    tree: Tree
    ops: Operations

    async def resolve(self, path: str) -> pyfuse3.EntryAttributes:
        """Look ``path`` up component by component from the root, as the kernel does."""
        attr = await self.ops.getattr(ROOT_INODE, CTX)
        for part in path.split("/") if path else []:
            attr = await self.ops.lookup(attr.st_ino, pyfuse3.FileNameT(os.fsencode(part)), CTX)
            assert attr.st_ino != 0, f"{path}: {part} not found"
        return attr

    async def read_all(self, path: str, chunk: int = 4096) -> bytes:
        """Open ``path`` read-only and read it to the end in ``chunk``-byte requests."""
        attr = await self.resolve(path)
        fi = await self.ops.open(attr.st_ino, os.O_RDONLY, CTX)
        out = b""
        while True:
            data = await self.ops.read(fi.fh, len(out), chunk)
            if not data:
                break
            out += data
        await self.ops.release(fi.fh)
        return out


def make_ops(path: Path, files: dict[str, bytes], *, verify: bool = False) -> Mounted:
    """Open ``path`` the way daemon.mount_main does."""
    archive = Archive(str(path))
    tree = Tree(archive.table.entries, root_mtime=int(os.fstat(archive.fd).st_mtime))
    return Mounted(path, files, archive, tree, Operations(archive, tree, verify=verify))


def sample_members(builder: LayoutBuilder) -> list[Member]:
    """The builder's layout plus EXTRA; ``notes/one`` and the ``notes`` directory get OTHER_MTIME."""
    members = layout_members(builder, extra=EXTRA)
    for m in members:
        if m.info.name in ("notes/one", "notes/"):
            m.info.mtime = OTHER_MTIME
    return members


@pytest.fixture
def sample(tmp_path: Path) -> Iterator[Mounted]:
    """The sample layout (plus EXTRA) as an archive, opened without --verify."""
    builder = sample_builder()
    path = write_archive(tmp_path / "sample.tar", sample_members(builder))
    m = make_ops(path, {**builder.layout_files(), **EXTRA})
    yield m
    m.archive.close()


_ATTRIBUTE_FIELDS = [f for f in dir(pyfuse3.EntryAttributes) if not f.startswith("_")]


@dataclass
class Collected:
    """What a fake readdir_reply was given."""

    entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]]
    limit: int | None = None

    def reply(
        self, token: pyfuse3.ReaddirToken, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
    ) -> bool:
        """Stand-in for pyfuse3.readdir_reply: record the entry; refuse once ``limit`` are taken.

        Like the real one, which copies the attributes into the reply buffer, it records a copy:
        readdir may reuse one EntryAttributes for every entry.
        """
        assert isinstance(token, pyfuse3.ReaddirToken)
        if self.limit is not None and len(self.entries) >= self.limit:
            return False
        copy = pyfuse3.EntryAttributes()
        for field in _ATTRIBUTE_FIELDS:
            setattr(copy, field, getattr(attr, field))
        self.entries.append((name, copy, next_id))
        return True


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch) -> Collected:
    """Collect readdir replies (the real readdir_reply is C and needs a kernel's token)."""
    collected = Collected([])
    monkeypatch.setattr(pyfuse3, "readdir_reply", collected.reply)
    return collected


async def listdir(m: Mounted, replies: Collected, path: str, start: int = 0) -> list[tuple[bytes, int]]:
    """readdir of ``path`` from ``start``: (name, next offset) pairs."""
    replies.entries.clear()
    attr = await m.resolve(path)
    fh = await m.ops.opendir(attr.st_ino, CTX)
    await m.ops.readdir(fh, start, pyfuse3.ReaddirToken())
    await m.ops.releasedir(fh)
    return [(name, next_id) for name, _, next_id in replies.entries]


async def fuse_errno(call: Awaitable[object]) -> int:
    """Await a handler that must fail; return the errno of its FUSEError."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


# -- attributes ------------------------------------------------------------------------------------


async def test_root(sample: Mounted) -> None:
    """The root is inode 1, a 0555 directory of the mounting user, mtime of the archive file."""
    attr = await sample.ops.getattr(ROOT_INODE, CTX)
    assert attr.st_ino == ROOT
    assert attr.st_mode == stat.S_IFDIR | 0o555
    assert (attr.st_uid, attr.st_gid) == (os.getuid(), os.getgid())
    assert attr.st_mtime_ns == int(os.stat(sample.path).st_mtime) * 10**9
    assert attr.st_nlink == 2 + 2  # blobs/ and notes/


async def test_every_file_has_its_size_mode_blocks_and_mtime(sample: Mounted) -> None:
    """Files are 0444 regular files with exact sizes, 512-byte st_blocks and the header's mtime."""
    for path, data in sample.files.items():
        attr = await sample.resolve(path)
        assert attr.st_mode == stat.S_IFREG | 0o444, path
        assert attr.st_size == len(data), path
        assert attr.st_blocks == -(-len(data) // 512), path
        assert attr.st_nlink == 1
        assert (attr.st_uid, attr.st_gid) == (os.getuid(), os.getgid())
        expected = OTHER_MTIME if path == "notes/one" else MTIME
        assert attr.st_mtime_ns == expected * 10**9, path
        assert attr.entry_timeout >= 3600 and attr.attr_timeout >= 3600


@pytest.mark.parametrize(("name", "blocks"), [("empty", 0), ("one", 1), ("block", 1), ("block-and-one", 2)])
async def test_st_blocks(sample: Mounted, name: str, blocks: int) -> None:
    """st_blocks counts 512-byte units, rounded up."""
    assert (await sample.resolve(f"notes/{name}")).st_blocks == blocks


async def test_directories(sample: Mounted) -> None:
    """Directories are 0555 with nlink 2 + subdirectories, and carry their own header's mtime."""
    blobs = await sample.resolve("blobs")
    notes = await sample.resolve("notes")
    deep = await sample.resolve("notes/deep/er")
    for attr in (blobs, notes, deep):
        assert attr.st_mode == stat.S_IFDIR | 0o555
    assert blobs.st_nlink == 3
    assert notes.st_nlink == 3
    assert deep.st_nlink == 2
    assert notes.st_mtime_ns == OTHER_MTIME * 10**9
    assert blobs.st_mtime_ns == MTIME * 10**9


async def test_getattr_matches_lookup(sample: Mounted) -> None:
    """getattr of an inode says what its lookup said."""
    for path in [*sample.files, "blobs", "notes/deep"]:
        looked_up = await sample.resolve(path)
        got = await sample.ops.getattr(looked_up.st_ino, CTX)
        for field in ("st_ino", "st_mode", "st_size", "st_blocks", "st_mtime_ns", "st_nlink"):
            assert getattr(got, field) == getattr(looked_up, field), (path, field)


async def test_inodes_are_unique_and_stable(sample: Mounted, tmp_path: Path) -> None:
    """Every path has its own inode, the same on every lookup and in a second mount of the archive."""
    first = {p: (await sample.resolve(p)).st_ino for p in sample.files}
    assert len(set(first.values())) == len(first)
    assert ROOT not in first.values()
    again = {p: (await sample.resolve(p)).st_ino for p in sample.files}
    assert again == first
    other = make_ops(sample.path, sample.files)
    try:
        assert {p: (await other.resolve(p)).st_ino for p in sample.files} == first
    finally:
        other.archive.close()


async def test_utf8_names(sample: Mounted) -> None:
    """A UTF-8 name is looked up by its bytes."""
    notes = await sample.resolve("notes")
    attr = await sample.ops.lookup(notes.st_ino, pyfuse3.FileNameT("café.txt".encode()), CTX)
    assert attr.st_size == len(EXTRA["notes/café.txt"])


async def test_dot_and_dotdot(sample: Mounted) -> None:
    """``.`` is the directory itself, ``..`` its parent; the root's ``..`` is the root."""
    blobs = await sample.resolve("blobs")
    sha = await sample.resolve("blobs/sha256")
    assert (await sample.ops.lookup(sha.st_ino, pyfuse3.FileNameT(b"."), CTX)).st_ino == sha.st_ino
    assert (await sample.ops.lookup(sha.st_ino, pyfuse3.FileNameT(b".."), CTX)).st_ino == blobs.st_ino
    assert (await sample.ops.lookup(blobs.st_ino, pyfuse3.FileNameT(b".."), CTX)).st_ino == ROOT
    assert (await sample.ops.lookup(ROOT_INODE, pyfuse3.FileNameT(b".."), CTX)).st_ino == ROOT


# -- missing names and wrong kinds ------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"missing", b"INDEX.JSON", b"blobs/sha256", b"index.json/", b""])
async def test_negative_lookup_is_cached(sample: Mounted, name: bytes) -> None:
    """A missing name answers st_ino 0 with a long entry timeout: the kernel caches the miss."""
    attr = await sample.ops.lookup(ROOT_INODE, pyfuse3.FileNameT(name), CTX)
    assert attr.st_ino == 0
    assert attr.entry_timeout >= 3600


async def test_lookup_under_a_file_is_enotdir(sample: Mounted) -> None:
    """Looking up a name inside a file is ENOTDIR."""
    index = await sample.resolve("index.json")
    assert await fuse_errno(sample.ops.lookup(index.st_ino, pyfuse3.FileNameT(b"x"), CTX)) == errno.ENOTDIR


@pytest.mark.parametrize("inode", [0, 10_000, 2**40])
async def test_unknown_inodes_are_enoent(sample: Mounted, inode: int) -> None:
    """An inode the tree never allocated is ENOENT for every handler that takes one."""
    ino = pyfuse3.InodeT(inode)
    fh = pyfuse3.FileHandleT(inode)
    assert await fuse_errno(sample.ops.getattr(ino, CTX)) == errno.ENOENT
    assert await fuse_errno(sample.ops.lookup(ino, pyfuse3.FileNameT(b"x"), CTX)) == errno.ENOENT
    assert await fuse_errno(sample.ops.open(ino, os.O_RDONLY, CTX)) == errno.ENOENT
    assert await fuse_errno(sample.ops.opendir(ino, CTX)) == errno.ENOENT
    assert await fuse_errno(sample.ops.read(fh, 0, 10)) == errno.ENOENT


async def test_kinds(sample: Mounted) -> None:
    """opendir of a file is ENOTDIR; open of a directory is EISDIR."""
    index = await sample.resolve("index.json")
    blobs = await sample.resolve("blobs")
    assert await fuse_errno(sample.ops.opendir(index.st_ino, CTX)) == errno.ENOTDIR
    assert await fuse_errno(sample.ops.open(blobs.st_ino, os.O_RDONLY, CTX)) == errno.EISDIR
    assert await fuse_errno(sample.ops.open(ROOT_INODE, os.O_RDONLY | os.O_DIRECTORY, CTX)) == errno.EISDIR


async def test_xattrs_and_readlink(sample: Mounted) -> None:
    """No extended attributes and no symlinks are served."""
    index = await sample.resolve("index.json")
    name = pyfuse3.XAttrNameT(b"user.x")
    assert await fuse_errno(sample.ops.getxattr(index.st_ino, name, CTX)) == errno.ENOSYS
    assert await fuse_errno(sample.ops.listxattr(index.st_ino, CTX)) == errno.ENOSYS
    assert await fuse_errno(sample.ops.readlink(index.st_ino, CTX)) == errno.EINVAL


# -- readdir ------------------------------------------------------------------------------------------


async def test_readdir_lists_children_in_order_with_offsets(sample: Mounted, replies: Collected) -> None:
    """``.``, ``..``, each child once, sorted, next offsets 1, 2, 3... and the attributes lookup gives."""
    listed = await listdir(sample, replies, "")
    assert [name for name, _ in listed] == [b".", b"..", b"blobs", b"index.json", b"notes", b"oci-layout"]
    assert [off for _, off in listed] == [1, 2, 3, 4, 5, 6]
    await listdir(sample, replies, "notes")
    for name, attr, _ in replies.entries:
        looked_up = await sample.resolve("notes/" + os.fsdecode(name))
        assert (attr.st_ino, attr.st_mode, attr.st_size) == (
            looked_up.st_ino,
            looked_up.st_mode,
            looked_up.st_size,
        )


async def test_readdir_resumes_at_any_offset(sample: Mounted, replies: Collected) -> None:
    """A full buffer stops the listing; resuming from the last offset gives the rest, nothing twice."""
    full = await listdir(sample, replies, "notes")
    assert len(full) == 8  # . and .. and six children
    got: list[tuple[bytes, int]] = []
    start = 0
    replies.limit = 2
    while True:
        part = await listdir(sample, replies, "notes", start)
        if not part:
            break
        got += part
        start = part[-1][1]
    assert got == full
    for start in range(len(full) + 1):
        replies.limit = None
        assert await listdir(sample, replies, "notes", start) == full[start:]


async def test_readdir_dot_and_dotdot_are_the_directory_and_its_parent(
    sample: Mounted, replies: Collected
) -> None:
    """``.`` is the directory itself and ``..`` its parent (the root's is the root), as lookup says."""
    for path, parent in (("", ""), ("notes", ""), ("blobs/sha256", "blobs")):
        await listdir(sample, replies, path)
        dot, dotdot = replies.entries[0][1], replies.entries[1][1]
        assert dot.st_ino == (await sample.resolve(path)).st_ino
        assert dotdot.st_ino == (await sample.resolve(parent)).st_ino
        assert stat.S_ISDIR(dot.st_mode) and stat.S_ISDIR(dotdot.st_mode)
    assert dotdot.st_ino != dot.st_ino


async def test_readdir_past_the_end_is_empty(sample: Mounted, replies: Collected) -> None:
    """An offset past the last child lists nothing."""
    assert await listdir(sample, replies, "blobs", 99) == []


async def test_readdir_of_an_empty_layout_dir(tmp_path: Path, replies: Collected) -> None:
    """A directory member with no children lists only ``.`` and ``..``."""
    builder = sample_builder()
    path = write_archive(tmp_path / "a.tar", [*layout_members(builder), dir_member("empty/")])
    m = make_ops(path, builder.layout_files())
    try:
        assert await listdir(m, replies, "empty") == [(b".", 1), (b"..", 2)]
        assert (await m.resolve("empty")).st_nlink == 2
    finally:
        m.archive.close()


# -- reads -----------------------------------------------------------------------------------------


async def test_reads_return_every_byte(sample: Mounted) -> None:
    """Reading each file to its end in small requests gives its exact content."""
    for path, data in sample.files.items():
        assert await sample.read_all(path, chunk=1000) == data, path


@pytest.mark.parametrize(
    ("off", "size", "want"),
    [
        (0, 513, slice(0, 513)),
        (0, 10**6, slice(0, 513)),
        (500, 100, slice(500, 513)),
        (512, 1, slice(512, 513)),
        (513, 10, slice(0, 0)),
        (10**9, 10, slice(0, 0)),
        (100, 0, slice(0, 0)),
    ],
)
async def test_read_is_clipped_to_the_entry(sample: Mounted, off: int, size: int, want: slice) -> None:
    """A read never returns bytes past the entry's end (the next member's header lies there)."""
    attr = await sample.resolve("notes/block-and-one")
    fi = await sample.ops.open(attr.st_ino, os.O_RDONLY, CTX)
    assert await sample.ops.read(fi.fh, off, size) == EXTRA["notes/block-and-one"][want]


async def test_open_keeps_the_page_cache(sample: Mounted) -> None:
    """A read-only open succeeds and asks the kernel to keep its cache (nothing ever changes)."""
    attr = await sample.resolve("index.json")
    fi = await sample.ops.open(attr.st_ino, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, CTX)
    assert fi.fh == attr.st_ino
    assert fi.keep_cache


@pytest.mark.parametrize(
    "flags",
    [
        os.O_WRONLY,
        os.O_RDWR,
        os.O_RDONLY | os.O_APPEND,
        os.O_RDONLY | os.O_TRUNC,
        os.O_WRONLY | os.O_CREAT,
        os.O_RDWR | os.O_TRUNC | os.O_CREAT,
    ],
)
async def test_open_for_writing_is_erofs(sample: Mounted, flags: int) -> None:
    """Opening with any write flag is EROFS."""
    attr = await sample.resolve("index.json")
    assert await fuse_errno(sample.ops.open(attr.st_ino, flags, CTX)) == errno.EROFS


def _write_calls(ino: pyfuse3.InodeT) -> dict[str, Callable[[Operations], Awaitable[object]]]:
    name = pyfuse3.FileNameT(b"new")
    fh = pyfuse3.FileHandleT(ino)
    mode = pyfuse3.ModeT(stat.S_IFREG | 0o644)
    xname = pyfuse3.XAttrNameT(b"user.x")
    return {
        "setattr": lambda o: o.setattr(ino, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX),
        "setattr_fh": lambda o: o.setattr(ino, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), fh, CTX),
        "mknod": lambda o: o.mknod(ROOT_INODE, name, mode, 0, CTX),
        "mkdir": lambda o: o.mkdir(ROOT_INODE, name, pyfuse3.ModeT(0o755), CTX),
        "unlink": lambda o: o.unlink(ROOT_INODE, pyfuse3.FileNameT(b"index.json"), CTX),
        "rmdir": lambda o: o.rmdir(ROOT_INODE, pyfuse3.FileNameT(b"blobs"), CTX),
        "symlink": lambda o: o.symlink(ROOT_INODE, name, pyfuse3.FileNameT(b"index.json"), CTX),
        "rename": lambda o: o.rename(ROOT_INODE, pyfuse3.FileNameT(b"index.json"), ROOT_INODE, name, 0, CTX),
        "link": lambda o: o.link(ino, ROOT_INODE, name, CTX),
        "write": lambda o: o.write(fh, 0, b"x"),
        "create": lambda o: o.create(ROOT_INODE, name, mode, os.O_WRONLY | os.O_CREAT, CTX),
        "setxattr": lambda o: o.setxattr(ino, xname, b"v", CTX),
        "removexattr": lambda o: o.removexattr(ino, xname, CTX),
    }


WRITE_HANDLERS = sorted(_write_calls(pyfuse3.InodeT(0)))


@pytest.mark.parametrize("handler", WRITE_HANDLERS)
async def test_every_write_and_metadata_change_is_erofs(sample: Mounted, handler: str) -> None:
    """Each handler that would change the filesystem answers EROFS, and nothing changes."""
    index = await sample.resolve("index.json")
    before = [(p, (await sample.resolve(p)).st_size) for p in sample.files]
    call = _write_calls(index.st_ino)[handler]
    assert await fuse_errno(call(sample.ops)) == errno.EROFS
    assert [(p, (await sample.resolve(p)).st_size) for p in sample.files] == before
    assert await sample.read_all("index.json") == sample.files["index.json"]


def test_write_handler_table_covers_pyfuse3() -> None:
    """Every pyfuse3 handler that changes something is in the EROFS table (none is left ENOSYS)."""
    changing = {
        "setattr",
        "mknod",
        "mkdir",
        "unlink",
        "rmdir",
        "symlink",
        "rename",
        "link",
        "write",
        "create",
        "setxattr",
        "removexattr",
    }
    assert {h.removesuffix("_fh") for h in WRITE_HANDLERS} == changing
    for name in changing:
        assert getattr(Operations, name) is not getattr(pyfuse3.Operations, name), name


# -- statfs and the rest -------------------------------------------------------------------------------


async def test_statfs(sample: Mounted) -> None:
    """statfs: the tree's size in 4 KiB blocks, its node count, nothing free."""
    st = await sample.ops.statfs(CTX)
    total = sum(len(d) for d in sample.files.values())
    assert st.f_bsize == st.f_frsize == 4096
    assert st.f_blocks == -(-total // 4096)
    assert st.f_bfree == st.f_bavail == 0
    assert st.f_files == len(sample.tree)
    assert st.f_ffree == 0
    assert st.f_namemax == 255


async def test_forget_release_releasedir_are_noops(sample: Mounted) -> None:
    """Inodes and handles live as long as the mount; forgetting them changes nothing."""
    attr = await sample.resolve("index.json")
    await sample.ops.forget([(attr.st_ino, 5)])
    await sample.ops.release(pyfuse3.FileHandleT(attr.st_ino))
    await sample.ops.releasedir(pyfuse3.FileHandleT(ROOT))
    assert await sample.read_all("index.json") == sample.files["index.json"]


# -- errors: the one errno mapping ---------------------------------------------------------------------


async def test_unexpected_exception_is_eio_and_logged(
    sample: Mounted, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug inside a handler is logged with its traceback and answered with EIO; the next request works."""
    attr = await sample.resolve("index.json")

    def boom(*args: object) -> bytes:
        raise ValueError("a bug")

    monkeypatch.setattr(sample.ops, "read_node", boom)
    with caplog.at_level(logging.ERROR, logger="ocifuse.fs"):
        assert await fuse_errno(sample.ops.read(pyfuse3.FileHandleT(attr.st_ino), 0, 10)) == errno.EIO
    record = next(r for r in caplog.records if r.name == "ocifuse.fs")
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert "read" in record.getMessage()
    monkeypatch.undo()
    assert await sample.read_all("index.json") == sample.files["index.json"]


async def test_unexpected_exception_in_lookup_is_eio(
    sample: Mounted, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any handler, not only read, turns a stray exception into EIO."""

    def broken(*args: object) -> None:
        raise KeyError("tree bug")

    monkeypatch.setattr(sample.tree, "child", broken)
    monkeypatch.setattr(sample.tree, "node", broken)
    assert await fuse_errno(sample.ops.lookup(ROOT_INODE, pyfuse3.FileNameT(b"x"), CTX)) == errno.EIO
    assert await fuse_errno(sample.ops.getattr(ROOT_INODE, CTX)) == errno.EIO


async def test_ocifuse_errors_keep_their_errno(sample: Mounted, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OcifuseError raised under a handler is answered with its own errno hint."""
    attr = await sample.resolve("index.json")

    def missing(*args: object) -> bytes:
        raise FileMissing("index.json")

    monkeypatch.setattr(sample.ops, "read_node", missing)
    assert await fuse_errno(sample.ops.read(pyfuse3.FileHandleT(attr.st_ino), 0, 10)) == errno.ENOENT


def test_errno_of() -> None:
    """errno_of: FUSEError's own, an OcifuseError's hint, EIO for everything else."""
    assert fs.errno_of(pyfuse3.FUSEError(errno.EROFS)) == errno.EROFS
    assert fs.errno_of(FileMissing("x")) == errno.ENOENT
    assert fs.errno_of(RuntimeError()) == errno.EIO


# -- the archive changing underneath ---------------------------------------------------------------------


async def test_truncated_archive_is_eio(sample: Mounted) -> None:
    """After the archive file is truncated underneath, reads fail with EIO instead of short or wrong bytes."""
    big = max(sample.files, key=lambda p: len(sample.files[p]))
    attr = await sample.resolve(big)
    fi = await sample.ops.open(attr.st_ino, os.O_RDONLY, CTX)
    assert await sample.ops.read(fi.fh, 0, 100) == sample.files[big][:100]
    os.truncate(sample.path, sample.path.stat().st_size // 2)
    assert await fuse_errno(sample.ops.read(fi.fh, 0, 100)) == errno.EIO
    index = await sample.resolve("index.json")  # early in the file, still there, but the archive changed
    assert await fuse_errno(sample.ops.read(pyfuse3.FileHandleT(index.st_ino), 0, 10)) == errno.EIO


async def test_archive_rewritten_in_place_is_eio(sample: Mounted) -> None:
    """Bytes rewritten in place (same size, new mtime) are no longer served."""
    attr = await sample.resolve("index.json")
    st = sample.path.stat()
    with open(sample.path, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"X")
    os.utime(sample.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert await fuse_errno(sample.ops.read(pyfuse3.FileHandleT(attr.st_ino), 0, 10)) == errno.EIO


async def test_archive_replaced_by_rename_keeps_serving_the_original(sample: Mounted, tmp_path: Path) -> None:
    """Renaming another file over the archive's path changes nothing: the mount holds the original fd."""
    other = tmp_path / "other.tar"
    other.write_bytes(b"\0" * 10240)
    os.replace(other, sample.path)
    for path, data in sample.files.items():
        assert await sample.read_all(path) == data


# -- --verify ------------------------------------------------------------------------------------------


@dataclass
class Corrupt:
    """A layout whose blob ``bad`` holds bytes that do not hash to its name."""

    mounted: Mounted
    bad: str
    good: list[str]


def corrupt_layout(tmp_path: Path, *, verify: bool, algorithm: str = "sha256") -> Corrupt:
    """Write the sample layout with one layer blob's bytes replaced (same size) and open it."""
    builder = sample_builder(algorithm)
    blobs = [p for p in builder.files if p.startswith("blobs/")]
    bad = next(p for p in blobs if builder.files[p] == b"layer one\n")
    builder.files[bad] = b"layer 0ne\n"
    unverifiable = "blobs/b3/" + "ab" * 32
    builder.files[unverifiable] = b"an algorithm ocifuse cannot hash\n"
    path = builder.write_tar(tmp_path / f"corrupt-{algorithm}.tar")
    m = make_ops(path, builder.layout_files(), verify=verify)
    good = [p for p in builder.layout_files() if p != bad]
    return Corrupt(m, bad, good)


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
async def test_verify_refuses_a_corrupt_blob(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, algorithm: str
) -> None:
    """--verify: a blob not matching its digest is EIO, logged with the digest; the rest read fine."""
    c = corrupt_layout(tmp_path, verify=True, algorithm=algorithm)
    with caplog.at_level(logging.ERROR, logger="ocifuse.fs"):
        attr = await c.mounted.resolve(c.bad)
        fi = await c.mounted.ops.open(attr.st_ino, os.O_RDONLY, CTX)
        assert await fuse_errno(c.mounted.ops.read(fi.fh, 0, 4096)) == errno.EIO
        assert await fuse_errno(c.mounted.ops.read(fi.fh, 5, 1)) == errno.EIO
    digest = c.bad.split("/", 1)[1].replace("/", ":")
    assert any(digest in r.getMessage() for r in caplog.records)
    for path in c.good:
        assert await c.mounted.read_all(path) == c.mounted.files[path], path
    c.mounted.archive.close()


async def test_without_verify_a_corrupt_blob_is_served_as_it_is(tmp_path: Path) -> None:
    """Without --verify, the archive's bytes are served whether or not they match their name."""
    c = corrupt_layout(tmp_path, verify=False)
    assert await c.mounted.read_all(c.bad) == b"layer 0ne\n"
    c.mounted.archive.close()


async def test_verify_hashes_each_blob_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent first readers of a blob wait for one hash; later reads reuse the cached verdict."""
    c = corrupt_layout(tmp_path, verify=True)
    ops = c.mounted.ops
    calls: list[int] = []
    real = ops.verify_blob

    def counting(node: Node) -> bool:
        calls.append(node.inode)
        return real(node)

    monkeypatch.setattr(ops, "verify_blob", counting)
    big = next(p for p in c.good if len(c.mounted.files[p]) == 100 * 1024)
    good = await c.mounted.resolve(big)
    bad = await c.mounted.resolve(c.bad)
    results: list[bytes | int] = []

    async def reader(ino: int, off: int) -> None:
        try:
            results.append(bytes(await ops.read(pyfuse3.FileHandleT(ino), off, 1024)))
        except pyfuse3.FUSEError as e:
            results.append(e.errno)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(reader, good.st_ino, i * 1024)
            nursery.start_soon(reader, bad.st_ino, 0)
    assert sorted(calls) == sorted([good.st_ino, bad.st_ino])
    assert results.count(errno.EIO) == 8
    data = c.mounted.files[big]
    assert sorted(r for r in results if isinstance(r, bytes)) == sorted(
        data[i * 1024 : (i + 1) * 1024] for i in range(8)
    )
    await ops.read(pyfuse3.FileHandleT(good.st_ino), 0, 1)
    assert await fuse_errno(ops.read(pyfuse3.FileHandleT(bad.st_ino), 0, 1)) == errno.EIO
    assert len(calls) == 2
    c.mounted.archive.close()


async def test_verify_after_truncation_is_eio(tmp_path: Path) -> None:
    """--verify over an archive truncated before the first read: EIO, not a crash or a cached 'good'."""
    c = corrupt_layout(tmp_path, verify=True)
    big = next(p for p in c.good if len(c.mounted.files[p]) == 100 * 1024)
    attr = await c.mounted.resolve(big)
    os.truncate(c.mounted.path, 1024)
    fh = pyfuse3.FileHandleT(attr.st_ino)
    assert await fuse_errno(c.mounted.ops.read(fh, 0, 10)) == errno.EIO
    assert await fuse_errno(c.mounted.ops.read(fh, 0, 10)) == errno.EIO
    c.mounted.archive.close()


def test_archive_fixture_is_a_tar(sample: Mounted) -> None:
    """The fixture is a real tar (so the tests above exercise real member offsets)."""
    with tarfile.open(sample.path) as tf:
        names = {m.name.rstrip("/") for m in tf.getmembers() if m.isfile()}
    assert names == set(sample.files)
