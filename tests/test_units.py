"""Byte counts and ages written and read by people (ocifuse.units)."""

from __future__ import annotations

import pytest

from ocifuse.units import human_age, human_size, parse_age, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4096", 4096), ("64k", 64 << 10), ("64K", 64 << 10), ("512M", 512 << 20)]
    + [("512mb", 512 << 20), ("2GiB", 2 << 30), ("1T", 1 << 40), (" 7b ", 7)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "-1", "1X", "ten", "1.5G", "G", "0x10"])
def test_parse_size_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="size in bytes"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (512.4, "512 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB")]
    + [(5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"), (2 << 40, "2.0 TiB"), (4096 << 40, "4096.0 TiB")],
)
def test_human_size(n: float, text: str) -> None:
    assert human_size(n) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0), ("45s", 45), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), (" 1D ", 86400)],
)
def test_parse_age(text: str, seconds: int) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("bad", ["", "7", "d", "-1d", "1.5h", "7days", "1y"])
def test_parse_age_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="not an age"):
        parse_age(bad)


@pytest.mark.parametrize(
    ("seconds", "text"), [(-3, "0s"), (0, "0s"), (59, "59s"), (60, "1m"), (5400, "2h"), (86400 * 7, "7d")]
)
def test_human_age(seconds: float, text: str) -> None:
    assert human_age(seconds) == text
