"""What a new user meets in the first ten minutes (issue 19): each rough edge, one test or more.

A mistyped command, INFO lines at a terminal that waits for a background mount, a dead mount, a
mountpoint that does not exist or holds files, ``ls -a`` without ``.`` and ``..``, a user without
a home directory, and ``mount --help`` that must say what ARCHIVE may be.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import (
    OCIFUSE,
    background_mount,
    is_mounted,
    mounted,
    require_fuse,
    run_ocifuse,
    skip_or_fail,
)
from oci import LayoutBuilder

from ocifuse import cli, daemon, options
from ocifuse.cache import IndexCache

NOBODY = 65534


def _image(path: Path) -> Path:
    """A small oci-archive whose one image has a real layer (``etc/hello``): both views can mount it."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("etc")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        data = b"hello\n"
        f = tarfile.TarInfo("etc/hello")
        f.size, f.mode = len(data), 0o644
        tf.addfile(f, io.BytesIO(data))
    tar = layer.getvalue()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
    }
    b = LayoutBuilder()
    b.tag(b.image([tar], config=config), "v1")
    return b.write_tar(path)


def _gzipped(path: Path) -> Path:
    """``_image`` compressed as a whole: ``path`` (a .tar.gz). Its index is always cached."""
    plain = _image(path.with_suffix(".plain"))
    path.write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    return path


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a refusal prints: stdout empty, exit 2, one stderr line (returned)."""
    assert (done.returncode, done.stdout) == (2, ""), done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


# -- a mistyped command ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inpsect", "X"], "unknown command 'inpsect' (did you mean inspect?)"),
        (["fsk", "a.tar", "--json"], "unknown command 'fsk' (did you mean fsck?)"),
        (["umuont", "/mnt/x"], "unknown command 'umuont' (did you mean umount?)"),
        (["mnt"], "unknown command 'mnt' (did you mean mount?)"),
        (["xyzzy"], "unknown command 'xyzzy' (the commands: fsck, inspect, mount, umount, cache, index; "
         "see ocifuse --help)"),
    ],
)  # fmt: skip
def test_a_mistyped_command_is_named(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.unknown_command(argv) == message
    done = subprocess.run([OCIFUSE, *argv], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert _one_line(done) == f"ocifuse: {message}"


def test_the_mount_helper_form_still_wins_for_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mount.fuse3's ``ocifuse SOURCE MNT -o OPTS``: a first word that exists is an archive, even
    one named like a command; one that does not exist and is close to a command is a typo."""
    seen: list[str] = []

    def fake_mount(args: argparse.Namespace) -> int:
        seen.append(args.archive)
        return 0

    monkeypatch.setattr(daemon, "mount_main", fake_mount)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["mounts", "mnt", "-o", "ro"]) == 2  # no such file: the typo of "mount"
    assert seen == []
    (tmp_path / "mounts").write_bytes(b"")
    assert cli.main(["mounts", "mnt", "-o", "ro"]) == 0
    assert cli.main(["/srv/nowhere.tar", "/mnt/x", "-o", "ro"]) == 0  # far from any command: the mount says
    assert seen == ["mounts", "/srv/nowhere.tar"]
    assert cli.unknown_command(["-o", "ro", "mounts", "mnt"]) is None  # it exists now


# -- INFO lines at the terminal of a background mount ----------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back as it was after a test that sets it up as a mount does."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_a_background_mount_writes_no_info_to_its_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log = logging.getLogger("ocifuse.test")
    daemon.setup_logging(foreground=False, debug=False, detached=False)
    log.info("indexing: 50%")
    log.warning("not served: x: a symlink")
    assert capsys.readouterr().err == "ocifuse: not served: x: a symlink\n"
    daemon.setup_logging(foreground=False, debug=True, detached=False)  # -d: everything
    log.debug("lookup(1, b'x')")
    assert capsys.readouterr().err == "ocifuse: lookup(1, b'x')\n"
    daemon.setup_logging(foreground=True, debug=False, detached=False)  # -f: the daemon's log
    log.info("serving a.tar")
    assert re.fullmatch(r".* ocifuse\[\d+\] INFO: serving a.tar\n", capsys.readouterr().err)


@pytest.mark.fuse
def test_a_compressed_mount_is_silent(tmp_path: Path) -> None:
    """``ocifuse mount x.tar.gz MNT``, first (indexing) and again (from the cache): not a word."""
    archive = _gzipped(tmp_path / "a.tar.gz")
    cache = tmp_path / "cache"
    stored: dict[str, int] = {}
    for round_ in ("indexed", "from the cache"):
        with background_mount(archive, tmp_path / "mnt", options=[f"cache={cache}"]) as done:
            assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), round_
            assert sorted(os.listdir(tmp_path / "mnt")) == ["blobs", "index.json", "oci-layout"]
        entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
        assert entries and (not stored or entries == stored), f"{round_}: the second round rebuilt"
        stored = entries


# -- dead mounts and missing mountpoints -----------------------------------------------------------


@pytest.mark.fuse
def test_mounting_over_a_dead_mount_names_the_fix(tmp_path: Path) -> None:
    archive = _image(tmp_path / "a.tar")
    with mounted(archive, tmp_path / "mnt", clean_exit=False) as m:
        m.process.kill()
        assert m.wait_exit() == -signal.SIGKILL
        again = run_ocifuse("mount", archive, m.mountpoint)
        assert _one_line(again) == (
            f"ocifuse: {m.mountpoint} is a dead mount (its daemon is gone): run ocifuse umount {m.mountpoint}"
        )
        assert run_ocifuse("umount", m.mountpoint).returncode == 0  # the fix it names
        assert not is_mounted(m.mountpoint)
        with background_mount(archive, m.mountpoint) as done:  # and then the mount works
            assert done.returncode == 0, done.stderr
            assert (m.mountpoint / "oci-layout").exists()


def test_umount_of_what_is_not_there(tmp_path: Path) -> None:
    missing = tmp_path / "nosuchdir"
    assert _one_line(run_ocifuse("umount", missing)) == f"ocifuse: {missing}: no such directory"
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert _one_line(run_ocifuse("umount", a_file)) == (
        f"ocifuse: {a_file} is not a directory, so not a mountpoint"
    )
    assert _one_line(run_ocifuse("umount", tmp_path)) == f"ocifuse: {tmp_path} is not mounted"


# -- a mountpoint with files in it -----------------------------------------------------------------


def test_nonempty_is_an_option_of_ocifuse_not_of_fuse() -> None:
    opts = options.parse(["ro,nonempty"], fsname="a.tar")
    assert opts.nonempty and not any("nonempty" in o for o in opts.fuse)  # libfuse 3 refuses it
    assert not options.parse(["ro"], fsname="a.tar").nonempty


def test_check_mountpoint_refuses_files_unless_nonempty(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("mine\n")
    with pytest.raises(daemon.MountError) as e:
        daemon.check_mountpoint(str(tmp_path))
    assert str(e.value) == (
        f"mountpoint {tmp_path} is not empty: the mount would hide its files "
        "(mount over them anyway with -o nonempty)"
    )
    (tmp_path / "kept.txt").unlink()
    (tmp_path / ".hidden").mkdir()  # a dot file is a file too
    with pytest.raises(daemon.MountError, match="nonempty"):
        daemon.check_mountpoint(str(tmp_path))
    daemon.check_mountpoint(str(tmp_path), nonempty=True)
    (tmp_path / ".hidden").rmdir()
    daemon.check_mountpoint(str(tmp_path))


@pytest.mark.fuse
def test_mounting_over_files_is_refused_then_allowed_with_nonempty(tmp_path: Path) -> None:
    archive = _image(tmp_path / "a.tar")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "kept.txt").write_text("mine\n")
    require_fuse()
    line = _one_line(run_ocifuse("mount", archive, mnt))
    assert "is not empty" in line and "-o nonempty" in line
    assert not is_mounted(mnt)
    with background_mount(archive, mnt, options=["nonempty"]) as done:
        assert done.returncode == 0, done.stderr
        assert sorted(os.listdir(mnt)) == ["blobs", "index.json", "oci-layout"]
        assert run_ocifuse("umount", mnt).returncode == 0
    assert (mnt / "kept.txt").read_text() == "mine\n"


# -- ls -la ----------------------------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("view", ["layout", "rootfs"])
def test_ls_a_shows_dot_and_dotdot(tmp_path: Path, view: str) -> None:
    archive = _image(tmp_path / "a.tar")
    args = ["--rootfs"] if view == "rootfs" else []
    sub = "etc" if view == "rootfs" else "blobs"
    with mounted(archive, tmp_path / "mnt", args=args) as m:
        for directory in (m.mountpoint, m.path(sub)):
            done = subprocess.run(["ls", "-a1i", directory], capture_output=True, text=True, check=True)
            inodes = {
                name: int(ino) for ino, name in (line.split(maxsplit=1) for line in done.stdout.splitlines())
            }
            assert {".", ".."} <= inodes.keys(), done.stdout
            assert inodes["."] == os.stat(directory).st_ino
        assert inodes[".."] == os.stat(m.mountpoint).st_ino  # the parent of sub is the mount's root
        la = subprocess.run(["ls", "-la", m.mountpoint], capture_output=True, text=True, check=True)
        names = [line.split()[-1] for line in la.stdout.splitlines()[1:]]
        assert names[:2] == [".", ".."], la.stdout


# -- a user without a home directory ---------------------------------------------------------------


def _as_nobody(argv: list[str | Path], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    user = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    cmd = ["setpriv", *user, *(os.fspath(a) for a in argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_no_home_directory_no_warning(tmp_path: Path) -> None:
    """As ``nobody`` (home /nonexistent): the default cache is quietly not used; one asked for that
    cannot be made is one ``ocifuse: `` warning."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_or_fail("needs root and setpriv to run the command as another user")
    env = {k: v for k, v in os.environ.items() if k not in ("CACHE_DIRECTORY", "XDG_CACHE_HOME")}
    env["HOME"] = "/nonexistent"
    if _as_nobody([OCIFUSE, "--version"], env).returncode != 0:
        skip_or_fail(f"{OCIFUSE} cannot be run by uid {NOBODY} (a venv under a private directory)")
    shared = Path(tempfile.mkdtemp(prefix="ocifuse-nobody-"))  # tmp_path is root's alone (0700)
    try:
        shared.chmod(0o755)
        archive = _gzipped(shared / "a.tar.gz")  # compressed: its index is stored, so the cache is tried
        archive.chmod(0o644)
        for command in (["inspect"], ["fsck"], ["cache", "list"], ["cache", "clear"]):
            argv: list[str | Path] = [OCIFUSE, *command, *([] if command[0] == "cache" else [archive])]
            done = _as_nobody(argv, env)
            assert done.returncode == 0 and done.stderr == "", (command, done.stderr)
        (shared / "private").mkdir(mode=0o700)  # root's: nobody may not enter it
        asked = shared / "private" / "cache"
        done = _as_nobody([OCIFUSE, "inspect", "--cache", asked, archive], env)
        assert done.returncode == 0
        assert done.stderr == f"ocifuse: index cache {asked} not used: Permission denied\n"
    finally:
        shutil.rmtree(shared)


def test_an_unsafe_default_cache_is_still_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Quiet is for a default out of reach; a default that is there but a symlink may be tampered with."""
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "xdg").mkdir()
    (tmp_path / "xdg" / "ocifuse").symlink_to(tmp_path / "real")
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "xdg" / "ocifuse"))  # the default, set by systemd
    with caplog.at_level(logging.DEBUG, logger="ocifuse.cache"):
        cache = IndexCache.default()
        assert cache.load("table", "k") is None
        cache.store("table", "k", b"x")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "symlink" in warnings[0].getMessage()
    assert list((tmp_path / "real").iterdir()) == []


def test_cache_warnings_carry_the_prefix(tmp_path: Path) -> None:
    archive = _gzipped(tmp_path / "a.tar.gz")
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for command in ("inspect", "fsck"):
        done = run_ocifuse(command, "--cache", tmp_path / "link", archive)
        assert done.returncode == 0
        assert done.stderr == (
            f"ocifuse: index cache {tmp_path / 'link'} not used: a symlink or not a directory "
            "(give the real path)\n"
        )


# -- mount --help ----------------------------------------------------------------------------------


def test_mount_help_says_what_archive_may_be() -> None:
    done = run_ocifuse("mount", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    archive = text.split("positional arguments: ARCHIVE ")[1].split(" MOUNTPOINT ")[0]  # its own text
    for kind in ("oci-archive", "docker-archive", "gzip", "zstd", ".tar.gz", ".tar.zst", "layout directory"):
        assert kind in archive, (kind, archive)
    assert "--rootfs" in archive
