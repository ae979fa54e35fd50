"""Random access into compressed bytes: ``open_decompressed`` picks the decompressor by magic bytes.

It returns a Source of the decompressed bytes of ``raw`` (``raw`` itself when it is not
compressed), never choosing by name (``source.sniff``). The first open reads the whole compressed
stream once, in order (streams.py): that one pass builds the index, checks the stream end to end
(CRC, truncation, trailing data), counts the uncompressed size and hashes the uncompressed bytes.
The index is stored under the caller's key (store.py), so a later open reads none of the stream.
Nothing is served before that pass has checked the whole stream: damaged bytes are never served.

- gzip: gzipsource.py (rapidgzip seek points);
- zstd: zstdsource.py (a frame table in place, or a spill file for large frames).
"""

from __future__ import annotations

from .errors import CompressedDataError
from .source import Source, sniff
from .store import Store
from .streams import Consumer, Limits, Opening, Progress


def open_decompressed(
    raw: Source,
    *,
    key: str | None,
    cache: Store | None,
    name: str,
    limits: Limits | None = None,
    progress: Progress | None = None,
    rebuild: bool = False,
    digest: bool = True,
    consumer: Consumer | None = None,
    threads: int = 1,
) -> Source:
    """A Source of the decompressed bytes of ``raw`` (``raw`` itself when it is not compressed).

    ``key`` names ``raw``'s content in ``cache`` (cache.blob_key / cache.file_key); with no key or
    no cache the index is built and not kept; ``rebuild`` (fsck) builds it even when stored, which
    checks the whole stream again. ``name`` (a path or a digest) names ``raw`` in errors.
    The result's ``uncompressed_digest`` is the sha256 of the decompressed stream (a layer's DiffID);
    ``digest=False`` (an outer archive, which needs none) skips hashing: 0.5-1 s less per GiB here.
    ``consumer`` reads the decompressed stream during the pass, if there is one (none for an
    uncompressed ``raw`` or a stored index): one decompression then serves the index and it.
    ``threads``: the CPUs a gzip pass decodes on (streams.split_cpus; zstd's pass uses one).

    Raises CompressedDataError (damaged, truncated, trailing data, xz/bzip2) or DecompressionLimit.
    """
    kind = sniff(raw.pread(0, 8))
    if kind is None:
        return raw
    o = Opening(
        raw=raw,
        key=key,
        cache=cache,
        name=name,
        limits=limits or Limits(),
        progress=progress,
        rebuild=rebuild,
        digest=digest,
        consumer=consumer,
        threads=max(1, threads),
    )
    if kind == "gzip":
        from .gzipsource import GzipSource

        return GzipSource.open(o)
    if kind == "zstd":
        from .zstdsource import open_zstd

        return open_zstd(o)
    raise CompressedDataError(name, kind, "not supported (ocifuse reads gzip and zstd)")
