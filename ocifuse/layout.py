"""The read core: one Layout interface over an oci-archive or a layout directory (image-layout.md)."""

from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import model
from .archive import Archive
from .digest import Digest
from .entries import ArchiveTable, Kind, Skipped, Sources
from .errors import (
    BlobNotFound,
    FileMissing,
    InvalidDocument,
    LayoutOpenError,
    OcifuseError,
    SizeMismatch,
    TooLarge,
)
from .model import Platform
from .source import FileRange, OpenFile, Source, sub_range
from .store import Store
from .streams import Limits
from .urls import RemoteOptions

OCI_LAYOUT = "oci-layout"
INDEX_JSON = "index.json"
# Largest JSON document (index.json, a manifest, a config) read into memory to parse.
MAX_JSON = 16 << 20
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class LayoutHeader:
    """The ``oci-layout`` file (image-layout.md, "oci-layout file")."""

    image_layout_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ViewOptions:
    """How a path is opened: the same options mean the same view, whichever command asks."""

    cache: Store | None = None  # where tables and indexes are loaded from and stored (None: nowhere)
    limits: Limits = field(default_factory=Limits)  # bounds of decompressing (max_size, spill_max)
    rescan: bool = False  # fsck: trust nothing stored; scan and index again, and store the fresh ones
    rootfs: bool = False  # the merged root filesystem of one image, not the layout
    ref: str | None = None  # which image (a ref name or a digest), as inspect --ref
    platform: Platform | None = None  # which platform's image (default: this machine's)
    verify: bool = False  # rootfs: hash every layer's blob, even when all is cached
    ignore_diff_ids: bool = False  # rootfs: serve layers whose diff_id does not match the config
    remote: RemoteOptions = field(default_factory=RemoteOptions)  # a URL's timeout, CA file, memory
    index: str | None = None  # a portable index (path or URL) consulted after the cache (portable.py)


class Layout(ABC):
    """Read access to an OCI image layout, whatever holds it (ocidir-rs's ``OciRead`` idea)."""

    path: str
    skipped: list[Skipped]
    # How the layout's bytes are stored: "plain" (a tar or a directory), "gzip" or "zstd".
    compression: str = "plain"
    # What PATH is: "oci-layout" (a directory), "oci-archive" or "docker-archive" (dockerarchive.py).
    format: str = "oci-layout"

    # -- what a backend provides -------------------------------------------------------------

    @abstractmethod
    def size_of(self, name: str) -> int:
        """Size of the regular file ``name`` (a layout-relative path); raises FileMissing."""

    @abstractmethod
    def read_at(self, name: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of file ``name`` from ``offset``; raises FileMissing."""

    @abstractmethod
    def file_names(self) -> Iterator[str]:
        """Every regular file of the layout, as layout-relative paths."""

    @abstractmethod
    def blob_source(self, digest: Digest) -> Source:
        """The blob's bytes as a random-access source, valid until the layout is closed; BlobNotFound."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds open."""

    def __enter__(self) -> Layout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what every layout offers ------------------------------------------------------------

    def read_small(self, name: str, limit: int = MAX_JSON) -> bytes:
        """All of file ``name``, refusing files over ``limit`` bytes."""
        size = self.size_of(name)
        if size > limit:
            raise TooLarge(name, size, limit)
        return self.read_at(name, 0, size)

    def header(self) -> LayoutHeader:
        """Parse ``oci-layout``; it must be an object with a string ``imageLayoutVersion``."""
        obj = model.loads(OCI_LAYOUT, self.read_small(OCI_LAYOUT, 1 << 16))
        version = obj.get("imageLayoutVersion")
        if not isinstance(version, str):
            raise InvalidDocument(OCI_LAYOUT, "imageLayoutVersion is missing or not a string")
        return LayoutHeader(version)

    def index(self) -> model.Index:
        """Parse ``index.json`` (image-layout.md: "index.json file" is an image index)."""
        return model.Index.from_json(INDEX_JSON, model.loads(INDEX_JSON, self.read_small(INDEX_JSON)))

    def has_file(self, name: str) -> bool:
        """True when the regular file ``name`` exists."""
        try:
            self.size_of(name)
        except FileMissing:
            return False
        return True

    def blob_size(self, digest: Digest) -> int:
        """Size of a blob; raises BlobNotFound."""
        try:
            return self.size_of(digest.path)
        except FileMissing as e:
            raise BlobNotFound(str(digest)) from e

    def has_blob(self, digest: Digest) -> bool:
        """True when the blob's file exists."""
        return self.has_file(digest.path)

    def iter_blob(self, digest: Digest, chunk: int = CHUNK) -> Iterator[bytes]:
        """Stream a blob's bytes in chunks (never the whole blob at once)."""
        size = self.blob_size(digest)
        offset = 0
        while offset < size:
            data = self.read_at(digest.path, offset, min(chunk, size - offset))
            if not data:
                raise SizeMismatch(str(digest), size, offset)
            offset += len(data)
            yield data

    def read_blob(self, desc: model.Descriptor, limit: int = MAX_JSON) -> bytes:
        """A small blob whole, checked against the descriptor's size and (if verifiable) digest."""
        size = self.blob_size(desc.digest)
        if size != desc.size:
            raise SizeMismatch(str(desc.digest), desc.size, size)
        data = self.read_small(desc.digest.path, limit)
        if desc.digest.verifiable:
            verifier = desc.digest.verifier()
            verifier.update(data)
            verifier.check()
        return data

    def document(self, desc: model.Descriptor) -> model.Index | model.Manifest | None:
        """The index or manifest a descriptor points at (None for other media types, left unread)."""
        if desc.media_type not in model.INDEX_TYPES | model.MANIFEST_TYPES:
            return None
        return model.parse_document(str(desc.digest), desc.media_type, self.read_blob(desc))

    def list_blobs(self) -> Iterator[tuple[str, Digest | None]]:
        """Every file under ``blobs/``, with the digest its path names (None if it names none)."""
        for name in self.file_names():
            if name.startswith("blobs/"):
                yield name, Digest.from_path(name)


class TableLayout(Layout):
    """A layout served from an entry table: lookups in the table, bytes through its reader.

    The table and reader are the archive's own (an oci-archive) or a view's made over the archive
    (a docker-archive, dockerarchive.DockerLayout); the archive is never changed by a view.
    """

    def __init__(self, archive: Archive, table: ArchiveTable, reader: Sources) -> None:
        """Serve ``table`` through ``reader`` over the open ``archive`` (closed with this layout)."""
        self.archive = archive
        self.table = table
        self.reader = reader
        self.path = archive.path
        self.skipped = table.skipped
        self.compression = archive.compression
        self._index: model.Index | None = None

    def index(self) -> model.Index:
        """Parse ``index.json`` once: an open archive's bytes never change (reads raise ArchiveChanged).

        resolve() and referrers() ask for it per ref; a 1,000-entry index parsed per entry is 10**6.
        """
        if self._index is None:
            self._index = super().index()
        return self._index

    def size_of(self, name: str) -> int:
        entry = self.table.get(name)
        if entry is None or entry.kind is not Kind.FILE:
            raise FileMissing(name)
        return entry.size

    def read_at(self, name: str, offset: int, size: int) -> bytes:
        entry = self.table.get(name)
        if entry is None or entry.kind is not Kind.FILE:
            raise FileMissing(name)
        return self.reader.pread(entry, offset, size)

    def file_names(self) -> Iterator[str]:
        return (name for name, _ in self.table.files())

    def blob_source(self, digest: Digest) -> Source:
        entry = self.table.get(digest.path)
        if entry is None or entry.kind is not Kind.FILE:
            raise BlobNotFound(str(digest))
        return sub_range(self.reader.sources[entry.source], entry.offset, entry.size)

    def close(self) -> None:
        self.archive.close()


class ArchiveLayout(TableLayout):
    """A layout inside an oci-archive: the archive's own table, bytes by pread."""

    format = "oci-archive"

    def __init__(self, archive: Archive) -> None:
        """Serve the open ``archive`` (closed with this layout)."""
        super().__init__(archive, archive.table, archive)


class DirectoryLayout(Layout):
    """A layout directory. Every open walks from the root fd with O_NOFOLLOW: no symlink is followed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.skipped = []
        self._opened: list[OpenFile] = []
        try:
            self._root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise LayoutOpenError(path, e.strerror or str(e)) from e

    def _open(self, name: str) -> int:
        """An fd of regular file ``name``, opened component by component without following links."""
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise FileMissing(name)
        # O_NONBLOCK: opening a fifo planted in the layout must not wait for a writer (it is refused below).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = self._root
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                new = os.open(part, flags | (0 if last else os.O_DIRECTORY), dir_fd=fd)
                if fd != self._root:
                    os.close(fd)
                fd = new
        except OSError as e:
            if fd != self._root:
                os.close(fd)
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise FileMissing(name) from e
            raise OcifuseError(f"{self.path}/{name}: {e.strerror}") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileMissing(name)
        return fd

    def size_of(self, name: str) -> int:
        fd = self._open(name)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read_at(self, name: str, offset: int, size: int) -> bytes:
        fd = self._open(name)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def iter_blob(self, digest: Digest, chunk: int = CHUNK) -> Iterator[bytes]:
        try:
            fd = self._open(digest.path)
        except FileMissing as e:
            raise BlobNotFound(str(digest)) from e
        try:
            offset = 0
            while data := os.pread(fd, chunk, offset):
                offset += len(data)
                yield data
        finally:
            os.close(fd)

    def blob_source(self, digest: Digest) -> Source:
        try:
            fd = self._open(digest.path)
        except FileMissing as e:
            raise BlobNotFound(str(digest)) from e
        file = OpenFile(f"{self.path}/{digest.path}", fd=fd)
        self._opened.append(file)
        return FileRange(file)

    def file_names(self) -> Iterator[str]:
        def walk(prefix: str, dir_fd: int) -> Iterator[str]:
            with os.scandir(dir_fd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                name = f"{prefix}{entry.name}"
                if entry.is_file(follow_symlinks=False):
                    yield name
                elif entry.is_dir(follow_symlinks=False):
                    sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                    try:
                        yield from walk(f"{name}/", sub)
                    finally:
                        os.close(sub)

        return walk("", self._root)

    def close(self) -> None:
        for file in self._opened:
            file.close()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1
