"""Units: bytes, counts and seconds as text, and bytes read from text (`2GiB`). No torch."""

from __future__ import annotations

import re


def format_bytes(n: float) -> str:
    """Bytes in binary units: `1.50 GiB`."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_count(n: float) -> str:
    """Counts in decimal units as DeepSpeed prints them: `60.647M`."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f}{unit}"
    return f"{n:.0f}"


def format_seconds(t: float) -> str:
    """Seconds with a readable unit: `12.3 ms`."""
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(t) >= size:
            return f"{t / size:.3g} {unit}"
    return f"{t * 1e9:.3g} ns"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | float | int | None) -> float | None:
    """Bytes from a number or text such as `2GiB`, `512 MiB`, `1.5GB`, `3e9` (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    found = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if not found or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as bytes; write a number with an optional unit such as 2GiB, "
                         "512MiB or 1.5GB")
    return float(found.group(1)) * _UNITS[unit]
