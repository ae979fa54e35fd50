"""What the bench modules share: paths, progress lines, running and timing commands, a daemon's pid
and memory, a mount made and always unmounted, the scratch directory.

Standard library only: ``bench/run.py`` runs in the bench's own venv, where ocifuse is not
installed; the commands are timed from outside, as a user's script runs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
OCIFUSE = Path(os.environ.get("OCIFUSE_BIN", REPO / ".venv" / "bin" / "ocifuse"))
PYTHON = Path(os.environ.get("OCIFUSE_PYTHON", REPO / ".venv" / "bin" / "python"))  # the project's
MIB = 1 << 20


def logger(name: str) -> Callable[[str], None]:
    """A progress printer to stderr: ``[NAME HH:MM:SS] message`` (results go to stdout and files)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


# -- commands -----------------------------------------------------------------------------------


def run(*cmd: str | Path, stdout: int | None = subprocess.DEVNULL, env: dict[str, str] | None = None) -> None:
    """Run a tool (stdout discarded unless ``stdout`` says otherwise); a failure raises with its stderr."""
    done = subprocess.run([str(c) for c in cmd], stdout=stdout, stderr=subprocess.PIPE, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr.decode()}")


def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(*cmd: str | Path) -> float:
    """Wall seconds ``run(*cmd)`` takes."""
    return seconds(lambda: run(*cmd))


def piped_count(cmd: Sequence[str], wc_flag: str) -> tuple[float, int]:
    """``CMD | wc WC_FLAG``: wall seconds, and the count wc printed (RuntimeError if CMD fails)."""
    start = time.perf_counter()
    producer = subprocess.Popen(list(cmd), stdout=subprocess.PIPE)
    wc = subprocess.run(["wc", wc_flag], stdin=producer.stdout, capture_output=True, text=True, check=True)
    assert producer.stdout is not None
    producer.stdout.close()
    if producer.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return time.perf_counter() - start, int(wc.stdout.split()[0])


def cat(*paths: Path) -> float:
    """Wall time of one ``cat`` per path, all started together, until the last one ends."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["cat", str(p)], stdout=subprocess.DEVNULL) for p in paths]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"cat failed ({codes}) on {[str(p) for p in paths]}")
    return elapsed


def warm(path: Path) -> None:
    """Read a file once so that its pages are in the page cache."""
    run("cat", path)


def cold_pread(path: Path, size: int, offset: int) -> float:
    """Seconds one ``pread`` of ``size`` bytes at ``offset`` of ``path`` takes (its page cache dropped
    first: the read reaches the filesystem)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not the page cache of an earlier read
        start = time.perf_counter()
        os.pread(fd, size, offset)
        return time.perf_counter() - start
    finally:
        os.close(fd)


# -- daemons ------------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def daemon_pid(mountpoint: Path) -> int | None:
    """The pid of the process serving ``mountpoint``: its command line names it (ocifuse's or
    ratarmount's; fusermount3 and this process are not counted)."""
    want = os.fsencode(mountpoint)
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            argv = _cmdline(int(name))
            if want in argv and not argv[0].endswith(b"fusermount3"):
                return int(name)
    return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size (VmRSS, VmHWM) in KiB; 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss:
    """The largest VmRSS of ``pid`` (KiB), sampled every few milliseconds while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_kib = max(self.max_kib, status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.max_kib = max(self.max_kib, status_kib(self.pid, "VmRSS"))


# -- mounts -------------------------------------------------------------------------------------


def unmount(mountpoint: Path, pid: int | None = None) -> None:
    """``fusermount3 -u`` (``-u -z`` if that fails); with ``pid``, wait for that daemon to exit
    (SIGKILL after 10 s), so that the next measurement starts from nothing."""
    done = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
    if done.returncode != 0 and os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)
    if pid is not None:
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def mounted(
    archive: Path | str,
    mnt: Path,
    *args: str,
    env: dict[str, str] | None = None,
    foreground: bool = False,
    command: Sequence[str | Path] = (OCIFUSE,),
) -> Iterator[tuple[float, int]]:
    """``ocifuse mount ARGS ARCHIVE MNT`` (it returns once live; ``archive`` a path or a URL, the
    daemon started with ``env`` if given): the seconds it took, the daemon's pid.

    With ``foreground``, ``ocifuse mount -f`` is started and the time is until the mount answers.
    ``command``: what runs as ``ocifuse`` in the background (bench/variant.py with a variant, say).
    Always unmounted afterwards, and the daemon waited for: it has finished (its cache written)
    before the next measurement starts.
    """
    mnt.mkdir(exist_ok=True)
    if foreground:
        with _foreground(archive, mnt, args, env) as mount:
            yield mount
        return
    start = time.perf_counter()
    run(*command, "mount", *args, archive, mnt, env=env)
    took = time.perf_counter() - start
    pid = daemon_pid(mnt)
    try:
        if pid is None:
            raise RuntimeError(f"no daemon serves {mnt}")
        yield took, pid
    finally:
        unmount(mnt, pid)


@contextlib.contextmanager
def _foreground(
    archive: Path | str, mnt: Path, args: tuple[str, ...], env: dict[str, str] | None
) -> Iterator[tuple[float, int]]:
    """``ocifuse mount -f``: (seconds until ``MNT`` is a mount that answers, the daemon's pid)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(OCIFUSE), "mount", "-f", *args, str(archive), str(mnt)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
        deadline = start + 600  # a first --rootfs mount over a slow link decompresses every layer
        try:
            while not os.path.ismount(mnt):  # a stat of the root: answered once the daemon serves
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{mnt}: not mounted after 600 s")
                if proc.poll() is not None:
                    err.seek(0)
                    raise RuntimeError(f"ocifuse mount -f exited {proc.returncode}: {err.read().decode()}")
                time.sleep(0.002)
            yield time.perf_counter() - start, proc.pid
        finally:
            unmount(mnt, proc.pid)
            proc.wait()


# -- the scratch directory ---------------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(prefix: str, parent: Path | None = None, *, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under ``parent`` (default: the temporary directory); removed afterwards
    unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
