"""Digest values, streaming verifiers, and the one hash loop (image-spec descriptor.md, "Digests")."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from .errors import DigestMismatch, InvalidDigest

# descriptor.md: digest ::= algorithm ":" encoded
_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
# descriptor.md, "Registered algorithms": encoded forms of sha256 and sha512.
_REGISTERED = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}


# Bytes hashed per read by hash_source: large reads amortize the per-call cost; hashlib releases
# the GIL above 2 KiB.
HASH_CHUNK = 1 << 20

Chunk = bytes | bytearray | memoryview


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


class Pread(Protocol):
    """Random access to some bytes: up to ``size`` bytes at ``offset``, short or empty only at the end."""

    def __call__(self, offset: int, size: int, /) -> Chunk: ...


@dataclass(frozen=True, slots=True)
class Digest:
    """A parsed, grammar-checked digest such as ``sha256:ab12...``."""

    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, value: object) -> Digest:
        """Parse ``value``; raises InvalidDigest unless it follows the grammar.

        Registered algorithms (sha256, sha512) must also have their exact encoded form.
        """
        if not isinstance(value, str):
            raise InvalidDigest(repr(value), "not a string")
        if _GRAMMAR.fullmatch(value) is None:
            raise InvalidDigest(value, "does not match algorithm:encoded")
        algorithm, encoded = value.split(":", 1)
        pattern = _REGISTERED.get(algorithm)
        if pattern is not None and pattern.fullmatch(encoded) is None:
            raise InvalidDigest(value, f"{algorithm} wants lowercase hex of fixed length")
        return cls(algorithm, encoded)

    @classmethod
    def from_path(cls, path: str) -> Digest | None:
        """The digest named by a layout path ``blobs/<alg>/<encoded>``, or None."""
        parts = path.split("/")
        if len(parts) != 3 or parts[0] != "blobs":
            return None
        try:
            return cls.parse(f"{parts[1]}:{parts[2]}")
        except InvalidDigest:
            return None

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data`` under a verifiable algorithm."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    @property
    def path(self) -> str:
        """Where image-layout.md puts this blob: ``blobs/<alg>/<encoded>``."""
        return f"blobs/{self.algorithm}/{self.encoded}"

    @property
    def verifiable(self) -> bool:
        """True when ocifuse can hash this algorithm (sha256 and sha512)."""
        return self.algorithm in _REGISTERED

    def verifier(self) -> Verifier:
        """A streaming verifier for this digest; raises InvalidDigest if not verifiable."""
        return Verifier(self)


class Verifier:
    """Hash bytes as they stream by and compare with the expected digest at the end."""

    __slots__ = ("expected", "_hash", "length")

    def __init__(self, expected: Digest) -> None:
        if not expected.verifiable:
            raise InvalidDigest(str(expected), f"algorithm {expected.algorithm} is not supported")
        self.expected = expected
        self._hash: _Hash = hashlib.new(expected.algorithm)
        self.length = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next chunk."""
        self._hash.update(data)  # type: ignore[arg-type]
        self.length += len(data)

    def found(self) -> Digest:
        """The digest of what was fed so far."""
        return Digest(self.expected.algorithm, self._hash.hexdigest())

    def check(self) -> None:
        """Raise DigestMismatch unless what was fed hashes to the expected digest."""
        found = self.found()
        if found != self.expected:
            raise DigestMismatch(str(self.expected), str(found))


def hash_chunks(
    chunks: Iterable[Chunk], algorithm: str = "sha256", *, progress: Callable[[int], None] | None = None
) -> Digest:
    """The digest of the concatenated ``chunks`` under ``algorithm`` (any hashlib name).

    ``progress``, if given, is called with the length of each chunk once it is hashed.
    """
    h: _Hash = hashlib.new(algorithm)
    for chunk in chunks:
        h.update(chunk)  # type: ignore[arg-type]
        if progress is not None:
            progress(len(chunk))
    return Digest(algorithm, h.hexdigest())


def read_chunks(pread: Pread, size: int, chunk: int = HASH_CHUNK) -> Iterator[Chunk]:
    """The first ``size`` bytes of ``pread``, ``chunk`` at a time; stops early at an empty read."""
    offset = 0
    while offset < size:
        data = pread(offset, min(chunk, size - offset))
        if not data:
            return
        offset += len(data)
        yield data


def hash_source(
    pread: Pread,
    size: int,
    algorithm: str = "sha256",
    *,
    chunk: int = HASH_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> Digest:
    """The digest of the first ``size`` bytes ``pread`` gives, read ``chunk`` at a time.

    A read that comes back empty before ``size`` ends the pass: the digest is of what was read.
    """
    return hash_chunks(read_chunks(pread, size, chunk), algorithm, progress=progress)
