"""The one error hierarchy of ocifuse; each error carries an errno hint for the FUSE layer."""

from __future__ import annotations

import errno as _errno


class OcifuseError(Exception):
    """Base of every error ocifuse raises on purpose; ``errno`` is what a FUSE read answers."""

    errno: int = _errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class LayoutOpenError(OcifuseError):
    """PATH cannot be opened as a layout at all (missing, unreadable, not a tar, truncated)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotAnArchive(LayoutOpenError):
    """The file is not a tar archive (or is compressed, which an oci-archive never is)."""


class NotAnImage(LayoutOpenError):
    """A tar that holds no image: neither an OCI layout (oci-layout, index.json) nor a docker-archive."""


class TruncatedArchive(LayoutOpenError):
    """The archive ends in the middle of a member or a header."""


class CompressedDataError(LayoutOpenError):
    """Compressed bytes that do not decompress whole: truncated, damaged (CRC), trailing data, unsupported.

    ``compression`` names the format ("gzip", "zstd"); ``path`` the archive or blob they belong to.
    """

    def __init__(self, path: str, compression: str, reason: str) -> None:
        super().__init__(path, f"{compression}: {reason}")
        self.compression = compression


class DecompressionLimit(LayoutOpenError):
    """Decompressing would pass a bound (``-o max_size``, ``-o spill_max``, free disk): ``option``."""

    errno = _errno.EFBIG

    def __init__(self, path: str, reason: str, option: str) -> None:
        super().__init__(path, reason)
        self.option = option


class ArchiveChanged(OcifuseError):
    """The archive was truncated or rewritten after it was opened; its bytes are no longer trusted."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path}: archive changed since it was opened")
        self.path = path


class CorruptTable(OcifuseError):
    """An entry of the table points outside its source: the table is not this archive's (EIO)."""

    def __init__(self, offset: int, size: int, source_size: int) -> None:
        super().__init__(
            f"a table entry ({size} bytes at {offset}) lies past the end of its source ({source_size} bytes)"
        )
        self.offset = offset
        self.size = size


class InvalidDigest(OcifuseError):
    """A string that does not follow the digest grammar of descriptor.md."""

    errno = _errno.EINVAL

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid digest {value!r}: {reason}")
        self.value = value
        self.reason = reason


class FileMissing(OcifuseError):
    """A file of the layout (oci-layout, index.json, a blob path) does not exist."""

    errno = _errno.ENOENT

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: no such file in the layout")
        self.name = name


class BlobNotFound(FileMissing):
    """The blob of a digest is not in the layout."""

    def __init__(self, digest: str) -> None:
        OcifuseError.__init__(self, f"blob {digest} not found")
        self.name = digest
        self.digest = digest


class SizeMismatch(OcifuseError):
    """A blob's size differs from its descriptor's."""

    def __init__(self, digest: str, expected: int, found: int) -> None:
        super().__init__(f"blob {digest}: size {found}, descriptor says {expected}")
        self.digest = digest
        self.expected = expected
        self.found = found


class DigestMismatch(OcifuseError):
    """A blob's bytes hash to something other than its digest."""

    def __init__(self, expected: str, found: str) -> None:
        super().__init__(f"blob {expected}: content hashes to {found}")
        self.expected = expected
        self.found = found


class FileMismatch(OcifuseError):
    """A file of a layer served from its table of contents whose bytes are not the TOC's digest for it."""

    def __init__(self, layer: str, name: str, reason: str) -> None:
        super().__init__(f"{layer}: {name!r}: {reason}")
        self.layer = layer
        self.name = name


class TooLarge(OcifuseError):
    """A document is larger than ocifuse will hold in memory to parse."""

    errno = _errno.EFBIG

    def __init__(self, name: str, size: int, limit: int) -> None:
        super().__init__(f"{name}: {size} bytes is more than the {limit}-byte limit for JSON")
        self.name = name
        self.size = size
        self.limit = limit


class InvalidDocument(OcifuseError):
    """JSON that does not parse or does not match its media type's schema."""

    errno = _errno.EINVAL

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class NotFound(OcifuseError):
    """A ref, digest or platform that resolution could not find."""

    errno = _errno.ENOENT


class PlatformNotFound(NotFound):
    """No image for the platform asked for under a ref; ``have`` lists the platforms there are."""

    def __init__(self, under: str, want: str, have: tuple[str, ...]) -> None:
        self.why = f"no manifest for {want} (it has {', '.join(have) if have else 'no platforms listed'})"
        super().__init__(f"{under}: {self.why}")
        self.under = under
        self.want = want
        self.have = have


class MountError(OcifuseError):
    """A mount cannot be made or removed (mountpoint, FUSE, permissions); the message says why."""


class LayerError(OcifuseError):
    """A layer the rootfs view cannot serve (absent, of an unknown type, not a tar); names the layer."""


class DiffIdMismatch(LayerError):
    """A layer's uncompressed digest is not the config's ``rootfs.diff_ids`` entry for it."""

    def __init__(self, index: int, digest: str, expected: str, found: str) -> None:
        super().__init__(
            f"layer {index} ({digest}): its uncompressed content is {found}, the config's diff_id says "
            f"{expected} (mount with -o ignore_diff_ids to serve it anyway)"
        )
        self.index = index
        self.digest = digest
        self.expected = expected
        self.found = found
