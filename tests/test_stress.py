"""A listed name always opens: mount, walk, open every file, unmount, again and again, under CPU load.

Each round is what a user's script does: ``ocifuse mount`` (the background form: it returns once
the mount is live), ``os.walk`` of the fresh mount, then open and read of every file it listed
(compared byte for byte), then ``ocifuse umount``, and the next round at once on the same
mountpoint, while the previous daemon may still be exiting; every other round leaves a busy mount
lazily detached, whose daemon is stopped during the next round's walk. Busy processes keep every
CPU loaded.
OCIFUSE_STRESS_SECONDS (default 20; 300 with OCIFUSE_SLOW=1) bounds the loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from mounting import (
    _STARTED,
    MountSpec,
    daemon_pids,
    fusermount_unmount,
    kill_daemons,
    mount_source,
    require_fuse,
    run_ocifuse,
    start,
    teardown,
    wait_live,
)
from tarbuild import BlobCorpus, blob_corpus

pytestmark = pytest.mark.fuse

BLOBS = 5000
SLOW = os.environ.get("OCIFUSE_SLOW") == "1"
SECONDS = float(os.environ.get("OCIFUSE_STRESS_SECONDS", "300" if SLOW else "20"))
MIN_ROUNDS = 3  # however slow the machine, a run is at least this many rounds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> BlobCorpus:
    """About 5,000 blobs of 0 to 2 KiB in one image, and the layout's other files."""
    corpus = blob_corpus(
        tmp_path_factory.mktemp("stress") / "5000-blobs.tar", seed=12, count=BLOBS, max_size=2048
    )
    assert len(corpus.files) > BLOBS
    return corpus


@contextlib.contextmanager
def cpu_load() -> Iterator[None]:
    """One busy process per CPU for the duration; always stopped (by pid) afterwards."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        yield
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait()


@dataclass
class Detached:
    """A lazily unmounted mount kept busy by an open file, and its daemon, still serving it."""

    busy: IO[bytes]
    pid: int

    def stop(self) -> None:
        """SIGTERM the daemon (as systemd stops a unit), then let the mount go."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        self.busy.close()


def one_round(
    corpus: BlobCorpus, mnt: Path, previous: Detached | None, detach: bool
) -> tuple[list[str], Detached | None]:
    """Mount, walk, open and read every listed file, unmount; every problem found, none raised.

    ``previous``, the last round's detached daemon, is stopped between this round's walk and its
    opens. With ``detach``, this round ends with ``ocifuse umount --lazy`` of a busy mount, and
    returns it for the next round to stop.
    """
    problems: list[str] = []
    done = run_ocifuse("mount", corpus.archive, mnt)
    if done.returncode != 0:
        if previous is not None:
            previous.stop()
        return [f"mount exited {done.returncode}: {done.stderr.strip()}"], None
    detached = None
    try:
        listed = [
            os.path.relpath(os.path.join(top, name), mnt) for top, _, names in os.walk(mnt) for name in names
        ]
        if previous is not None:
            previous.stop()
        if sorted(listed) != sorted(corpus.files):
            missing = sorted(set(corpus.files) - set(listed))[:5]
            extra = sorted(set(listed) - set(corpus.files))[:5]
            problems.append(f"walk listed {len(listed)} files; missing {missing}, extra {extra}")
        for rel in listed:
            try:
                with open(mnt / rel, "rb") as f:
                    data = f.read()
            except OSError as e:
                problems.append(f"{rel}: listed, then {e!r}")
                continue
            if data != corpus.files.get(rel):
                problems.append(f"{rel}: {len(data)} bytes that differ from the archive's")
        if detach:
            pids = daemon_pids(mnt)
            busy = open(mnt / "oci-layout", "rb")  # noqa: SIM115 - closed by Detached.stop
            detached = Detached(busy, max(pids)) if pids else None  # the newest: this round's
            if detached is None:
                busy.close()
                problems.append("detach round: no daemon pid found for the mount")
    finally:
        umount = run_ocifuse("umount", *(["--lazy"] if detached is not None else []), mnt)
        if umount.returncode != 0:
            problems.append(f"umount exited {umount.returncode}: {umount.stderr.strip()}")
            fusermount_unmount(mnt)
    return problems, detached


def test_listed_names_always_open(corpus: BlobCorpus, tmp_path: Path) -> None:
    """Rounds for OCIFUSE_STRESS_SECONDS under CPU load: every listed file opens, with its bytes.

    Every other round ends with a lazy unmount of a busy mount, whose daemon the next round stops
    (SIGTERM) between its walk and its opens: the stale mount on the same mountpoint.
    """
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _STARTED.add(os.fspath(mnt))
    rounds = 0
    problems: list[str] = []
    detached: Detached | None = None
    deadline = time.monotonic() + SECONDS
    try:
        with cpu_load():
            while (time.monotonic() < deadline or rounds < MIN_ROUNDS) and not problems:
                found, detached = one_round(corpus, mnt, detached, detach=rounds % 2 == 1)
                problems = [f"round {rounds + 1}: {p}" for p in found]
                rounds += 1
    finally:
        if detached is not None:
            detached.stop()
        fusermount_unmount(mnt)
        kill_daemons(mnt)
    print(f"{rounds} rounds of mount, walk, open and read of {len(corpus.files)} files, umount")
    assert not problems, problems[:20]


def test_stopping_a_detached_daemon_leaves_the_next_mount_alone(corpus: BlobCorpus, tmp_path: Path) -> None:
    """A daemon stopped after its busy mount was lazily detached must not unmount its successor.

    libfuse unmounts by path on the way out; the path now holds the next mount, whose files a
    walker had just listed: they would vanish (FileNotFoundError) with it.
    """
    mnt = tmp_path / "mnt"
    other = tmp_path / "other.tar"
    other.write_bytes(corpus.archive.read_bytes())
    first = start(MountSpec(corpus.archive, mnt))
    second = None
    busy = None
    try:
        wait_live(first)
        busy = open(mnt / "index.json", "rb")  # noqa: SIM115 - closed in finally
        fusermount_unmount(mnt)  # busy: -u fails, -z detaches it and the daemon keeps serving it
        assert first.alive() and mount_source(mnt) is None
        second = start(MountSpec(other, mnt))
        wait_live(second)
        listed = [os.path.join(top, name) for top, _, names in os.walk(mnt) for name in names]
        first.process.terminate()
        assert first.wait_exit() == 0
        assert mount_source(mnt) == os.fspath(other), "the stopped daemon unmounted the next mount"
        for path in listed:
            with open(path, "rb") as f:
                assert f.read() == corpus.files[os.path.relpath(path, mnt)]
        assert "another mount is there now" in first.stderr()
    finally:
        if busy is not None:
            busy.close()
        problems = [] if second is None else teardown(second)
        teardown(first, clean_exit=False)
    assert not problems, problems
