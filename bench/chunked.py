"""Bench: a zstd:chunked image mounted from its TOCs, against its gzip twin (``umoci unpack``, ocifuse).

What it does:

1. Builds, in a scratch directory, an image of three layers with buildah in a store of its own
   (``buildah from scratch``, ``buildah mount``, files written, ``buildah commit`` per layer; the
   files and the layers' shape are bench/rootfs.py's: ``--files`` files, ``--mib`` MiB, layer 3
   deleting some of layer 1), and pushes it twice with podman: ``--compression-format
   zstd:chunked`` and ``--compression-format gzip`` (OCI layouts, then ``tar -cf`` of each).
   skopeo/podman here hang converting a gzip image to zstd:chunked, hence the buildah store.
2. Times, ``--runs`` interleaved rounds (medians), the page cache warm (archives read once first):
   - a small file's first byte: after ``umoci unpack`` of the gzip twin (from nothing); after a
     first ``--rootfs`` mount of the gzip twin (empty index cache); after a first ``--rootfs`` mount
     of the zstd:chunked image (empty index cache: every layer from its TOC);
   - what the zstd:chunked mount read before it was live: the daemon's ``rchar`` (/proc/PID/io,
     ``ocifuse mount -f``) less that of a layout-view mount of the same archive (the process's own
     start: Python and its modules), as a share of the layers' compressed bytes;
   - reading every file (``tar -cf - -C MNT . | wc -c``) of a first zstd:chunked mount (each file
     decompressed from its frames and checked against its digest on that first read) vs ``umoci
     unpack`` of the gzip twin.
3. Writes the results between the ``chunked`` markers of ``bench/results.md`` (other sections kept).

Run as root: ``.venv/bin/python -m bench.chunked [--files N] [--mib M] [--runs R] [--quick] [--no-write]``.
No timing here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import MIB, OCIFUSE, logger, run, unmount, warm
from bench.rootfs import _sizes, _write_files, first_byte, read_all
from bench.sections import Samples, met, module_main, round_options, stamp, with_table

log = logger("chunked bench")
LIVE_TIMEOUT = 600  # seconds a first mount may take to go live


# -- the image ------------------------------------------------------------------------------------


class _Store:
    """A buildah/podman store of the bench's own (vfs), never the machine's."""

    def __init__(self, root: Path) -> None:
        self.runroot = Path(tempfile.mkdtemp(prefix="ocifuse-bench-run-"))  # podman wants it short
        self.flags = ["--root", str(root / "store"), "--runroot", str(self.runroot)]
        self.flags += ["--storage-driver", "vfs"]
        home = root / "home"
        dirs = {"XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data")}
        self.env = {**os.environ, **dirs}

    def out(self, tool: str, *argv: str | Path) -> str:
        extra = ["--cgroup-manager", "cgroupfs", "--events-backend", "none"] if tool == "podman" else []
        cmd = [tool, *self.flags, *extra, *(str(a) for a in argv)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}")
        return done.stdout.strip()

    def close(self) -> None:
        for tool, argv in (("buildah", ["rm", "--all"]), ("podman", ["system", "reset", "-f"])):
            subprocess.run([tool, *self.flags, *argv], capture_output=True, env=self.env, check=False)
        shutil.rmtree(self.runroot, ignore_errors=True)


def build_image(scratch: Path, files: int, mib: int) -> tuple[Path, Path, Path, int]:
    """The gzip twin's layout, its archive, the zstd:chunked archive (tag ``bench``) and the
    compressed bytes of its layers."""
    rng = random.Random(42)
    names = [f"usr/share/d{i % 97:02d}/s{i % 13}/file{i:06d}.dat" for i in range(files)]
    sizes = dict(zip(names, _sizes(rng, files, mib * MIB), strict=True))
    rng.shuffle(names)
    a, b = int(files * 0.6), int(files * 0.9)
    store = _Store(scratch)
    try:
        image = "scratch"
        for i, (write, delete) in enumerate(
            [(names[:a], []), (names[a:b] + names[: a // 10], []), (names[b:], names[a // 10 : a // 5])]
        ):
            ctr = store.out("buildah", "from", image)
            rootfs = Path(store.out("buildah", "mount", ctr))
            _write_files(rootfs, write, sizes, rng)
            for name in delete:  # whiteouts in the last layer
                (rootfs / name).unlink()
            image = f"l{i + 1}"
            store.out("buildah", "commit", "-q", ctr, image)
            store.out("buildah", "rm", ctr)
        gzip, chunked = scratch / "gz", scratch / "zc"
        store.out("podman", "push", "-q", "--compression-format", "gzip", image, f"oci:{gzip}:bench")
        zc = "zstd:chunked"
        store.out("podman", "push", "-q", "--compression-format", zc, image, f"oci:{chunked}:bench")
    finally:
        store.close()
    for layout in (gzip, chunked):
        run("tar", "-cf", layout.with_suffix(".tar"), "-C", layout, ".")
    layers = layer_bytes(chunked)
    shutil.rmtree(chunked)
    return gzip, gzip.with_suffix(".tar"), chunked.with_suffix(".tar"), layers


def layer_bytes(layout: Path) -> int:
    """The compressed bytes of the image's layers (its one manifest's)."""
    index = json.loads((layout / "index.json").read_bytes())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    return sum(int(layer["size"]) for layer in manifest["layers"])


# -- mounts ----------------------------------------------------------------------------------------


def rchar(pid: int) -> int:
    """The bytes process ``pid`` has read with read(2)/pread(2) so far (/proc/PID/io): its modules too."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no rchar for {pid}")


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used so far, user and system (/proc/PID/stat fields 14, 15):
    what a first mount costs whatever else the machine runs, where its wall time is also the load's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def archive_reads(trace: Path) -> int:
    """The bytes ``strace -P ARCHIVE`` saw read from the archive (read, pread64: what they returned)."""
    total = 0
    for line in trace.read_text().splitlines():
        if ("read(" in line or "pread64(" in line) and "= " in line:
            value = line.rsplit("= ", 1)[1].split()[0]
            total += int(value) if value.isdigit() else 0
    return total


@contextlib.contextmanager
def foreground(
    archive: Path, mnt: Path, *args: str, trace: Path | None = None
) -> Iterator[tuple[float, int]]:
    """``ocifuse mount -f ARGS ARCHIVE MNT`` until live: the seconds it took and the daemon's pid
    (the process started: /proc/PID/io counts all it read). ``trace``: run under ``strace -P
    ARCHIVE -o TRACE`` (the reads of the archive file only; not for timing). Always unmounted."""
    mnt.mkdir(exist_ok=True)
    start = time.perf_counter()
    strace = (
        []
        if trace is None
        else ["strace", "-f", "-e", "trace=read,pread64", "-P", str(archive), "-o", str(trace)]
    )
    proc = subprocess.Popen(
        [*strace, str(OCIFUSE), "mount", "-f", *args, str(archive), str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                raise RuntimeError(f"ocifuse mount {archive} exited {proc.returncode} before it was live")
            if time.perf_counter() - start > LIVE_TIMEOUT:
                raise RuntimeError(f"ocifuse mount {archive}: not live after {LIVE_TIMEOUT} s")
            time.sleep(0.002)
        yield time.perf_counter() - start, proc.pid
    finally:
        unmount(mnt, proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def unpack(layout: Path, dest: Path) -> float:
    """``umoci unpack`` into ``dest`` (removed first); seconds."""
    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    run("umoci", "unpack", "--image", f"{layout}:bench", dest)
    return time.perf_counter() - start


# -- the run ---------------------------------------------------------------------------------------


def measure(gzip_layout: Path, gzip: Path, chunked: Path, scratch: Path, runs: int) -> dict[str, list[float]]:
    """Every measurement, ``runs`` interleaved rounds."""
    s = Samples()
    add = s.add
    warm(gzip)
    warm(chunked)
    mnt, dest = scratch / "mnt", scratch / "unpacked"
    small = None
    for r in range(runs):
        log(f"round {r + 1}/{runs}")
        took = unpack(gzip_layout, dest)
        add("unpack", took)
        if small is None:
            small = min((p for p in (dest / "rootfs").rglob("*.dat")), key=lambda p: p.stat().st_size)
            small = small.relative_to(dest / "rootfs")
        add("unpack_first_byte", took + first_byte(dest / "rootfs" / small))
        shutil.rmtree(dest)
        cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
        with foreground(gzip, mnt, "--rootfs", "-o", f"cache={cache}") as (took, _):
            add("gzip_first_byte", took + first_byte(mnt / small))
        shutil.rmtree(cache)
        cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
        with foreground(chunked, mnt, "--rootfs", "-o", f"cache={cache}") as (took, pid):
            add("chunked_rchar", rchar(pid))
            add("chunked_cpu", cpu_seconds(pid))
            add("chunked_live", took)
            add("chunked_first_byte", took + first_byte(mnt / small))
        shutil.rmtree(cache)
        if r == 0 and shutil.which("strace") is not None:  # the archive's bytes read before live (untimed)
            trace = scratch / "trace"
            with foreground(chunked, mnt, "--rootfs", "-o", "nocache", trace=trace):
                add("chunked_archive_read", archive_reads(trace))
        cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
        with foreground(chunked, mnt, "--rootfs", "-o", f"cache={cache}"):
            seconds, nbytes = read_all(mnt)
            add("read_all", seconds)
            add("read_all_bytes", nbytes)
        shutil.rmtree(cache)
    return s.values


def report(s: dict[str, list[float]], layers: int, files: int, mib: int, runs: int) -> str:
    """The markdown section."""
    med = {k: statistics.median(v) for k, v in s.items()}
    vs_unpack = med["unpack_first_byte"] / med["chunked_first_byte"]
    vs_gzip = med["gzip_first_byte"] / med["chunked_first_byte"]
    read = med.get("chunked_archive_read", -1.0)  # -1: strace is not installed
    share = read / layers
    read_ratio = med["read_all"] / med["unpack"]
    first = f"{med['chunked_first_byte']:.3f} s"
    rows = [
        ("a small file's first byte, first mount", first,
         f"umoci unpack of the gzip twin {med['unpack_first_byte']:.2f} s", f"{vs_unpack:.1f}x sooner",
         ">= 10x", met(vs_unpack >= 10)),
        ("a small file's first byte, first mount", first,
         f"ocifuse, first mount of the gzip twin {med['gzip_first_byte']:.2f} s", f"{vs_gzip:.1f}x sooner",
         ">= 10x", met(vs_gzip >= 10)),
        ("archive bytes read before live (strace -P)",
         f"{read / MIB:.2f} MiB" if read >= 0 else "n/a (no strace)", f"layers {layers / MIB:.0f} MiB",
         f"{share:.2%}" if read >= 0 else "", "<= 5%", met(0 <= share <= 0.05)),
        ("all bytes the daemon read before live (rchar: its modules too)",
         f"{med['chunked_rchar'] / MIB:.1f} MiB", "", "", "", ""),
        ("the daemon's CPU time until live (user + system)", f"{med['chunked_cpu']:.2f} s", "", "", "", ""),
        ("every file read (`tar -cf - \\| wc -c`), first mount", f"{med['read_all']:.2f} s",
         f"umoci unpack of the gzip twin {med['unpack']:.2f} s", f"{read_ratio:.2f}x", "<= 1.5x",
         met(read_ratio <= 1.5)),
    ]  # fmt: skip
    head = (
        f"Image: 3 layers by buildah, pushed by podman as zstd:chunked and as gzip, {files} files, "
        f"{mib} MiB uncompressed ({int(med['read_all_bytes']) // MIB} MiB as tar); live after "
        f"{med['chunked_live']:.3f} s; {runs} rounds, medians; page cache warm; {stamp()}."
    )
    return with_table(head, rows)


def bench(args: argparse.Namespace, scratch: Path) -> str:
    """Build the images in ``scratch``, measure, and return the section's markdown."""
    files, mib, runs = (2000, 64, 1) if args.quick else (args.files, args.mib, args.runs)
    log(f"building the image: {files} files, {mib} MiB")
    gzip_layout, gzip, chunked, layers = build_image(scratch, files, mib)
    os.sync()  # the build's writes (the store, the layouts) flushed now, not during the first round
    log(f"archives: gzip {gzip.stat().st_size // MIB} MiB, zstd:chunked {chunked.stat().st_size // MIB} MiB")
    return report(measure(gzip_layout, gzip, chunked, scratch, runs), layers, files, mib, runs)


def main() -> int:
    """``python -m bench.chunked [--files N] [--mib M] [--runs R] [--quick] [--no-write]``."""
    p = argparse.ArgumentParser(description="ocifuse on zstd:chunked vs its gzip twin (bench/README.md)")
    p.add_argument("--files", type=int, default=30_000, help="files in the image")
    p.add_argument("--mib", type=int, default=1024, help="uncompressed MiB in the image")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2,000 files, 64 MiB, one round")
    round_options(p, reads="unused")
    why = "buildah and umoci unpack as root, FUSE mounts"
    return module_main(p, bench, section="chunked", title="zstd:chunked from the TOC", why=why)


if __name__ == "__main__":
    sys.exit(main())
