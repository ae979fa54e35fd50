"""The read-path bench: ocifuse against what users would do instead, as ratios from one run.

Run it as ``bash bench/run`` (which installs what it needs, then runs ``python -m bench.run``).
It builds its archives in a scratch directory, mounts them with the installed ``ocifuse`` (and
``ratarmount``), times everything in interleaved rounds (so load from elsewhere falls on every
tool alike), reports medians, and writes ``bench/results.md`` (its own section), ``results.json``
and ``results.png``. It also runs ``bench/fsck_throughput.py`` (the fsck-hashing section).
Every mount it makes is unmounted in ``finally``; no timing here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import latency
from bench.archives import BuiltArchive, build_entries100k, build_many, build_umoci
from bench.common import (
    BENCH,
    MIB,
    OCIFUSE,
    REPO,
    PeakRss,
    cat,
    daemon_pid,
    logger,
    run,
    scratch_dir,
    status_kib,
    timed,
    unmount,
    warm,
)
from bench.common import PYTHON as PROJECT_PY
from bench.sections import Samples, verdict, write_section

TOOLS = Path(sys.executable).parent  # the bench venv: ratarmount, py-spy
log = logger("bench")


# -- mounts ---------------------------------------------------------------------------------


class Mounts:
    """Every mount the bench makes, so that ``close`` can undo them all (also after an error)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.live: dict[Path, int | None] = {}
        self._n = 0

    def mountpoint(self) -> Path:
        self._n += 1
        mnt = self.scratch / f"mnt{self._n}"
        mnt.mkdir()
        return mnt

    def ocifuse(
        self, archive: Path, options: Sequence[str] = (), variant: str | None = None
    ) -> tuple[Path, int]:
        """Mount with ``ocifuse mount`` (returns once live); the mountpoint and the daemon's pid."""
        mnt = self.mountpoint()
        cmd = [str(OCIFUSE)] if variant is None else [str(PROJECT_PY), str(BENCH / "variant.py"), variant]
        cmd += ["mount", *(a for o in options for a in ("-o", o)), str(archive), str(mnt)]
        self.live[mnt] = None
        subprocess.run(cmd, check=True)
        pid = daemon_pid(mnt)
        if pid is None:
            raise RuntimeError(f"no daemon found for {mnt}")
        self.live[mnt] = pid
        return mnt, pid

    def ratarmount(self, archive: Path) -> tuple[Path, int]:
        """Mount with ``ratarmount`` (it backgrounds itself); wait until the mount answers."""
        mnt = self.mountpoint()
        self.live[mnt] = None
        subprocess.run(
            [str(TOOLS / "ratarmount"), str(archive), str(mnt)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline:
                raise RuntimeError(f"ratarmount did not mount {mnt}")
            time.sleep(0.01)
        pid = daemon_pid(mnt)
        self.live[mnt] = pid
        return mnt, pid or 0

    def umount(self, mnt: Path) -> None:
        """Unmount and wait for the daemon to exit (so the next round starts from nothing)."""
        unmount(mnt, self.live.pop(mnt, None))
        with contextlib.suppress(OSError):
            mnt.rmdir()

    def close(self) -> None:
        """Unmount everything still mounted."""
        for mnt in list(self.live):
            self.umount(mnt)

    @contextlib.contextmanager
    def mounted(self, mnt_pid: tuple[Path, int]) -> Iterator[tuple[Path, int]]:
        try:
            yield mnt_pid
        finally:
            self.umount(mnt_pid[0])


# -- timing ---------------------------------------------------------------------------------


def drop_caches() -> None:
    """Write back and drop the page cache (cold reads)."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def readahead_kb(mnt: Path) -> int:
    """The mount's read_ahead_kb as the kernel has it now."""
    dev = os.stat(mnt).st_dev
    try:
        return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())
    except OSError:
        return -1


# -- the measurements -----------------------------------------------------------------------


def time_to_layout(
    m: Mounts, s: Samples, label: str, a: BuiltArchive, scratch: Path, *, skopeo: bool, tar_x: bool = True
) -> None:
    """1. ocifuse mount until live vs tar -x; skopeo inspect oci-archive: vs oci:MOUNT (mount included).

    ``.mount`` is a first mount (``-o nocache``: every header scanned); ``.mount_cached`` a later
    one, its entry table loaded from the index cache (stored by the warm-up mount when worth it).
    """
    warm(a.path)
    out = scratch / "extract"
    before = set(_tables())
    mnt, _ = m.ocifuse(a.path)
    m.umount(mnt)  # warm-up: imports and the archive's headers in the page cache; the table stored
    s.add(f"{label}.table_bytes", sum(p.stat().st_size for p in set(_tables()) - before))
    if skopeo:  # the 1 GiB archive: ratarmount too (its first mount builds its index; later ones load it)
        mnt, _ = m.ratarmount(a.path)
        m.umount(mnt)
    for _ in range(s_runs):
        t0 = time.perf_counter()
        mnt, _ = m.ocifuse(a.path, ["nocache"])
        s.add(f"{label}.mount", time.perf_counter() - t0)
        m.umount(mnt)
        t0 = time.perf_counter()
        mnt, _ = m.ocifuse(a.path)
        s.add(f"{label}.mount_cached", time.perf_counter() - t0)
        m.umount(mnt)
        if tar_x:
            out.mkdir()
            s.add(f"{label}.tar_x", timed("tar", "-xf", a.path, "-C", out))
            shutil.rmtree(out)
        if skopeo:
            t0 = time.perf_counter()
            mnt, _ = m.ratarmount(a.path)
            s.add(f"{label}.ratarmount_mount", time.perf_counter() - t0)
            m.umount(mnt)
            s.add(
                f"{label}.skopeo_archive",
                timed("skopeo", "inspect", f"oci-archive:{a.path}:{a.tag}"),
            )
            t0 = time.perf_counter()
            mnt, _ = m.ocifuse(a.path)
            run("skopeo", "inspect", f"oci:{mnt}:{a.tag}")
            s.add(f"{label}.skopeo_mount", time.perf_counter() - t0)
            m.umount(mnt)


def first_reads(m: Mounts, s: Samples, a: BuiltArchive, info: dict[str, Any], *, cold: bool) -> None:
    """2. First read of the big blob through a fresh mount vs warm ``cat`` vs ratarmount; cache choices."""
    blob = a.big_blobs[0]
    warm(a.path)
    mnt, _ = m.ratarmount(a.path)
    m.umount(mnt)
    ra: dict[str, int] = {}

    def ours(
        name: str, options: Sequence[str] = (), variant: str | None = None, reread: bool = False
    ) -> None:
        with m.mounted(m.ocifuse(a.path, options, variant)) as (mnt, pid):
            ra[name] = readahead_kb(mnt)
            with PeakRss(pid) as rss:
                s.add(name, cat(mnt / blob))
            s.add("rss_serving_kib", rss.max_kib)
            s.add("hwm_serving_kib", status_kib(pid, "VmHWM"))
            if reread:
                s.add(f"{name}.reread", cat(mnt / blob))

    for r in range(s_runs):
        log(f"first reads, round {r + 1}/{s_runs}")
        cat(a.path)  # keep the archive warm whatever ran before
        s.add("raw_warm_cat", cat(a.path))
        ours("read.default", reread=True)
        with m.mounted(m.ratarmount(a.path)) as (mnt, _):
            s.add("read.ratarmount", cat(mnt / blob))
        ours("read.ra0", ["readahead_kb=0"])
        ours("read.ra4096", ["readahead_kb=4096"])
        ours("read.no_keep_cache", variant="no-keep-cache", reread=True)
    info["read_ahead_kb"] = ra
    if cold:
        for r in range(s_runs):
            log(f"cold reads, round {r + 1}/{s_runs}")
            drop_caches()
            s.add("cold.raw_cat", cat(a.path))
            with m.mounted(m.ocifuse(a.path)) as (mnt, _):
                drop_caches()
                s.add("cold.read", cat(mnt / blob))
        warm(a.path)


def concurrent_reads(m: Mounts, s: Samples, a: BuiltArchive) -> None:
    """3. 1, 2 and 4 readers of different blobs on a fresh mount: aggregate throughput."""
    warm(a.path)
    for r in range(s_runs):
        log(f"concurrent readers, round {r + 1}/{s_runs}")
        for k in (1, 2, 4):
            with m.mounted(m.ocifuse(a.path)) as (mnt, _):
                wall = cat(*(mnt / b for b in a.big_blobs[:k]))
                s.add(f"readers{k}", k * a.big_blob_size / wall)


def many_entries(m: Mounts, s: Samples, label: str, a: BuiltArchive) -> None:
    """5. Mount ready time and the daemon's peak RSS, after a full ``ls -lR`` (stat of every entry)."""
    warm(a.path)
    for r in range(s_runs):
        log(f"{label}: mount and walk, round {r + 1}/{s_runs}")
        t0 = time.perf_counter()
        mnt, pid = m.ocifuse(a.path)  # the table cached by time_to_layout's warm-up mount
        s.add(f"{label}.mount_cached", time.perf_counter() - t0)
        try:
            s.add(f"{label}.hwm_ready_kib", status_kib(pid, "VmHWM"))
            s.add(f"{label}.walk", timed("ls", "-lR", mnt))
            s.add(f"{label}.hwm_walk_kib", status_kib(pid, "VmHWM"))
        finally:
            m.umount(mnt)


def mount100k_rows(s: Samples, a: BuiltArchive) -> list[tuple[str, str, str, float | None, str, bool | None]]:
    """Row 5's mount rows: the first mount (headers scanned) and a later one (table cached)."""
    first, cached = s.med("entries100k.mount"), s.med("entries100k.mount_cached")
    table = s.med("entries100k.table_bytes")
    return [
        (
            f"{a.entries:,}-entry archive: first mount until live (`-o nocache`, every header scanned)",
            f"{first:.3f} s",
            "",
            None,
            "< 3 s",
            first < 3,
        ),
        (
            f"same, entry table loaded from the index cache ({table / MIB:.1f} MiB)",
            f"{cached:.3f} s",
            f"{first:.3f} s",
            first / cached,
            "≤ 0.5 s",
            cached <= 0.5,
        ),
    ]


def _tables() -> list[Path]:
    """The entry tables in the bench's index cache."""
    return list(Path(os.environ["CACHE_DIRECTORY"]).glob("table.*"))


def only_100k(s: Samples, a: BuiltArchive) -> str:
    """The markdown section of ``--only-100k`` (its own markers in results.md)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"## 100,001-entry mount, scanned vs cached ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"`bash bench/run --only-100k --runs {s_runs}`; load average {loadavg()}; medians of "
        f"{s_runs} rounds.",
        "",
        "| measurement | ocifuse | first mount | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for what, ours, peer, ratio, target, ok in mount100k_rows(s, a):
        shown = "—" if ratio is None else f"{ratio:.1f}x"
        lines.append(f"| {what} | {ours} | {peer} | {shown} | {target} | {verdict(ok)} |")
    cached = sorted(s.values["entries100k.mount_cached"])
    table = s.med("entries100k.table_bytes")
    lines += [
        "",
        f"Cached mounts, every sample (s): {', '.join(f'{t:.3f}' for t in cached)}. "
        f"Stored table: {table:,.0f} bytes for {a.entries:,} entries "
        f"({table / a.entries:.0f} bytes an entry).",
    ]
    return "\n".join(lines)


def fsck_section(runs: int) -> dict[str, Any]:
    """4. The fsck-hashing bench (bench/fsck_throughput.py, another engineer's): run it, keep its ratio."""
    script = BENCH / "fsck_throughput.py"
    if not script.exists():
        return {"ratio": None, "note": "bench/fsck_throughput.py not present"}
    log("fsck hashing (bench/fsck_throughput.py)")
    done = subprocess.run(
        [str(PROJECT_PY), str(script), "--runs", str(runs)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    sys.stderr.write(done.stdout + done.stderr)
    found = re.search(r"\(([0-9.]+)x\)\.?\s*$", done.stdout.strip())
    return {"ratio": float(found.group(1)) if found else None, "exit": done.returncode}


def profile_read(m: Mounts, a: BuiltArchive, out: Path) -> None:
    """py-spy on the daemon during one fresh first read of the big blob (flame graph SVG)."""
    warm(a.path)
    with m.mounted(m.ocifuse(a.path)) as (mnt, pid):
        spy = subprocess.Popen(
            [
                str(TOOLS / "py-spy"),
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--idle",
                "--rate",
                "250",
                "--output",
                str(out),
                "--format",
                "flamegraph",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            cat(mnt / a.big_blobs[0])
            time.sleep(0.3)
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
    log(f"profile written to {out}")


# -- report ---------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ratar = subprocess.run(
        [str(TOOLS / "ratarmount"), "--version"], capture_output=True, text=True, check=False
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ratarmount": (ratar.stdout.split() or ["?", "?"])[1],
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report(s: Samples, info: dict[str, Any], archives: dict[str, BuiltArchive]) -> str:
    """The markdown section for bench/results.md."""
    big, many = archives["big"], archives["blobs5k"]
    gib = big.big_blob_size / MIB
    rows: list[tuple[str, str, str, str, str, str, str]] = []

    def row(
        num: str, what: str, ours: str, peer: str, ratio: float | None, target: str, ok: bool | None
    ) -> None:
        rows.append((num, what, ours, peer, "—" if ratio is None else f"{ratio:.2f}x", target, verdict(ok)))

    def sec(name: str) -> str:
        return f"{s.med(name):.3f} s"

    def mibs(name: str, size: float) -> str:
        return f"{size / MIB / s.med(name):.0f} MiB/s"

    r = s.med("big.tar_x") / s.med("big.mount")
    row(
        "1",
        "1 GiB archive: `ocifuse mount` until live vs `tar -x`",
        sec("big.mount"),
        sec("big.tar_x"),
        r,
        "≥ 20x",
        r >= 20,
    )
    r = s.med("big.skopeo_archive") / s.med("big.skopeo_mount")
    row(
        "1",
        "`skopeo inspect oci:MOUNT` (mount included) vs `oci-archive:` (extracts first)",
        sec("big.skopeo_mount"),
        sec("big.skopeo_archive"),
        r,
        "≥ 20x",
        r >= 20,
    )
    for label in ("blobs5k", "entries100k"):
        if f"{label}.tar_x" in s:
            r = s.med(f"{label}.tar_x") / s.med(f"{label}.mount")
            row(
                "1",
                f"{archives[label].entries:,}-entry archive: mount until live vs `tar -x`",
                sec(f"{label}.mount"),
                sec(f"{label}.tar_x"),
                r,
                "(info)",
                None,
            )
    r = s.med("big.ratarmount_mount") / s.med("big.mount")
    row(
        "1",
        "1 GiB archive: `ocifuse mount` vs `ratarmount` until live (its index cached)",
        sec("big.mount"),
        sec("big.ratarmount_mount"),
        r,
        "(info)",
        None,
    )
    size = big.big_blob_size
    raw = s.med("raw_warm_cat") * size / big.size  # seconds per blob-size at cat's rate
    r = raw / s.med("read.default")
    row(
        "2",
        f"first read of the {gib:.0f} MiB blob, fresh mount vs `cat` of the archive (page cache warm)",
        mibs("read.default", size),
        f"{size / MIB / raw:.0f} MiB/s",
        r,
        "≥ 0.35x (stretch 0.5x)",
        r >= 0.35,
    )
    r = s.med("read.ratarmount") / s.med("read.default")
    row(
        "2",
        "same first read vs a fresh `ratarmount` mount",
        mibs("read.default", size),
        mibs("read.ratarmount", size),
        r,
        "≥ 2x",
        r >= 2,
    )
    one = s.med("readers1")
    for k in (2, 4):
        r = s.med(f"readers{k}") / one
        row(
            "3",
            f"{k} concurrent readers of different {many.big_blob_size // MIB} MiB blobs, aggregate vs 1",
            f"{s.med(f'readers{k}') / MIB:.0f} MiB/s",
            f"{one / MIB:.0f} MiB/s",
            r,
            "≥ 1.3x",
            r >= 1.3,
        )
    fr = info["fsck"].get("ratio")
    row(
        "4",
        "fsck hashing vs `sha256sum` (bench/fsck_throughput.py, section below)",
        "",
        "",
        fr,
        "≥ 0.8x",
        None if fr is None else fr >= 0.8,
    )
    for r100k in mount100k_rows(s, archives["entries100k"]):
        row("5", *r100k)
    hwm = max(s.values["entries100k.hwm_walk_kib"]) / 1024
    row(
        "5",
        "same: daemon peak RSS (VmHWM) after mount and `ls -lR` of every entry",
        f"{hwm:.0f} MB",
        "",
        None,
        "< 150 MB",
        hwm < 150,
    )
    rss = max(s.values["rss_serving_kib"]) / 1024
    row(
        "5",
        "daemon RSS while serving the 1 GiB archive (largest VmRSS sampled during reads)",
        f"{rss:.0f} MB",
        "",
        None,
        "< 60 MB",
        rss < 60,
    )

    m = info["machine"]
    lines = [
        "## Read path, mount time and memory (`bash bench/run`)",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, "
        f"ratarmount {m['ratarmount']}. Date: {m['date']}.",
        f"Load average (1, 5, 15 min) at start: {info['load_start']}; at end: {info['load_end']}.",
        f"Median of {info['runs']} interleaved runs each. Ratios are ours over the peer's "
        "(higher is better for ocifuse), computed from medians of the same run.",
        "",
        "| # | measurement | ocifuse | peer | ratio | target | result |",
        "|---|---|---|---|---|---|---|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
        "### What each of the mount's cache choices buys",
        "",
        "| choice | read_ahead_kb in effect | first read of the blob | vs default |",
        "|---|---|---|---|",
    ]
    ra = info["read_ahead_kb"]
    base = s.med("read.default")
    for name, what in (
        ("read.default", "default: `-o readahead_kb=1024` set in sysfs after mount"),
        ("read.ra0", "`-o readahead_kb=0`: the kernel's default read-ahead"),
        ("read.ra4096", "`-o readahead_kb=4096`"),
    ):
        lines.append(f"| {what} | {ra.get(name, '?')} | {mibs(name, size)} | {base / s.med(name):.2f}x |")
    lines += [
        "",
        "| choice | second read of the same blob (after close, same mount) | vs first read |",
        "|---|---|---|",
        f"| `keep_cache` on (ocifuse) | {mibs('read.default.reread', size)} | "
        f"{s.med('read.default') / s.med('read.default.reread'):.1f}x |",
        f"| `keep_cache` off (bench/variant.py) | {mibs('read.no_keep_cache.reread', size)} | "
        f"{s.med('read.no_keep_cache') / s.med('read.no_keep_cache.reread'):.1f}x |",
    ]
    if "cold.read" in s:
        r = s.med("cold.raw_cat") * size / big.size / s.med("cold.read")
        lines += [
            "",
            f"Cold (page cache dropped): first read through a fresh mount {mibs('cold.read', size)} vs "
            f"`cat` of the archive {big.size / MIB / s.med('cold.raw_cat'):.0f} MiB/s "
            f"({r:.2f}x).",
        ]
    lines += [
        "",
        f"100,000 entries: `ls -lR` of the whole mount {s.med('entries100k.walk'):.2f} s; VmHWM right after "
        f"mount {statistics.median(s.values['entries100k.hwm_ready_kib']) / 1024:.0f} MB. "
        f"Daemon VmHWM after serving the 1 GiB blob: {max(s.values['hwm_serving_kib']) / 1024:.0f} MB.",
        "",
        "![throughput](results.png)",
        "",
        "Why the misses are misses, and what was fixed on the way: bench/README.md.",
    ]
    return "\n".join(lines)


def plot(s: Samples, archives: dict[str, BuiltArchive], out: Path) -> None:
    """Throughput bars (MiB/s) for the read measurements."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    big = archives["big"]
    size = big.big_blob_size / MIB
    bars = [
        ("cat archive (page cache warm)", big.size / MIB / s.med("raw_warm_cat")),
        ("ocifuse first read (read_ahead 1024)", size / s.med("read.default")),
        ("ocifuse first read (kernel read-ahead)", size / s.med("read.ra0")),
        ("ocifuse first read (read_ahead 4096)", size / s.med("read.ra4096")),
        ("ratarmount first read", size / s.med("read.ratarmount")),
        ("ocifuse 1 reader", s.med("readers1") / MIB),
        ("ocifuse 2 readers (aggregate)", s.med("readers2") / MIB),
        ("ocifuse 4 readers (aggregate)", s.med("readers4") / MIB),
        ("ocifuse reread, keep_cache", size / s.med("read.default.reread")),
        ("ocifuse reread, no keep_cache", size / s.med("read.no_keep_cache.reread")),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    names = [b[0] for b in bars][::-1]
    vals = [b[1] for b in bars][::-1]
    colors = ["#4c72b0" if n.startswith("ocifuse") else "#999999" for n in names]
    ax.barh(names, vals, color=colors)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("MiB/s, median (grey: not ocifuse)")
    ax.set_title(f"1 GiB blob reads, {os.cpu_count()} CPUs, {datetime.date.today()}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------

s_runs = 5


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Build, measure, unmount, report."""
    global s_runs
    p = argparse.ArgumentParser(description="ocifuse read-path bench (see bench/README.md)")
    p.add_argument("--runs", type=int, default=5, help="rounds per measurement (median reported)")
    p.add_argument("--big-mib", type=int, default=1024, help="size of the big layer (MiB)")
    p.add_argument(
        "--scratch", type=Path, default=None, help="parent of the scratch directory (default /tmp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (archives) afterwards")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache reads (no drop_caches)")
    p.add_argument("--no-fsck", action="store_true", help="skip bench/fsck_throughput.py")
    p.add_argument("--profile", action="store_true", help="also py-spy the daemon during one read")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results.* alone")
    p.add_argument(
        "--only-100k",
        action="store_true",
        help="only the 100,001-entry mount, scanned vs cached (its own section of results.md)",
    )
    p.add_argument(
        "--only",
        choices=("latency",),
        help="one section only: latency = one-shot mount/umount latency (bench/latency.py)",
    )
    p.add_argument("--mid-mib", type=int, default=300, help="size of the latency round trip's archive (MiB)")
    args = p.parse_args(argv)
    if args.only == "latency":
        return latency_main(args)
    s_runs = args.runs
    if args.only_100k:
        return main_100k(args)
    signal.signal(signal.SIGTERM, _terminate)
    s = Samples()
    info: dict[str, Any] = {"runs": args.runs, "load_start": loadavg(), "machine": machine()}
    with bench_scratch(args) as (scratch, mounts):
        log(f"scratch {scratch}; load {info['load_start']}")
        log("building archives (umoci + skopeo for the 1 GiB one)")
        archives = {
            "big": build_umoci(scratch / "big.tar", scratch, mib=args.big_mib),
            "blobs5k": build_many(
                scratch / "blobs5k.tar",
                total_blobs=5000,
                big_layers=4,
                big_mib=256,
                small_size=2048,
                per_manifest=500,
            ),
            "entries100k": build_entries100k(scratch / "entries100k.tar"),
        }
        for name, a in archives.items():
            log(f"{name}: {a.entries} entries, {a.size / MIB:.0f} MiB, built in {a.build_seconds:.1f} s")
        log("1. time to a usable layout")
        time_to_layout(mounts, s, "big", archives["big"], scratch, skopeo=True)
        time_to_layout(mounts, s, "blobs5k", archives["blobs5k"], scratch, skopeo=False)
        time_to_layout(mounts, s, "entries100k", archives["entries100k"], scratch, skopeo=False)
        log("2. first reads")
        first_reads(mounts, s, archives["big"], info, cold=not args.no_cold)
        log("3. concurrent readers")
        concurrent_reads(mounts, s, archives["blobs5k"])
        log("5. many entries")
        many_entries(mounts, s, "entries100k", archives["entries100k"])
        log("6. one-shot latency")
        mid = build_umoci(scratch / "mid.tar", scratch, mib=args.mid_mib)
        lat = latency_samples(archives["big"], mid, scratch, args.runs)
        if args.profile:
            profile_read(mounts, archives["big"], scratch / "profile-read.svg")
            shutil.copy(scratch / "profile-read.svg", BENCH / "profile-read.svg")
    info["archives"] = {
        n: {"entries": a.entries, "bytes": a.size, "big_blob_bytes": a.big_blob_size}
        for n, a in archives.items()
    }
    info["fsck"] = {"ratio": None} if args.no_fsck else fsck_section(args.runs)
    info["load_end"] = loadavg()
    text = report(s, info, archives)
    print(text)
    lat_text = latency_report(lat, archives["big"], mid, info["load_start"], args.runs)
    print(lat_text)
    if not args.no_write:
        write_section("read-path", text)
        write_section("latency", lat_text)
        (BENCH / "results.json").write_text(json.dumps({"info": info, "samples": s.values}, indent=1) + "\n")
        (BENCH / "latency.json").write_text(json.dumps(lat, indent=1) + "\n")
        plot(s, archives, BENCH / "results.png")
        log("wrote bench/results.md (read-path section), results.json, results.png")
    return 0


@contextlib.contextmanager
def bench_scratch(args: argparse.Namespace) -> Iterator[tuple[Path, Mounts]]:
    """The run's scratch directory (under ``--scratch``) and its Mounts: every mount is undone and
    the directory removed (unless ``--keep``) afterwards, also after an error.

    Every ocifuse the bench starts keeps its index cache in the scratch directory: $CACHE_DIRECTORY
    (systemd's CacheDirectory=) is the first place ocifuse's default looks.
    """
    with scratch_dir("ocifuse-bench-", args.scratch, keep=args.keep) as scratch:
        (scratch / "index-cache").mkdir(mode=0o700)
        os.environ["CACHE_DIRECTORY"] = str(scratch / "index-cache")
        mounts = Mounts(scratch)
        try:
            yield scratch, mounts
        finally:
            mounts.close()
            if args.keep:
                log(f"kept {scratch}")


def main_100k(args: argparse.Namespace) -> int:
    """``--only-100k``: build the 100,001-entry archive, time first and cached mounts, write the section."""
    s = Samples()
    with bench_scratch(args) as (scratch, mounts):
        a = build_entries100k(scratch / "entries100k.tar")
        log(f"entries100k: {a.entries} entries, {a.size / MIB:.0f} MiB, built in {a.build_seconds:.1f} s")
        time_to_layout(mounts, s, "entries100k", a, scratch, skopeo=False, tar_x=False)
        text = only_100k(s, a)
    print(text)
    if not args.no_write:
        write_section("mount-100k", text)
        log("wrote bench/results.md (mount-100k section)")
    return 0


def latency_samples(big: BuiltArchive, mid: BuiltArchive, scratch: Path, runs: int) -> dict[str, list[float]]:
    """6. One-shot latency (bench/latency.py) over the 1 GiB archive and the ~300 MB one."""
    return latency.measure(
        ocifuse=OCIFUSE,
        python=PROJECT_PY,
        big=big.path,
        mid=mid.path,
        tag_big=big.tag,
        tag_mid=mid.tag,
        scratch=scratch,
        runs=runs,
        log=log,
    )


def latency_report(
    samples: dict[str, list[float]], big: BuiltArchive, mid: BuiltArchive, load_start: str, runs: int
) -> str:
    """The latency section's markdown."""
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load_start": load_start,
        "load_end": loadavg(),
        "runs": runs,
        "big_mib": big.size / MIB,
        "mid_mib": mid.size / MIB,
    }
    return latency.report(samples, info)


def latency_main(args: argparse.Namespace) -> int:
    """``--only latency``: build the two archives, measure, write the latency section."""
    signal.signal(signal.SIGTERM, _terminate)
    load_start = loadavg()
    with bench_scratch(args) as (scratch, _):
        log(f"scratch {scratch}; load {load_start}")
        log(f"building archives ({args.big_mib} MiB and {args.mid_mib} MiB, umoci + skopeo)")
        big = build_umoci(scratch / "big.tar", scratch, mib=args.big_mib)
        mid = build_umoci(scratch / "mid.tar", scratch, mib=args.mid_mib)
        samples = latency_samples(big, mid, scratch, args.runs)
    text = latency_report(samples, big, mid, load_start, args.runs)
    print(text)
    if not args.no_write:
        write_section("latency", text)
        (BENCH / "latency.json").write_text(json.dumps(samples, indent=1) + "\n")
        log("wrote bench/results.md (latency section), latency.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
