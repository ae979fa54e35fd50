"""Byte counts and ages as people write them (``512M``, ``7d``) and read them (``1.5 KiB``, ``2h``)."""

from __future__ import annotations

import re

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


# Ages: seconds, minutes, hours, days, weeks.
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"(\d+)([smhdw])")


def parse_age(text: str) -> int:
    """A length of time in seconds from a number and its unit (s, m, h, d, w): ``7d``, ``12h``, ``30m``.

    The unit is required: a bare ``7`` could mean anything. Raises ValueError when ``text`` is not one.
    """
    found = _AGE.fullmatch(text.strip().lower())
    if found is None:
        raise ValueError(f"{text!r} is not an age (a number and s, m, h, d or w: 30m, 12h, 7d)")
    return int(found.group(1)) * _AGE_UNITS[found.group(2)]


def human_age(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps it >= 1, rounded: ``45s``, ``30m``, ``2h``, ``7d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(0, seconds):.0f}s"
