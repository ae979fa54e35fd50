"""The kernel's round trips to the daemon over real mounts: what ``find`` and ``ls -lR`` cost in FUSE
requests, and the extended-attribute answers that let the kernel stop asking (issue 18).

The daemon logs, when it unmounts, how many requests of each kind it answered (fs.REQUESTS): these
tests count them, never time them. The bounds grow with the directories, not with the files: a
request per file (a lookup, a getattr, a getxattr of ``ls -l``) fails them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from mounting import Mount, MountSpec, fusermount_unmount, start, teardown, wait_live
from oci import LayoutBuilder
from tarbuild import BLOCK, dir_member, file_member, write_member

from ocifuse import model

pytestmark = pytest.mark.fuse

DIRS = 20
FILES = 50  # in each directory: 1,000 files in all
NOTE = b"a note\x00with a zero byte"


def rootfs_archive(directory: Path, *, xattr: bool) -> Path:
    """A one-layer image of DIRS directories of FILES files; ``xattr``: one file carries user.note."""
    members = []
    for d in range(DIRS):
        members.append(dir_member(f"d{d:02}/"))
        for f in range(FILES):
            members.append(file_member(f"d{d:02}/f{f:03}", b"%d/%d\n" % (d, f)))
    if xattr:
        members[1].info.pax_headers = {"SCHILY.xattr.user.note": NOTE.decode("utf-8", "surrogateescape")}
    out = io.BytesIO()
    for m in members:
        write_member(out, m, tarfile.PAX_FORMAT)
    layer = out.getvalue() + b"\0" * 2 * BLOCK
    b = LayoutBuilder()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    b.tag(b.image([layer], config=config), "v1")
    directory.mkdir(parents=True, exist_ok=True)
    return b.write_tar(directory / "image.tar")


def requests_after_unmount(m: Mount) -> Counter[str]:
    """Unmount ``m``, wait for its daemon, and read the request counts it logged on its way out."""
    fusermount_unmount(m.mountpoint)
    assert m.wait_exit() == 0, m.stderr()
    log = m.stderr()
    found = re.search(r"unmounted .* after (\d+) FUSE requests(?:: (.*))?$", log, re.MULTILINE)
    assert found, log
    counts = Counter({name: int(n) for name, n in re.findall(r"(\w+) (\d+)", found.group(2) or "")})
    assert counts.total() == int(found.group(1))
    return counts


def serve(archive: Path, mnt: Path, *options: str) -> Mount:
    """A live foreground mount (the caller tears it down)."""
    m = start(MountSpec(archive, mnt, options=[",".join(options)] if options else ()))
    wait_live(m)
    return m


def walk(mnt: Path) -> int:
    """``find MNT | wc -l``, then ``ls -lR MNT`` (every file's stat and xattrs): the lines find printed."""
    found = subprocess.run(["find", str(mnt)], capture_output=True, check=True).stdout.count(b"\n")
    subprocess.run(["ls", "-lR", str(mnt)], stdout=subprocess.DEVNULL, check=True)
    return found


def xattr_errno(call: object, *args: object) -> int:
    """The errno an os.*xattr call fails with (0 if it does not fail)."""
    try:
        call(*args)  # type: ignore[operator]
    except OSError as e:
        return e.errno or -1
    return 0


def test_find_and_ls_cost_requests_per_directory_not_per_file(tmp_path: Path) -> None:
    """A rootfs without xattrs: find and ls -lR of 1,000 files cost a few requests per directory
    (readdirplus hands the kernel every entry's attributes; getxattr and listxattr answer ENOSYS
    once, and the kernel answers every later call itself with EOPNOTSUPP)."""
    archive = rootfs_archive(tmp_path / "image", xattr=False)
    m = serve(archive, tmp_path / "mnt", "rootfs", f"cache={tmp_path / 'cache'}")
    try:
        assert walk(m.mountpoint) == 1 + DIRS * (1 + FILES)
        some = m.path("d03", "f007")
        assert some.read_bytes() == b"3/7\n"
        for call, args in [(os.listxattr, (some,)), (os.getxattr, (some, "user.note"))] * 3:
            assert xattr_errno(call, *args) == errno.EOPNOTSUPP
        counts = requests_after_unmount(m)
    finally:
        problems = teardown(m)
    assert not problems, problems
    dirs = DIRS + 1
    assert counts["getxattr"] <= 1 and counts["listxattr"] <= 1, counts
    assert counts["lookup"] + counts["getattr"] <= 2 * dirs, counts  # never one per file
    assert counts["readdir"] <= 2 * 2 * dirs, counts  # two walks, a reply and the end of each directory
    assert counts.total() <= 10 * dirs, counts


def test_a_view_with_xattrs_serves_each_and_enodata_for_the_absent(tmp_path: Path) -> None:
    """A rootfs whose layer carries an xattr: that one is served byte for byte, listed, and every
    other name of every file answers ENODATA (not EOPNOTSUPP: the view has xattrs)."""
    archive = rootfs_archive(tmp_path / "image", xattr=True)
    m = serve(archive, tmp_path / "mnt", "rootfs", f"cache={tmp_path / 'cache'}")
    try:
        noted, other = m.path("d00", "f000"), m.path("d00", "f001")
        assert os.getxattr(noted, "user.note") == NOTE
        assert os.listxattr(noted) == ["user.note"]
        assert os.listxattr(other) == [] and os.listxattr(m.path("d00")) == []
        assert xattr_errno(os.getxattr, other, "user.note") == errno.ENODATA
        assert xattr_errno(os.getxattr, noted, "user.other") == errno.ENODATA
        counts = requests_after_unmount(m)
    finally:
        problems = teardown(m)
    assert not problems, problems
    assert counts["getxattr"] >= 3 and counts["listxattr"] >= 3, counts  # each call asked the daemon


def test_the_layout_view_answers_eopnotsupp(tmp_path: Path) -> None:
    """The plain layout view has no xattrs: EOPNOTSUPP, and the daemon is asked once at most."""
    b = LayoutBuilder()
    b.tag(b.image([b"layer"]), "v1")
    archive = b.write_tar(tmp_path / "layout.tar")
    m = serve(archive, tmp_path / "mnt", f"cache={tmp_path / 'cache'}")
    try:
        index = m.path("index.json")
        assert json.loads(index.read_bytes())["manifests"][0]["mediaType"] == model.MEDIA_MANIFEST
        for path in [index, m.mountpoint, m.path("blobs", "sha256")]:
            assert xattr_errno(os.listxattr, path) == errno.EOPNOTSUPP
            assert xattr_errno(os.getxattr, path, "security.selinux") == errno.EOPNOTSUPP
        counts = requests_after_unmount(m)
    finally:
        problems = teardown(m)
    assert not problems, problems
    assert counts["getxattr"] <= 1 and counts["listxattr"] <= 1, counts
