"""The per-request half of the `jwt` plugin (apigate.plugins.jwt): finding the token in a
request and the verified-token cache, compiled with the data plane (apigate.buildinfo).

A token seen before is answered here without leaving native code: the chain calls
`TokenCache.on_request` directly, and only a token that is missing, conflicting, unknown or
past its time goes back to the plugin (`miss`) for a 401 or a signature check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from apigate.http.headers import is_name
from apigate.http.request import Request

CONFLICT: Final = b"\x00conflict"  # sentinel: two different tokens in one request
REPEATED: Final = b"\x00repeated"  # sentinel: several Authorization field lines
_BLANKS: Final = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() takes off
# A header name as WSGI, CGI and PHP see it (HTTP_X_ROLE for X-Role, x-role and X_Role alike),
# in one pass: lower case, `_` as `-`.
HEADER_FOLD: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_", b"abcdefghijklmnopqrstuvwxyz-")
# A query parameter or cookie name as PHP registers it: `.`, ` ` and `[` become `_`, so
# `access.token=` is its $_GET["access_token"] (leading spaces are dropped first).
PARAM_FOLD: Final = bytes.maketrans(b". [", b"___")


def fold_header_name(name: bytes) -> bytes:
    """The name of a header with case and `_`/`-` folded away (see HEADER_FOLD)."""
    return name.translate(HEADER_FOLD)


def fold_param_name(name: bytes) -> bytes:
    """The name of a query parameter or cookie as PHP reads it (see PARAM_FOLD)."""
    return name.lstrip(b" ").translate(PARAM_FOLD)


def is_other_spelling(name: bytes, wanted: bytes, folded: bytes) -> bool:
    """True when `name` is not `wanted` but an upstream behind PHP would read it as `wanted`
    (`folded` is fold_param_name(wanted)). Folding never lengthens a name, so a shorter one
    is answered without folding it (no allocation for most names)."""
    return len(name) >= len(folded) and name != wanted and fold_param_name(name) == folded


class Verified:
    """A cache entry: what a verified token grants, until `expires` (epoch seconds).

    `identity` is the consumer's apigate.plugins.identity.Identity (its upstream lines, made
    when the plugin was built), None with `consumer`. A `maximum_expiration` needs no check on
    a hit: a token is cached only once its `exp` was within the limit, and `exp - now` only
    shrinks from then on."""

    __slots__ = ("claims", "consumer", "expires", "forward", "identity")

    def __init__(
        self,
        claims: dict[str, Any],
        expires: float,
        consumer: Any,
        forward: list[tuple[bytes, bytes]],
        identity: Any = None,
    ) -> None:
        self.claims = claims
        self.expires = expires
        self.consumer = consumer
        self.forward = forward
        self.identity = identity

    def __repr__(self) -> str:
        return f"<Verified until {self.expires:.0f} consumer={self.consumer!r}>"


class TokenCache:
    """Where a request's token is (header, cookie, query parameter) and what the tokens
    verified so far grant (token bytes -> `Verified`, at most `size`, oldest dropped first)."""

    def __init__(
        self,
        *,
        header: bytes,
        bearer_only: bool,
        cookie: bytes | None,
        query: bytes | None,
        size: int,
        forward_headers: frozenset[bytes],
        miss: Callable[[Any, bytes | None], Any],
    ) -> None:
        self.entries: dict[bytes, Verified] = {}
        self.size = size
        self.header = header
        self.bearer_only = bearer_only
        self.cookie = cookie
        self.query = query
        self.cookie_folded = fold_param_name(cookie) if cookie is not None else b""
        self.query_folded = fold_param_name(query) if query is not None else b""
        # the claim headers' names, folded: a client-sent header that folds to one is dropped
        self.forward_headers = frozenset(fold_header_name(h) for h in forward_headers)
        # the plugin's answer for a token this cache cannot vouch for (or None: no token)
        self.miss = miss

    def on_request(self, ctx: Any) -> Any:
        """The plugin's `on_request` hook. `ctx` is Any (tests pass stand-ins), its `request`
        a real `Request`."""
        token = self.find(ctx.request)
        # The cache before the conflict check: the common case, and CONFLICT is never a key
        # (only tokens that verified are), so a conflict falls through to the plugin.
        if token is not None:
            entry = self.entries.get(token)
            if entry is not None and entry.expires > time.time():
                self.accept(ctx, entry)
                return None
        return self.miss(ctx, token)

    def find(self, req: Request) -> bytes | None:
        """The request's token, None, CONFLICT when it carries two different ones (an
        attacker must not get to choose which the gateway checks and which the upstream
        reads), or REPEATED for several Authorization lines."""
        found: bytes | None = None
        target = self.header
        size = len(target)
        lines = 0
        for name, value in req.headers:
            # the length first: most headers differ in it, and it allocates nothing
            if len(name) == size and is_name(name, target):
                lines += 1
                if value.startswith(b"Bearer ") or value[:7].lower() == b"bearer ":
                    token = _trimmed(value[7:])
                elif self.bearer_only:
                    continue  # another scheme (Basic ...) is not ours
                else:
                    token = _trimmed(value)
                if found is not None and token != found:
                    return CONFLICT
                found = token
        if lines > 1 and self.bearer_only:
            # Authorization is a singleton field (RFC 9110 §5.3, §11.6.2): a second line, of
            # whatever scheme, would reach the upstream unverified next to the checked one
            return REPEATED
        if self.cookie is None and self.query is None:
            return found
        for token in self.extra_tokens(req):
            if found is not None and token != found:
                return CONFLICT
            found = token
        return found

    def extra_tokens(self, req: Request) -> list[bytes]:
        """Tokens in the configured cookie and query parameter; [CONFLICT] for a name PHP
        would read as theirs spelled another way (`access.token`): the upstream could take
        that one, which the gateway did not check, as the token."""
        tokens: list[bytes] = []
        cookie_name = self.cookie
        if cookie_name is not None:
            for name, value in req.headers:
                if is_name(name, b"cookie"):
                    for pair in value.split(b";"):
                        key, eq, val = pair.partition(b"=")
                        if not eq:
                            continue
                        key = key.strip()
                        if key == cookie_name:
                            tokens.append(val.strip().strip(b'"'))
                        elif is_other_spelling(key, cookie_name, self.cookie_folded):
                            return [CONFLICT]
        param = self.query
        if param is not None and req.query:
            for pair in req.query.split(b"&"):
                key, eq, val = pair.partition(b"=")
                if not eq:
                    continue
                key = unquote_to_bytes(key.replace(b"+", b" "))
                if key == param:
                    tokens.append(unquote_to_bytes(val.replace(b"+", b" ")))
                elif is_other_spelling(key, param, self.query_folded):
                    return [CONFLICT]
        return tokens

    def accept(self, ctx: Any, entry: Verified) -> None:
        """Publish what the token grants: claims, consumer, claim headers for the upstream."""
        scratch: dict[str, Any] = ctx.vars
        scratch["jwt_claims"] = entry.claims
        if entry.consumer is not None:
            ctx.consumer = entry.consumer
            ctx.credential = entry.identity
        drop = self.forward_headers
        if drop:
            # the client's copies go, X_Role as well as x-role: an upstream behind WSGI, CGI or
            # PHP would read either as the gateway's X-Role
            req: Request = ctx.request
            req.headers = [h for h in req.headers if h[0].translate(HEADER_FOLD) not in drop]
            req.headers.extend(entry.forward)

    def add(self, token: bytes, entry: Verified) -> None:
        """Remember a verified token (FIFO eviction: dicts keep insertion order)."""
        if not self.size:
            return
        entries = self.entries
        if len(entries) >= self.size:
            entries.pop(next(iter(entries)))
        entries[token] = entry

    def __repr__(self) -> str:
        return f"<TokenCache {len(self.entries)} of {self.size} tokens>"


def _trimmed(value: bytes) -> bytes:
    """`value.strip()`, which compiled is a generic call, made only when there is blank space
    at either end (rarely: the connection drops a field's trailing blanks, llhttp its leading
    ones, so only the space after the scheme word can be left)."""
    if value and (value[0] in _BLANKS or value[-1] in _BLANKS):
        return value.strip()
    return value
