"""Bench: ``ocifuse fsck`` hashing throughput against ``sha256sum`` over the same bytes.

What it does:

1. Writes a layout directory in a temporary directory: ``--layers`` blobs of random data
   (default 16 x 64 MiB = 1 GiB) under one image manifest, then tars it into an oci-archive with
   the system ``tar -C DIR -cf ARCHIVE .`` (the form skopeo's peers write).
2. Times, ``--runs`` rounds (default 5; each round runs every tool once, so load from elsewhere
   falls on all alike) after one warm-up run of each (so all read from the page cache and the
   comparison is of hashing, not of the disk):
   - ``fsck``: ``ocifuse.fsck.check`` on the archive, in process: open (tar header scan) plus the
     verification of every blob, manifest and config;
   - ``cli``: the installed command, ``python -m ocifuse.cli fsck ARCHIVE``, as a subprocess;
   - ``sha256sum``: ``sha256sum`` over every file of the extracted ``blobs/sha256/``.
3. Prints the medians and the ratio ``sha256sum time / fsck time`` (fsck throughput relative to
   sha256sum; the project's target is >= 0.8), and writes them to ``bench/results.md`` between the
   ``fsck-hashing`` markers (the rest of that file belongs to other benches and is kept).

Run: ``.venv/bin/python bench/fsck_throughput.py [--layers N] [--layer-mib M] [--runs R]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import run
from bench.sections import write_section
from ocifuse import fsck, model, open_layout


def write_blob(root: Path, data: bytes) -> dict[str, object]:
    """Store ``data`` under ``root/blobs/sha256``; return a descriptor of it."""
    digest = hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest
    path.write_bytes(data)
    return {"mediaType": "application/octet-stream", "digest": f"sha256:{digest}", "size": len(data)}


def build(root: Path, layers: int, layer_mib: int) -> int:
    """Write a one-image layout with ``layers`` random blobs at ``root``; return the blob bytes."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    descs = []
    for _ in range(layers):
        d = write_blob(root, os.urandom(layer_mib << 20))
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
        descs.append(d)
    config = {"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": []}}
    cfg = write_blob(root, json.dumps(config).encode())
    cfg["mediaType"] = model.MEDIA_CONFIG
    doc = {"schemaVersion": 2, "mediaType": model.MEDIA_MANIFEST, "config": cfg, "layers": descs}
    man = write_blob(root, json.dumps(doc).encode())
    man["mediaType"] = model.MEDIA_MANIFEST
    man["annotations"] = {model.REF_NAME: "bench"}
    index = {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": [man]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return sum(f.stat().st_size for f in (root / "blobs" / "sha256").iterdir())


def median_times(fns: list[Callable[[], object]], runs: int) -> list[float]:
    """The median wall time of ``runs`` calls of each function, after one untimed warm-up call each.

    The runs are interleaved (round by round), so that load from elsewhere on the machine falls on
    every tool alike instead of on whichever happened to run at the time.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, acc in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run_fsck(archive: Path) -> None:
    with open_layout(archive) as layout:
        report = fsck.check(layout)
    assert report.ok and not report.findings, report.findings


def run_cli(archive: Path) -> None:
    run(sys.executable, "-m", "ocifuse.cli", "fsck", archive)


def run_sha256sum(blobs: list[str]) -> None:
    run("sha256sum", *blobs)


def main() -> int:
    """Build, time, print, and record the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--layer-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="do not update bench/results.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ocifuse-bench-") as tmp:
        root = Path(tmp) / "layout"
        total = build(root, args.layers, args.layer_mib)
        archive = Path(tmp) / "image.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True)
        blobs = sorted(str(f) for f in (root / "blobs" / "sha256").iterdir())
        t_fsck, t_cli, t_sum = median_times(
            [lambda: run_fsck(archive), lambda: run_cli(archive), lambda: run_sha256sum(blobs)], args.runs
        )
    mib = total / (1 << 20)
    ratio, cli_ratio = t_sum / t_fsck, t_sum / t_cli
    sha_version = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True).stdout
    lines = [
        "## fsck hashing",
        "",
        f"`bench/fsck_throughput.py`: {args.layers} random blobs of {args.layer_mib} MiB ({mib:.0f} MiB)",
        f"in an oci-archive; median of {args.runs} interleaved runs after a warm-up (page cache warm).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},",
        f"{sha_version.splitlines()[0] if sha_version else 'sha256sum'}; load average after the runs:",
        f"{os.getloadavg()[0]:.1f} (other work on the machine makes absolute times noisy).",
        "",
        "| tool | median time | throughput | vs sha256sum |",
        "|---|---|---|---|",
        f"| `sha256sum` over the extracted blobs | {t_sum:.3f} s | {mib / t_sum:.0f} MiB/s | 1.00x |",
        f"| `fsck.check` in process (archive) | {t_fsck:.3f} s | {mib / t_fsck:.0f} MiB/s | {ratio:.2f}x |",
        f"| `ocifuse fsck` CLI (archive) | {t_cli:.3f} s | {mib / t_cli:.0f} MiB/s | {cli_ratio:.2f}x |",
        "",
        f"Target: >= 0.8x sha256sum. Result: {'met' if ratio >= 0.8 else 'NOT met'} ({ratio:.2f}x).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("fsck-hashing", text)
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
