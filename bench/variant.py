"""Bench-only launcher: ``ocifuse`` with one of the mount's choices switched off.

Run with the project's Python (``.venv/bin/python bench/variant.py VARIANT mount ARCHIVE MNT``),
it patches one choice, then runs the ordinary CLI. Used only to show what a choice buys:

- ``no-keep-cache``: ``Operations.open`` opens files without ``keep_cache`` (the kernel then drops
  a file's cached pages on every open);
- ``parallel-pass``: a gzip pass decodes on every spare CPU it is given, 2 as well
  (``streams.PARALLEL_MIN`` = 1; the mount itself decodes in parallel from 3 threads up);
- ``no-read-ahead``: a gzip pass decompresses in the thread that hashes and scans the stream
  (``gzipsource.ReadAhead`` a plain iterator): the two take turns instead of overlapping.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pyfuse3

from ocifuse import cli, fs, gzipsource, streams

VARIANTS = ("no-keep-cache", "parallel-pass", "no-read-ahead")


def _no_keep_cache() -> None:
    opened = fs.Operations.open

    async def open_without_keep_cache(self: fs.Operations, *args: Any, **kwargs: Any) -> pyfuse3.FileInfo:
        info: pyfuse3.FileInfo = await opened(self, *args, **kwargs)
        info.keep_cache = False
        return info

    fs.Operations.open = open_without_keep_cache  # type: ignore[method-assign]


def _parallel_pass() -> None:
    streams.PARALLEL_MIN = 1


class _Inline:
    """ReadAhead's interface, the items made in the reader's own thread."""

    def __init__(self, items: Iterator[bytes], depth: int = 0) -> None:
        self._items = items

    def __iter__(self) -> Iterator[bytes]:
        return self._items

    def __next__(self) -> bytes:
        return next(self._items)

    def close(self) -> None:
        pass


def _no_read_ahead() -> None:
    setattr(gzipsource, "ReadAhead", _Inline)  # noqa: B010  (gzipsource imports it from streams)


def main() -> int:
    """``variant.py VARIANT ocifuse-args...``."""
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        print(f"usage: variant.py {{{','.join(VARIANTS)}}} ARGS...", file=sys.stderr)
        return 2
    {"no-keep-cache": _no_keep_cache, "parallel-pass": _parallel_pass, "no-read-ahead": _no_read_ahead}[
        sys.argv[1]
    ]()
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
