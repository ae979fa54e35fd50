"""``man ocifuse``: man/ocifuse.1 lints clean, says what the code does, and the set-up installs it.

The page is hand-written roff. What could drift is checked against the code: each command and
each of its options (cli's own parser), each ``-o`` option (options.py's sets), each environment
variable ocifuse reads.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mounting import skip_or_fail

from ocifuse import cli, options

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "man" / "ocifuse.1"
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "MOUNT OPTIONS", "EXIT STATUS",
            "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO")  # fmt: skip


def _groff(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("groff") is None:
        skip_or_fail("groff is not installed (groff-base, with man-db)")
    return subprocess.run(["groff", "-man", *args, str(PAGE)], capture_output=True, text=True, check=False)


def rendered() -> str:
    """The page as plain text, one paragraph a line (no line length to wrap at, no hyphenation)."""
    done = _groff("-Tascii", "-P-cbou", "-rLL=2000n")
    assert done.returncode == 0, done.stderr
    return done.stdout


def section(text: str, title: str) -> str:
    """The text of the section (``SH``, at column 0) or subsection (``SS``, indented 3) headed
    ``title``, up to the next heading of its level or above."""
    m = re.search(rf"^( *){re.escape(title)}\n", text, re.M)
    assert m is not None, f"no section {title!r} in the man page"
    level = len(m.group(1))
    end = re.compile(rf"^ {{0,{level}}}\S", re.M).search(text, m.end())
    return text[m.end() : end.start() if end else len(text)]


def test_the_page_lints_clean() -> None:
    """``groff -man -ww -z``: every warning on (bad macros, arguments, escapes), none given."""
    done = _groff("-ww", "-z")
    assert (done.returncode, done.stderr) == (0, "")


def test_it_has_the_sections_of_a_man_page() -> None:
    text = rendered()
    headings = re.findall(r"^(\S.*)$", text, re.M)
    assert [h for h in headings if h in SECTIONS] == list(SECTIONS)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_every_command_and_option_is_described() -> None:
    """Each command has its subsection, and each of its options is named there (and in SYNOPSIS)."""
    text = rendered()
    synopsis = " ".join(section(text, "SYNOPSIS").split())
    commands = _subparsers()
    assert set(commands) == set(cli.COMMANDS)
    for name, parser in commands.items():
        heading = next(h for h in re.findall(r"^   (ocifuse .*)$", text, re.M) if h.split()[1] == name)
        body = section(text, heading)
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", body), f"{name}: {flag}"
                assert any(f"[{f}" in synopsis for f in action.option_strings), (
                    f"{name}: {flag} not in SYNOPSIS"
                )
            if isinstance(action.choices, (list, tuple)) and not action.option_strings:
                for choice in action.choices:  # the cache verbs
                    assert re.search(rf"\b{choice}\b", body), f"{name}: {choice}"


def test_every_mount_option_is_described() -> None:
    """Every ``-o`` option options.py knows is in MOUNT OPTIONS, with ``=`` for those taking a value."""
    body = section(rendered(), "MOUNT OPTIONS")
    words = set(re.findall(r"[a-z_][a-z0-9_-]*=?", body))
    flags = options.OWN_FLAGS | options.FUSE_FLAGS | options.IGNORED_FLAGS | set(options.FORCED)
    values = options.OWN_VALUES | options.OWN_SIZES | options.FUSE_VALUES
    missing = sorted(flags - words) + sorted(f"{v}=" for v in values if f"{v}=" not in words)
    missing += [p for p in options.IGNORED_PREFIXES if p not in body]
    assert not missing, f"-o options the man page does not describe: {missing}"
    for option in sorted(options.OWN_FLAGS | options.OWN_VALUES | options.OWN_SIZES):  # each its own entry
        assert re.search(rf"^       {option}(=|\s|$)", body, re.M), option


def test_every_environment_variable_read_is_described() -> None:
    """Each variable ocifuse reads from its environment has an entry in ENVIRONMENT."""
    read: set[str] = set()
    for source in (ROOT / "ocifuse").glob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?[(\[]\s*\"([A-Z_]+)\"", source.read_text()))
    assert read, "no environment variable found: the pattern no longer matches the code"
    entries = set(re.findall(r"^       ([A-Z_]+)(?:\s|$)", section(rendered(), "ENVIRONMENT"), re.M))
    assert read <= entries, f"read but not described: {sorted(read - entries)}"


def test_man_ocifuse_finds_it() -> None:
    """The set-up installs the page where ``man`` looks: as root in /usr/local/share/man, else the
    venv's share/man, which man-db finds next to the venv's bin on PATH."""
    if shutil.which("man") is None:
        skip_or_fail("man is not installed (man-db)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MANPATH", None)
    where = subprocess.run(["man", "-w", "ocifuse"], capture_output=True, text=True, env=env, check=False)
    assert where.returncode == 0, f"man -w ocifuse: {where.stderr.strip()} (run bash .ci/setup.sh)"
    installed = Path(where.stdout.strip().splitlines()[0])
    head = installed.read_text().splitlines()[:5]
    assert any(line.startswith(".TH OCIFUSE 1 ") for line in head), installed
    shown = subprocess.run(
        ["man", "-P", "cat", "ocifuse"],
        capture_output=True,
        text=True,
        env={**env, "MANWIDTH": "80"},
        check=False,
    )
    assert shown.returncode == 0 and "ocifuse umount" in shown.stdout


def test_it_reads_at_80_columns() -> None:
    """Rendered 80 columns wide, no line runs past them (a long unbreakable word would)."""
    done = _groff("-Tascii", "-P-cbou", "-rLL=80n")
    assert done.returncode == 0
    long = [line for line in done.stdout.splitlines() if len(line) > 80]
    assert not long, long
