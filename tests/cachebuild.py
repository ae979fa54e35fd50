"""Index cache entries for tests: an archive's key, a table planted under it, the table read back.

A planted table is what a stale or damaged cache entry that still passes the cache's own checks
would hold: the tests then show what ocifuse makes of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ocifuse.cache import IndexCache, file_key
from ocifuse.entries import ArchiveTable
from ocifuse.source import OpenFile
from ocifuse.tablecodec import decode_table, encode_table

TABLE = "table"  # the cache kind of an archive's entry table


def archive_key(archive: str | os.PathLike[str]) -> str:
    """The key the cache files ``archive``'s entry table under (its identity and both ends)."""
    f = OpenFile(os.fspath(archive))
    try:
        return file_key(f)
    finally:
        f.close()


def _cache(cache: IndexCache | Path) -> IndexCache:
    return cache if isinstance(cache, IndexCache) else IndexCache(os.fspath(cache))


def plant(archive: Path, cache: IndexCache | Path, table: ArchiveTable | bytes) -> None:
    """Store ``table`` (or a raw payload) as ``archive``'s entry table in ``cache`` (or its directory)."""
    payload = table if isinstance(table, bytes) else encode_table(table)
    _cache(cache).store(TABLE, archive_key(archive), payload)


def stored_table(archive: Path, cache: IndexCache | Path) -> ArchiveTable | None:
    """The entry table ``cache`` (or its directory) holds for ``archive``, or None."""
    payload = _cache(cache).load(TABLE, archive_key(archive))
    return None if payload is None else decode_table(payload)
