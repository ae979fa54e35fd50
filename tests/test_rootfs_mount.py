"""The rootfs view on real FUSE mounts: images made by umoci and skopeo, compared with ``umoci unpack``.

Programs run from the mount (chroot, bwrap, podman run --rootfs). Building the images needs root
(mknod, chown): elsewhere these tests skip, and in CI (``CI=true``) they fail.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import mounted, run_ocifuse, skip_or_fail
from peers import PODMAN_RUN, isolated_store, require_tools
from rootfs_images import (
    CAP_NET_RAW,
    LONG,
    build_umoci_image,
    skopeo_compressed,
    skopeo_uncompressed,
    snapshot,
    umoci_unpack,
)
from tarbuild import tar_extract

from ocifuse import open_layout
from ocifuse.fsck import check

pytestmark = pytest.mark.fuse


@dataclass(frozen=True)
class Images:
    """One image in several forms, and umoci's unpacking of it."""

    umoci_layout: Path  # gzip layers, tag v4
    plain_archive: Path  # oci-archive, uncompressed layers
    plain_dir: Path  # layout directory, uncompressed layers
    unpacked: Path  # umoci unpack's rootfs
    forms: dict[
        str, Path
    ]  # every form, by name: the above, umoci's gzip layout, skopeo's gzip and zstd archives


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Build the multi-layer image once per session (rootfs_images.build_umoci_image)."""
    require_tools("umoci", "skopeo")
    if os.geteuid() != 0:
        skip_or_fail("building the rootfs test image needs root (mknod, chown, umoci unpack as root)")
    root = tmp_path_factory.mktemp("rootfs")
    layout = build_umoci_image(root)
    archive, directory = skopeo_uncompressed(layout, "v4", root)
    forms = {"plain-archive": archive, "plain-directory": directory, "umoci-gzip-directory": layout}
    forms.update(skopeo_compressed(layout, "v4", root))
    return Images(layout, archive, directory, umoci_unpack(layout, "v4", root / "unpacked"), forms)


FORMS = ["plain-archive", "plain-directory", "umoci-gzip-directory", "gzip-archive", "zstd-archive"]


@pytest.mark.parametrize("cached", [False, True], ids=["first-mount", "from-cache"])
@pytest.mark.parametrize("form", FORMS)
def test_rootfs_equals_umoci_unpack(images: Images, form: str, cached: bool, tmp_path: Path) -> None:
    """Every path, type, mode, owner, size, mtime, link target, device, xattr, hardlink group and byte,
    in every layer compression, on a first mount and on one whose indexes come from the cache."""
    expected, expected_groups = snapshot(images.unpacked)
    options = [f"rootfs,ref=v4,cache={tmp_path / 'cache'}"]
    if cached:
        with mounted(images.forms[form], tmp_path / "first", options=options):
            pass
        assert any((tmp_path / "cache").iterdir())
    with mounted(images.forms[form], tmp_path / "mnt", options=options) as m:
        served, groups = snapshot(m.mountpoint)
        root_st, unpacked_st = os.stat(m.mountpoint), os.stat(images.unpacked)
        log = m.stderr()
    assert sorted(served) == sorted(expected)
    for path, want in expected.items():
        assert served[path] == want, path
    assert groups == expected_groups == {frozenset({"data/hard2", "data/hard3"})}
    assert (root_st.st_mode, root_st.st_uid, int(root_st.st_mtime)) == (
        unpacked_st.st_mode,
        unpacked_st.st_uid,
        int(unpacked_st.st_mtime),
    )
    # what the image holds, spelled out: a regression in both tools at once must not pass
    assert served["usr/bin/ping"][1] == 0o4755 and served["tmp"][1] == 0o1777
    assert served["usr/bin/ping"][9] == (("security.capability", CAP_NET_RAW),)
    assert served["home/app/.profile"][2:4] == (1000, 1000)
    assert served["loop1"][7] == "loop2" and served["abs"][7] == "/etc/passwd"
    assert served[LONG][10] == b"a file with a long name\n"
    assert "opq/old1" not in served and "opq/new1" in served and "etc/group" not in served
    assert served["d2f"][10] == b"a directory, then a file" and served["f2d/child"][10] == b"child"
    assert served["lib"][7] == "usr/lib" and "usr/lib/inserted" in served and "usr/lib/libx.so" not in served
    # umoci's "d2f/.wh.inner" under the file that replaced the directory: ignored, and logged
    assert "d2f/.wh.inner" in log


def test_rootfs_rootless_shows_every_owner_as_the_mounting_user(images: Images, tmp_path: Path) -> None:
    """-o rootless: every uid/gid is the mounting user's, as ``umoci unpack --rootless`` writes them."""
    with mounted(
        images.plain_archive, tmp_path / "mnt", options=[f"rootfs,rootless,cache={tmp_path / 'cache'}"]
    ) as m:
        st = os.lstat(m.path("home", "app", ".profile"))
        root = os.lstat(m.path("etc"))
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert (root.st_uid, root.st_gid) == (os.getuid(), os.getgid())


def test_programs_run_from_the_mount(images: Images, tmp_path: Path) -> None:
    """chroot and bwrap run busybox from the mount; podman runs it with the mount as --rootfs."""
    require_tools("chroot", "bwrap", "podman", "runc")
    script = "cat /data/small.txt && ls /opq && /usr/bin/ping"
    want = "small file, second version\nnew1\nping\n"
    with mounted(
        images.plain_archive, tmp_path / "mnt", args=["--rootfs", "--cache", str(tmp_path / "cache")]
    ) as m:
        mnt = os.fspath(m.mountpoint)
        chroot = subprocess.run(["chroot", mnt, "/bin/sh", "-c", script], capture_output=True, text=True)
        bwrap = subprocess.run(
            ["bwrap", "--ro-bind", mnt, "/", "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
        )
        # ":O": podman lays a writable overlay over the read-only rootfs (it writes /etc/mtab, /etc/hosts)
        podman = subprocess.run(
            ["podman", "run", "--rm", *PODMAN_RUN, "--rootfs", f"{mnt}:O", "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert (chroot.returncode, chroot.stdout) == (0, want), chroot.stderr
    assert (bwrap.returncode, bwrap.stdout) == (0, want), bwrap.stderr
    assert (podman.returncode, podman.stdout) == (0, want), podman.stderr


def test_rootfs_mount_refuses_without_a_single_image(images: Images, tmp_path: Path) -> None:
    """A layout with several refs needs --ref; a ref that is not there is one line and exit 2."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_ocifuse("mount", "--rootfs", "--ref", "nope", images.umoci_layout, mnt)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no ref 'nope'" in done.stderr, done.stderr


@pytest.mark.parametrize("form", FORMS)
def test_fsck_layers_on_the_real_image(images: Images, form: str) -> None:
    """fsck --layers of umoci's image: ok, with umoci's one whiteout under a replaced directory noted."""
    with open_layout(images.forms[form]) as layout:
        report = check(layout, layers=True)
    assert report.ok
    # umoci's own layout keeps blobs of earlier repacks no tag names (umoci gc would drop them)
    found = [(f.code, "d2f/.wh.inner" in f.message) for f in report.findings if f.code != "blob-unreferenced"]
    assert set(found) == {("layer-member-skipped", True)}  # once per image: umoci's layout has v2, v3, v4


def test_buildah_image_equals_umoci_unpack(tmp_path: Path) -> None:
    """An image buildah builds from busybox-static (a copy, then a run that adds symlinks and deletes a
    file: two layers with a whiteout), pushed to an oci-archive: the mount equals umoci unpack of it."""
    require_tools("buildah", "umoci", "runc")
    if os.geteuid() != 0:
        skip_or_fail("buildah with its own storage root needs root here")
    with isolated_store(tmp_path) as store:
        container = store.buildah("from", "scratch").strip()
        store.buildah("copy", container, "/bin/busybox", "/bin/busybox")
        store.buildah("copy", container, "/bin/busybox", "/doomed")
        script = "/bin/busybox --install -s /bin && mkdir -p /etc && echo built > /etc/motd && rm /doomed"
        store.buildah(
            "run", "--runtime", "runc", "--network", "none", container, "/bin/busybox", "sh", "-c", script
        )
        store.buildah("commit", "-q", container, "rootfs-test:1")
        store.buildah("push", "-q", "rootfs-test:1", f"oci-archive:{tmp_path / 'image.tar'}:v1")
    layout = tar_extract(tmp_path / "image.tar", tmp_path / "layout")
    expected, expected_groups = snapshot(umoci_unpack(layout, "v1", tmp_path / "unpacked"))
    with mounted(
        tmp_path / "image.tar", tmp_path / "mnt", options=[f"rootfs,cache={tmp_path / 'cache'}"]
    ) as m:
        served, groups = snapshot(m.mountpoint)
        run = subprocess.run(
            ["chroot", str(m.mountpoint), "/bin/cat", "/etc/motd"], capture_output=True, text=True
        )
    assert served == expected and groups == expected_groups
    assert "doomed" not in served and served["bin/sh"][7] == "/bin/busybox"
    assert run.stdout == "built\n"
