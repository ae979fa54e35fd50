"""Serve a docker-archive (``docker save`` before Docker 25, ``podman save --format docker-archive``)
as an OCI image layout, without copying a layer.

A docker-archive is recognised by its contents, never by its name: a top-level ``manifest.json``
and no ``oci-layout`` (an archive with both, as Docker 25 and later write, is an OCI layout and is
served as it is). ``manifest.json`` lists, per image, its ``Config`` (a JSON file), its
``RepoTags`` and its ``Layers`` (one tar per layer, duplicates often symlinks to the first copy).

What the view serves (image-layout.md):

- ``oci-layout`` and ``index.json``, made in memory; index.json has one entry per RepoTag, its
  ``org.opencontainers.image.ref.name`` the RepoTag as written (``localhost/bb:latest``), as
  ``podman save --format oci-archive`` and ``skopeo copy ... oci:DIR:NAME`` write it; an image
  without RepoTags gets one entry without a name;
- one image manifest per image, made in memory, deterministically (same archive, same bytes);
- ``blobs/<alg>/<hex>`` of the config (its sha256, hashed at open) and of each layer, both read
  from the archive's own bytes by pread. An uncompressed layer's digest is its ``diff_id`` from the
  config (config.md: the digest of the uncompressed tar), taken on trust at open and checked by
  fsck; a gzip or zstd layer keeps its own media type and is hashed at open (its digest is the
  sha256 of its stored bytes, which nothing in the archive records).

Layer and config paths are resolved inside the archive: symlinks relative to the link's
directory, never above the archive's root, at most MAX_SYMLINKS of them. Whatever cannot be
served is a Problem with a stable code (fsck's codes); the rest of the archive is still served.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import model
from .archive import Archive
from .digest import Digest, hash_source
from .entries import ArchiveTable, Entry, Kind, Skipped, Sources
from .errors import InvalidDigest, InvalidDocument
from .layout import MAX_JSON, OCI_LAYOUT, Layout, TableLayout
from .source import MemorySource, sniff
from .store import DOCKER_DIGESTS, load_or_build
from .tarscan import normalize

log = logging.getLogger(__name__)

# How the view reads a member: Archive.pread (entry, offset in it, size), from whichever source holds it.
Pread = Callable[[Entry, int, int], bytes]

MANIFEST_JSON = "manifest.json"
# Symlinks followed to resolve one path: Linux's limit for one path resolution (path_resolution(7)).
MAX_SYMLINKS = 40
# Bounds on what a docker-archive can make ocifuse hold and do at open (a 4-byte layer path in
# manifest.json becomes a ~150-byte descriptor: unbounded, a small manifest.json makes gigabytes).
# Real archives are far below them: `docker save` of 100 images of 50 layers is a 400 KB manifest.json.
MAX_MANIFEST_JSON = 4 << 20  # manifest.json is parsed whole: a few MB of short strings is ~10x in memory
MAX_LAYERS = model.MAX_LAYERS  # layers (and diff_ids) of one image
MAX_LAYER_REFS = 1 << 16  # layer paths and diff_ids looked at, over all images
MAX_DOCUMENTS = MAX_JSON  # bytes of all the manifests made; index.json is at most MAX_JSON too
MAX_REFS = 1024  # index.json entries (one per RepoTag; inspect resolves each: keep it quick)
# image-layout.md, "oci-layout file".
LAYOUT_HEADER = b'{"imageLayoutVersion":"1.0.0"}'
# layer.md, "Media types": the stored layer's own type, by its magic bytes.
LAYER_TYPES = {
    None: "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """Something of a docker-archive that cannot be served as it is: a stable code and one line."""

    code: str
    message: str
    path: str | None = None  # the archive member (or manifest.json path) it is about

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustedLayer:
    """An uncompressed layer served under its config's diff_id, unhashed (fsck checks it)."""

    member: str
    entry: Entry
    diff_id: Digest


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """One image of manifest.json as the view serves it."""

    refs: tuple[str, ...]
    manifest: Digest
    config: str  # the archive member, as manifest.json names it


@dataclass(frozen=True, slots=True, kw_only=True)
class DockerArchive:
    """The OCI layout view of a docker-archive: its table, its documents, what it could not serve."""

    entries: dict[str, Entry]
    documents: tuple[bytes, ...]  # MemorySource i is the archive's source first_source + i
    images: tuple[Image, ...]
    problems: tuple[Problem, ...]
    trusted: tuple[TrustedLayer, ...]
    skipped: list[Skipped]
    hashed: dict[tuple[int, int], Digest]  # the sha256 of each member hashed, by (offset, size)


def archive_format(table: ArchiveTable) -> str | None:
    """OCI_ARCHIVE, DOCKER_ARCHIVE or None (neither), by the archive's top-level files."""

    def is_file(name: str) -> bool:
        entry = table.get(name)  # no dict of every entry for a table loaded from the cache
        return entry is not None and entry.kind is Kind.FILE

    if is_file(OCI_LAYOUT):
        return OCI_ARCHIVE  # Docker 25+ writes manifest.json too: an OCI layout, served as it is
    if is_file(MANIFEST_JSON) or MANIFEST_JSON in table.symlinks:
        return DOCKER_ARCHIVE
    return None


class DockerLayout(TableLayout):
    """A docker-archive served as an OCI image layout: a view of its own over the archive, never changing it.

    ``docker`` says what the view serves on trust and what it could not serve (fsck reports it).
    """

    format = DOCKER_ARCHIVE

    def __init__(self, archive: Archive) -> None:
        """The view of the open ``archive`` (closed with this layout); never raises for bad content.

        The digests it hashes (a compressed layer's, which nothing in the archive records; each
        config's) are stored under the archive's identity: a later open hashes none of them again.
        """
        first = len(archive.sources)
        self.docker = load_or_build(
            archive.cache,
            DOCKER_DIGESTS,
            archive.key,
            name=archive.path,
            decode=lambda payload: synthesize(archive.table, archive.pread, first, _decode_digests(payload)),
            build=lambda: synthesize(archive.table, archive.pread, first),
            encode=lambda view: _encode_digests(view.hashed),
            rebuild=archive.rescan,
        )
        reader = Sources([*archive.sources, *(MemorySource(d) for d in self.docker.documents)])
        table = ArchiveTable(self.docker.entries, self.docker.skipped, archive.table.end)
        super().__init__(archive, table, reader)


def _encode_digests(hashed: Mapping[tuple[int, int], Digest]) -> bytes | None:
    """The members' digests as stored (JSON: [offset, size, digest] each); None when there are none."""
    rows = [[offset, size, str(digest)] for (offset, size), digest in sorted(hashed.items())]
    return json.dumps(rows, separators=(",", ":")).encode() if rows else None


def _decode_digests(payload: bytes) -> dict[tuple[int, int], Digest]:
    """``_encode_digests``'s members and digests; ValueError (or TypeError, ...) for anything else."""
    try:
        rows = model.load_value("stored digests", payload)
        if not isinstance(rows, list):
            raise ValueError("not a list")
        out: dict[tuple[int, int], Digest] = {}
        for offset, size, digest in rows:
            if type(offset) is not int or type(size) is not int or offset < 0 or size < 0:
                raise ValueError("a member that is not a range")
            out[offset, size] = Digest.parse(digest)
        return out
    except (InvalidDocument, InvalidDigest) as e:
        raise ValueError(str(e)) from e


def docker_view(layout: Layout) -> DockerArchive | None:
    """What ``layout`` serves of a docker-archive (trusted layers, problems); None for other layouts."""
    return layout.docker if isinstance(layout, DockerLayout) else None


class _Unusable(Exception):
    """One image (or all of manifest.json) cannot be served; carries the Problem."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def resolve_member(table: ArchiveTable, name: str) -> tuple[str, Entry]:
    """The regular member a manifest.json path names, following symlinks inside the archive.

    Raises _Unusable: ``docker-path-invalid`` (absolute or ``..``), ``docker-symlink-escape``
    (a link whose target leaves the archive), ``docker-symlink-loop`` (more than MAX_SYMLINKS
    links), ``docker-member-missing`` (no such regular file).
    """
    path = normalize(name)
    if path is None:
        why = "an absolute path or one with '..', named by manifest.json"
        raise _Unusable(Problem(code="docker-path-invalid", message=why, path=name))
    for _ in range(MAX_SYMLINKS + 1):
        target = table.symlinks.get(path)
        if target is None:
            entry = table.entries.get(path)
            if entry is None or entry.kind is not Kind.FILE:
                why = "named by manifest.json, but not a regular file in the archive"
                raise _Unusable(Problem(code="docker-member-missing", message=why, path=path))
            return path, entry
        # A link's target is relative to the link's directory (symlink(7)); an absolute target or
        # one that climbs above the archive's root names something outside the archive.
        parts: list[str] = path.split("/")[:-1]
        if target.startswith("/"):
            parts = [".."]
        else:
            for p in target.split("/"):
                if p in ("", "."):
                    continue
                if p != "..":
                    parts.append(p)
                elif parts and parts[-1] != "..":
                    parts.pop()
                else:
                    parts = [".."]
                    break
        if parts[:1] == [".."] or not parts:
            why = f"symlink to {target!r} points outside the archive"
            raise _Unusable(Problem(code="docker-symlink-escape", message=why, path=path))
        path = "/".join(parts)
    why = f"more than {MAX_SYMLINKS} symlinks to follow (a loop)"
    raise _Unusable(Problem(code="docker-symlink-loop", message=why, path=name))


def _json_dumps(obj: object) -> bytes:
    """Deterministic compact JSON (key order as built), as Go's encoding/json writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _descriptor(media_type: str, digest: Digest, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(digest), "size": size}


class _Builder:
    """The state of one synthesis: the archive's table and bytes, what has been served so far."""

    def __init__(self, table: ArchiveTable, pread: Pread, first_source: int) -> None:
        self.table = table
        self.pread = pread
        self.first_source = first_source
        self.blobs: dict[Digest, Entry] = {}
        self.documents: list[bytes] = []
        self.problems: list[Problem] = []
        self.trusted: dict[tuple[Digest, int, int], TrustedLayer] = {}
        # Per member (offset, size), each worked out once however many images name it:
        self.hashed: dict[tuple[int, int], Digest] = {}  # its sha256
        self.configs: dict[tuple[int, int], tuple[Digest, list[Digest]] | Problem] = {}
        self.kinds: dict[tuple[int, int], str | None] = {}  # its compression (sniff)
        self.document_bytes = 0
        self.layer_refs = 0
        self.image_index = 0  # the image being served, for _Exhausted
        self.mtime = 0

    def read(self, entry: Entry, what: str, path: str) -> bytes:
        """A small member whole (manifest.json, a config); _Unusable when it is too large."""
        if entry.size > MAX_JSON:
            code = "docker-manifest-invalid" if what == MANIFEST_JSON else "docker-config-invalid"
            why = f"{entry.size} bytes, more than the {MAX_JSON}-byte limit for JSON"
            raise _Unusable(Problem(code=code, message=why, path=path))
        return self.pread(entry, 0, entry.size)

    def sha256(self, entry: Entry) -> Digest:
        """The sha256 of a member's bytes, hashed once per member."""
        key = (entry.offset, entry.size)
        found = self.hashed.get(key)
        if found is None:
            found = self.hashed[key] = hash_source(lambda at, n: self.pread(entry, at, n), entry.size)
        return found

    def add_blob(self, digest: Digest, entry: Entry) -> None:
        """Serve ``entry`` at ``blobs/<alg>/<hex>``; the first member of a digest wins."""
        self.blobs.setdefault(digest, entry)

    def add_document(self, data: bytes) -> Digest:
        """Serve a document made in memory as a sha256 blob; returns its digest."""
        digest = Digest.of(data)
        if digest not in self.blobs:
            self.blobs[digest] = Entry(
                Kind.FILE, 0, len(data), self.mtime, self.first_source + len(self.documents)
            )
            self.documents.append(data)
        return digest

    def manifest_json(self) -> list[Any]:
        """manifest.json parsed: a list of objects; _Unusable when it is not."""
        path, entry = resolve_member(self.table, MANIFEST_JSON)
        self.mtime = entry.mtime
        if entry.size > MAX_MANIFEST_JSON:
            why = f"{entry.size} bytes, more than the {MAX_MANIFEST_JSON}-byte limit for manifest.json"
            raise _bad_manifest(why)
        data = self.read(entry, MANIFEST_JSON, path)
        try:
            value = model.load_value(MANIFEST_JSON, data)
        except InvalidDocument as e:
            raise _bad_manifest(e.reason) from e
        if not isinstance(value, list):
            raise _bad_manifest("not a JSON array of images")
        return value

    def image(self, i: int, obj: object) -> Image:
        """Serve image ``i`` of manifest.json: its config, its layers, a manifest made for it."""
        where = f"{MANIFEST_JSON}[{i}]"
        if not isinstance(obj, dict):
            raise _bad_manifest(f"{where}: not a JSON object")
        config_name = obj.get("Config")
        layer_names = obj.get("Layers")
        tags = obj.get("RepoTags")
        if not isinstance(config_name, str):
            raise _bad_manifest(f"{where}: Config is missing or not a string")
        if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
            raise _bad_manifest(f"{where}: Layers is missing or not a list of strings")
        if tags is None:
            tags = []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _bad_manifest(f"{where}: RepoTags is not a list of strings")
        if len(layer_names) > MAX_LAYERS:
            raise _bad_manifest(f"{where}: {len(layer_names)} layers, more than {MAX_LAYERS}")
        self.count_refs(i, len(layer_names))
        config_path, config_entry = resolve_member(self.table, config_name)
        config_digest, diff_ids = self.config(config_name, config_path, config_entry)
        if len(diff_ids) != len(layer_names):
            why = f"{len(diff_ids)} diff_ids, but {where} lists {len(layer_names)} layers"
            raise _Unusable(Problem(code="docker-layer-count", message=why, path=config_path))
        layers = [self.layer(name, diff_id) for name, diff_id in zip(layer_names, diff_ids, strict=True)]
        self.add_blob(config_digest, config_entry)
        for _, digest, entry, trusted in layers:
            self.add_blob(digest, entry)
            if trusted is not None:
                self.trusted.setdefault((trusted.diff_id, entry.offset, entry.size), trusted)
        # manifest.md; the same key order as skopeo writes when it converts a docker-archive.
        manifest = {
            "schemaVersion": 2,
            "mediaType": model.MEDIA_MANIFEST,
            "config": _descriptor(model.MEDIA_CONFIG, config_digest, config_entry.size),
            "layers": [
                _descriptor(media_type, digest, entry.size) for media_type, digest, entry, _ in layers
            ],
        }
        data = _json_dumps(manifest)
        if self.document_bytes + len(data) > MAX_DOCUMENTS:
            raise _Exhausted(i, f"manifests over {MAX_DOCUMENTS} bytes")
        self.document_bytes += len(data)
        digest = self.add_document(data)
        return Image(refs=tuple(tags), manifest=digest, config=config_name)

    def config(self, name: str, path: str, entry: Entry) -> tuple[Digest, list[Digest]]:
        """The config's sha256 and its ``rootfs.diff_ids`` (config.md); _Unusable when unusable."""
        key = (entry.offset, entry.size)
        found = self.configs.get(key)
        if found is None:
            try:
                found = self.configs[key] = self._config(name, path, entry)
            except _Unusable as e:
                self.configs[key] = e.problem
                raise
        if isinstance(found, Problem):
            raise _Unusable(found)
        return found

    def count_refs(self, image: int, n: int) -> None:
        """Count ``n`` more layer paths or diff_ids; past MAX_LAYER_REFS, ``image`` and the rest stop."""
        self.layer_refs += n
        if self.layer_refs > MAX_LAYER_REFS:
            raise _Exhausted(image, f"more than {MAX_LAYER_REFS} layers in all")

    def _config(self, name: str, path: str, entry: Entry) -> tuple[Digest, list[Digest]]:
        data = self.read(entry, f"config {name}", path)
        digest = Digest.of(data)

        def bad(why: str) -> _Unusable:
            return _Unusable(Problem(code="docker-config-invalid", message=f"config: {why}", path=path))

        try:
            parsed = model.parse_diff_ids(name, model.load_value(name, data))
        except InvalidDocument as e:
            raise bad(e.reason) from e
        self.count_refs(self.image_index, len(parsed))
        claimed = _named_digest(path)
        if claimed is not None and claimed != digest:
            # The file is named by the image ID, which is the config's sha256 (docker save).
            self.problems.append(
                Problem(
                    code="docker-config-digest",
                    message=f"config named {claimed} hashes to {digest}",
                    path=path,
                )
            )
        return digest, parsed

    def layer(self, name: str, diff_id: Digest) -> tuple[str, Digest, Entry, TrustedLayer | None]:
        """The media type and digest a layer is served under, its member, its digest if on trust."""
        path, entry = resolve_member(self.table, name)
        key = (entry.offset, entry.size)
        if key not in self.kinds:
            self.kinds[key] = sniff(self.pread(entry, 0, 6))
        kind = self.kinds[key]
        media_type = LAYER_TYPES.get(kind)
        if media_type is None:
            why = f"{kind}-compressed layer, which no OCI layer media type names"
            raise _Unusable(Problem(code="docker-layer-compression", message=why, path=path))
        if kind is None:
            # config.md: a diff_id is the digest of the layer's uncompressed tar, which this member is.
            return media_type, diff_id, entry, TrustedLayer(member=path, entry=entry, diff_id=diff_id)
        # Nothing in the archive records the stored bytes' digest: hash them (once per member).
        log.debug("hashing the %s-compressed layer %s (%d bytes) for its digest", kind, path, entry.size)
        return media_type, self.sha256(entry), entry, None


class _Exhausted(Exception):
    """A bound on the whole archive is reached: image ``index`` and the ones after it are not served."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(why)
        self.index = index
        self.why = why


def _bad_manifest(why: str) -> _Unusable:
    return _Unusable(Problem(code="docker-manifest-invalid", message=why, path=MANIFEST_JSON))


def _named_digest(path: str) -> Digest | None:
    """The sha256 a config's file name claims (``<hex>.json``, ``blobs/sha256/<hex>``), or None."""
    from_path = Digest.from_path(path)
    if from_path is not None:
        return from_path
    base = path.rpartition("/")[2].removesuffix(".json")
    try:
        return Digest.parse(f"sha256:{base}")
    except InvalidDigest:
        return None


def synthesize(
    table: ArchiveTable,
    pread: Pread,
    first_source: int,
    hashed: Mapping[tuple[int, int], Digest] | None = None,
) -> DockerArchive:
    """The OCI layout view of the docker-archive whose table is given, its bytes read with ``pread``.

    ``pread`` is Archive.pread (an entry, an offset in it, a size); ``first_source`` is the sources
    index the view's first document will have; ``hashed``: members' digests known already (stored
    by an earlier open of the same archive), not hashed again. Never raises for bad content (every
    problem is in ``problems``); errors reading the archive propagate.
    """
    b = _Builder(table, pread, first_source)
    b.hashed.update(hashed or {})
    images: list[Image] = []
    try:
        listed = b.manifest_json()
    except _Unusable as e:
        b.problems.append(e.problem)
        listed = []
    for i, obj in enumerate(listed):
        b.image_index = i
        try:
            images.append(b.image(i, obj))
        except _Unusable as e:
            b.problems.append(e.problem)
        except _Exhausted as e:
            why = f"images {e.index} to {len(listed) - 1} not served: {e.why}"
            b.problems.append(_bad_manifest(why).problem)
            break
    entries: dict[str, Entry] = {
        OCI_LAYOUT: Entry(Kind.FILE, 0, len(LAYOUT_HEADER), b.mtime, first_source + len(b.documents)),
    }
    b.documents.append(LAYOUT_HEADER)
    index = {"schemaVersion": 2, "mediaType": model.MEDIA_INDEX, "manifests": _index_entries(b, images)}
    data = _json_dumps(index)
    entries["index.json"] = Entry(Kind.FILE, 0, len(data), b.mtime, first_source + len(b.documents))
    b.documents.append(data)
    entries["blobs"] = Entry(Kind.DIR, 0, 0, b.mtime)
    for digest, entry in b.blobs.items():
        entries.setdefault(f"blobs/{digest.algorithm}", Entry(Kind.DIR, 0, 0, b.mtime))
        entries[digest.path] = entry
    # Symlinks are not served as such; those a layer path names are resolved above, others are moot.
    skipped = [s for s in table.skipped if normalize(s.name) not in table.symlinks]
    return DockerArchive(
        entries=entries,
        documents=tuple(b.documents),
        images=tuple(images),
        problems=tuple(b.problems),
        trusted=tuple(b.trusted.values()),
        skipped=skipped,
        hashed=b.hashed,
    )


def _index_entries(b: _Builder, images: list[Image]) -> list[dict[str, Any]]:
    """index.json's manifests: one per RepoTag (image-layout.md, annotations.md ref.name).

    At most MAX_REFS of them in at most MAX_JSON bytes: the tags past that are not served (one
    problem says so).
    """
    out: list[dict[str, Any]] = []
    size = 0
    for image in images:
        entry = b.blobs[image.manifest]
        desc = _descriptor(model.MEDIA_MANIFEST, image.manifest, entry.size)
        named = ({**desc, "annotations": {model.REF_NAME: ref}} for ref in image.refs)
        for item in named if image.refs else [desc]:
            size += len(_json_dumps(item)) + 1
            if size > MAX_JSON or len(out) == MAX_REFS:
                why = f"RepoTags past the first {len(out)} not served (at most {MAX_REFS}, {MAX_JSON} bytes)"
                b.problems.append(_bad_manifest(why).problem)
                return out
            out.append(item)
    return out
