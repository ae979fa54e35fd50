"""Byte counts written and read by people (ocifuse.units)."""

from __future__ import annotations

import pytest

from ocifuse.units import human_size, parse_size


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
