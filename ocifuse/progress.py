"""Progress of long passes (fsck hashing, a first open decompressing): a bar on a TTY, log lines elsewhere."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from .units import human_size

log = logging.getLogger(__name__)

# Seconds between two progress log lines (under systemd, in the background, stderr not a TTY).
LOG_EVERY = 5.0


def on_tty() -> bool:
    """True when a bar may be drawn: stderr is a terminal and OCIFUSE_NO_PROGRESS is unset."""
    return sys.stderr.isatty() and not os.environ.get("OCIFUSE_NO_PROGRESS")


class ProgressBar:
    """A one-line progress bar on a TTY (stdlib only), redrawn at most ten times a second."""

    def __init__(self, total: int, stream: TextIO, width: int = 30, label: str = "") -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.width = width
        self.label = label
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self.draw(now)

    def draw(self, now: float) -> None:
        """Redraw the bar."""
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.width)
        rate = self.done / max(now - self._start, 1e-6)
        self.stream.write(
            f"\r{self.label}[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:3.0f}% "
            f"{human_size(self.done)} / {human_size(self.total)}  {human_size(rate)}/s "
        )
        self.stream.flush()

    def close(self) -> None:
        """Erase the bar."""
        if self._last:
            self.stream.write("\r" + " " * (self.width + len(self.label) + 60) + "\r")
            self.stream.flush()


class ProgressLog:
    """Progress as a log line every LOG_EVERY seconds (journald keeps them; a bar it could not)."""

    def __init__(self, total: int, what: str) -> None:
        self.total = max(total, 1)
        self.what = what
        self.done = 0
        self._start = self._last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= LOG_EVERY:
            self._last = now
            log.info(
                "%s: %.0f%% (%s of %s) after %.0fs",
                self.what,
                min(self.done / self.total, 1.0) * 100,
                human_size(self.done),
                human_size(self.total),
                now - self._start,
            )

    def close(self) -> None:
        """Say how long it took, if it took long enough to have said anything."""
        if self._last != self._start:
            log.info("%s: done in %.1fs", self.what, time.monotonic() - self._start)


@contextmanager
def reporting(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress callable for a pass over ``total`` bytes: a bar on a TTY, else log lines.

    Nothing shows unless the pass is fed bytes and lasts long enough (a bar from 0.1 s, a log line
    from LOG_EVERY seconds), so wrapping a pass that turns out to be instant costs nothing.
    """
    reporter: ProgressBar | ProgressLog = (
        ProgressBar(total, sys.stderr, label=f"{what} ") if on_tty() else ProgressLog(total, what)
    )
    try:
        yield reporter
    finally:
        reporter.close()
