"""Bench: ocifuse at scale: a 1,000,000-entry plain oci-archive and a 500,000-file rootfs (issue 18).

What it does:

1. Builds its inputs once and keeps them in ``--inputs`` (default /var/tmp/ocifuse-scale-inputs; a
   later run with the same sizes reuses them). Tar headers are written directly (ustar blocks, no
   ``tarfile``: a million members take seconds, not minutes):
   - **entries**: an oci-archive of ``--entries`` members: ``oci-layout``, ``index.json`` (one
     small image) and blobs of a few bytes each, all under ``blobs/sha256/``;
   - **rootfs**: an image of three gzip layers (``pigz``) holding ``--files`` files in all, in 1,000
     directories: layer 1 adds 60% of them, layer 2 30% and rewrites 1% of layer 1, layer 3 adds
     the rest and whites out 1% of layer 1 (so the merged tree has exactly ``--files`` files); files
     of 0-1 KiB, half random, half text. The OCI layout is kept (``umoci unpack`` reads it) and
     tarred as an oci-archive (what the mount reads).
2. Times, ``--runs`` rounds interleaved (medians reported), the inputs in the page cache, each mount
   made with ``ocifuse mount -f`` (so that its VmHWM covers the scan and the index, which a
   background mount does before it forks) and live once ``os.path.ismount`` says so:
   - the peers: ``tar -tf`` of the entries archive; the single decompression pass of the image's
     layers (``gzip -dc`` of each, one after the other); ``find | wc -l`` over ``umoci unpack``'s
     tree of the image (unpacked once, dentries warm);
   - the first mount (a fresh ``-o cache=`` directory), then the cached remount (the same cache);
   - on the cached remount's fresh mount: ``find MNT | wc -l`` (the count checked), then
     ``ls -lR MNT > /dev/null``, then the daemon's VmHWM; the first mount's VmHWM after the same
     two walks; the cache directory's size.
3. Writes the results between the ``scale`` markers of ``bench/results.md`` (other sections kept).

Run as root: ``.venv/bin/python -m bench.scale [--quick] [--entries N] [--files N] [--runs R]``.
``--quick`` (100,000 entries, 50,000 files, one round) is a smoke run of a minute or two. No timing
here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from bench.common import MIB, OCIFUSE, alive, logger, piped_count, run, status_kib, timed, unmount, warm
from bench.sections import Samples, met, stamp, with_table, write_section

log = logger("scale bench")
TAG = "bench"
BLOCK = 512
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DIRS = 1000  # the rootfs image's file directories


# -- tar headers, written directly ------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(
    name: str, size: int = 0, *, kind: bytes = b"0", mode: int = 0o644, mtime: int = 1700000000
) -> bytes:
    """One ustar header block (POSIX.1-2001 "ustar Interchange Format"); ``name`` fits 100 bytes."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"name too long for a plain ustar header: {name}")
    block = bytearray(BLOCK)
    block[0 : len(raw)] = raw
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: str, data: bytes, *, mode: int = 0o644) -> bytes:
    """A regular file's header, its data and the data's padding."""
    return header(name, len(data), mode=mode) + data + bytes(-len(data) % BLOCK)


def directory(name: str) -> bytes:
    """A directory's header."""
    return header(name + "/", kind=b"5", mode=0o755)


def end_of_archive() -> bytes:
    """Two zero blocks."""
    return bytes(2 * BLOCK)


# -- the entries archive ----------------------------------------------------------------------------


def _descriptor(data: bytes, media_type: str) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def build_entries(path: Path, entries: int) -> None:
    """An oci-archive of exactly ``entries`` members: two directories, oci-layout, index.json, one
    manifest and config, the rest blobs of a few bytes (the image's layers are the first ten)."""
    blobs = [b"blob %d\n" % i for i in range(entries - 6)]
    layers = [_descriptor(b, MEDIA_LAYER) for b in blobs[:10]]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [
        d["digest"] for d in layers]}}).encode()  # fmt: skip
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": _descriptor(config, MEDIA_CONFIG),
         "layers": layers}
    ).encode()  # fmt: skip
    desc = _descriptor(manifest, MEDIA_MANIFEST) | {"annotations": {"org.opencontainers.image.ref.name": TAG}}
    index = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [desc]}).encode()
    tmp = path.with_suffix(".part")
    with open(tmp, "wb", buffering=8 * MIB) as f:
        f.write(directory("blobs") + directory("blobs/sha256"))
        f.write(member("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'))
        for data in [config, manifest, *blobs]:
            f.write(member(f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data))
        f.write(member("index.json", index) + end_of_archive())
    tmp.rename(path)


# -- the rootfs image -------------------------------------------------------------------------------


class _Layer:
    """A gzip layer written as it is made: tar bytes hashed (diff_id) and piped through ``pigz``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.diff = hashlib.sha256()
        self._out = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._pigz = subprocess.Popen(["pigz", "-6", "-c"], stdin=subprocess.PIPE, stdout=self._out)
        assert self._pigz.stdin is not None
        self._in: IO[bytes] = self._pigz.stdin
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 4 * MIB:
            self._flush()

    def _flush(self) -> None:
        self.diff.update(self._buf)
        self._in.write(self._buf)
        self._buf.clear()

    def close(self) -> tuple[str, int]:
        """End the tar; the layer's diff_id and compressed size."""
        self.write(end_of_archive())
        self._flush()
        self._in.close()
        if self._pigz.wait() != 0:
            raise RuntimeError("pigz failed")
        self._out.close()
        return "sha256:" + self.diff.hexdigest(), self.path.stat().st_size


def _path(i: int) -> str:
    return f"usr/share/d{i % DIRS:03d}/f{i:07d}"


def build_rootfs(layout: Path, archive: Path, files: int) -> None:
    """The three-layer gzip image of ``files`` files: its OCI layout (tag ``bench``) and oci-archive."""
    rng = random.Random(18)
    pool = rng.randbytes(1 << 20) + b"the quick brown fox jumps over the lazy dog\n" * 24000
    a, b, w = files * 6 // 10, files * 9 // 10, files // 100
    plan = [
        list(range(a)),
        list(range(a, b)) + list(range(0, a, 100))[:w],  # new files, and 1% of layer 1 rewritten
        list(range(b, files + w)),  # the rest, and as many again as the whiteouts below hide
    ]
    whiteouts = list(range(1, a, 100))[:w]
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    built = []
    for n, ids in enumerate(plan):
        layer = _Layer(blobs / f"layer{n}")
        layer.write(directory("usr") + directory("usr/share"))
        for d in sorted({i % DIRS for i in ids}):
            layer.write(directory(f"usr/share/d{d:03d}"))
        for i in ids:
            size = rng.randrange(0, 1024)
            half = size // 2
            at = rng.randrange(0, 1 << 20)
            data = pool[at : at + half] + pool[(1 << 20) + at % 4096 :][: size - half]
            layer.write(member(_path(i), data))
        if n == 2:
            for i in whiteouts:
                parent, _, base = _path(i).rpartition("/")
                layer.write(member(f"{parent}/.wh.{base}", b""))
        diff_id, size = layer.close()
        digest = hashlib.sha256(layer.path.read_bytes()).hexdigest()
        layer.path.rename(blobs / digest)
        built.append((diff_id, {"mediaType": MEDIA_GZIP_LAYER, "digest": f"sha256:{digest}", "size": size}))

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        desc = _descriptor(data, media_type)
        (blobs / str(desc["digest"]).split(":", 1)[1]).write_bytes(data)
        return desc

    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [
        d for d, _ in built]}}  # fmt: skip
    config_desc = blob(json.dumps(config).encode(), MEDIA_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc,
                "layers": [x for _, x in built]}  # fmt: skip
    desc = blob(json.dumps(manifest).encode(), MEDIA_MANIFEST)
    desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    run("tar", "-cf", archive, "-C", layout, "oci-layout", "index.json", "blobs")


def inputs(where: Path, entries: int, files: int, only: str | None) -> dict[str, Path]:
    """The built inputs under ``where`` (built now where missing): entries.tar, layout, image.tar."""
    where.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if only in (None, "entries"):
        out["entries"] = where / f"entries-{entries}.tar"
        if not out["entries"].exists():
            log(f"building the {entries}-entry archive")
            build_entries(out["entries"], entries)
    if only in (None, "rootfs"):
        out["layout"], out["image"] = where / f"rootfs-{files}", where / f"rootfs-{files}.tar"
        if not out["image"].exists():
            log(f"building the {files}-file image")
            shutil.rmtree(out["layout"], ignore_errors=True)
            part = where / f"rootfs-{files}.part.tar"
            build_rootfs(out["layout"], part, files)
            part.rename(out["image"])
    return out


# -- mounts and walks -------------------------------------------------------------------------------


@contextlib.contextmanager
def foreground(archive: Path, mnt: Path, *args: str) -> Iterator[tuple[float, int]]:
    """``ocifuse mount -f ARGS ARCHIVE MNT``, live once ``MNT`` is a mount point: the seconds it took
    and the daemon's pid (the process itself: its VmHWM covers the scan). Always unmounted after."""
    mnt.mkdir(exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen([str(OCIFUSE), "mount", "-f", *args, str(archive), str(mnt)])
    try:
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                raise RuntimeError(f"ocifuse mount exited {proc.returncode} before the mount was live")
            time.sleep(0.002)
        took = time.perf_counter() - start
        yield took, proc.pid
    finally:
        unmount(mnt, proc.pid)
        if alive(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def find_count(root: Path) -> tuple[float, int]:
    """``find ROOT | wc -l``: seconds, and the count."""
    return piped_count(["find", str(root)], "-l")


def ls_lr(root: Path) -> float:
    """``ls -lR ROOT > /dev/null``: seconds."""
    return timed("ls", "-lR", root)


def du(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_view(s: Samples, key: str, archive: Path, scratch: Path, expect: int, *args: str) -> None:
    """One round of one view: first mount, cached remount, find, ls -lR, VmHWM, cache size."""
    cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
    mnt = scratch / "mnt"
    try:
        with foreground(archive, mnt, *args, "-o", f"cache={cache}") as (took, pid):
            s.add(f"{key}.first", took)
            find_count(mnt)
            ls_lr(mnt)
            s.add(f"{key}.first_hwm_mib", status_kib(pid, "VmHWM") / 1024)
        s.add(f"{key}.cache_mib", du(cache) / MIB)
        with foreground(archive, mnt, *args, "-o", f"cache={cache}") as (took, pid):
            s.add(f"{key}.remount", took)
            took, count = find_count(mnt)
            if count != expect:
                raise RuntimeError(f"find over the {key} mount counted {count}, not {expect}")
            s.add(f"{key}.find", took)
            s.add(f"{key}.ls", ls_lr(mnt))
            s.add(f"{key}.hwm_mib", status_kib(pid, "VmHWM") / 1024)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def gunzip_pass(layout: Path) -> float:
    """Seconds of ``gzip -dc`` over each gzip layer of the image, one after the other."""
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    total = 0.0
    for layer in manifest["layers"]:
        path = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        start = time.perf_counter()
        with open(path, "rb") as f:
            subprocess.run(["gzip", "-dc"], stdin=f, stdout=subprocess.DEVNULL, check=True)
        total += time.perf_counter() - start
    return total


def measure(args: argparse.Namespace, built: dict[str, Path], scratch: Path) -> Samples:
    """Every measurement, ``args.runs`` interleaved rounds."""
    s = Samples()
    unpacked = scratch / "unpacked"
    if "image" in built:
        log("umoci unpack of the image (once: find's tree)")
        s.add("rootfs.unpack", timed("umoci", "unpack", "--image", f"{built['layout']}:{TAG}", unpacked))
    for r in range(args.runs):
        log(f"round {r + 1}/{args.runs}")
        if "entries" in built:
            warm(built["entries"])
            s.add("entries.tar_tf", timed("tar", "-tf", built["entries"]))
            measure_view(s, "entries", built["entries"], scratch, args.entries + 1)
        if "image" in built:
            warm(built["image"])
            s.add("rootfs.gunzip", gunzip_pass(built["layout"]))
            took, count = find_count(unpacked / "rootfs")
            s.add("rootfs.unpack_find", took)
            measure_view(s, "rootfs", built["image"], scratch, count, "--rootfs")
    return s


# -- the report -------------------------------------------------------------------------------------


def hwm(s: Samples, key: str, which: str, bound: int) -> tuple[str, ...]:
    """A row of the daemon's VmHWM after ``which`` and the two walks, against ``bound`` MB."""
    mib = s.med(key)
    return (f"daemon peak RSS (VmHWM), {which} + find + ls -lR", f"{mib:.0f} MB", "", "", f"<= {bound} MB",
            met(mib <= bound))  # fmt: skip


def report(s: Samples, args: argparse.Namespace) -> str:
    """The markdown section."""
    rows: list[tuple[str, ...]] = []
    if "entries.first" in s:
        tf, first = s.med("entries.tar_tf"), s.med("entries.first")
        rows += [
            (f"{args.entries:,} entries: first mount until live", f"{first:.2f} s", f"`tar -tf` {tf:.2f} s",
             f"{first / tf:.2f}x", "<= 1.5x", met(first <= 1.5 * tf)),
            ("cached remount until live", f"{s.med('entries.remount'):.2f} s", "", "", "<= 1.5 s",
             met(s.med("entries.remount") <= 1.5)),
            ("`find MNT \\| wc -l`, fresh mount", f"{s.med('entries.find'):.2f} s", "", "", "", ""),
            ("`ls -lR MNT > /dev/null`", f"{s.med('entries.ls'):.2f} s", "", "", "", ""),
            hwm(s, "entries.first_hwm_mib", "first mount", 400),
            hwm(s, "entries.hwm_mib", "cached remount", 400),
            ("cache entry size", f"{s.med('entries.cache_mib'):.1f} MiB", "", "", "", ""),
        ]  # fmt: skip
    if "rootfs.first" in s:
        gz, first = s.med("rootfs.gunzip"), s.med("rootfs.first")
        uf, find = s.med("rootfs.unpack_find"), s.med("rootfs.find")
        rows += [
            (f"{args.files:,}-file rootfs: first `--rootfs` mount until live", f"{first:.2f} s",
             f"`gzip -dc` of the layers {gz:.2f} s", f"{first / gz:.2f}x", "<= 1.2x", met(first <= 1.2 * gz)),
            ("cached remount until live", f"{s.med('rootfs.remount'):.2f} s", "", "", "<= 2 s",
             met(s.med("rootfs.remount") <= 2)),
            ("`find MNT \\| wc -l`, fresh mount", f"{find:.2f} s", f"over `umoci unpack`'s tree {uf:.2f} s",
             f"{find / uf:.2f}x", "<= 1.5x", met(find <= 1.5 * uf)),
            ("`ls -lR MNT > /dev/null`", f"{s.med('rootfs.ls'):.2f} s", "", "", "", ""),
            hwm(s, "rootfs.first_hwm_mib", "first mount", 500),
            hwm(s, "rootfs.hwm_mib", "cached remount", 500),
            ("cache entry size", f"{s.med('rootfs.cache_mib'):.1f} MiB", "", "", "", ""),
        ]  # fmt: skip
    head = (
        f"{args.entries:,}-entry plain oci-archive; {args.files:,}-file image of 3 gzip layers "
        f"({int(args.files * 0.6):,} in one); `ocifuse mount -f`, live at `ismount`; {args.runs} rounds, "
        f"medians; inputs in the page cache; {stamp()}."
    )
    return with_table(head, rows)


def main() -> int:
    """``python -m bench.scale [--quick] [--entries N] [--files N] [--runs R] [--only entries|rootfs]``."""
    p = argparse.ArgumentParser(description="ocifuse at scale (see bench/README.md)")
    p.add_argument("--entries", type=int, default=1_000_000, help="members of the plain archive")
    p.add_argument("--files", type=int, default=500_000, help="files of the rootfs image")
    p.add_argument("--runs", type=int, default=3, help="rounds (medians reported)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 100,000 entries, 50,000 files, 1 round")
    p.add_argument("--only", choices=("entries", "rootfs"), default=None, help="one of the two inputs")
    p.add_argument("--inputs", type=Path, default=Path("/var/tmp/ocifuse-scale-inputs"),
                   help="where the built inputs are kept for the next run")  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results.md alone")
    p.add_argument("--scratch", type=Path, default=None, help="parent of the scratch directory")
    args = p.parse_args()
    if args.quick:
        args.entries, args.files, args.runs = 100_000, 50_000, 1
    if os.geteuid() != 0:
        print("bench/scale.py: run as root (umoci unpack as root, FUSE mounts)", file=sys.stderr)
        return 2
    built = inputs(args.inputs, args.entries, args.files, args.only)
    scratch = Path(tempfile.mkdtemp(prefix="ocifuse-scale-bench-", dir=args.scratch))
    try:
        text = report(measure(args, built, scratch), args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    if not args.no_write:
        write_section("scale", f"## Scale (bench/scale.py)\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
