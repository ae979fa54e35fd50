"""bench/results.md: one section per measurement, each between its own markers, rewritten in place.

Every bench module writes its results through ``write_section`` (one place for the format), so a
run of one module replaces its own section and keeps the others' as they were. ``Samples`` holds a
run's rounds; ``round_options`` and ``module_main`` are the command line of a module that measures
in rounds and writes one section (bench/compressed.py, bench/rootfs.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import scratch_dir

RESULTS = Path(__file__).with_name("results.md")


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace the ``name`` section of ``path`` with ``text``, or add it at the end."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Bench results\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new)


def met(good: bool) -> str:
    """A target's verdict in a module's table: met, or **missed**."""
    return "met" if good else "**missed**"


def verdict(ok: bool | None) -> str:
    """A target's verdict in the read-path and latency tables: **pass**, **miss**, or n/a (no target)."""
    return "n/a" if ok is None else ("**pass**" if ok else "**miss**")


def stamp() -> str:
    """When a measurement ran, and the load then: ``2026-01-02 03:04 UTC, load average 1.5``."""
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}"


def with_table(head: str, rows: Sequence[tuple[str, ...]]) -> str:
    """A module's section: ``head`` (what was measured, how, when), then its results table."""
    return "\n".join([head, "", *table(rows)])


def table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """The lines of a results table: measurement, ocifuse, against, ratio, target, verdict."""
    return [
        "| measurement | ocifuse | against | ratio | target | |",
        "|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]


# -- a module's run: its samples, options and main -------------------------------------------------


class Samples:
    """Named lists of per-round values; medians on demand."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def med(self, name: str) -> float:
        return statistics.median(self.values[name])

    def __contains__(self, name: str) -> bool:
        return name in self.values


def round_options(p: argparse.ArgumentParser, *, reads: str) -> None:
    """The options of a bench module that measures in rounds: --runs, --reads, --no-write, --scratch."""
    p.add_argument("--runs", type=int, default=3, help="rounds (medians reported)")
    p.add_argument("--reads", type=int, default=300, help=reads)
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results.md alone")
    p.add_argument("--scratch", type=Path, default=None, help="scratch directory (default: a temporary one)")


def module_main(
    p: argparse.ArgumentParser,
    bench: Callable[[argparse.Namespace, Path], str],
    *,
    section: str,
    title: str,
    why: str,
) -> int:
    """A bench module's main: as root, ``bench(args, scratch)`` in a scratch directory removed
    afterwards; its markdown printed and written as ``section`` of bench/results.md (unless
    --no-write). ``p`` has ``round_options``; ``why`` says what needs root."""
    args = p.parse_args()
    module = f"bench/{section}.py"
    if os.geteuid() != 0:
        print(f"{module}: run as root ({why})", file=sys.stderr)
        return 2
    with scratch_dir(f"ocifuse-{section}-bench-", args.scratch) as scratch:
        text = bench(args, scratch)
    print(text)
    if not args.no_write:
        write_section(section, f"## {title} ({module})\n\n{text}")
    return 0
