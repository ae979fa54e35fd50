"""Archives on servers: mount, inspect and fsck an http:// or s3:// URL, fetching only what is read.

Every server is real and on 127.0.0.1: nginx (Range, ETag, If-Match), moto's S3 server, and
``python3 -m http.server`` (which ignores Range).
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RealImage
from mounting import background_mount, is_mounted, mount_source, mounted, run_ocifuse
from peers import compress
from servers import Nginx, http_server, make_ca, nginx, s3_server
from tarbuild import tree_of

from ocifuse import remote, urls
from ocifuse.cache import IndexCache
from ocifuse.errors import LayoutOpenError, OcifuseError
from ocifuse.layout import ViewOptions
from ocifuse.views import open_layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` by relative path, with its bytes (tarbuild.tree_of)."""
    return tree_of(root)[0]


@pytest.fixture(scope="module")
def www(real_image: RealImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A web root with the real image's archive, plain and gzip-compressed."""
    root = tmp_path_factory.mktemp("www")
    shutil.copy(real_image.archive, root / "image.tar")
    compress("gzip", real_image.archive, root / "image.tar.gz")
    return root


@pytest.fixture(scope="module")
def web(www: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with nginx(tmp_path_factory.mktemp("nginx"), www) as server:
        yield server


# -- the pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://user:pw@example.com:8443/a/b.tar?X-Amz-Signature=abc#frag",
            "https://example.com:8443/a/b.tar",
        ),
        ("http://example.com/x.tar", "http://example.com/x.tar"),
        ("s3://bucket/key/of.tar", "s3://bucket/key/of.tar"),
        ("http://token@[::1]/x", "http://[::1]/x"),
    ],
)
def test_redact_drops_userinfo_and_query(url: str, shown: str) -> None:
    assert urls.redact(url) == shown


def test_is_url() -> None:
    assert urls.is_url("https://h/x") and urls.is_url("S3://b/k") and urls.is_url("http://h")
    assert not urls.is_url("/tmp/http://x") and not urls.is_url("image.tar") and not urls.is_url("ftp://h/x")


# -- the read core over HTTP, without FUSE ------------------------------------------------------


def test_layout_over_http_reads_as_the_local_one(web: Nginx, real_image: RealImage) -> None:
    local = _files(real_image.layout_dir)
    for name in ("image.tar", "image.tar.gz"):
        with open_layout(web.url(name), ViewOptions()) as layout:
            assert sorted(layout.file_names()) == sorted(local)
            for path, data in local.items():
                assert layout.read_at(path, 0, len(data) + 1) == data, (name, path)


def test_only_what_is_read_is_fetched(web: Nginx, real_image: RealImage) -> None:
    """Opening the layout fetches the headers' blocks, not the 3 MiB layer between them."""
    size = real_image.archive.stat().st_size
    origin = remote.RemoteObject(web.url("image.tar"))
    try:
        layout = open_layout(web.url("image.tar"), ViewOptions())
        with layout:
            layout.index()
            fetched = layout.archive.sources[0].fetched  # type: ignore[attr-defined]
        assert fetched < size / 2, (fetched, size)
    finally:
        origin.close()


def test_sequential_reads_widen_the_window(web: Nginx, real_image: RealImage) -> None:
    obj = remote.RemoteObject(web.url("image.tar"))
    try:
        src = obj.source()
        want = real_image.archive.read_bytes()
        got = bytearray()
        requests_before = _requests(web)
        while len(got) < len(want):
            got += src.pread(len(got), 128 * 1024)
        assert bytes(got) == want
        # 3 MiB in 128 KiB reads is 25 reads; read-ahead fetches them in a handful of requests.
        assert _requests(web) - requests_before < 12
    finally:
        obj.close()


def _requests(server: Nginx) -> int:
    log = server.directory / "access.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_replaced_object_answers_eio(www: Path, tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(www / "image.tar", root / "image.tar")
    with nginx(tmp_path / "nginx", root) as server:
        obj = remote.RemoteObject(server.url("image.tar"))
        try:
            src = obj.source()
            first = src.pread(0, 512)
            (root / "image.tar").write_bytes(b"x" * 5000)
            assert src.pread(0, 512) == first  # in memory: the object as it was
            with pytest.raises(OcifuseError) as e:
                src.pread(2 * 1024 * 1024, 512)
            assert e.value.errno == errno.EIO
            assert "changed" in str(e.value)
        finally:
            obj.close()


def test_404_at_open_is_one_line(web: Nginx) -> None:
    with pytest.raises(LayoutOpenError, match="not found"):
        open_layout(web.url("missing.tar") + "?sig=secret", ViewOptions())
    done = run_ocifuse("inspect", web.url("missing.tar") + "?sig=secret")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "secret" not in done.stderr and "not found" in done.stderr


def test_a_server_that_ignores_range_is_refused(www: Path) -> None:
    """http.server answers a ranged GET with 200 and the whole body: refused at open, nothing held."""
    with http_server(www) as base:
        with pytest.raises(LayoutOpenError) as e:
            open_layout(f"{base}/image.tar", ViewOptions())
        assert "Range" in str(e.value)
        done = run_ocifuse("inspect", f"{base}/image.tar")
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- commands ------------------------------------------------------------------------------------


def test_inspect_and_fsck_a_url(web: Nginx) -> None:
    url = web.url("image.tar.gz").replace("http://", "http://someone:hunter2@") + "?token=secret"
    done = run_ocifuse("inspect", url)
    assert done.returncode == 0, done.stderr
    assert "v1" in done.stdout
    done = run_ocifuse("fsck", url)
    assert done.returncode == 0, done.stdout + done.stderr
    for out in (done.stdout, done.stderr):
        assert "secret" not in out and "hunter2" not in out


# -- real mounts ---------------------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("name", ["image.tar", "image.tar.gz"])
def test_mount_over_http_reads_as_the_local_one(
    web: Nginx, real_image: RealImage, tmp_path: Path, name: str
) -> None:
    url = web.url(name).replace("http://", "http://someone:hunter2@") + "?X-Amz-Signature=secret"
    with mounted(url, tmp_path / "mnt", args=["--no-cache"]) as m:
        assert _files(m.mountpoint) == _files(real_image.layout_dir)
        assert mount_source(m.mountpoint) == web.url(name)
        proc_mounts = Path("/proc/mounts").read_text()
        assert "secret" not in proc_mounts and "hunter2" not in proc_mounts
        assert "secret" not in m.stderr() and "hunter2" not in m.stderr()


@pytest.mark.fuse
def test_rootfs_over_http(web: Nginx, real_image: RealImage, tmp_path: Path) -> None:
    with mounted(web.url("image.tar.gz"), tmp_path / "mnt", args=["--rootfs", "--no-cache"]) as m:
        for path in ("/hello.txt", "/data/big.bin"):  # tag v1's files (/etc/app is v2's)
            data = real_image.files[path]
            assert m.path(path.lstrip("/")).read_bytes() == data


@pytest.mark.fuse
@pytest.mark.parametrize("name", ["image.tar", "image.tar.gz"])
def test_mount_from_s3_reads_as_the_local_one(
    www: Path, real_image: RealImage, tmp_path: Path, name: str
) -> None:
    with s3_server() as s3:
        url = s3.put("images", f"dir/{name}", www / name)
        env = s3.env()
        with mounted(url, tmp_path / "mnt", args=["--no-cache"], env=env) as m:
            assert _files(m.mountpoint) == _files(real_image.layout_dir)
            assert mount_source(m.mountpoint) == url
            assert "testing-secret" not in Path("/proc/mounts").read_text()


def test_inspect_s3(www: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server() as s3:
        url = s3.put("images", "image.tar", www / "image.tar")
        s3.use_in(monkeypatch)
        with open_layout(url, ViewOptions()) as layout:
            assert "index.json" in set(layout.file_names())
        with pytest.raises(LayoutOpenError, match="not found"):
            open_layout("s3://images/none.tar", ViewOptions())


@pytest.mark.fuse
def test_replaced_under_a_live_mount_then_server_down_then_back(
    www: Path, real_image: RealImage, tmp_path: Path
) -> None:
    """Replaced: EIO for what is not in memory. Down: EIO within -o timeout, the mount stays; back: reads."""
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(www / "image.tar", root / "image.tar")
    local = _files(real_image.layout_dir)
    big = max(local, key=lambda k: len(local[k]))
    server = Nginx(tmp_path / "nginx", root)
    try:
        server.start()
        url = server.url("image.tar")
        with mounted(url, tmp_path / "mnt", options=["timeout=4"], args=["--no-cache"]) as m:
            assert m.path("index.json").read_bytes() == local["index.json"]
            # Down: the big blob is not in memory yet.
            server.stop()
            start = time.monotonic()
            with pytest.raises(OSError) as e:
                m.path(big).read_bytes()
            elapsed = time.monotonic() - start
            assert e.value.errno == errno.EIO, m.stderr()
            assert elapsed < 4 + 3, (elapsed, m.stderr())
            assert m.alive() and is_mounted(m.mountpoint)
            assert "index.json" in os.listdir(m.mountpoint)
            # Back: the same read works, without a remount.
            server.start()
            assert m.path(big).read_bytes() == local[big], m.stderr()
        # Replaced under a live mount: what is not in memory answers EIO, never the new bytes.
        with mounted(server.url("image.tar"), tmp_path / "mnt2", args=["--no-cache"]) as m:
            assert m.path("index.json").read_bytes() == local["index.json"]
            (root / "image.tar").unlink()
            (root / "image.tar").write_bytes(os.urandom(len((www / "image.tar").read_bytes())))
            # Same size; nginx's ETag is mtime (seconds) and size: make sure the second differs.
            later = (root / "image.tar").stat().st_mtime + 10
            os.utime(root / "image.tar", (later, later))
            with pytest.raises(OSError) as e:
                m.path(big).read_bytes()
            assert e.value.errno == errno.EIO, m.stderr()
            assert m.alive()
    finally:
        server.stop()


@pytest.mark.fuse
def test_404_at_mount_is_one_line_and_nothing_mounted(web: Nginx, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_ocifuse("mount", web.url("missing.tar"), mnt)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "not found" in done.stderr
    assert not is_mounted(mnt)


@pytest.mark.fuse
def test_https_with_a_private_ca(www: Path, real_image: RealImage, tmp_path: Path) -> None:
    """TLS is verified: a certificate of an unknown CA is refused (one line), -o cafile= trusts it."""
    ca, cert, key = make_ca(tmp_path / "ca")
    with nginx(tmp_path / "nginx", www, tls=(cert, key)) as server:
        url = server.https_url("image.tar")
        done = run_ocifuse("inspect", url)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "TLS" in done.stderr and "certificate" in done.stderr, done.stderr
        with pytest.raises(LayoutOpenError):
            open_layout(url, ViewOptions())
        with open_layout(url, ViewOptions(remote=urls.RemoteOptions(cafile=str(ca)))) as layout:
            assert (
                layout.read_at("index.json", 0, 1 << 20)
                == (real_image.layout_dir / "index.json").read_bytes()
            )
        with mounted(url, tmp_path / "mnt", options=[f"cafile={ca}"], args=["--no-cache"]) as m:
            assert _files(m.mountpoint) == _files(real_image.layout_dir)


@pytest.mark.fuse
def test_background_mount_of_a_url(web: Nginx, real_image: RealImage, tmp_path: Path) -> None:
    """The daemon forks after opening the URL: the child makes its own client and reads on."""
    mnt = tmp_path / "mnt"
    with background_mount(web.url("image.tar.gz"), mnt, args=["--no-cache"]) as done:
        assert done.returncode == 0, done.stderr
        assert _files(mnt) == _files(real_image.layout_dir)


def test_zstd_archive_over_http(www: Path, web: Nginx, real_image: RealImage) -> None:
    compress("zstd", www / "image.tar", www / "image.tar.zst")
    with open_layout(web.url("image.tar.zst"), ViewOptions()) as layout:
        assert layout.compression == "zstd"
        for path, data in _files(real_image.layout_dir).items():
            assert layout.read_at(path, 0, len(data) + 1) == data


def test_blocks_are_kept_in_the_index_cache_across_opens(
    web: Nginx, real_image: RealImage, tmp_path: Path
) -> None:
    """A second open with the same cache reads everything again without fetching a block."""
    local = _files(real_image.layout_dir)
    for name in ("image.tar", "image.tar.gz"):
        cache = IndexCache(str(tmp_path / f"cache-{name}"))
        served = web.served_bytes()
        with open_layout(web.url(name), ViewOptions(cache=cache)) as layout:
            for path, data in local.items():
                assert layout.read_at(path, 0, len(data) + 1) == data
        assert web.served_bytes() - served >= 512 * 1024  # the first open fetched the blobs
        served = web.served_bytes()
        with open_layout(web.url(name), ViewOptions(cache=cache)) as layout:
            for path, data in local.items():
                assert layout.read_at(path, 0, len(data) + 1) == data
        assert web.served_bytes() - served == 0, name  # a HEAD, no body


@pytest.fixture(scope="module")
def big(www: Path) -> bytes:
    """An object of three chunks of the block cache, the last one short (www/big.bin)."""
    data = os.urandom(2 * remote.CHUNK + 5 * remote.BLOCK + 12345)
    (www / "big.bin").write_bytes(data)
    return data


def _read_all(src: remote.RemoteSource, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        got += src.pread(len(got), 128 * 1024)  # the FUSE read size
    return bytes(got)


def _held(src: remote.RemoteSource, size: int) -> int:
    """Bytes of the object the index cache holds for ``src`` (its chunks' entries)."""
    return sum(len(block) for c in range(-(-size // remote.CHUNK)) for block in src._load_chunk(c).values())


def test_a_sequential_read_never_waits_for_the_disk_and_a_later_one_keeps_the_rest(
    web: Nginx, big: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block writer stuck on its first entry: the whole object is still read (what finds no room
    behind the reads is not kept), the next read fetches exactly what was not kept and keeps it,
    and a third reads from the cache alone."""
    monkeypatch.setattr(remote, "WRITE_BEHIND", remote.CHUNK)  # room for one chunk behind the reads
    cache = IndexCache(str(tmp_path / "cache"))
    stored = IndexCache.store
    go = threading.Event()

    def stuck(self: IndexCache, kind: str, key: str, payload: bytes) -> None:
        assert go.wait(60)
        stored(self, kind, key, payload)

    monkeypatch.setattr(IndexCache, "store", stuck)
    obj = remote.RemoteObject(web.url("big.bin"), cache=cache)
    try:
        assert _read_all(obj.whole, len(big)) == big  # the writer has stored nothing yet
        assert obj.whole.fetched == len(big)  # each byte fetched once
    finally:
        go.set()
        obj.close()  # the writer stores what was queued, then stops
    monkeypatch.setattr(IndexCache, "store", stored)
    monkeypatch.setattr(remote, "WRITE_BEHIND", 64 * remote.CHUNK)
    again = remote.RemoteObject(web.url("big.bin"), cache=cache)
    try:
        kept = _held(again.whole, len(big))
        assert 0 < kept <= 2 * remote.CHUNK  # at most what was queued: the rest was not kept
        before = again.whole.fetched
        assert _read_all(again.whole, len(big)) == big
        assert again.whole.fetched - before == len(big) - kept  # what was not kept, and only it
    finally:
        again.close()
    served = web.served_bytes()
    third = remote.RemoteObject(web.url("big.bin"), cache=cache)
    try:
        assert _read_all(third.whole, len(big)) == big
        assert third.whole.fetched == 0
    finally:
        third.close()
    assert web.served_bytes() == served  # a HEAD, no body
    entries = [e for e in cache.entries() if e.kind == "remote-block"]
    assert len(entries) == 3  # one entry per chunk, not one per block


def test_blocks_of_one_chunk_fetched_apart_are_kept_together(web: Nginx, big: bytes, tmp_path: Path) -> None:
    """Random reads of one chunk, each its own fetch: the chunk's entry gains each block, loses none."""
    cache = IndexCache(str(tmp_path / "cache"))
    obj = remote.RemoteObject(web.url("big.bin"), cache=cache)  # fetches block 0
    picks = [remote.CHUNK_BLOCKS + 7, remote.CHUNK_BLOCKS + 2, remote.CHUNK_BLOCKS + 9]
    try:
        for b in picks:  # backwards and apart: no read-ahead
            assert obj.whole.pread(b * remote.BLOCK + 10, 100) == big[b * remote.BLOCK + 10 :][:100]
    finally:
        obj.close()
    again = remote.RemoteObject(web.url("big.bin"), cache=cache)
    try:
        held = again.whole._load_chunk(1)
        assert sorted(held) == sorted(picks)
        for b in picks:
            assert bytes(held[b]) == big[b * remote.BLOCK : (b + 1) * remote.BLOCK]
        before = again.whole.fetched
        for b in picks:
            assert again.whole.pread(b * remote.BLOCK, 3) == big[b * remote.BLOCK :][:3]
        assert again.whole.fetched == before == 0  # block 0 too came from the cache
    finally:
        again.close()


def test_a_chunk_entry_of_another_shape_is_fetched_again(
    web: Nginx, big: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole entry (its checksum good) whose bitmap or length does not fit the chunk: not served."""
    cache = IndexCache(str(tmp_path / "cache"))
    obj = remote.RemoteObject(web.url("big.bin"), cache=cache)
    obj.close()
    src = obj.whole
    last = len(big) // remote.CHUNK
    cache.store("remote-block", src._chunk_key(last), (1 << 40).to_bytes(8, "little") + b"x" * 10)
    cache.store("remote-block", src._chunk_key(1), (1).to_bytes(8, "little") + b"x" * 10)
    again = remote.RemoteObject(web.url("big.bin"), cache=cache)
    try:
        for b in (remote.CHUNK_BLOCKS, last * remote.CHUNK_BLOCKS):
            assert again.whole.pread(b * remote.BLOCK, 50) == big[b * remote.BLOCK :][:50]
        assert again.whole.fetched == 2 * remote.BLOCK
    finally:
        again.close()
    assert "unusable" in caplog.text


def test_the_memory_bound_counts_each_buffer_once(web: Nginx, big: bytes) -> None:
    """Blocks are views of the answers they came in: the bound counts those answers, whole."""
    obj = remote.RemoteObject(web.url("big.bin"), urls.RemoteOptions(memory=3 * remote.BLOCK))
    try:
        src = obj.whole
        assert _read_all(src, len(big)) == big
        for b in (20, 3, 40):  # and random reads
            assert src.pread(b * remote.BLOCK, 10) == big[b * remote.BLOCK :][:10]
        buffers = {id(block.obj): block.obj for block in src._blocks.values()}
        assert src._held == sum(len(memoryview(buf)) for buf in buffers.values())
        assert src._held <= 3 * remote.BLOCK or len(src._blocks) == 1
    finally:
        obj.close()


def test_an_s3_object_replaced_answers_eio(
    www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with s3_server() as s3:
        url = s3.put("images", "image.tar", www / "image.tar")
        s3.use_in(monkeypatch)
        obj = remote.RemoteObject(url)
        try:
            src = obj.source()
            first = src.pread(0, 512)
            (tmp_path / "other").write_bytes(os.urandom(obj.size))
            s3.put("images", "image.tar", tmp_path / "other")
            assert src.pread(0, 512) == first  # in memory: the object as it was
            with pytest.raises(OcifuseError) as e:
                src.pread(2 * 1024 * 1024, 512)
            assert e.value.errno == errno.EIO and "changed" in str(e.value)
        finally:
            obj.close()


@pytest.mark.parametrize("timeout", [1, 4, 30, 120])
def test_the_clients_retries_sleep_half_the_timeout_at_most(timeout: float) -> None:
    """A connection refused is retried max_retries times whatever the time: the count keeps the bound."""
    config = remote._retry(urls.RemoteOptions(timeout=timeout))
    backoff = config["backoff"]
    sleep, total = backoff["init_backoff"].total_seconds(), 0.0
    for _ in range(config["max_retries"]):
        total += sleep
        sleep = min(backoff["max_backoff"].total_seconds(), sleep * backoff["base"])
    assert config["max_retries"] > 0 and total <= timeout / 2
