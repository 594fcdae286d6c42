"""The configuration file format as pydantic models (see CONFIG.md for the user's view).

Attribute names here are a contract: the runtime, the admin API and the plugins read them.
Every model forbids unknown keys and explains them ("unknown key; did you mean 'connect'?").
Cross-field rules live in model validators that point at the exact key they reject, so that an
error reads `routes[1].service: unknown service 'helo'; did you mean 'hello'? ...`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Annotated, Any, Final, Literal, NamedTuple, Self, cast
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from apigate.config.errors import Loc, explain_unknown_keys, located_error
from apigate.config.jws_keys import (
    HMAC_ALGORITHMS,
    load_public_key,
    parse_public_key,
    secret_problems,
    unsupported,
)
from apigate.config.units import (
    NonNegativeDuration,
    Percent,
    PositiveDuration,
    PositiveSize,
    Size,
)
from apigate.http.headers import is_token
from apigate.redaction import redact_url
from apigate.routing.regex_path import REGEX_MARK, compile_path_regex

__all__ = [
    "ActiveHealthConfig",
    "AdminListenerConfig",
    "AggregatePartConfig",
    "BasicAuthConfig",
    "CircuitBreakerConfig",
    "ConsumerConfig",
    "DiscoveryConfig",
    "GatewayConfig",
    "HealthConfig",
    "JwtCredentialConfig",
    "LimitsConfig",
    "ListenerConfig",
    "ListenersConfig",
    "MatchConfig",
    "PassiveHealthConfig",
    "PathPattern",
    "ProxyListenerConfig",
    "RetriesConfig",
    "RouteConfig",
    "RouteLimitsConfig",
    "ServiceConfig",
    "StrictModel",
    "TLSCertConfig",
    "TLSConfig",
    "TargetConfig",
    "TimeoutsConfig",
    "parse_address",
    "parse_path_pattern",
    "template_params",
]

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# characters of a name the admin API creates in a path (a service, route or instance: its
# OpenAPI says so); the file, and state saved before there was a bound, may hold longer ones
MAX_NAME = 128
# the key under which an aggregate's answer lists its failed parts (apigate.proxy.aggregate)
AGGREGATE_ERRORS = "_errors"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_TEMPLATE_PARAM = re.compile(r"\{([^{}]*)\}")
_SOURCED_PARAM = re.compile(r"(query|claim)\.[A-Za-z0-9_.:\-]+")
_FORBIDDEN_PATH_CHARS = re.compile(r"[\s?#\x00-\x1f\x7f]")


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, explained with a suggestion.

    Plugins derive their own `Config` from it to get the same behaviour.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="wrap")
    @classmethod
    def _explain_unknown_keys(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        try:
            return handler(data)
        except ValidationError as exc:
            # the keys as the file spells them: a field's alias (`json` for `json_`), else
            # its name, so that "did you mean" suggests something the user can write
            keys = [field.alias or name for name, field in cls.model_fields.items()]
            explained = explain_unknown_keys(exc, keys)
            if explained is None:
                raise
            raise explained from None


# --- small reusable field types -------------------------------------------------------------


def _non_empty(value: str) -> str:
    if not value.strip():
        raise _fail("empty", "must not be empty")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise _fail("invalid_name", f"invalid name {value!r}: use letters, digits, '_', '.', '-'")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _check_method(value: str) -> str:
    if not is_token(value):
        raise _fail("invalid_method", f"invalid HTTP method {value!r}")
    return value.upper()


Method = Annotated[str, AfterValidator(_check_method)]


def _check_header_name(value: str) -> str:
    if not is_token(value):
        raise _fail("invalid_header", f"invalid header name {value!r}")
    return value.lower()


def _check_hostname(value: str) -> str:
    value = value.lower()
    if _is_ip(value) or _HOSTNAME.fullmatch(value.removeprefix("*.")):
        return value
    raise _fail(
        "invalid_host", f"invalid host {value!r}: use e.g. api.example.com or *.example.com"
    )


def _check_route_host(value: str) -> str:
    """A route's `match.hosts` entry: a name, `*.suffix`, an IPv4 address, or an IPv6 address
    (`::1` or `[::1]`, kept as `[::1]`: the form it has in a Host header)."""
    value = value.lower()
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if ":" in inner:
        try:
            return f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            raise _fail(
                "invalid_host",
                f"invalid host {value!r}: a name, *.suffix or an IP address, without a port",
            ) from None
    return _check_hostname(value)


def _none_as_empty(value: Any) -> Any:
    """`plugins: {cors: }` in YAML gives None: treat it as an empty config."""
    if isinstance(value, dict):
        return {key: {} if item is None else item for key, item in value.items()}
    return value


PluginsConfig = Annotated[dict[str, dict[str, Any]], BeforeValidator(_none_as_empty)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- listeners ------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(address: str) -> tuple[str, int]:
    """("127.0.0.1", 8080) from "127.0.0.1:8080"; "[::1]:8080" -> ("::1", 8080).

    ":8080" gives host "" which asyncio's create_server reads as "every interface".
    """
    host, colon, port_text = address.rpartition(":")
    hint = "use host:port, e.g. 0.0.0.0:8080, [::1]:8080 or :8080"
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"invalid address {address!r}: {hint}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host or not _is_ip(host):
            raise ValueError(f"invalid address {address!r}: bad IPv6 address")
    elif ":" in host:
        raise ValueError(f"invalid address {address!r}: write an IPv6 address in brackets")
    elif host and not (_is_ip(host) or _HOSTNAME.fullmatch(host.lower())):
        raise ValueError(f"invalid address {address!r}: bad host")
    return host, int(port_text)


class ListenerConfig(StrictModel):
    """Shared by the proxy and admin listeners: an address and its parsed parts."""

    address: str

    @field_validator("address", mode="before")
    @classmethod
    def _a_port_alone(cls, value: Any) -> Any:
        # YAML reads `address: 8080` as a number, which pydantic would only call "not a string"
        if isinstance(value, int) and not isinstance(value, bool):
            raise _fail(
                "invalid_address",
                f"invalid address {value} (a number): use host:port in quotes, "
                f"e.g. ':{value}' or '0.0.0.0:{value}'",
            )
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        try:
            parse_address(value)
        except ValueError as exc:
            raise _fail("invalid_address", str(exc)) from None
        return value

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


class TLSCertConfig(StrictModel):
    """An extra certificate served by SNI for `hosts` (None: the names in the certificate)."""

    certificate: NonEmptyStr
    key: NonEmptyStr
    hosts: list[Annotated[str, AfterValidator(_check_hostname)]] | None = None


class TLSConfig(StrictModel):
    certificate: NonEmptyStr
    key: NonEmptyStr
    certificates: list[TLSCertConfig] = []
    min_version: Literal["1.2", "1.3"] = "1.2"


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _fail("invalid_cidr", f"invalid network {value!r}: use e.g. 10.0.0.0/8") from None
    return value


class ProxyListenerConfig(ListenerConfig):
    address: str = "0.0.0.0:8080"
    tls: TLSConfig | None = None
    # Peers (CIDRs) whose X-Forwarded-* headers are extended instead of overwritten.
    trusted_proxies: list[Annotated[str, AfterValidator(_check_cidr)]] = []


class AdminListenerConfig(ListenerConfig):
    address: str = "127.0.0.1:8001"
    token: str = ""

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Self:
        if not self.token and not self.is_loopback:
            problem = "required when the admin address is not loopback"
            raise located_error(type(self).__name__, [(("token",), problem)])
        return self


class ListenersConfig(StrictModel):
    proxy: ProxyListenerConfig = Field(default_factory=ProxyListenerConfig)
    # `admin: null` in the file disables the admin API.
    admin: AdminListenerConfig | None = Field(default_factory=AdminListenerConfig)


# --- limits ---------------------------------------------------------------------------------


class LimitsConfig(StrictModel):
    """Edge limits on what a client controls; a route may override the body ones."""

    max_header_bytes: PositiveSize = 32 * 1024
    max_headers: int = Field(default=100, ge=1)
    max_url_bytes: PositiveSize = 8 * 1024
    max_body_bytes: Size = Field(default=10 * 1024 * 1024, ge=0)
    header_timeout: PositiveDuration = 10.0
    body_timeout: PositiveDuration = 30.0
    idle_timeout: PositiveDuration = 75.0
    # a client that reads nothing of what it is sent for this long is cut (nginx's
    # send_timeout): else it holds its connection, the unsent response and the upstream's
    send_timeout: PositiveDuration = 60.0
    # a WebSocket (any upgrade) tunnel with no byte either way for this long is closed (Envoy's
    # stream idle timeout): a peer that vanished without a FIN held both sockets for ever
    tunnel_idle_timeout: PositiveDuration = 300.0
    max_connections: int = Field(default=10_000, ge=1)
    drain_timeout: NonNegativeDuration = 30.0  # graceful shutdown: wait this long for requests


class RouteLimitsConfig(StrictModel):
    max_body_bytes: Annotated[Size, Field(ge=0)] | None = None
    body_timeout: PositiveDuration | None = None


# --- services -------------------------------------------------------------------------------


class _TargetParts(NamedTuple):
    scheme: str
    host: str
    port: int
    base_path: str


_BLANK_OR_CONTROL: Final = re.compile(r"[\s\x00-\x1f\x7f]")


@lru_cache(maxsize=4096)
def _split_target(url: str) -> _TargetParts:
    """Validate a target URL and split it; raises ValueError with the reason."""
    # urlsplit drops blanks around a URL and tabs and line breaks inside it: such a URL would
    # route to one address but be shown and shared as another, and a blank left in its base
    # path would split the upstream request line
    bad = _BLANK_OR_CONTROL.search(url)
    if bad is not None:
        raise ValueError(
            f"invalid target URL {redact_url(url)!r}: blank or control character {bad[0]!r} "
            f"at position {bad.start()}"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid target URL {redact_url(url)!r}: use http://host:port")
    if "?" in url or "#" in url:
        raise ValueError(f"invalid target URL {redact_url(url)!r}: no query or fragment allowed")
    if "@" in parts.netloc:
        raise ValueError(f"invalid target URL {redact_url(url)!r}: no user info allowed")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid target URL {redact_url(url)!r}: bad port") from None
    host = parts.hostname or ""
    if not host or not (_is_ip(host) or _HOSTNAME.fullmatch(host)):
        raise ValueError(f"invalid target URL {redact_url(url)!r}: bad or missing host")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return _TargetParts(parts.scheme, host, port, parts.path.rstrip("/"))


class TargetConfig(StrictModel):
    """A static upstream instance; a plain string in the file means `{url: ..., weight: 1}`."""

    url: str
    weight: int = Field(default=1, ge=0, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            _split_target(value)
        except ValueError as exc:
            raise _fail("invalid_url", str(exc)) from None
        return value

    @property
    def scheme(self) -> str:
        return _split_target(self.url).scheme

    @property
    def host(self) -> str:
        return _split_target(self.url).host

    @property
    def port(self) -> int:
        return _split_target(self.url).port

    @property
    def base_path(self) -> str:
        """ "" or "/prefix" (no trailing slash) to put before the request path."""
        return _split_target(self.url).base_path


class TimeoutsConfig(StrictModel):
    connect: PositiveDuration = 2.0
    response: PositiveDuration = 30.0
    idle: PositiveDuration = 60.0  # how long an idle pooled upstream connection is kept


_STATUS_CLASS = re.compile(r"([1-5])xx")
_STATUS_RANGE = re.compile(r"(\d{3})-(\d{3})")


def _normalize_status(value: Any) -> str:
    """200 -> "200"; "2xx", "200", "200-299" kept as canonical strings."""
    text = str(value).strip().lower() if not isinstance(value, bool) else ""
    if text.isdigit() and 100 <= int(text) <= 599:
        return str(int(text))
    if _STATUS_CLASS.fullmatch(text):
        return text
    match = _STATUS_RANGE.fullmatch(text)
    if match and 100 <= int(match[1]) <= int(match[2]) <= 599:
        return text
    raise _fail("invalid_status", f"invalid status {value!r}: use e.g. 200, 2xx or 200-299")


class ActiveHealthConfig(StrictModel):
    path: str = "/health"
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 1.0
    healthy_after: int = Field(default=2, ge=1)
    unhealthy_after: int = Field(default=3, ge=1)
    # A healthy answer: codes (200), classes ("2xx") or ranges ("200-299").
    statuses: list[Annotated[str, BeforeValidator(_normalize_status)]] = Field(
        default_factory=lambda: ["2xx", "3xx"], min_length=1
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or _FORBIDDEN_PATH_CHARS.search(value.split("?")[0]):
            raise _fail("invalid_path", f"invalid health check path {value!r}: use e.g. /health")
        return value

    def is_healthy_status(self, code: int) -> bool:
        for status in self.statuses:
            if status.endswith("xx"):
                if code // 100 == int(status[0]):
                    return True
            elif "-" in status:
                low, high = status.split("-")
                if int(low) <= code <= int(high):
                    return True
            elif code == int(status):
                return True
        return False


class PassiveHealthConfig(StrictModel):
    failures: int = Field(default=5, ge=1)
    eject_for: PositiveDuration = 30.0
    # At most this share of a service's instances (rounded down) may be out by passive
    # ejection at once, Envoy's outlier detection `max_ejection_percent`: at 50% a lone
    # instance is never ejected for a few failing endpoints. 100% may eject them all.
    max_ejection_percent: Percent = 0.5


class HealthConfig(StrictModel):
    active: ActiveHealthConfig | None = None
    passive: PassiveHealthConfig | None = Field(default_factory=PassiveHealthConfig)


class CircuitBreakerConfig(StrictModel):
    failure_rate: Percent = 0.5
    min_requests: int = Field(default=20, ge=1)
    window: PositiveDuration = 10.0
    open_for: PositiveDuration = 30.0
    consecutive_failures: int | None = Field(default=None, ge=1)
    half_open_requests: int = Field(default=3, ge=1)


RETRY_CONDITIONS = ("connect_error", "reset", "timeout")


def _normalize_retry_condition(value: Any) -> str | int:
    if isinstance(value, str) and value in RETRY_CONDITIONS:
        return value
    if isinstance(value, int | str) and not isinstance(value, bool) and str(value).isdigit():
        code = int(value)
        if 500 <= code <= 599:
            return code
    allowed = ", ".join(RETRY_CONDITIONS)
    raise _fail(
        "invalid_retry_on", f"invalid retry condition {value!r}: use {allowed} or 5xx codes"
    )


class RetriesConfig(StrictModel):
    attempts: int = Field(default=1, ge=0)  # extra tries after the first; 0 disables retries
    on: list[Annotated[str | int, BeforeValidator(_normalize_retry_condition)]] = Field(
        default_factory=lambda: list[str | int](["connect_error"])
    )
    budget: Percent = 0.2
    backoff: NonNegativeDuration = 0.025
    non_idempotent: bool = False
    per_try_timeout: PositiveDuration | None = None

    @property
    def statuses(self) -> frozenset[int]:
        """Upstream status codes that are retried."""
        return frozenset(item for item in self.on if isinstance(item, int))

    @property
    def conditions(self) -> frozenset[str]:
        """Transport failures that are retried: "connect_error", "reset", "timeout"."""
        return frozenset(item for item in self.on if isinstance(item, str))


class DiscoveryConfig(StrictModel):
    dns: Annotated[str, AfterValidator(_check_hostname)]
    port: int = Field(ge=1, le=65535)
    srv: bool = False
    min_ttl: NonNegativeDuration = 1.0
    max_ttl: PositiveDuration = 300.0

    @model_validator(mode="after")
    def _ttl_order(self) -> Self:
        if self.min_ttl > self.max_ttl:
            raise located_error(type(self).__name__, [(("min_ttl",), "must not exceed max_ttl")])
        return self


HashOnKind = Literal["header", "cookie", "claim", "ip", "path"]
_HASH_ON = re.compile(r"(ip|path)|(header|cookie|claim):(.+)")


class ServiceConfig(StrictModel):
    targets: list[TargetConfig] = []
    discovery: DiscoveryConfig | None = None
    balancer: Literal["round_robin", "least_connections", "random", "ewma", "consistent_hash"] = (
        "round_robin"
    )
    hash_on: str = "ip"  # header:NAME | cookie:NAME | ip | path | claim:NAME (consistent_hash)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    circuit_breaker: CircuitBreakerConfig | None = None
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    max_connections: int = Field(default=1024, ge=1)  # per instance
    max_pending: int = Field(default=0, ge=0)
    preserve_host: bool = False  # False: upstream Host is the target's host:port
    scheme: Literal["http", "https"] = "http"  # for registered and discovered instances

    @field_validator("hash_on")
    @classmethod
    def _check_hash_on(cls, value: str) -> str:
        match = _HASH_ON.fullmatch(value.strip())
        hint = "use header:NAME, cookie:NAME, claim:NAME, ip or path"
        if match is None:
            raise _fail("invalid_hash_on", f"invalid hash_on {value!r}: {hint}")
        if match[1]:
            return match[1]
        kind, name = match[2], match[3].strip()
        if kind in ("header", "cookie") and not is_token(name):
            raise _fail("invalid_hash_on", f"invalid hash_on {value!r}: bad {kind} name")
        return f"{kind}:{name.lower() if kind == 'header' else name}"

    @property
    def hash_on_kind(self) -> HashOnKind:
        return cast(HashOnKind, self.hash_on.partition(":")[0])

    @property
    def hash_on_name(self) -> str:
        """The header (lower-case), cookie or claim name; "" for ip and path."""
        return self.hash_on.partition(":")[2]


# --- consumers ------------------------------------------------------------------------------


class BasicAuthConfig(StrictModel):
    username: NonEmptyStr
    password: NonEmptyStr  # a password hash, never the password itself


def _unique_keys(keys: list[str]) -> list[str]:
    if len(set(keys)) != len(keys):
        raise _fail("duplicate", "the same API key appears twice")  # never echo a secret
    return keys


_KEY_SOURCES: Final = ("secret", "public_key", "public_key_file")


class JwtCredentialConfig(StrictModel):
    """A consumer's JWT credential (Kong's `jwt_secrets`): a token whose key claim (the jwt
    plugin's `key_claim_name`, `iss` by default) is `key` must be signed with `algorithm`, and
    only with it, by this credential's secret or public key; the request is then its
    consumer's. Checked here like the plugin's own key (apigate.config.jws_keys)."""

    key: NonEmptyStr
    algorithm: str = "HS256"  # Kong's default
    secret: str | None = None
    secret_is_base64: bool = False  # Kong's plugin setting, here where the secret is written
    public_key: str | None = None  # PEM text (Kong's rsa_public_key)
    public_key_file: str | None = None

    @field_validator("algorithm")
    @classmethod
    def _check_algorithm(cls, value: str) -> str:
        if (problem := unsupported(value)) is not None:
            raise _fail("invalid_algorithm", problem)
        return value

    @model_validator(mode="after")
    def _check_key(self) -> Self:
        sources = [name for name in _KEY_SOURCES if getattr(self, name) is not None]
        if len(sources) != 1:
            problem = "set exactly one of secret, public_key, public_key_file"
            raise located_error(type(self).__name__, [((), problem)])
        if self.secret_is_base64 and self.secret is None:
            problem = "only with a secret: it says how the secret is written"
            raise located_error(type(self).__name__, [(("secret_is_base64",), problem)])
        try:
            self.verifier()
        except ValueError as exc:
            raise located_error(type(self).__name__, [((sources[0],), str(exc))]) from None
        return self

    def verifier(self) -> Any:
        """What verifies this credential's tokens: the secret's bytes (HS*) or the public key
        object. Raises ValueError for a key `algorithm` cannot use (a public key for HS256, a
        secret for RS256: the pinning), a short secret or an unusable PEM."""
        alg = self.algorithm
        if alg in HMAC_ALGORITHMS:
            if self.secret is None:
                raise ValueError(f"{alg} needs a secret, not a public key")
            secret = self._secret_bytes()
            for _, problem in secret_problems(secret, [alg]):
                raise ValueError(problem)
            return secret
        if self.secret is not None:
            raise ValueError(f"{alg} needs a public key, not a secret")
        if self.public_key is not None:
            key, usable = parse_public_key(self.public_key.encode(), "this key")
        else:
            assert self.public_key_file is not None
            key, usable = load_public_key(self.public_key_file)
        if alg not in usable:
            raise ValueError(f"{alg} cannot be used with this key")
        return key

    def _secret_bytes(self) -> bytes:
        assert self.secret is not None
        if not self.secret_is_base64:
            return self.secret.encode()
        # as Kong decodes it: either alphabet (+/ or -_), padding optional
        text = self.secret.strip().replace("-", "+").replace("_", "/")
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64 (secret_is_base64 is set)") from None


class ConsumerConfig(StrictModel):
    name: NonEmptyStr
    api_keys: Annotated[list[NonEmptyStr], AfterValidator(_unique_keys)] = []
    groups: list[NonEmptyStr] = []
    basic_auth: BasicAuthConfig | None = None
    jwt_credentials: list[JwtCredentialConfig] = []
    custom_id: str | None = None
    # this consumer's own plugins, in place of the route's or global ones of the same names
    # for its requests (checked by the plugin classes when the snapshot is compiled)
    plugins: PluginsConfig = {}


# --- routes ---------------------------------------------------------------------------------


class PathPattern(NamedTuple):
    """A parsed `match.paths` entry: "=/health" is exact, "/users/{id}" captures `id`, and
    "~/users/(?<id>\\d+)$" is a regex (`path` keeps its "~") whose named groups it captures."""

    path: str
    exact: bool
    params: tuple[str, ...]


def parse_path_pattern(pattern: str) -> PathPattern:
    """Validate and parse a match path; raises ValueError with the reason."""
    if pattern.startswith(REGEX_MARK):
        return PathPattern(pattern, False, tuple(compile_path_regex(pattern).groupindex))
    exact = pattern.startswith("=")
    path = pattern[1:] if exact else pattern
    if not path.startswith("/"):
        raise ValueError(f"invalid path {pattern!r}: must start with '/'")
    if _FORBIDDEN_PATH_CHARS.search(path):
        raise ValueError(f"invalid path {pattern!r}: no '?', '#', spaces or control characters")
    if "//" in path:
        raise ValueError(f"invalid path {pattern!r}: empty segment '//'")
    params: list[str] = []
    for segment in path.split("/"):
        if "{" not in segment and "}" not in segment:
            continue
        name = segment[1:-1]
        if not (segment.startswith("{") and segment.endswith("}")):
            raise ValueError(f"invalid path {pattern!r}: '{{name}}' must be a whole segment")
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"invalid path {pattern!r}: bad parameter name {name!r}")
        if name in params:
            raise ValueError(f"invalid path {pattern!r}: parameter {name!r} appears twice")
        params.append(name)
    return PathPattern(path, exact, tuple(params))


def template_params(template: str, *, sources: bool = False) -> tuple[str, ...]:
    """Names used as "{name}" in a rewrite or aggregate path; raises ValueError if malformed.

    With `sources`, aggregate paths may also read `{query.NAME}` and `{claim.NAME}`.
    """
    if not template.startswith("/"):
        raise ValueError(f"invalid path template {template!r}: must start with '/'")
    names = tuple(_TEMPLATE_PARAM.findall(template))
    leftover = _TEMPLATE_PARAM.sub("", template)

    def ok(name: str) -> bool:
        if _IDENTIFIER.fullmatch(name):
            return True
        return sources and _SOURCED_PARAM.fullmatch(name) is not None

    if "{" in leftover or "}" in leftover or not all(ok(n) for n in names):
        hint = "{name}, {query.NAME} or {claim.NAME}" if sources else "{name}"
        raise ValueError(f"invalid path template {template!r}: use {hint} for parameters")
    return names


def _check_path_pattern(value: str) -> str:
    try:
        parse_path_pattern(value)
    except ValueError as exc:
        raise _fail("invalid_path", str(exc)) from None
    return value


def _check_template(value: str) -> str:
    try:
        template_params(value)
    except ValueError as exc:
        raise _fail("invalid_template", str(exc)) from None
    return value


PathTemplate = Annotated[str, AfterValidator(_check_template)]


def _check_aggregate_template(value: str) -> str:
    try:
        template_params(value, sources=True)
    except ValueError as exc:
        raise _fail("invalid_template", str(exc)) from None
    return value


AggregatePathTemplate = Annotated[str, AfterValidator(_check_aggregate_template)]


class MatchConfig(StrictModel):
    paths: list[Annotated[str, AfterValidator(_check_path_pattern)]] = Field(
        default_factory=lambda: ["/"], min_length=1
    )
    methods: list[Method] | None = Field(default=None, min_length=1)
    hosts: list[Annotated[str, AfterValidator(_check_route_host)]] | None = Field(
        default=None, min_length=1
    )
    headers: dict[str, str] | None = None
    # orders this route's "~" regex paths among the other regex paths: higher first (Kong's key)
    regex_priority: int = 0

    @model_validator(mode="after")
    def _check_regex_priority(self) -> Self:
        if self.regex_priority and not any(p.startswith(REGEX_MARK) for p in self.paths):
            message = "only orders regex paths ('~/...'), and this route has none"
            raise located_error(type(self).__name__, [(("regex_priority",), message)])
        return self

    @field_validator("headers")
    @classmethod
    def _lower_header_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        lowered = {_check_header_name(name): wanted for name, wanted in value.items()}
        if len(lowered) != len(value):
            raise _fail("duplicate", "header names differ only in case")
        return lowered

    def path_patterns(self) -> list[PathPattern]:
        return [parse_path_pattern(path) for path in self.paths]

    def missing_params(self, names: Iterable[str]) -> list[tuple[str, str]]:
        """(path, name) pairs where a path does not capture a name used by a template."""
        return [
            (pattern.path, name)
            for pattern in self.path_patterns()
            for name in names
            if name not in pattern.params
        ]


class AggregatePartConfig(StrictModel):
    service: str
    path: AggregatePathTemplate
    optional: bool = False
    timeout: PositiveDuration = 5.0
    method: Method = "GET"


class RouteConfig(StrictModel):
    name: Name
    match: MatchConfig = Field(default_factory=MatchConfig)
    service: str | None = None
    strip_prefix: bool = False
    rewrite: PathTemplate | None = None
    plugins: PluginsConfig = {}
    aggregate: dict[str, AggregatePartConfig] | None = Field(default=None, min_length=1)
    limits: RouteLimitsConfig | None = None
    preserve_host: bool | None = None

    @model_validator(mode="after")
    def _check_route(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        if self.service is None and self.aggregate is None:
            problems.append((("service",), "required: a route needs a service or an aggregate"))
        elif self.service is not None and self.aggregate is not None:
            message = "not allowed with service: a route has a service or an aggregate, not both"
            problems.append((("aggregate",), message))
        if self.rewrite is not None:
            problems += self._param_problems(("rewrite",), self.rewrite)
            if self.strip_prefix:  # one of them would be ignored: say so rather than pick
                message = "not allowed with rewrite: the template already replaces the prefix"
                problems.append((("strip_prefix",), message))
        for part_name, part in (self.aggregate or {}).items():
            if part_name == AGGREGATE_ERRORS:
                message = (
                    f"reserved: the merged answer lists failed parts under {AGGREGATE_ERRORS}; "
                    "name this part otherwise"
                )
                problems.append((("aggregate", part_name), message))
            problems += self._param_problems(
                ("aggregate", part_name, "path"), part.path, sources=True
            )
        if problems:
            raise located_error(type(self).__name__, problems)
        return self

    def _param_problems(
        self, loc: Loc, template: str, *, sources: bool = False
    ) -> list[tuple[Loc, str]]:
        path_params = [n for n in template_params(template, sources=sources) if "." not in n]
        return [
            (loc, f"parameter {{{name}}} is not captured by the match path {path!r}")
            for path, name in self.match.missing_params(tuple(path_params))
        ]


# --- the whole file -------------------------------------------------------------------------


def _check_store(value: str) -> str:
    hint = "use memory, sqlite:///path/state.db or redis://host:6379/0"
    if value == "memory":
        return value
    if value.startswith("sqlite://"):
        if value.removeprefix("sqlite://").startswith("/") and len(value) > len("sqlite:///"):
            return value
        raise _fail("invalid_store", f"invalid store {redact_url(value)!r}: {hint}")
    parts = urlsplit(value)
    database = parts.path.removeprefix("/")
    redis_ok = parts.scheme in ("redis", "rediss") and parts.hostname and _valid_port(value)
    if redis_ok and (database == "" or database.isdigit()):
        return value
    raise _fail("invalid_store", f"invalid store {redact_url(value)!r}: {hint}")


def _valid_port(url: str) -> bool:
    try:
        urlsplit(url).port  # noqa: B018 - the property raises ValueError on a bad port
    except ValueError:
        return False
    return True


def _none_service_as_default(value: Any) -> Any:
    """`services: {orders: }` (a service that waits for registrations) gives None in YAML."""
    if isinstance(value, dict):
        return {name: {} if item is None else item for name, item in value.items()}
    return value


class GatewayConfig(StrictModel):
    version: Literal[1] = 1
    listeners: ListenersConfig = Field(default_factory=ListenersConfig)
    store: Annotated[str, AfterValidator(_check_store)] = "memory"
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    services: Annotated[dict[str, ServiceConfig], BeforeValidator(_none_service_as_default)] = {}
    consumers: list[ConsumerConfig] = []
    routes: list[RouteConfig] = []
    plugins: PluginsConfig = {}  # global plugins, validated later by the plugin classes

    @model_validator(mode="after")
    def _check_references(self) -> Self:
        problems = [
            *self._service_name_problems(),
            *self._duplicate_problems("routes", [route.name for route in self.routes], "route"),
            *self._duplicate_problems("consumers", [c.name for c in self.consumers], "consumer"),
            *self._credential_problems(),
            *self._unknown_service_problems(),
        ]
        if problems:
            raise located_error(type(self).__name__, problems)
        return self

    def _service_name_problems(self) -> Iterable[tuple[Loc, str]]:
        for name in self.services:
            if not _NAME.fullmatch(name):
                problem = f"invalid service name {name!r}: use letters, digits, '_', '.', '-'"
                yield ("services", name), problem

    @staticmethod
    def _duplicate_problems(section: str, names: list[str], what: str) -> Iterable[tuple[Loc, str]]:
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if name in first:
                yield (section, index, "name"), f"duplicate {what} name {name!r}"
            else:
                first[name] = index

    def _credential_problems(self) -> Iterable[tuple[Loc, str]]:
        """An API key, or a JWT credential's key, names one consumer: held by two, the
        request would be whichever's was found first. (An API key is never shown; a JWT
        credential's key is the token's `iss`, no secret.)"""
        api_keys: dict[str, str] = {}
        jwt_keys: dict[str, str] = {}
        for index, consumer in enumerate(self.consumers):
            for key_index, key in enumerate(consumer.api_keys):
                owner = api_keys.setdefault(key, consumer.name)
                if owner != consumer.name:
                    message = f"API key already used by consumer {owner!r}"
                    yield ("consumers", index, "api_keys", key_index), message
            for cred_index, cred in enumerate(consumer.jwt_credentials):
                holder = jwt_keys.get(cred.key)
                if holder is not None:  # (also a consumer's own: one key, one credential)
                    message = f"JWT key {cred.key!r} already used by consumer {holder!r}"
                    yield ("consumers", index, "jwt_credentials", cred_index, "key"), message
                jwt_keys.setdefault(cred.key, consumer.name)

    def _unknown_service_problems(self) -> Iterable[tuple[Loc, str]]:
        for index, route in enumerate(self.routes):
            if route.service is not None and route.service not in self.services:
                yield ("routes", index, "service"), self._unknown_service(route.service)
            for part_name, part in (route.aggregate or {}).items():
                if part.service not in self.services:
                    loc = ("routes", index, "aggregate", part_name, "service")
                    yield loc, self._unknown_service(part.service)

    def _unknown_service(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.services), n=1)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        hint = "(declare it under services: — with no targets it waits for registrations)"
        return f"unknown service {name!r}{suggestion} {hint}"
