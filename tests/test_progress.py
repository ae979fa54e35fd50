"""Progress of long passes: a bar on a TTY, log lines elsewhere (one place for both)."""

from __future__ import annotations

import io
import logging

import pytest

from ocifuse import progress


def test_progress_bar_draws_and_erases() -> None:
    stream = io.StringIO()
    bar = progress.ProgressBar(1000, stream, label="indexing x ")
    bar(500)
    bar.close()
    text = stream.getvalue()
    assert "indexing x [" in text and "50%" in text and text.endswith("\r")


def test_progress_log_says_how_far_and_when_done(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    monkeypatch.setattr(progress, "on_tty", lambda: False)
    with (
        caplog.at_level(logging.INFO, logger="ocifuse.progress"),
        progress.reporting("indexing app.tar.gz", 4 << 20) as report,
    ):
        report(1 << 20)
        report(1 << 20)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("indexing app.tar.gz: 25% (1.0 MiB of 4.0 MiB)")
    assert lines[1].startswith("indexing app.tar.gz: 50%")
    assert lines[-1].startswith("indexing app.tar.gz: done in ")


def test_an_instant_pass_shows_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "on_tty", lambda: False)
    with caplog.at_level(logging.INFO, logger="ocifuse.progress"), progress.reporting("indexing x", 100) as r:
        r(100)
    assert caplog.records == []
