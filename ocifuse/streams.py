"""What every decompressing source shares: the bounds of a first pass, its progress, its stored head.

A first pass reads a whole compressed stream once, in order (gzipsource.py, zstdsource.py): it
builds the index, checks the stream end to end, counts the uncompressed size (bounded by
``Limits``) and hashes the uncompressed bytes (a layer's DiffID, image-spec config.md).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .digest import Digest
from .errors import DecompressionLimit
from .source import Source
from .store import Stale, Store

# Default bounds of one first pass (docs/compressed.md).
DEFAULT_MAX_SIZE = 64 << 30
DEFAULT_SPILL_MAX = 16 << 30
# How much a pass reads (or decompresses) at once.
READ = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds of a first pass: uncompressed bytes read (time) and spilled (disk); mount options."""

    max_size: int = DEFAULT_MAX_SIZE  # -o max_size=SIZE
    spill_max: int = DEFAULT_SPILL_MAX  # -o spill_max=SIZE


Progress = Callable[[int], None]
"""Called with each count of compressed bytes the first pass has consumed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Opening:
    """What opening a compressed stream is given (compressed.open_decompressed says each one)."""

    raw: Source  # the compressed bytes
    key: str | None  # their content key in ``cache`` (None: nothing kept)
    cache: Store | None
    name: str  # a path or a digest, naming ``raw`` in errors and log lines
    limits: Limits
    progress: Progress | None = None
    rebuild: bool = False
    digest: bool = True

    @property
    def spill_path(self) -> str | None:
        """Where a spill of these bytes is kept, if anywhere (Store.spill_path)."""
        return self.cache.spill_path(self.key) if self.cache is not None and self.key is not None else None


def too_large(name: str, kind: str, limits: Limits) -> DecompressionLimit:
    """The error of a pass past ``limits.max_size`` uncompressed bytes (a decompression bomb)."""
    return DecompressionLimit(
        name,
        f"{kind}: decompresses to more than {limits.max_size} bytes, the max_size bound "
        "(-o max_size=SIZE raises it)",
        "max_size",
    )


class HighWater:
    """Turns positions into Progress increments, never counting a byte twice (a spill pass re-reads)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.high = 0

    def __call__(self, position: int) -> None:
        if position > self.high:
            self.progress(position - self.high)
            self.high = position


# -- the index payloads ---------------------------------------------------------------------------

# Every payload starts with: magic, uncompressed size, compressed size, sha256 of the uncompressed
# stream. The cache checks version and checksum; these fields check the entry belongs to ``raw``.
_HEAD = struct.Struct("<4sQQ32s")
NO_DIGEST = bytes(32)
U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Head:
    """The head of a stored index: which format, the stream's sizes and (if hashed) its sha256."""

    magic: bytes
    size: int
    compressed_size: int
    sha256: bytes

    def pack(self) -> bytes:
        """The head's bytes, as a payload starts with them."""
        return _HEAD.pack(self.magic, self.size, self.compressed_size, self.sha256)

    @property
    def digest(self) -> Digest | None:
        """The stream's sha256; None when the pass that built the entry did not hash (all zeros)."""
        return None if self.sha256 == NO_DIGEST else Digest("sha256", self.sha256.hex())


def unpack_head(payload: bytes, raw: Source, digest: bool, *magics: bytes) -> tuple[Head, bytes]:
    """The head and the rest of a stored payload for ``raw``.

    Raises ValueError for a payload of another format, Stale for one of other bytes (another
    compressed size) or without the digest asked for (built by a pass that did not hash).
    """
    if len(payload) < _HEAD.size:
        raise ValueError("payload cut short")
    head = Head(*_HEAD.unpack_from(payload))
    if head.magic not in magics:
        raise ValueError(f"format {head.magic!r}, not one of {magics!r}")
    if head.compressed_size != raw.size:
        raise Stale(f"built for {head.compressed_size} compressed bytes, not {raw.size}")
    if digest and head.digest is None:
        raise Stale("built without the stream's digest")
    return head, payload[_HEAD.size :]
