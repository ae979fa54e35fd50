"""Load on a real mount: 16 concurrent readers on random ranges, every byte and checksum verified,
while find/stat storms walk a 5,000-blob archive; the daemon's memory stays flat.

The CI run lasts OCIFUSE_LOAD_SECONDS (default 5); the 30-second run is marked slow and runs
with OCIFUSE_SLOW=1. Readers drop the page cache of their file as they go (POSIX_FADV_DONTNEED),
so reads reach the daemon instead of being answered by the kernel's cache.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mounting import Mount, mounted, no_new_mounts, status_kib
from tarbuild import BlobCorpus, blob_corpus

pytestmark = pytest.mark.fuse

BLOBS = 5000
READERS = 16
LOAD_SECONDS = float(os.environ.get("OCIFUSE_LOAD_SECONDS", "5"))
# How much the daemon's resident memory may grow over a load run (MiB); SECURITY.md states it.
RSS_GROWTH_MB = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> BlobCorpus:
    """BLOBS layers of one image (sizes 0 to 24 KiB, and four of 3 MiB), written once per module."""
    path = tmp_path_factory.mktemp("load") / "5000-blobs.tar"
    corpus = blob_corpus(
        path, seed=5000, count=BLOBS - 5, max_size=24 * 1024, big=4, big_size=3 * 1024 * 1024
    )
    assert len(corpus.blobs) >= BLOBS - 5  # duplicates of the empty layer share one blob
    return corpus


class Load:
    """Readers and storms running until ``stop`` is set; every problem is collected, never raised."""

    def __init__(self, m: Mount, corpus: BlobCorpus) -> None:
        self.m = m
        self.corpus = corpus
        self.names = sorted(corpus.blobs)
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.reads = 0
        self.bytes = 0
        self.hashed = 0
        self.walks = 0
        self.lock = threading.Lock()

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def reader(self, seed: int) -> None:
        """Random ranges of random blobs, compared byte for byte; every 50th read hashes a whole blob."""
        rng = random.Random(seed)
        n = 0
        while not self.stop.is_set():
            name = rng.choice(self.names)
            want = self.corpus.blobs[name]
            try:
                fd = os.open(self.m.path(name), os.O_RDONLY)
                try:
                    if n % 50 == 0:
                        h = hashlib.sha256()
                        while data := os.read(fd, 1 << 17):
                            h.update(data)
                        if "sha256/" + h.hexdigest() not in name:
                            self.problem(f"{name}: checksum {h.hexdigest()}")
                        with self.lock:
                            self.hashed += 1
                    else:
                        off = rng.randrange(0, len(want) + 1)
                        size = rng.randrange(0, 256 * 1024)
                        got = os.pread(fd, size, off)
                        if got != want[off : off + size]:
                            self.problem(f"{name}: wrong bytes at {off}+{size}")
                        with self.lock:
                            self.reads += 1
                            self.bytes += len(got)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError as e:
                self.problem(f"{name}: {e}")
            n += 1

    def stat_storm(self) -> None:
        """Walk and lstat the whole tree again and again; sizes must match the blobs'."""
        while not self.stop.is_set():
            seen = 0
            for top, _, files in os.walk(self.m.mountpoint):
                for f in files:
                    path = os.path.join(top, f)
                    rel = os.path.relpath(path, self.m.mountpoint)
                    try:
                        st = os.lstat(path)
                    except OSError as e:
                        self.problem(f"lstat {rel}: {e}")
                        continue
                    if rel in self.corpus.blobs and st.st_size != len(self.corpus.blobs[rel]):
                        self.problem(f"lstat {rel}: size {st.st_size}")
                    seen += 1
            if seen != len(self.corpus.blobs) + 2:
                self.problem(f"walk saw {seen} files")
            with self.lock:
                self.walks += 1

    def find_storm(self) -> None:
        """``find MNT -type f -printf '%s %P'`` again and again; the listing must be exact."""
        want = sorted(f"{len(d)} {n}" for n, d in self.corpus.blobs.items())
        while not self.stop.is_set():
            done = subprocess.run(
                ["find", os.fspath(self.m.mountpoint / "blobs"), "-type", "f", "-printf", "%s blobs/%P\\n"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0 or sorted(done.stdout.splitlines()) != want:
                self.problem(f"find exited {done.returncode}: {done.stderr[:200]}")
            with self.lock:
                self.walks += 1


def run_load(corpus: BlobCorpus, mnt: Path, seconds: float) -> None:
    """Mount, warm up, measure VmRSS, load for ``seconds``, measure again; no problem may be found."""
    with no_new_mounts(mnt.parent), mounted(corpus.archive, mnt) as m:
        load = Load(m, corpus)
        for name, data in corpus.blobs.items():  # warm up: every inode looked up and read once
            if m.path(name).read_bytes() != data:
                load.problem(f"{name}: wrong bytes on the first read")
        before = status_kib(m.pid, "VmRSS")
        threads = [threading.Thread(target=load.reader, args=(i,)) for i in range(READERS)]
        threads += [threading.Thread(target=load.stat_storm), threading.Thread(target=load.find_storm)]
        for t in threads:
            t.start()
        try:
            time.sleep(seconds)
        finally:
            load.stop.set()
            for t in threads:
                t.join(120)
        after = status_kib(m.pid, "VmRSS")
        print(
            f"load {seconds:.0f}s: {load.reads} range reads ({load.bytes / 2**20:.0f} MiB), "
            f"{load.hashed} blobs hashed, {load.walks} walks; "
            f"daemon VmRSS {before / 1024:.1f} -> {after / 1024:.1f} MiB"
        )
        assert not load.problems, load.problems[:20]
        assert load.reads > 0 and load.hashed > 0 and load.walks > 0
        assert m.alive(), m.stderr()
        assert (after - before) / 1024 < RSS_GROWTH_MB, f"VmRSS grew {before} -> {after} KiB"
        assert "Traceback" not in m.stderr() and "ERROR" not in m.stderr()


def test_load(corpus: BlobCorpus, tmp_path: Path) -> None:
    """OCIFUSE_LOAD_SECONDS (default 5) of readers and storms: no error, no wrong byte, flat memory."""
    run_load(corpus, tmp_path / "mnt", LOAD_SECONDS)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OCIFUSE_SLOW") != "1", reason="the 30 s load run: set OCIFUSE_SLOW=1")
def test_load_30_seconds(corpus: BlobCorpus, tmp_path: Path) -> None:
    """The issue's 30-second run."""
    run_load(corpus, tmp_path / "mnt", 30.0)
