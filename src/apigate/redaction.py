"""Passwords inside URLs (`redis://:pw@host`, `http://user:pw@host`,
`redis://host/0?password=pw`) kept out of everything the gateway shows: logs, config errors,
the admin API; and the names of the headers and query parameters that carry credentials (the
admin API hides their configured values, `request_termination`'s echo their values as sent)."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
# user ":" password "@" host. The password runs to the LAST "@" of the authority (which ends
# at "/", "?", "#" or a blank), since URL parsers (urllib, redis-py) split the credentials from
# the host there: a raw "@" inside a password is part of the password.
_URL_PASSWORD = re.compile(r"(?<=://)([^:/?#\s]*):[^/?#\s]+@")
# A URL's query: from its first "?" to the next blank.
_URL_QUERY = re.compile(r"(://[^?\s]*\?)(\S+)")
# One query parameter; its value runs to the next "&" (or the end of the query), so a "#" or a
# quote after a password is redacted with it rather than shown.
_QUERY_PARAM = re.compile(r"([^&=]+)=([^&]*)")
# A query parameter after "?" or "&" anywhere in a line of text, a URL path's without a scheme
# included (`redact_url` looks for "://"); its value runs to the next "&", blank or "#".
_QUERY_PARAM_IN_TEXT = re.compile(r"(?<=[?&])([^&=\s?#]+)=([^&\s#]*)")
# Query parameters whose value is a credential: the ones redis-py reads as secrets (every
# parameter it does not know becomes a connection keyword, so `?password=` and
# `?ssl_password=` authenticate), and the usual names of credentials in URLs. (Not plain
# `key`: too often an ordinary parameter.) Compared decoded and without regard to case, as
# `?pass%77ord=` is `password` to redis-py.
SECRET_QUERY_PARAMS = frozenset(
    {
        "password",
        "ssl_password",
        "pass",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "auth",
        "api_key",
        "apikey",
    }
)

# Header names whose values are credentials (Authorization, an API key), lower-case...
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)
# ...and the credential headers named by a custom pattern (X-Upstream-Token, X-Client-Secret).
# Only dashed names: config keys are snake_case, so no setting (rate_limit's `key`) is taken.
# Not "-key": Idempotency-Key, X-Cache-Key or a match on X-Routing-Key hold no secret, and a
# redacted value makes a GET then PUT of the route a 400 (admin API). The API keys are named
# above (x-api-key, api-key) and in SECRET_QUERY_PARAMS (apikey, api_key).
SECRET_HEADER_SUFFIXES = ("-token", "-secret", "-password")


def is_credential_name(name: str) -> bool:
    """Whether a header or query parameter of this name carries a credential (any case)."""
    low = name.lower()
    return (
        low in SECRET_HEADERS
        or low in SECRET_QUERY_PARAMS
        or low.endswith(SECRET_HEADER_SUFFIXES)  # (each suffix starts with a dash)
    )


def redact_url(text: str) -> str:
    """`text` with the password of each URL in it replaced by "[redacted]" (the user stays),
    and the value of each credential query parameter (`?password=`, `&token=`...)."""
    if "@" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    if "?" in text:
        text = _URL_QUERY.sub(lambda m: m.group(1) + redact_query(m.group(2)), text)
    return text


def redact_text(text: str) -> str:
    """`redact_url`, and the secret query parameters of a URL path without a scheme in a line
    of text (a library's log line: urllib3's "url: /v1/traces?api_key=...")."""
    text = redact_url(text)
    if "=" in text:
        text = _QUERY_PARAM_IN_TEXT.sub(_redact_param, text)
    return text


def redact_query(query: str, names: frozenset[str] = SECRET_QUERY_PARAMS) -> str:
    """A query string (without "?") with the value of each parameter in `names` (lower-case;
    compared decoded and without regard to case) replaced by "[redacted]"."""
    return _QUERY_PARAM.sub(lambda m: _redact_param(m, names), query)


def _redact_param(m: re.Match[str], names: frozenset[str] = SECRET_QUERY_PARAMS) -> str:
    """A `name=value` match with the value redacted when the name is a credential's."""
    name = m.group(1)
    if m.group(2) and unquote_plus(name).strip().lower() in names:
        return f"{name}={REDACTED}"
    return m.group(0)
