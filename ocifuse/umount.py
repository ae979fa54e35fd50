"""``ocifuse umount``: remove an ocifuse mount, also one whose daemon died.

Kept apart from daemon.py so that unmounting imports neither trio nor pyfuse3: the command's cost
is Python's start-up and one ``fusermount3 -u`` (bench/README.md, "One-shot latency").
"""

from __future__ import annotations

import os
import re
import subprocess

from .errors import MountError

FSTYPE = "fuse.ocifuse"  # subtype=ocifuse, always set (options.py)
_OCTAL = re.compile(r"\\([0-7]{3})")


def visible_mount(mountpoint: str) -> tuple[str, str] | None:
    """(device "major:minor", filesystem type) of the mount visible at ``mountpoint``, or None.

    Read from /proc/self/mountinfo (proc(5)), never by stat: a stat of a FUSE mount waits for its
    daemon, which may be the caller.
    """
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        found = None
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == mountpoint:
                found = (fields[2], fields[sep + 1])  # the last mount at a point is the visible one
        return found


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted at ``mountpoint``, or None."""
    found = visible_mount(mountpoint)
    return None if found is None else found[1]


def umount_main(mountpoint: str, *, lazy: bool = False) -> int:
    """``ocifuse umount``: unmount an ocifuse mount, even one whose daemon died."""
    mountpoint = os.path.abspath(mountpoint)
    kind = mount_type(mountpoint)
    if kind is None:
        if not os.path.lexists(mountpoint):
            raise MountError(f"{mountpoint}: no such directory")
        if not os.path.isdir(mountpoint):
            raise MountError(f"{mountpoint} is not a directory, so not a mountpoint")
        raise MountError(f"{mountpoint} is not mounted")
    if kind != FSTYPE:
        raise MountError(f"{mountpoint} is not an ocifuse mount (it is {kind})")
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise MountError("fusermount3 not found (install the fuse3 package)") from e
    if done.returncode == 0:
        return 0
    if "busy" in done.stderr.lower():
        raise MountError(
            f"{mountpoint} is busy (files or directories in use there); close them, or use --lazy"
        )
    reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    raise MountError(f"cannot unmount {mountpoint}: {reason}")
