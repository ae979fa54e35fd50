"""The read path against libfuse's own C example daemon, and what each layer of it costs (issue 15).

``bash bench/run --only readpath`` (or, as root, ``.venv/bin/python -m bench.readpath [--runs N]``):

1. Builds, in a scratch directory, an oci-archive holding one ``--mib`` MiB random blob (default
   1024), and a directory holding the same bytes as a plain file (copied out of the archive).
2. Compiles libfuse's example daemon ``passthrough_ll`` from the source Debian's libfuse3-dev ships
   (``/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c``; its code is not copied here) with
   ``gcc -O2 $(pkg-config fuse3 --cflags --libs) -lpthread``. Its read answers with
   ``fuse_reply_data`` on an fd buffer; libfuse does not ask for splice writes by default, so that
   is a ``malloc`` of the request's size, a ``pread`` into it, the reply's ``writev`` and a ``free``
   (strace: one mmap, pread64, writev, munmap per request): the same two copies ocifuse makes, in C,
   on up to 10 threads.
3. Times, in ``--runs`` interleaved rounds (the order rotated each round), the first read (``cat``)
   of the blob through a fresh mount, archive and plain file in the page cache (``cat`` of each
   before every round): ocifuse (its defaults: ``readahead_kb=1024``, so 1 MiB requests) and
   passthrough_ll as shipped (multi-threaded, the kernel's 128 KiB read-ahead), with
   ``read_ahead_kb=1024`` set in sysfs as ocifuse sets it (the same 1 MiB requests), and
   single-threaded (``-s``) with 1024. Medians; the ratio is ocifuse's throughput over
   passthrough_ll's with ``read_ahead_kb=1024``. Also each daemon's CPU time (user + system, all
   threads) during the read. The served bytes are compared once (``cmp``).
4. Times, in this process, what each layer between ``Operations.read`` and ``preadv`` costs per
   4 KiB, 128 KiB and 1 MiB request (page-cached, sequential offsets through the blob, as a ``cat``
   asks), in rounds that rotate the order of the layers: every layer with everything under it, the
   differences (each layer's own work), and the pieces alone; the fastest round of each is reported
   (``--layers-only``: just these tables, printed, to compare two versions of the read path).
5. Writes its section of bench/results.md (between the ``first-read-vs-libfuse`` markers) and
   bench/readpath.json (every sample). Every mount is unmounted and every daemon waited for in
   ``finally``; no timing here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.archives import MIB, BuiltArchive, build_many
from bench.common import cat, daemon_pid, warm
from bench.run import Mounts, _terminate, loadavg, readahead_kb
from bench.sections import write_section

BENCH = Path(__file__).resolve().parent
EXAMPLE = Path("/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c")
KIB = 1 << 10
SIZES = (128 * KIB, MIB)  # the kernel's default read-ahead's request, and ocifuse's (readahead_kb=1024)

# The first-read contenders: (name, what the report calls it).
VARIANTS = (
    ("ocifuse", "ocifuse (defaults: `readahead_kb=1024`)"),
    ("pll", "passthrough_ll as shipped (multi-threaded, kernel read-ahead)"),
    ("pll.ra1024", "passthrough_ll, `read_ahead_kb=1024` (ocifuse's)"),
    ("pll.s.ra1024", "passthrough_ll `-s` (one thread), `read_ahead_kb=1024`"),
)
HEADLINE = "pll.ra1024"  # the same request sizes: the daemons differ only in their work per request


def log(msg: str) -> None:
    """Progress to stderr."""
    print(f"[readpath bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- setup ----------------------------------------------------------------------------------


def build_passthrough_ll(out: Path) -> Path:
    """Compile libfuse's example daemon from the source its -dev package ships; the binary's path."""
    if not EXAMPLE.exists():
        raise SystemExit(f"{EXAMPLE} not found: install libfuse3-dev (bash .ci/setup.sh does)")
    flags = subprocess.run(
        ["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True, check=True
    ).stdout.split()
    binary = out / "passthrough_ll"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(EXAMPLE), *flags, "-lpthread"], check=True)
    return binary


def build(scratch: Path, mib: int) -> tuple[BuiltArchive, Path]:
    """The archive with one ``mib`` MiB blob, and a directory holding the same bytes as a plain file."""
    archive = build_many(
        scratch / "one-blob.tar", total_blobs=3, big_layers=1, big_mib=mib, small_size=0, per_manifest=1
    )
    blob = archive.big_blobs[0]
    with tarfile.open(archive.path) as tf:
        start = tf.getmember(blob).offset_data
    plain = scratch / "plain"
    plain.mkdir()
    with open(archive.path, "rb") as src, open(plain / "blob", "wb") as dst:
        left, at = archive.big_blob_size, start
        while left:
            done = os.copy_file_range(src.fileno(), dst.fileno(), left, at)
            if done <= 0:
                raise RuntimeError("short copy of the blob")
            left -= done
            at += done
    return archive, plain


def mount_passthrough_ll(m: Mounts, binary: Path, source: Path, *, single: bool, ra_kib: int) -> Path:
    """Mount ``source`` with passthrough_ll (it daemonizes once mounted); set read_ahead_kb if asked."""
    mnt = m.mountpoint()
    m.live[mnt] = None
    subprocess.run([str(binary), *(["-s"] if single else []), "-o", f"source={source}", str(mnt)], check=True)
    pid = m.live[mnt] = daemon_pid(mnt)
    if pid is None:
        raise RuntimeError(f"no passthrough_ll found serving {mnt}")
    if ra_kib:
        dev = os.stat(mnt).st_dev
        Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(f"{ra_kib}\n")
    return mnt


# -- 1. first read through a fresh mount ----------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, all its threads (/proc/PID/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_reads(
    m: Mounts, binary: Path, archive: BuiltArchive, plain: Path, runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int], list[str]]:
    """Seconds per first read of the blob and the daemon's CPU seconds in it, by variant;
    read_ahead_kb in effect; the load average at each round's start.
    """
    blob = archive.big_blobs[0]
    seconds: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    ra: dict[str, int] = {}
    loads: list[str] = []

    def one(name: str) -> None:
        if name == "ocifuse":
            mnt, pid = m.ocifuse(archive.path)
            path = mnt / blob
        else:
            ra_kib = 1024 if "ra1024" in name else 0
            mnt = mount_passthrough_ll(m, binary, plain, single=".s." in name, ra_kib=ra_kib)
            pid = m.live[mnt] or 0  # found, or mount_passthrough_ll raised
            path = mnt / "blob"
        try:
            ra[name] = readahead_kb(mnt)
            before = cpu_seconds(pid)
            seconds[name].append(cat(path))
            cpu[name].append(cpu_seconds(pid) - before)
        finally:
            m.umount(mnt)

    # Warm-up: the ocifuse mount stores its table (later mounts load it), and both serve the same bytes.
    warm(archive.path)
    warm(plain / "blob")
    mnt, _ = m.ocifuse(archive.path)
    try:
        subprocess.run(["cmp", str(mnt / blob), str(plain / "blob")], check=True)
    finally:
        m.umount(mnt)
    names = [name for name, _ in VARIANTS]
    for r in range(runs):
        loads.append(loadavg())
        log(f"first reads, round {r + 1}/{runs}; load {loads[-1]}")
        warm(archive.path)
        warm(plain / "blob")
        for name in names[r % len(names) :] + names[: r % len(names)]:
            one(name)
    return seconds, cpu, ra, loads


# -- 2. what each layer costs per request ---------------------------------------------------

# The layers from the handler pyfuse3 calls down to the syscall, each timed with everything under
# it (the cumulative rows), then the pieces timed alone. A 4 KiB request makes the copy small, so
# the size-independent Python layers show as differences of its column.
CUMULATIVE = (
    "Operations.read (as pyfuse3 awaits it)",
    "Operations.read without the handler wrapper",
    "read_node",
    "Sources.pread_cached",
    "FileRange.pread_cached",
    "os.preadv RWF_NOWAIT into one reused buffer",
    "os.preadv into one reused buffer",
)
ALONE = (
    "the timing loop alone",
    "handler wrapper around a no-op coroutine",
    "a bare no-op coroutine",
    "log.debug (level off)",
    "_node",
    "Sources.clip + _source",
    "check_unchanged (fstat + compare)",
    "bytearray(size)",
    "the buffer FileRange.pread_cached makes",
)
MICRO_SIZES = (4 * KIB, *SIZES)


def layer_costs(archive: BuiltArchive, rounds: int, budget: int) -> dict[str, dict[int, list[float]]]:
    """Microseconds per request: layer -> request size -> one value per round (medians reported).

    Each round times every layer in turn over ``budget`` bytes of sequential requests through the
    blob (page cache warm, as a ``cat`` reads it), so load from elsewhere falls on all alike.
    """
    import logging

    import pyfuse3
    import trio

    from ocifuse import fs
    from ocifuse import source as source_py
    from ocifuse.source import _RWF_NOWAIT, FileRange
    from ocifuse.tree import ROOT
    from ocifuse.views import ViewOptions, open_mount

    view = open_mount(str(archive.path), "(no mountpoint)", ViewOptions())
    try:
        ops = fs.Operations(view.reader, view.tree)
        node = view.tree.node(ROOT)
        for part in archive.big_blobs[0].split("/"):
            assert node is not None
            node = view.tree.child(node.inode, part.encode())
        assert node is not None
        entry, reader = node.entry, view.reader
        source = reader.sources[entry.source]
        assert isinstance(source, FileRange)
        fd, base = source.file.fd, source.start + entry.offset
        fh = pyfuse3.FileHandleT(node.inode)
        unwrapped = fs.Operations.read.__wrapped__  # type: ignore[attr-defined]
        fs_log = logging.getLogger(fs.__name__)
        assert not fs_log.isEnabledFor(logging.DEBUG)

        async def nothing() -> None:
            return None

        wrapped_nothing = fs.handler(nothing)
        new_buffer = getattr(source_py, "_new_buffer", bytearray)  # what FileRange.pread_cached allocates
        out: dict[str, dict[int, list[float]]] = {}

        def record(name: str, size: int, t0: int, n: int) -> None:
            out.setdefault(name, {}).setdefault(size, []).append((time.perf_counter_ns() - t0) / n / 1000)

        def one_round(size: int) -> None:
            n = max(16, budget // size)
            span = entry.size - size
            buf = bytearray(size)
            sync: dict[str, Callable[[int], object]] = {
                "the timing loop alone": lambda off: None,
                "read_node": lambda off: ops.read_node(node, off, size, True),
                "Sources.pread_cached": lambda off: reader.pread_cached(entry, off, size),
                "FileRange.pread_cached": lambda off: source.pread_cached(entry.offset + off, size),
                "os.preadv into one reused buffer": lambda off: os.preadv(fd, [buf], base + off),
                "log.debug (level off)": lambda off: fs_log.debug("read(%d, %d, %d)", fh, off, size),
                "_node": lambda off: ops._node(fh),
                "Sources.clip + _source": lambda off: (
                    reader.clip(entry, off, size),
                    reader._source(entry),
                ),
                "check_unchanged (fstat + compare)": lambda off: source.file.check_unchanged(),
                "bytearray(size)": lambda off: bytearray(size),
                "the buffer FileRange.pread_cached makes": lambda off: new_buffer(size),
                "os.preadv RWF_NOWAIT into one reused buffer": lambda off: os.preadv(
                    fd, [buf], base + off, _RWF_NOWAIT
                ),
            }
            coros: dict[str, Callable[[int], Any]] = {
                "Operations.read (as pyfuse3 awaits it)": lambda off: ops.read(fh, off, size),
                "Operations.read without the handler wrapper": lambda off: unwrapped(ops, fh, off, size),
                "handler wrapper around a no-op coroutine": lambda off: wrapped_nothing(),
                "a bare no-op coroutine": lambda off: nothing(),
            }

            async def timed(name: str, fn: Callable[[int], Any], is_coroutine: bool) -> None:
                off, t0 = 0, time.perf_counter_ns()
                if is_coroutine:
                    for _ in range(n):
                        await fn(off)
                        off += size
                        if off > span:
                            off = 0
                else:
                    for _ in range(n):
                        fn(off)
                        off += size
                        if off > span:
                            off = 0
                record(name, size, t0, n)

            async def every_layer() -> None:
                layers = [(name, fn, True) for name, fn in coros.items()]
                layers += [(name, fn, False) for name, fn in sync.items()]
                turn = len(
                    out.get("the timing loop alone", {}).get(size, ())
                )  # rotate: no layer always first
                for name, fn, is_coroutine in layers[turn % len(layers) :] + layers[: turn % len(layers)]:
                    await timed(name, fn, is_coroutine)

            trio.run(every_layer)

        for _ in range(rounds):
            for size in MICRO_SIZES:
                one_round(size)
        return out
    finally:
        view.close()


# -- report ---------------------------------------------------------------------------------

# Each layer's own work: the difference of two cumulative rows (or of two pieces timed alone).
OWN = (  # (what, upper row, lower row, whether it grows with the request)
    (
        "`handler` wrapper (fs.py): try/except, `await`",
        "handler wrapper around a no-op coroutine",
        "a bare no-op coroutine",
        False,
    ),
    (
        "`Operations.read` body: `log.debug`, `_node`, verdicts check, `read_node` call",
        "Operations.read without the handler wrapper",
        "read_node",
        False,
    ),
    ("`read_node`: the `cached_only` branch, a call", "read_node", "Sources.pread_cached", False),
    (
        "`Sources.pread_cached`: entry clip, `_source` bounds check, a call",
        "Sources.pread_cached",
        "FileRange.pread_cached",
        False,
    ),
    (
        "`FileRange.pread_cached`: clip, `check_unchanged` (fstat), a new buffer",
        "FileRange.pread_cached",
        "os.preadv RWF_NOWAIT into one reused buffer",
        True,
    ),
    (
        "`RWF_NOWAIT` (preadv2 instead of preadv)",
        "os.preadv RWF_NOWAIT into one reused buffer",
        "os.preadv into one reused buffer",
        True,
    ),
    (
        "the copy: bare `os.preadv` into a reused buffer",
        "os.preadv into one reused buffer",
        "the timing loop alone",
        True,
    ),
)
# Pieces timed alone (minus the timing loop), for the rows above that hold them.
PIECES = (
    ("log.debug (level off)", "`log.debug` with the level off"),
    ("_node", "`_node` (tree lookup)"),
    ("Sources.clip + _source", "`Sources.clip` + `_source`"),
    ("check_unchanged (fstat + compare)", "`check_unchanged` (fstat + compare)"),
    ("bytearray(size)", "`bytearray(size)`: allocated, zero-filled, freed"),
    ("the buffer FileRange.pread_cached makes", "the buffer `FileRange.pread_cached` makes (source.py)"),
)


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def report(
    reads: dict[str, list[float]],
    cpu: dict[str, list[float]],
    ra: dict[str, int],
    loads: list[str],
    micro: dict[str, dict[int, list[float]]],
    info: dict[str, Any],
) -> str:
    """The section's markdown."""
    mib = info["blob_bytes"] / MIB
    rate = {name: mib / statistics.median(v) for name, v in reads.items()}
    ours = rate["ocifuse"]
    lines = [
        "## First read vs libfuse's passthrough_ll (`bash bench/run --only readpath`)",
        "",
        f"Date: {info['date']}. {info['runs']} interleaved rounds (order rotated each round), medians; "
        f"the archive and the plain file in the page cache, each read a `cat` of the {mib:.0f} MiB blob "
        f"through a fresh mount. Load average (1, 5, 15 min) at start {info['load_start']}, at end "
        f"{info['load_end']}; at each round's start: {'; '.join(loads)}.",
        "",
        "| measurement | ocifuse | against | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for name, what in VARIANTS[1:]:
        r = ours / rate[name]
        target, verdict = (
            ("≥ 0.9x", "met" if r >= 0.9 else "**missed**") if name == HEADLINE else ("(info)", "")
        )
        lines.append(
            f"| first read vs {what}, read_ahead_kb {ra.get(name, '?')} | {ours:.0f} MiB/s | "
            f"{rate[name]:.0f} MiB/s | {r:.2f}x | {target} | {verdict} |"
        )
    per_round = [a / b for a, b in zip(reads[HEADLINE], reads["ocifuse"], strict=True)]
    lines += [
        "",
        "Every round (MiB/s): "
        + "; ".join(f"{name} " + ", ".join(f"{mib / t:.0f}" for t in reads[name]) for name, _ in VARIANTS)
        + ". Ratio to passthrough_ll with `read_ahead_kb=1024`, round by round: "
        + ", ".join(f"{r:.2f}x" for r in per_round)
        + ".",
    ]
    gib = info["blob_bytes"] / (1 << 30)
    lines += [
        "",
        "What each daemon spent on it: CPU time (user + system, all threads, from /proc/PID/stat) per GiB "
        "read, median; less disturbed by other load than the wall time, though it still moves with it.",
        "",
        "| daemon | first read, median | daemon CPU per GiB |",
        "|---|---|---|",
        *(
            f"| {what} | {rate[name]:.0f} MiB/s | {statistics.median(cpu[name]) / gib:.2f} s |"
            for name, what in VARIANTS
        ),
    ]
    if micro:
        lines += layers_report(micro, info["micro_rounds"])
    lines += ["", "What bounds the ratio: bench/README.md (the read path against passthrough_ll)."]
    return "\n".join(lines)


def layers_report(micro: dict[str, dict[int, list[float]]], rounds: int) -> list[str]:
    """The per-layer tables' lines."""
    lines = [
        "",
        "### Per request: each layer from `Operations.read` down to `preadv`",
        "",
        f"Microseconds per request, in process, page cache warm, sequential requests through the blob; "
        f"the fastest of {rounds} rounds (the order of the layers rotated each round): the round least "
        "disturbed by other load, as timeit advises, since on a shared machine a slower round measures "
        "the neighbours. Every round's value is in bench/readpath.json.",
        "",
        "| with everything under it | " + " | ".join(_size(n) for n in MICRO_SIZES) + " |",
        "|---|" + "---|" * len(MICRO_SIZES),
    ]

    def fastest(name: str, size: int) -> float:  # see above
        return min(micro[name][size])

    for name in CUMULATIVE:
        lines.append(f"| {name} | " + " | ".join(f"{fastest(name, n):.1f}" for n in MICRO_SIZES) + " |")
    lines += [
        "",
        "| each layer's own work (difference of two rows; the same at every size where only 4 KiB shows) | "
        + " | ".join(_size(n) for n in MICRO_SIZES)
        + " |",
        "|---|" + "---|" * len(MICRO_SIZES),
    ]
    for what, upper, lower, sized in OWN:
        cells = [
            f"{fastest(upper, n) - fastest(lower, n):.1f}" if sized or n == MICRO_SIZES[0] else ""
            for n in MICRO_SIZES
        ]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| timed alone (minus the timing loop) | " + " | ".join(_size(n) for n in MICRO_SIZES) + " |",
        "|---|" + "---|" * len(MICRO_SIZES),
    ]
    for name, what in PIECES:
        loop = "the timing loop alone"
        lines.append(
            f"| {what} | "
            + " | ".join(f"{fastest(name, n) - fastest(loop, n):.2f}" for n in MICRO_SIZES)
            + " |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Build, compile, measure, unmount, report."""
    p = argparse.ArgumentParser(
        description="ocifuse's first read against libfuse's passthrough_ll (bench/README.md)"
    )
    p.add_argument("--runs", type=int, default=7, help="first-read rounds (medians reported)")
    p.add_argument("--mib", type=int, default=1024, help="MiB of the blob")
    p.add_argument("--micro-rounds", type=int, default=11, help="rounds of the per-layer timings")
    p.add_argument("--micro-mib", type=int, default=64, help="MiB read per layer, size and round")
    p.add_argument("--no-micro", action="store_true", help="skip the per-layer timings")
    p.add_argument(
        "--layers-only", action="store_true", help="only the per-layer timings, printed (no mount, no write)"
    )
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results.md alone")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory afterwards")
    p.add_argument(
        "--scratch", type=Path, default=None, help="parent of the scratch directory (default /tmp)"
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/readpath.py: run as root (FUSE mounts, read_ahead_kb in sysfs)", file=sys.stderr)
        return 2
    if args.layers_only:
        return layers_only(args)
    signal.signal(signal.SIGTERM, _terminate)
    scratch = Path(tempfile.mkdtemp(prefix="ocifuse-readpath-bench-", dir=args.scratch))
    (scratch / "index-cache").mkdir(mode=0o700)  # ocifuse's default cache looks here first
    os.environ["CACHE_DIRECTORY"] = str(scratch / "index-cache")
    mounts = Mounts(scratch)
    info: dict[str, Any] = {"runs": args.runs, "micro_rounds": args.micro_rounds, "load_start": loadavg()}
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log(f"scratch {scratch}; load {info['load_start']}")
    try:
        binary = build_passthrough_ll(scratch)
        log(f"building a {args.mib} MiB blob's archive and its plain copy")
        archive, plain = build(scratch, args.mib)
        info["blob_bytes"] = archive.big_blob_size
        reads, cpu, ra, loads = first_reads(mounts, binary, archive, plain, args.runs)
        micro: dict[str, dict[int, list[float]]] = {}
        if not args.no_micro:
            log("per-layer costs, in process")
            warm(archive.path)
            micro = layer_costs(archive, args.micro_rounds, args.micro_mib * MIB)
    finally:
        mounts.close()
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    info["load_end"] = loadavg()
    text = report(reads, cpu, ra, loads, micro, info)
    print(text)
    if not args.no_write:
        write_section("first-read-vs-libfuse", text)
        samples = {
            "info": info,
            "read_ahead_kb": ra,
            "loads": loads,
            "first_read_seconds": reads,
            "daemon_cpu_seconds": cpu,
            "layers_us": micro,
        }
        (BENCH / "readpath.json").write_text(json.dumps(samples, indent=1) + "\n")
        log("wrote bench/results.md (first-read-vs-libfuse section), bench/readpath.json")
    return 0


def layers_only(args: argparse.Namespace) -> int:
    """``--layers-only``: the per-layer tables alone (to compare two versions of the read path)."""
    scratch = Path(tempfile.mkdtemp(prefix="ocifuse-readpath-bench-", dir=args.scratch))
    try:
        archive = build_many(
            scratch / "one-blob.tar",
            total_blobs=3,
            big_layers=1,
            big_mib=args.mib,
            small_size=0,
            per_manifest=1,
        )
        warm(archive.path)
        load = loadavg()
        micro = layer_costs(archive, args.micro_rounds, args.micro_mib * MIB)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Load average at start {load}, at end {loadavg()}.")
    print("\n".join(layers_report(micro, args.micro_rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
