"""An open archive: its file held open for its life, its entry table (scanned or from the cache),
and bounds-checked reads of its members by ``pread`` (or through a decompressing source).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator

from .compressed import open_decompressed
from .entries import ArchiveTable, Entry, Sources
from .errors import NotAnArchive, TruncatedArchive
from .progress import reporting
from .source import FileRange, OpenFile, Origin, Source, SourceFile
from .store import TABLE, Store, load_or_build
from .streams import Limits, Progress, available_cpus, split_cpus
from .tablecodec import decode_table, encode_table
from .tarscan import BLOCK, scan_table

log = logging.getLogger(__name__)

# A scanned table is stored in the index cache from this many entries on (a plain archive): below
# it, scanning the headers costs about what hashing the archive's ends and reading an entry does.
TABLE_CACHE_MIN_ENTRIES = 1000


class Archive(Sources):
    """An open archive: its file held open for its life, its table, and bounds-checked reads.

    ``sources[0]`` is the archive's byte stream, which the table's offsets point into; entries
    with another ``source`` index read from the other sources of the list.
    """

    def __init__(
        self,
        path: str | Origin,
        cache: Store | None = None,
        *,
        rescan: bool = False,
        limits: Limits | None = None,
        progress: Progress | None = None,
        key: str | None = None,
    ) -> None:
        """Open ``path`` and scan its headers, or load its table from ``cache`` when one is stored.

        ``path`` is a local file's path, or an Origin already open (a remote object, remote.py):
        either way the archive is read through the origin's Source and keyed by its identity.
        A gzip- or zstd-compressed archive is decompressed once to index it (or its index is loaded
        from ``cache``): ``sources[0]`` is then the decompressed stream (compressed.py), bounded by
        ``limits`` and reported to ``progress``. ``rescan`` (fsck): scan and index again even when
        stored, and store the fresh ones. ``key``: what the archive's artifacts are kept under in
        ``cache`` (a portable index's key, portable.py); by default the origin's identity. Raises
        LayoutOpenError (NotAnArchive, TruncatedArchive, CompressedDataError, DecompressionLimit)
        naming ``path``.
        """
        origin = FileOrigin(path) if isinstance(path, str) else path
        self.origin = origin
        self.path = origin.name
        # The local file, when there is one: a plain tar's scan reads its fd directly.
        self.file: OpenFile | None = origin.file if isinstance(origin, FileOrigin) else None
        try:
            # Where what is derived from this archive is kept (a view's too), under its identity.
            self.cache, self.rescan = cache, rescan
            if key is None and cache is not None and cache.enabled:
                key = origin.identity()
            self.key = key
            stream = open_decompressed(
                origin.source(),
                key=key,
                cache=cache,
                name=self.path,
                limits=limits,
                progress=progress,
                rebuild=rescan,
                digest=False,  # no one asks for an outer archive's uncompressed digest
                threads=split_cpus(available_cpus(), [1], 1, [True])[0],  # one stream: every CPU (3 up)
            )
            super().__init__([stream])
            try:
                self.table = self._load_or_scan(cache, key, rescan)
            except BaseException:
                stream.close()
                raise
        except BaseException:
            origin.close()
            raise

    @property
    def compression(self) -> str:
        """How the archive is stored: "plain", "gzip" or "zstd"."""
        return self.sources[0].compression

    def _scan(self) -> ArchiveTable:
        stream = self.sources[0]
        # A plain local tar: buffered reads of its fd, nothing between.
        if stream.compression == "plain" and self.file is not None:
            with os.fdopen(os.dup(self.file.fd), "rb", buffering=BLOCK * 16) as f:
                return scan_table(f, self.path, self.file.size)
        try:
            with io.BufferedReader(SourceFile(stream), buffer_size=BLOCK * 128) as f:
                return scan_table(f, self.path, stream.size)
        except (NotAnArchive, TruncatedArchive) as e:
            raise type(e)(self.path, f"{stream.compression}-compressed, but {e.reason}") from e

    def _load_or_scan(self, cache: Store | None, key: str | None, rescan: bool) -> ArchiveTable:
        """The table stored under ``key`` (the file identity), else a scan (stored if worth it)."""

        def encode(table: ArchiveTable) -> bytes | None:
            worth = (
                len(table) >= TABLE_CACHE_MIN_ENTRIES
                or self.sources[0].compression != "plain"
                or self.file is None  # a remote archive: a scan costs round trips
            )
            if not worth:
                return None
            payload = encode_table(table)
            # From here on the table reads the payload's bytes (its names blob is the payload's):
            # the scan's own copy is let go before the store frames another (1M entries: -80 MB).
            table.adopt(decode_table(payload))
            return payload

        return load_or_build(
            cache,
            TABLE,
            key,
            name=self.path,
            decode=decode_table,
            build=self._scan,
            encode=encode,
            rebuild=rescan,
        )

    @property
    def fd(self) -> int:
        """The archive's open fd (-1 once closed, or for a remote archive)."""
        return -1 if self.file is None else self.file.fd

    def files(self) -> Iterator[tuple[str, Entry]]:
        """Every regular file in the table."""
        return self.table.files()

    def close(self) -> None:
        """Close every source and the archive's fd."""
        super().close()
        self.origin.close()


class FileOrigin(Origin):
    """A local archive file, opened read-only for the archive's life (the zero-copy path: FileRange)."""

    def __init__(self, path: str) -> None:
        self.file = OpenFile(path)
        if not self.file.is_regular:
            self.file.close()
            raise NotAnArchive(path, "not a regular file")
        self.name = path
        self.size = self.file.size
        self.mtime = self.file.stat.st_mtime

    def source(self) -> Source:
        return FileRange(self.file)

    def identity(self) -> str:
        from .cache import file_key

        return file_key(self.file)

    def close(self) -> None:
        self.file.close()


def open_archive(
    path: str | Origin,
    cache: Store | None,
    *,
    rescan: bool = False,
    limits: Limits | None = None,
    key: str | None = None,
) -> Archive:
    """Open the archive at ``path``, showing progress while a compressed one is indexed (TTY or log)."""
    name = path if isinstance(path, str) else path.name
    total = file_size(path) if isinstance(path, str) else path.size
    with reporting(f"indexing {name}", total) as progress:
        return Archive(path, cache, rescan=rescan, limits=limits, progress=progress, key=key)


def file_size(path: str) -> int:
    """The size of the file at ``path`` (a progress total), 0 when it cannot be had (opening says why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
