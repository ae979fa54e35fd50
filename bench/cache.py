"""Bench: the index cache shared by many mounts at once, and held to its bound (issue 18).

What it does:

1. Builds a ``.tar.gz`` oci-archive of ``--mib`` MiB (bench/compressed.py's semi-compressible
   blobs, ``pigz``), then, the compressed file in the page cache:
   - one first mount alone (``mount -f``, a fresh cache): the bytes its daemon read
     (``rchar`` of ``/proc/PID/io``: the gzip pass, the table's scan, the key's hash, the entries);
   - ``--mounts`` (default 8) first mounts of the same archive started at once on one fresh
     cache: all live, every blob hashed through every mount equal to its name, and the sum of
     their daemons' ``rchar`` against the one mount's: the decompression is done about once.
2. Builds ``--archives`` (default 20) zstd oci-archives, each one frame of ``--spill-mib``
   (default 154) MiB decompressed, so each is kept as a spill file; mounts them one after the other
   on one cache bounded by ``--bound-mib`` (default 1024) MiB, recording the directory's total
   after each; then remounts the last one and checks that it comes from the cache (no file of the
   directory written again).
3. Writes the results between the ``cache`` markers of ``bench/results.md`` (others kept).

Run as root: ``.venv/bin/python -m bench.cache [--quick] [--no-write]`` (``--quick``: 64 MiB,
20 archives of 12 MiB under a 80 MiB bound: under two minutes). No timing here is a test assertion.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyzstd

from bench.common import MIB, OCIFUSE, logger, warm
from bench.compressed import build
from bench.sections import met, module_main, round_options, stamp, with_table

log = logger("cache bench")
LIVE_TIMEOUT = 600.0


def rchar(pid: int) -> int:
    """Bytes process ``pid`` read through read(2)/pread(2) so far (proc(5))."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no rchar for {pid}")


class Daemons:
    """``ocifuse mount -f`` processes started at once (the index is built before any fork)."""

    def __init__(self, archive: Path, mountpoints: list[Path], cache: Path, *options: str) -> None:
        self.mountpoints = mountpoints
        self.logs = [tempfile.TemporaryFile() for _ in mountpoints]  # noqa: SIM115
        self.procs: list[subprocess.Popen[bytes]] = []
        for mnt, err in zip(mountpoints, self.logs, strict=True):
            mnt.mkdir(exist_ok=True)
            argv = [str(OCIFUSE), "mount", "-f", "-o", f"cache={cache}", *options, str(archive), str(mnt)]
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err))

    def wait_live(self) -> float:
        """Seconds until every mount is live; RuntimeError (with the daemon's log) if one exits."""
        start = time.perf_counter()
        deadline = time.monotonic() + LIVE_TIMEOUT
        while not all(os.path.ismount(m) for m in self.mountpoints):
            for p, err in zip(self.procs, self.logs, strict=True):
                if p.poll() is not None:
                    err.seek(0)
                    raise RuntimeError(f"a daemon exited {p.returncode}: {err.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("mounts not live in time")
            time.sleep(0.02)
        return time.perf_counter() - start

    def stop(self) -> None:
        """Unmount every mount and wait for its daemon (killed if it lingers)."""
        for mnt in self.mountpoints:
            if os.path.ismount(mnt):
                done = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
                if done.returncode != 0:
                    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for err in self.logs:
            err.close()


def blobs_right(mnt: Path) -> bool:
    """Every blob read through the mount hashes to its name."""
    for path in (mnt / "blobs" / "sha256").iterdir():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 * MIB):
                h.update(chunk)
        if h.hexdigest() != path.name:
            return False
    return True


def concurrent_mounts(scratch: Path, mib: int, mounts: int) -> dict[str, float]:
    """One first mount alone, then ``mounts`` at once on one cache: their reads and their bytes."""
    archive, _ = build(scratch, mib, min(mib, 500), "shared")
    warm(archive)
    out: dict[str, float] = {"gz_bytes": archive.stat().st_size}
    alone = Daemons(archive, [scratch / "alone"], scratch / "cache-alone")
    try:
        out["one_live_s"] = alone.wait_live()
        out["one_rchar"] = rchar(alone.procs[0].pid)
    finally:
        alone.stop()
    many = Daemons(archive, [scratch / f"m{i}" for i in range(mounts)], scratch / "cache-shared")
    try:
        out["all_live_s"] = many.wait_live()
        out["all_rchar"] = sum(rchar(p.pid) for p in many.procs)
        out["all_alive"] = float(all(p.poll() is None for p in many.procs))
        out["all_right"] = float(all(blobs_right(m) for m in many.mountpoints))
    finally:
        many.stop()
    return out


def dir_total(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def zstd_archive(path: Path, spill_mib: int, seed: int) -> None:
    """An oci-archive of one layer of ``spill_mib`` MiB of compressible text, zstd-compressed as one frame."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)]
    text = b" ".join(rng.choices(words, k=200_000))
    layer = (text * (spill_mib * MIB // len(text) + 1))[: spill_mib * MIB]
    layout = path.with_suffix(".layout")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    digest = hashlib.sha256(layer).hexdigest()
    (blobs / digest).write_bytes(layer)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    tar = path.with_suffix(".tar")
    subprocess.run(["tar", "-cf", str(tar), "-C", str(layout), "."], check=True)
    path.write_bytes(pyzstd.compress(tar.read_bytes()))  # one frame of the whole tar
    tar.unlink()
    subprocess.run(["rm", "-rf", str(layout)], check=True)


def eviction(scratch: Path, archives: int, spill_mib: int, bound_mib: int) -> dict[str, float]:
    """Mount ``archives`` zstd archives in turn under one bounded cache; then remount the last."""
    cache = scratch / "cache-bounded"
    paths = []
    for i in range(archives):
        path = scratch / f"z{i}.tar.zst"
        zstd_archive(path, spill_mib, i)
        paths.append(path)
    worst = 0
    largest_key = 0
    for i, path in enumerate(paths):
        d = Daemons(path, [scratch / "zm"], cache, "-o", f"cache_max={bound_mib}M")
        try:
            d.wait_live()
        finally:
            d.stop()
        total = dir_total(cache)
        worst = max(worst, total)
        spills = [p.stat().st_size for p in cache.iterdir() if p.name.startswith("spill.")]
        largest_key = max(largest_key, *spills)
        log(f"archive {i + 1}/{archives}: cache {total / MIB:.0f} MiB")
    before = snapshot(cache)
    again = Daemons(paths[-1], [scratch / "zm"], cache, "-o", f"cache_max={bound_mib}M")
    try:
        remount_s = again.wait_live()
        remount_rchar = rchar(again.procs[0].pid)
    finally:
        again.stop()
    return {
        "worst": worst,
        "largest_key": largest_key,
        "total_built": archives * spill_mib * MIB,
        "remount_s": remount_s,
        "remount_rchar": remount_rchar,
        "from_cache": float(snapshot(cache) == before),
    }


def report(c: dict[str, float], e: dict[str, float], args: argparse.Namespace) -> str:
    """The markdown section."""
    ratio = c["all_rchar"] / c["one_rchar"]
    bound = args.bound_mib * MIB
    within = e["worst"] <= bound + e["largest_key"] + 64 * 1024  # + the key's small entries
    right = bool(c["all_alive"] and c["all_right"])
    rows = [
        (f"{args.mounts} first mounts at once, one cache: bytes read (rchar, summed)",
         f"{c['all_rchar'] / MIB:.0f} MiB", f"one first mount alone {c['one_rchar'] / MIB:.0f} MiB",
         f"{ratio:.2f}x", "<= 2x", met(ratio <= 2)),
        (f"{args.mounts} first mounts at once: all live, every blob right",
         "yes" if right else "**no**", "", "", "all", met(right)),
        (f"{args.mounts} first mounts at once: until all live", f"{c['all_live_s']:.2f} s",
         f"one alone {c['one_live_s']:.2f} s", f"{c['all_live_s'] / c['one_live_s']:.2f}x", "", ""),
        (f"cache bounded at {args.bound_mib} MiB after {args.archives} archives of {args.spill_mib} MiB "
         f"spills ({e['total_built'] / MIB:.0f} MiB built)", f"at most {e['worst'] / MIB:.0f} MiB",
         f"bound + one entry {(bound + e['largest_key']) / MIB:.0f} MiB", "", "<= bound + one entry",
         met(within)),
        ("the last archive remounted", "from the cache" if e["from_cache"] else "**rebuilt**",
         f"{e['remount_s']:.2f} s, read {e['remount_rchar'] / MIB:.1f} MiB", "", "from the cache",
         met(bool(e["from_cache"]))),
    ]  # fmt: skip
    head = (
        f"A `.tar.gz` oci-archive of {args.mib} MiB (`pigz` to {c['gz_bytes'] / MIB:.0f} MiB), in the page "
        f"cache; {args.archives} zstd archives of one {args.spill_mib} MiB frame each; {stamp()}."
    )
    return with_table(head, rows)


def bench(args: argparse.Namespace, scratch: Path) -> str:
    """Measure both and return the section's markdown."""
    if args.quick:
        args.mib, args.spill_mib, args.bound_mib = 64, 12, 80
    log(f"{args.mounts} first mounts of one {args.mib} MiB .tar.gz")
    c = concurrent_mounts(scratch, args.mib, args.mounts)
    log(f"{args.archives} archives under a {args.bound_mib} MiB bound")
    e = eviction(scratch, args.archives, args.spill_mib, args.bound_mib)
    return report(c, e, args)


def main() -> int:
    """``python -m bench.cache [--quick] [--mib M] [--mounts N] [--archives A] [--spill-mib S] ...``."""
    p = argparse.ArgumentParser(description="the index cache shared and bounded (see bench/README.md)")
    p.add_argument("--mib", type=int, default=1024, help="uncompressed MiB of the .tar.gz mounted at once")
    p.add_argument("--mounts", type=int, default=8, help="first mounts started at once")
    p.add_argument("--archives", type=int, default=20, help="zstd archives mounted in turn")
    p.add_argument("--spill-mib", type=int, default=154, help="MiB of each one's spill file")
    p.add_argument("--bound-mib", type=int, default=1024, help="the cache's bound (cache_max)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run under two minutes")
    round_options(p, reads="(unused)")
    title = "the index cache, shared and bounded"
    return module_main(p, bench, section="cache", title=title, why="FUSE mounts")


if __name__ == "__main__":
    sys.exit(main())
