"""What a new user meets first: one-line refusals that say what to do instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mounting import OCIFUSE, run_ocifuse, skip_or_fail
from oci import LayoutBuilder

from ocifuse import daemon

NOBODY = 65534


def _image(tmp_path: Path) -> LayoutBuilder:
    b = LayoutBuilder()
    b.tag(b.image([b"layer"]), "v1")
    return b


@pytest.mark.parametrize(
    ("conf", "allowed"),
    [
        ("user_allow_other\n", True),
        ("# comment\n  user_allow_other \t\nmount_max = 1000\n", True),
        ("user_allow_other # yes\n", True),
        ("#user_allow_other\n", False),  # Debian's default: commented out
        ("user_allow_other", False),  # fusermount3 skips a last line without its newline
        ("user_allow_others\n", False),
        ("allow_other\n", False),
        ("", False),
    ],
)
def test_fuse_conf_read_as_fusermount3_reads_it(conf: str, allowed: bool) -> None:
    assert daemon.allows_others(conf) is allowed


def test_allow_other_refused_in_one_line(tmp_path: Path) -> None:
    """Without user_allow_other, a user other than root is told the fix before libfuse is called."""
    conf = tmp_path / "fuse.conf"
    conf.write_text("#user_allow_other\n")
    for option in ("allow_other", "allow_root"):
        with pytest.raises(daemon.MountError) as e:
            daemon.check_allow_other(("ro", option), euid=1000, conf_path=str(conf))
        assert str(e.value) == (
            f"option {option} needs a line 'user_allow_other' in {conf} for users other than root "
            f"(an administrator adds it), or mount without {option}"
        )
    with pytest.raises(daemon.MountError):  # no fuse.conf at all: nothing allows it
        daemon.check_allow_other(("allow_other",), euid=1000, conf_path=str(tmp_path / "absent"))
    daemon.check_allow_other(("allow_other",), euid=0, conf_path=str(conf))  # root: always allowed
    daemon.check_allow_other(("ro", "nodev"), euid=1000, conf_path=str(conf))  # not asked for
    conf.write_text("user_allow_other\n")
    daemon.check_allow_other(("allow_other",), euid=1000, conf_path=str(conf))


def _as_nobody(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    user = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    cmd = ["setpriv", *user, *(os.fspath(a) for a in argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_allow_other_as_a_user(tmp_path: Path) -> None:
    """The real command, run as ``nobody``: one line naming user_allow_other, exit 2, nothing mounted."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_or_fail("needs root and setpriv to run the command as another user")
    with open(daemon.FUSE_CONF, encoding="utf-8", errors="replace") as f:
        if daemon.allows_others(f.read()):
            skip_or_fail(f"{daemon.FUSE_CONF} allows allow_other here")
    if _as_nobody(OCIFUSE, "--version").returncode != 0:
        skip_or_fail(f"{OCIFUSE} cannot be run by uid {NOBODY} (a venv under a private directory)")
    archive = _image(tmp_path).write_tar(tmp_path / "a.tar")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = _as_nobody(OCIFUSE, "mount", "-o", "allow_other", archive, mnt)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "user_allow_other" in done.stderr, done.stderr
    assert "fuse_session_mount" not in done.stderr and "fusermount3" not in done.stderr
    assert not os.path.ismount(mnt)


def test_mount_of_a_layout_directory(tmp_path: Path) -> None:
    """A layout directory's layout view: one line saying tools read it as it is; no mount tried."""
    layout = _image(tmp_path).write_dir(tmp_path / "layout")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_ocifuse("mount", layout, mnt)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"ocifuse: {layout} is a layout directory: tools read it as it is (skopeo inspect "
        f"oci:{layout}:TAG), so only its root filesystem needs a mount (--rootfs)\n"
    )
    daemon.check_source(str(layout), rootfs=True)  # its root filesystem is another matter
    done = run_ocifuse("mount", tmp_path, mnt)  # a directory that is no layout either
    assert done.returncode == 2
    assert done.stderr == f"ocifuse: {tmp_path} is a directory, not an oci-archive tar\n"
    assert not os.path.ismount(mnt)


def _imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(done.stdout.split())


def test_one_shot_commands_import_only_what_they_need() -> None:
    """What keeps ``ocifuse umount`` and a mount's start-up cheap (bench/README, one-shot latency)."""
    umount = _imported_by("from ocifuse import cli, umount")
    assert not {"trio", "pyfuse3", "tarfile", "ocifuse.layout", "ocifuse.daemon", "logging"} & umount
    mount = _imported_by("from ocifuse import cli, daemon")
    assert {"trio", "pyfuse3"} <= mount  # the daemon's own
    assert not {"pyzstd", "rapidgzip", "ocifuse.image", "ocifuse.rootfs", "logging.handlers"} & mount


def test_the_readiness_probe_stats_from_another_process(tmp_path: Path) -> None:
    """The readiness probe (a child's stat of the mount's root: daemon._probe says why) gives the
    root's st_dev, and a root that does not answer is one MountError line."""
    assert daemon._probe(str(tmp_path)) == os.stat(tmp_path).st_dev
    with pytest.raises(daemon.MountError, match="does not answer"):
        daemon._probe(str(tmp_path / "missing"))
