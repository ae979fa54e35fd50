"""Remote objects read by range: an archive on an HTTP(S) server or in S3-compatible storage.

One client library for both, obstore (Rust's object_store under Python): on loopback nginx it
fetched 8 MiB parts at 1.08 GB/s against httpx's 0.66, and 64 KiB random ranges at p99 0.45 ms
against 1.17 (DESIGN.md); it releases the GIL while it waits, retries with backoff, and speaks
S3 (signing, the AWS environment) as well as plain HTTP. It is imported only when a URL is opened.

What a remote read promises (issue 16):

- never bytes of another object: every range request carries ``If-Match`` with the ETag seen at
  open, and every answer is checked against the size (and, without an ETag, the Last-Modified)
  seen at open; an object replaced under a mount answers EIO (ArchiveChanged), never new bytes;
- never the whole object in memory: an answer that is not the range asked for (a server that
  ignores ``Range`` answers 200 and the whole body) is refused before its body is read;
- a short or long body is EIO; a server that is down or slow is retried with backoff, then EIO
  within ``timeout`` seconds; the next read tries again (the mount stays up);
- only what is read is fetched: random reads fetch small blocks, sequential reads widen a
  read-ahead window (1 MiB doubling to 32 MiB, in parts of up to 8 MiB fetched concurrently:
  mountpoint-s3's shape); fetched blocks stay in a bounded in-memory LRU, and concurrent readers
  of one block fetch it once; with the index cache, blocks are written behind the reads in
  entries of one aligned 4 MiB chunk each (a bitmap of the blocks held, then those blocks).

Redirects are resolved at open, by remote.py itself (``follow``): object_store's client (reqwest)
follows up to 10 of them on every request, from https to http too, and cannot be told otherwise;
resolved once, at most MAX_REDIRECTS and never from https to http, the ranges then go straight to
the final URL (one round trip each, not two).

URLs name the object; what is shown of one (``redact``: logs, /proc/mounts, inspect, fsck, cache
keys) has no userinfo and no query string (presigned URLs carry their signature there).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FetchTimeout  # the builtin's alias from 3.11 on
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from .credentials import authorization, aws_settings
from .errors import ArchiveChanged, LayoutOpenError, OcifuseError
from .source import Origin, Source
from .store import REMOTE_BLOCK, Store
from .urls import RemoteOptions, redact

if TYPE_CHECKING:  # obstore's TypedDicts exist only for type checkers
    from obstore import GetOptions
    from obstore.store import ClientConfig, HTTPStore, RetryConfig, S3Config, S3Store

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
# A random read fetches the aligned block(s) holding it.
BLOCK = 256 * KiB
# Sequential reads: the read-ahead window starts here and doubles on each sequential read ...
WINDOW_START = 1 * MiB
# ... up to this, fetched in parts of at most PART bytes, FETCHERS of them at a time.
WINDOW_MAX = 32 * MiB
PART = 8 * MiB  # a multiple of CHUNK
FETCHERS = 4
# How many sequential streams are followed at once (readers of different files).
STREAMS = 16
# The index cache keeps blocks in entries of one aligned CHUNK each (the blocks of it that were
# fetched, which later stores of the chunk add to): one file, one checksum per 4 MiB, not per 256 KiB.
CHUNK = 4 * MiB
CHUNK_BLOCKS = CHUNK // BLOCK
# At most this many bytes of blocks are written by one open of an object, behind the reads: up to
# WRITE_BEHIND bytes wait for the writer, and what finds no room there is not kept (a later read
# of it fetches it again and keeps it then). No read waits for the disk: a sequential read faster
# than the disk takes its blocks is not slowed to the disk's pace (bench/README.md measures both).
DISK_MAX = 1024 * MiB
WRITE_BEHIND = 64 * MiB
# Redirects followed at open (curl's default is 50, browsers' 20; an object is rarely more than one away).
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)  # RFC 9110 15.4


# A block: a view of the buffer it was fetched or loaded in (a part of up to PART bytes, a
# chunk's entry), never a copy of its own; the memory bound counts the buffers (RemoteSource._keep).
Block = memoryview


class RemoteError(OcifuseError):
    """A range of a remote object could not be had (server down, timeout, a wrong answer): EIO."""


_URL = re.compile(r"\b(?:https?|s3)://[^\s'\"<>]+")


def _why(e: BaseException) -> str:
    """A one-line reason for a client error, without any URL in it (a URL may carry secrets)."""
    from obstore import exceptions as ox

    known: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        # obstore raises Python's own FileNotFoundError and PermissionError for these.
        ((ox.NotFoundError, FileNotFoundError), "not found (404)"),
        ((ox.PermissionDeniedError, PermissionError), "permission denied (403)"),
        (ox.UnauthenticatedError, "not authorized (401)"),
        (ox.PreconditionError, "changed since it was opened (412)"),
    )
    for kind, text in known:
        if isinstance(e, kind):
            return text
    full = str(e)
    retries = re.search(r"after (\d+) retries", full)
    tail = f", after {retries.group(1)} retries" if retries else ""
    lower = full.lower()
    if "169.254.169.254" in full or "169.254.170.2" in full:  # the credential chain's last resorts
        return "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if "dns error" in lower or "failed to lookup address" in lower:
        return f"the host name does not resolve{tail}"
    tls = re.search(r"InvalidCertificate\(\s*(\w+)", full)  # rustls: UnknownIssuer, NotValidForName, Expired
    if tls:
        return f"TLS: the server's certificate is not trusted ({tls.group(1)}; -o cafile= adds a CA){tail}"
    os_error = re.search(r'message: "([^"]+)"', full)
    if os_error:
        return f"{os_error.group(1)}{tail}"
    status = re.search(r"status code: (\d{3}[^:\n]*)", full)
    if status:
        return f"the server answered {status.group(1).strip()}{tail}"
    if "timed out" in lower or "kind: timeout" in lower:
        return f"timed out{tail}"
    lines = full.strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return _URL.sub(lambda m: redact(m.group(0)), line)[:300]


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name) or os.environ.get(name.lower())
        if value:
            return value
    return None


def _proxy(scheme: str) -> str | None:
    """The proxy for ``scheme`` as curl reads them: HTTPS_PROXY for https, HTTP_PROXY for http, ALL_PROXY."""
    return _env("HTTPS_PROXY", "ALL_PROXY") if scheme in ("https", "s3") else _env("HTTP_PROXY", "ALL_PROXY")


def _client_options(scheme: str, options: RemoteOptions, auth: str | None = None) -> ClientConfig:
    """reqwest's settings: timeouts within ``options.timeout``, the proxy of the environment, a CA file.

    ``auth``: the ``Authorization`` header every request carries (credentials.authorization).
    """
    t = max(1.0, options.timeout)
    config: ClientConfig = {
        "allow_http": True,
        # One request may take half the budget; retries of failed ones the other half.
        "timeout": timedelta(seconds=t / 2),
        "connect_timeout": timedelta(seconds=min(5.0, t / 4)),
        "pool_max_idle_per_host": str(FETCHERS * 2),
    }
    proxy = _proxy(scheme)
    if proxy:
        config["proxy_url"] = proxy
        excludes = _env("NO_PROXY")
        if excludes:
            config["proxy_excludes"] = excludes
    if options.cafile:
        try:
            with open(options.cafile, "rb") as f:
                config["root_certificate"] = f.read()
        except OSError as e:
            raise OcifuseError(f"cafile {options.cafile}: {e.strerror or e}") from e
    if auth is not None:
        config["default_headers"] = {"Authorization": auth}
    return config


def _retry(options: RemoteOptions) -> RetryConfig:
    """Retries whose backoff sleeps add up to half of ``timeout`` at most.

    object_store stops retrying at ``retry_timeout`` only for some errors: a connection refused is
    retried ``max_retries`` times whatever the time, so the count itself must keep within budget.
    """
    t = max(1.0, options.timeout)
    init, cap = 0.1, min(4.0, t / 4)
    retries, slept, backoff = 0, 0.0, init
    while retries < 10 and slept + backoff <= t / 2:
        retries, slept, backoff = retries + 1, slept + backoff, min(cap, backoff * 2)
    return {
        "max_retries": retries,
        "retry_timeout": timedelta(seconds=t / 2),
        "backoff": {
            "init_backoff": timedelta(seconds=init),
            "max_backoff": timedelta(seconds=cap),
            "base": 2,
        },
    }


def _without_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (its credentials travel in the Authorization header)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def follow(url: str, options: RemoteOptions) -> tuple[str, str | None]:
    """(the URL an http(s) object is at after its server's redirects, the Authorization sent there).

    One ``HEAD`` per hop, redirects not followed by the client: at most MAX_REDIRECTS of them,
    never from https to anything else (a downgrade would send the ranges, and any credentials,
    in the clear). An answer that is no redirect (200, and 401 or 404 too) ends the walk: the
    client's own ``HEAD`` then says what is wrong. Credentials go with each hop as
    credentials.authorization decides (a credentials file to the named URL's origin only).
    """
    import http.client
    import socket
    import ssl
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None  # urllib then raises HTTPError with the 3xx answer and its Location

    context = ssl.create_default_context()
    if options.cafile:
        try:
            context.load_verify_locations(cafile=options.cafile)
        except (OSError, ssl.SSLError) as e:
            raise OcifuseError(f"cafile {options.cafile}: {getattr(e, 'strerror', None) or e}") from e
    origin, t = url, max(1.0, options.timeout)
    for hop in range(MAX_REDIRECTS + 1):
        scheme = urlsplit(url).scheme.lower()
        proxy = _proxy(scheme)
        opener = urllib.request.build_opener(
            NoRedirect(),
            urllib.request.ProxyHandler({scheme: proxy} if proxy else {}),
            urllib.request.HTTPSHandler(context=context),
        )
        auth = authorization(url, credentials=options.credentials, origin=origin)
        request = urllib.request.Request(
            _without_userinfo(url), method="HEAD", headers={"Authorization": auth} if auth else {}
        )
        deadline, backoff = time.monotonic() + t / 2, 0.1
        while True:
            try:
                with opener.open(request, timeout=t / 2):
                    return url, auth
            except urllib.error.HTTPError as e:
                status, location = e.code, e.headers.get("Location")
                e.close()
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                if isinstance(reason, ssl.SSLCertVerificationError):
                    why = reason.verify_message or "certificate verify failed"
                    raise OcifuseError(
                        f"TLS: the server's certificate is not trusted ({why}; -o cafile= adds a CA)"
                    ) from e
                if isinstance(reason, ssl.SSLError):  # a handshake that failed fails again
                    raise OcifuseError(f"TLS: {reason.reason or reason}") from e
                if isinstance(reason, socket.gaierror):
                    raise OcifuseError("the host name does not resolve") from e
                # Refused, reset, timed out: retried with backoff, as the client retries.
                if time.monotonic() + backoff > deadline:
                    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
                    text = _URL.sub(lambda m: redact(m.group(0)), text or type(reason).__name__)
                    raise OcifuseError(text) from e
                time.sleep(backoff)
                backoff = min(4.0, backoff * 2)
        if status not in _REDIRECTS or not location:
            return url, auth
        if hop == MAX_REDIRECTS:
            raise OcifuseError(f"more than {MAX_REDIRECTS} redirects")
        target = urljoin(url, location)
        to = urlsplit(target).scheme.lower()
        if to not in ("http", "https") or (scheme == "https" and to != "https"):
            raise OcifuseError(f"redirected from {scheme} to {to or '?'}, refused ({redact(target)})")
        log.debug("%s: redirected (%d) to %s", redact(url), status, redact(target))
        url = target
    raise AssertionError("unreachable")


def _open_store(
    url: str, options: RemoteOptions, auth: str | None = None
) -> tuple[S3Store | HTTPStore, str, str]:
    """(an obstore store, the object's path in it, the object's identity's place) for ``url``.

    ``auth``: for http(s), the Authorization header (``follow``'s); ``url`` is then the final one.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        from obstore.store import S3Store

        bucket = parts.hostname or ""
        key = parts.path.lstrip("/")
        if not bucket or not key:
            raise OcifuseError(f"{redact(url)}: an s3 URL is s3://BUCKET/KEY")
        # The AWS tools' variables: object_store reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
        # AWS_SESSION_TOKEN, AWS_REGION, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL from the environment
        # itself; AWS_PROFILE and the ~/.aws files it does not read (credentials.aws_settings). The
        # S3-specific endpoint variable wins, as in the AWS CLI. A custom endpoint is addressed
        # path-style (object_store's default): MinIO, Ceph RGW and moto need it.
        config: S3Config = {}
        settings = aws_settings()
        for name in ("access_key_id", "secret_access_key", "session_token", "region"):
            if name in settings:
                config[name] = settings[name]
        endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") or settings.get("endpoint")
        if endpoint:
            config["endpoint"] = endpoint
        if not (_env("AWS_REGION", "AWS_DEFAULT_REGION") or "region" in config):
            config["region"] = "us-east-1"
        store = S3Store(
            bucket,
            config=config,
            client_options=_client_options(scheme, options),
            retry_config=_retry(options),
        )
        place = f"s3://{bucket}/{key}" + (f" at {redact(endpoint)}" if endpoint else "")
        return store, key, place
    from obstore.store import HTTPStore

    # The store's URL is the object's own (with its query string: a presigned URL's signature);
    # the object is its empty path. Credentials go in the Authorization header, never the URL.
    http = HTTPStore.from_url(
        _without_userinfo(url),
        client_options=_client_options(scheme, options, auth),
        retry_config=_retry(options),
    )
    return http, "", redact(url)


class RemoteObject(Origin):
    """An object on a server, as seen at open: its size and ETag (or Last-Modified), read by range."""

    def __init__(self, url: str, options: RemoteOptions | None = None, cache: Store | None = None) -> None:
        """HEAD the object and fetch its first block; LayoutOpenError (one line) when it cannot be read."""
        import obstore

        self.url = url
        self.name = redact(url)
        self.options = options or RemoteOptions()
        self._auth: str | None = None
        try:
            if urlsplit(url).scheme.lower() in ("http", "https"):
                self.url, self._auth = follow(url, self.options)  # the ranges go to the final URL
            self._store, self._path, place = _open_store(self.url, self.options, self._auth)
            self._place = place if self.url == url else self.name  # the URL named: the cache's key
            meta = obstore.head(self._store, self._path)
        except OcifuseError as e:
            raise LayoutOpenError(self.name, str(e).removeprefix(f"{self.name}: ")) from e
        except Exception as e:  # obstore's errors, and anything of the client's own
            raise LayoutOpenError(self.name, _why(e)) from e
        self.size = int(meta["size"])
        self.etag: str | None = meta.get("e_tag") or None
        modified: datetime | None = meta.get("last_modified")
        self.last_modified = modified
        self.mtime = modified.timestamp() if modified is not None else 0.0
        self._pid = os.getpid()
        self.whole = RemoteSource(self, cache if cache is not None and cache.enabled else None)
        try:
            self.whole.pread(0, min(self.size, BLOCK))  # a server that ignores Range is refused here
        except OcifuseError as e:
            self.whole.close()
            raise LayoutOpenError(self.name, str(e).removeprefix(f"{self.name}: ")) from e
        log.debug("%s: %d bytes, ETag %s, Last-Modified %s", self.name, self.size, self.etag, modified)

    def source(self) -> Source:
        return self.whole

    @property
    def strong_etag(self) -> bool:
        """True for an ETag that names these exact bytes (RFC 9110 8.8.3: a ``W/`` one does not)."""
        return self.etag is not None and self.etag != "" and not self.etag.startswith("W/")

    def identity(self) -> str | None:
        """The object's place (no secrets), its strong ETag and size: a cache key; None without one.

        Without a strong ETag nothing is kept: Last-Modified has one-second resolution, and the
        place leaves out the query string, which may be what tells two objects apart.
        """
        return f"url:{self._place}:etag={self.etag}:{self.size}" if self.strong_etag else None

    def store(self) -> S3Store | HTTPStore:
        """The client; RemoteError in a process forked after it was used (a background mount's daemon).

        obstore runs its requests on a tokio runtime whose threads a fork does not copy, and a
        client made again in the child still uses that runtime: every request would wait forever
        (tokio-rs/tokio#4301; obstore is not fork-safe), so daemon.py forks before a URL is opened;
        should anything fork after, a read fails at once (EIO), never hangs the process that reads.
        """
        if os.getpid() != self._pid:
            raise RemoteError(
                f"{self.name}: cannot fetch from a process forked after its client started "
                "(obstore is not fork-safe; a background mount forks before it opens a URL)"
            )
        return self._store

    def fetch(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) of the object as it was at open, or RemoteError/ArchiveChanged (EIO)."""
        import obstore
        from obstore import exceptions as ox

        options: GetOptions = {"range": (start, end)}
        if self.strong_etag:  # If-Match compares strongly: a weak ETag would fail every request
            options["if_match"] = self.etag
        elif self.last_modified is not None:
            options["if_unmodified_since"] = self.last_modified
        try:
            result = obstore.get(self.store(), self._path, options=options)
            meta = result.meta
            got = tuple(result.range)
            if got != (start, end) or int(meta["size"]) != self.size:
                raise RemoteError(
                    f"{self.name}: asked for bytes {start}-{end}, the answer is {got[0]}-{got[1]}"
                    f" of {meta['size']}"
                )
            if self._changed(meta):
                raise ArchiveChanged(self.name)
            data = memoryview(result.bytes())  # Rust's buffer, not copied: fetch_run cuts it into blocks
        except OcifuseError:
            raise
        except ox.PreconditionError as e:
            raise ArchiveChanged(self.name) from e
        except Exception as e:
            why = _why(e)
            if isinstance(e, ox.NotSupportedError) or "non-partial" in why.lower():
                # 200 and the whole body (or 200 with a Content-Range): refused before the body is read.
                why = "the server ignores Range requests (it answers with the whole object)"
            raise RemoteError(f"{self.name}: bytes {start}-{end}: {why}") from e
        if len(data) != end - start:
            raise RemoteError(f"{self.name}: bytes {start}-{end}: {len(data)} bytes in the answer")
        return data

    def _changed(self, meta: Any) -> bool:
        etag = meta.get("e_tag") or None
        if self.etag:
            return etag is not None and etag != self.etag
        return etag is not None or meta.get("last_modified") != self.last_modified

    def close(self) -> None:
        self.whole.close()


class RemoteSource(Source):
    """A remote object's bytes: blocks fetched by range on first read, read-ahead on sequential reads."""

    def __init__(self, obj: RemoteObject, disk: Store | None = None) -> None:
        """``disk``: the index cache, where fetched blocks are kept across mounts (None: memory only)."""
        self.obj = obj
        self.size = obj.size
        key = obj.identity()
        self._disk = disk if key is not None else None  # no strong ETag: blocks kept in memory only
        self._disk_key = key or ""
        self._disk_left = DISK_MAX
        self._writes: deque[tuple[int, dict[int, Block]] | None] = deque()  # (chunk, its blocks); None: stop
        self._queued = 0  # bytes in ``_writes``
        self._entering = 0  # fetchers on their way into ``_writes`` (close's sentinel waits for them)
        self._room = threading.Condition(threading.Lock())  # guards _writes and _queued
        self._writer_pid = 0
        self._writer_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, Block] = OrderedDict()  # block index -> its bytes (LRU order)
        self._held = 0  # bytes of the buffers that blocks in ``_blocks`` are views of
        self._buffers: dict[int, int] = {}  # id of such a buffer -> how many of those blocks view it
        self._pending: dict[int, Future[Block]] = {}  # block index -> its fetch in flight
        # end -> (start, window, the block its read-ahead has claimed up to)
        self._streams: OrderedDict[int, tuple[int, int, int]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pid = os.getpid()  # whose fetches ``_pending`` waits for (see _forked)
        self._closed = False
        self.fetched = 0  # bytes fetched (tests and logs)

    # -- reads -----------------------------------------------------------------------------------

    def pread(self, offset: int, size: int) -> bytes:
        size = self.clip(offset, size)
        if size == 0:
            return b""
        # -o timeout= bounds the read as a whole: its own fetch (which the client bounds) and any
        # fetch in flight it waits for (read-ahead started earlier, another reader's).
        deadline = time.monotonic() + self.obj.options.timeout
        first, last = offset // BLOCK, (offset + size - 1) // BLOCK
        waits: dict[int, Future[Block]] = {}
        mine: list[int] = []
        with self._lock:
            if self._closed:
                raise RemoteError(f"{self.obj.name}: closed")
            self._forked()
            ahead = self._advance(offset, size)
            for b in range(first, last + 1):
                data = self._blocks.get(b)
                if data is not None:
                    self._blocks.move_to_end(b)
                    waits[b] = _done(data)
                elif b in self._pending:
                    waits[b] = self._pending[b]
                else:
                    future: Future[Block] = Future()
                    self._pending[b] = future
                    waits[b] = future
                    mine.append(b)
        self._start_ahead(ahead)
        for run in _runs(mine):
            self._fetch_run(run)
        try:
            pieces = [waits[b].result(max(0.0, deadline - time.monotonic())) for b in range(first, last + 1)]
        except FetchTimeout:
            raise RemoteError(
                f"{self.obj.name}: bytes {offset}-{offset + size}: "
                f"no answer within {self.obj.options.timeout:g} s"
            ) from None
        if len(pieces) == 1:
            start = offset - first * BLOCK
            return bytes(pieces[0][start : start + size])
        return b"".join(_cut(pieces, offset - first * BLOCK, size))

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        """The bytes when every block of them is in memory (the FUSE loop's own thread), else None."""
        size = self.clip(offset, size)
        if size == 0:
            return bytearray()
        first, last = offset // BLOCK, (offset + size - 1) // BLOCK
        with self._lock:
            if self._closed:
                return None
            self._forked()
            pieces = []
            for b in range(first, last + 1):
                data = self._blocks.get(b)
                if data is None:
                    return None
                pieces.append(data)
            for b in range(first, last + 1):
                self._blocks.move_to_end(b)
            ahead = self._advance(offset, size)
        self._start_ahead(ahead)
        out = bytearray()
        for piece in _cut(pieces, offset - first * BLOCK, size):
            out += piece
        return out

    def _forked(self) -> None:
        """In a forked child (a background mount), forget the fetches in flight (lock held).

        They were the parent's threads', which the child does not have: their blocks would stay
        pending for good, and every read of them would wait out its timeout and fail.
        """
        if self._pid != os.getpid():
            self._pending.clear()
            self._pid = os.getpid()

    # -- read-ahead ------------------------------------------------------------------------------

    def _advance(self, offset: int, size: int) -> list[list[int]]:
        """Follow the stream this read continues and claim its read-ahead (lock held): the parts to fetch.

        A read continues a stream when it starts after the stream's last read started and no later
        than where it ended (FUSE's concurrent reads may arrive a little out of order); reading the
        same bytes again is no sign of a sequential reader. A random read claims nothing.
        """
        window, claimed = 0, 0
        for end, (start, win, upto) in self._streams.items():
            if start < offset <= end:
                del self._streams[end]
                window, claimed = min(WINDOW_MAX, max(WINDOW_START, win * 2)), upto
                break
        parts, claimed = self._claim_ahead((offset + size - 1) // BLOCK + 1, window, claimed)
        self._streams[offset + size] = (offset, window, claimed)
        self._streams.move_to_end(offset + size)
        while len(self._streams) > STREAMS:
            self._streams.popitem(last=False)
        return parts

    def _claim_ahead(self, start_block: int, window: int, claimed: int) -> tuple[list[list[int]], int]:
        """Mark the missing blocks of the window after ``start_block`` as pending (lock held).

        Returns their parts, and the block the stream's read-ahead now reaches: blocks before
        ``claimed`` (what the stream claimed before) are not looked at again, so that a read's cost
        does not grow with the window.

        The window's end is rounded down to a step of half the window (at most PART): each read
        moves the window on by its own size, but what is claimed grows a step at a time, so that
        read-ahead asks for large aligned parts (8 MiB once the window is 16 MiB), not a block per
        read, and never more than the window ahead (the memory LRU holds the window).
        """
        if window <= 0:
            return [], claimed
        step = min(PART, window // 2) // BLOCK or 1
        end_block = (start_block + window // BLOCK) // step * step
        end_block = min((self.size + BLOCK - 1) // BLOCK, end_block)
        missing = []
        for b in range(max(start_block, claimed), end_block):
            if b not in self._blocks and b not in self._pending:
                self._pending[b] = Future()
                missing.append(b)
        # Parts end on PART boundaries: whole chunks of the disk cache, stored without a merge.
        parts: list[list[int]] = []
        for b in missing:
            if parts and parts[-1][-1] == b - 1 and b % (PART // BLOCK):
                parts[-1].append(b)
            else:
                parts.append([b])
        return parts, max(claimed, end_block)

    def _start_ahead(self, parts: list[list[int]]) -> None:
        """Fetch claimed parts in the pool; nothing once closed (close() failed their futures)."""
        if not parts:
            return
        with self._lock:
            if self._closed:  # closed since the parts were claimed: no pool made again, nothing fetched
                return
            if self._pool is None or self._pool_pid != os.getpid():  # threads do not survive a fork
                self._pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="ocifuse-fetch")
                self._pool_pid = os.getpid()
            pool = self._pool
            for part in parts:
                pool.submit(self._fetch_run, part)

    def _fetch_run(self, run: list[int]) -> None:
        """Get consecutive pending blocks (claimed by the caller): from the disk cache, else one request.

        Each block is handed to its readers as soon as it is had: those of a chunk loaded from the
        disk cache before the next chunk is loaded or anything is fetched.
        """
        with self._lock:
            if self._closed:  # close() failed their futures: nothing to fetch for anyone
                for b in run:
                    self._pending.pop(b, None)
                return
        left = run
        if self._disk is not None:
            for c in range(run[0] // CHUNK_BLOCKS, run[-1] // CHUNK_BLOCKS + 1):
                found = self._load_chunk(c)
                if not found:
                    continue
                had = {b: found.pop(b) for b in left if b in found}
                left = [b for b in left if b not in had]
                self._settle(had)
                with self._lock:  # the chunk's other blocks too: the next reads of it are in memory
                    for b, block in found.items():
                        if not self._closed and b not in self._blocks and b not in self._pending:
                            self._keep(b, block)
        for missing in _runs(left):
            start = missing[0] * BLOCK
            end = min(self.size, (missing[-1] + 1) * BLOCK)
            try:
                data = self.obj.fetch(start, end)
            except BaseException as e:
                with self._lock:
                    futures = [self._pending.pop(b) for b in left]
                error = e if isinstance(e, OcifuseError) else RemoteError(f"{self.obj.name}: {e}")
                for f in futures:
                    if not f.done():
                        f.set_exception(error)
                if not isinstance(e, Exception):
                    raise
                log.debug("%s: bytes %d-%d: %s", self.obj.name, start, end, e)
                return
            with self._lock:
                self.fetched += len(data)
            # Views of the answer, no copy; settled at once, so a failure of the next run of this
            # one (fetched apart only around blocks the disk cache had) fails only its own blocks.
            fetched = {b: data[i * BLOCK : (i + 1) * BLOCK] for i, b in enumerate(missing)}
            left = [b for b in left if b not in fetched]
            self._settle(fetched, fetched=True)

    def _settle(self, blocks: dict[int, Block], *, fetched: bool = False) -> None:
        """Hand pending blocks to their readers and keep them in memory; ``fetched``: on disk too."""
        if not blocks:
            return
        settled = []
        keep = 0  # bytes to keep on disk: the budget is taken with the blocks settled
        with self._lock:
            for b, block in blocks.items():
                settled.append((self._pending.pop(b), block))
                if not self._closed:
                    self._keep(b, block)
            if fetched and self._disk is not None and not self._closed:
                keep = sum(len(block) for block in blocks.values())
                if keep <= self._disk_left:
                    self._disk_left -= keep
                    self._entering += 1  # close() waits for these blocks to be queued
                    self._start_writer()
                else:
                    keep = 0
        for f, block in settled:
            if not f.done():  # close() failed it already
                f.set_result(block)
        if keep:  # the readers have their blocks: now keep them on disk
            self._write_behind(blocks)

    # -- the disk cache ----------------------------------------------------------------------------

    def _chunk_key(self, c: int) -> str:
        return f"{self._disk_key}#{c}"

    def _chunk_blocks(self, c: int) -> range:
        """The blocks of chunk ``c`` (the object's last chunk may hold fewer)."""
        return range(c * CHUNK_BLOCKS, min((self.size + BLOCK - 1) // BLOCK, (c + 1) * CHUNK_BLOCKS))

    def _block_size(self, b: int) -> int:
        return min(BLOCK, self.size - b * BLOCK)

    def _load_chunk(self, c: int) -> dict[int, Block]:
        """The blocks of chunk ``c`` the index cache holds (cache.py checked its checksum); {} if none."""
        assert self._disk is not None
        payload = self._disk.load(REMOTE_BLOCK.kind, self._chunk_key(c))
        if payload is None:
            return {}
        try:
            return _decode_chunk(payload, [(b, self._block_size(b)) for b in self._chunk_blocks(c)])
        except ValueError as e:  # whole (its checksum matched) but not of this object's shape
            log.warning("%s: stored chunk %d unusable (%s): fetching it again", self.obj.name, c, e)
            return {}

    def _load_block(self, b: int) -> Block | None:
        """Block ``b`` from the index cache, if it is there."""
        return self._load_chunk(b // CHUNK_BLOCKS).get(b)

    def _write_behind(self, fetched: dict[int, Block]) -> None:
        """Queue fetched blocks for the disk cache by chunk, within WRITE_BEHIND (DISK_MAX: taken already).

        Never waits: what finds no room is not kept, and its budget is given back.
        """
        by_chunk: dict[int, dict[int, Block]] = {}
        for b, block in fetched.items():
            by_chunk.setdefault(b // CHUNK_BLOCKS, {})[b] = block
        try:
            for c, blocks in by_chunk.items():
                size = sum(len(block) for block in blocks.values())
                with self._room:
                    if not self._queued or self._queued + size <= WRITE_BEHIND:
                        self._writes.append((c, blocks))
                        self._queued += size
                        self._room.notify_all()
                        continue
                log.debug("%s: chunk %d not kept (no room behind the reads)", self.obj.name, c)
                with self._lock:
                    self._disk_left += size
        finally:
            with self._lock:
                self._entering -= 1
            with self._room:
                self._room.notify_all()

    def _start_writer(self) -> None:
        """Start this process's writer thread, once (lock held: close() never sees it made, not started)."""
        if self._writer_pid == os.getpid():
            return
        self._writer_pid = os.getpid()
        writer = threading.Thread(target=self._writer, name="ocifuse-block-writer", daemon=True)
        writer.start()
        self._writer_thread = writer

    def _writer(self) -> None:
        """Store queued chunks: each chunk's queued blocks at once, added to what it already holds."""
        disk = self._disk
        assert disk is not None
        while True:
            with self._room:
                while not self._writes:
                    self._room.wait()
                item = self._writes.popleft()
                if item is None:  # close's sentinel: the writer stops once the last fetcher is in
                    with self._lock:
                        entering = self._entering
                    if not self._writes and not entering:
                        return
                    self._writes.append(None)
                    if not entering:
                        continue
                    self._room.wait(0.05)
                    continue
                c, blocks = item
                for other in [i for i in self._writes if i is not None and i[0] == c]:
                    self._writes.remove(other)
                    blocks = {**blocks, **other[1]}
                taken = sum(len(block) for block in blocks.values())
            try:
                every = self._chunk_blocks(c)
                if len(blocks) < len(every):  # a part of the chunk: keep what the entry holds too
                    blocks = {**self._load_chunk(c), **blocks}
                disk.store(REMOTE_BLOCK.kind, self._chunk_key(c), _encode_chunk(blocks, every))
            finally:
                with self._room:
                    self._queued -= taken
                    self._room.notify_all()

    def _keep(self, b: int, block: Block) -> None:
        """Keep a block (lock held), dropping the least recently used beyond the memory bound.

        The bound counts the buffers blocks are views of, each once and whole: a buffer is let go
        when the last block viewing it is dropped.
        """
        self._drop(self._blocks.pop(b, None))
        self._blocks[b] = block
        owner = id(block.obj)
        seen = self._buffers.get(owner, 0)
        if not seen:
            self._held += _nbytes(block)
        self._buffers[owner] = seen + 1
        while self._held > self.obj.options.memory and len(self._blocks) > 1:
            _, dropped = self._blocks.popitem(last=False)
            self._drop(dropped)

    def _drop(self, block: Block | None) -> None:
        """Count a block out of the memory bound (lock held)."""
        if block is None:
            return
        owner = id(block.obj)
        left = self._buffers.pop(owner) - 1
        if left:
            self._buffers[owner] = left
        else:
            self._held -= _nbytes(block)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._blocks.clear()
            self._buffers.clear()
            self._held = 0
            pool, self._pool = self._pool, None
            waiting = list(self._pending.values())
        for f in waiting:  # read-ahead cancelled below: no reader waits for it for ever
            if not f.done():
                f.set_exception(RemoteError(f"{self.obj.name}: closed"))
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)
        if self._writer_pid == os.getpid():  # the writer finishes what is queued, then stops
            with self._room:
                self._writes.append(None)
                self._room.notify_all()
            if self._writer_thread is not None:
                self._writer_thread.join(10)


def _nbytes(block: Block) -> int:
    """The size of the whole buffer a block is a view of."""
    with memoryview(block.obj) as whole:
        return whole.nbytes


def _done(data: Block) -> Future[Block]:
    f: Future[Block] = Future()
    f.set_result(data)
    return f


def _cut(pieces: list[Block], start: int, size: int) -> list[memoryview]:
    """``size`` bytes from ``start`` of the blocks ``pieces`` laid end to end, as views (no copy)."""
    out = []
    for piece in pieces:
        view = memoryview(piece)[start : start + size]
        out.append(view)
        size -= len(view)
        start = 0
    return out


def _runs(blocks: list[int]) -> list[list[int]]:
    """Sorted block indexes cut into runs of consecutive ones."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _encode_chunk(blocks: dict[int, Block], every: range) -> bytes:
    """A chunk's entry: a u64 bitmap of the blocks it holds (bit i: block ``every[i]``), then those blocks."""
    bits = sum(1 << i for i, b in enumerate(every) if b in blocks)
    return b"".join([bits.to_bytes(8, "little"), *(blocks[b] for b in every if b in blocks)])


def _decode_chunk(payload: bytes, sizes: list[tuple[int, int]]) -> dict[int, Block]:
    """The blocks of a chunk's entry; ``sizes``: (block, its size) of every block of the chunk.

    ValueError for an entry of another shape (bits beyond the chunk, a length that does not add up).
    """
    bits = int.from_bytes(payload[:8], "little")
    if len(payload) < 8 or bits >> len(sizes):
        raise ValueError("a bitmap beyond the chunk")
    view = memoryview(payload)
    out: dict[int, Block] = {}
    at = 8
    for i, (b, size) in enumerate(sizes):
        if bits >> i & 1:
            out[b] = view[at : at + size]  # views of the payload: no copy
            at += size
    if at != len(payload):
        raise ValueError(f"{len(payload)} bytes, the bitmap says {at}")
    return out
