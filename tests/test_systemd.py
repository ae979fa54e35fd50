"""systemd, fstab and mount(8): the shipped units, sd_notify, journald levels and the mount helpers."""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import (
    EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    OCIFUSE,
    fusermount_unmount,
    is_mounted,
    kill_daemons,
    mounts,
    ocifuse_mounts,
    pids_naming,
    require_fuse,
    skip_or_fail,
    stop_process,
    wait_until,
)
from oci import LayoutBuilder
from servers import nginx

from ocifuse import journal

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
HELPER = SYSTEMD / "mount.fuse.ocifuse"
UNITS = {
    "system": SYSTEMD / "ocifuse@.service",
    "user": SYSTEMD / "user" / "ocifuse@.service",
    "mount": SYSTEMD / "examples" / "mnt-app.mount",
    "remote-mount": SYSTEMD / "examples" / "mnt-remote.mount",
}
NETWORK_DROP_IN = SYSTEMD / "examples" / "ocifuse@.service.d" / "network-online.conf"
# What mount(8) leaves of PATH for a helper: none (util-linux sanitizes it away); /bin/sh's default.
SCRUBBED_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IGNORABLE = "nofail,_netdev,x-systemd.automount,comment=foo"
# systemd.exec(5): each of these runs the service in a mount namespace of its own.
NAMESPACING = (
    "PrivateTmp",
    "PrivateMounts",
    "PrivateDevices",
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "MountFlags",
    "DynamicUser",
)


def require(condition: bool, message: str) -> None:
    """Skip unless ``condition``; in CI fail instead."""
    if not condition:
        skip_or_fail(message)


def require_root() -> None:
    """mount(8), mount.fuse3 and drop_privileges need root (CI runs as root)."""
    require(os.geteuid() == 0, "needs root")


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A small oci-archive with one image under two refs; its path is unique to the test."""
    b = LayoutBuilder()
    desc = b.image([b"layer one", b"layer two"])
    b.tag(desc, "v1")
    b.tag(desc, "latest")
    return b.write_tar(tmp_path / f"app-{uuid.uuid4().hex[:8]}.tar")


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    """An empty mountpoint directory."""
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _no_leaks(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves an ocifuse mount under its tmp_path (cleaned up first).

    Scoped to tmp_path rather than mounting.no_new_mounts: that one would take another test run's
    mounts on this machine for ours, and unmount them.
    """
    yield
    root = os.fspath(tmp_path) + os.sep
    leaked = sorted(p for p in ocifuse_mounts() if p.startswith(root))
    for point in leaked:
        kill_daemons(point)
        fusermount_unmount(point)
    if leaked:
        pytest.fail(f"the test left ocifuse mount(s) behind: {', '.join(leaked)}")


def archive_daemons(archive: Path | str) -> list[int]:
    """Pids of processes whose command line names ``archive`` (helper-form and /dev/fd/N daemons too)."""
    return pids_naming(archive, ocifuse_mount=False)


@contextlib.contextmanager
def cleanup(archive: Path | str, mountpoint: Path) -> Iterator[None]:
    """Whatever happens: unmount, wait for the archive's daemons to exit, kill any that do not."""
    try:
        yield
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["umount", os.fspath(mountpoint)], capture_output=True, check=False)
        fusermount_unmount(mountpoint)
        with contextlib.suppress(pytest.fail.Exception):
            wait_until(lambda: not archive_daemons(archive), EXIT_TIMEOUT, "the daemon to exit")
        for pid in archive_daemons(archive):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def mount_options(mountpoint: Path) -> set[str]:
    """The VFS options of the mount on ``mountpoint`` (/proc/self/mounts)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == os.fspath(mountpoint):
            found = set(fields[3].split(","))
    return found


def assert_served(mountpoint: Path) -> None:
    """The mount is ocifuse's, read-only, and shows the layout."""
    assert is_mounted(mountpoint)
    assert {"ro", "nodev", "nosuid"} <= mount_options(mountpoint)
    assert sorted(os.listdir(mountpoint)) == ["blobs", "index.json", "oci-layout"]


def unmount_and_wait(archive: Path | str, mountpoint: Path) -> None:
    """``umount`` as a user would; the background daemon then exits by itself."""
    done = subprocess.run(["umount", os.fspath(mountpoint)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not archive_daemons(archive), EXIT_TIMEOUT, "the daemon to exit after umount")
    assert not is_mounted(mountpoint)


# -- the shipped units, statically ------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (comments skipped), values listed per key."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("kind", ["system", "user"])
def test_service_template_settings(kind: str) -> None:
    """Type=notify, the mountpoint from %f, --foreground, restart on failure, no namespacing."""
    s = unit_settings(UNITS[kind])
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    (exec_start,) = s["ExecStart"]
    assert exec_start.startswith("/usr/bin/ocifuse mount --foreground ${ARCHIVE} %f")
    assert s["Restart"] == ["on-failure"]
    assert any(f.endswith("%i.env") for f in s["EnvironmentFile"])
    assert "ExecStop" not in s  # SIGTERM unmounts: test_notify_ready_and_stopping
    assert not set(NAMESPACING) & set(s), "namespacing would hide the mount from the system"
    # The index cache: made by systemd, private, found through $CACHE_DIRECTORY (ocifuse.cache).
    assert (s["CacheDirectory"], s["CacheDirectoryMode"]) == (["ocifuse"], ["0700"])
    assert "DynamicUser" not in s  # with it, CacheDirectory= would mean a mount namespace


def analyze_env(tmp_path: Path) -> dict[str, str]:
    """An environment for ``systemd-analyze`` without a running manager (a private runtime dir)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True, mode=0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": os.fspath(runtime), "SYSTEMD_LOG_COLOR": "0"}


def verify(units: list[Path], tmp_path: Path, *, user: bool = False) -> None:
    """``systemd-analyze verify``; any diagnostic at all fails (unknown keys only warn, exit 0)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        require(False, "systemd-analyze is not installed")
        return
    argv = [analyze, *(["--user"] if user else []), "--man=no", "verify", *map(os.fspath, units)]
    done = subprocess.run(argv, capture_output=True, text=True, env=analyze_env(tmp_path), check=False)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def installed_copy(src: Path, dest_dir: Path, name: str | None = None) -> Path:
    """Copy a unit with /usr/bin/ocifuse replaced by the installed ocifuse (verify checks it exists)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (name or src.name)
    dest.write_text(src.read_text().replace("/usr/bin/ocifuse", os.fspath(OCIFUSE)))
    return dest


@pytest.mark.parametrize("kind", ["system", "user"])
def test_service_template_verifies(kind: str, tmp_path: Path) -> None:
    """The template and an instance of it (the escaped mountpoint) pass ``systemd-analyze verify``."""
    units = tmp_path / "units"
    template = installed_copy(UNITS[kind], units)
    instance = units / "ocifuse@mnt-app.service"
    instance.symlink_to(template.name)
    verify([template, instance], tmp_path, user=kind == "user")


def test_service_verify_sees_a_bad_unit(tmp_path: Path) -> None:
    """The verify check above does fail: a typo in a key is caught."""
    units = tmp_path / "units"
    bad = installed_copy(UNITS["system"], units)
    bad.write_text(bad.read_text().replace("NotifyAccess=", "NotifyAcess="))
    with pytest.raises(AssertionError, match="NotifyAcess"):
        verify([bad], tmp_path)


def test_mount_unit_verifies(tmp_path: Path) -> None:
    """The example .mount unit passes verify (its name matches Where=)."""
    s = unit_settings(UNITS["mount"])
    assert s["Type"] == ["fuse.ocifuse"]
    assert {"ro", "nodev", "nosuid"} <= set(s["Options"][0].split(","))
    verify([installed_copy(UNITS["mount"], tmp_path / "units")], tmp_path)


def test_fstab_example_through_the_generator(tmp_path: Path) -> None:
    """systemd-fstab-generator(8) turns the example fstab into units that verify."""
    generator = next(
        (
            p
            for p in (
                Path("/usr/lib/systemd/system-generators/systemd-fstab-generator"),
                Path("/lib/systemd/system-generators/systemd-fstab-generator"),
            )
            if p.exists()
        ),
        None,
    )
    require(
        generator is not None and shutil.which("systemd-analyze") is not None, "no systemd-fstab-generator"
    )
    assert generator is not None
    out = [tmp_path / d for d in ("normal", "early", "late")]
    for d in out:
        d.mkdir()
    env = {**analyze_env(tmp_path), "SYSTEMD_FSTAB": os.fspath(SYSTEMD / "examples" / "fstab")}
    env["SYSTEMD_PROC_CMDLINE"] = ""
    done = subprocess.run([generator, *out], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    app = out[0] / "mnt-app.mount"
    settings = unit_settings(app)
    assert settings["What"] == ["/srv/img/app.tar"]
    assert settings["Type"] == ["fuse.ocifuse"]
    assert settings["RequiresMountsFor"] == ["/srv/img"]
    assert (out[0] / "mnt-tools.automount").exists()
    # The URL line: _netdev makes it a network mount, wanted by remote-fs.target, after the network.
    remote = out[0] / "mnt-remote.mount"
    settings = unit_settings(remote)
    assert settings["What"] == ["https://mirror.example.com/images/app.tar"]
    assert "network-online.target" in settings["After"] and "network-online.target" in settings["Requires"]
    assert (out[0] / "remote-fs.target.wants" / "mnt-remote.mount").exists()
    assert not (out[0] / "local-fs.target.wants" / "mnt-remote.mount").exists()
    verify([app, out[0] / "mnt-tools.mount", out[0] / "mnt-tools.automount", remote], tmp_path)


def test_remote_mount_unit_waits_for_the_network(tmp_path: Path) -> None:
    """The URL .mount example: ordered after network-online.target, which it pulls in; _netdev; verifies."""
    s = unit_settings(UNITS["remote-mount"])
    assert s["What"][0].startswith("https://") and s["Type"] == ["fuse.ocifuse"]
    assert s["Wants"] == ["network-online.target"] and s["After"] == ["network-online.target"]
    options = s["Options"][0].split(",")
    assert {"ro", "nodev", "nosuid", "_netdev"} <= set(options)
    assert any(o.startswith("credentials=/") for o in options)  # a file, never the secret itself
    assert s["WantedBy"] == ["remote-fs.target"]
    verify([installed_copy(UNITS["remote-mount"], tmp_path / "units")], tmp_path)


def test_service_drop_in_for_urls_verifies(tmp_path: Path) -> None:
    """The network-online drop-in: an instance of the template with it passes verify."""
    s = unit_settings(NETWORK_DROP_IN)
    assert s == {"Wants": ["network-online.target"], "After": ["network-online.target"]}
    units = tmp_path / "units"
    template = installed_copy(UNITS["system"], units)
    instance = units / "ocifuse@mnt-remote.service"
    instance.symlink_to(template.name)
    drop_in = units / "ocifuse@mnt-remote.service.d"
    drop_in.mkdir()
    shutil.copy(NETWORK_DROP_IN, drop_in / NETWORK_DROP_IN.name)
    verify([template, instance], tmp_path)


# -- journald priorities -----------------------------------------------------------------------------


def journal_stream_of(path: Path) -> str:
    """The $JOURNAL_STREAM value naming the file at ``path`` (systemd.exec(5): "device:inode")."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOURNAL_STREAM counts only when it names stderr itself (it is inherited by everything)."""
    log = tmp_path / "stderr"
    with open(log, "w") as f:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(log))
        assert journal.stderr_is_journal(f.fileno())
        assert journal.prefix(journal.ERR) in ("<3>", "")  # fd 2 here is pytest's, not the file
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        assert not journal.stderr_is_journal(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "junk")
        assert not journal.stderr_is_journal(f.fileno())
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal.stderr_is_journal(f.fileno())
        assert journal.prefix(journal.ERR) == ""


def run_with_stderr_file(argv: list[str], stderr: Path, *, journal_stream: str | None) -> int:
    """Run ``argv`` with stderr to a file and JOURNAL_STREAM as given; return the exit status."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    with open(stderr, "wb") as f:
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream_of(stderr) if journal_stream == "self" else journal_stream
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env, timeout=60
        ).returncode


def test_error_line_is_priority_err_in_the_journal(tmp_path: Path, mnt: Path) -> None:
    """The one-line error of a failed mount carries <3>, so ``journalctl -p err`` shows it."""
    err = tmp_path / "stderr"
    argv = [os.fspath(OCIFUSE), "mount", "--foreground", os.fspath(tmp_path / "missing.tar"), os.fspath(mnt)]
    assert run_with_stderr_file(argv, err, journal_stream="self") == 2
    assert re.fullmatch(r"<3>ocifuse: .*missing\.tar.*\n", err.read_text())
    assert run_with_stderr_file(argv, err, journal_stream="1:2") == 2
    assert err.read_text().startswith("ocifuse: ")


def test_log_lines_carry_priorities_in_the_journal(archive: Path, mnt: Path, tmp_path: Path) -> None:
    """Under journald every daemon line starts with <N>: <6> info, <7> debug (sd-daemon(3))."""
    require_fuse()
    err = tmp_path / "stderr"
    argv = [os.fspath(OCIFUSE), "mount", "--foreground", "-d", os.fspath(archive), os.fspath(mnt)]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with open(err, "wb") as f, cleanup(archive, mnt):
        env["JOURNAL_STREAM"] = journal_stream_of(err)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
        try:
            wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, MOUNT_TIMEOUT, "the mount")
            assert is_mounted(mnt), err.read_text()
            os.listdir(mnt)  # some debug lines from the handlers
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(EXIT_TIMEOUT) == 0
        finally:
            stop_process(proc)
    lines = err.read_text().splitlines()
    assert lines
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>") for line in lines)
    assert any(line.startswith("<7>") for line in lines)


def test_no_priorities_without_the_journal(archive: Path, mnt: Path) -> None:
    """An inherited JOURNAL_STREAM that does not name stderr gives plain lines."""
    require_fuse()
    with cleanup(archive, mnt):
        env = {**os.environ, "JOURNAL_STREAM": "1:2"}
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen(
            [os.fspath(OCIFUSE), "mount", "-f", os.fspath(archive), os.fspath(mnt)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, MOUNT_TIMEOUT, "the mount")
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=EXIT_TIMEOUT)
        finally:
            stop_process(proc)
    assert proc.returncode == 0
    assert stderr and not re.search(rb"^<\d>", stderr, re.MULTILINE)


# -- Type=notify --------------------------------------------------------------------------------------


class NotifyReceiver:
    """systemd's side of sd_notify(3): an AF_UNIX datagram socket that learns each sender's pid."""

    def __init__(self, address: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET spells it: a path, or "@name" for an abstract one
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[dict[str, str], int] | None:
        """One message as its ``KEY=value`` fields, and the sender's pid; None on timeout."""
        self.sock.settimeout(timeout)
        creds = struct.calcsize("3i")
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", payload[:creds])[0]
        fields = dict(line.partition("=")[::2] for line in data.decode().splitlines() if line)
        return fields, pid

    def close(self) -> None:
        """Close the socket (and remove a path socket's file)."""
        self.sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyReceiver]:
    """A NOTIFY_SOCKET receiver on a path socket, then on an abstract ``@name`` one."""
    if request.param == "path":
        address = os.fspath(tmp_path / "notify.sock")
    else:
        address = f"@ocifuse-test-{uuid.uuid4().hex}"
    r = NotifyReceiver(address)
    yield r
    r.close()


def next_message(r: NotifyReceiver, proc: subprocess.Popen[bytes], what: str) -> tuple[dict[str, str], int]:
    """Wait for the next notification; fail if the daemon exits or nothing comes in time."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        got = r.receive(0.2)
        if got is not None:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited {proc.returncode} before {what}")
    pytest.fail(f"no {what} within {MOUNT_TIMEOUT:.0f}s")


def test_notify_ready_and_stopping(
    receiver: NotifyReceiver, archive: Path, mnt: Path, tmp_path: Path
) -> None:
    """READY=1 (with STATUS=) only once the mount is live; SIGTERM: STOPPING=1, unmounted, exit 0."""
    require_fuse()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["NOTIFY_SOCKET"] = receiver.address
    err = tmp_path / "stderr"
    argv = [os.fspath(OCIFUSE), "mount", "--foreground", os.fspath(archive), os.fspath(mnt)]
    with open(err, "wb") as f, cleanup(archive, mnt):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
        try:
            fields, pid = next_message(receiver, proc, "READY=1")
            live = os.path.ismount(mnt) and is_mounted(mnt)  # checked the moment READY arrives
            assert fields.get("READY") == "1", fields
            assert live, "READY=1 came before the mount was live"
            assert pid == proc.pid  # NotifyAccess=main: the main process itself sends it
            status = fields["STATUS"]
            assert os.fspath(archive) in status and os.fspath(mnt) in status, status
            assert "v1" in status and "latest" in status, status
            assert sorted(os.listdir(mnt)) == ["blobs", "index.json", "oci-layout"]

            proc.send_signal(signal.SIGTERM)
            fields, pid = next_message(receiver, proc, "STOPPING=1")
            assert fields == {"STOPPING": "1"} and pid == proc.pid
            assert proc.wait(EXIT_TIMEOUT) == 0, err.read_text()
            assert not is_mounted(mnt)
            assert receiver.receive(0.1) is None  # nothing after STOPPING=1
        finally:
            stop_process(proc)


def test_sigterm_during_startup_unmounts_and_exits_0(archive: Path, mnt: Path, tmp_path: Path) -> None:
    """A stop the moment the mount appears (before READY=1) still ends in an unmount and exit 0.

    The kernel has the mount as soon as libfuse made it, before the loop and its signal handler run.
    """
    require_fuse()
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    argv = [os.fspath(OCIFUSE), "mount", "--foreground", os.fspath(archive), os.fspath(mnt)]
    err = tmp_path / "stderr"
    for _ in range(5):
        with open(err, "wb") as f, cleanup(archive, mnt):
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
            try:
                deadline = time.monotonic() + MOUNT_TIMEOUT
                while not is_mounted(mnt) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert is_mounted(mnt), err.read_text()
                proc.send_signal(signal.SIGTERM)
                try:
                    status = proc.wait(EXIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"the daemon hung after SIGTERM:\n{err.read_text()}")
                assert status == 0, err.read_text()
                assert not is_mounted(mnt)
            finally:
                stop_process(proc)


def test_no_ready_when_the_mount_fails(receiver: NotifyReceiver, tmp_path: Path) -> None:
    """A mount that cannot be made exits non-zero and never says READY=1."""
    env = {**os.environ, "NOTIFY_SOCKET": receiver.address}
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = subprocess.run(
        [os.fspath(OCIFUSE), "mount", "-f", os.fspath(tmp_path / "missing.tar"), os.fspath(not_a_dir)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert "not a directory" in done.stderr
    assert receiver.receive(0.1) is None


# -- mount(8), mount.fuse3 and the mount.fuse.ocifuse helper -----------------------------------------


def test_mount_fuse3_with_ignorable_options(archive: Path, mnt: Path) -> None:
    """mount.fuse3 runs ``ocifuse SOURCE MNT -o OPTS`` (PATH); the options it does not strip are ignored."""
    require_fuse()
    require_root()
    mount_fuse3 = shutil.which("mount.fuse3", path=SCRUBBED_PATH)
    require(mount_fuse3 is not None, "mount.fuse3 is not installed")
    assert mount_fuse3 is not None
    env = {**os.environ, "PATH": f"{OCIFUSE.parent}:{SCRUBBED_PATH}"}
    for options in (f"ro,nodev,nosuid,{IGNORABLE}", "rw,defaults"):  # the latter makes it add dev,suid
        with cleanup(archive, mnt):
            argv = [mount_fuse3, os.fspath(archive), os.fspath(mnt), "-t", "fuse.ocifuse", "-o", options]
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            assert_served(mnt)  # already live when the command returned
            unmount_and_wait(archive, mnt)


@pytest.fixture
def ocifuse_on_default_path() -> Iterator[None]:
    """mount(8) drops PATH, so mount.fuse3 finds only an ocifuse in /bin/sh's default PATH.

    If there is none, link the installed one into /usr/local/bin for the test, and remove it after.
    """
    require_root()
    link = Path("/usr/local/bin/ocifuse")
    found = shutil.which("ocifuse", path=SCRUBBED_PATH)
    made = False
    if found is None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(OCIFUSE)
        made = True
    try:
        yield
    finally:
        if made and link.is_symlink() and os.readlink(link) == os.fspath(OCIFUSE):
            link.unlink()


@pytest.mark.usefixtures("ocifuse_on_default_path")
def test_mount8_type_fuse_ocifuse(archive: Path, mnt: Path) -> None:
    """``mount -t fuse.ocifuse ARCHIVE MNT -o ...`` through the system's mount.fuse3, then ``umount``."""
    require_fuse()
    require(shutil.which("mount.fuse", path=SCRUBBED_PATH) is not None, "no /sbin/mount.fuse (fuse3)")
    with cleanup(archive, mnt):
        argv = ["mount", "-t", "fuse.ocifuse", os.fspath(archive), os.fspath(mnt)]
        argv += ["-o", f"ro,nodev,nosuid,{IGNORABLE}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert_served(mnt)
        assert [src for point, _, src in mounts() if point == os.fspath(mnt)] == [os.fspath(archive)]
        unmount_and_wait(archive, mnt)


def mount_fstab_line(tmp_path: Path, line: str, mnt: Path) -> None:
    """``mount --fstab FILE MNT`` with ``line`` as FILE's one line, as mount(8) reads /etc/fstab."""
    fstab = tmp_path / "fstab"
    fstab.write_text(line + "\n")
    done = subprocess.run(
        ["mount", "--fstab", os.fspath(fstab), os.fspath(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.usefixtures("ocifuse_on_default_path")
def test_fstab_line(archive: Path, mnt: Path, tmp_path: Path) -> None:
    """The same as an fstab line (``mount --fstab FILE MNT``)."""
    require_fuse()
    with cleanup(archive, mnt):
        mount_fstab_line(tmp_path, f"{archive} {mnt} fuse.ocifuse ro,nodev,nosuid,{IGNORABLE} 0 0", mnt)
        assert_served(mnt)
        unmount_and_wait(archive, mnt)


def assert_blobs_hash_to_their_names(mountpoint: Path) -> int:
    """Every blob under the mount reads whole and hashes to its name; how many there are."""
    blobs = sorted((mountpoint / "blobs" / "sha256").iterdir())
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    return len(blobs)


@pytest.mark.usefixtures("ocifuse_on_default_path")
def test_mount8_and_fstab_with_a_url(archive: Path, mnt: Path, tmp_path: Path) -> None:
    """``mount -t fuse.ocifuse http://...`` and an fstab line with _netdev: the source is a URL.

    Its userinfo and query (secrets) show neither in /proc/mounts nor in the daemon's command line.
    """
    require_fuse()
    require(shutil.which("mount.fuse", path=SCRUBBED_PATH) is not None, "no /sbin/mount.fuse (fuse3)")
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(archive, www / "app.tar")
    with nginx(tmp_path / "nginx", www) as server:
        url = server.url("app.tar")
        secret = url.replace("http://", "http://someone:hunter2@") + "?X-Amz-Signature=sig-0ff1ce"
        with cleanup(url, mnt):
            argv = ["mount", "-t", "fuse.ocifuse", secret, os.fspath(mnt)]
            argv += ["-o", f"ro,nodev,nosuid,{IGNORABLE}"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            assert_served(mnt)
            assert [src for point, _, src in mounts() if point == os.fspath(mnt)] == [url]
            (pid,) = archive_daemons(url)  # the URL in its command line is the one without secrets
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"hunter2" not in cmdline and b"sig-0ff1ce" not in cmdline, cmdline
            ps = subprocess.run(["ps", "-ww", "-eo", "args="], capture_output=True, text=True).stdout
            assert "hunter2" not in ps, "a process (mount, sh, ocifuse) still shows the secret"
            assert assert_blobs_hash_to_their_names(mnt) >= 3  # fetched by the background daemon
            unmount_and_wait(url, mnt)
        options = "ro,nodev,nosuid,_netdev,nofail,x-systemd.requires=network-online.target"
        with cleanup(url, mnt):
            mount_fstab_line(tmp_path, f"{url} {mnt} fuse.ocifuse {options} 0 0", mnt)
            assert_served(mnt)
            assert_blobs_hash_to_their_names(mnt)
            unmount_and_wait(url, mnt)


def scrubbed_env(**extra: str) -> dict[str, str]:
    """An environment like mount(8) gives a helper: no PATH at all."""
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "OCIFUSE", "NOTIFY_SOCKET")}
    env.update(extra)
    return env


def installed_helper(dest: Path, ocifuse: Path) -> Path:
    """The helper as installed: @OCIFUSE@ replaced by ocifuse's absolute path, mode 755."""
    dest.write_text(HELPER.read_text().replace("@OCIFUSE@", os.fspath(ocifuse)))
    dest.chmod(0o755)
    return dest


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in ``ocifuse`` that writes its arguments, one a line, to a file: (script, record)."""
    record = tmp_path / "argv"
    script = tmp_path / "fake-ocifuse"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {record}\n')
    script.chmod(0o755)
    return script, record


def run_helper(helper: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the helper as mount(8) would."""
    return subprocess.run([os.fspath(helper), *args], capture_output=True, text=True, env=env, timeout=60)


def test_helper_translates_mount8_arguments(recorder: tuple[Path, Path], tmp_path: Path) -> None:
    """mount(8) "EXTERNAL HELPERS": SPEC DIR [-sfnv] [-o OPTS] [-t TYPE] -> ocifuse SPEC DIR -o OPTS."""
    fake, record = recorder
    helper = installed_helper(tmp_path / "mount.fuse.ocifuse", fake)
    done = run_helper(
        helper, "/a.tar", "/mnt/x", "-n", "-s", "-o", "ro,nodev", "-t", "fuse.ocifuse", env=scrubbed_env()
    )
    assert done.returncode == 0, done.stderr
    assert record.read_text().splitlines() == ["/a.tar", "/mnt/x", "-o", "ro,nodev"]
    done = run_helper(helper, "/a.tar", "/mnt/x", env=scrubbed_env())
    assert record.read_text().splitlines() == ["/a.tar", "/mnt/x"]


def test_helper_fake_mount_runs_nothing(recorder: tuple[Path, Path], tmp_path: Path) -> None:
    """``-f`` is mount(8)'s --fake, not ocifuse's --foreground: nothing runs; -v shows the command."""
    fake, record = recorder
    helper = installed_helper(tmp_path / "mount.fuse.ocifuse", fake)
    done = run_helper(helper, "/a.tar", "/mnt/x", "-f", "-v", "-o", "ro", env=scrubbed_env())
    assert done.returncode == 0, done.stderr
    assert not record.exists()
    assert f"{fake} /a.tar /mnt/x -o ro" in done.stderr


def test_helper_finds_ocifuse_without_path(recorder: tuple[Path, Path]) -> None:
    """Not installed (placeholder left), no PATH: $OCIFUSE or the usual places; a clear error if none."""
    fake, record = recorder
    done = run_helper(HELPER, "/a.tar", "/mnt/x", env=scrubbed_env(OCIFUSE=os.fspath(fake)))
    usual = [Path(p) for p in ("/usr/bin/ocifuse", "/usr/local/bin/ocifuse", "/opt/ocifuse/bin/ocifuse")]
    if not any(p.exists() for p in usual):
        assert done.returncode == 0, done.stderr
        assert record.read_text().splitlines() == ["/a.tar", "/mnt/x"]
        done = run_helper(HELPER, "/a.tar", "/mnt/x", env=scrubbed_env())
        assert done.returncode == 1
        assert "cannot find ocifuse" in done.stderr


def test_helper_refuses_other_types_and_stray_arguments(recorder: tuple[Path, Path], tmp_path: Path) -> None:
    """A wrong -t, an unknown flag or a third operand is an error, not a guess."""
    fake, record = recorder
    helper = installed_helper(tmp_path / "mount.fuse.ocifuse", fake)
    for args in (["-t", "fuse.sshfs"], ["-x"], ["extra"], ["-o"]):
        done = run_helper(helper, "/a.tar", "/mnt/x", *args, env=scrubbed_env())
        assert done.returncode == 1, args
        assert not record.exists()


@pytest.mark.parametrize("how", ["installed", "repo"])
def test_helper_mounts(how: str, archive: Path, mnt: Path, tmp_path: Path) -> None:
    """The helper, run as mount(8) runs /sbin/mount.fuse.ocifuse (no PATH), mounts; ``umount`` ends it."""
    require_fuse()
    require_root()
    if how == "installed":
        helper, env = installed_helper(tmp_path / "mount.fuse.ocifuse", OCIFUSE), scrubbed_env()
    else:
        helper, env = HELPER, scrubbed_env(OCIFUSE=os.fspath(OCIFUSE))
    with cleanup(archive, mnt):
        done = run_helper(
            helper, os.fspath(archive), os.fspath(mnt), "-n", "-o", f"ro,nodev,nosuid,{IGNORABLE}", env=env
        )
        assert done.returncode == 0, done.stderr
        assert_served(mnt)
        unmount_and_wait(archive, mnt)


def test_helper_drop_privileges_mounts_through_dev_fd(archive: Path, mnt: Path, tmp_path: Path) -> None:
    """``-o drop_privileges``: mount.fuse3 mounts, then runs ocifuse unprivileged on /dev/fd/N."""
    require_fuse()
    require_root()
    require(shutil.which("mount.fuse3", path=SCRUBBED_PATH) is not None, "mount.fuse3 is not installed")
    helper = installed_helper(tmp_path / "mount.fuse.ocifuse", OCIFUSE)
    with cleanup(archive, mnt):
        done = run_helper(
            helper,
            os.fspath(archive),
            os.fspath(mnt),
            "-o",
            "ro,nodev,nosuid,drop_privileges",
            env=scrubbed_env(),
        )
        assert done.returncode == 0, done.stderr
        assert_served(mnt)
        (pid,) = archive_daemons(archive)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert any(re.fullmatch(rb"/dev/fd/\d+", a) for a in argv), argv
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE), "the daemon kept capabilities"
        unmount_and_wait(archive, mnt)


def test_helper_mounts_in_another_namespace(archive: Path, mnt: Path, tmp_path: Path) -> None:
    """``-N PID`` (mount(8) --namespace): the mount is made in that mount namespace, not ours."""
    require_fuse()
    require_root()
    require(shutil.which("unshare") is not None and shutil.which("nsenter") is not None, "no util-linux")
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sleep", "60"], stdin=subprocess.DEVNULL
    )
    child = holder.pid  # unshare execs sleep in the new namespace

    def separate() -> bool:
        return os.readlink(f"/proc/{child}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

    try:
        wait_until(separate, 5, "the new mount namespace")
        helper = installed_helper(tmp_path / "mount.fuse.ocifuse", OCIFUSE)
        with cleanup(archive, mnt):
            done = run_helper(
                helper, os.fspath(archive), os.fspath(mnt), "-N", str(child), "-o", "ro", env=scrubbed_env()
            )
            assert done.returncode == 0, done.stderr
            assert not is_mounted(mnt)
            theirs = Path(f"/proc/{child}/mounts").read_text()
            assert f" {mnt} fuse.ocifuse " in theirs
            umount = ["nsenter", f"--mount=/proc/{child}/ns/mnt", "umount", os.fspath(mnt)]
            assert subprocess.run(umount, capture_output=True, check=False).returncode == 0
            wait_until(lambda: not archive_daemons(archive), EXIT_TIMEOUT, "the daemon to exit")
    finally:
        holder.kill()
        holder.wait()
