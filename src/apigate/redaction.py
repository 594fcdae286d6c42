"""Passwords inside URLs (`redis://:pw@host`, `http://user:pw@host`) kept out of everything the
gateway shows: logs, config errors, the admin API."""

from __future__ import annotations

import re

REDACTED = "[redacted]"
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@]*):[^@/]+@")


def redact_url(text: str) -> str:
    """`text` with the password of each URL in it replaced by "[redacted]" (the user stays)."""
    if "@" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
