"""SIGTERM and SIGINT at any moment of a mount's start-up (docs/mount.md, "Signals during start-up").

A ``.tar.gz`` image whose first ``--rootfs`` mount takes about a second (its layer decompressed,
indexed and hashed, its table and tree built and stored) is mounted with an empty cache, in the
foreground and in the background, and stopped at a series of moments: after fixed delays spread
over its measured start-up, and at points seen from outside (the outer archive indexed, so the
layer's pass is running; the kernel mount there before the daemon answers), SIGINT to the command's
process group as Ctrl-C sends it, SIGTERM to the command alone. Whatever the moment,
the outcome is one of two: the command ends by the signal (or, in the foreground once the kernel
had the mount, unmounts and exits 0) and no mount and no daemon stay; or a background command
already reported the mount live (exit 0) and ``ocifuse umount`` removes it. Never a traceback,
never a temp file left in the cache. Which phase each stop hit is read from the daemon's debug log
and printed (``pytest -s``), not asserted: timing decides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import signal
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import (
    EXIT_TIMEOUT,
    MOUNT_TIMEOUT,
    OCIFUSE,
    POLL,
    daemon_pids,
    fusermount_unmount,
    is_mounted,
    kill_daemons,
    pids_naming,
    require_fuse,
    run_ocifuse,
    wait_until,
)
from oci import LayoutBuilder
from peers import compress, compress_bytes, require_tools

from ocifuse import model

pytestmark = pytest.mark.fuse

SIGNALS = (signal.SIGTERM, signal.SIGINT)
BIG_FILE = 16 << 20  # hex text in the layer: its gzip pass is most of the start-up
SMALL_FILES = 2000


@pytest.fixture(scope="module")
def slow_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gzip-compressed oci-archive of one image with one gzip layer of 2,000 small files and 16 MiB."""
    require_tools("gzip", "pigz")
    root = tmp_path_factory.mktemp("slow")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))

        for i in range(SMALL_FILES):
            add(f"d{i // 100}/f{i}", os.urandom(32).hex().encode())
        add("big", os.urandom(BIG_FILE // 2).hex().encode())
    plain = layer.getvalue()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(plain).hexdigest()}"]},
        "config": {"Cmd": ["/bin/sh"]},
    }
    b = LayoutBuilder()
    manifest = {
        "schemaVersion": 2,
        "mediaType": model.MEDIA_MANIFEST,
        "config": b.json_blob(config, model.MEDIA_CONFIG),
        "layers": [b.blob(compress_bytes("pigz", plain), "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    b.tag(b.json_blob(manifest, model.MEDIA_MANIFEST), "v1")
    return compress("gzip", b.write_tar(root / "image.tar"), root / "image.tar.gz")


@dataclass
class Attempt:
    """One mount stopped by one signal at one moment, and what became of it."""

    foreground: bool
    rootfs: bool
    signum: signal.Signals
    when: float | str  # seconds after the start, or an event seen from outside
    status: int = 0
    phase: str = ""
    stderr: str = ""


class Startups:
    """Mounts of ``archive`` under ``root``, each with an empty cache of its own, stopped on purpose."""

    def __init__(self, archive: Path, root: Path) -> None:
        self.archive = archive
        self.root = root
        self.count = 0

    def argv(self, foreground: bool, rootfs: bool, cache: Path, mnt: Path) -> list[str]:
        """``ocifuse mount -d`` (with -f, --rootfs) of the archive on ``mnt`` with its cache in ``cache``."""
        flags = ["-d", *(["-f"] if foreground else []), *(["--rootfs"] if rootfs else [])]
        return [
            os.fspath(OCIFUSE),
            "mount",
            *flags,
            "-o",
            f"cache={cache}",
            os.fspath(self.archive),
            os.fspath(mnt),
        ]

    def dirs(self) -> tuple[Path, Path]:
        """A new empty cache directory and a new mountpoint."""
        self.count += 1
        cache, mnt = self.root / f"cache{self.count}", self.root / f"mnt{self.count}"
        cache.mkdir(mode=0o700)
        mnt.mkdir()
        return cache, mnt

    def duration(self, foreground: bool, rootfs: bool) -> float:
        """Seconds from the command's start until the mount answers, with an empty cache (then unmounted)."""
        cache, mnt = self.dirs()
        with _launch(self.argv(foreground, rootfs, cache, mnt), mnt) as proc:
            start = time.monotonic()
            wait_until(lambda: proc.poll() not in (None, 0) or _answers(mnt), MOUNT_TIMEOUT, "the mount")
            took = time.monotonic() - start
            assert _answers(mnt), f"exit {proc.returncode}"
            assert run_ocifuse("umount", mnt).returncode == 0
            wait_until(lambda: not daemon_pids(mnt), EXIT_TIMEOUT, "the daemon to exit")
        return took

    def stop(self, a: Attempt) -> None:
        """Start the mount, send the signal at ``a.when``, and check what stays (see the module docstring)."""
        cache, mnt = self.dirs()
        log = self.root / f"stderr{self.count}"
        with _launch(self.argv(a.foreground, a.rootfs, cache, mnt), mnt, log) as proc:
            if isinstance(a.when, float):
                time.sleep(a.when)
            else:
                _wait_for(a.when, proc, mnt, log)
            if a.signum == signal.SIGINT:
                os.killpg(proc.pid, a.signum)  # as Ctrl-C at a terminal: to the command's process group
            else:
                proc.send_signal(a.signum)  # as kill(1) or a service manager
            try:
                a.status = proc.wait(MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{a}: the command did not exit after its signal:\n{log.read_text()}")
            a.stderr = log.read_text(errors="replace")
            a.phase = _phase(a)
            if a.status == 0 and not a.foreground:
                # Reported live before the stop: a mount that answers, and that ocifuse umount removes.
                assert _answers(mnt), f"{a}: exit 0 without a live mount:\n{a.stderr}"
                done = run_ocifuse("umount", mnt)
                assert done.returncode == 0, f"{a}: ocifuse umount: {done.stderr}"
            elif a.phase == "python-startup":
                assert a.status in (1, -a.signum, 128 + a.signum), f"{a}:\n{a.stderr}"
            else:
                assert a.status in (0, -a.signum, 128 + a.signum), f"{a}:\n{a.stderr}"
            # No process at all (the daemon, its readiness probe) names the mountpoint any more.
            wait_until(
                lambda: not pids_naming(mnt, ocifuse_mount=False), EXIT_TIMEOUT, f"no process on {mnt} ({a})"
            )
            assert not is_mounted(mnt), f"{a}: a mount stays behind:\n{a.stderr}"
            if a.phase != "python-startup":
                assert "Traceback" not in a.stderr and "Exception ignored" not in a.stderr, (
                    f"{a}:\n{a.stderr}"
                )
            assert not [n for n in os.listdir(cache) if n.startswith(".tmp")], f"{a}: {os.listdir(cache)}"


@contextlib.contextmanager
def _launch(argv: list[str], mnt: Path, stderr: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv``; on the way out, whatever happened, no mount and no daemon stay on ``mnt``."""
    out = open(stderr, "wb") if stderr is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            kill_daemons(mnt)
            fusermount_unmount(mnt)
    finally:
        if not isinstance(out, int):
            out.close()


def _answers(mnt: Path) -> bool:
    """Whether an ocifuse mount is on ``mnt`` and its root answers stat."""
    if not is_mounted(mnt):
        return False
    try:
        os.stat(mnt)
    except OSError:
        return False
    return True


def _wait_for(event: str, proc: subprocess.Popen[bytes], mnt: Path, log: Path) -> None:
    """Until ``event``: "layer-pass" (the outer archive indexed: the layer's pass runs) or "kernel-mount"."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while True:
        if event == "kernel-mount" and is_mounted(mnt):
            return
        if event == "layer-pass" and " bytes decompressed" in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"exit {proc.returncode} before {event}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {event} in {MOUNT_TIMEOUT:.0f}s"
        time.sleep(POLL / 20)


def _phase(a: Attempt) -> str:
    """Where the stop landed, by the daemon's debug log (a background daemon's only until it forks)."""
    err = a.stderr
    if _python_startup(err):
        return "python-startup"
    if "stopped while opening" in err:
        return "opening"
    if re.search(r"(INFO|ocifuse): mounted ", err) or a.status == 0 and not a.foreground:
        return "live"
    if "unmounting" in err or "serving " in err:
        return "mounted"
    if "Calling fuse_session_mount" in err:
        return "mounting"
    return "starting"


_FRAME = re.compile(r'^  File "([^"]*)", line \d+, in (.*)$', re.MULTILINE)


def _python_startup(err: str) -> bool:
    """Whether ``err`` is Python's own KeyboardInterrupt while the interpreter starts (site, imports).

    Until ``ocifuse`` runs a function of its own (cli.main), SIGINT is Python's: it prints a
    traceback and exits (docs/mount.md); nothing is mounted or written yet. No frame of the
    traceback is then in a function of ocifuse's (only in the top level of its modules).
    """
    frames = _FRAME.findall(err)
    if not err.rstrip().endswith("KeyboardInterrupt") or not frames:
        return False
    package = os.path.dirname(model.__file__)
    return all(func == "<module>" for file, func in frames if file.startswith(package + os.sep))


def _moments(took: float) -> list[float | str]:
    """Fixed delays from 0 to past the measured start-up, and the events seen from outside (the
    kernel mount twice: the signals alternate, and it takes each)."""
    fixed: list[float | str] = [0.0, 0.02, 0.1]
    return [
        *fixed,
        *(round(took * f, 3) for f in (0.3, 0.5, 0.7, 0.85, 1.0, 1.15)),
        "layer-pass",
        "kernel-mount",
        "kernel-mount",
    ]


@pytest.mark.parametrize(
    ("foreground", "rootfs"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_a_stop_at_any_moment_of_startup_leaves_no_mount_or_a_live_one(
    slow_archive: Path, tmp_path: Path, foreground: bool, rootfs: bool
) -> None:
    require_fuse()
    startups = Startups(slow_archive, tmp_path)
    took = startups.duration(foreground, rootfs)
    attempts: list[Attempt] = []
    for when in _moments(took):
        if when == "layer-pass" and not rootfs:
            continue
        a = Attempt(foreground, rootfs, SIGNALS[len(attempts) % 2], when)
        startups.stop(a)
        attempts.append(a)
    phases = Counter(a.phase for a in attempts)
    print(f"start-up {took:.2f}s; stops by phase: {dict(phases)}")
    print("\n".join(f"  {a.signum.name} at {a.when}: exit {a.status}, {a.phase}" for a in attempts))
