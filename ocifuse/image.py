"""An image's root filesystem from a layout: resolve it, open each layer as a source, check, scan, merge.

The rootfs view's read core, synchronous like the rest: ``open_rootfs`` takes a path (archive
or layout directory), a ref and a platform, and returns the merged tree with the sources its
entries point into. Layers are read where they lie: an uncompressed layer is a byte range of
the archive (one pread per read), a compressed one a decompressing source.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from .cache import blob_key
from .chunked import (
    CHECKSUM_KEYS,
    ESTARGZ_KEY,
    POSITION_KEYS,
    TocLayer,
    differences,
    open_toc,
    read_toc,
    toc_key,
)
from .chunked import Unusable as TocUnusable
from .compressed import open_decompressed
from .digest import Digest, hash_source
from .entries import ColumnEntries, Columns, Sources
from .errors import (
    ArchiveChanged,
    BlobNotFound,
    CompressedDataError,
    DecompressionLimit,
    DiffIdMismatch,
    DigestMismatch,
    LayerError,
    NotAnArchive,
    OcifuseError,
    SizeMismatch,
    TruncatedArchive,
)
from .layer import LayerScan, LayerTable
from .layout import Layout, ViewOptions
from .model import MAX_LAYERS, Descriptor, Manifest, loads, parse_diff_ids
from .resolve import Resolved, resolve, walk
from .rootfs import Merged, Note, merge
from .source import Source
from .store import LAYER_TABLE, TOC_MAP, TREE, Store, load_or_build
from .streams import Limits, available_cpus, pass_order, split_cpus

log = logging.getLogger(__name__)

# Layer media types (image-spec layer.md, media-types.md; Docker's image manifest v2.2).
TAR_LAYERS = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)
GZIP_LAYERS = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
ZSTD_LAYERS = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)
# Layers opened at once: each first pass over a compressed one holds a decompressor's buffers.
MAX_PARALLEL_LAYERS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class RootImage:
    """An image's merged root filesystem, the sources its entries read from, and what was skipped."""

    layout: Layout
    resolved: Resolved
    sources: Sources  # entry.source = the layer's index in the manifest
    merged: Merged

    def close(self) -> None:
        """Close the layer sources and the layout."""
        self.sources.close()
        self.layout.close()


def diff_ids(layout: Layout, resolved: Resolved) -> list[str]:
    """The config's ``rootfs.diff_ids`` (model.parse_diff_ids); InvalidDocument when unusable."""
    config = resolved.manifest.config
    name = f"config {config.digest}"
    return [str(d) for d in parse_diff_ids(name, loads(name, layout.read_blob(config)))]


def layer_blob(layout: Layout, index: int, desc: Descriptor) -> Source:
    """The layer's blob as it is stored (compressed or not), checked for media type and size.

    Raises LayerError for a layer that is absent (naming a non-distributable one as such), of a
    media type that is not a layer, or whose blob has another size than its descriptor says.
    """
    what = f"layer {index} ({desc.digest})"
    if desc.media_type not in TAR_LAYERS | GZIP_LAYERS | ZSTD_LAYERS:
        raise LayerError(f"{what}: media type {desc.media_type!r} is not a layer this mount can serve")
    try:
        raw = layout.blob_source(desc.digest)
    except BlobNotFound as e:
        if desc.urls or "nondistributable" in desc.media_type or "foreign" in desc.media_type:
            where = f" (its descriptor points to {', '.join(desc.urls)})" if desc.urls else ""
            raise LayerError(
                f"{what} is non-distributable and not in the archive{where}: fetch it into the layout first"
            ) from e
        raise LayerError(f"{what} is not in the layout") from e
    if raw.size != desc.size:
        raise LayerError(str(SizeMismatch(str(desc.digest), desc.size, raw.size)))
    return raw


def layer_source(
    layout: Layout,
    index: int,
    desc: Descriptor,
    *,
    cache: Store | None = None,
    limits: Limits | None = None,
    raw: Source | None = None,
    scan: LayerScan | None = None,
    threads: int = 1,
) -> tuple[Source, str]:
    """The layer's uncompressed stream as a source, and its diff_id (the digest of that stream).

    An uncompressed layer is its blob (a byte range of the archive); a gzip or zstd one is a
    random-access decompressing source whose first open hashes the stream (its index and that
    hash kept in ``cache`` under the layer's digest). Which, is decided by the blob's magic bytes.
    The blob itself is not hashed here: pass a VerifiedStore as ``cache`` for that (the mount
    does; fsck hashes every blob in its own walk). ``raw``: the blob, if layer_blob already gave it.
    ``scan``: builds the layer's table in the same pass, when there is one (``scan.ran``).
    ``threads``: the CPUs a gzip layer's pass may decode on (layer_threads).
    Raises LayerError (layer_blob) or CompressedDataError for damaged compressed data.
    """
    raw = layer_blob(layout, index, desc) if raw is None else raw
    what = f"layer {index} ({desc.digest})"
    source = open_decompressed(
        raw, key=blob_key(desc.digest), cache=cache, name=what, limits=limits, consumer=scan, threads=threads
    )
    found = source.uncompressed_digest
    # config.md: the diff_id is the digest of the uncompressed tar, which an uncompressed blob is.
    return source, str(desc.digest if found is None else found)


class VerifiedStore:
    """The cache as one layer sees it: nothing is stored under the layer's digest until its blob
    has been hashed and found to be that digest.

    Keys are digests the archive *claims*; a hostile archive that claims a genuine layer's digest
    for other bytes must not leave its index, table or spill under that digest for a later mount
    of the genuine image to use (cache poisoning). Loading is free: what is stored was verified.
    The blob is hashed at most once, and only when something is built (a cache hit costs nothing);
    ``finish`` raises LayerError when it did not match. ``cache=None`` (nocache) keeps nothing and
    verifies whatever is built all the same, so every first pass checks the blob's digest.
    """

    def __init__(self, raw: Source, digest: Digest, what: str, cache: Store | None) -> None:
        self._raw = raw
        self._digest = digest
        self._what = what
        self._cache = cache
        self._lock = threading.Lock()
        self._found: Digest | None = None  # what the blob hashes to, once hashed
        self._hashing: threading.Thread | None = None  # hash_soon's
        self.built = cache is None or not cache.enabled  # with no cache, every open builds

    @property
    def enabled(self) -> bool:
        """Always: whatever is built from the layer passes through ``store``, which marks it built."""
        return True

    def verified(self) -> bool:
        """Hash the blob (once) and say whether it is the digest it is stored under."""
        if not self._digest.verifiable:
            return False  # an algorithm ocifuse cannot hash: served, never cached under its name
        with self._lock:
            if self._found is None:
                self._found = hash_source(self._raw.pread, self._raw.size, self._digest.algorithm)
        return self._found == self._digest

    def hash_soon(self) -> None:
        """Hash the blob in a thread of its own now, for ``verified`` to find done: a layer's first
        pass is about to build from it, and the hash then overlaps the pass (a CPU the pass leaves
        over: the last layer's pass runs alone). A failure is left for ``verified`` to raise."""

        def run() -> None:
            with contextlib.suppress(Exception):
                self.verified()

        if self._digest.verifiable and self._found is None and self._hashing is None:
            self._hashing = threading.Thread(target=run, name="blob-hash", daemon=True)
            self._hashing.start()

    def load(self, kind: str, key: str) -> bytes | None:
        """What the cache holds for (kind, key); None with no cache."""
        return None if self._cache is None else self._cache.load(kind, key)

    def store(self, kind: str, key: str, payload: bytes) -> None:
        """Store only a payload built from a blob that hashes to its digest."""
        self.built = True
        if self._cache is not None and self._cache.enabled and self.verified():
            self._cache.store(kind, key, payload)

    def spill_path(self, key: str) -> str | None:
        """A spill file lives in the cache only for a verified blob (else in a private temp file)."""
        self.built = True
        if self._cache is None or not self._cache.enabled or not self.verified():
            return None
        return self._cache.spill_path(key)

    def lock(self, kind: str, key: str) -> AbstractContextManager[bool]:
        """The cache's lock for (kind, key): of the processes opening this layer, one builds."""
        if self._cache is None or not self._cache.enabled:
            return contextlib.nullcontext(False)
        return self._cache.lock(kind, key)

    def finish(self) -> None:
        """Raise LayerError if something was built from a blob that is not its digest."""
        if self.built and self._digest.verifiable and not self.verified():
            raise LayerError(f"{self._what}: {DigestMismatch(str(self._digest), str(self._found))}")
        if self._hashing is not None:
            self._hashing.join()  # done hashing (verified waited for it): no thread left at the fork


def open_image(layout: Layout, options: ViewOptions) -> RootImage:
    """Resolve the image in ``layout`` as inspect does, check its layers, and merge them (layer.md).

    The RootImage returned owns ``layout`` (closes it); on error the caller still does.

    ``options.cache`` keeps each layer's index and table under its digest, and the merged tree under the
    manifest's: a second mount reads no layer at all until a file is read (each layer is opened,
    its index loaded and its diff_id compared, on its first read). ``options.limits`` bounds the first
    pass over a compressed layer (decompression bombs). Anything built from a layer is kept only
    once the layer's blob hashes to its digest; ``options.verify`` opens and hashes every layer's blob at
    open even when all is in the cache (``-o verify``). Raises an OcifuseError with one line saying
    what is wrong: the layout, the ref, a layer.
    """
    resolved = resolve(layout, options.ref, options.platform)
    ignore_diff_ids, verify = options.ignore_diff_ids, options.verify
    descs = resolved.manifest.layers
    if len(descs) > MAX_LAYERS:
        raise LayerError(f"the manifest lists {len(descs)} layers; at most {MAX_LAYERS} are served")
    expected = diff_ids(layout, resolved)
    if len(expected) != len(descs) and not ignore_diff_ids:
        raise LayerError(
            f"the manifest lists {len(descs)} layers, the config's rootfs.diff_ids {len(expected)}"
        )
    layers = [LazyLayer(layout, i, d, expected, options) for i, d in enumerate(descs)]
    sources = Sources(list(layers))
    try:
        # Layers are opened and scanned in parallel: a compressed layer's first pass (decompress,
        # index, hash) runs in rapidgzip or pyzstd with the GIL released. The largest start first,
        # and the CPUs the layers leave over go to the largest gzip ones (layer_threads).
        cpus = available_cpus()
        workers = max(1, min(len(layers), cpus, MAX_PARALLEL_LAYERS))
        order, threads = layer_threads(descs, cpus, workers)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="layer") as pool:

            def open_all(scan: bool = False) -> None:
                """Open every layer (``scan``: its table built in the same pass); the first failing
                layer's error, in layer order."""
                jobs = {i: pool.submit(layers[i].open, scan=scan, threads=threads[i]) for i in order}
                for i in range(len(layers)):
                    jobs[i].result()

            def open_and_table(i: int) -> LayerTable | OcifuseError:
                """Open layer ``i`` (its table built in the same pass), then its table: encoded and
                stored while the other layers' passes still run (the last, largest one's pass runs
                alone at the end, with a CPU to spare). The table's refusal is returned, not raised:
                every layer's open verdict comes first."""
                layers[i].open(scan=True, threads=threads[i])
                try:
                    return layers[i].table()
                except OcifuseError as e:
                    return e

            def build() -> Merged:
                """Open every layer, scan it (its table from the cache when there), merge them."""
                jobs = {i: pool.submit(open_and_table, i) for i in order}
                # the first failing open raised, in layer order; then the first refused table
                found = [jobs[i].result() for i in range(len(layers))]
                tables = []
                for table in found:
                    if isinstance(table, OcifuseError):
                        raise table
                    tables.append(table)
                for layer in layers:
                    layer.finish()  # nothing built from a layer is kept unless the layer is its digest
                merged = merge(tables)
                notes = _notes(tables, merged)
                # as columns: the Tree and the stored tree read them, sorted once; no Entry object
                # of the merge is kept for the mount's life (500,000 files: ~90 MB)
                entries = ColumnEntries(Columns.of(merged.entries, keep_rows=False))
                return Merged(entries=entries, root=merged.root, notes=notes, sizes=sources.sizes())

            def decode(payload: bytes) -> Merged:
                merged = Merged.from_bytes(payload)
                if len(merged.sizes) != len(layers):
                    raise ValueError(f"a tree of {len(merged.sizes)} layers, not {len(layers)}")
                for layer, size in zip(layers, merged.sizes, strict=True):
                    layer.size = size  # what the tree was made for; checked when the layer opens
                return merged

            # The merged tree of this image from the cache, when it is there: no layer read at all.
            # A tree served with ignore_diff_ids is kept apart: a mount that checks them must open.
            # So is one made from TOCs: its offsets are in the TOC layers' own streams.
            key = str(resolved.descriptor.digest) + ("+ignore-diff-ids" if ignore_diff_ids else "")
            key += "+toc" if any(layer.toc for layer in layers) else ""
            merged = load_or_build(
                options.cache,
                TREE,
                key,
                name=f"image {resolved.descriptor.digest}",
                decode=decode,
                build=build,
                encode=lambda tree: tree.to_bytes(tree.sizes),
            )
            if verify:
                open_all()  # -o verify: every layer's blob hashed now, cached or not
        return RootImage(layout=layout, resolved=resolved, sources=sources, merged=merged)
    except BaseException:
        sources.close()
        raise


def layer_threads(descs: Sequence[Descriptor], cpus: int, at_once: int) -> tuple[list[int], list[int]]:
    """The order to open layers in (the largest blob first) and each one's pass threads (streams.split_cpus).

    A gzip layer (by its media type: the blob's magic bytes are not read yet) can decode on several
    threads; ``at_once`` layers are opened at a time on ``cpus`` CPUs.
    """
    sizes = [d.size for d in descs]
    gzip = [d.media_type in GZIP_LAYERS for d in descs]
    return pass_order(sizes), split_cpus(cpus, sizes, at_once, gzip)


class LazyLayer(Source):
    """One layer's uncompressed stream: opened on first use (its blob checked, index loaded or built,
    diff_id compared), so that a mount whose tree is cached reads no layer it is not asked for.

    ``size`` is the stream's size once open; before, the size the cached tree was made for (the
    layer must open to exactly that, else its reads fail), or -1 when not known yet.
    """

    def __init__(
        self,
        layout: Layout,
        index: int,
        desc: Descriptor,
        expected: Sequence[str],
        options: ViewOptions,
    ) -> None:
        self.layout = layout
        self.index = index
        self.desc = desc
        self.expected = expected
        self.options = options
        self.what = f"layer {index} ({desc.digest})"
        self.size = -1
        self._lock = threading.Lock()
        self._source: Source | None = None
        self._failed: OcifuseError | None = None  # why the layer cannot be served, once known
        self._gate: VerifiedStore | None = None
        self._scan: LayerScan | None = None
        self._toc_table: LayerTable | None = None
        # A zstd:chunked or eStargz layer is served from its TOC, unless -o verify asks for the full
        # pass (the blob hashed, the diff_id checked): see SECURITY.md, "zstd:chunked layers".
        self.toc = not options.verify and _has_toc(desc)

    def open(self, *, scan: bool = False, threads: int = 1) -> Source:
        """The layer's stream, opened once; LayerError (and the like) when it cannot be served.

        ``scan``: its table will be asked for (``table``): when it is not stored, the pass that
        builds the layer's index (if one must be built) builds the table too. A verdict on the
        layer's bytes (LayerError, damaged compressed data, ...) is kept and raised again: a read
        does not open it anew. ``threads``: the CPUs its first pass may decode on, if it runs one.
        """
        with self._lock:
            if self._failed is not None:
                raise self._failed  # a verdict on the layer's bytes: not tried again at every read
            if self._source is None:
                try:
                    self._source = self._open(scan, threads)
                except _LASTING as e:
                    self._failed = e
                    raise
            return self._source

    def _open(self, scan: bool, threads: int) -> Source:
        """Open the layer (lock held): blob, index (its pass building the table too if ``scan``), checks."""
        raw = layer_blob(self.layout, self.index, self.desc)
        if self.toc:
            toc = self._open_toc(raw, scan)  # LayerError: not the manifest's TOC
            if toc is not None:
                if self.size >= 0 and toc.size != self.size:
                    toc.close()
                    raise LayerError(
                        f"{self.what}: its TOC lists {toc.size} bytes; the stored tree, {self.size}"
                    )
                self.size = toc.size
                return toc
        gate = VerifiedStore(raw, self.desc.digest, self.what, self.options.cache)
        gate.built = gate.built or self.options.verify  # -o verify: hashed even when nothing is built
        # No scan in the pass when the table is stored: table() takes the stored one.
        stored = gate.load(LAYER_TABLE.kind, blob_key(self.desc.digest)) is not None
        scanner = LayerScan(self.what) if scan and not stored else None
        if scanner is not None or gate.built:
            gate.hash_soon()  # the table (and, likely, the index) is built: its blob is hashed
        source, found = layer_source(
            self.layout,
            self.index,
            self.desc,
            cache=gate,
            limits=self.options.limits,
            raw=raw,
            scan=scanner,
            threads=threads,
        )
        try:
            gate.finish()
            _check_diff_id(self.index, self.desc, self.expected, found, self.options.ignore_diff_ids)
            if self.size >= 0 and source.size != self.size:
                raise LayerError(
                    f"{self.what}: {source.size} bytes uncompressed, the stored tree says {self.size}"
                )
        except BaseException:
            source.close()
            raise
        self.size = source.size
        self._gate = gate
        self._scan = scanner if scanner is not None and scanner.ran else None
        return source

    def _open_toc(self, raw: Source, scan: bool) -> TocLayer | None:
        """The layer served from its TOC, or None (it has none that can be used: logged). Its file
        map from the cache when the table is not needed (the tree is cached); else the TOC is
        read and parsed, its table kept for ``table``, its map stored."""

        def build() -> TocLayer | None:
            lazy = open_toc(raw, self.desc.annotations, self.what)
            if lazy is None:
                return None
            log.info(
                "%s: served from its TOC (%d entries); each file is checked against its digest on "
                "first read, the layer's diff_id is not (-o verify reads it in full)",
                self.what,
                lazy.entries,
            )
            self._toc_table = lazy.table
            return lazy.source

        return load_or_build(
            self.options.cache,
            TOC_MAP,
            toc_key(self.desc.annotations, str(self.desc.digest), raw.size),
            name=self.what,
            decode=lambda payload: TocLayer.from_bytes(payload, raw, self.what),
            build=build,
            encode=lambda toc: None if toc is None else toc.to_bytes(),
            rebuild=scan,  # the table is asked for: the TOC is parsed, whatever is stored
        )

    def table(self) -> LayerTable:
        """The layer's table: from the cache, else as the layer's first pass built it, else scanned
        (and stored once the blob is its digest)."""
        source = self.open(scan=True)
        if isinstance(source, TocLayer):  # its table: never stored under the layer's digest (TOC offsets)
            if self._toc_table is None:
                raise LayerError(f"{self.what}: opened from its stored file map, its TOC not read")
            return self._toc_table
        scanned, self._scan = self._scan, None
        return LayerTable.load_or_scan(
            source, self.what, key=blob_key(self.desc.digest), cache=self._gate, scanned=scanned
        )

    def finish(self) -> None:
        """Raise LayerError if something was built from a blob that is not its digest."""
        if self._gate is not None:
            self._gate.finish()

    def pread(self, offset: int, size: int) -> bytes:
        source = self._source  # once open, no lock: the read path of every file of the layer
        return (source if source is not None else self.open()).pread(offset, size)

    def pread_cached(self, offset: int, size: int) -> bytearray | None:
        source = self._source
        return None if source is None else source.pread_cached(offset, size)

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()


# Verdicts on a layer's bytes, which opening it again would only repeat (a server that does not
# answer, remote.RemoteError, is not one of them: the next read tries again).
_LASTING = (
    LayerError,
    CompressedDataError,
    DecompressionLimit,
    NotAnArchive,
    TruncatedArchive,
    ArchiveChanged,
)


def _has_toc(desc: Descriptor) -> bool:
    """Whether the layer's annotations name a TOC of its compression, zstd:chunked or eStargz
    (usable or not: open_toc says, and logs why not)."""
    keys = desc.annotations.keys()
    if desc.media_type in ZSTD_LAYERS:
        return any(k in keys for k in (*CHECKSUM_KEYS, *POSITION_KEYS))
    return desc.media_type in GZIP_LAYERS and ESTARGZ_KEY in keys


def _check_diff_id(index: int, desc: Descriptor, expected: Sequence[str], found: str, ignore: bool) -> None:
    want = expected[index] if index < len(expected) else "nothing"
    if want == found:
        return
    error = DiffIdMismatch(index, str(desc.digest), want, found)
    if not ignore:
        raise error
    log.warning("served anyway (ignore_diff_ids): %s", error)


def _notes(tables: Sequence[LayerTable], merged: Merged) -> list[Note]:
    notes = [Note(i, s.name, s.reason) for i, t in enumerate(tables) for s in t.skipped]
    return notes + merged.notes


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerProblem:
    """One thing ``fsck --layers`` found in a layer: a fsck finding code, the layer's digest, what."""

    code: str  # "diffid-mismatch", "layer-invalid", "layer-member-skipped", "toc-mismatch", "toc-unused"
    digest: str
    message: str


def check_layers(layout: Layout) -> list[LayerProblem]:
    """Every image's layers, checked as ``mount --rootfs`` would use them; never raises for bad input.

    Each layer (once per digest and diff_id) is opened, its diff_id compared with the config's,
    its tar scanned; each image's layers are merged, and what the merge skips is reported too.
    """
    problems: list[LayerProblem] = []
    seen: set[tuple[str, str]] = set()
    tables: dict[str, LayerTable | None] = {}
    visited: set[Digest] = set()  # a manifest shared by several tags is checked once
    for top in layout.index().manifests:
        try:
            docs = [(d, doc) for d, doc in walk(layout, top, _seen=visited) if isinstance(doc, Manifest)]
        except OcifuseError:
            continue  # fsck's main walk reports unreadable documents
        for desc, manifest in docs:
            resolved = Resolved(descriptor=desc, manifest=manifest, trail=())
            try:
                expected = diff_ids(layout, resolved)
            except OcifuseError:
                continue  # not an image config (an artifact), or one the main walk reports
            image_tables: list[tuple[int, LayerTable]] = []  # an invalid layer is left out of the merge
            for index, layer in enumerate(manifest.layers):
                digest = str(layer.digest)
                want = expected[index] if index < len(expected) else "nothing"
                if (digest, want) not in seen:
                    seen.add((digest, want))
                    tables[digest] = _check_layer(layout, index, layer, want, problems)
                table = tables.get(digest)
                if table is not None:
                    image_tables.append((index, table))
            for note in merge([t for _, t in image_tables]).notes:
                layer = manifest.layers[image_tables[note.layer][0]]
                message = f"in image {desc.digest}: {note.name!r} not applied: {note.reason}"
                problems.append(
                    LayerProblem(code="layer-member-skipped", digest=str(layer.digest), message=message)
                )
    return problems


def _check_toc(
    layout: Layout,
    index: int,
    desc: Descriptor,
    table: LayerTable,
    stream: Source,
    problems: list[LayerProblem],
) -> None:
    """A zstd:chunked or eStargz layer's TOC, as a mount would use it, against the layer's tar."""
    digest = str(desc.digest)
    try:
        toc = read_toc(layer_blob(layout, index, desc), desc.annotations, f"layer {digest}")
    except TocUnusable as e:
        message = f"its TOC is not used ({e}): a mount reads the layer in full"
        problems.append(LayerProblem(code="toc-unused", digest=digest, message=message))
        return
    except LayerError as e:
        problems.append(LayerProblem(code="toc-mismatch", digest=digest, message=str(e)))
        return
    if toc is None:
        return
    try:
        found = differences(toc, table, stream)
    finally:
        toc.source.close()
    if found is not None:
        message = f"its TOC, which a mount serves, tells other than its tar: {found}"
        problems.append(LayerProblem(code="toc-mismatch", digest=digest, message=message))


def _check_layer(
    layout: Layout, index: int, desc: Descriptor, want: str, problems: list[LayerProblem]
) -> LayerTable | None:
    digest = str(desc.digest)
    if not layout.has_blob(desc.digest):
        return None  # fsck's main walk reports it (blob-missing, blob-external)
    scan = LayerScan(f"layer {digest}")
    try:
        source, found = layer_source(layout, index, desc, scan=scan)
    except OcifuseError as e:
        problems.append(LayerProblem(code="layer-invalid", digest=digest, message=str(e)))
        return None
    if found != want:
        problems.append(
            LayerProblem(
                code="diffid-mismatch",
                digest=digest,
                message=f"uncompressed content is {found}, the config's diff_id says {want}",
            )
        )
    try:
        table = scan.result() if scan.ran else LayerTable.scan(source, f"layer {digest}")
        if _has_toc(desc):
            _check_toc(layout, index, desc, table, source, problems)
    except OcifuseError as e:
        problems.append(LayerProblem(code="layer-invalid", digest=digest, message=str(e)))
        return None
    finally:
        source.close()
    for s in table.skipped:
        problems.append(
            LayerProblem(
                code="layer-member-skipped", digest=digest, message=f"{s.name!r} not served: {s.reason}"
            )
        )
    return table
