"""Status lines and reason phrases, built once (hot-path rule: precompute bytes)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

# b"HTTP/1.1 200 OK\r\n" for every known status; unknown ones are built on demand.
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in REASONS.items()
}

# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ), so no control byte but HTAB
_NOT_IN_REASON: Final = bytes(c for c in range(32) if c != 9) + b"\x7f"


def status_line(code: int, reason: bytes = b"") -> bytes:
    line = STATUS_LINES.get(code)
    if line is not None:
        return line
    # An upstream's status we have no phrase for: its phrase goes to the client, unless it is
    # not one (control bytes once went through). RFC 9110 §15 lets an intermediary replace a
    # reason phrase; clients ought to ignore it anyway.
    if not reason or len(reason.translate(None, _NOT_IN_REASON)) != len(reason):
        reason = b"Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (code, reason)
