"""Byte counts as people write them (``512M``, ``64GiB``) and read them (``1.5 KiB``): one of each."""

from __future__ import annotations

# Binary units, as the rest of ocifuse counts: K = KiB = 1024 bytes.
_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_UNITS = ("KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """A byte count with an optional K, M, G or T suffix (powers of 1024, ``B``/``iB`` allowed): ``64G``.

    Raises ValueError when ``text`` is not one.
    """
    body = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = body[-1:] if body[-1:] in _SUFFIXES else ""
    number = body[: len(body) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 512M, 64G)")
    return int(number) * _SUFFIXES[unit]


def human_size(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1: ``512 B``, ``1.5 KiB``, ``3.2 TiB``."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in _UNITS:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            break
    return f"{n:.1f} {unit}"
