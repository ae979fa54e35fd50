"""The documents against the code: the fsck code table, the README's set-up and links.

docs/fsck.md's table of finding codes is made from the code's own (the docstring table of the
module defining fsck's ``Severity``, whose severities must be ``fsck.CODES``'s): ``python
tests/test_docs.py`` rewrites it, and a test fails while the two differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ocifuse import fsck

ROOT = Path(__file__).resolve().parent.parent
FSCK_MD = ROOT / "docs" / "fsck.md"
START, END = "<!-- fsck-codes:start -->", "<!-- fsck-codes:end -->"
_ROW = re.compile(r"``([a-z0-9-]+)``\s+(error|warning)\s+(.*)")


def code_rows() -> list[tuple[str, str, str]]:
    """(code, severity, meaning) of each row of the code table, in its order.

    The table is the docstring of the module that defines the findings' ``Severity`` (fsck.py).
    """
    doc = sys.modules[fsck.Severity.__module__].__doc__ or ""
    lines = doc.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=====")]
    assert len(rules) == 3, f"{fsck.Severity.__module__}'s docstring lost its code table"
    rows: list[list[str]] = []
    for line in lines[rules[1] + 1 : rules[2]]:
        m = _ROW.fullmatch(line)
        if m:
            rows.append([m[1], m[2], m[3].strip()])
        else:
            assert rows and line.startswith(" "), f"not a row of the table: {line!r}"
            rows[-1][2] += " " + line.strip()
    return [(code, severity, meaning.replace("``", "`")) for code, severity, meaning in rows]


def code_table() -> str:
    """The Markdown table docs/fsck.md holds between its markers."""
    out = ["| code | severity | meaning |", "| --- | --- | --- |"]
    out += [f"| `{code}` | {severity} | {meaning} |" for code, severity, meaning in code_rows()]
    return "\n".join(out)


def _documented() -> str:
    text = FSCK_MD.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_the_docstring_table_is_the_code_table() -> None:
    """Every code of fsck.CODES is in the docstring's table, once, in order, with its severity."""
    assert [(code, severity) for code, severity, _ in code_rows()] == [
        (code, severity.value) for code, severity in fsck.CODES.items()
    ]


def test_docs_fsck_md_holds_the_code_table() -> None:
    expected = code_table()
    assert _documented() == expected, (
        "docs/fsck.md's code table differs from the code's: run `python tests/test_docs.py` "
        f"to rewrite it; it should read:\n{expected}"
    )


def test_readme_fits_a_screen_and_keeps_its_promises() -> None:
    """The README: short, the two set-up commands verbatim, a Code section, every link alive."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 100
    assert "bash .ci/sample" in readme and "bash .ci/run" in readme
    for script in (".ci/sample", ".ci/run"):
        assert (ROOT / script).is_file()
    assert "\n## Code\n" in readme
    for name in ("mount", "umount", "fsck", "inspect", "cache"):
        assert f"ocifuse {name}" in readme, name
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", readme), "dated numbers belong in bench/results.md"


def test_every_relative_link_of_the_documents_leads_somewhere() -> None:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in documents:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            assert (doc.parent / path).exists(), f"{doc.relative_to(ROOT)}: a link to {target} leads nowhere"


def test_the_docs_have_no_dated_numbers() -> None:
    """Measurements and their dates live in bench/results.md; the documents link to it."""
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", doc.read_text()), doc.name


def _rewrite() -> None:
    text = FSCK_MD.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    FSCK_MD.write_text(f"{head}{START}\n{code_table()}\n{END}{tail}")


if __name__ == "__main__":
    _rewrite()
    sys.exit(0)
