"""Bench: ``ocifuse mount --rootfs`` against ``umoci unpack`` of the same multi-layer gzip image.

What it does:

1. Builds, in a scratch directory, a umoci image of three gzip layers made by ``umoci repack``
   (``--files`` files, ``--mib`` MiB uncompressed in all at full size: 30,000 files, ~1 GiB; half of
   each file random, half text, so gzip has work to do): layer 1 adds 60% of the files, layer 2
   adds 30% and rewrites some, layer 3 adds the rest and deletes some. ``skopeo copy`` makes the
   oci-archive the mount reads (its gzip layers as umoci wrote them).
2. Times, ``--runs`` rounds (interleaved, medians reported), the page cache warm (the archive read
   once first: the comparison is of the work, not of the disk):
   - ``umoci unpack`` of the image into a fresh directory (as root);
   - the first ``--rootfs`` mount until live, with an empty index cache (``-o cache=DIR`` of a
     fresh directory: every layer decompressed once, indexed, hashed for its diff_id, scanned);
   - the decompression floor: ``rapidgzip -d -P N -c LAYER`` of every layer, the layers run as the
     mount runs them (largest first, as many at once, each on the threads the mount gives it:
     ocifuse.streams.split_cpus), and also each on one thread; the faster is the floor;
   - the CPU (user + sys) of the first mount (the ``ocifuse mount`` process: a local archive's
     passes run before the daemon forks) and of the floor: a mount whose wall is its CPU spread on
     every CPU is CPU-bound, and only less work makes it sooner;
   - the second mount until live (the index cache filled by the first);
   - a small file's first byte: after a first mount, and after a mount with the index cached, vs
     after ``umoci unpack`` (from nothing);
   - reading every file: ``tar -cf - -C MNT . | wc -c`` on a fresh first-mounted tree (index cached)
     vs ``umoci unpack`` alone (GNU tar skips reading files when its archive is /dev/null);
   - ``--reads`` random 4 KiB reads inside files of the gzip layers (p50, p99);
   - the daemon's largest RSS during the whole-tree read;
   - a one-layer twin (the same files in one gzip layer): its first mount as the mount chooses,
     with the pass decoding on every CPU (``bench/variant.py parallel-pass``), and with no
     read-ahead thread (``no-read-ahead``), against ``rapidgzip -d -P 1`` and ``-P N`` of the
     layer: whether a layer's own parallel decoding wins, and what overlapping the hash and the
     tar scan with the decompression buys.
3. Writes the results between the ``rootfs`` markers of ``bench/results.md`` (other sections kept).

Run as root: ``.venv/bin/python -m bench.rootfs [--files N] [--mib M] [--runs R] [--no-write] [--quick]``.
No timing here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    MIB,
    OCIFUSE,
    PYTHON,
    REPO,
    PeakRss,
    cold_pread,
    logger,
    mounted,
    piped_count,
    run,
    timed,
    warm,
)
from bench.sections import Samples, met, module_main, round_options, stamp, with_table
from ocifuse.image import MAX_PARALLEL_LAYERS
from ocifuse.streams import available_cpus, pass_order, split_cpus

log = logger("rootfs bench")


# -- the image ------------------------------------------------------------------------------------


def _content(rng: random.Random, size: int) -> bytes:
    """Half random bytes, half repetitive text: gzip gets about 2:1, as on real root filesystems."""
    half = size // 2
    text = (b"the quick brown fox jumps over the lazy dog %d\n" % rng.randrange(1000)) * (
        (size - half) // 40 + 1
    )
    return rng.randbytes(half) + text[: size - half]


def _sizes(rng: random.Random, files: int, total: int) -> list[int]:
    """File sizes: most small (1-32 KiB), 1% large, adding up to about ``total`` bytes."""
    large = max(1, files // 100)
    small = [rng.randrange(1024, 32 * 1024) for _ in range(files - large)]
    rest = max(total - sum(small), large * 64 * 1024)
    return small + [rest // large] * large


def _write_files(rootfs: Path, names: list[str], sizes: dict[str, int], rng: random.Random) -> None:
    for name in names:
        path = rootfs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(rng, sizes[name]))


def build_image(scratch: Path, files: int, mib: int) -> tuple[Path, Path]:
    """The umoci layout (tag ``bench``) and skopeo's oci-archive of it; both with gzip layers."""
    rng = random.Random(42)
    names = [f"usr/share/d{i % 97:02d}/s{i % 13}/file{i:06d}.dat" for i in range(files)]
    sizes = dict(zip(names, _sizes(rng, files, mib * MIB), strict=True))
    rng.shuffle(names)
    a, b = int(files * 0.6), int(files * 0.9)
    layout, bundle = scratch / "umoci", scratch / "bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "unpack", "--image", f"{layout}:base", bundle)
    rootfs = bundle / "rootfs"
    _write_files(rootfs, names[:a], sizes, rng)
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:l1", bundle)
    _write_files(rootfs, names[a:b] + names[: a // 10], sizes, rng)  # adds, and rewrites 6% of layer 1
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:l2", bundle)
    _write_files(rootfs, names[b:], sizes, rng)
    for name in names[a // 10 : a // 5]:  # deletes 6% of layer 1: whiteouts
        (rootfs / name).unlink()
    run("umoci", "repack", "--image", f"{layout}:bench", bundle)
    shutil.rmtree(bundle)
    archive = scratch / "image.tar"
    run("skopeo", "copy", "--quiet", f"oci:{layout}:bench", f"oci-archive:{archive}:bench")
    return layout, archive


def build_one_layer(scratch: Path, files: int, mib: int) -> tuple[Path, Path]:
    """The same files (as layer 1 of build_image has them, then all) in one gzip layer: layout, archive."""
    rng = random.Random(42)
    names = [f"usr/share/d{i % 97:02d}/s{i % 13}/file{i:06d}.dat" for i in range(files)]
    sizes = dict(zip(names, _sizes(rng, files, mib * MIB), strict=True))
    layout, bundle = scratch / "umoci-one", scratch / "bundle-one"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "unpack", "--image", f"{layout}:base", bundle)
    _write_files(bundle / "rootfs", names, sizes, rng)
    run("umoci", "repack", "--image", f"{layout}:bench", bundle)
    shutil.rmtree(bundle)
    archive = scratch / "image-one.tar"
    run("skopeo", "copy", "--quiet", f"oci:{layout}:bench", f"oci-archive:{archive}:bench")
    return layout, archive


def gzip_layers(layout: Path) -> list[tuple[Path, int]]:
    """The blob path and size of each layer of the layout's ``bench`` image, in manifest order."""
    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    desc = next(m for m in index["manifests"] if m["annotations"][ref] == "bench")
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    return [(layout / "blobs" / "sha256" / d["digest"][7:], d["size"]) for d in manifest["layers"]]


# -- the decompression floor -------------------------------------------------------------------------

RAPIDGZIP = REPO / ".venv" / "bin" / "rapidgzip"


def children_cpu() -> float:
    """CPU seconds (user + sys) of this process's children that have ended and been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def decompress_as_scheduled(
    layers: list[tuple[Path, int]], threads: list[int], at_once: int
) -> tuple[float, float]:
    """Wall seconds and CPU seconds of ``rapidgzip -d -P T -c LAYER > /dev/null`` for every layer,
    ``at_once`` at a time, largest first (the next started as soon as one ends), each on its ``threads``."""
    queue = pass_order([size for _, size in layers])
    running: dict[int, subprocess.Popen[bytes]] = {}
    cpu = children_cpu()
    start = time.perf_counter()
    while queue or running:
        while queue and len(running) < at_once:
            i = queue.pop(0)
            cmd = [str(RAPIDGZIP), "-d", "-P", str(threads[i]), "-c", str(layers[i][0])]
            running[i] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        ended = [i for i, proc in running.items() if proc.poll() is not None]
        if not ended:
            time.sleep(0.002)
        for i in ended:
            if running.pop(i).returncode != 0:
                raise RuntimeError(f"rapidgzip failed on {layers[i][0]}")
    return time.perf_counter() - start, children_cpu() - cpu


def floor_plans(layers: list[tuple[Path, int]]) -> dict[str, tuple[list[int], int]]:
    """The schedules the floor is the best of: the mount's own (threads from split_cpus), and one
    thread per layer; both as many layers at once as the mount opens."""
    cpus, sizes = available_cpus(), [size for _, size in layers]
    at_once = max(1, min(len(layers), cpus, MAX_PARALLEL_LAYERS))
    plans = {"mount": (split_cpus(cpus, sizes, at_once, [True] * len(layers)), at_once)}
    plans["one"] = ([1] * len(layers), at_once)
    return plans


def describe(plan: tuple[list[int], int]) -> str:
    """A floor schedule as the commands it runs."""
    threads, at_once = plan
    ps = sorted(set(threads))
    p = f"-P {ps[0]}" if len(ps) == 1 else "-P " + "/".join(map(str, threads))
    return f"`rapidgzip -d {p} -c LAYER >/dev/null`, {at_once} layer(s) at once, largest first"


# -- mounts ----------------------------------------------------------------------------------------


def unpack(layout: Path, dest: Path) -> float:
    """``umoci unpack`` into ``dest`` (removed first); seconds."""
    shutil.rmtree(dest, ignore_errors=True)
    return timed("umoci", "unpack", "--image", f"{layout}:bench", dest)


def read_all(root: Path) -> tuple[float, int]:
    """``tar -cf - -C ROOT . | wc -c``: seconds, and the bytes tar wrote."""
    return piped_count(["tar", "-cf", "-", "-C", str(root), "."], "-c")


def first_byte(path: Path) -> float:
    """Seconds to read one byte of ``path`` (from a process already started)."""
    start = time.perf_counter()
    with open(path, "rb") as f:
        f.read(1)
    return time.perf_counter() - start


def random_reads(root: Path, count: int, rng: random.Random) -> list[float]:
    """Latencies of ``count`` 4 KiB preads at random offsets of random large-ish files (O_DIRECT-free)."""
    files = [p for p in root.rglob("*.dat") if p.stat().st_size > 64 * 1024]
    out = []
    for _ in range(count):
        path = rng.choice(files)
        out.append(cold_pread(path, 4096, rng.randrange(0, path.stat().st_size - 4096)))
    return out


# -- the run ---------------------------------------------------------------------------------------


VARIANT = (PYTHON, Path(__file__).parent / "variant.py")
ONE_LAYER = {
    "auto": (OCIFUSE,),
    "parallel": (*VARIANT, "parallel-pass"),
    "no_read_ahead": (*VARIANT, "no-read-ahead"),
}


def measure(
    layout: Path, archive: Path, one: tuple[Path, Path], scratch: Path, runs: int, reads: int
) -> dict[str, list[float]]:
    """Every measurement, ``runs`` interleaved rounds."""
    s = Samples()
    add = s.add
    layers, one_layers = gzip_layers(layout), gzip_layers(one[0])
    for path in [archive, one[1], *(p for p, _ in layers + one_layers)]:
        warm(path)  # every round reads from the page cache
    plans = floor_plans(layers)
    mnt, dest = scratch / "mnt", scratch / "unpacked"
    small = None
    cpus = available_cpus()
    for r in range(runs):
        log(f"round {r + 1}/{runs}")
        for name, (threads, at_once) in plans.items():
            took, cpu = decompress_as_scheduled(layers, threads, at_once)
            add(f"floor_{name}", took)
            add(f"floor_{name}_cpu", cpu)
        add("one_floor_p1", decompress_as_scheduled(one_layers, [1], 1)[0])
        add(f"one_floor_p{cpus}", decompress_as_scheduled(one_layers, [cpus], 1)[0])
        for variant, command in ONE_LAYER.items():
            cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
            with mounted(one[1], mnt, "--rootfs", "-o", f"cache={cache}", command=command) as (took, _):
                add(f"one_first_mount_{variant}", took)
            shutil.rmtree(cache)
        took = unpack(layout, dest)
        add("unpack", took)
        if small is None:
            small = min((p for p in (dest / "rootfs").rglob("*.dat")), key=lambda p: p.stat().st_size)
            small = small.relative_to(dest / "rootfs")
        add("unpack_first_byte", took + first_byte(dest / "rootfs" / small))
        cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
        cpu = children_cpu()
        with mounted(archive, mnt, "--rootfs", "-o", f"cache={cache}") as (took, _):
            add("first_mount", took)
            # a local archive is opened before the daemon forks: its passes ran in `ocifuse mount`
            add("first_mount_cpu", children_cpu() - cpu)
            add("mount_first_byte", took + first_byte(mnt / small))
        with mounted(archive, mnt, "--rootfs", "-o", f"cache={cache}") as (took, pid):
            add("second_mount", took)
            add("cached_first_byte", took + first_byte(mnt / small))
            with PeakRss(pid) as rss:
                seconds, nbytes = read_all(mnt)
            add("read_all", seconds)
            add("read_all_bytes", nbytes)
            add("rss_mib", rss.max_kib / 1024)
            if r == 0:
                lat = random_reads(mnt, reads, random.Random(r))
                add("read4k_p50_ms", statistics.median(lat) * 1000)
                add("read4k_p99_ms", statistics.quantiles(lat, n=100)[98] * 1000)
        shutil.rmtree(cache)
    shutil.rmtree(dest, ignore_errors=True)
    return s.values


def sooner(ratio: float) -> str:
    """A ratio of times as "1.20x sooner" or "1.20x later"."""
    return f"{ratio:.2f}x sooner" if ratio >= 1 else f"{1 / ratio:.2f}x later"


def report(s: dict[str, list[float]], files: int, mib: int, runs: int, floors: dict[str, str]) -> str:
    """The markdown section; ``floors``: each floor schedule's commands (describe)."""
    med = {k: statistics.median(v) for k, v in s.items()}
    mount_speedup = med["unpack"] / med["first_mount"]
    first_byte_speedup = med["unpack_first_byte"] / med["mount_first_byte"]
    cached_speedup = med["unpack_first_byte"] / med["cached_first_byte"]
    read_ratio = med["read_all"] / med["unpack"]
    unpack = f"umoci unpack {med['unpack']:.2f} s"
    p50, p99 = med["read4k_p50_ms"], med["read4k_p99_ms"]
    best = min(floors, key=lambda name: med[f"floor_{name}"])
    floor = med[f"floor_{best}"]
    floor_ratio = med["first_mount"] / floor
    cpus = available_cpus()
    mount_cpu, floor_cpu = med["first_mount_cpu"], med[f"floor_{best}_cpu"]
    auto, par, inline = (med[f"one_first_mount_{v}"] for v in ONE_LAYER)
    p1, pn = med["one_floor_p1"], med[f"one_floor_p{cpus}"]
    rows = [
        ("first `--rootfs` mount until live", f"{med['first_mount']:.2f} s", unpack,
         f"{mount_speedup:.1f}x sooner", ">= 2x", met(mount_speedup >= 2)),
        ("first `--rootfs` mount until live, vs the decompression floor", f"{med['first_mount']:.2f} s",
         f"{floor:.2f} s: {floors[best]}", f"{floor_ratio:.2f}x", "<= 1.15x", met(floor_ratio <= 1.15)),
        ("first `--rootfs` mount: CPU (user+sys) until live", f"{mount_cpu:.2f} s",
         f"the floor's {floor_cpu:.2f} s", f"{mount_cpu / floor_cpu:.2f}x", "", ""),
        ("first `--rootfs` mount: its CPU spread on every CPU", f"{mount_cpu / cpus:.2f} s",
         f"its wall {med['first_mount']:.2f} s", f"{med['first_mount'] * cpus / mount_cpu:.2f}x", "", ""),
        ("second mount (index cached)", f"{med['second_mount']:.2f} s", "", "", "<= 0.4 s",
         met(med["second_mount"] <= 0.4)),
        ("a small file's first byte, first mount", f"{med['mount_first_byte']:.2f} s",
         f"after umoci unpack {med['unpack_first_byte']:.2f} s", f"{first_byte_speedup:.1f}x sooner",
         ">= 10x", met(first_byte_speedup >= 10)),
        ("a small file's first byte, index cached", f"{med['cached_first_byte']:.2f} s",
         f"after umoci unpack {med['unpack_first_byte']:.2f} s", f"{cached_speedup:.1f}x sooner",
         ">= 10x", met(cached_speedup >= 10)),
        ("every file read (`tar -cf - \\| wc -c`)", f"{med['read_all']:.2f} s", unpack,
         f"{read_ratio:.2f}x", "<= 1.5x", met(read_ratio <= 1.5)),
        ("random 4 KiB reads in gzip layers", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", "", "",
         "p99 <= 20 ms", met(p99 <= 20)),
        ("daemon RSS (reading every file)", f"{med['rss_mib']:.0f} MB", "", "", "<= 200 MB",
         met(med["rss_mib"] <= 200)),
        ("one layer: first mount (the mount's choice)", f"{auto:.2f} s",
         f"its pass on {cpus} threads (variant parallel-pass) {par:.2f} s", sooner(par / auto), "", ""),
        ("one layer: first mount (the mount's choice)", f"{auto:.2f} s",
         f"no read-ahead thread (variant no-read-ahead) {inline:.2f} s", sooner(inline / auto), "", ""),
        (f"one layer: `rapidgzip -d -P {cpus}`", f"{pn:.2f} s", f"`-P 1` {p1:.2f} s", sooner(p1 / pn),
         "", ""),
        ("one layer: first mount vs its best decompression", f"{auto:.2f} s", f"{min(p1, pn):.2f} s",
         f"{auto / min(p1, pn):.2f}x", "", ""),
    ]  # fmt: skip
    floor_lines = ", ".join(f"{name} {med[f'floor_{name}']:.2f} s" for name in floors)
    head = (
        f"Image: 3 gzip layers by `umoci repack`, {files} files, {mib} MiB uncompressed "
        f"({int(med['read_all_bytes']) // MIB} MiB as tar), and its one-layer twin; {cpus} CPUs; "
        f"{runs} rounds, medians; page cache warm; {stamp()}. Floor schedules: {floor_lines}."
    )
    return with_table(head, rows)


def bench(args: argparse.Namespace, scratch: Path) -> str:
    """Build the images in ``scratch``, measure, and return the section's markdown."""
    if args.quick:
        args.files, args.mib, args.runs, args.reads = 3000, 100, 1, 50
    log(f"building the images: {args.files} files, {args.mib} MiB; 3 layers and 1")
    layout, archive = build_image(scratch, args.files, args.mib)
    one = build_one_layer(scratch, args.files, args.mib)
    log(f"archive: {archive.stat().st_size // MIB} MiB")
    floors = {name: describe(plan) for name, plan in floor_plans(gzip_layers(layout)).items()}
    samples = measure(layout, archive, one, scratch, args.runs, args.reads)
    return report(samples, args.files, args.mib, args.runs, floors)


def main() -> int:
    """``python -m bench.rootfs [--files N] [--mib M] [--runs R] [--reads N] [--no-write] [--quick]``."""
    p = argparse.ArgumentParser(description="ocifuse --rootfs against umoci unpack (see bench/README.md)")
    p.add_argument("--files", type=int, default=30_000, help="files in the image")
    p.add_argument("--mib", type=int, default=1024, help="uncompressed MiB in the image")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3000 files, 100 MiB, 1 round")
    round_options(p, reads="random 4 KiB reads")
    why = "umoci unpack as root, FUSE mounts"
    return module_main(p, bench, section="rootfs", title="rootfs view", why=why)


if __name__ == "__main__":
    sys.exit(main())
