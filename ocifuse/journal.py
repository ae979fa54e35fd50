"""Is stderr systemd's journal? Then each line can carry its syslog priority as a ``<N>`` prefix."""

from __future__ import annotations

import os

# sd-daemon(3): a line written to a journal stream may start with "<N>", N the syslog(3) priority.
ERR = 3
WARNING = 4
INFO = 6
DEBUG = 7


def stderr_is_journal(fd: int = 2) -> bool:
    """True when ``fd`` is the stream $JOURNAL_STREAM names.

    systemd.exec(5), "$JOURNAL_STREAM": the variable holds the journal stream's "device:inode"; it is
    inherited by whatever a service starts, so a program compares it with its own stderr rather than
    trusting that it is set.
    """
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def prefix(priority: int) -> str:
    """The ``<N>`` prefix for ``priority`` when stderr is the journal, else nothing."""
    return f"<{priority}>" if stderr_is_journal() else ""
