"""The peer tools tests run: require them, run them, their compressors, an isolated container store.

Use::

    from peers import require_tools, run

    require_tools("umoci", "skopeo")
    run("skopeo", "copy", "--quiet", f"oci:{layout}:v1", f"oci-archive:{archive}:v1")

``run`` fails the test with the tool's output when it exits non-zero (and returns its stdout);
``pipe`` runs a filter from one file into another. ``COMPRESSORS`` is the one table of the
compressors tests make data with (and ``DECOMPRESSORS`` the tools that take each format back);
``compress``, ``compress_bytes``, ``decompress`` and ``bomb`` use them. ``isolated_store`` is a
podman/buildah store of the test's own, never the machine's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import skip_or_fail

StrPath = str | os.PathLike[str]
TIMEOUT = 300.0  # seconds: a peer tool that takes longer has hung

# What ``podman run`` needs on these VMs: crun cannot set rlimits here, so runc and explicit ones.
PODMAN_RUN = [
    "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network=none"
]  # fmt: skip


def require_tools(*tools: str) -> None:
    """Skip when a peer tool is missing, except in CI (``CI=true``), where that is a failure."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    skip_or_fail(f"missing peer tool(s): {', '.join(missing)}")


def run(*argv: StrPath, env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> str:
    """Run a peer tool; its stdout. Fail the test with its output if it fails."""
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def pipe(argv: Sequence[str], src: Path, dst: Path) -> Path:
    """Run the filter ``argv`` with ``src`` as its stdin and ``dst`` as its stdout; returns ``dst``."""
    with open(src, "rb") as i, open(dst, "wb") as o:
        subprocess.run(list(argv), stdin=i, stdout=o, check=True, timeout=TIMEOUT)
    return dst


# -- compressors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compressor:
    """A compressing tool: the format it writes and its command line (a filter, stdin to stdout)."""

    kind: str  # "gzip" or "zstd": what ocifuse must name it
    argv: tuple[str, ...]


# The real tools' own ways of writing each format. Levels are the tools' defaults, spelled out.
COMPRESSORS: dict[str, Compressor] = {
    "gzip": Compressor("gzip", ("gzip", "-c", "-6")),
    "pigz": Compressor("gzip", ("pigz", "-c", "-p", "2", "-b", "128")),
    "zstd": Compressor("zstd", ("zstd", "-q", "-c", "-3")),
    "zstd-long": Compressor("zstd", ("zstd", "-q", "-c", "--long")),
    "pzstd": Compressor("zstd", ("pzstd", "-q", "-c", "-p", "2")),
}
# The tool's own decompression of each format: the reference, never our reader.
DECOMPRESSORS: dict[str, tuple[str, ...]] = {
    "gzip": ("gzip", "-dc"),
    "zstd": ("zstd", "-dcq", "--long=27"),  # --long=27: also takes ``zstd --long`` output back
}
# The best ratio each tool has: for decompression bombs.
BOMB_COMPRESSORS: dict[str, tuple[str, ...]] = {
    "gzip": ("gzip", "-c", "-9"),
    "zstd": ("zstd", "-q", "-c", "-19"),
}


def compress(name: str, src: Path, dst: Path) -> Path:
    """``src`` compressed by the COMPRESSORS tool ``name`` into ``dst`` (skipped without the tool)."""
    argv = COMPRESSORS[name].argv
    require_tools(argv[0])
    return pipe(argv, src, dst)


def compress_bytes(name: str, data: bytes) -> bytes:
    """``data`` compressed by the COMPRESSORS tool ``name``, in memory."""
    argv = list(COMPRESSORS[name].argv)
    return subprocess.run(argv, input=data, stdout=subprocess.PIPE, check=True, timeout=TIMEOUT).stdout


def decompress(kind: str, src: Path, dst: Path) -> Path:
    """``src`` (of format ``kind``) decompressed by the format's own tool into ``dst``."""
    return pipe(DECOMPRESSORS[kind], src, dst)


def bomb(kind: str, size: int, dst: Path) -> Path:
    """``size`` zero bytes compressed as tightly as the ``kind`` tool can (kilobytes): ``dst``."""
    argv = BOMB_COMPRESSORS[kind]
    require_tools(argv[0])
    zeros = dst.with_name(dst.name + ".zeros")
    with open(zeros, "wb") as f:
        f.truncate(size)
    try:
        return pipe(argv, zeros, dst)
    finally:
        zeros.unlink()


# -- an isolated podman/buildah store ----------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """An isolated podman/buildah store: the global flags that point at it."""

    root: Path
    runroot: Path  # podman wants it short (at most 50 characters): a directory of its own in /tmp

    @property
    def flags(self) -> list[str]:
        return ["--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", "vfs"]

    @property
    def env(self) -> dict[str, str]:
        """The environment: per-user config and data under the store, not the machine's."""
        home = self.root / "home"
        return {**os.environ, "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data")}

    def podman(self, *argv: StrPath) -> str:
        """Run podman on this store; its stdout."""
        cmd = ["podman", *self.flags, "--cgroup-manager", "cgroupfs", "--events-backend", "none"]
        return run(*cmd, *argv, env=self.env)

    def buildah(self, *argv: StrPath) -> str:
        """Run buildah on this store; its stdout."""
        return run("buildah", *self.flags, *argv, env=self.env)


@contextlib.contextmanager
def isolated_store(parent: Path) -> Iterator[Store]:
    """A fresh store under ``parent`` (its runroot in /tmp); reset and removed afterwards."""
    store = Store(parent / "store", Path(tempfile.mkdtemp(prefix="ocifuse-run-")))
    try:
        yield store
    finally:
        for cmd in (
            ["buildah", *store.flags, "rm", "--all"],
            ["podman", *store.flags, "system", "reset", "-f"],
        ):
            if shutil.which(cmd[0]) is not None:
                subprocess.run(cmd, capture_output=True, check=False, env=store.env)
        shutil.rmtree(store.root, ignore_errors=True)
        shutil.rmtree(store.runroot, ignore_errors=True)


@contextlib.contextmanager
def containerd() -> Iterator[Callable[..., str]]:
    """A containerd of the test's own (root, state and socket in a fresh /tmp directory: a socket
    path must be short), for stargz-snapshotter's ``ctr-remote``: yields a function that runs
    ``ctr-remote ARGS`` against it. Always stopped, its directory removed."""
    require_tools("containerd", "ctr-remote")
    base = Path(tempfile.mkdtemp(prefix="ocifuse-ctd-"))
    socket = base / "sock"
    config = base / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{base / "root"}"\nstate = "{base / "state"}"\n'
        f'[grpc]\n  address = "{socket}"\n[plugins."io.containerd.grpc.v1.cri"]\n  disable = true\n'
    )
    with open(base / "log", "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {(base / 'log').read_text()[-2000:]}")
            time.sleep(0.05)

        def ctr(*argv: StrPath) -> str:
            return run("ctr-remote", "--address", socket, "--namespace", "ocifuse", *argv)

        yield ctr
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def busybox() -> Path:
    """The installed (static) busybox."""
    found = shutil.which("busybox")
    assert found is not None
    return Path(found)
