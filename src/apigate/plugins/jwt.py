"""JSON Web Token authentication (`jwt`).

Theory of operation, per request:

1. Find the token: `Authorization: Bearer <token>` (or the configured `header`), optionally a
   `cookie` and a `query_param`. Two *different* tokens in one request are a 401: an attacker
   must not get to choose which of them the gateway checks and which one the upstream reads.
   So are several Authorization lines, whatever their schemes (a singleton field: the line
   not checked would reach the upstream too), and a cookie or parameter name PHP reads as the
   configured one (`access.token`, `access[token` for `access_token`).
2. Look it up in the verified-token cache (token bytes -> claims, dropped at `exp`): a token seen
   before costs one dict lookup instead of a signature check (RS256 ~40 µs, ES256 ~90 µs).
   Steps 1, 2 and 4 for a cached token run compiled (apigate.plugins.jwt_cache); the rest here.
3. Otherwise verify it with PyJWT, with the algorithm pinned twice: it must be one of the
   configured `algorithms` and one the key's family supports, so `alg: none` never passes and an
   HS256 token "signed" with an RSA public key never meets an HMAC key. `kid` is only a lookup
   key in the JWKS (never a path, never fetched); `jku`, `x5u` and embedded `jwk` headers are
   ignored. Tokens over 8 KiB, or not three base64url segments, are rejected before parsing.
   `exp` and `nbf`, when present, must be JSON numbers (RFC 7519 NumericDate): PyJWT would
   accept a string of digits, which the cache could not honour.
   With `key_claim_name` (Kong's model) the keys are the consumers' `jwt_credentials`: the
   token's key claim picks one, and only its key and its one algorithm may verify the token
   (apigate.plugins.jwt_credentials); naming none is a 401.
4. Publish: `ctx.vars["jwt_claims"]`, `ctx.consumer` (the credential's consumer, or the one the
   `consumer_claim` names), and `forward_claims` as upstream headers (client-sent copies of
   those headers removed, with `_` and `-` alike in their names: WSGI, CGI and PHP read X_Role
   as X-Role).

Kong's options: `anonymous` (a consumer a request without a valid token is let through as;
apigate.plugins.identity has the rule for several auth plugins), `run_on_preflight: false` (a
CORS preflight goes through unauthenticated) and `maximum_expiration` (a token whose `exp` is
further ahead is a 401; `exp` must be in `required_claims`, as Kong requires it in
`claims_to_verify`). Without the first two the hook is the compiled cache lookup itself.

JWKS keys are fetched at start, refetched when a token names a `kid` that no key has and the set
has no kid-less key to try instead (at most once per `jwks_min_refresh`), and refreshed in the
background after `jwks_max_age`. Every failure is a 401 with
`WWW-Authenticate: Bearer realm="apigate", error="invalid_token"`, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Iterable
from typing import Any, Self, TypeGuard
from urllib.parse import urlsplit

import jwt
from pydantic import Field, field_validator, model_validator

from apigate.config.errors import located_error
from apigate.config.jws_keys import (
    HMAC_ALGORITHMS,
    RSA_ALGORITHMS,
    SUPPORTED,
    Problems,
    VerifyKey,
    key_algorithms,
    load_public_key,
    secret_problems,
    unsupported,
)
from apigate.config.schema import ConsumerConfig, NonEmptyStr, is_loopback_host
from apigate.config.units import NonNegativeDuration, PositiveDuration
from apigate.http.headers import is_token
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import (
    BEARER_CHALLENGE,
    BEARER_INVALID,
    AnonymousAccess,
    ConsumerIndex,
    Identity,
    StrictPluginConfig,
    refuse,
    with_kong_checks,
)
from apigate.plugins.jwt_cache import CONFLICT, REPEATED, TokenCache, Verified
from apigate.plugins.jwt_credentials import Credential, CredentialIndex, unverified_claims

log = logging.getLogger("apigate.plugins.jwt")

JWK_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
MAX_TOKEN_BYTES = 8192
MAX_CACHE_SECONDS = 300.0  # a token without `exp` (or a removed JWKS key) is re-checked this often
MAX_JWKS_BYTES = 1 << 20
MAX_EXPIRATION_LIMIT = 31_536_000.0  # a year: Kong's bound for maximum_expiration
# Three non-empty base64url segments. Python's base64 decoder skips characters outside the
# alphabet, so without this check a token with junk in its signature would still verify.
_COMPACT_JWS = re.compile(rb"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_KEY_SOURCES = ("secret", "public_key_file", "jwks_url", "key_claim_name")
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "authorization",
    }
)


# ============================================================================ configuration
class JwtConfig(StrictPluginConfig):
    secret: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    key_claim_name: str | None = None  # Kong's model: the consumers' jwt_credentials
    algorithms: list[str] | None = Field(default=None, min_length=1)
    issuer: str | list[str] | None = None
    audience: str | list[str] | None = None
    leeway: NonNegativeDuration = 0.0
    required_claims: list[str] = []
    header: str = "authorization"
    cookie: str | None = None
    query_param: str | None = None
    forward_claims: dict[str, str] = {}
    consumer_claim: str = "sub"
    cache_size: int = Field(default=10_000, ge=0)
    jwks_timeout: PositiveDuration = 5.0
    jwks_min_refresh: NonNegativeDuration = 30.0
    jwks_max_age: PositiveDuration = 3600.0
    anonymous: NonEmptyStr | None = None  # a consumer's name: who a request without one is
    run_on_preflight: bool = True  # false: a CORS preflight is let through unauthenticated
    maximum_expiration: NonNegativeDuration = 0.0  # 0: no limit (Kong's default)

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, value: list[str] | None) -> list[str] | None:
        for alg in value or ():
            if (problem := unsupported(alg)) is not None:
                raise ValueError(problem)
        return value

    @field_validator("key_claim_name")
    @classmethod
    def _check_key_claim(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty: name the claim that names the credential")
        return value

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        if not is_token(value):
            raise ValueError(f"invalid header name {value!r}")
        return value.lower()

    @field_validator("forward_claims")
    @classmethod
    def _check_forward(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value.values():
            if not is_token(header):
                raise ValueError(f"invalid header name {header!r}")
            if header.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {header!r} cannot carry a claim")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _check_jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid JWKS URL {value!r}: use https://host/path")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError("plain http is only allowed for a loopback JWKS URL; use https")
        return value

    @field_validator("maximum_expiration")
    @classmethod
    def _check_maximum_expiration(cls, value: float) -> float:
        if value > MAX_EXPIRATION_LIMIT:
            raise ValueError("at most a year (31536000 seconds, Kong's bound)")
        return value

    @model_validator(mode="after")
    def _maximum_expiration_needs_exp(self) -> Self:
        # As Kong: "to set maximum_expiration, you need to add 'exp' in claims_to_verify". A
        # token without `exp` never expires, which no limit on `exp` can allow; refusing the
        # config says so instead of requiring `exp` behind the operator's back.
        if self.maximum_expiration and "exp" not in self.required_claims:
            problem = "add 'exp' to required_claims to set maximum_expiration (as Kong requires)"
            raise located_error(type(self).__name__, [(("maximum_expiration",), problem)])
        return self

    @model_validator(mode="after")
    def _check_keys(self) -> Self:
        sources = [n for n in _KEY_SOURCES if getattr(self, n)]
        if len(sources) != 1:
            problem = (
                "set exactly one of secret, public_key_file, jwks_url (the plugin's key) "
                "or key_claim_name (the consumers' jwt_credentials; `iss` as in Kong)"
            )
            raise located_error(type(self).__name__, [((), problem)])
        if self.key_claim_name is not None:
            problems = self._credential_problems()
        elif self.algorithms is None:
            problems = [(("algorithms",), "required")]
        else:
            problems = self._key_problems(self.algorithms)
        if problems:
            raise located_error(type(self).__name__, problems)
        return self

    def _credential_problems(self) -> Problems:
        if "consumer_claim" in self.model_fields_set:
            return [(("consumer_claim",), "not with key_claim_name: the credential names it")]
        return []

    def _key_problems(self, algorithms: list[str]) -> Problems:
        problems: Problems = []
        if self.secret is not None:
            problems += secret_problems(self.secret.encode(), algorithms)
        elif self.public_key_file is not None:
            try:
                _, usable = load_public_key(self.public_key_file)
            except ValueError as exc:
                problems.append((("public_key_file",), str(exc)))
            else:
                for alg in algorithms:
                    if alg not in usable:
                        problem = f"{alg} cannot be used with the key in public_key_file"
                        problems.append((("algorithms",), problem))
        elif set(algorithms) & HMAC_ALGORITHMS:
            problems.append((("algorithms",), "HMAC algorithms cannot use a JWKS URL"))
        return problems


# ============================================================================ keys
def parse_jwks(doc: Any, allowed: frozenset[str]) -> list[VerifyKey]:
    """The usable signing keys of a JWKS document; others (oct, enc, unknown) are skipped."""
    keys: list[VerifyKey] = []
    entries = doc.get("keys") if isinstance(doc, dict) else None
    for jwk in entries if isinstance(entries, list) else ():
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kty, alg = jwk.get("kty"), jwk.get("alg")
        if kty == "RSA":
            family = RSA_ALGORITHMS
        elif kty == "EC":
            crv = jwk.get("crv")
            family = frozenset({JWK_CURVES.get(crv, "")}) if isinstance(crv, str) else frozenset()
        elif kty == "OKP":
            family = frozenset({"EdDSA"})
        else:
            continue  # symmetric ("oct") keys never come from a URL
        algs = family & allowed
        if isinstance(alg, str):
            algs &= {alg}
        if not algs:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=min(algs)).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        algs &= key_algorithms(key)
        if algs:
            kid = jwk.get("kid")
            keys.append(VerifyKey(key, frozenset(algs), kid if isinstance(kid, str) else None))
    return keys


class KeySet:
    """Keys to try for a token, only those that can verify its `alg`: with `use_kid` (a JWKS),
    a token's `kid` picks the keys published with that kid, or, when no key has it, the keys
    published without a kid (as Envoy's jwt_authn does: a kid-less JWK may sign any token).
    A token without `kid`, or a set without `use_kid`, tries every key."""

    __slots__ = ("by_kid", "keys", "use_kid", "without_kid")

    def __init__(self, keys: Iterable[VerifyKey], use_kid: bool) -> None:
        self.keys = list(keys)
        self.use_kid = use_kid
        self.by_kid: dict[str, list[VerifyKey]] = {}
        for key in self.keys:
            if key.kid is not None:
                self.by_kid.setdefault(key.kid, []).append(key)
        self.without_kid = [key for key in self.keys if key.kid is None]

    def candidates(self, kid: str | None, alg: str) -> list[VerifyKey]:
        """Empty when no key fits: for a JWKS, the kid may be a key published since the fetch."""
        if self.use_kid and kid is not None:
            pool = self.by_kid.get(kid) or self.without_kid
        else:
            pool = self.keys
        # The algorithm pinning: only keys whose family (and curve) can do `alg`, so an HS256
        # token never meets a public key and `alg: none` matches no key at all.
        return [key for key in pool if alg in key.algorithms]

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"<KeySet {len(self.keys)} keys, kids={sorted(self.by_kid)}>"


# ============================================================================ JWKS fetching
_ssl_context: ssl.SSLContext | None = None


async def http_get(url: str, timeout: float, max_bytes: int = MAX_JWKS_BYTES) -> bytes:
    """GET `url` and return the body of a 200 answer (HTTP/1.1, Connection: close)."""
    global _ssl_context
    parts = urlsplit(url)
    https = parts.scheme == "https"
    if https and _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=_ssl_context if https else None
        )
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: application/json\r\n"
                "User-Agent: apigate\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.split("\r\n")
            status = status_line.split(" ", 2)[1] if " " in status_line else ""
            if status != "200":
                raise OSError(f"HTTP status {status or '?'}")
            fields = dict(_header_field(line) for line in lines if ":" in line)
            if "chunked" in fields.get("transfer-encoding", "").lower():
                return await _read_chunked(reader, max_bytes)
            if "content-length" in fields:
                length = int(fields["content-length"])
                if length > max_bytes:
                    raise OSError("JWKS document too large")
                return await reader.readexactly(length)
            body = await reader.read(max_bytes + 1)
            while len(body) <= max_bytes:
                more = await reader.read(max_bytes + 1 - len(body))
                if not more:
                    return body
                body += more
            raise OSError("JWKS document too large")
        finally:
            writer.close()


def _header_field(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            return body
        if len(body) + size > max_bytes:
            raise OSError("JWKS document too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


class JwksSource:
    """The keys behind a JWKS URL; one fetch at a time, refetches rate-limited."""

    def __init__(
        self,
        url: str,
        algorithms: frozenset[str],
        *,
        timeout: float,
        min_refresh: float,
        max_age: float,
    ) -> None:
        self.url = url
        self.algorithms = algorithms
        self.timeout = timeout
        self.min_refresh = min_refresh
        self.max_age = max_age
        self.keys = KeySet((), use_kid=True)
        self.fetched_at = -1e18
        self.attempted_at = -1e18
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def may_refetch(self, now: float) -> bool:
        return now - self.attempted_at >= self.min_refresh

    def stale(self, now: float) -> bool:
        return now - self.fetched_at >= self.max_age

    async def refresh(self) -> None:
        """Fetch now, or join the fetch already running (a burst of unknown kids makes one)."""
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.get_running_loop().create_task(self._fetch())
        await asyncio.shield(task)

    def refresh_soon(self) -> None:
        """Background refresh of a stale key set; requests keep using the current keys."""
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._fetch())

    async def _fetch(self) -> None:
        self.attempted_at = time.monotonic()
        try:
            body = await http_get(self.url, self.timeout)
            keys = parse_jwks(json.loads(body), self.algorithms)
        except (
            OSError,
            ValueError,
            EOFError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ) as exc:
            self.failures += 1
            if self.failures == 1:  # once per failure streak, not per request
                log.warning(
                    "JWKS fetch failed: %s",
                    exc or type(exc).__name__,
                    extra={"event": "jwks_error", "url": self.url},
                )
            return
        if not keys:
            log.warning(
                "JWKS has no usable signing key", extra={"event": "jwks_empty", "url": self.url}
            )
        if self.failures or len(keys) != len(self.keys):
            log.info("JWKS loaded: %d keys", len(keys), extra={"event": "jwks_loaded"})
        self.failures = 0
        self.keys = KeySet(keys, use_kid=True)
        self.fetched_at = time.monotonic()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def __repr__(self) -> str:
        return f"<JwksSource {self.url} {len(self.keys)} keys>"


# ============================================================================ the plugin
def _describe(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not valid yet"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer not accepted"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience not accepted"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "invalid signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid token"


def is_json_number(value: object) -> TypeGuard[int | float]:
    """True for what JSON calls a number (int or float, never a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def non_numeric_date(claims: dict[str, Any]) -> str | None:
    """The first of `exp` and `nbf` present but not a NumericDate (RFC 7519 §2: a JSON number).

    PyJWT int()s these claims, so `"exp": "1795..."` or `"nbf": true` pass its checks; but the
    cache only sees a numeric exp, and would keep such a token for MAX_CACHE_SECONDS past its
    exp. Refusing them keeps the cache and PyJWT in agreement."""
    for name in ("exp", "nbf"):
        if name in claims and not is_json_number(claims[name]):
            return name
    return None


def header_value(value: Any) -> bytes:
    """A claim as a header value: strings as they are, the rest as JSON; never CR/LF."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    if not _PRINTABLE.fullmatch(text):
        text = json.dumps(text).replace("\x7f", "\\u007f")  # escapes controls and non-ASCII
    return text.encode("ascii")


class JwtPlugin(Plugin):
    name = "jwt"
    priority = 1450
    identifies_consumers = True
    Config = JwtConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, JwtConfig)
        self.cfg = config
        self.consumers = ConsumerIndex(env.config.consumers)
        # who a consumer a token's claim names is upstream, made once per consumer
        self._identities = {c.name: Identity(c) for c in env.config.consumers}
        self._anonymous = AnonymousAccess.of(config, env.config.consumers)
        self._max_expiration = config.maximum_expiration
        # with key_claim_name and no `algorithms`, each credential's own algorithm is the pin
        self.algorithms = frozenset(config.algorithms) if config.algorithms else SUPPORTED
        self.static_keys: KeySet | None = None
        self.jwks: JwksSource | None = None
        self.credentials: CredentialIndex | None = None
        if config.key_claim_name is not None:
            self.credentials = CredentialIndex(env.config.consumers, config.key_claim_name)
        elif config.secret is not None:
            key = VerifyKey(config.secret.encode(), self.algorithms)
            self.static_keys = KeySet([key], use_kid=False)
        elif config.public_key_file is not None:
            pub, usable = load_public_key(config.public_key_file)
            self.static_keys = KeySet([VerifyKey(pub, usable & self.algorithms)], use_kid=False)
        else:
            assert config.jwks_url is not None
            # One source per URL and settings for the whole process, kept across snapshots:
            # a reload or a registration does not refetch the keys.
            shared_key = (
                f"jwks:{config.jwks_url}|{','.join(sorted(self.algorithms))}|"
                f"{config.jwks_timeout}|{config.jwks_min_refresh}|{config.jwks_max_age}"
            )
            source = env.shared.get(shared_key)
            if not isinstance(source, JwksSource):
                source = env.shared[shared_key] = JwksSource(
                    config.jwks_url,
                    self.algorithms,
                    timeout=config.jwks_timeout,
                    min_refresh=config.jwks_min_refresh,
                    max_age=config.jwks_max_age,
                )
            self.jwks = source
        self._forward = [(claim, h.encode()) for claim, h in config.forward_claims.items()]
        self.tokens = TokenCache(
            header=config.header.encode(),
            bearer_only=config.header == "authorization",
            cookie=config.cookie.encode() if config.cookie else None,
            query=config.query_param.encode() if config.query_param else None,
            size=config.cache_size,
            forward_headers=frozenset(h for _, h in self._forward),
            miss=self._uncached,
        )
        self.cache = self.tokens.entries  # token bytes -> Verified
        # The hook is the compiled method itself: a cached token is answered with no
        # interpreted frame on the way (timed in place: ~0.9 µs interpreted, ~0.45 compiled).
        # With `anonymous` or `run_on_preflight: false`, Kong's checks before it
        # (interpreted): only routes that set them pay for them.
        self.on_request = with_kong_checks(
            self.tokens.on_request, self._anonymous, not config.run_on_preflight
        )
        self._decoder = jwt.PyJWT(
            options={
                "verify_aud": config.audience is not None,
                "require": list(config.required_claims),
                "enforce_minimum_key_length": True,  # a weak JWKS key is an error, not a warning
            }
        )
        self._audience = config.audience
        self._issuer = config.issuer
        self._leeway = config.leeway

    async def start(self) -> None:
        jwks, now = self.jwks, time.monotonic()
        if jwks is not None and jwks.stale(now) and jwks.may_refetch(now):
            await jwks.refresh()

    async def close(self) -> None:
        """Nothing to undo: the JWKS source is shared with the next snapshot's instance."""

    # ------------------------------------------------------------------ uncached tokens
    def _uncached(self, ctx: Any, token: bytes | None) -> Any:
        """What TokenCache.on_request (the hook) could not answer from the cache."""
        if token is None:
            return self._refuse(ctx, "missing bearer token", BEARER_CHALLENGE)
        if token is CONFLICT:
            return self._invalid(ctx, "several different tokens in one request")
        if token is REPEATED:
            return self._invalid(ctx, "several Authorization headers")
        self.cache.pop(token, None)  # past its exp or the 5-minute re-check: verify it again
        try:
            return self._verify(ctx, token)
        except Exception:  # a verifier bug must still be a 401, never a 500
            log.exception("JWT verification failed unexpectedly")
            return self._invalid(ctx, "invalid token")

    def _invalid(self, ctx: Any, message: str) -> Response | None:
        return self._refuse(ctx, message, BEARER_INVALID, code="invalid_token")

    def _refuse(
        self, ctx: Any, message: str, challenge: bytes, code: str = "unauthorized"
    ) -> Response | None:
        return refuse(ctx, self._anonymous, message, challenge, code)

    # ------------------------------------------------------------------ verification
    def _verify(self, ctx: Any, token: bytes) -> Any:
        if len(token) > MAX_TOKEN_BYTES:
            return self._invalid(ctx, "token too large")
        if not _COMPACT_JWS.fullmatch(token):
            return self._invalid(ctx, "malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return self._invalid(ctx, "malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return self._invalid(ctx, "algorithm not allowed")
        if self.credentials is not None:
            return self._verify_credential(ctx, token, header, alg, self.credentials)
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        jwks = self.jwks
        if jwks is None:
            assert self.static_keys is not None
            return self._finish(ctx, token, alg, self.static_keys.candidates(kid, alg))
        now = time.monotonic()
        keys = jwks.keys.candidates(kid, alg)
        if keys:
            if jwks.stale(now) and jwks.may_refetch(now):
                jwks.refresh_soon()
            # a kid no key has, tried on the keys published without one: when they do not
            # verify it either, it may be a key published since the fetch (a rotation)
            new_kid = kid is not None and kid not in jwks.keys.by_kid and jwks.may_refetch(now)
            return self._finish(ctx, token, alg, keys, refetch_kid=kid if new_kid else None)
        if jwks.may_refetch(now):
            return self._verify_after_refresh(ctx, token, alg, kid)
        return self._invalid(ctx, "unknown signing key")

    def _verify_credential(
        self,
        ctx: Any,
        token: bytes,
        header: dict[str, Any],
        alg: str,
        credentials: CredentialIndex,
    ) -> Any:
        """Kong's model: the token's key claim picks a consumer's credential, whose key and
        algorithm alone verify it (an HS256 token never meets an RS256 credential's key)."""
        claims = unverified_claims(token)
        if claims is None:
            return self._invalid(ctx, "malformed token")
        found = credentials.find(claims, header)
        if isinstance(found, str):
            return self._invalid(ctx, found)
        if alg != found.algorithm:
            return self._invalid(ctx, "algorithm not allowed")
        return self._finish(ctx, token, alg, [found.key], credential=found)

    async def _verify_after_refresh(
        self, ctx: Any, token: bytes, alg: str, kid: str | None
    ) -> Response | None:
        assert self.jwks is not None
        try:
            await self.jwks.refresh()
            keys = self.jwks.keys.candidates(kid, alg)
            if not keys:
                return self._invalid(ctx, "unknown signing key")
            outcome: Response | None = self._finish(ctx, token, alg, keys)
            return outcome
        except Exception:
            log.exception("JWT verification failed unexpectedly")
            return self._invalid(ctx, "invalid token")

    def _finish(
        self,
        ctx: Any,
        token: bytes,
        alg: str,
        keys: list[VerifyKey],
        refetch_kid: str | None = None,
        credential: Credential | None = None,
    ) -> Any:
        """None (accepted) or a 401; with `refetch_kid`, a bad signature fetches the JWKS
        again and tries the keys published with that kid (an awaitable then). `credential`:
        the consumer's credential the keys are, whose consumer the request then is."""
        if not keys:
            return self._invalid(ctx, "unknown signing key")
        try:
            claims = self._decode(token, alg, keys)
        except jwt.InvalidSignatureError as exc:
            if refetch_kid is not None:
                return self._verify_after_refresh(ctx, token, alg, refetch_kid)
            return self._invalid(ctx, _describe(exc))
        except jwt.PyJWTError as exc:
            return self._invalid(ctx, _describe(exc))
        not_a_date = non_numeric_date(claims)
        if not_a_date is not None:
            return self._invalid(ctx, f"token's {not_a_date!r} claim is not a number")
        limit = self._max_expiration
        if limit and claims["exp"] - time.time() > limit:  # (`exp` is required with a limit)
            return self._invalid(ctx, "token's exp exceeds the maximum allowed expiration")
        self.tokens.accept(ctx, self._remember(token, claims, credential))
        return None

    def _decode(self, token: bytes, alg: str, keys: list[VerifyKey]) -> dict[str, Any]:
        last: jwt.PyJWTError = jwt.InvalidSignatureError("no key")
        for key in keys:  # several only for a JWKS token without `kid`
            try:
                return self._decoder.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                )
            except jwt.InvalidSignatureError as exc:
                last = exc
        raise last

    def _remember(
        self, token: bytes, claims: dict[str, Any], credential: Credential | None
    ) -> Verified:
        now = time.time()
        expires = now + MAX_CACHE_SECONDS
        exp = claims.get("exp")
        if is_json_number(exp):  # always, once non_numeric_date() passed the claims
            # PyJWT compares int(exp) with the clock: a fraction of a second buys nothing
            expires = min(expires, int(exp) + self._leeway)
        forward = [(h, header_value(claims[c])) for c, h in self._forward if c in claims]
        consumer: ConsumerConfig | None
        identity: Identity | None
        if credential is not None:
            consumer, identity = credential.consumer, credential.identity
        else:
            consumer = self.consumers.find(claims.get(self.cfg.consumer_claim))
            identity = self._identities[consumer.name] if consumer is not None else None
        entry = Verified(claims, expires, consumer, forward, identity)
        self.tokens.add(token, entry)
        return entry

    def __repr__(self) -> str:
        source = self.jwks or self.static_keys or self.credentials
        return f"<JwtPlugin {sorted(self.algorithms)} {source!r} cached={len(self.cache)}>"
