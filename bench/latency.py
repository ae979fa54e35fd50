"""One-shot latency: ``ocifuse mount`` + a tool + ``ocifuse umount``, against the tool alone (issue 12).

A user who wants one manifest out of an archive runs three commands; the mount only pays when the
three together beat ``skopeo inspect oci-archive:`` (which extracts the archive first). Measured
here, in interleaved rounds (medians), as the installed commands run from a shell:

- ``ocifuse umount`` (target <= 0.1 s) against ``fusermount3 -u`` alone (the floor it wraps), and
  the time until the daemon has exited after it (it exits on its own; nobody waits for it);
- ``ocifuse mount`` of the 1 GiB archive until it returns (the mount is live; target <= 0.3 s),
  against the interpreter's bare start-up and ``import ocifuse.daemon`` (the floor under it);
- mount + ``skopeo inspect oci:MNT:TAG`` + umount of a ~300 MB archive against
  ``skopeo inspect oci-archive:ARCHIVE:TAG`` (target: faster).

Nothing here imports ocifuse: the commands are timed from outside, as a user's script runs them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import alive, daemon_pid, run, timed, warm
from bench.sections import Samples


def measure(
    *,
    ocifuse: Path,
    python: Path,
    big: Path,
    mid: Path,
    tag_big: str,
    tag_mid: str,
    scratch: Path,
    runs: int,
    log: Callable[[str], None],
) -> dict[str, list[float]]:
    """Interleaved rounds of every measurement; returns the samples (seconds) by name."""
    samples = Samples()
    add = samples.add
    mnt = scratch / "latency-mnt"
    mnt.mkdir(exist_ok=True)
    for path in (big, mid):
        warm(path)  # in the page cache, as for every tool alike
    run(ocifuse, "mount", big, mnt)  # warm-up: the interpreter's and the modules' pages
    run(ocifuse, "umount", mnt)
    try:
        for r in range(runs):
            log(f"latency, round {r + 1}/{runs}")
            add("python_start", timed(python, "-c", "pass"))
            add("python_import_daemon", timed(python, "-c", "import ocifuse.daemon"))

            add("mount_big", timed(ocifuse, "mount", big, mnt))
            pid = daemon_pid(mnt)
            add("umount", timed(ocifuse, "umount", mnt))
            t0 = time.perf_counter()
            while pid is not None and alive(pid) and time.perf_counter() - t0 < 10:
                time.sleep(0.002)
            add("daemon_exit_after_umount", time.perf_counter() - t0)

            run(ocifuse, "mount", big, mnt)
            add("fusermount_u", timed("fusermount3", "-u", mnt))

            add("skopeo_archive", timed("skopeo", "inspect", f"oci-archive:{mid}:{tag_mid}"))
            t0 = time.perf_counter()
            run(ocifuse, "mount", mid, mnt)
            t1 = time.perf_counter()
            run("skopeo", "inspect", f"oci:{mnt}:{tag_mid}")
            t2 = time.perf_counter()
            run(ocifuse, "umount", mnt)
            t3 = time.perf_counter()
            add("roundtrip", t3 - t0)
            add("roundtrip.mount", t1 - t0)
            add("roundtrip.skopeo", t2 - t1)
            add("roundtrip.umount", t3 - t2)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        for _ in range(500):  # the daemons exit on their own once unmounted
            if daemon_pid(mnt) is None:
                break
            time.sleep(0.01)
    return samples.values


def report(samples: dict[str, list[float]], info: dict[str, Any]) -> str:
    """The markdown section for bench/results.md."""

    def med(name: str) -> float:
        return statistics.median(samples[name])

    def sec(name: str) -> str:
        return f"{med(name):.3f} s"

    def low(name: str) -> str:
        return f"{min(samples[name]):.3f} s"

    def verdict(ok: bool) -> str:
        return "**pass**" if ok else "**miss**"

    rows: Sequence[tuple[str, str, str, str, str, str]] = [
        (
            "`ocifuse umount`",
            sec("umount"),
            f"`fusermount3 -u` {sec('fusermount_u')}",
            f"{med('umount') / med('fusermount_u'):.1f}x the floor",
            "≤ 0.1 s",
            verdict(med("umount") <= 0.1),
        ),
        (
            f"`ocifuse mount` until live, {info['big_mib']:.0f} MiB archive",
            sec("mount_big"),
            f"`python -c 'import ocifuse.daemon'` {sec('python_import_daemon')}",
            f"{med('mount_big') / med('python_import_daemon'):.1f}x the imports",
            "≤ 0.3 s",
            verdict(med("mount_big") <= 0.3),
        ),
        (
            f"mount + `skopeo inspect oci:MNT` + umount, {info['mid_mib']:.0f} MiB archive",
            sec("roundtrip"),
            f"`skopeo inspect oci-archive:` {sec('skopeo_archive')}",
            f"{med('skopeo_archive') / med('roundtrip'):.2f}x",
            "> 1x (faster)",
            verdict(med("roundtrip") < med("skopeo_archive")),
        ),
    ]
    lines = [
        "## One-shot latency (`bash bench/run --only latency`)",
        "",
        f"Date: {info['date']}. Load average (1, 5, 15 min) at start: {info['load_start']}; at end: "
        f"{info['load_end']}. Median of {info['runs']} interleaved rounds, page cache warm.",
        "",
        "| measurement | ocifuse | floor or peer | ratio | target | result |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        f"Where the round trip goes: mount {sec('roundtrip.mount')}, skopeo through the mount "
        f"{sec('roundtrip.skopeo')}, umount {sec('roundtrip.umount')}. Floors: the interpreter's "
        f"bare start-up {sec('python_start')}; `import ocifuse.daemon` (pyfuse3, trio, the read "
        f"core) {sec('python_import_daemon')}. After `ocifuse umount` returns, the daemon is gone "
        f"{sec('daemon_exit_after_umount')} later (nobody waits for it).",
        "",
        "Fastest round of each (the least disturbed by other load on a shared machine): "
        f"`ocifuse umount` {low('umount')}, `ocifuse mount` {low('mount_big')}, round trip "
        f"{low('roundtrip')} against `skopeo inspect oci-archive:` {low('skopeo_archive')}; "
        f"interpreter start-up {low('python_start')}, `import ocifuse.daemon` {low('python_import_daemon')}.",
    ]
    return "\n".join(lines)
