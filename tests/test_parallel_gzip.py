"""A gzip first pass on several CPUs: the index, bytes and digest of one; CPUs split, never oversubscribed."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import compress
from tarbuild import file_member
from test_compressed import _check_all, _damaged, _open, _semi_compressible
from test_image import GZIP, _compressed_outer, _one_pass_layers, _sha, image, open_rootfs
from test_rootfs import tar_bytes

from ocifuse import archive
from ocifuse import image as image_module
from ocifuse.cache import IndexCache
from ocifuse.errors import CompressedDataError
from ocifuse.gzipsource import GzipSource
from ocifuse.image import layer_threads
from ocifuse.model import Descriptor
from ocifuse.source import SourceFile
from ocifuse.store import GZIP_INDEX
from ocifuse.streams import PARALLEL_MIN, ReadAhead, available_cpus, pass_order, split_cpus


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 MiB, ~2:1 under gzip: a dozen or so 1 MiB chunks, enough for several threads to share."""
    path = tmp_path_factory.mktemp("plain") / "data"
    path.write_bytes(_semi_compressible(12 << 20, 11))
    return path


def _stored_index(path: Path, cache_dir: Path, threads: int) -> tuple[bytes, bytes]:
    """The payload a first pass on ``threads`` stores for ``path``, and every byte it then serves."""
    cache = IndexCache(str(cache_dir))
    file, source = _open(path, key="blob", cache=cache, threads=threads)
    try:
        assert isinstance(source, GzipSource)
        data = SourceFile(source).read()
        payload = cache.load(GZIP_INDEX.kind, "blob")
        assert payload is not None
        return payload, data
    finally:
        source.close()
        file.close()


@pytest.mark.parametrize("maker", ["gzip", "pigz"])
def test_a_pass_on_several_threads_builds_the_index_one_thread_builds(
    maker: str, plain: Path, tmp_path: Path
) -> None:
    """rapidgzip's parallel decoding leaves the same seek points, windows, size and digest."""
    path = compress(maker, plain, tmp_path / f"data.{maker}")
    expected = plain.read_bytes()
    one, served_one = _stored_index(path, tmp_path / "c1", 1)
    for threads in (2, 3):
        many, served_many = _stored_index(path, tmp_path / f"c{threads}", threads)
        assert many == one
        assert served_many == served_one == expected


def test_an_index_a_parallel_pass_built_serves_every_byte(plain: Path, tmp_path: Path) -> None:
    """The readers that serve reads import the parallel pass's index (the pass's own reader is closed)."""
    path = compress("gzip", plain, tmp_path / "data.gz")
    file, source = _open(path, threads=2)
    try:
        assert isinstance(source, GzipSource)
        _check_all(source, plain.read_bytes())
        assert source.uncompressed_digest is not None
        assert source.uncompressed_digest.encoded == hashlib.sha256(plain.read_bytes()).hexdigest()
    finally:
        source.close()
        file.close()


def test_a_parallel_pass_before_a_fork_reads_in_the_child(plain: Path, tmp_path: Path) -> None:
    """The mount daemon forks after the first pass: the child's reads must not wait on the
    parent's rapidgzip threads (a parallel reader kept would hang the child's first read)."""
    path = compress("gzip", plain, tmp_path / "data.gz")
    expected = plain.read_bytes()
    file, source = _open(path, threads=2)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if its reads are right
            ok = all(source.pread(o, 65536) == expected[o : o + 65536] for o in range(0, 12 << 20, 300_001))
            os._exit(0 if ok else 1)
        for _ in range(600):  # 60 s at most, then the child is killed and the test fails
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child's read hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        source.close()
        file.close()


@pytest.mark.parametrize("how", ["truncated-middle", "flipped-byte", "flipped-trailer", "trailing-garbage"])
def test_damage_is_refused_on_several_threads_as_on_one(how: str, plain: Path, tmp_path: Path) -> None:
    """A parallel pass refuses damaged gzip with the one-line error a sequential pass gives."""
    bad = _damaged(compress("gzip", plain, tmp_path / "data.gz"), how)
    errors = []
    for threads in (1, 2):
        with pytest.raises(CompressedDataError) as caught:
            file, source = _open(bad, threads=threads)
            source.close()
            file.close()
        assert "\n" not in str(caught.value)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


# -- the split of CPUs (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "sizes", "at_once", "parallel", "expected"),
    [
        (2, [600, 300, 100], 2, [True] * 3, [1, 1, 1]),  # as many layers as CPUs: one thread each
        (2, [600], 1, [True], [1]),  # 2 threads decode no faster than 1 (PARALLEL_MIN)
        (3, [600], 1, [True], [3]),  # one big layer: every CPU
        (8, [600], 1, [True], [8]),
        (64, [600], 1, [True], [16]),  # PARALLEL_MAX: memory
        (4, [100, 300], 2, [True, True], [1, 3]),  # 2 spare, by size 0.5 and 1.5: the tie to the larger
        (5, [100, 300], 2, [True, True], [1, 4]),  # 3 spare: 1 + 1 and 1 + 2 too few, so all to one
        (8, [5, 4, 3, 2], 4, [True] * 4, [3, 3, 1, 1]),  # 4 spare: to the two largest, 2 each
        (6, [300, 300], 2, [True, True], [3, 3]),
        (8, [100, 50, 10], 3, [True] * 3, [4, 3, 1]),  # 5 spare: 3.1, 1.6, 0.3 -> 3, 1 + the 0.6, 0
        (4, [100, 900], 2, [False, True], [1, 3]),  # a zstd layer gets one; the gzip one the rest
        (4, [900, 100], 2, [False, False], [1, 1]),  # nothing that can use more
        (16, [1, 2, 3, 4, 5, 6], 4, [True] * 6, [1, 1, 3, 4, 4, 5]),  # the 4 largest start first
        (1, [5, 5], 1, [True, True], [1, 1]),
        (4, [], 4, [], []),
        (4, [0, 0], 2, [True, True], [1, 1]),
    ],
)
def test_cpus_are_split_by_layer_count_and_size(
    cpus: int, sizes: list[int], at_once: int, parallel: list[bool], expected: list[int]
) -> None:
    assert split_cpus(cpus, sizes, at_once, parallel) == expected


def test_no_split_oversubscribes_whatever_order_passes_end_in() -> None:
    """Passes start in pass_order, ``at_once`` at a time, each next one when any running one ends:
    at no moment do the running passes' threads outnumber the CPUs."""
    rng = random.Random(3)
    for _ in range(300):
        cpus = rng.randint(1, 16)
        n = rng.randint(0, 8)
        sizes = [rng.choice([0, rng.randint(1, 10**9)]) for _ in range(n)]
        parallel = [rng.random() < 0.7 for _ in range(n)]
        at_once = min(max(1, n), cpus, 4)
        threads = split_cpus(cpus, sizes, at_once, parallel)
        assert all(t == 1 or t >= PARALLEL_MIN for t in threads)
        assert all(t == 1 for t, p in zip(threads, parallel, strict=True) if not p)
        queue, running = pass_order(sizes), list[int]()
        while queue or running:
            while queue and len(running) < at_once:
                running.append(queue.pop(0))
            assert sum(threads[i] for i in running) <= cpus
            running.pop(rng.randrange(len(running)))  # any of them may end first
        first = pass_order(sizes)[:at_once]
        if len(first) == 1 and parallel[first[0]] and sizes[first[0]] and cpus >= PARALLEL_MIN:
            assert threads[first[0]] == cpus  # a layer alone has every CPU


def test_layers_start_largest_first_and_only_gzip_ones_get_spare_cpus() -> None:
    def desc(media_type: str, size: int) -> Descriptor:
        return Descriptor(media_type=media_type, digest=_sha(str(size).encode()), size=size)  # type: ignore[arg-type]

    descs = [desc(GZIP, 10), desc("application/vnd.oci.image.layer.v1.tar+zstd", 500), desc(GZIP, 200)]
    order, threads = layer_threads(descs, 8, 3)
    assert order == [1, 2, 0]
    assert threads == [1, 1, 6]  # 5 spare CPUs between the gzip layers: 4.76 and 0.24 -> 5 and 0
    assert available_cpus() == len(os.sched_getaffinity(0))


# -- the rootfs view: every layer on its threads, the same tree --------------------------------------


def _many_layers() -> list[bytes]:
    """Four layer tars of different sizes: _one_pass_layers, and two more of many files across chunks."""
    rng = random.Random(5)
    more = [
        tar_bytes([file_member(f"{top}/f{i}", rng.randbytes(rng.randrange(0, 40_000))) for i in range(count)])
        for top, count in (("opt", 300), ("srv", 60))
    ]
    return [*_one_pass_layers(), *more]


@pytest.mark.parametrize("cpus", [1, 2, 3, 8])
def test_the_rootfs_is_the_same_on_any_cpus_and_never_oversubscribed(
    tmp_path: Path, cpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layers' passes, on as many CPUs as the process may use: the same tree, tables and bytes;
    the threads of the passes running at any moment never outnumber the CPUs."""
    plains = _many_layers()
    blobs = [gzip.compress(p, 1) for p in plains]
    path = image(tmp_path, blobs, diff_ids=[_sha(p) for p in plains], media_types=[GZIP] * len(blobs))
    lock, running, peak, seen = threading.Lock(), [0], [0], []
    real_pass = GzipSource._pass.__func__  # type: ignore[attr-defined]

    def counted(cls: type[GzipSource], *args: Any) -> GzipSource:
        threads = args[-1]
        with lock:
            running[0] += threads
            peak[0] = max(peak[0], running[0])
            seen.append(threads)
        try:
            return real_pass(cls, *args)  # type: ignore[no-any-return]
        finally:
            with lock:
                running[0] -= threads

    monkeypatch.setattr(GzipSource, "_pass", classmethod(counted))

    def tree(on: int, cache: str) -> dict[str, tuple[int, bytes]]:
        monkeypatch.setattr(image_module, "available_cpus", lambda: on)
        seen.clear()
        peak[0] = 0
        img = open_rootfs(str(path), cache=IndexCache(str(tmp_path / cache)))
        try:
            return {name: (e.size, img.sources.pread(e, 0, e.size)) for name, e in img.merged.entries.items()}
        finally:
            img.close()

    want = tree(1, "one")
    got = tree(cpus, "many")
    assert got == want
    assert len(seen) == len(blobs)
    assert peak[0] <= cpus
    assert all(t == 1 or t >= PARALLEL_MIN for t in seen)
    assert (max(seen) > 1) == (cpus == 8)  # the spare CPUs went to a large layer


def test_a_diff_id_mismatch_is_found_on_several_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parallel pass hashes what it decompresses: a wrong diff_id is refused as on one thread."""
    from ocifuse.errors import DiffIdMismatch

    plains = _one_pass_layers()[:1]
    path = image(tmp_path, [gzip.compress(plains[0], 1)], diff_ids=[_sha(b"other")], media_types=[GZIP])
    monkeypatch.setattr(image_module, "available_cpus", lambda: 4)
    with pytest.raises(DiffIdMismatch):
        open_rootfs(str(path), cache=IndexCache(str(tmp_path / "cache"))).close()


# -- the pass's read-ahead thread ------------------------------------------------------------------


def test_read_ahead_yields_every_item_in_order_and_raises_where_the_iterator_did() -> None:
    def items() -> Iterator[bytes]:
        for i in range(50):
            yield b"%d" % i
        raise CompressedDataError("x", "gzip", "damaged")

    ahead = ReadAhead(items(), depth=3)
    got = []
    with pytest.raises(CompressedDataError):
        for item in ahead:
            got.append(item)
    ahead.close()
    assert got == [b"%d" % i for i in range(50)]
    assert list(ahead) == []  # ended: nothing more, no hang


def test_read_ahead_stops_its_thread_when_closed_early() -> None:
    """A reader that stops (the pass failed, a bound reached) leaves no thread decompressing on."""
    made = []

    def items() -> Iterator[bytes]:
        for i in range(10_000):
            made.append(i)
            yield bytes(10)

    ahead = ReadAhead(items(), depth=2)
    assert next(ahead) == bytes(10)
    ahead.close()
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]  # its thread has ended
    count = len(made)
    assert count <= 5  # one taken, two queued, one waiting to be put, one being made
    threading.Event().wait(0.3)
    assert len(made) == count


@pytest.mark.parametrize(("cpus", "expected"), [(2, 1), (4, 4)])
def test_a_compressed_archive_is_indexed_on_every_cpu_from_three(
    tmp_path: Path, cpus: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``.tar.gz`` is one stream: its pass has every CPU (in parallel from PARALLEL_MIN), and
    its rootfs is the one the layers hold."""
    path, files = _compressed_outer(tmp_path, "gz")
    seen: list[int] = []
    real_pass = GzipSource._pass.__func__  # type: ignore[attr-defined]

    def counted(cls: type[GzipSource], *args: Any) -> GzipSource:
        seen.append(args[-1])
        return real_pass(cls, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(GzipSource, "_pass", classmethod(counted))
    monkeypatch.setattr(archive, "available_cpus", lambda: cpus)
    monkeypatch.setattr(image_module, "available_cpus", lambda: 1)  # the layers' passes: one thread
    img = open_rootfs(str(path))
    try:
        assert seen[0] == expected  # the archive's pass comes first, then the layers'
        assert seen[1:] == [1, 1]
        with tarfile.open(fileobj=io.BytesIO(files[1])) as tf:
            member = tf.extractfile("f1")
            assert member is not None
            entry = img.merged.entries["f1"]
            assert img.sources.pread(entry, 0, entry.size) == member.read()
    finally:
        img.close()
