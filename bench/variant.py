"""Bench-only launcher: ``ocifuse`` with one of the mount's cache choices switched off.

Run with the project's Python (``.venv/bin/python bench/variant.py no-keep-cache mount ARCHIVE MNT``):
it patches ``Operations.open`` so files are opened without ``keep_cache`` (the kernel then drops a
file's cached pages on every open), then runs the ordinary CLI. Used only to show what keep_cache buys.
"""

from __future__ import annotations

import sys
from typing import Any

import pyfuse3

from ocifuse import cli, fs

VARIANTS = ("no-keep-cache",)


def _no_keep_cache() -> None:
    opened = fs.Operations.open

    async def open_without_keep_cache(self: fs.Operations, *args: Any, **kwargs: Any) -> pyfuse3.FileInfo:
        info: pyfuse3.FileInfo = await opened(self, *args, **kwargs)
        info.keep_cache = False
        return info

    fs.Operations.open = open_without_keep_cache  # type: ignore[method-assign]


def main() -> int:
    """``variant.py VARIANT ocifuse-args...``."""
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        print(f"usage: variant.py {{{','.join(VARIANTS)}}} ARGS...", file=sys.stderr)
        return 2
    _no_keep_cache()
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
