"""Random access into gzip and zstd made by the real tools: every byte equals the tool's own ``-d`` output."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import pyzstd
from peers import (
    BOMB_COMPRESSORS,
    COMPRESSORS,
    DECOMPRESSORS,
    bomb,
    compress,
    compress_bytes,
    decompress,
    pipe,
    require_tools,
)

from ocifuse import gzipsource, readers, zstdsource
from ocifuse.cache import IndexCache
from ocifuse.compressed import open_decompressed
from ocifuse.errors import ArchiveChanged, CompressedDataError, DecompressionLimit
from ocifuse.gzipsource import GzipSource
from ocifuse.source import FileRange, MemorySource, OpenFile, Source, SourceFile
from ocifuse.streams import Limits
from ocifuse.zstdsource import ZstdFrames, ZstdSpill


def _semi_compressible(size: int, seed: int) -> bytes:
    """Text-like runs and random runs, ~2:1 under gzip: seek points fall inside both kinds."""
    rng = random.Random(seed)
    letters = b"abcdefghij klmnopqrstuvwxyz\n"
    words = [bytes(rng.choice(letters) for _ in range(rng.randint(2, 12))) for _ in range(800)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += b" ".join(rng.choices(words, k=4000))
        else:
            out += rng.randbytes(rng.randint(1000, 60000))
    return bytes(out[:size])


@pytest.fixture(autouse=True)
def _small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames over 1 MiB spill (8 MiB in use): the 5 MiB fixtures then take both zstd paths."""
    monkeypatch.setattr(zstdsource, "ZSTD_FRAME_INPLACE", 1 << 20)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plain") / "data"
    path.write_bytes(_semi_compressible(5 << 20, 1))
    return path


def _tool(name: str) -> Callable[[Path, Path], Path]:
    """The maker of ``peers.COMPRESSORS[name]``: the real tool's output for the plain data."""
    return lambda plain, tmp: compress(name, plain, tmp / f"data.{name}")


def _multi_member(plain: Path, tmp: Path) -> Path:
    """Three gzip members one after the other (``cat a.gz b.gz``; RFC 1952 2.2)."""
    require_tools("gzip")
    data = plain.read_bytes()
    out = tmp / "data.multi.gz"
    with open(out, "wb") as o:
        for part in (data[: 1 << 20], data[1 << 20 : 3 << 20], data[3 << 20 :]):
            o.write(compress_bytes("gzip", part))
    return out


def _seekable(plain: Path, tmp: Path) -> Path:
    """The zstd seekable format (frames of at most 256 KiB, then a skippable seek-table frame)."""
    out = tmp / "data.seekable.zst"
    with pyzstd.SeekableZstdFile(out, "w", max_frame_content_size=256 << 10) as f:
        f.write(plain.read_bytes())
    return out


MAKERS: dict[str, Callable[[Path, Path], Path]] = {
    **{name: _tool(name) for name in COMPRESSORS},
    "gzip-multi-member": _multi_member,
    "zstd-seekable": _seekable,
}
# The format each maker writes.
KINDS = {
    **{name: c.kind for name, c in COMPRESSORS.items()},
    "gzip-multi-member": "gzip",
    "zstd-seekable": "zstd",
}


def _open(path: Path, **kw: object) -> tuple[OpenFile, Source]:
    file = OpenFile(str(path))
    kw.setdefault("key", None)
    kw.setdefault("cache", None)
    return file, open_decompressed(FileRange(file), name=str(path), **kw)  # type: ignore[arg-type]


def _check_all(source: Source, expected: bytes) -> None:
    assert source.size == len(expected)
    assert SourceFile(source).read() == expected
    rng = random.Random(7)
    for _ in range(60):
        offset = rng.randrange(0, len(expected))
        size = rng.choice([1, 512, 4096, 65536, 300000])
        assert source.pread(offset, size) == expected[offset : offset + size]
    assert source.pread(len(expected) - 10, 100) == expected[-10:]
    assert source.pread(len(expected), 100) == b""
    assert source.uncompressed_digest is not None
    assert source.uncompressed_digest.encoded == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_every_byte_equals_the_tools_output(maker: str, plain: Path, tmp_path: Path) -> None:
    path = MAKERS[maker](plain, tmp_path)
    kind = KINDS[maker]
    # The tool's own decompression is the reference, not our input.
    expected = decompress(kind, path, tmp_path / "expected").read_bytes()
    assert expected == plain.read_bytes()
    file, source = _open(path)
    try:
        assert source.compression == kind
        _check_all(source, expected)
    finally:
        source.close()
        file.close()


def test_which_zstd_streams_are_read_in_place(plain: Path, tmp_path: Path) -> None:
    """Small frames: a frame table (no copy); one large frame (what ``zstd`` writes): a spill file."""
    for maker, kind in (("zstd-seekable", ZstdFrames), ("zstd", ZstdSpill)):
        file, source = _open(MAKERS[maker](plain, tmp_path))
        try:
            assert isinstance(source, kind), maker
        finally:
            source.close()
            file.close()


def test_plain_bytes_come_back_as_they_are(plain: Path) -> None:
    file = OpenFile(str(plain))
    raw = FileRange(file)
    try:
        assert open_decompressed(raw, key=None, cache=None, name="x") is raw
    finally:
        file.close()


@pytest.mark.parametrize("maker", ["gzip", "zstd-seekable", "zstd"])
def test_a_compressed_blob_inside_a_larger_file(maker: str, plain: Path, tmp_path: Path) -> None:
    """A blob at byte 1000 of an archive: the reader must not start at byte 0 of the fd."""
    blob = MAKERS[maker](plain, tmp_path).read_bytes()
    outer = tmp_path / "outer"
    outer.write_bytes(b"\x1f\x8b" + os.urandom(998) + blob + os.urandom(3000))
    file = OpenFile(str(outer))
    source = open_decompressed(FileRange(file, 1000, len(blob)), key=None, cache=None, name="blob")
    try:
        _check_all(source, plain.read_bytes())
    finally:
        source.close()
        file.close()


@pytest.mark.parametrize("maker", ["gzip", "pigz", "gzip-multi-member", "zstd-seekable", "zstd"])
def test_the_index_is_saved_and_reused(maker: str, plain: Path, tmp_path: Path) -> None:
    path = MAKERS[maker](plain, tmp_path)
    store = IndexCache(str(tmp_path / "cache"))
    file, first = _open(path, key="k1", cache=store)
    first.close()
    assert len(store.entries()) == (2 if isinstance(first, ZstdSpill) else 1)
    consumed: list[int] = []
    second = open_decompressed(FileRange(file), key="k1", cache=store, name="x", progress=consumed.append)
    try:
        assert consumed == []  # no pass over the stream: all from the index
        _check_all(second, plain.read_bytes())
    finally:
        second.close()
        file.close()


@pytest.mark.parametrize("maker", ["gzip", "zstd-seekable", "zstd"])
def test_a_damaged_or_foreign_index_is_rebuilt(maker: str, plain: Path, tmp_path: Path) -> None:
    path = MAKERS[maker](plain, tmp_path)
    store = IndexCache(str(tmp_path / "cache"))
    file, first = _open(path, key="k", cache=store)
    first.close()
    kind = "gzip-index" if maker == "gzip" else "zstd-index"
    payload = store.load(kind, "k")
    assert payload is not None
    # Whole entries (the cache's checksum holds) whose payload is not this stream's index.
    for bad in (payload[:10], payload[:-7], b"XXXX" + payload[4:], payload[:60] + bytes(len(payload) - 60)):
        store.store(kind, "k", bad)
        source = open_decompressed(FileRange(file), key="k", cache=store, name="x")
        try:
            _check_all(source, plain.read_bytes())
        finally:
            source.close()
    file.close()


def test_progress_counts_every_compressed_byte(plain: Path, tmp_path: Path) -> None:
    for maker in ("gzip", "zstd"):
        path = MAKERS[maker](plain, tmp_path)
        consumed: list[int] = []
        file, source = _open(path, progress=consumed.append)
        source.close()
        file.close()
        assert sum(consumed) == path.stat().st_size
        assert all(n >= 0 for n in consumed)


def test_concurrent_readers_each_get_their_bytes(plain: Path, tmp_path: Path) -> None:
    """rapidgzip readers are not thread-safe: the pool gives each thread its own."""
    expected = plain.read_bytes()
    file, source = _open(MAKERS["gzip"](plain, tmp_path))
    assert isinstance(source, GzipSource)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                offset = rng.randrange(0, len(expected))
                assert source.pread(offset, 70000) == expected[offset : offset + 70000]
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        source.close()
        file.close()
    assert errors == []


# -- bad input ------------------------------------------------------------------------------------


def _damaged(path: Path, how: str) -> Path:
    data = bytearray(path.read_bytes())
    if how == "truncated-early":
        data = data[:1000]
    elif how == "truncated-middle":
        data = data[: len(data) // 2]
    elif how == "truncated-end":
        data = data[:-3]
    elif how == "flipped-byte":
        data[len(data) // 3] ^= 0x40
    elif how == "flipped-trailer":
        data[-6] ^= 0x01  # gzip: in CRC32/ISIZE; zstd: in the content checksum
    elif how == "trailing-garbage":
        data += b"this is not compressed data\n"
    elif how == "trailing-zeros":
        data += bytes(1024)
    out = path.with_name(f"{path.name}.{how}")
    out.write_bytes(bytes(data))
    return out


DAMAGE = [
    "truncated-early",
    "truncated-middle",
    "truncated-end",
    "flipped-byte",
    "flipped-trailer",
    "trailing-garbage",
    "trailing-zeros",
]


@pytest.mark.parametrize("maker", ["gzip", "pigz", "zstd", "zstd-seekable"])
@pytest.mark.parametrize("how", DAMAGE)
def test_damage_is_one_clear_error(maker: str, how: str, plain: Path, tmp_path: Path) -> None:
    """Damage the tool itself notices is one CompressedDataError; no other bytes than the tool's served.

    Where the format has no check over the damaged bytes (a seekable-format frame written without
    a checksum), ``zstd -d`` itself cannot tell: then the bytes served must be the tool's.
    """
    bad = _damaged(MAKERS[maker](plain, tmp_path), how)
    kind = KINDS[maker]
    tool = subprocess.run([*DECOMPRESSORS[kind], str(bad)], capture_output=True)
    try:
        file, source = _open(bad)
    except CompressedDataError as e:
        message = str(e)
        assert message.startswith(f"{bad}: {kind}: ")
        assert "\n" not in message
        assert tool.returncode != 0, f"{kind} -d accepts what ocifuse refused: {message}"
        return
    try:
        served = SourceFile(source).read()
    finally:
        source.close()
        file.close()
    assert tool.returncode == 0, f"{kind} -d fails on it ({tool.stderr!r}); ocifuse served it"
    assert served == tool.stdout


def _tiny(plain: Path, tmp: Path) -> Path:
    """39 bytes: its trailer's ISIZE ends in three zero bytes, and no seek point follows the first."""
    require_tools("gzip")
    out = tmp / "tiny.gz"
    out.write_bytes(compress_bytes("gzip", b"hello, world\n" * 3))
    return out


def _empty_last(plain: Path, tmp: Path) -> Path:
    """A member, then an empty one (``cat a.gz empty.gz``): the stream ends in 9 zero bytes of its own."""
    require_tools("gzip")
    out = tmp / "empty-last.gz"
    with open(out, "wb") as o:
        for part in (plain.read_bytes()[: 1 << 20], b""):
            o.write(compress_bytes("gzip", part))
    return out


TAILS = {
    "zero1": b"\0",
    "zero4": bytes(4),
    "zero5": bytes(5),
    "zero512": bytes(512),
    "junk1": b"j",
    "junk5": b"junk\n",
    "junk17": b"j" * 17,
    "junk100": b"j" * 100,
    "ff9": b"\xff" * 9,
    "zeros-then-junk": bytes(511) + b"j",
    "magic-only": b"\x1f\x8b",
    "cut-member": compress_bytes("gzip", b"x" * 1000)[:9],
    "member-then-junk": compress_bytes("gzip", b"x") + b"jj",
}


@pytest.mark.parametrize("maker", ["gzip", "pigz", "gzip-multi-member", "tiny", "empty-last"])
@pytest.mark.parametrize("tail", sorted(TAILS))
def test_bytes_after_a_gzip_stream_are_judged_as_gzip_judges_them(
    maker: str, tail: str, plain: Path, tmp_path: Path
) -> None:
    """Zero bytes after the last member are padding (``gzip -t`` says 0); anything else is refused.

    gzip only warns of other bytes (exit 2, "trailing garbage ignored"): served, they would be
    data no one checked. The refusal names where the stream ends.
    """
    makers = {**MAKERS, "tiny": _tiny, "empty-last": _empty_last}
    stream = makers[maker](plain, tmp_path).read_bytes()
    path = tmp_path / f"with-{tail}.gz"
    path.write_bytes(stream + TAILS[tail])
    tested = subprocess.run(["gzip", "-t", str(path)], capture_output=True)
    store = IndexCache(str(tmp_path / "cache"))
    if tested.returncode != 0:
        with pytest.raises(CompressedDataError) as info:
            _open(path, key="k", cache=store)
        message = str(info.value)
        assert "\n" not in message
        if not TAILS[tail].startswith(b"\x1f"):
            assert message.endswith(f"trailing data after the gzip stream's end at byte {len(stream)}")
        assert store.entries() == []
        return
    expected = subprocess.run(["gzip", "-dc", str(path)], stdout=subprocess.PIPE, check=True).stdout
    for _ in range(2):  # the first pass, then the index from the cache
        file, source = _open(path, key="k", cache=store)
        try:
            _check_all(source, expected)
        finally:
            source.close()
            file.close()
    assert [e.kind for e in store.entries()] == ["gzip-index"]


def test_xz_and_bzip2_are_named_in_the_refusal(plain: Path, tmp_path: Path) -> None:
    require_tools("xz", "bzip2")
    for tool in ("xz", "bzip2"):
        path = pipe([tool, "-c"], plain, tmp_path / f"data.{tool}")
        with pytest.raises(CompressedDataError, match=f"{tool}: not supported"):
            _open(path)


@pytest.mark.parametrize("kind", sorted(BOMB_COMPRESSORS))
def test_a_bomb_stops_at_max_size(kind: str, tmp_path: Path) -> None:
    """50 MiB of zeros compress to kilobytes; max_size bounds the pass, in time and memory."""
    path = bomb(kind, 50 << 20, tmp_path / "bomb")
    assert path.stat().st_size < 100_000
    with pytest.raises(DecompressionLimit, match="max_size") as info:
        _open(path, limits=Limits(max_size=4 << 20))
    assert info.value.option == "max_size"


def test_a_spill_stops_at_spill_max(plain: Path, tmp_path: Path) -> None:
    store = IndexCache(str(tmp_path / "cache"))
    with pytest.raises(DecompressionLimit, match="spill_max") as info:
        _open(MAKERS["zstd"](plain, tmp_path), key="k", cache=store, limits=Limits(spill_max=1 << 20))
    assert info.value.option == "spill_max"
    assert os.listdir(tmp_path / "cache") == []  # the partial spill is gone, nothing stored


def test_a_spill_lives_in_the_cache_and_is_reused(plain: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    store = IndexCache(str(cache_dir))
    path = MAKERS["zstd"](plain, tmp_path)
    file, first = _open(path, key="k", cache=store)
    first.close()
    spill = store.spill_path("k")
    assert spill is not None
    assert sorted(e.kind for e in store.entries()) == ["spill", "zstd-index"]
    second = open_decompressed(FileRange(file), key="k", cache=store, name="x")
    try:
        assert isinstance(second, ZstdSpill)
        _check_all(second, plain.read_bytes())
    finally:
        second.close()
    # A spill file changed since it was written is not trusted: rebuilt.
    with open(spill, "r+b") as f:
        f.truncate(10)
    third = open_decompressed(FileRange(file), key="k", cache=store, name="x")
    try:
        _check_all(third, plain.read_bytes())
    finally:
        third.close()
        file.close()


@pytest.mark.parametrize("maker", ["gzip", "zstd-seekable", "zstd"])
def test_an_archive_changed_underneath_answers_eio(maker: str, plain: Path, tmp_path: Path) -> None:
    """Built, then the file is rewritten in place: reads that reach the file fail, never stale bytes."""
    path = MAKERS[maker](plain, tmp_path)
    copy = tmp_path / "copy"
    shutil.copy(path, copy)
    file, source = _open(copy)
    try:
        with open(copy, "r+b") as f:
            f.truncate(copy.stat().st_size // 2)
        if isinstance(source, ZstdSpill):
            return  # its bytes were checked whole and copied out at open: they stay good
        with pytest.raises(ArchiveChanged):
            for offset in range(0, source.size, 1 << 20):
                source.pread(offset, 4096)
    finally:
        source.close()
        file.close()


def test_a_memory_source_can_be_decompressed() -> None:
    """Any Source works, not only files (a blob read through another source)."""
    data = _semi_compressible(300000, 3)
    source = open_decompressed(MemorySource(pyzstd.compress(data)), key=None, cache=None, name="m")
    try:
        _check_all(source, data)
    finally:
        source.close()


@pytest.mark.parametrize("maker", ["gzip", "zstd-seekable", "zstd"])
def test_an_index_built_without_the_digest_is_rebuilt_for_one_who_wants_it(
    maker: str, plain: Path, tmp_path: Path
) -> None:
    """digest=False (an outer archive) skips hashing; a later open wanting the digest does not get None."""
    path = MAKERS[maker](plain, tmp_path)
    store = IndexCache(str(tmp_path / "cache"))
    file, first = _open(path, key="k", cache=store, digest=False)
    first.close()
    assert first.uncompressed_digest is None
    consumed: list[int] = []
    second = open_decompressed(FileRange(file), key="k", cache=store, name="x", progress=consumed.append)
    try:
        assert sum(consumed) == path.stat().st_size  # a new pass: the stored entry had no digest
        _check_all(second, plain.read_bytes())
    finally:
        second.close()
        file.close()


def _live_readers() -> int:
    return sum(1 for reader in list(gzipsource._open_readers) if not reader.closed)


def test_idle_gzip_readers_are_bounded_across_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """One image listing a layer 300 times opens 300 sources: the idle readers they keep are bounded.

    Each source keeps its own index; the readers (a decoded chunk each) are one budget for the
    process, the least recently used closed first, and a closed one is reopened when needed.
    """
    monkeypatch.setattr(readers, "IDLE_READERS", 3)
    data = _semi_compressible(3 << 20, 4)
    blob = compress_bytes("gzip", data)
    before = _live_readers()
    sources = [open_decompressed(MemorySource(blob), key=None, cache=None, name=f"s{i}") for i in range(12)]
    try:
        for i, source in enumerate(sources):
            assert source.pread(i * 1000, 70000) == data[i * 1000 : i * 1000 + 70000]
            assert _live_readers() - before <= 3
        # A reader closed for the budget is made again: every source still reads right.
        for i, source in enumerate(sources):
            assert source.pread((3 << 20) - i * 5000, 4000) == data[(3 << 20) - i * 5000 :][:4000]
        assert _live_readers() - before <= 3
    finally:
        for source in sources:
            source.close()
    assert _live_readers() == before


def test_a_sequential_read_keeps_its_reader_among_many_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``cat`` of one blob, with other sources read in between, goes on with its reader: no new one."""
    monkeypatch.setattr(readers, "IDLE_READERS", 2)
    data = _semi_compressible(4 << 20, 5)
    blob = compress_bytes("gzip", data)
    made: list[Source] = []
    real = gzipsource._gzip_reader

    def counted(raw: Source, threads: int = 1) -> object:
        made.append(raw)
        return real(raw, threads)

    monkeypatch.setattr(gzipsource, "_gzip_reader", counted)
    sources = [open_decompressed(MemorySource(blob), key=None, cache=None, name=f"s{i}") for i in range(6)]
    try:
        big, others = sources[0], sources[1:]
        assert isinstance(big, GzipSource)
        assert big.pread(0, 100) == data[:100]  # its reader (the one of its pass was closed: budget)
        made.clear()
        for offset in range(0, len(data), 128 << 10):
            assert big.pread(offset, 128 << 10) == data[offset : offset + (128 << 10)]
            other = others[(offset >> 17) % len(others)]  # one other read between two of the cat's
            assert other.pread(offset, 100) == data[offset : offset + 100]
        # The cat's reader is among the last used at each step: never closed, never made again,
        # while the other five sources' readers take turns in the budget.
        assert not [raw for raw in made if raw is big.raw]
        assert len(made) >= len(others)
    finally:
        for source in sources:
            source.close()


def test_kept_zstd_frames_are_one_budget_for_all_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded frames are kept for the process (ZSTD_KEPT_BYTES), not per source: many layers stay small."""
    frame = 256 << 10
    monkeypatch.setattr(readers, "ZSTD_KEPT_BYTES", 3 * frame)
    data = _semi_compressible(2 << 20, 6)
    blob = b"".join(pyzstd.compress(data[i : i + frame]) for i in range(0, len(data), frame))
    sources = [open_decompressed(MemorySource(blob), key=None, cache=None, name=f"z{i}") for i in range(10)]
    try:
        assert all(isinstance(s, ZstdFrames) for s in sources)
        for s in sources:
            assert s.pread(5, 1000) == data[5:1005]
        kept = [s.pread_cached(5, 1000) is not None for s in sources]
        assert kept == [False] * 7 + [True] * 3  # the three read last
        assert sources[0].pread(5, 1000) == data[5:1005]  # decoded again when needed
    finally:
        for s in sources:
            s.close()
    assert [s.pread_cached(5, 1000) for s in sources] == [None] * 10  # closed: nothing kept
