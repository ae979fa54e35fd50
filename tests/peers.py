"""The peer tools tests run: require them, run them.

Use::

    from peers import require_tools, run

    require_tools("umoci", "skopeo")
    run("skopeo", "copy", "--quiet", f"oci:{layout}:v1", f"oci-archive:{archive}:v1")

``run`` fails the test with the tool's output when it exits non-zero (and returns its stdout);
``pipe`` runs a filter from one file into another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from mounting import skip_or_fail

StrPath = str | os.PathLike[str]
TIMEOUT = 300.0  # seconds: a peer tool that takes longer has hung

# What ``podman run`` needs on these VMs: crun cannot set rlimits here, so runc and explicit ones.
PODMAN_RUN = [
    "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network=none"
]  # fmt: skip


def require_tools(*tools: str) -> None:
    """Skip when a peer tool is missing, except in CI (``CI=true``), where that is a failure."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    skip_or_fail(f"missing peer tool(s): {', '.join(missing)}")


def run(*argv: StrPath, env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> str:
    """Run a peer tool; its stdout. Fail the test with its output if it fails."""
    proc = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def pipe(argv: Sequence[str], src: Path, dst: Path) -> Path:
    """Run the filter ``argv`` with ``src`` as its stdin and ``dst`` as its stdout; returns ``dst``."""
    with open(src, "rb") as i, open(dst, "wb") as o:
        subprocess.run(list(argv), stdin=i, stdout=o, check=True, timeout=TIMEOUT)
    return dst
