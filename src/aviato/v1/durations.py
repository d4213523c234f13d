"""Durations written by people ("90", "90s", "15m", "12h", "7d", "1h30m"): parsed into seconds.

Part of the public surface's shared grammar, like `quantities`: the command line (`--lifetime`,
`aviato extend`) and the service's options (`--keep-stopped`) accept the same words. A bare
number is seconds; the units are s, m, h and d; parts add up ("1h30m" is 5400 seconds). No sign
and no exponent: "-1", "1e3" and "" are refused, and so is any text longer than `_MAX_TEXT`.

What this module cannot do: it does not know what a sensible duration is; each option bounds its
own (a lifetime of at least a second, a retention of at most a hundred years).
"""

from __future__ import annotations

import re

__all__ = ["DurationError", "format_duration", "parse_duration"]

_MAX_TEXT = 64
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_EXAMPLES = "90s, 15m, 2h or 1h30m"


class DurationError(ValueError):
    """The text is not a duration; the message says so in the user's words (without the name
    of the option, which the caller knows)."""


def parse_duration(text: str, allow_zero: bool = False) -> float:
    """Seconds from `90`, `90s`, `15m`, `2h`, `7d` or sums such as `1h30m` (case and the
    surrounding blanks do not matter). Zero is refused unless `allow_zero`."""
    cleaned = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(cleaned) and len(cleaned) <= _MAX_TEXT:
        match = _PART.match(cleaned, pos)
        if match is None:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not cleaned or pos != len(cleaned) or (total == 0 and not allow_zero):
        raise DurationError(f"{text!r} is not a duration such as {_EXAMPLES}")
    return total


def format_duration(seconds: float) -> str:
    """`seconds` in this grammar's largest unit that divides it: 604800 -> "7d", 43200 ->
    "12h", 5400 -> "90m", 1.5 -> "1.5s" (`parse_duration` reads each back exactly)."""
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
