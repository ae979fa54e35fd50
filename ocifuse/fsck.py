"""``ocifuse fsck``: walk everything reachable from index.json and verify it, collecting every finding.

The walk (``check``) is pure: it takes an open Layout and returns a Report; rendering and the exit
status live in ``main``. Each blob is read once, streaming in large chunks; documents (indexes,
manifests, configs, other ``+json`` blobs) up to ``layout.MAX_JSON`` bytes are kept from that same
read and judged by validate.py (the per-document checks, pure), never read a second time. Nothing
stops the walk but an archive that changes under it: every other problem becomes a Finding and the
walk goes on.

Finding codes (stable; scripts may match on them) and their severities: the table in findings.py.

A docker-archive (``manifest.json``, no ``oci-layout``) is checked as the OCI layout the mount
serves for it (dockerarchive.py), plus the ``docker-*`` findings: an image with such an error is
left out of that layout. Its uncompressed layers are served under their diff_ids, so a layer whose
content hashes to something else is ``diffid-mismatch`` (not ``digest-mismatch``).

``blobs_verified`` counts blobs whose content was hashed and ``bytes_verified`` the bytes hashed,
whether or not they matched (a mismatch is a finding).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import validate
from .cache import IndexCache
from .digest import Digest, hash_chunks
from .dockerarchive import docker_view
from .entries import Skipped
from .errors import (
    ArchiveChanged,
    BlobNotFound,
    CompressedDataError,
    DecompressionLimit,
    FileMissing,
    LayoutOpenError,
    NotAnArchive,
    NotAnImage,
    OcifuseError,
    TooLarge,
    TruncatedArchive,
)
from .findings import CODES, Finding, Severity, finding
from .image import check_layers
from .layout import INDEX_JSON, MAX_JSON, OCI_LAYOUT, Layout
from .progress import ProgressBar, on_tty
from .source import sniff
from .units import human_size
from .validate import Child, is_document, is_json
from .views import ViewOptions, open_layout

__all__ = ["CODES", "Finding", "Report", "Severity", "check", "check_path", "finding", "main", "open_failure"]

# Hashing chunk: large reads amortize the per-call cost; hashlib releases the GIL above 2 KiB.
CHUNK = 4 << 20
# Show a progress bar (on a TTY) only when there is at least this much to hash.
PROGRESS_MIN_BYTES = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Everything fsck found, and how much it hashed."""

    findings: tuple[Finding, ...]
    blobs_verified: int = 0
    bytes_verified: int = 0
    compression: str = "plain"  # how the archive is stored: plain, gzip, zstd

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def errors(self) -> int:
        """How many findings are errors."""
        return sum(f.severity is Severity.ERROR for f in self.findings)

    @property
    def codes(self) -> set[str]:
        """The distinct codes of the findings."""
        return {f.code for f in self.findings}

    def to_json(self) -> dict[str, Any]:
        """The report as ``ocifuse fsck --json`` prints it."""
        return {
            "ok": self.ok,
            "compression": self.compression,
            "blobs_verified": self.blobs_verified,
            "bytes_verified": self.bytes_verified,
            "findings": [f.to_json() for f in self.findings],
        }


def open_failure(error: LayoutOpenError) -> Report:
    """The report for a PATH that cannot be opened as a layout (its compression read from its magic)."""
    if isinstance(error, NotAnImage):
        code = "not-an-image"
    elif isinstance(error, CompressedDataError):
        code = "compressed-corrupt"
    elif isinstance(error, DecompressionLimit):
        code = "compressed-too-large"
    elif isinstance(error, TruncatedArchive):
        code = "archive-truncated"
    elif isinstance(error, NotAnArchive):
        code = "archive-corrupt"
    else:
        code = "layout-unreadable"
    compression = error.compression if isinstance(error, CompressedDataError) else _compression_of(error.path)
    return Report(findings=(finding(code, error.message, path=error.path),), compression=compression)


def _compression_of(path: str) -> str:
    """How the file at ``path`` is stored, by its magic bytes: "plain" for anything not compressed."""
    try:
        # O_NONBLOCK: a fifo given as PATH must not wait for a writer (it is not read: not regular).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # missing, unreadable: the finding says which
        return "plain"
    try:
        return (sniff(os.pread(fd, 8, 0)) or "plain") if stat.S_ISREG(os.fstat(fd).st_mode) else "plain"
    except OSError:
        return "plain"
    finally:
        os.close(fd)


# -- the walk --------------------------------------------------------------------------------------


class _Stop(Exception):
    """The walk cannot go on (the archive changed under it)."""


@dataclass(slots=True)
class _Blob:
    """What reading one blob found; ``size`` is None when it is missing or unreadable."""

    size: int | None
    data: bytes | None = None


class _Checker:
    """The state of one fsck walk."""

    def __init__(self, layout: Layout, progress: Callable[[int], None] | None, layers: bool = False) -> None:
        self.layout = layout
        self.progress = progress
        self.layers = layers
        self.findings: list[Finding] = []
        self.blobs: dict[Digest, _Blob] = {}
        self.parsed: set[tuple[Digest, str]] = set()
        self.referenced: set[Digest] = set()
        self.todo: list[Child] = []
        self.blobs_verified = 0
        self.bytes_verified = 0
        # Set when a document could not be parsed: what it refers to is unknown, so "unreferenced"
        # cannot be told apart from "referenced by the unparsable document" and is not reported.
        self.incomplete = False
        # A docker-archive's layers served under their diff_ids, unhashed until now.
        docker = docker_view(layout)
        trusted = () if docker is None else docker.trusted
        self.trusted = {t.diff_id: t.member for t in reversed(trusted)}  # the first member served

    def add(self, code: str, message: str, *, digest: object = None, path: str | None = None) -> None:
        self.findings.append(
            finding(code, message, digest=None if digest is None else str(digest), path=path)
        )

    def run(self) -> Report:
        for s in self.layout.skipped:
            self.member_skipped(s)
        docker = docker_view(self.layout)
        for p in () if docker is None else docker.problems:
            self.add(p.code, p.message, path=p.path)
        try:
            self.header()
            if self.index():
                while self.todo:
                    self.visit(self.todo.pop())
                try:
                    self.unreferenced()
                except (OcifuseError, OSError) as e:
                    self.add("blob-unreadable", f"cannot list blobs/: {e}", path="blobs")
                if self.layers:
                    self.check_layers()
        except _Stop:
            pass
        return Report(
            findings=tuple(self.findings),
            blobs_verified=self.blobs_verified,
            bytes_verified=self.bytes_verified,
            compression=self.layout.compression,
        )

    def check_layers(self) -> None:
        """``--layers``: each image's layers as ``mount --rootfs`` reads them (image.check_layers)."""
        try:
            problems = check_layers(self.layout)
        except ArchiveChanged as e:
            self.add("archive-changed", str(e), path=self.layout.path)
            raise _Stop from e
        except OcifuseError:
            return  # index.json itself is unreadable: already a finding of the main walk
        for p in problems:
            self.add(p.code, p.message, digest=p.digest, path=Digest.parse(p.digest).path)

    def member_skipped(self, s: Skipped) -> None:
        self.add("member-skipped", f"archive member {s.name!r} not served: {s.reason}", path=s.name)

    def read_file(self, name: str, limit: int) -> bytes:
        """A small file of the layout; ArchiveChanged stops the walk."""
        try:
            return self.layout.read_small(name, limit)
        except ArchiveChanged as e:
            self.add("archive-changed", e.message, path=self.layout.path)
            raise _Stop from e

    def header(self) -> None:
        """Read the ``oci-layout`` file and check it (validate.layout_header)."""
        try:
            data = self.read_file(OCI_LAYOUT, 1 << 16)
        except FileMissing:
            self.add("layout-missing", "no oci-layout file", path=OCI_LAYOUT)
            return
        except TooLarge as e:
            self.add("layout-invalid", e.message, path=OCI_LAYOUT)
            return
        except (OcifuseError, OSError) as e:
            self.add("layout-invalid", f"cannot read: {e}", path=OCI_LAYOUT)
            return
        self.findings.extend(validate.layout_header(data))

    def index(self) -> bool:
        """Check index.json and queue its entries; False when it is missing or unusable."""
        try:
            data = self.read_file(INDEX_JSON, MAX_JSON)
        except FileMissing:
            self.add("index-missing", "no index.json file", path=INDEX_JSON)
            return False
        except (OcifuseError, OSError) as e:
            self.add("index-invalid", f"cannot read: {e}", path=INDEX_JSON)
            return False
        return self.take(validate.index_json(data))

    def take(self, checked: validate.Checked) -> bool:
        """Keep a document's findings and queue its descriptors; False when it was not ``complete``."""
        self.findings.extend(checked.findings)
        self.todo.extend(reversed(checked.children))
        return checked.complete

    def visit(self, ref: Child) -> None:
        desc, digest = ref.desc, ref.desc.digest
        self.referenced.add(digest)
        if desc.data is not None:
            self.check_data(ref)
        blob = self.blob(ref)
        if blob.size is None:
            return
        if blob.size != desc.size:
            self.add(
                "size-mismatch",
                f"blob is {blob.size} bytes, {ref.where} says {desc.size}",
                digest=digest,
                path=digest.path,
            )
        if not is_json(desc.media_type) or (digest, desc.media_type) in self.parsed:
            return
        self.parsed.add((digest, desc.media_type))
        if blob.size > MAX_JSON:
            if is_document(desc.media_type):
                self.incomplete = True
                self.add(
                    "document-too-large",
                    f"{desc.media_type} of {blob.size} bytes is over the {MAX_JSON}-byte limit; not parsed",
                    digest=digest,
                    path=digest.path,
                )
            return
        data = blob.data
        if data is None:  # first met as a non-JSON blob (e.g. a layer), now needed as a document
            try:
                data = self.read_file(digest.path, MAX_JSON)
            except (OcifuseError, OSError) as e:
                self.add("blob-unreadable", str(e), digest=digest, path=digest.path)
                self.incomplete = True
                return
        self.incomplete |= not self.take(validate.blob(desc, data))

    def check_data(self, ref: Child) -> None:
        found = validate.embedded_data(ref)
        if found is not None:
            self.findings.append(found)

    def blob(self, ref: Child) -> _Blob:
        """Read a blob once: size, stream-hash, keep the bytes of a small JSON blob."""
        desc, digest = ref.desc, ref.desc.digest
        found = self.blobs.get(digest)
        if found is not None:
            return found
        blob = self.blobs[digest] = _Blob(None)
        try:
            size = self.layout.blob_size(digest)
        except BlobNotFound:
            self.missing(ref)
            return blob
        except (OcifuseError, OSError) as e:
            self.add("blob-unreadable", str(e), digest=digest, path=digest.path)
            return blob
        keep = is_json(desc.media_type) and size <= MAX_JSON
        try:
            if digest.verifiable:
                blob.data = self.hash(digest, size, keep)
            else:
                self.add(
                    "unverifiable-digest",
                    f"algorithm {digest.algorithm!r} is not one fsck can verify (sha256, sha512)",
                    digest=digest,
                    path=digest.path,
                )
                if keep:
                    blob.data = self.layout.read_small(digest.path, MAX_JSON)
        except ArchiveChanged as e:
            self.add("archive-changed", e.message, path=self.layout.path)
            raise _Stop from e
        except (OcifuseError, OSError) as e:
            self.add("blob-unreadable", str(e), digest=digest, path=digest.path)
            return blob
        blob.size = size
        return blob

    def hash(self, digest: Digest, size: int, keep: bool) -> bytes | None:
        """Stream a blob through its verifier; the bytes when ``keep``."""
        chunks = self.layout.iter_blob(digest, CHUNK)
        kept = list(chunks) if keep else None  # a small JSON blob (MAX_JSON), kept for parsing
        found = hash_chunks(chunks if kept is None else kept, digest.algorithm, progress=self.progress)
        self.blobs_verified += 1
        self.bytes_verified += size  # iter_blob gives exactly the blob's size, or raises
        if found != digest and digest in self.trusted:
            # config.md: a diff_id is the digest of the uncompressed layer, which the member is.
            self.add(
                "diffid-mismatch",
                f"layer {self.trusted[digest]!r} hashes to {found}, not its config's diff_id",
                digest=digest,
                path=digest.path,
            )
        elif found != digest:
            self.add("digest-mismatch", f"content hashes to {found}", digest=digest, path=digest.path)
        return None if kept is None else b"".join(kept)

    def missing(self, ref: Child) -> None:
        desc = ref.desc
        if ref.role == "subject":
            code, why = "subject-missing", "subject manifest"
        elif desc.urls:
            code, why = "blob-external", f"blob (descriptor lists urls: {', '.join(desc.urls)})"
        else:
            code, why = "blob-missing", "blob"
        self.add(code, f"{why} referenced by {ref.where} is not in the layout", digest=desc.digest)

    def unreferenced(self) -> None:
        """Files under blobs/ that name no digest, or that nothing reachable refers to.

        Unreferenced blobs are not reported when some document could not be parsed (see ``incomplete``).
        """
        for name, digest in self.layout.list_blobs():
            if digest is None:
                self.add("blob-invalid-path", "file under blobs/ whose path names no valid digest", path=name)
            elif digest not in self.referenced and not self.incomplete:
                self.add(
                    "blob-unreferenced",
                    "nothing reachable from index.json refers to it",
                    digest=digest,
                    path=name,
                )


def check(layout: Layout, *, progress: Callable[[int], None] | None = None, layers: bool = False) -> Report:
    """Verify everything reachable from the layout's index.json; never raises for a bad layout.

    ``progress``, if given, is called with the byte count of each chunk hashed. ``layers`` also
    checks each image's layers as the rootfs view reads them (diff_ids, tars, the merge).
    """
    return _Checker(layout, progress, layers).run()


def check_path(path: str, *, progress: Callable[[int], None] | None = None) -> Report:
    """Open ``path`` and check it; a PATH that cannot be opened gives a one-finding report."""
    try:
        layout = open_layout(path)
    except LayoutOpenError as e:
        return open_failure(e)
    with layout:
        return check(layout, progress=progress)


# -- output ----------------------------------------------------------------------------------------


def render_text(report: Report, *, seconds: float | None = None) -> Iterator[str]:
    """Lines of the human report: one per finding, then a summary."""
    for f in report.findings:
        where = f.digest or f.path
        yield f"{f.severity.value}: {f.code}: {where + ': ' if where else ''}{f.message}"
    errors = report.errors
    warnings = len(report.findings) - errors
    took = f" in {seconds:.2f}s" if seconds is not None else ""
    rate = ""
    if seconds and report.bytes_verified:
        rate = f" ({human_size(report.bytes_verified / seconds)}/s)"
    status = "ok" if report.ok else "FAILED"
    stored = "" if report.compression == "plain" else f"{report.compression}-compressed archive, "
    hashed = human_size(report.bytes_verified)
    yield (
        f"{status}: {stored}{report.blobs_verified} blobs verified, {hashed} hashed"
        f"{took}{rate}; {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    )


def render_json(report: Report) -> str:
    """The ``--json`` report."""
    return json.dumps(report.to_json(), indent=2)


def _blob_bytes(layout: Layout) -> int:
    total = 0
    for name, _ in layout.list_blobs():
        with contextlib.suppress(OcifuseError):
            total += layout.size_of(name)
    return total


def main(
    path: str,
    *,
    as_json: bool,
    layers: bool = False,
    cache: IndexCache | None = None,
    index: str | None = None,
) -> int:
    """``ocifuse fsck PATH [--json] [--layers]``: 0 no error finding, 1 some error, 2 PATH is not a layout.

    fsck never takes a stored table on trust: it scans every header (a damaged header between
    the ends that ``file_key`` hashes must be found), then stores the fresh table in ``cache``.
    A portable ``index`` is opened and checked to be for PATH (a warning when it is not, or is
    damaged), and nothing of it is used: fsck builds everything again all the same.
    """
    start = time.monotonic()
    try:
        layout = open_layout(path, ViewOptions(cache=cache, rescan=True, index=index))
    except LayoutOpenError as e:
        print(f"ocifuse: {e}", file=sys.stderr)
        if as_json:
            print(render_json(open_failure(e)))
        return 2
    with layout:
        bar = None
        if on_tty():
            total = _blob_bytes(layout)
            if total >= PROGRESS_MIN_BYTES:
                bar = ProgressBar(total, sys.stderr)
        try:
            report = check(layout, progress=bar, layers=layers)
        finally:
            if bar is not None:
                bar.close()
    if as_json:
        print(render_json(report))
    else:
        for line in render_text(report, seconds=time.monotonic() - start):
            print(line)
    return 0 if report.ok else 1
