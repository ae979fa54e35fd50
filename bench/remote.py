"""Bench: archives on servers (issue 16): a remote mount against downloading the archive first.

What it does, every server on 127.0.0.1 (nginx and moto's S3 server from tests/servers.py, the
same the remote tests start; bench/proxy.py in front of them to count bytes or add latency):

1. Builds in a scratch directory: the ``--mib`` MiB oci-archive of bench/archives.py (``umoci
   insert`` of a random file, ``skopeo copy``: one ~``--mib`` MiB blob), a 3-gzip-layer image
   (bench/rootfs.py's builder, ``--files`` files, ``--rootfs-mib`` MiB) and an archive holding one
   ``--node-mib`` MiB blob for the S3 nodes; nginx serves the first two, with an access log of
   ``$bytes_sent`` per request.
2. Times, ``--runs`` interleaved rounds (medians), the archives in the page cache:
   - ``curl -o`` of the archive + ``skopeo inspect oci-archive:`` against ``ocifuse mount URL`` with
     an empty index cache + ``skopeo inspect oci:MNT:TAG``; the bytes nginx sent for that (headers
     included), and again on a remount with that cache;
   - ``cat`` of the blob through that first mount against ``curl -o /dev/null`` of the archive's
     URL; ``cat`` through the remount (blocks from the index cache) against ``cat`` through a fresh
     mount of the local file;
   - a small file's first byte under ``--rootfs`` of the 3-layer image's URL: downloading it
     (``curl -o``) + ``tar -x`` + ``umoci unpack`` against a first mount (empty cache: every layer
     fetched and decompressed), and against a mount with a portable index (``ocifuse index``,
     ``-o index=FILE``) on an empty cache, when this ocifuse has the ``index`` command.
3. Once, ``--reads`` cold random 64 KiB reads of the blob (``-o nocache``, each in a MiB of its
   own, the mount's page cache dropped first): p50, p99; ``--runs`` times, through the proxy with
   nothing added and with ``--rtt`` ms added to every round trip, the requests (nginx's log) and
   seconds of a mount, a ``skopeo inspect``, and a ``--rootfs`` mount and a small file's first
   byte (with the index too); once, ``--nodes`` daemons with caches of their own ``cat`` the
   same blob from moto's S3 server at once: the bytes served, counted by the proxy in front of
   moto (moto logs no sizes).
4. Writes the results between the ``remote`` markers of bench/results.md (other sections kept).

Every mount is ``ocifuse mount -f``: a background mount forks after it opens the URL, and
obstore's client does not survive the fork (bench/README.md).

Run as root: ``.venv/bin/python -m bench.remote [--quick] [--mib M] [--runs R] [--no-write]``
(``--quick``: small sizes and one round, about a minute). Needs the test extras (nginx, moto):
``bash .ci/setup.sh test``. No timing here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.archives import build_many, build_umoci
from bench.common import MIB, OCIFUSE, REPO, cat, cold_pread, logger, mounted, run, seconds, timed, warm
from bench.proxy import proxy
from bench.rootfs import build_image, first_byte
from bench.sections import Samples, met, module_main, round_options, stamp, with_table

sys.path.insert(0, str(REPO / "tests"))  # the servers the remote tests start: one nginx, one moto
import servers  # noqa: E402

log = logger("remote bench")
KIB = 1024


# -- servers and their logs -------------------------------------------------------------------------


def settled(web: servers.Nginx) -> list[servers.Served]:
    """nginx's log once it has stopped growing for 0.2 s (requests cut short are logged at close)."""
    last = web.served()
    while True:
        time.sleep(0.2)
        now = web.served()
        if len(now) == len(last):
            return now
        last = now


def since(before: list[servers.Served], after: list[servers.Served]) -> tuple[int, int]:
    """(bytes sent with headers, requests) between two reads of the log."""
    new = after[len(before) :]
    return sum(s.bytes_sent for s in new), len(new)


@contextlib.contextmanager
def fresh_cache(scratch: Path) -> Iterator[Path]:
    """An empty index cache directory: a machine that has read nothing yet."""
    path = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def has_index_command() -> bool:
    """True if this ocifuse has ``ocifuse index`` (the portable index, issue 16)."""
    done = subprocess.run([str(OCIFUSE), "index", "--help"], capture_output=True, check=False)
    return done.returncode == 0


def make_index(url: str, out: Path, scratch: Path) -> None:
    """``ocifuse index URL -o FILE``, as on a machine of its own (an index cache of its own)."""
    with fresh_cache(scratch) as cache:
        run(OCIFUSE, "index", url, "-o", out, env={**os.environ, "CACHE_DIRECTORY": str(cache)})


def mount(
    source: Path | str, mnt: Path, *args: str, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[tuple[float, int]]:
    """``ocifuse mount -f``: timed until the mount answers, unmounted and waited for on the way out.

    In the foreground because a background mount opens the URL and then forks, and obstore's client
    does not survive a fork: the daemon's reads hang (see bench/README.md).
    """
    return mounted(source, mnt, *args, env=env, foreground=True)


# -- the archives -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Built:
    """The run's archives: the big oci-archive, the 3-layer image, the nodes' archive (each with the
    layout path of its blob and that blob's size)."""

    big: Path
    tag: str
    blob: str
    blob_size: int
    rootfs: Path
    node: Path
    node_blob: str
    node_size: int


def build(args: argparse.Namespace, scratch: Path) -> Built:
    """Every archive of the run; the first two in ``scratch/www``, what nginx serves."""
    www = scratch / "www"
    www.mkdir()
    log(f"building the {args.mib} MiB oci-archive")
    big = build_umoci(www / "big.tar", scratch, mib=args.mib)
    log(f"building the 3-layer gzip image: {args.files} files, {args.rootfs_mib} MiB")
    layout, rootfs = build_image(scratch, args.files, args.rootfs_mib)
    shutil.rmtree(layout)
    log(f"building the {args.node_mib} MiB blob for the nodes")
    node = build_many(scratch / "node.tar", total_blobs=3, big_layers=1, big_mib=args.node_mib,
                      small_size=16, per_manifest=1)  # fmt: skip
    return Built(
        big=big.path, tag=big.tag, blob=big.big_blobs[0], blob_size=big.big_blob_size,
        rootfs=rootfs.rename(www / "rootfs.tar"), node=node.path, node_blob=node.big_blobs[0],
        node_size=node.big_blob_size,
    )  # fmt: skip


# -- the peers --------------------------------------------------------------------------------------


def download_inspect(url: str, tag: str, scratch: Path) -> float:
    """``curl -o`` the archive, then ``skopeo inspect oci-archive:``: seconds."""
    dest = scratch / "download.tar"
    try:
        return timed("curl", "-sSf", "-o", dest, url) + timed(
            "skopeo", "inspect", f"oci-archive:{dest}:{tag}"
        )
    finally:
        dest.unlink(missing_ok=True)


def download_unpack(url: str, scratch: Path) -> tuple[float, Path]:
    """``curl -o`` the rootfs image's archive, ``tar -x`` it, ``umoci unpack`` it: seconds, and the
    bundle (the caller reads a first byte in its ``rootfs`` and removes it)."""
    dest, layout, bundle = scratch / "download.tar", scratch / "download-layout", scratch / "bundle"
    for d in (layout, bundle):
        shutil.rmtree(d, ignore_errors=True)
    layout.mkdir()
    took = timed("curl", "-sSf", "-o", dest, url)
    took += timed("tar", "-xf", dest, "-C", layout)
    took += timed("umoci", "unpack", "--image", f"{layout}:bench", bundle)
    dest.unlink()
    shutil.rmtree(layout)
    return took, bundle


# -- the measurements -------------------------------------------------------------------------------


def random_reads(path: Path, size: int, count: int, rng: random.Random) -> list[float]:
    """Seconds of ``count`` cold 64 KiB preads of ``path``, each in a MiB of its own (no block or
    read-ahead of one serves another)."""
    slots = rng.sample(range(size // MIB - 1), min(count, size // MIB - 1))
    return [cold_pread(path, 64 * KIB, slot * MIB + rng.randrange(0, MIB - 64 * KIB)) for slot in slots]


def rounds(s: Samples, web: servers.Nginx, b: Built, scratch: Path, runs: int, index: Path | None) -> Path:
    """The interleaved rounds (2. above); returns the small file of the rootfs image it read."""
    url, rootfs_url = web.url(b.big.name), web.url(b.rootfs.name)
    mnt = scratch / "mnt"
    inspect = ("skopeo", "inspect", f"oci:{mnt}:{b.tag}")
    small: Path | None = None
    for r in range(runs):
        log(f"round {r + 1}/{runs}")
        s.add("download_inspect", download_inspect(url, b.tag, scratch))
        with fresh_cache(scratch) as cache:
            before = settled(web)
            with mount(url, mnt, "-o", f"cache={cache}") as (took, _):
                s.add("mount_inspect", took + timed(*inspect))
                mid = settled(web)
                s.add("first_read", b.blob_size / cat(mnt / b.blob))
            after = settled(web)
            s.add("inspect_bytes", since(before, mid)[0])
            s.add("inspect_requests", since(before, mid)[1])
            with mount(url, mnt, "-o", f"cache={cache}") as (took, _):
                s.add("remount_inspect", took + timed(*inspect))
                mid = settled(web)
                s.add("second_read", b.blob_size / cat(mnt / b.blob))
            s.add("remount_bytes", since(after, mid)[0])
            s.add("remount_requests", since(after, mid)[1])
            s.add("second_read_bytes", since(mid, settled(web))[0])
        s.add("curl_read", b.big.stat().st_size / timed("curl", "-sSf", "-o", "/dev/null", url))
        with mount(b.big, mnt, "-o", "nocache"):
            s.add("local_read", b.blob_size / cat(mnt / b.blob))
        # A small file of the 3-layer image: its first byte, from nothing.
        took, bundle = download_unpack(rootfs_url, scratch)
        if small is None:
            root = bundle / "rootfs"
            small = min(root.rglob("*.dat"), key=lambda p: p.stat().st_size).relative_to(root)
        s.add("unpack_first_byte", took + first_byte(bundle / "rootfs" / small))
        shutil.rmtree(bundle)
        with fresh_cache(scratch) as cache, mount(rootfs_url, mnt, "--rootfs", "-o", f"cache={cache}") as m:
            s.add("rootfs_first_byte", m[0] + first_byte(mnt / small))
        if index is not None:
            with (
                fresh_cache(scratch) as cache,
                mount(rootfs_url, mnt, "--rootfs", "-o", f"index={index},cache={cache}") as m,
            ):
                s.add("index_first_byte", m[0] + first_byte(mnt / small))
    assert small is not None
    return small


def counted(s: Samples, web: servers.Nginx, name: str, fn: Callable[[], object]) -> None:
    """Seconds of ``fn()`` as ``NAME_s``, and the requests nginx answered for it as ``NAME_requests``."""
    before = settled(web)
    s.add(f"{name}_s", seconds(fn))
    s.add(f"{name}_requests", since(before, settled(web))[1])


def random_64k(s: Samples, web: servers.Nginx, b: Built, scratch: Path, reads: int) -> None:
    """Cold random 64 KiB reads of the blob on loopback (3. above): p50, p99."""
    log(f"{reads} cold random 64 KiB reads")
    mnt = scratch / "mnt"
    with mount(web.url(b.big.name), mnt, "-o", "nocache"):
        lat = random_reads(mnt / b.blob, b.blob_size, reads, random.Random(0))
    s.add("read64k_p50_ms", statistics.median(lat) * 1000)
    s.add("read64k_p99_ms", statistics.quantiles(lat, n=100)[98] * 1000)
    s.add("read64k_count", len(lat))


def round_trips(
    s: Samples, web: servers.Nginx, b: Built, scratch: Path, rtt_ms: int, small: Path, index: Path | None
) -> None:
    """Each step through the proxy, with nothing added and with ``rtt_ms`` added to every round
    trip (3. above): its seconds both ways (``rtt0_*``, ``rtt_*``) and its requests."""
    mnt = scratch / "mnt"
    variants = [("rootfs", "cache={}")] + ([("index", f"index={index},cache={{}}")] if index else [])
    for prefix, delay in (("rtt0", 0.0), ("rtt", rtt_ms / 2000)):
        log(f"mount, inspect, --rootfs through the proxy, {2000 * delay:.0f} ms added per round trip")
        with proxy(web.port, delay=delay) as px:
            with fresh_cache(scratch) as cache, contextlib.ExitStack() as live:
                cm = mount(px.url(b.big.name), mnt, "-o", f"cache={cache}")
                counted(s, web, f"{prefix}_mount", lambda cm=cm, live=live: live.enter_context(cm))
                counted(s, web, f"{prefix}_inspect", lambda: run("skopeo", "inspect", f"oci:{mnt}:{b.tag}"))
            for label, opts in variants:
                with fresh_cache(scratch) as cache, contextlib.ExitStack() as live:
                    cm = mount(px.url(b.rootfs.name), mnt, "--rootfs", "-o", opts.format(cache))
                    counted(
                        s, web, f"{prefix}_{label}_mount", lambda cm=cm, live=live: live.enter_context(cm)
                    )
                    counted(s, web, f"{prefix}_{label}_byte", lambda: first_byte(mnt / small))


def nodes(s: Samples, b: Built, scratch: Path, count: int) -> None:
    """``count`` daemons, each with a cache of its own, ``cat`` one blob from moto at once (3. above)."""
    log(f"{count} nodes reading one blob from the S3 server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: no line per request
    with servers.s3_server() as s3:
        url = s3.put("bench", b.node.name, b.node)
        with proxy(s3.port) as px, contextlib.ExitStack() as live:
            env = {**s3.env(), "AWS_ENDPOINT_URL": px.url().rstrip("/")}
            blobs = []
            for i in range(count):
                cache = Path(tempfile.mkdtemp(dir=scratch, prefix=f"node{i}-cache-"))
                mnt = scratch / f"node{i}"
                # moto reads the whole object for each range, one request at a time: a long queue
                live.enter_context(mount(url, mnt, "-o", f"cache={cache},timeout=900", env=env))
                blobs.append(mnt / b.node_blob)
            s.add("nodes_seconds", cat(*blobs))
            live.close()  # every daemon gone: nothing more is fetched
            s.add("nodes_served", px.counts()[0])


# -- the run ----------------------------------------------------------------------------------------


def report(s: Samples, b: Built, args: argparse.Namespace, index_note: str) -> str:
    """The markdown section."""
    m = s.med
    mib = MIB
    sooner = m("download_inspect") / m("mount_inspect")
    first_mib, re_kib = m("inspect_bytes") / mib, m("remount_bytes") / KIB
    seq, second = m("first_read") / m("curl_read"), m("second_read") / m("local_read")
    p50, p99 = m("read64k_p50_ms"), m("read64k_p99_ms")
    rtt = args.rtt / 1000
    rows = [
        ("fresh remote mount + `skopeo inspect oci:` (empty cache)", f"{m('mount_inspect'):.2f} s",
         f"`curl -o` + `skopeo inspect oci-archive:` {m('download_inspect'):.2f} s", f"{sooner:.1f}x sooner",
         ">= 20x", met(sooner >= 20)),
        ("bytes nginx sent for it", f"{first_mib:.2f} MiB, {m('inspect_requests'):.0f} requests", "", "",
         "<= 16 MiB", met(first_mib <= 16)),
        ("the same on a remount with the cache", f"{re_kib:.1f} KiB, {m('remount_requests'):.0f} requests",
         f"{m('remount_inspect'):.2f} s", "", "<= 1 MiB", met(re_kib <= 1024)),
        ("`cat` of the blob, fresh mount", f"{m('first_read') / mib:.0f} MiB/s",
         f"`curl -o /dev/null` {m('curl_read') / mib:.0f} MiB/s", f"{seq:.2f}x", ">= 0.7x", met(seq >= 0.7)),
        ("`cat` of the blob after a remount (block cache)",
         f"{m('second_read') / mib:.0f} MiB/s ({m('second_read_bytes') / mib:.1f} MiB fetched)",
         f"local file, first read {m('local_read') / mib:.0f} MiB/s", f"{second:.2f}x", ">= 1x",
         met(second >= 1)),
        (f"{m('read64k_count'):.0f} cold random 64 KiB reads", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", "", "",
         "p99 <= 20 ms", met(p99 <= 20)),
    ]  # fmt: skip
    for key, what in (("mount", "mount until live"), ("inspect", "`skopeo inspect oci:`"),
                      ("rootfs_mount", "`--rootfs` mount until live (3-layer image, empty cache)"),
                      ("rootfs_byte", "then a small file's first byte"),
                      ("index_mount", "`--rootfs` mount with `-o index=` (empty cache)"),
                      ("index_byte", "then a small file's first byte")):  # fmt: skip
        if f"rtt_{key}_s" in s:
            took, base, requests = m(f"rtt_{key}_s"), m(f"rtt0_{key}_s"), m(f"rtt_{key}_requests")
            added = f"+{(took - base) / rtt:.1f} RTTs"
            rows.append((f"{args.rtt} ms RTT: {what}", f"{requests:.0f} requests, {took:.2f} s",
                         f"no delay {base:.2f} s", added, "report", ""))  # fmt: skip
    unpack = f"`curl -o` + `tar -x` + `umoci unpack` {m('unpack_first_byte'):.2f} s"
    fb = m("unpack_first_byte") / m("rootfs_first_byte")
    rows.append(("`--rootfs` first byte of a small file, no index (empty cache)",
                 f"{m('rootfs_first_byte'):.2f} s", unpack, f"{fb:.1f}x sooner", "", ""))  # fmt: skip
    if "index_first_byte" in s:
        ib = m("unpack_first_byte") / m("index_first_byte")
        took = f"{m('index_first_byte'):.2f} s"
        rows.append(("the same with a portable index (`-o index=`)", took, unpack, f"{ib:.1f}x sooner",
                     ">= 10x", met(ib >= 10)))  # fmt: skip
    else:
        rows.append(("the same with a portable index", index_note, "", "", ">= 10x", "n/a"))
    node_mib = b.node_size / mib
    bound = args.nodes * node_mib
    served = m("nodes_served") / mib
    rows.append((f"{args.nodes} nodes `cat` one {node_mib:.0f} MiB blob from S3 (moto)",
                 f"{served:.1f} MiB served (counted at a proxy)", f"{args.nodes} x {node_mib:.0f} MiB",
                 f"{served / bound:.3f}x", "<= 1.05x", met(served <= bound * 1.05)))  # fmt: skip
    head = (
        f"A {args.mib} MiB oci-archive (`umoci insert` + `skopeo copy`, one {b.blob_size // mib}"
        f" MiB blob) on nginx, a 3-gzip-layer image ({args.files} files, {args.rootfs_mib} MiB), one "
        f"{node_mib:.0f} MiB blob on moto's S3 server; all on 127.0.0.1, files in the page cache; "
        f"{args.runs} rounds, medians; bytes from nginx's `$bytes_sent`; {stamp()}."
    )
    return with_table(head, rows)


def bench(args: argparse.Namespace, scratch: Path) -> str:
    """Build, serve, measure; the section's markdown."""
    b = build(args, scratch)
    s = Samples()
    warm(b.big)
    warm(b.rootfs)
    with servers.nginx(scratch / "nginx", scratch / "www") as web:
        index: Path | None = None
        note = "n/a (no index command)"
        if has_index_command():
            index = scratch / "rootfs.index"
            try:
                make_index(web.url(b.rootfs.name), index, scratch)
            except RuntimeError as e:
                index, note = None, f"n/a (`ocifuse index` failed: {str(e).strip().splitlines()[-1][:80]})"
        small = rounds(s, web, b, scratch, args.runs, index)
        random_64k(s, web, b, scratch, args.reads)
        for r in range(args.runs):
            log(f"round trips, round {r + 1}/{args.runs}")
            round_trips(s, web, b, scratch, args.rtt, small, index)
    nodes(s, b, scratch, args.nodes)
    return report(s, b, args, note)


def main() -> int:
    """``python -m bench.remote [--quick] [--mib M] [--runs R] [--reads N] [--no-write]``."""
    p = argparse.ArgumentParser(
        description="ocifuse on archives served over HTTP and S3 (see bench/README.md)"
    )
    quick = "--quick" in sys.argv[1:]  # smaller defaults; an option given still wins
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run (~1 minute)")
    p.add_argument("--mib", type=int, default=64 if quick else 1024, help="MiB of the oci-archive's blob")
    p.add_argument("--files", type=int, default=600 if quick else 30_000, help="files in the 3-layer image")
    p.add_argument("--rootfs-mib", type=int, default=24 if quick else 1024, help="MiB in the 3-layer image")
    p.add_argument("--node-mib", type=int, default=32 if quick else 256, help="MiB of the nodes' blob")
    p.add_argument("--nodes", type=int, default=8, help="daemons reading from the S3 server at once")
    p.add_argument("--rtt", type=int, default=20, help="milliseconds added to each round trip by the proxy")
    round_options(p, reads="cold random 64 KiB reads")
    if quick:
        p.set_defaults(runs=1, reads=60)
    why = "FUSE mounts, umoci unpack as root"
    return module_main(p, bench, section="remote", title="archives on servers", why=why)


if __name__ == "__main__":
    sys.exit(main())
