"""Byte sizes as users write them, in accelerate's units: the one parser every option uses.

"5GB" = 5·10^9 and "20GiB" = 20·2^30 (GB/MB/KB are decimal, GiB/MiB/KiB binary), a bare number is
bytes. Sizes are compared as numbers after parsing, never as strings, so "5000MB" equals "5GB".
"""

from __future__ import annotations

import math
import re

from .errors import ConfigError

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(s: str | int | float, what: str = "size", allow_zero: bool = False) -> int:
    """A whole number of bytes, at least 1 (0 too with `allow_zero`: a device given no memory);
    `what` names the option in the error (e.g. "--max-shard-size")."""
    if isinstance(s, bool):
        raise ConfigError(f"{what}: cannot parse size {s!r}")
    if isinstance(s, (int, float)):
        value = float(s)
    else:
        m = _SIZE.match(s)
        unit = m.group(2).upper() if m else ""
        if not m or (unit and unit not in UNITS):
            raise ConfigError(f"{what}: cannot parse size {s!r} (use e.g. 5GB, 500MB, 20GiB or a number of bytes)")
        value = float(m.group(1)) * UNITS[unit or "B"]
    if not math.isfinite(value) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{what}: size {s!r} must be {'a finite number of bytes' if allow_zero else 'at least 1 byte'}")
    return int(value)
