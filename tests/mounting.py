"""Real ocifuse mounts for tests: start the installed ``ocifuse mount -f``, wait, and always clean up.

Use::

    from mounting import mounted, require_fuse

    def test_something(tmp_path):
        with mounted(archive, tmp_path / "mnt", options=["verify"]) as m:
            data = (m.mountpoint / "index.json").read_bytes()

``mounted`` starts ``ocifuse mount -f ARCHIVE MNT`` (the console script next to this interpreter)
as a subprocess, waits until the mount is in /proc/self/mountinfo and answers ``stat``, fails the
test with the daemon's stderr if it exits first, and in every case unmounts in ``finally``
(``fusermount3 -u``, then ``-u -z``, then SIGTERM, then SIGKILL). A mount that is still there after
that, or a daemon that exits non-zero after a plain unmount, fails the test. ``mounted_many``
does the same for several mounts started at once (daemon start-up is the slow part);
``start``/``wait_live``/``teardown`` are its steps, for tests that need them apart.
``background_mount`` runs ``ocifuse mount`` without -f and always cleans up its detached daemon.

``no_new_mounts`` is for an autouse fixture: it fails a test that leaves one of its ocifuse mounts
behind (and cleans it up); other processes' mounts on the machine are left alone.

``require_fuse`` skips without /dev/fuse, except with ``CI=true``, where it fails: a green CI run
means the mounts were really tested.

Every real-mount test is also marked ``@pytest.mark.fuse`` (``pytest -m "not fuse"`` skips them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

# The installed console script of the interpreter running the tests (the venv's ``ocifuse``).
OCIFUSE = Path(sys.executable).parent / "ocifuse"
FSTYPE = "fuse.ocifuse"
MOUNT_TIMEOUT = 30.0  # generous: a loaded CI machine; a healthy mount is live in well under a second
EXIT_TIMEOUT = 10.0
POLL = 0.02

StrPath = str | os.PathLike[str]
# Mountpoints this process mounted through this module: what ``no_new_mounts`` may call a leak.
_STARTED: set[str] = set()


def skip_or_fail(message: str) -> None:
    """Skip the test for ``message``; in CI (``CI=true``) fail instead: CI must run every test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI must have it)")
    pytest.skip(message)


def require_fuse() -> None:
    """Skip unless FUSE mounts can be made here; in CI (``CI=true``) fail instead of skipping."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse does not exist")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed")
    if not OCIFUSE.exists():
        problems.append(f"{OCIFUSE} is not installed (pip install -e .)")
    if not problems:
        return
    skip_or_fail("cannot mount FUSE here: " + "; ".join(problems))


def _unescape(field_: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts(fstype: str | None = FSTYPE) -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of each mount in /proc/self/mountinfo; only ``fstype`` unless None."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point, kind, source = _unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])
            if fstype is None or kind == fstype:
                out.append((point, kind, source))
    return out


def ocifuse_mounts() -> set[str]:
    """Mountpoints of every ocifuse mount visible to this process (dead daemons' too)."""
    return {point for point, _, _ in mounts()}


def is_mounted(mountpoint: StrPath) -> bool:
    """True while an ocifuse mount sits on ``mountpoint`` (by mountinfo: works when the daemon is dead)."""
    return os.path.abspath(mountpoint) in ocifuse_mounts()


def mount_source(mountpoint: StrPath) -> str | None:
    """The source (fsname) of the ocifuse mount on ``mountpoint``, or None."""
    point = os.path.abspath(mountpoint)
    found = [source for p, _, source in mounts() if p == point]
    return found[-1] if found else None


def pids_naming(path: StrPath, *, ocifuse_mount: bool = True) -> list[int]:
    """Pids of processes (not this one) whose command line names ``path`` as an argument.

    With ``ocifuse_mount``, only ``ocifuse ... mount ...`` processes (the console script or a
    Python running it); otherwise any process, whatever form it took (mount.fuse3, /dev/fd/N).
    """
    want = os.fsencode(path)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if want not in argv:
            continue
        if not ocifuse_mount or (any(a.endswith(b"ocifuse") for a in argv[:2]) and b"mount" in argv):
            pids.append(int(entry))
    return pids


def daemon_pids(mountpoint: StrPath) -> list[int]:
    """Pids of ``ocifuse`` processes whose command line names ``mountpoint`` (for background daemons)."""
    return pids_naming(os.path.abspath(mountpoint))


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size field (VmRSS, VmHWM) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def fusermount_unmount(mountpoint: StrPath) -> None:
    """Best effort: ``fusermount3 -u``, then ``fusermount3 -u -z`` if it is still mounted."""
    for extra in ([], ["-z"]):
        if not is_mounted(mountpoint):
            return
        subprocess.run(
            ["fusermount3", "-u", *extra, os.fspath(mountpoint)],
            capture_output=True,
            check=False,
            timeout=EXIT_TIMEOUT,
        )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> bool:
    """Wait for ``proc`` to exit; SIGTERM, then SIGKILL if it does not. True if it had to be signalled."""
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
    return True


def kill_daemons(mountpoint: StrPath) -> list[int]:
    """SIGKILL every ocifuse process serving ``mountpoint``; returns their pids."""
    pids = daemon_pids(mountpoint)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@dataclass
class Mount:
    """A mount started by ``start``: its paths, the daemon process and the daemon's stderr."""

    archive: Path
    mountpoint: Path
    argv: list[str]
    process: subprocess.Popen[bytes]
    stderr_file: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.process.pid

    def stderr(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        self.stderr_file.flush()
        return Path(self.stderr_file.name).read_bytes().decode(errors="replace")

    def alive(self) -> bool:
        """True while the daemon process runs."""
        return self.process.poll() is None

    def path(self, *parts: str) -> Path:
        """A path under the mountpoint."""
        return self.mountpoint.joinpath(*parts)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the daemon to exit by itself (after a signal or an unmount); returns its status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit within {timeout:.0f}s:\n{self.stderr()}")


def _live(mountpoint: Path) -> bool:
    if not is_mounted(mountpoint):
        return False
    try:
        os.stat(mountpoint)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class MountSpec:
    """One mount for ``mounted_many``: what to mount where, with which ``-o`` options and arguments."""

    archive: StrPath
    mountpoint: StrPath
    options: Sequence[str] = ()
    args: Sequence[str] = ()


def start(spec: MountSpec, env: dict[str, str] | None = None) -> Mount:
    """Start ``ocifuse mount -f`` for ``spec`` (mountpoint created if missing); does not wait for it."""
    require_fuse()
    mnt = Path(os.path.abspath(spec.mountpoint))
    mnt.mkdir(parents=True, exist_ok=True)
    argv = [os.fspath(OCIFUSE), "mount", "-f"]
    for o in spec.options:
        argv += ["-o", o]
    argv += [*spec.args, os.fspath(spec.archive), os.fspath(mnt)]
    stderr = tempfile.NamedTemporaryFile(prefix="ocifuse-stderr-", suffix=".log")  # noqa: SIM115
    _STARTED.add(os.fspath(mnt))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env)
    except BaseException:
        stderr.close()
        raise
    return Mount(Path(spec.archive), mnt, argv, proc, stderr)


def wait_live(m: Mount, timeout: float = MOUNT_TIMEOUT) -> None:
    """Wait until ``m`` is mounted and its root answers stat; fail with its stderr if the daemon exits."""
    deadline = time.monotonic() + timeout
    while not _live(m.mountpoint):
        if m.process.poll() is not None:
            pytest.fail(f"{' '.join(m.argv)} exited {m.process.returncode} before mounting:\n{m.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{' '.join(m.argv)}: not mounted after {timeout:.0f}s:\n{m.stderr()}")
        time.sleep(POLL)


def teardown(m: Mount, clean_exit: bool = True) -> list[str]:
    """Unmount ``m`` and stop its daemon whatever their state; return what went wrong (never raises)."""
    problems = []
    already_exited = m.process.poll() is not None
    fusermount_unmount(m.mountpoint)
    signalled = stop_process(m.process)
    if is_mounted(m.mountpoint):
        fusermount_unmount(m.mountpoint)
        if is_mounted(m.mountpoint):
            problems.append(f"{m.mountpoint} is still mounted after fusermount3 -u -z")
    status = m.process.returncode
    if clean_exit and not already_exited and not signalled and status != 0:
        problems.append(f"the daemon of {m.mountpoint} exited {status} after the unmount:\n{m.stderr()}")
    if signalled:
        problems.append(f"the daemon of {m.mountpoint} did not exit after its unmount:\n{m.stderr()}")
    m.stderr_file.close()
    return problems


@contextlib.contextmanager
def mounted_many(
    specs: Sequence[MountSpec],
    *,
    env: dict[str, str] | None = None,
    timeout: float = MOUNT_TIMEOUT,
    clean_exit: bool = True,
) -> Iterator[list[Mount]]:
    """Start every mount of ``specs`` at once, wait until all are live, yield them; always tear all down.

    Args:
        specs: what to mount; mountpoints are created if missing.
        env: the daemons' environment (default: this process's).
        timeout: seconds to wait for each mount to go live.
        clean_exit: fail the test if a daemon, once unmounted, exits non-zero by itself. Pass False
            when the test kills or breaks a daemon on purpose.

    Every mount is gone when this returns or raises; a mount that cannot be removed fails the test.
    """
    started: list[Mount] = []
    problems: list[str] = []
    try:
        for spec in specs:
            started.append(start(spec, env))
        for m in started:
            wait_live(m, timeout)
        yield started
    except BaseException:
        for m in started:  # the daemons' side of a failure: pytest shows it as captured stderr
            print(f"--- {' '.join(m.argv)} (exit {m.process.poll()}):\n{m.stderr()}", file=sys.stderr)
        raise
    finally:
        for m in started:
            problems += teardown(m, clean_exit)
    if problems:
        pytest.fail("; ".join(problems))


@contextlib.contextmanager
def mounted(
    archive: StrPath,
    mountpoint: StrPath,
    *,
    options: Sequence[str] = (),
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = MOUNT_TIMEOUT,
    clean_exit: bool = True,
) -> Iterator[Mount]:
    """Mount ``archive`` on ``mountpoint`` with ``ocifuse mount -f``; yield the live Mount; always unmount.

    ``options`` become one ``-o`` each (``["verify", "allow_other"]``), ``args`` are further
    arguments (``["--verify", "-d"]``); the rest is as for ``mounted_many``.
    """
    spec = MountSpec(archive, mountpoint, options, args)
    with mounted_many([spec], env=env, timeout=timeout, clean_exit=clean_exit) as ms:
        yield ms[0]


@contextlib.contextmanager
def no_new_mounts(root: StrPath | None = None) -> Iterator[None]:
    """Fail (after cleaning up) if the body leaves behind an ocifuse mount of its own.

    Its own: made through this module (``start``, ``background_mount``), or on a mountpoint under
    ``root`` (pass the test session's base temp directory). Mounts of other processes on the same
    machine, such as another test run's, are never counted or touched.
    """
    before = _own_mounts(root)
    yield
    leaked = _own_mounts(root) - before
    for point in sorted(leaked):
        kill_daemons(point)
        fusermount_unmount(point)
    if leaked:
        pytest.fail(f"the test left ocifuse mount(s) behind: {', '.join(sorted(leaked))}")


def _own_mounts(root: StrPath | None) -> set[str]:
    prefix = os.path.join(os.path.abspath(root), "") if root is not None else None
    return {p for p in ocifuse_mounts() if p in _STARTED or (prefix is not None and p.startswith(prefix))}


def run_ocifuse(
    *argv: StrPath, timeout: float = MOUNT_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``ocifuse`` with ``argv``; output captured as text, never raises on failure."""
    return subprocess.run(
        [os.fspath(OCIFUSE), *(os.fspath(a) for a in argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
        env=env,
    )


@contextlib.contextmanager
def background_mount(
    archive: StrPath, mountpoint: StrPath, *, options: Sequence[str] = (), args: Sequence[str] = ()
) -> Iterator[subprocess.CompletedProcess[str]]:
    """``ocifuse mount ARCHIVE MNT`` without -f; yield its result; always unmount and kill the daemon.

    The caller asserts on the result (returncode, stderr); cleanup does not assume it succeeded.
    """
    require_fuse()
    mnt = Path(os.path.abspath(mountpoint))
    mnt.mkdir(parents=True, exist_ok=True)
    argv: list[StrPath] = ["mount"]
    for o in options:
        argv += ["-o", o]
    argv += [*args, archive, mnt]
    _STARTED.add(os.fspath(mnt))
    try:
        yield run_ocifuse(*argv)
    finally:
        fusermount_unmount(mnt)
        with contextlib.suppress(pytest.fail.Exception):
            wait_until(lambda: not daemon_pids(mnt), EXIT_TIMEOUT, f"the daemon of {mnt} to exit")
        kill_daemons(mnt)
        fusermount_unmount(mnt)
