"""Byte sizes as people write them ("5GB", "500MB", "2GiB")."""

from __future__ import annotations

import re

# Decimal units as transformers and huggingface_hub use them for max_shard_size; binary units as well,
# since people write "2GiB" too. huggingface_hub's own parser is private, so this small one stands in.
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Parse a size such as ``"5GB"`` (10**9 bytes per GB) or ``"512MiB"`` into bytes.

    Example:
        >>> parse_size("1.5KB")
        1500
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: use a number with an optional unit, e.g. 5GB, 500MB, 2GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def format_size(nbytes: int) -> str:
    """``1536000`` -> ``"1.5 MB"`` (decimal units, as sizes are written elsewhere)."""
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
