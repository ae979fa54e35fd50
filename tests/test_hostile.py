"""The hostile corpus through the installed ``ocifuse``: fsck, inspect and mount, as a user runs them.

For every case: no traceback, a clear exit status, nothing written outside (the sentinel directory
that traversal names aim at stays empty, and so does the working directory); a mount either
refuses with one line or serves only regular files and directories, 0444/0555, on the mount's own
device, with the valid image still readable byte for byte (and by skopeo). The two large cases
(100,000 members, a 50 MB index.json) also stay under MEMORY_BOUND_MB of peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile import CORPUS, MANY_MEMBERS, HostileCase, flood_member
from mounting import OCIFUSE, background_mount, is_mounted, mounted, no_new_mounts, require_fuse, status_kib

# The peak RSS (MiB) any one ocifuse process may reach on the corpus; SECURITY.md states it.
MEMORY_BOUND_MB = 200
NAME_MAX = 255
TIMEOUT = 120

pytestmark = pytest.mark.fuse


class Corpus:
    """Builds each hostile archive on first use, once per session."""

    def __init__(self, directory: Path, target: Path) -> None:
        self.directory = directory
        self.target = target
        self._built: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """The archive of case ``name``."""
        if name not in self._built:
            self._built[name] = CORPUS[name].build(self.directory, self.target)
        return self._built[name]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The hostile corpus, and the empty sentinel directory its names and links point into."""
    return Corpus(tmp_path_factory.mktemp("hostile"), tmp_path_factory.mktemp("sentinel"))


@pytest.fixture
def workdir(tmp_path: Path, corpus: Corpus) -> Iterator[Path]:
    """An empty working directory for the commands; afterwards it and the sentinel must still be empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    yield cwd
    assert sorted(os.listdir(cwd)) == [], "a command created files in its working directory"
    assert sorted(os.listdir(corpus.target)) == [], "a command created files outside the mountpoint"


# Runs ``argv[2:]`` and writes its peak RSS (KiB) to ``argv[1]``. A small parent of its own: a
# child's ru_maxrss also counts the memory of the process it was forked from (here, pytest).
_MEASURED = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(status)
"""


def ocifuse(cwd: Path, *argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run the installed ocifuse in ``cwd``; fail the test on a traceback or a peak RSS over the bound."""
    with tempfile.NamedTemporaryFile(prefix="ocifuse-rss-") as rss:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURED, rss.name, os.fspath(OCIFUSE), *(os.fspath(a) for a in argv)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        peak_mb = int(Path(rss.name).read_text()) / 1024  # Linux: KiB
    assert "Traceback" not in done.stderr, done.stderr
    assert "Traceback" not in done.stdout, done.stdout
    print(
        f"ocifuse {os.fspath(argv[0])} {Path(argv[-1]).name}: "
        f"exit {done.returncode}, peak RSS {peak_mb:.1f} MiB"
    )
    assert peak_mb < MEMORY_BOUND_MB, f"ocifuse {os.fspath(argv[0])} peaked at {peak_mb:.0f} MiB"
    return done


def one_line(stderr: str) -> str:
    """The single ``ocifuse: ...`` line a refusal prints."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocifuse: "), stderr
    return lines[0]


CASES = sorted(CORPUS)


# -- fsck and inspect ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_fsck(name: str, corpus: Corpus, workdir: Path) -> None:
    """fsck gives the case's exit status and finding codes, never a traceback."""
    case = CORPUS[name]
    path = corpus.path(name)
    proc = ocifuse(workdir, "fsck", "--json", path)
    assert proc.returncode == case.fsck_exit, proc.stdout[-2000:] + proc.stderr
    report = json.loads(proc.stdout)
    codes = {f["code"] for f in report["findings"]}
    assert case.fsck_codes <= codes, codes
    assert report["ok"] is (case.fsck_exit == 0)
    if case.fsck_exit == 2:
        assert str(path) in one_line(proc.stderr)
    if name in ("traversal", "devices"):  # the text report, in two cases (each run costs a start-up)
        text = ocifuse(workdir, "fsck", path)
        assert text.returncode == 0
        assert "warning: member-skipped:" in text.stdout and "not served" in text.stdout


@pytest.mark.parametrize("name", CASES)
def test_inspect(name: str, corpus: Corpus, workdir: Path) -> None:
    """inspect shows the valid image or ends with one clear line and a non-zero status."""
    case = CORPUS[name]
    proc = ocifuse(workdir, "inspect", "--ref", "v1", corpus.path(name))
    if case.mount_refuses:
        assert proc.returncode == 2
        one_line(proc.stderr)
    elif case.inspect_ok:
        assert proc.returncode == 0, proc.stderr
        assert "image v1 (linux/amd64)" in proc.stdout
    else:
        assert proc.returncode in (1, 2)
        assert "index.json" in one_line(proc.stderr)


# -- mount -----------------------------------------------------------------------------------------


def open_rel(root: Path, rel: str) -> int:
    """An fd of ``rel`` under ``root``, opened component by component (paths may exceed PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel.split("/"):
            new = os.open(part, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_rel(root: Path, rel: str) -> bytes:
    """All bytes of file ``rel`` under ``root``."""
    fd = open_rel(root, rel)
    try:
        chunks = []
        while data := os.read(fd, 1 << 20):
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def walk_policy(mnt: Path) -> tuple[set[str], set[str]]:
    """Walk the whole mount and assert the policy on every entry; return (files, dirs) as relative paths.

    Breadth first with directory fds, so depth and path length do not matter.
    """
    root_st = os.stat(mnt)
    uid, gid = os.getuid(), os.getgid()
    files: set[str] = set()
    dirs: set[str] = set()
    queue = [("", os.open(mnt, os.O_RDONLY | os.O_DIRECTORY))]
    try:
        while queue:
            prefix, fd = queue.pop()
            try:
                names = os.listdir(fd)
                for name in names:
                    raw = os.fsencode(name)
                    assert raw not in (b"", b".", b"..") and b"/" not in raw and b"\0" not in raw, name
                    assert len(raw) <= NAME_MAX, name
                    rel = prefix + name
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    assert st.st_dev == root_st.st_dev, f"{rel} is on another device"
                    assert (st.st_uid, st.st_gid) == (uid, gid), rel
                    if stat.S_ISDIR(st.st_mode):
                        assert stat.S_IMODE(st.st_mode) == 0o555, (rel, oct(st.st_mode))
                        dirs.add(rel)
                        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                        queue.append((rel + "/", sub))
                    else:
                        assert stat.S_ISREG(st.st_mode), (rel, oct(st.st_mode))
                        assert stat.S_IMODE(st.st_mode) == 0o444, (rel, oct(st.st_mode))
                        assert st.st_nlink == 1 and st.st_rdev == 0 and st.st_size >= 0, rel
                        files.add(rel)
                    # No symlinks and one device already keep every path inside; realpath says it
                    # again where it is cheap (it lstats every component: quadratic in depth).
                    if rel.count("/") < 8 and len(files) + len(dirs) < 2000:
                        assert os.path.realpath(os.path.join(mnt, rel)).startswith(f"{mnt}/"), rel
            finally:
                os.close(fd)
    finally:
        for _, fd in queue:
            os.close(fd)
    return files, dirs


def check_mount(case: HostileCase, mnt: Path) -> tuple[set[str], set[str]]:
    """Policy walk, mount flags, the valid part byte for byte, the forbidden paths absent."""
    flags = os.statvfs(mnt).f_flag
    assert flags & os.ST_RDONLY and flags & os.ST_NOSUID and flags & os.ST_NODEV
    files, dirs = walk_policy(mnt)
    for rel, data in case.valid.items():
        assert rel in files, rel
        assert read_rel(mnt, rel) == data, rel
    for rel in case.absent:
        assert rel not in files and rel not in dirs, f"{rel} is served"
    assert not any(p.startswith(("tmp/", "etc/")) for p in files)
    return files, dirs


def skopeo_inspect(mnt: Path, ref: str) -> None:
    """skopeo reads the image through the mount as an OCI layout (not checked without skopeo, but in CI)."""
    if shutil.which("skopeo") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("skopeo is not installed (CI must have it)")
        return
    proc = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{mnt}:{ref}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schemaVersion"] == 2


SERVED = [n for n in CASES if not CORPUS[n].mount_refuses]
REFUSED = [n for n in CASES if CORPUS[n].mount_refuses]


@pytest.mark.parametrize("name", SERVED)
def test_mount_serves_only_the_policy(name: str, corpus: Corpus, workdir: Path, tmp_path: Path) -> None:
    """The mount serves regular files and directories only, and the valid image through it."""
    case = CORPUS[name]
    mnt = tmp_path / "mnt"
    with no_new_mounts(corpus.directory.parent), mounted(corpus.path(name), mnt) as m:
        files, _ = check_mount(case, mnt)
        if case.ref is not None:
            skopeo_inspect(mnt, case.ref)
        if name == "many_members":
            assert len(files) >= MANY_MEMBERS
            for i in (0, 1, 4999, MANY_MEMBERS // 2, MANY_MEMBERS - 1):
                rel, data = flood_member(i)
                assert read_rel(mnt, rel) == data
            peak = status_kib(m.pid, "VmHWM")
            print(f"many_members: mount daemon peak RSS {peak / 1024:.1f} MiB")
            assert peak < MEMORY_BOUND_MB * 1024
        log = m.stderr()
    assert "Traceback" not in log
    if "member-skipped" in case.fsck_codes:
        assert "not served: " in log
    assert not is_mounted(mnt)


@pytest.mark.parametrize("name", REFUSED)
def test_mount_refuses(name: str, corpus: Corpus, workdir: Path, tmp_path: Path) -> None:
    """An archive that cannot be scanned is refused with one line before anything is mounted."""
    require_fuse()
    mnt = tmp_path / "mnt"
    with no_new_mounts(corpus.directory.parent), background_mount(corpus.path(name), mnt) as proc:
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        line = one_line(proc.stderr)
        assert str(corpus.path(name)) in line
        assert not is_mounted(mnt)
    assert os.listdir(mnt) == []
