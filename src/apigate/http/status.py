"""Status lines and reason phrases, built once (hot-path rule: precompute bytes)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

# b"HTTP/1.1 200 OK\r\n" for every known status; unknown ones are built on demand.
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in REASONS.items()
}


def status_line(code: int, reason: bytes = b"") -> bytes:
    line = STATUS_LINES.get(code)
    if line is not None:
        return line
    return b"HTTP/1.1 %d %s\r\n" % (code, reason or b"Unknown")
