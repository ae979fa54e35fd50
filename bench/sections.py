"""bench/results.md: one section per measurement, each between its own markers, rewritten in place.

Every bench module writes its results through ``write_section`` (one place for the format), so a
run of one module replaces its own section and keeps the others' as they were.
"""

from __future__ import annotations

from pathlib import Path

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


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """The lines of a results table: measurement, ocifuse, against, ratio, target, verdict."""
    return [
        "| measurement | ocifuse | against | ratio | target | |",
        "|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]
