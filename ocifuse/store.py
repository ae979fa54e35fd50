"""The cache seam: one interface for every cached artifact, one registry of kinds, one load-or-build rule.

Whatever takes seconds to build and is the same on every open (an archive's entry table, a gzip
seek-point index, a zstd frame table or spill file, a layer's table, an image's merged tree) is
asked of a ``Store`` under a content key, and built and stored when it is not there: always
through ``load_or_build``, so that every artifact follows the same rule for what it finds.

- absent: built, then stored (when the builder's value can be encoded);
- stale (written by another format version of its kind, or for other bytes than these: the
  ``Stale`` a decoder raises): built again quietly, the new one replacing it;
- damaged (the decoder raises ValueError; cache.py has already dropped entries whose checksum,
  owner or framing is wrong): logged as a warning, built again, replaced.

An absent (or unusable) artifact is built under the store's lock for its kind and key
(``Store.lock``): of the processes (and threads) that open the same new bytes at once, one builds
and stores it while the others wait, then load it. Locks nest only from an artifact to what it is
built from (a merged tree, a layer's table, its gzip index), in that one order everywhere, so waits
never go round in a circle.

A stored artifact is never trusted beyond what its decoder checks: every read still checks its
entry against its source's size (entries.Sources).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Artifact:
    """One kind of cached artifact: its name in the store, the version of its payload format, what it is."""

    kind: str  # lowercase words joined by dashes: an entry's file name starts with it
    version: int  # bump when the payload's format changes: older entries are then stale
    what: str  # how log lines name it
    # Whether a store waits for the entry to be on disk (fsync) before naming it. Every entry is
    # checksummed, so one cut short by a power loss is refused and rebuilt either way: durable
    # spares a rebuild (and its warning) of what took seconds; a remote block, stored many times
    # per read and fetched again in milliseconds, is not worth a disk flush each.
    durable: bool = True
    # The checksum its entries carry (cache.CHECKSUMS): "sha256" (32 bytes), or "crc32" (4 bytes)
    # for bulk data read at disk speed, where damage, not forgery, is the threat (docs/security.md).
    checksum: str = "sha256"


# The registry: every kind the store holds, and the version of its format. Version 2 is the one
# format every entry had before kinds had versions of their own (cache.CACHE_VERSION 2): such
# entries still load.
TABLE = Artifact("table", 2, "entry table")
GZIP_INDEX = Artifact("gzip-index", 2, "gzip index")
ZSTD_INDEX = Artifact("zstd-index", 2, "zstd frame table")
LAYER_TABLE = Artifact("layer-table", 2, "layer table")
TREE = Artifact("rootfs-tree", 3, "merged tree")  # 3: stored as columns (rootfs.TREE_FORMAT 3)
DOCKER_DIGESTS = Artifact("docker-digests", 2, "docker-archive member digests")
# The fetched blocks of one chunk of a remote object (remote.py), under the object's identity (URL, ETag,
# size) and the chunk's index.
# 3: a chunk per entry; 4: a crc32, not a sha256 (a chunk is checked at 3.6 GB/s here, not 0.9).
REMOTE_BLOCK = Artifact("remote-block", 4, "remote blocks", durable=False, checksum="crc32")
# Where each file of a layer served from its TOC lies (chunked.py), under the TOC's digest.
TOC_MAP = Artifact("toc-map", 2, "TOC file map")
# Spill files are the store's too (``Store.spill_path``); the zstd-index entry that names one says
# which file it was and what it holds, so a spill is found, checked and replaced through it.
KINDS = {
    a.kind: a
    for a in (TABLE, GZIP_INDEX, ZSTD_INDEX, LAYER_TABLE, TREE, DOCKER_DIGESTS, REMOTE_BLOCK, TOC_MAP)
}


# What a decoder raises for a payload it cannot use: it parses stored bytes as untrusted input, and
# a JSON document of the wrong shape fails with any of these.
DAMAGED = (ValueError, TypeError, KeyError, IndexError)


class Stale(ValueError):
    """A stored payload that is whole but not for these bytes or this use: rebuilt without a warning."""


class Store(Protocol):
    """Where artifacts are kept (cache.IndexCache; image.VerifiedStore wraps one for a layer)."""

    @property
    def enabled(self) -> bool:
        """False when nothing is ever loaded or stored (``-o nocache``, an unusable directory)."""

    def load(self, kind: str, key: str) -> bytes | None:
        """The payload stored under (kind, key), or None."""

    def store(self, kind: str, key: str, payload: bytes) -> None:
        """Store a payload (atomically; errors are logged, never raised)."""

    def spill_path(self, key: str) -> str | None:
        """Where a large derived file for ``key`` may live; None when there is no such place."""

    def lock(self, kind: str, key: str) -> AbstractContextManager[bool]:
        """Held while (kind, key) is built, so that of processes opening one archive, one builds it.

        Exclusive between processes and between threads; entering waits for another holder. It
        gives True when that holder built the artifact and stored nothing: then build without
        it. A store that cannot lock (no directory, read-only) gives False at once.
        """


def load_or_build(
    store: Store | None,
    artifact: Artifact,
    key: str | None,
    *,
    name: str,
    decode: Callable[[bytes], T],
    build: Callable[[], T],
    encode: Callable[[T], bytes | None],
    rebuild: bool = False,
) -> T:
    """The artifact stored under ``key`` when it decodes, else ``build()`` (stored as ``encode`` gives it).

    ``decode`` raises one of DAMAGED (``Stale`` for an entry that is only out of date) for a
    payload it cannot use; ``encode`` returns None (or raises ValueError/OverflowError) for a value not to be
    stored. ``rebuild`` (fsck) builds even when an entry is there, and stores the fresh one.
    ``name`` names what the artifact is of, in log lines. With no store or no key, only builds.
    """
    keep = store is not None and key is not None and store.enabled
    if not keep or rebuild:
        return _build_and_store(store if keep else None, artifact, key, name=name, build=build, encode=encode)
    assert store is not None and key is not None
    found, absent = _load(store, artifact, key, name, decode)
    if found is not None:
        return found[0]
    # Absent or unusable: one process builds it while the others opening the same bytes wait, then
    # load what it stored (N mounts of one new archive at once decompress it once, not N times).
    with store.lock(artifact.kind, key) as unstored:
        # Stored while this one looked or waited? (An unusable entry found again is not said again.)
        found, _ = _load(store, artifact, key, name, decode, quiet=not absent)
        if found is not None:
            return found[0]
        if not unstored:
            return _build_and_store(store, artifact, key, name=name, build=build, encode=encode)
    # The one before built it and stored nothing (a value not worth keeping, a full disk, an error):
    # the others would not store it either, so each builds its own at once instead of in turn.
    return _build_and_store(store, artifact, key, name=name, build=build, encode=encode)


def _load(
    store: Store,
    artifact: Artifact,
    key: str,
    name: str,
    decode: Callable[[bytes], T],
    *,
    quiet: bool = False,
) -> tuple[tuple[T] | None, bool]:
    """(``(value,)`` when stored and usable, else None; whether nothing at all was stored).

    ``quiet``: an unusable entry is a debug line, not a warning (it was said already).
    """
    payload = store.load(artifact.kind, key)
    if payload is None:
        return None, True
    try:
        value = decode(payload)
    except Stale as e:
        log.debug("%s: stored %s out of date (%s): building it again", name, artifact.what, e)
    except DAMAGED as e:
        (log.debug if quiet else log.warning)(
            "%s: stored %s unusable (%s): building it again", name, artifact.what, e
        )
    else:
        log.debug("%s: %s from the cache", name, artifact.what)
        return (value,), False
    return None, False


def _build_and_store(
    store: Store | None,
    artifact: Artifact,
    key: str | None,
    *,
    name: str,
    build: Callable[[], T],
    encode: Callable[[T], bytes | None],
) -> T:
    """``build()``, stored in ``store`` (when there is one) as ``encode`` gives it."""
    value = build()
    if store is not None and key is not None:
        try:
            data = encode(value)
        except (ValueError, OverflowError) as e:  # a lone surrogate in a name, a value too large
            log.info("%s: %s not stored (%s)", name, artifact.what, e)
            data = None
        if data is not None:
            store.store(artifact.kind, key, data)
    return value
