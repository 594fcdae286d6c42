"""Passwords inside URLs (`redis://:pw@host`, `http://user:pw@host`) kept out of everything the
gateway shows: logs, config errors, the admin API."""

from __future__ import annotations

import re

REDACTED = "[redacted]"
# user ":" password "@" host. The password runs to the LAST "@" of the authority (which ends
# at "/", "?", "#" or a blank), since URL parsers (urllib, redis-py) split the credentials from
# the host there: a raw "@" inside a password is part of the password.
_URL_PASSWORD = re.compile(r"(?<=://)([^:/?#\s]*):[^/?#\s]+@")


def redact_url(text: str) -> str:
    """`text` with the password of each URL in it replaced by "[redacted]" (the user stays)."""
    if "@" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
