"""Bench: a gzip-compressed oci-archive (``.tar.gz``) mounted in place, against decompressing it.

What it does:

1. Builds, in a scratch directory, an OCI layout of ``--mib`` MiB (default 1024) of
   semi-compressible blobs (random words, a random run now and then: ``gzip`` gets ~2:1): one blob of
   ``--blob-mib`` MiB (default 500) and the rest in 64 MiB blobs, under one image manifest; then
   ``tar -cf`` of it, compressed by ``pigz`` (one gzip member, as ``gzip`` would write it).
2. Times, ``--runs`` rounds interleaved (medians reported), the compressed file in the page cache:
   - ``gzip -dc ARCHIVE > /dev/null`` (the floor of any tool that decompresses it once);
   - the first ``ocifuse mount`` until live, the index cache empty (``-o cache=`` a fresh
     directory): one pass decompresses, indexes, hashes and scans the archive;
   - ``skopeo inspect oci-archive:ARCHIVE`` (skopeo decompresses and extracts it first);
   - the second mount until live (index and table cached), for this archive and for one 1/8 its
     size (the time must not grow with the size);
   - ``cat`` of the big blob through a fresh second mount: throughput against ``gzip -dc``'s;
   - ``--reads`` random 64 KiB preads inside the big blob (page cache of the mount dropped
     before each): p50 and p99;
   - the index cache's size on disk against the uncompressed size; the daemon's VmHWM at the end.
3. Also times rapidgzip's index build alone with parallelization=1 and 2 (the choice in
   ocifuse/compressed.py) on the same file.
4. Writes the results between the ``compressed`` markers of ``bench/results.md`` (others kept).

Run as root: ``.venv/bin/python -m bench.compressed [--mib M] [--blob-mib B] [--runs R] [--no-write]``.
No timing here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import MIB, PYTHON, cat, cold_pread, logger, mounted, run, status_kib, timed, warm
from bench.sections import Samples, met, module_main, round_options, stamp, with_table

TAG = "bench"
log = logger("compressed bench")


# -- the archive ----------------------------------------------------------------------------------


def _semi(rng: random.Random, size: int) -> bytes:
    """Text of random words with a random run now and then: gzip gets ~2:1, decodes at ~130 MB/s.

    (Long incompressible runs would make gzip's stored blocks, which decode at memcpy speed, and
    long repeats would make its matches trivial: neither is what a layer of files looks like.)
    """
    letters = b"abcdefghijklmnopqrstuvwxyz0123456789_/."
    words = [bytes(rng.choices(letters, k=rng.randint(3, 12))) for _ in range(5000)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.1:
            out += rng.randbytes(4096)
        else:
            out += b" ".join(rng.choices(words, k=2000)) + b"\n"
    return bytes(out[:size])


def build(scratch: Path, mib: int, blob_mib: int, name: str) -> tuple[Path, str]:
    """An oci-archive .tar.gz of ``mib`` MiB: the path and the big blob's layout path."""
    rng = random.Random(mib)
    layout = scratch / f"{name}-layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer = "application/vnd.oci.image.layer.v1.tar"
    sizes = [min(blob_mib, mib) * MIB]
    rest = mib * MIB - sizes[0]
    while rest > 0:
        sizes.append(min(64 * MIB, rest))
        rest -= sizes[-1]
    layers = [blob(_semi(rng, size), layer) for size in sizes]
    config = blob(
        json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode(),
        "application/vnd.oci.image.config.v1+json",
    )
    manifest = blob(
        json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": config, "layers": layers}
        ).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )  # fmt: skip
    manifest["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    tar = scratch / f"{name}.tar"
    run("tar", "-cf", tar, "-C", layout, ".")
    shutil.rmtree(layout)
    archive = scratch / f"{name}.tar.gz"
    with open(archive, "wb") as out:
        subprocess.run(["pigz", "-c", "-p", "2", str(tar)], stdout=out, check=True)
    tar.unlink()
    big = str(layers[0]["digest"]).replace(":", "/")
    return archive, f"blobs/{big}"


# -- mounts ---------------------------------------------------------------------------------------


def random_reads(path: Path, count: int, rng: random.Random) -> list[float]:
    """Latencies of ``count`` 64 KiB preads at random offsets of ``path`` (its page cache dropped)."""
    size = path.stat().st_size
    return [cold_pread(path, 65536, rng.randrange(0, size - 65536)) for _ in range(count)]


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


_PARALLEL = """
import sys, time, rapidgzip
from ocifuse.gzipsource import GZIP_CHUNK
for p in (1, 2):
    start = time.perf_counter()
    with open(sys.argv[1], "rb") as f:
        g = rapidgzip.RapidgzipFile(f, parallelization=p, chunk_size=GZIP_CHUNK)
        while g.read(1 << 20):
            pass
        g.close()
    print(p, time.perf_counter() - start)
"""


def index_build(archive: Path) -> dict[int, float]:
    """Seconds rapidgzip takes to read (and index) ``archive`` with parallelization 1 and 2."""
    done = subprocess.run(
        [str(PYTHON), "-c", _PARALLEL, str(archive)], capture_output=True, text=True, check=True
    )
    return {int(p): float(t) for p, t in (line.split() for line in done.stdout.splitlines())}


# -- the run --------------------------------------------------------------------------------------


def measure(
    archive: Path, small: Path, big_blob: str, scratch: Path, runs: int, reads: int, mib: int
) -> dict[str, list[float]]:
    """Every sample, by measurement."""
    s = Samples()
    add = s.add
    mnt = scratch / "mnt"
    warm(archive)  # the compressed file in the page cache: the work is measured, not the disk
    for r in range(runs):
        log(f"round {r + 1}/{runs}")
        add("gzip_dc", timed("gzip", "-dc", archive))
        cache = scratch / f"cache-{r}"
        with mounted(archive, mnt, "-o", f"cache={cache}") as (took, _):
            add("first_mount", took)
        add("cache_bytes", dir_bytes(cache))
        add("skopeo_inspect", timed("skopeo", "inspect", f"oci-archive:{archive}:{TAG}"))
        with mounted(archive, mnt, "-o", f"cache={cache}") as (took, pid):
            add("second_mount", took)
            add("cat_blob", cat(mnt / big_blob))
            add("blob_bytes", (mnt / big_blob).stat().st_size)
            lat = random_reads(mnt / big_blob, reads, random.Random(r))
            add("read64k_p50_ms", statistics.median(lat) * 1000)
            add("read64k_p99_ms", statistics.quantiles(lat, n=100)[98] * 1000)
            add("hwm_mib", status_kib(pid, "VmHWM") / 1024)
        small_cache = scratch / f"cache-small-{r}"
        with mounted(small, mnt, "-o", f"cache={small_cache}"):
            pass
        with mounted(small, mnt, "-o", f"cache={small_cache}") as (took, _):
            add("second_mount_small", took)
        shutil.rmtree(cache)
        shutil.rmtree(small_cache)
        for p, t in index_build(archive).items():
            add(f"rapidgzip_p{p}", t)
    return s.values


def report(s: dict[str, list[float]], mib: int, blob_mib: int, small_mib: int, runs: int, gz: int) -> str:
    """The markdown section."""
    med = {k: statistics.median(v) for k, v in s.items()}
    uncompressed = mib * MIB
    gzip_rate = uncompressed / med["gzip_dc"] / MIB
    cat_rate = med["blob_bytes"] / med["cat_blob"] / MIB
    first = med["first_mount"] / med["gzip_dc"]
    skopeo = med["skopeo_inspect"] / med["first_mount"]
    cache_pct = med["cache_bytes"] / uncompressed * 100
    p50, p99 = med["read64k_p50_ms"], med["read64k_p99_ms"]
    p1, p2 = med["rapidgzip_p1"], med["rapidgzip_p2"]
    rows = [
        ("first mount until live", f"{med['first_mount']:.2f} s", f"`gzip -dc` {med['gzip_dc']:.2f} s",
         f"{first:.2f}x", "<= 0.7x", met(first <= 0.7)),
        ("first mount until live", f"{med['first_mount']:.2f} s",
         f"`skopeo inspect oci-archive:` {med['skopeo_inspect']:.2f} s", f"{skopeo:.1f}x sooner", ">= 2x",
         met(skopeo >= 2)),
        ("second mount (index cached)", f"{med['second_mount']:.2f} s",
         f"{small_mib} MiB archive: {med['second_mount_small']:.2f} s", "", "<= 0.5 s, size-independent",
         met(med["second_mount"] <= 0.5)),
        (f"`cat` of the {blob_mib} MB blob", f"{cat_rate:.0f} MiB/s", f"`gzip -dc` {gzip_rate:.0f} MiB/s",
         f"{cat_rate / gzip_rate:.2f}x", ">= 1.5x", met(cat_rate / gzip_rate >= 1.5)),
        ("random 64 KiB reads in the blob", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", "", "", "p99 <= 15 ms",
         met(p99 <= 15)),
        ("index cache (gzip index + table)", f"{med['cache_bytes'] / MIB:.1f} MiB",
         f"{mib} MiB uncompressed", f"{cache_pct:.2f}%", "<= 3%", met(cache_pct <= 3)),
        ("daemon peak RSS (VmHWM)", f"{med['hwm_mib']:.0f} MB", "", "", "<= 150 MB",
         met(med["hwm_mib"] <= 150)),
        ("rapidgzip index build, parallelization=1", f"{p1:.2f} s", f"parallelization=2: {p2:.2f} s",
         f"{p2 / p1:.2f}x", "(the choice)", ""),
    ]  # fmt: skip
    head = (
        f"Archive: an oci-archive of {mib} MiB of semi-compressible blobs (one of {blob_mib} MiB), "
        f"`pigz` to {gz // MIB} MiB; {runs} rounds, medians; compressed file in the page cache; {stamp()}."
    )
    return with_table(head, rows)


def bench(args: argparse.Namespace, scratch: Path) -> str:
    """Build both archives in ``scratch``, measure, and return the section's markdown."""
    small_mib = max(args.mib // 8, 8)
    log(f"building the archives: {args.mib} MiB and {small_mib} MiB")
    archive, big = build(scratch, args.mib, args.blob_mib, "big")
    small, _ = build(scratch, small_mib, min(args.blob_mib, small_mib), "small")
    gz = archive.stat().st_size
    log(f"archive: {gz // MIB} MiB compressed")
    samples = measure(archive, small, big, scratch, args.runs, args.reads, args.mib)
    return report(samples, args.mib, args.blob_mib, small_mib, args.runs, gz)


def main() -> int:
    """``python -m bench.compressed [--mib M] [--blob-mib B] [--runs R] [--reads N] [--no-write]``."""
    p = argparse.ArgumentParser(description="a .tar.gz oci-archive mounted in place (see bench/README.md)")
    p.add_argument("--mib", type=int, default=1024, help="uncompressed MiB in the archive")
    p.add_argument("--blob-mib", type=int, default=500, help="MiB of the big blob (read whole and at random)")
    round_options(p, reads="random 64 KiB reads")
    why = "FUSE mounts, page-cache control"
    return module_main(p, bench, section="compressed", title="compressed archives", why=why)


if __name__ == "__main__":
    sys.exit(main())
