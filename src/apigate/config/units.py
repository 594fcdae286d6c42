"""Durations, sizes and percentages as people write them in the config file.

Each unit has a parser (`parse_duration`, `parse_size`, `parse_percent`) that other modules use
for their own settings, a formatter that turns a value back into the shortest exact spelling
(used by `dump_config`, falling back to a plain number when no unit spells it exactly), and an
`Annotated` pydantic type that wires both into a model field:

    Duration  "250ms", "5s", "1m", "1h", "1d", "1.5s", 5 (seconds) -> float seconds
    Size      512, "32KiB", "10MiB", "1GiB", "64KB", "10MB", "1GB" -> int bytes
    Percent   "20%", 0.2                                          -> float in 0..1
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer
from pydantic_core import PydanticCustomError

__all__ = [
    "Duration",
    "NonNegativeDuration",
    "Percent",
    "PositiveDuration",
    "PositiveSize",
    "Size",
    "format_duration",
    "format_percent",
    "format_size",
    "parse_duration",
    "parse_percent",
    "parse_size",
]

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION_RE = re.compile(rf"{_NUMBER}\s*(ms|s|m|h|d)?")
_SIZE_RE = re.compile(rf"{_NUMBER}\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_PERCENT_RE = re.compile(rf"{_NUMBER}\s*(%)?")

_DURATION_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),  # (a rate limit per day, as Kong's `day`)
}
_SIZE_UNITS = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
}

_DURATION_HINT = "use e.g. 250ms, 5s, 1m, 1h, 1d"
_SIZE_HINT = "use e.g. 512, 32KiB, 10MiB, 1GiB (or KB, MB, GB)"
_PERCENT_HINT = "use e.g. 20% or 0.2, between 0% and 100%"


def _split(pattern: re.Pattern[str], value: object) -> tuple[Decimal, str | None] | None:
    """(number, unit) from "5s"-style text, or (number, None) from a bare number >= 0."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = Decimal(value)  # exact, even for 1e-07
        return (number, None) if number.is_finite() and number >= 0 else None
    if isinstance(value, str):
        match = pattern.fullmatch(value.strip())
        if match:
            return Decimal(match[1]), match[2]
    return None


def parse_duration(value: str | float) -> float:
    """Seconds from "250ms", "5s", "1m", "1h", "1d", "1.5s" or a bare number of seconds."""
    split = _split(_DURATION_RE, value)
    if split is None:
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    number, unit = split
    # Decimal arithmetic so that "250ms" is exactly float("0.25"), not 250 * 0.001.
    return float(number if unit is None else number * _DURATION_UNITS[unit])


def parse_size(value: str | int) -> int:
    """Bytes from 512, "32KiB", "10MiB", "1GiB", "64KB", "10MB", "1GB" (or "512B")."""
    split = _split(_SIZE_RE, value)
    if split is None:
        raise ValueError(f"invalid size {value!r}: {_SIZE_HINT}")
    number, unit = split
    size = number * _SIZE_UNITS[unit or "B"]
    if size != size.to_integral_value():
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(size)


def parse_percent(value: str | float) -> float:
    """A fraction in 0..1 from "20%" or from a number already in 0..1."""
    split = _split(_PERCENT_RE, value)
    if split is None:
        raise ValueError(f"invalid percentage {value!r}: {_PERCENT_HINT}")
    number, unit = split
    fraction = float(number / 100) if unit == "%" else float(number)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"invalid percentage {value!r}: {_PERCENT_HINT}")
    return fraction


def format_duration(seconds: float) -> str | float:
    """The shortest exact spelling of `seconds` ("2m", "90s", "250ms", "1.5s"), else the number."""
    if not math.isfinite(seconds) or seconds < 0:
        return seconds
    if seconds == 0:
        return "0s"
    candidates = [
        f"{int(seconds // f)}{u}"
        for u, f in (("d", 86400), ("h", 3600), ("m", 60))
        if seconds % f == 0
    ]
    milliseconds = f"{round(seconds * 1000, 6):g}ms"
    if seconds < 1:
        candidates.append(milliseconds)
    candidates += [f"{seconds:g}s", f"{seconds!r}s"]
    for text in candidates:
        if "e" not in text and _round_trips(parse_duration, text, seconds):
            return text
    return seconds


def format_size(size: int) -> str | int:
    """ "32KiB", "10MiB", "10MB" when a unit spells `size` exactly, else the int."""
    if size > 0:
        for unit in ("GiB", "MiB", "KiB", "GB", "MB", "KB"):
            count, rest = divmod(size, _SIZE_UNITS[unit])
            if not rest and count:
                return f"{count}{unit}"
    return size


def format_percent(fraction: float) -> str | float:
    """ "20%" when that spells `fraction` exactly, else the number."""
    text = f"{round(fraction * 100, 10):g}%"
    if "e" not in text and _round_trips(parse_percent, text, fraction):
        return text
    return fraction


def _round_trips(parse: Any, text: str, value: float) -> bool:
    try:
        return bool(parse(text) == value)
    except ValueError:
        return False


def _pydantic(kind: str, parse: Any) -> BeforeValidator:
    """Wrap a parser so its ValueError becomes a clean pydantic error (no "Value error, ")."""

    def validate(value: Any) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise PydanticCustomError(f"invalid_{kind}", str(exc)) from None

    return BeforeValidator(validate)


Duration = Annotated[
    float,
    _pydantic("duration", parse_duration),
    PlainSerializer(format_duration, when_used="json"),
]
PositiveDuration = Annotated[Duration, Field(gt=0)]
NonNegativeDuration = Annotated[Duration, Field(ge=0)]

Size = Annotated[
    int,
    _pydantic("size", parse_size),
    PlainSerializer(format_size, when_used="json"),
]
PositiveSize = Annotated[Size, Field(gt=0)]

Percent = Annotated[
    float,
    _pydantic("percent", parse_percent),
    PlainSerializer(format_percent, when_used="json"),
]
