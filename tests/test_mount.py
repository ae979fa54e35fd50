"""Real mounts: the installed ``ocifuse mount`` serving archives to the kernel, to peers and to threads."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RealImage
from mounting import (
    OCIFUSE,
    Mount,
    MountSpec,
    background_mount,
    daemon_pids,
    is_mounted,
    mount_source,
    mounted,
    mounted_many,
    mounts,
    no_new_mounts,
    require_fuse,
    run_ocifuse,
    wait_until,
)
from peers import require_tools, run
from tarbuild import ODD_FORMATS, SKIPPED_NAMES, SKIPPING, sample_builder, tar_extract, tree_of

pytestmark = pytest.mark.fuse

TAG = "v1"


@pytest.fixture(autouse=True, scope="module")
def _no_module_mount_leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module-scoped mounts, too, must be gone when the module is done."""
    with no_new_mounts(tmp_path_factory.getbasetemp()):
        yield


@pytest.fixture(scope="module")
def real_mount(real_image: RealImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """skopeo's archive of the real image, mounted once for the read-only tests of this module."""
    with mounted(real_image.archive, tmp_path_factory.mktemp("real") / "mnt") as m:
        yield m


@pytest.fixture(scope="module")
def odd_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Mount]]]:
    """Every odd-format and skipping fixture of tarbuild, all mounted at once: name -> (archive, mount)."""
    root = tmp_path_factory.mktemp("odd")
    archives = {}
    for name, build in {**ODD_FORMATS, **SKIPPING}.items():
        (root / name).mkdir()
        archives[name] = build(root / name)
    specs = [MountSpec(path, root / name / "mnt") for name, path in archives.items()]
    with mounted_many(specs) as ms:
        yield {name: (archives[name], m) for name, m in zip(archives, ms, strict=True)}


def walk(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Files (relative path -> bytes) and directories under ``root``; anything else fails the test."""
    for top, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(top, name)).st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), f"{top}/{name}: {stat.filemode(mode)}"
    return tree_of(root)


# -- the helper's own contract ---------------------------------------------------------------------------


def test_require_fuse_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /dev/fuse: a skip on a developer's machine, a failure in CI (a green CI means real mounts)."""
    exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p != "/dev/fuse" and exists(p))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="/dev/fuse"):
        require_fuse()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="/dev/fuse"):
        require_fuse()
    monkeypatch.undo()
    require_fuse()


# -- byte equality ------------------------------------------------------------------------------------


def test_real_archive_equals_tar_x(real_mount: Mount, tmp_path: Path) -> None:
    """Every file and directory of skopeo's archive, read through the mount, equals ``tar -x`` of it."""
    assert walk(real_mount.mountpoint) == walk(tar_extract(real_mount.archive, tmp_path / "x"))


@pytest.mark.parametrize("name", sorted(ODD_FORMATS))
def test_odd_format_equals_tar_x(
    odd_mounts: dict[str, tuple[Path, Mount]], name: str, tmp_path: Path
) -> None:
    """Each odd tar format serves exactly what GNU ``tar -x`` extracts from it, byte for byte."""
    archive, m = odd_mounts[name]
    files, dirs = walk(m.mountpoint)
    assert (files, dirs) == walk(tar_extract(archive, tmp_path / "x"))
    assert "index.json" in files and "oci-layout" in files


@pytest.mark.parametrize("name", sorted(SKIPPING))
def test_skipped_members_never_appear(odd_mounts: dict[str, tuple[Path, Mount]], name: str) -> None:
    """Members the name policy refuses (unsafe names, links, devices) are not served: only the layout is."""
    _, m = odd_mounts[name]
    files, dirs = walk(m.mountpoint)
    assert files == sample_builder().layout_files()
    assert dirs == {"blobs", "blobs/sha256"}
    for skipped in SKIPPED_NAMES[name] - {""}:
        assert not os.path.lexists(m.mountpoint / skipped.lstrip("/")), skipped


# -- what the kernel is told ------------------------------------------------------------------------


def test_mount_is_ro_nodev_nosuid_with_fsname_and_subtype(real_mount: Mount) -> None:
    """The mount is fuse.ocifuse, named after its archive, and read-only, nodev, nosuid."""
    point = str(real_mount.mountpoint)
    found = [(kind, source) for p, kind, source in mounts(None) if p == point]
    assert found == [("fuse.ocifuse", str(real_mount.archive))]
    assert mount_source(point) == str(real_mount.archive)
    flags = os.statvfs(point).f_flag
    for flag in (os.ST_RDONLY, os.ST_NODEV, os.ST_NOSUID):
        assert flags & flag, flag


def test_modes_and_owner(real_mount: Mount) -> None:
    """Directories 0555, files 0444, all owned by the mounting user; sizes are the archive's."""
    for top, dirnames, filenames in os.walk(real_mount.mountpoint):
        for name in dirnames:
            st = os.stat(os.path.join(top, name))
            assert stat.S_IMODE(st.st_mode) == 0o555
        for name in filenames:
            st = os.stat(os.path.join(top, name))
            assert stat.S_IMODE(st.st_mode) == 0o444
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
            assert st.st_blocks == -(-st.st_size // 512)


def test_fuse_and_ignored_options_mount(real_image: RealImage, tmp_path: Path) -> None:
    """Every kind of -o option at once mounts: FUSE's reach the kernel, mount(8)'s are ignored."""
    options = ["allow_other,noexec,noatime,sync", "nofail,_netdev,x-systemd.automount,relatime,rw,suid,dev"]
    with mounted(real_image.archive, tmp_path / "mnt", options=options) as m:
        assert (m.mountpoint / "index.json").read_bytes() == (
            real_image.layout_dir / "index.json"
        ).read_bytes()
        line = next(
            x for x in Path("/proc/self/mountinfo").read_text().splitlines() if f" {m.mountpoint} " in x
        )
        assert "noexec" in line.split()[5] and "noatime" in line.split()[5]
        assert "allow_other" in line
        flags = os.statvfs(m.mountpoint).f_flag
        assert flags & os.ST_RDONLY and flags & os.ST_NOSUID and flags & os.ST_NODEV


# -- real peers on the mount ---------------------------------------------------------------------------


def test_skopeo_copy_from_mount(real_mount: Mount, tmp_path: Path) -> None:
    """``skopeo copy oci:MNT:TAG dir:`` gives the same manifest, config and layers as from the archive."""
    require_tools("skopeo")
    run("skopeo", "copy", "--quiet", f"oci:{real_mount.mountpoint}:{TAG}", f"dir:{tmp_path / 'from-mount'}")
    run(
        "skopeo", "copy", "--quiet", f"oci-archive:{real_mount.archive}:{TAG}", f"dir:{tmp_path / 'from-tar'}"
    )
    got, _ = tree_of(tmp_path / "from-mount")  # skopeo's dir: transport, a flat directory
    assert got == tree_of(tmp_path / "from-tar")[0]
    manifest = json.loads(got["manifest.json"])
    blobs = [manifest["config"], *manifest["layers"]]
    assert len(blobs) >= 3
    for desc in blobs:
        assert len(got[desc["digest"].split(":", 1)[1]]) == desc["size"]


def test_umoci_stat_and_unpack(real_mount: Mount, real_image: RealImage, tmp_path: Path) -> None:
    """umoci reads the mount: ``stat`` matches the extracted layout's; ``unpack`` gives the files."""
    require_tools("umoci")
    stat_mount = subprocess.run(
        ["umoci", "stat", "--json", "--image", f"{real_mount.mountpoint}:{TAG}"],
        capture_output=True,
        text=True,
    )
    assert stat_mount.returncode == 0, stat_mount.stderr
    stat_dir = subprocess.run(
        ["umoci", "stat", "--json", "--image", f"{real_image.layout_dir}:{TAG}"],
        capture_output=True,
        text=True,
    )
    assert json.loads(stat_mount.stdout) == json.loads(stat_dir.stdout)
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{real_mount.mountpoint}:{TAG}", bundle)
    for path, data in real_image.files.items():
        if path.startswith("/etc/app"):
            continue  # only in tag v2, which the archive does not hold
        assert (bundle / "rootfs" / path.lstrip("/")).read_bytes() == data, path


def test_oci_image_tool_validates_the_mount(real_mount: Mount) -> None:
    """``oci-image-tool validate`` accepts the mount as an image layout and the tagged image in it."""
    require_tools("oci-image-tool")
    # This oci-image-tool has no "imageLayout" type; "image" on a directory validates the layout.
    run("oci-image-tool", "validate", "--type", "image", "--ref", f"name={TAG}", real_mount.mountpoint)


# -- concurrent readers -------------------------------------------------------------------------------


def test_threads_read_random_ranges(real_mount: Mount, real_layout_dir: Path) -> None:
    """Several threads reading random ranges of several blobs at once get every byte right."""
    blobs = sorted((real_mount.mountpoint / "blobs" / "sha256").iterdir())
    reference = {p.name: (real_layout_dir / "blobs" / "sha256" / p.name).read_bytes() for p in blobs}
    assert len(reference) >= 3 and max(len(d) for d in reference.values()) > 1 << 20
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fds = {p.name: os.open(p, os.O_RDONLY) for p in blobs}
        try:
            for _ in range(150):
                name = rng.choice(sorted(fds))
                data = reference[name]
                off = rng.randrange(0, len(data) + 100)
                size = rng.choice([1, 511, 4096, 65536, 300_000, rng.randrange(1, 1 << 20)])
                got = os.pread(fds[name], size, off)
                if got != data[off : off + size]:
                    errors.append(f"{name}[{off}:{off + size}]: {len(got)} bytes, wrong")
        except OSError as e:
            errors.append(f"thread {seed}: {e}")
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- refusals through the mount ---------------------------------------------------------------------------


def _writes(root: Path) -> dict[str, Callable[[], object]]:
    index = root / "index.json"
    return {
        "create": lambda: os.open(root / "new", os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda: os.mkdir(root / "newdir"),
        "chmod": lambda: os.chmod(index, 0o644),
        "chown": lambda: os.chown(index, 1, 1),
        "utime": lambda: os.utime(index, (0, 0)),
        "unlink": lambda: os.unlink(index),
        "rmdir": lambda: os.rmdir(root / "blobs"),
        "rename": lambda: os.rename(index, root / "moved.json"),
        "symlink": lambda: os.symlink("index.json", root / "link"),
        "link": lambda: os.link(index, root / "hardlink"),
        "open_write": lambda: os.open(index, os.O_WRONLY),
        "open_append": lambda: os.open(index, os.O_RDWR | os.O_APPEND),
        "truncate": lambda: os.truncate(index, 0),
        "setxattr": lambda: os.setxattr(index, "user.x", b"1"),
    }


@pytest.mark.parametrize("op", sorted(_writes(Path("/"))))
def test_writes_are_erofs(real_mount: Mount, op: str) -> None:
    """Every write or metadata change through the mount fails with EROFS and changes nothing."""
    before = sorted(os.listdir(real_mount.mountpoint))
    index = (real_mount.mountpoint / "index.json").read_bytes()
    with pytest.raises(OSError) as info:
        _writes(real_mount.mountpoint)[op]()
    assert info.value.errno == errno.EROFS, info.value
    assert sorted(os.listdir(real_mount.mountpoint)) == before
    assert (real_mount.mountpoint / "index.json").read_bytes() == index


def test_missing_names(real_mount: Mount) -> None:
    """Missing names are ENOENT (also on a second, cached, look); a path through a file is ENOTDIR."""
    root = real_mount.mountpoint
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            os.stat(root / "no-such-file")
    with pytest.raises(FileNotFoundError):
        os.open(root / "blobs" / "sha256" / ("0" * 64), os.O_RDONLY)
    with pytest.raises(FileNotFoundError):
        os.listdir(root / "blobs" / "sha512")
    with pytest.raises(NotADirectoryError):
        os.stat(root / "index.json" / "x")
    with pytest.raises(IsADirectoryError):
        (root / "blobs").read_bytes()


# -- lifecycle -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(real_image: RealImage, tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT to ``mount -f`` unmounts and exits 0, even with a file open on the mount."""
    with mounted(real_image.archive, tmp_path / "mnt") as m:
        fd = os.open(m.path("index.json"), os.O_RDONLY)
        try:
            assert os.read(fd, 1) == b"{"
            m.process.send_signal(sig)
            assert m.wait_exit() == 0, m.stderr()
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the connection went with the daemon
                os.close(fd)
        assert not is_mounted(m.mountpoint)
        assert "Traceback" not in m.stderr()


def _corrupt_archive(directory: Path) -> tuple[Path, str, list[str]]:
    """The sample layout with one layer's bytes changed (same size): archive, bad path, good paths."""
    builder = sample_builder()
    bad = next(p for p, d in builder.files.items() if d == b"layer one\n")
    builder.files[bad] = b"layer 0ne\n"
    path = builder.write_tar(directory / "corrupt.tar")
    return path, bad, [p for p in builder.layout_files() if p != bad]


def test_verify_gives_eio_on_a_corrupt_blob(tmp_path: Path) -> None:
    """--verify and -o verify: the corrupt blob is EIO (logged with its digest); good blobs read fine."""
    archive, bad, good = _corrupt_archive(tmp_path)
    reference = walk(tar_extract(archive, tmp_path / "x"))[0]
    specs = [
        MountSpec(archive, tmp_path / "flag", args=["--verify"]),
        MountSpec(archive, tmp_path / "opt", options=["verify"]),
        MountSpec(archive, tmp_path / "plain"),
    ]
    with mounted_many(specs) as (flag, opt, plain):
        for m in (flag, opt):
            with pytest.raises(OSError) as info:
                m.path(bad).read_bytes()
            assert info.value.errno == errno.EIO
            for path in good:
                assert m.path(path).read_bytes() == reference[path], path
            assert bad.rsplit("/", 1)[1] in m.stderr()
        assert plain.path(bad).read_bytes() == b"layer 0ne\n"


def test_truncated_archive_gives_eio(real_image: RealImage, tmp_path: Path) -> None:
    """Truncating the archive underneath a mount makes reads fail with EIO, not wrong bytes or a crash."""
    archive = tmp_path / "image.tar"
    shutil.copyfile(real_image.archive, archive)
    with mounted(archive, tmp_path / "mnt") as m:
        blobs = sorted(m.path("blobs", "sha256").iterdir(), key=lambda p: p.stat().st_size)
        os.truncate(archive, archive.stat().st_size // 2)
        for blob in (blobs[0], blobs[-1]):
            with pytest.raises(OSError) as info:
                blob.read_bytes()
            assert info.value.errno == errno.EIO, blob
        assert m.alive()
        assert sorted(os.listdir(m.mountpoint)) == ["blobs", "index.json", "oci-layout"]


def test_background_mount_and_umount(real_image: RealImage, tmp_path: Path) -> None:
    """``ocifuse mount`` returns 0 only once the mount is live; ``ocifuse umount`` takes it down."""
    mnt = tmp_path / "mnt"
    with background_mount(real_image.archive, mnt) as done:
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(mnt) and is_mounted(mnt)
        assert (mnt / "oci-layout").read_bytes() == (real_image.layout_dir / "oci-layout").read_bytes()
        assert len(daemon_pids(mnt)) == 1
        down = run_ocifuse("umount", mnt)
        assert down.returncode == 0, down.stderr
        assert not is_mounted(mnt)
        wait_until(lambda: not daemon_pids(mnt), 10, "the daemon to exit after umount")


def test_umount_after_the_daemon_was_killed(real_image: RealImage, tmp_path: Path) -> None:
    """``ocifuse umount`` removes a mount whose daemon died of SIGKILL."""
    with mounted(real_image.archive, tmp_path / "mnt", clean_exit=False) as m:
        m.process.kill()
        assert m.wait_exit() == -signal.SIGKILL
        assert is_mounted(m.mountpoint)
        with pytest.raises(OSError) as info:
            os.listdir(m.mountpoint)
        assert info.value.errno == errno.ENOTCONN
        down = run_ocifuse("umount", m.mountpoint)
        assert down.returncode == 0, down.stderr
        assert not is_mounted(m.mountpoint)


def test_mount_refusals(real_mount: Mount, real_image: RealImage, tmp_path: Path) -> None:
    """A mount that cannot be made says why in one line and exits non-zero, leaving nothing mounted."""
    not_a_tar = tmp_path / "not-a-tar"
    not_a_tar.write_text("hello\n" * 200)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    archive = real_image.archive
    cases: dict[str, tuple[list[str | Path], str]] = {
        "missing archive": (["mount", tmp_path / "nope.tar", empty], "nope.tar"),
        "not a tar": (["mount", not_a_tar, empty], "not-a-tar"),
        "missing mountpoint": (["mount", archive, tmp_path / "nowhere"], "nowhere"),
        "mountpoint is a file": (["mount", archive, a_file], "not a directory"),
        "already mounted": (["mount", archive, real_mount.mountpoint], "already"),
        "umount of a plain dir": (["umount", empty], "not mounted"),
    }
    procs = {
        case: subprocess.Popen(
            [str(OCIFUSE), *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (argv, _) in cases.items()
    }
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, case
        assert out == "", case
        lines = err.strip().splitlines()
        assert len(lines) == 1, (case, err)
        assert cases[case][1] in lines[0], (case, err)
        assert "Traceback" not in err
    assert not is_mounted(empty)
