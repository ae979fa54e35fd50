"""Multi-layer images made by real tools (umoci, skopeo) for the rootfs view, and a tree snapshot to compare.

``build_umoci_image`` writes a umoci layout whose tag ``v4`` has four gzip layers made the ways
real images are made: ``umoci repack`` of a root filesystem populated and then changed (whiteouts
for deleted files and directories, a directory replaced by a file and the reverse), ``umoci insert
--opaque`` (the opaque marker written before its directory), ``umoci insert`` and ``--whiteout``
through a symlinked directory (``lib -> usr/lib``), and ``umoci insert --whiteout``. The
content has every entry type: files, directories, symlinks (absolute, dangling, a loop),
hardlinks, character and block devices, a fifo, setuid and sticky modes, owners other than root,
``security.capability`` and ``user.*`` xattrs, and long names. Building needs root (mknod, chown).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
from pathlib import Path

from peers import run

LONG = "deep/" + "d" * 100 + "/" + "f" * 200 + ".txt"
# setcap's encoding of cap_net_raw+ep, VFS_CAP_REVISION_2 (linux/capability.h).
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
BUSYBOX = "/bin/busybox"


def _write(root: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _populate(r: Path) -> None:
    """The first layer's content: every entry type."""
    _write(r, "bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    for tool in ("sh", "ls", "cat", "echo", "id", "stat"):
        (r / "bin" / tool).symlink_to("busybox")
    _write(r, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    _write(r, "etc/group", b"root:x:0:\napp:x:1000:\n")
    _write(r, "data/small.txt", b"small file, first version\n")
    os.setxattr(r / "data/small.txt", "user.comment", b"hello xattr")
    _write(r, "data/big.bin", random.Random(1).randbytes(300 * 1024 + 7))
    _write(r, "data/hard1", b"hardlinked content\n")
    os.link(r / "data/hard1", r / "data/hard2")
    os.link(r / "data/hard1", r / "data/hard3")
    ping = _write(r, "usr/bin/ping", b"#!/bin/sh\necho ping\n", 0o755)
    os.setxattr(ping, "security.capability", CAP_NET_RAW)
    ping.chmod(0o4755)  # after the xattr: setting security.capability clears setuid
    _write(r, "usr/bin/wall", b"#!/bin/sh\n", 0o2755)
    (r / "dev").mkdir()
    os.mknod(r / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(r / "dev/loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    (r / "run").mkdir()
    os.mkfifo(r / "run/fifo", 0o600)
    (r / "tmp").mkdir()
    (r / "tmp").chmod(0o1777)
    home = r / "home/app"
    _write(r, "home/app/.profile", b"export A=1\n", 0o600)
    os.chown(home / ".profile", 1000, 1000)
    home.chmod(0o750)
    os.chown(home, 1000, 1000)
    _write(r, LONG, b"a file with a long name\n")
    _write(r, "olddir/a", b"a")
    _write(r, "olddir/b/c", b"c")
    _write(r, "d2f/inner", b"inner")
    _write(r, "f2d", b"a file, then a directory")
    _write(r, "opq/old1", b"old 1")
    _write(r, "opq/sub/old2", b"old 2")
    _write(r, "usr/lib/libx.so", b"a library\n")
    (r / "lib").symlink_to("usr/lib")  # merged-/usr: later layers write through it
    (r / "loop1").symlink_to("loop2")
    (r / "loop2").symlink_to("loop1")
    (r / "abs").symlink_to("/etc/passwd")
    (r / "dangling").symlink_to("no/such/file")


def _change(r: Path) -> None:
    """The second layer: changes, deletions, replacements."""
    (r / "data/small.txt").write_bytes(b"small file, second version\n")
    (r / "data/hard1").unlink()  # hard2 and hard3 stay linked
    shutil.rmtree(r / "olddir")
    shutil.rmtree(r / "d2f")
    _write(r, "d2f", b"a directory, then a file")
    (r / "f2d").unlink()
    _write(r, "f2d/child", b"child")
    (r / "etc").chmod(0o700)
    _write(r, "data/new.txt", b"added in layer 2\n")


def build_umoci_image(root: Path) -> Path:
    """A umoci layout under ``root`` with tag ``v4``: four gzip layers (see the module docstring)."""
    layout = root / "umoci"
    bundle = root / "bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "unpack", "--image", f"{layout}:base", bundle)
    _populate(bundle / "rootfs")
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", bundle)
    _change(bundle / "rootfs")
    run("umoci", "repack", "--image", f"{layout}:v2", bundle)
    opaque = root / "opaque-src"
    _write(opaque, "new1", b"only this layer's entries stay\n")
    run("umoci", "insert", "--image", f"{layout}:v2", "--tag", "v3", "--opaque", opaque, "/opq")
    # Through the symlink lib -> usr/lib: umoci writes "lib/inserted" and "lib/.wh.libx.so", and
    # umoci unpack (securejoin) applies them inside usr/lib.
    _write(opaque, "inserted", b"written through a symlinked directory\n")
    run("umoci", "insert", "--image", f"{layout}:v3", "--tag", "v3a", opaque / "inserted", "/lib/inserted")
    run("umoci", "insert", "--image", f"{layout}:v3a", "--tag", "v3b", "--whiteout", "/lib/libx.so")
    run("umoci", "insert", "--image", f"{layout}:v3b", "--tag", "v4", "--whiteout", "/etc/group")
    run("umoci", "config", "--image", f"{layout}:v4", "--config.cmd", "/bin/sh")
    return layout


def skopeo_uncompressed(umoci_layout: Path, tag: str, root: Path) -> tuple[Path, Path]:
    """The image as an oci-archive and as a layout directory with uncompressed tar layers (skopeo)."""
    plain = root / "plain-dir"
    run("skopeo", "copy", "--quiet", "--dest-decompress", f"oci:{umoci_layout}:{tag}", f"dir:{plain}")
    archive = root / "plain.tar"
    accept = "--dest-oci-accept-uncompressed-layers"
    run("skopeo", "copy", "--quiet", accept, f"dir:{plain}", f"oci-archive:{archive}:{tag}")
    directory = root / "plain-oci"
    run("skopeo", "copy", "--quiet", accept, f"dir:{plain}", f"oci:{directory}:{tag}")
    return archive, directory


def skopeo_compressed(umoci_layout: Path, tag: str, root: Path) -> dict[str, Path]:
    """The image as skopeo writes oci-archives with gzip (umoci's layers kept) and zstd layers."""
    gzip_archive, zstd_archive = root / "gzip.tar", root / "zstd.tar"
    run("skopeo", "copy", "--quiet", f"oci:{umoci_layout}:{tag}", f"oci-archive:{gzip_archive}:{tag}")
    run(
        "skopeo", "copy", "--quiet", "--dest-compress-format", "zstd", f"oci:{umoci_layout}:{tag}",
        f"oci-archive:{zstd_archive}:{tag}",
    )  # fmt: skip
    return {"gzip-archive": gzip_archive, "zstd-archive": zstd_archive}


def umoci_unpack(umoci_layout: Path, tag: str, dest: Path) -> Path:
    """``umoci unpack`` of the image (as root): its rootfs directory."""
    run("umoci", "unpack", "--image", f"{umoci_layout}:{tag}", dest)
    return dest / "rootfs"


Snapshot = dict[str, tuple[object, ...]]


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    """The extended attributes of ``path``, sorted; none where the filesystem has none at all
    (EOPNOTSUPP: what the kernel answers for a FUSE mount whose view carries no xattr)."""
    try:
        names = os.listxattr(path)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        return ()
    return tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False)) for k in names))


def snapshot(root: Path, *, mtimes: bool = True) -> tuple[Snapshot, set[frozenset[str]]]:
    """Every path under ``root`` (never following a symlink) with its type, mode, owner, size, mtime,
    link target, device number, xattrs and content; and the hardlink groups (paths sharing an inode).
    """
    out: Snapshot = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            data = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else None
            xattrs = None if stat.S_ISLNK(st.st_mode) else _xattrs(path)
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                int(st.st_mtime) if mtimes else 0,
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0,
                target,
                rdev,
                xattrs,
                data,
            )
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, set()).add(rel)
    groups = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    return out, groups
