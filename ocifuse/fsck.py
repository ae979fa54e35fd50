"""``ocifuse fsck``: walk everything reachable from index.json and verify it, collecting every finding.

The walk (``check``) is pure: it takes an open Layout and returns a Report; rendering and the exit
status live in ``main``. Each blob is read once, streaming in large chunks; documents (indexes,
manifests, configs, other ``+json`` blobs) up to ``layout.MAX_JSON`` bytes are kept from that same
read and parsed, never read a second time. Nothing stops the walk but an archive that changes under
it: every other problem becomes a Finding and the walk goes on.

Finding codes (stable; scripts may match on them):

==========================  ========  ==========================================================
code                        severity  meaning
==========================  ========  ==========================================================
``layout-unreadable``       error     PATH cannot be opened at all (missing, unreadable)
``archive-corrupt``         error     PATH is not a tar archive (nor a gzip/zstd-compressed one), or a
                                      header is corrupt
``archive-truncated``       error     the tar ends in the middle of a header or a member
``compressed-corrupt``      error     the gzip/zstd stream of a compressed archive is damaged,
                                      truncated or followed by other data, or it is xz/bzip2
``compressed-too-large``    error     decompressing passes a bound (``max_size``, ``spill_max``, disk)
``archive-changed``         error     the archive was rewritten while fsck read it (the walk stops)
``member-skipped``          warning   an archive member the name policy does not serve (absolute
                                      name, ``..``, symlink, device, sparse file, ...)
``layout-missing``          error     no ``oci-layout`` file
``layout-invalid``          error     ``oci-layout`` is not JSON or has no string ``imageLayoutVersion``
``layout-version``          warning   ``imageLayoutVersion`` is not ``1.0.0``
``index-missing``           error     no ``index.json``
``index-invalid``           error     ``index.json`` is not JSON or not a valid image index
``ref-duplicate``           warning   two index.json entries carry the same ref name
``invalid-descriptor``      error     a descriptor breaks descriptor.md (digest grammar, size < 0,
                                      missing field, ``data`` not base64, ...)
``data-mismatch``           error     a descriptor's embedded ``data`` does not match its digest or size
``blob-missing``            error     a referenced blob is not in the layout
``blob-external``           warning   a referenced blob is absent but its descriptor lists ``urls``
``subject-missing``         warning   a ``subject`` manifest is absent (allowed: referrers may travel alone)
``blob-unreadable``         error     reading a blob failed (I/O error, permission)
``size-mismatch``           error     a blob's size differs from its descriptor's ``size``
``digest-mismatch``         error     a blob's content hashes to something other than its digest
``unverifiable-digest``     warning   a well-formed digest whose algorithm is not sha256/sha512
``document-too-large``      error     an index, manifest or config larger than ``MAX_JSON`` (not parsed)
``invalid-json``            error     a JSON blob (by media type) that does not parse
``invalid-document``        error     JSON that does not match its media type (index, manifest, config)
``blob-unreferenced``       warning   a blob nothing reachable from index.json refers to
``blob-invalid-path``       warning   a file under ``blobs/`` whose path names no valid digest
``diffid-mismatch``         error     ``--layers``: a layer's uncompressed content is not its config's
                                      ``rootfs.diff_ids`` entry (or the config lists another number);
                                      without ``--layers`` too for a docker-archive's layer, served
                                      under its diff_id
``layer-invalid``           error     ``--layers``: a layer ``mount --rootfs`` cannot serve (not a tar,
                                      cut short, absent, a media type that is not a layer)
``layer-member-skipped``    warning   ``--layers``: a layer member the rootfs view does not apply
                                      (``..``, a whiteout of nothing, a hardlink to nothing, ...)
``docker-manifest-invalid`` error     a docker-archive's ``manifest.json`` is not JSON, too large,
                                      not a list of images, or an image lacks Config or Layers
``docker-member-missing``   error     ``manifest.json`` names a config or layer the archive lacks
``docker-path-invalid``     error     ``manifest.json`` names a path that is absolute or has ``..``
``docker-symlink-escape``   error     a config or layer symlink points outside the archive
``docker-symlink-loop``     error     a config or layer path goes through more than 40 symlinks
``docker-config-invalid``   error     a config that is not JSON, too large, or has no valid
                                      ``rootfs.diff_ids``
``docker-config-digest``    error     a config whose content does not hash to the digest its name says
``docker-layer-count``      error     an image's Layers and its config's diff_ids differ in number
``docker-layer-compression`` error    a layer compressed in a way no OCI media type names (xz, bzip2)
==========================  ========  ==========================================================

A docker-archive (``manifest.json``, no ``oci-layout``) is checked as the OCI layout the mount
serves for it (dockerarchive.py), plus the ``docker-*`` findings: an image with such an error is
left out of that layout. Its uncompressed layers are served under their diff_ids, so a layer whose
content hashes to something else is ``diffid-mismatch`` (not ``digest-mismatch``).

``blobs_verified`` counts blobs whose content was hashed and ``bytes_verified`` the bytes hashed,
whether or not they matched (a mismatch is a finding).
"""

from __future__ import annotations

import contextlib
import enum
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import model
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
    InvalidDocument,
    LayoutOpenError,
    NotAnArchive,
    OcifuseError,
    TooLarge,
    TruncatedArchive,
)
from .image import check_layers
from .layout import INDEX_JSON, MAX_JSON, OCI_LAYOUT, Layout
from .progress import ProgressBar, on_tty
from .units import human_size
from .views import ViewOptions, open_layout

# Hashing chunk: large reads amortize the per-call cost; hashlib releases the GIL above 2 KiB.
CHUNK = 4 << 20
# Show a progress bar (on a TTY) only when there is at least this much to hash.
PROGRESS_MIN_BYTES = 64 << 20
# image-layout.md: "imageLayoutVersion" is "1.0.0" for every layout the spec has defined so far.
LAYOUT_VERSION = "1.0.0"


class Severity(enum.Enum):
    """How bad a finding is: an error makes fsck fail, a warning does not."""

    ERROR = "error"
    WARNING = "warning"


_E, _W = Severity.ERROR, Severity.WARNING
# Every finding code and its severity; the module docstring's table describes each one.
CODES: Mapping[str, Severity] = {
    "layout-unreadable": _E,
    "archive-corrupt": _E,
    "archive-truncated": _E,
    "compressed-corrupt": _E,
    "compressed-too-large": _E,
    "archive-changed": _E,
    "member-skipped": _W,
    "layout-missing": _E,
    "layout-invalid": _E,
    "layout-version": _W,
    "index-missing": _E,
    "index-invalid": _E,
    "ref-duplicate": _W,
    "invalid-descriptor": _E,
    "data-mismatch": _E,
    "blob-missing": _E,
    "blob-external": _W,
    "subject-missing": _W,
    "blob-unreadable": _E,
    "size-mismatch": _E,
    "digest-mismatch": _E,
    "unverifiable-digest": _W,
    "document-too-large": _E,
    "invalid-json": _E,
    "invalid-document": _E,
    "blob-unreferenced": _W,
    "blob-invalid-path": _W,
    "diffid-mismatch": _E,
    "layer-invalid": _E,
    "layer-member-skipped": _W,
    "docker-manifest-invalid": _E,
    "docker-member-missing": _E,
    "docker-path-invalid": _E,
    "docker-symlink-escape": _E,
    "docker-symlink-loop": _E,
    "docker-config-invalid": _E,
    "docker-config-digest": _E,
    "docker-layer-count": _E,
    "docker-layer-compression": _E,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One problem fsck found: a code from CODES, where it is, and a one-line message."""

    severity: Severity
    code: str
    message: str
    digest: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The finding as the ``--json`` report spells it."""
        return {
            "severity": self.severity.value,
            "code": self.code,
            "digest": self.digest,
            "path": self.path,
            "message": self.message,
        }


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


def finding(code: str, message: str, *, digest: str | None = None, path: str | None = None) -> Finding:
    """A Finding with the severity CODES gives ``code``."""
    return Finding(severity=CODES[code], code=code, message=message, digest=digest, path=path)


def open_failure(error: LayoutOpenError) -> Report:
    """The report for a PATH that cannot be opened as a layout."""
    if isinstance(error, CompressedDataError):
        code = "compressed-corrupt"
    elif isinstance(error, DecompressionLimit):
        code = "compressed-too-large"
    elif isinstance(error, TruncatedArchive):
        code = "archive-truncated"
    elif isinstance(error, NotAnArchive):
        code = "archive-corrupt"
    else:
        code = "layout-unreadable"
    return Report(findings=(finding(code, error.message, path=error.path),))


# -- the walk --------------------------------------------------------------------------------------


class _Stop(Exception):
    """The walk cannot go on (the archive changed under it)."""


@dataclass(frozen=True, slots=True)
class _Ref:
    """A descriptor to visit, where it was found, and the role it plays there."""

    desc: model.Descriptor
    where: str
    role: str  # "manifest", "config", "layer", "subject"


@dataclass(slots=True)
class _Blob:
    """What reading one blob found; ``size`` is None when it is missing or unreadable."""

    size: int | None
    data: bytes | None = None


_DOCUMENT_TYPES = model.INDEX_TYPES | model.MANIFEST_TYPES | model.CONFIG_TYPES


def _is_document(media_type: str) -> bool:
    return media_type in _DOCUMENT_TYPES


def _is_json(media_type: str) -> bool:
    # RFC 6839 structured syntax suffix: "+json" content is JSON.
    return _is_document(media_type) or media_type.split(";")[0].strip().endswith("+json")


def _short(digest: Digest | str) -> str:
    text = str(digest)
    alg, _, enc = text.partition(":")
    return f"{alg}:{enc[:12]}" if len(enc) > 12 else text


# A stand-in for a manifest's invalid config, so the rest of the manifest can still be judged.
_PLACEHOLDER = {"mediaType": model.MEDIA_CONFIG, "digest": "sha256:" + "0" * 64, "size": 0}


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
        self.todo: list[_Ref] = []
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

    # image-layout.md, "oci-layout file": a JSON object with "imageLayoutVersion".
    def header(self) -> None:
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
        try:
            obj = model.loads(OCI_LAYOUT, data)
        except InvalidDocument as e:
            self.add("layout-invalid", e.message, path=OCI_LAYOUT)
            return
        version = obj.get("imageLayoutVersion")
        if not isinstance(version, str):
            self.add("layout-invalid", "imageLayoutVersion is missing or not a string", path=OCI_LAYOUT)
        elif version != LAYOUT_VERSION:
            self.add(
                "layout-version",
                f"imageLayoutVersion is {version!r}, not {LAYOUT_VERSION!r}",
                path=OCI_LAYOUT,
            )

    # image-layout.md, "index.json file": REQUIRED, and an image index (image-index.md).
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
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            self.add("index-invalid", f"index.json is not valid JSON: {e}", path=INDEX_JSON)
            return False
        if not isinstance(obj, dict):
            self.add("index-invalid", "index.json is not a JSON object", path=INDEX_JSON)
            return False
        problems = self.document(INDEX_JSON, obj, model.MEDIA_INDEX, None, INDEX_JSON)
        for p in problems:
            self.add("index-invalid", p, path=INDEX_JSON)
        if not isinstance(obj.get("manifests"), list):
            return False
        seen: set[str] = set()
        for ref in reversed(self.todo):
            name = ref.desc.ref_name
            if name is None:
                continue
            if name in seen:
                self.add(
                    "ref-duplicate", f"ref {name!r} names more than one index.json entry", path=INDEX_JSON
                )
            seen.add(name)
        return True

    def document(
        self, name: str, obj: dict[str, Any], media_type: str, digest: Digest | None, path: str
    ) -> list[str]:
        """Queue the descriptors of an index or manifest; return what is wrong with the document itself.

        Each descriptor is parsed on its own so that one invalid descriptor is one finding and the
        valid ones are still walked; the document is then judged with the invalid ones left out.
        """
        problems: list[str] = []
        own = obj.get("mediaType")
        sane = dict(obj)
        kind = media_type
        if own is not None:
            # manifest.md / image-index.md: mediaType, when present, must match the descriptor's.
            if isinstance(own, str) and own in model.INDEX_TYPES | model.MANIFEST_TYPES:
                kind = own
            index_json_index = name == INDEX_JSON and isinstance(own, str) and own in model.INDEX_TYPES
            if own != media_type and not index_json_index:
                problems.append(f"mediaType {own!r} differs from the descriptor's {media_type!r}")
                sane.pop("mediaType")
        children: list[_Ref] = []
        where = _short(digest) if digest is not None else name

        def one(role: str, value: object, label: str) -> bool:
            try:
                desc = model.Descriptor.from_json(f"{where} {label}", value)
            except InvalidDocument as e:
                self.add("invalid-descriptor", e.message, digest=digest, path=path)
                return False
            children.append(_Ref(desc, f"{where} {label}", role))
            return True

        def many(key: str, role: str) -> None:
            value = obj.get(key)
            if isinstance(value, list):
                sane[key] = [v for i, v in enumerate(value) if one(role, v, f"{key}[{i}]")]

        if kind in model.INDEX_TYPES:
            many("manifests", "manifest")
        else:
            if "config" in obj and not one("config", obj["config"], "config"):
                sane["config"] = _PLACEHOLDER
            many("layers", "layer")
        if "subject" in obj and not one("subject", obj["subject"], "subject"):
            sane.pop("subject")
        try:
            if kind in model.INDEX_TYPES:
                model.Index.from_json(name, sane)
            else:
                model.Manifest.from_json(name, sane)
        except InvalidDocument as e:
            problems.append(e.reason)
        self.todo.extend(reversed(children))
        return problems

    def visit(self, ref: _Ref) -> None:
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
        if not _is_json(desc.media_type) or (digest, desc.media_type) in self.parsed:
            return
        self.parsed.add((digest, desc.media_type))
        if blob.size > MAX_JSON:
            if _is_document(desc.media_type):
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
        self.parse(ref, data)

    # descriptor.md, "data": the decoded data MUST be verified against the digest and size fields.
    def check_data(self, ref: _Ref) -> None:
        desc = ref.desc
        assert desc.data is not None
        if len(desc.data) != desc.size:
            why = f"{len(desc.data)} bytes, size says {desc.size}"
        elif desc.digest.verifiable and Digest.of(desc.data, desc.digest.algorithm) != desc.digest:
            why = f"hashes to {Digest.of(desc.data, desc.digest.algorithm)}"
        else:
            return
        self.add("data-mismatch", f"{ref.where}: embedded data does not match: {why}", digest=desc.digest)

    def blob(self, ref: _Ref) -> _Blob:
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
        keep = _is_json(desc.media_type) and size <= MAX_JSON
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

    def missing(self, ref: _Ref) -> None:
        desc = ref.desc
        if ref.role == "subject":
            code, why = "subject-missing", "subject manifest"
        elif desc.urls:
            code, why = "blob-external", f"blob (descriptor lists urls: {', '.join(desc.urls)})"
        else:
            code, why = "blob-missing", "blob"
        self.add(code, f"{why} referenced by {ref.where} is not in the layout", digest=desc.digest)

    def parse(self, ref: _Ref, data: bytes) -> None:
        """Parse a JSON blob as its media type says; queue an index's or manifest's descriptors."""
        desc, digest = ref.desc, ref.desc.digest
        name = str(digest)
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            self.incomplete |= _is_document(desc.media_type)
            self.add(
                "invalid-json", f"{desc.media_type} is not valid JSON: {e}", digest=digest, path=digest.path
            )
            return
        if not _is_document(desc.media_type):
            return
        if not isinstance(obj, dict):
            self.incomplete = True
            self.add(
                "invalid-document", f"{desc.media_type} is not a JSON object", digest=digest, path=digest.path
            )
            return
        if desc.media_type in model.CONFIG_TYPES:
            problems = []
            try:
                model.ImageConfig.from_json(name, obj)
            except InvalidDocument as e:
                problems.append(e.reason)
        else:
            problems = self.document(name, obj, desc.media_type, digest, digest.path)
        for p in problems:
            self.add(
                "invalid-document", f"not a valid {desc.media_type}: {p}", digest=digest, path=digest.path
            )

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


def main(path: str, *, as_json: bool, layers: bool = False, cache: IndexCache | None = None) -> int:
    """``ocifuse fsck PATH [--json] [--layers]``: 0 no error finding, 1 some error, 2 PATH is not a layout.

    fsck never takes a stored table on trust: it scans every header (a damaged header between
    the ends that ``file_key`` hashes must be found), then stores the fresh table in ``cache``.
    """
    start = time.monotonic()
    try:
        layout = open_layout(path, ViewOptions(cache=cache, rescan=True))
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
