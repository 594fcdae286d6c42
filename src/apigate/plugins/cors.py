"""Cross-origin resource sharing (`cors`), answered by the gateway.

- A preflight (OPTIONS with Origin and Access-Control-Request-Method) never reaches the
  upstream: an allowed origin, method and header set gets a 204 with the Access-Control-Allow-*
  headers; anything else gets a 403.
- An actual request from an allowed origin gets `Access-Control-Allow-Origin: <its origin>`
  and, if configured, credentials and exposed headers. A disallowed origin, or a request
  without Origin, gets no CORS header at all, so the browser keeps the response from the page.
  The gateway's policy is the only one: every `Access-Control-*` header the upstream sent is
  removed first (an upstream's `Access-Control-Allow-Origin: *` must not reach any origin).
- Every response on the route carries `Vary: Origin` (merged into the upstream's Vary): what
  the gateway adds depends on the request's Origin, even with `*` (which echoes the origin and
  refuses `null`), so a shared cache must not give one origin's response to another.

`origins` entries: an exact origin (`https://app.example.com`, port included when not the
default), `*` for any origin except `null`, or a wildcard subdomain `https://*.example.com`
(one or more labels before `.example.com`, same scheme and port). `credentials: true` cannot
be combined with `*`, nor with `null` (which any site can send from a sandboxed iframe): that
would let every site on the web send credentialed requests.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from apigate.config.errors import located_error
from apigate.config.units import NonNegativeDuration
from apigate.http.headers import is_token
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import StrictPluginConfig, forbidden

_ORIGIN = re.compile(
    r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9\-.]*[a-z0-9])?)(?::(\d{1,5}))?"
)
_PATTERN = re.compile(r"(https?)://\*\.([a-z0-9](?:[a-z0-9\-.]*[a-z0-9])?)(?::(\d{1,5}))?")
_CACHE_MAX = 10_000
DEFAULT_METHODS = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"]


class CorsConfig(StrictPluginConfig):
    origins: list[str] = Field(min_length=1)
    methods: list[str] = DEFAULT_METHODS
    headers: list[str] | None = None  # None: allow the headers the preflight asks for
    expose_headers: list[str] = []
    credentials: bool = False
    max_age: NonNegativeDuration | None = None

    @field_validator("origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            low = origin.lower().rstrip("/")
            if low not in ("*", "null") and not (_ORIGIN.fullmatch(low) or _PATTERN.fullmatch(low)):
                raise ValueError(
                    f"invalid origin {origin!r}: use https://app.example.com, "
                    "https://*.example.com or *"
                )
            out.append(low)
        return out

    @field_validator("methods", "headers", "expose_headers")
    @classmethod
    def _check_tokens(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            if not is_token(item):
                raise ValueError(f"invalid name {item!r}")
        return value

    @model_validator(mode="after")
    def _credentials_need_origins(self) -> CorsConfig:
        if self.credentials and "*" in self.origins:
            problem = "credentials: true needs explicit origins, not '*'"
            raise located_error(type(self).__name__, [(("credentials",), problem)])
        if self.credentials and "null" in self.origins:
            # Browsers send `Origin: null` from sandboxed iframes, data: and file: pages: any
            # site can, so allowing it with credentials is '*' with credentials.
            problem = (
                "credentials: true cannot allow the origin 'null': any site can send "
                "Origin: null (from a sandboxed iframe), so it is as open as '*'"
            )
            raise located_error(type(self).__name__, [(("credentials",), problem)])
        return self


class OriginRules:
    """Origin matching: exact set, any (`*`), and (scheme, suffix, port) wildcard patterns."""

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.exact = frozenset(o for o in origins if "*" not in o)
        self.patterns: list[tuple[str, str, str | None]] = []
        for origin in origins:
            m = _PATTERN.fullmatch(origin)
            if m:
                self.patterns.append((m[1], "." + m[2], m[3]))
        self._cache: dict[str, bool] = {}

    def allows(self, origin: str) -> bool:
        hit = self._cache.get(origin)
        if hit is None:
            hit = self._match(origin)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[origin] = hit
        return hit

    def _match(self, origin: str) -> bool:
        if origin in self.exact:
            return True
        low = origin.lower()
        m = _ORIGIN.fullmatch(low)
        if m is None:
            return False  # includes "null", which only an exact entry allows
        if self.any or low in self.exact:
            return True
        scheme, host, port = m[1], m[2], m[3]
        return any(
            scheme == p_scheme
            and port == p_port
            and host.endswith(suffix)
            and len(host) > len(suffix)
            for p_scheme, suffix, p_port in self.patterns
        )


def without_cors_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers less its own CORS answer (`Access-Control-*`)."""
    return [h for h in headers if not h[0].lower().startswith(b"access-control-")]


def vary_on_origin(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with Origin in Vary: the upstream's Vary fields merged into one with Origin
    added, or left alone when they already name Origin or `*` (which covers it)."""
    vary = [v.strip() for n, v in headers if n.lower() == b"vary" and v.strip()]
    names = {t.strip().lower() for v in vary for t in v.split(b",")}
    if b"origin" in names or b"*" in names:
        return headers
    merged = [h for h in headers if h[0].lower() != b"vary"]
    merged.append((b"Vary", b", ".join([*vary, b"Origin"])))
    return merged


class CorsPlugin(Plugin):
    name = "cors"
    priority = 2100
    Config = CorsConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, CorsConfig)
        self.cfg = config
        self.rules = OriginRules(config.origins)
        self.methods = frozenset(m.upper() for m in config.methods)
        self.allowed_headers = (
            frozenset(h.lower() for h in config.headers) if config.headers is not None else None
        )
        self._methods_value = ", ".join(config.methods).encode()
        self._headers_value = ", ".join(config.headers).encode() if config.headers else b""
        extra: list[tuple[bytes, bytes]] = []
        if config.credentials:
            extra.append((b"Access-Control-Allow-Credentials", b"true"))
        self._preflight_extra = list(extra)
        if config.max_age is not None:
            self._preflight_extra.append((b"Access-Control-Max-Age", b"%d" % int(config.max_age)))
        if config.expose_headers:
            extra.append(
                (b"Access-Control-Expose-Headers", ", ".join(config.expose_headers).encode())
            )
        self._response_extra = extra

    def on_request(self, ctx: Any) -> Response | None:
        req = ctx.request
        origin = req.header("origin")
        if origin is None:
            return None
        if req.method == "OPTIONS":
            wanted = req.header("access-control-request-method")
            if wanted is not None:
                return self._preflight(ctx, origin, wanted.strip())
        if self.rules.allows(origin):
            ctx.vars["cors_origin"] = origin
        return None

    def _preflight(self, ctx: Any, origin: str, method: str) -> Response:
        if not self.rules.allows(origin):
            return forbidden(ctx, "origin not allowed", "cors_origin_forbidden")
        if method.upper() not in self.methods:
            return forbidden(ctx, f"method {method} not allowed by CORS", "cors_method_forbidden")
        asked = ctx.request.header("access-control-request-headers") or ""
        names = [h.strip() for h in asked.split(",") if h.strip()]
        if self.allowed_headers is not None:
            refused = [h for h in names if h.lower() not in self.allowed_headers]
            if refused:
                return forbidden(
                    ctx, f"header {refused[0]} not allowed by CORS", "cors_header_forbidden"
                )
            allow_headers = self._headers_value
        else:
            allow_headers = ", ".join(h for h in names if is_token(h)).encode()
        headers = [
            (b"Access-Control-Allow-Origin", origin.encode("latin-1")),
            (b"Access-Control-Allow-Methods", self._methods_value),
            (b"Vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            *self._preflight_extra,
        ]
        if allow_headers:
            headers.append((b"Access-Control-Allow-Headers", allow_headers))
        return Response(204, b"", headers)

    def on_response(self, ctx: Any, head: Any) -> None:
        headers = vary_on_origin(without_cors_headers(head.headers))
        origin = ctx.vars.get("cors_origin")  # set by on_request for an allowed origin only
        if origin is not None:
            headers.append((b"Access-Control-Allow-Origin", origin.encode("latin-1")))
            headers.extend(self._response_extra)
        head.headers = headers

    def __repr__(self) -> str:
        return f"<CorsPlugin origins={self.cfg.origins}>"
