"""Request and response transformation (`request_transform`, `response_transform`).

    plugins:
      request_transform:
        headers: {add: {X-Team: core}, set: {X-User: "{consumer}"}, remove: [Cookie],
                  rename: {X-Old: X-New}}
        path: "/v2/users/{param.user_id}"        # or "/v2{path}": {path} is the routed path
        query: {add: {source: gateway}, set: {v: "2"}, remove: [debug]}
        json: {add: {meta.via: apigate}, set: {}, remove: [password], rename: {user: account}}
        max_body_bytes: 1MiB
      response_transform:
        headers: {remove: [Server], set: {X-Request: "{request_id}"}}
        json: {remove: [internal.debug], rename: {id: user_id}}

Priorities: `request_transform` 801, before the cache (800), so that the cache keys the request
as it goes upstream (Kong's request-transformer runs before its proxy-cache too); a cache hit
costs its edits then. `response_transform` 700, after the cache's `on_response`: the cache
stores the head as it left it (read when the body ends) and a hit does not run it again.

Order of operations: remove, rename, set, add ("add" only when absent, "set" always).
Header renames overwrite a header already present under the new name.

Templates: `{request_id}`, `{consumer}`, `{method}`, `{path}` (the path going upstream),
`{host}`, `{client_ip}`, `{param.NAME}` (route path parameter; a bare `{NAME}` means the same),
`{header.NAME}`, `{query.NAME}`, `{claim.NAME}` (verified JWT claims), `{var.NAME}`
(`ctx.vars`). A missing value renders as an empty string. In `path`, values are
percent-encoded to stay inside one segment, and one that would leave a segment empty
(`/tenants//orders`) or make a dot segment answers 400; in JSON a template always yields a
string.

JSON edits use dotted paths (`a.b.c`; a numeric part indexes a list) and apply only when the
body is JSON (`application/json` or `+json`, not content-encoded) and at most `max_body_bytes`
long; any other body passes through untouched, and an over-cap body is logged (at most once a
minute per route). The exchange recomputes Content-Length.

## The hook contract (exchange side)

- `buffer_request_body` / `buffer_response_body` are *instance* attributes (True only when
  `json` edits are configured): read them with `getattr(plugin, "buffer_response_body", False)`
  on the instance. `max_body_bytes` is an instance attribute too.
- `wants_request_body(ctx) -> bool` / `wants_response_body(ctx, head) -> bool` (optional for
  the exchange, but cheap): False means "stream this one, I would not touch it" (not JSON,
  content-encoded, HEAD, 204/304), so the exchange need not buffer at all.
- `transform_request_body(ctx, body) -> bytes` before the body goes upstream, and
  `transform_response_body(ctx, head, body) -> bytes` after `on_response`, each called once
  with the whole body when it is at most `max_body_bytes`; otherwise the exchange streams the
  body untouched and calls `body_too_large(ctx)`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote_plus

from pydantic import ConfigDict, Field, field_validator

from apigate.config.units import PositiveSize
from apigate.http.errors import GatewayError
from apigate.http.headers import FORWARDING, HOP_BY_HOP, is_token
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv
from apigate.routing.normalize import normalize_path
from apigate.routing.rewrite import encode_param, has_bad_segment

__all__ = [
    "HeaderOps",
    "JsonEdits",
    "JsonOps",
    "QueryOps",
    "RequestTransformConfig",
    "RequestTransformPlugin",
    "ResponseTransformConfig",
    "ResponseTransformPlugin",
    "ValueTemplate",
    "apply_json_edits",
    "edit_query",
    "is_json_type",
    "query_value",
    "render_path",
]

log = logging.getLogger("apigate.plugins.transform")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z0-9_\-]+))?\}")
_SOURCES = frozenset({"param", "query", "claim", "header", "var"})
_BUILTINS = frozenset({"request_id", "consumer", "method", "path", "host", "client_ip"})
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR, LF, NUL...: header injection
_FRAMING = frozenset({b"host", b"content-length", b"x-request-id"}) | HOP_BY_HOP
_LOG_EVERY = 60.0


# ------------------------------------------------------------------------------ templates


def _scalar_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def query_value(query: bytes, name: str) -> str | None:
    """The first value of `name` in a raw query string, decoded."""
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if unquote_plus(key.decode("latin-1")) == name:
            return unquote_plus(value.decode("latin-1"))
    return None


class ValueTemplate:
    """A string with `{...}` placeholders, parsed once; `values(ctx)` resolves them."""

    __slots__ = ("fields", "literals", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.literals: list[str] = []
        self.fields: list[tuple[str, str]] = []  # (source, name); builtins have name ""
        position = 0
        for match in _PLACEHOLDER.finditer(text):
            head, tail = match[1], match[2]
            if tail is not None:
                if head not in _SOURCES:
                    sources = ", ".join(sorted(_SOURCES))
                    raise ValueError(f"unknown placeholder {match[0]} (use {sources}.NAME)")
                field = (head, tail)
            elif head in _BUILTINS:
                field = (head, "")
            else:
                field = ("param", head)
            self.literals.append(text[position : match.start()])
            self.fields.append(field)
            position = match.end()
        self.literals.append(text[position:])

    @property
    def constant(self) -> bool:
        return not self.fields

    @property
    def names(self) -> list[str]:
        return [f"{s}.{n}" if n else s for s, n in self.fields]

    def values(self, ctx: Any) -> list[str | None]:
        return [_resolve(ctx, source, name) for source, name in self.fields]

    def render(self, ctx: Any, encode: Any = None) -> str:
        """Missing values render as ""; `encode(str) -> str` is applied to each value."""
        if not self.fields:
            return self.text
        parts = [self.literals[0]]
        for value, literal in zip(self.values(ctx), self.literals[1:], strict=True):
            text = value or ""
            parts.append(encode(text) if encode is not None and text else text)
            parts.append(literal)
        return "".join(parts)

    def __repr__(self) -> str:
        return f"<ValueTemplate {self.text!r}>"


def _resolve(ctx: Any, source: str, name: str) -> str | None:
    req = ctx.request
    value: Any
    if source == "param":
        value = ctx.params.get(name)
    elif source == "header":
        value = req.header(name.lower())
    elif source == "query":
        value = query_value(req.query, name) if req.query else None
    elif source == "claim":
        value = (ctx.vars.get("jwt_claims") or {}).get(name)
    elif source == "var":
        value = ctx.vars.get(name)
    elif source == "consumer":
        value = getattr(ctx.consumer, "name", None)
    elif source == "path":
        value = ctx.upstream_path
    else:  # request_id, method, host, client_ip
        value = getattr(req, source, None)
    return _scalar_text(value)


def _template(value: str) -> ValueTemplate:
    try:
        return ValueTemplate(value)
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None


# ------------------------------------------------------------------------------ config


def _header_name(value: str, forbidden: frozenset[bytes]) -> str:
    if not is_token(value):
        raise ValueError(f"invalid header name {value!r}")
    if value.lower().encode() in forbidden:
        raise ValueError(f"header {value!r} is managed by the gateway and cannot be transformed")
    return value


def _header_value(value: str) -> str:
    if _UNSAFE_VALUE.search(value):
        raise ValueError(f"header value {value!r} contains a control character")
    _template(value)
    return value


class HeaderOps(PluginConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)

    add: dict[str, str] = {}
    set: dict[str, str] = {}
    remove: list[str] = []
    rename: dict[str, str] = {}

    @field_validator("add", "set")
    @classmethod
    def _check_values(cls, value: dict[str, str]) -> dict[str, str]:
        return {_header_name(n, _FRAMING | FORWARDING): _header_value(v) for n, v in value.items()}

    @field_validator("remove")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        return [_header_name(n, _FRAMING | FORWARDING) for n in value]

    @field_validator("rename")
    @classmethod
    def _check_rename(cls, value: dict[str, str]) -> dict[str, str]:
        forbidden = _FRAMING | FORWARDING
        return {_header_name(a, forbidden): _header_name(b, forbidden) for a, b in value.items()}


class QueryOps(PluginConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)

    add: dict[str, str] = {}
    set: dict[str, str] = {}
    remove: list[str] = []

    @field_validator("add", "set")
    @classmethod
    def _check_values(cls, value: dict[str, str]) -> dict[str, str]:
        for item in value.values():
            _template(item)
        return value


def _json_path(path: str) -> str:
    if not path or any(not part for part in path.split(".")):
        raise ValueError(f"invalid JSON field path {path!r}: use dotted names like a.b.c")
    return path


class JsonOps(PluginConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)

    add: dict[str, Any] = {}
    set: dict[str, Any] = {}
    remove: list[str] = []
    rename: dict[str, str] = {}

    @field_validator("add", "set")
    @classmethod
    def _check_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        for path, item in value.items():
            _json_path(path)
            if isinstance(item, str):
                _template(item)
        return value

    @field_validator("remove")
    @classmethod
    def _check_remove(cls, value: list[str]) -> list[str]:
        return [_json_path(p) for p in value]

    @field_validator("rename")
    @classmethod
    def _check_rename(cls, value: dict[str, str]) -> dict[str, str]:
        return {_json_path(a): _json_path(b) for a, b in value.items()}


class _BodyConfig(PluginConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)

    headers: HeaderOps | None = None
    json_: JsonOps | None = Field(default=None, alias="json")
    max_body_bytes: PositiveSize = 1 << 20


class ResponseTransformConfig(_BodyConfig):
    pass


class RequestTransformConfig(_BodyConfig):
    path: str | None = None
    query: QueryOps | None = None

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        template = _template(value)
        sample = "x".join(template.literals)
        if not value.startswith("/") or re.search(r"[\s?#]", sample) or not sample.isascii():
            raise ValueError(f"invalid path template {value!r}: an ASCII path starting with '/'")
        if normalize_path(sample) != sample:
            raise ValueError(f"path template {value!r} is not a canonical path")
        return value


# ------------------------------------------------------------------------------ operations


class _HeaderEdits:
    """HeaderOps compiled: lower-cased byte names, templates parsed, constants pre-encoded."""

    __slots__ = ("add", "remove", "rename", "set")

    def __init__(self, ops: HeaderOps) -> None:
        self.remove = frozenset(n.lower().encode() for n in ops.remove)
        self.rename = [(a.lower().encode(), b.encode()) for a, b in ops.rename.items()]
        self.set = [(n.encode(), ValueTemplate(v)) for n, v in ops.set.items()]
        self.add = [(n.encode(), ValueTemplate(v)) for n, v in ops.add.items()]

    def apply(self, headers: list[tuple[bytes, bytes]], ctx: Any) -> list[tuple[bytes, bytes]]:
        if self.remove:
            headers = [h for h in headers if h[0].lower() not in self.remove]
        for old, new in self.rename:
            moved = [v for n, v in headers if n.lower() == old]
            if moved:
                lnew = new.lower()
                headers = [h for h in headers if h[0].lower() not in (old, lnew)]
                headers.extend((new, v) for v in moved)
        for name, template in self.set:
            lname = name.lower()
            headers = [h for h in headers if h[0].lower() != lname]
            headers.append((name, _header_bytes(template.render(ctx))))
        for name, template in self.add:
            lname = name.lower()
            if not any(h[0].lower() == lname for h in headers):
                headers.append((name, _header_bytes(template.render(ctx))))
        return headers


def render_path(template: ValueTemplate, ctx: Any) -> str:
    """A path template rendered: values percent-encoded to stay in their segment, except
    `{path}` (already canonical); raises GatewayError(400) when a value makes a dot segment,
    or an empty one (a missing or empty value between two slashes)."""
    parts = [template.literals[0]]
    for (source, _), value, literal in zip(
        template.fields, template.values(ctx), template.literals[1:], strict=True
    ):
        text = value or ""
        if source != "path":
            text = encode_param(text) if text else text
        else:  # the path keeps its own slashes: joined, not doubled
            if parts[-1].endswith("/") and text.startswith("/"):
                text = text[1:]  # "/v2/" + "/users" is "/v2/users", not "/v2//users"
            if text.endswith("/") and literal.startswith("/"):
                text = text[:-1]  # "/docs/" + "/index.html": "/docs/index.html"
        parts += (text, literal)
    path = "".join(parts)
    if has_bad_segment(path):
        raise GatewayError(
            400, "a value would make a dot segment or an empty one in the rewritten path"
        )
    return path


def _header_bytes(text: str) -> bytes:
    text = _UNSAFE_VALUE.sub(" ", text)  # a claim or var could carry CR/LF: never a new header
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def edit_query(
    query: bytes,
    *,
    remove: frozenset[str] = frozenset(),
    set_: Sequence[tuple[str, str]] = (),
    add: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Apply query edits to a raw query string; values are given decoded and encoded here."""
    pairs = query.split(b"&") if query else []
    drop = remove | {name for name, _ in set_}
    if drop:
        pairs = [p for p in pairs if _query_key(p) not in drop]
    present = {_query_key(p) for p in pairs} if add else set()
    for name, value in [*set_, *[(n, v) for n, v in add if n not in present]]:
        pairs.append(f"{quote(name, safe='')}={quote(value, safe='')}".encode("ascii"))
    return b"&".join(pairs)


def _query_key(pair: bytes) -> str:
    return unquote_plus(pair.partition(b"=")[0].decode("latin-1"))


def _split(path: str) -> list[str]:
    return path.split(".")


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _parent(doc: Any, parts: list[str], create: bool) -> Any:
    node = doc
    for part in parts[:-1]:
        child = _child(node, part)
        if child is None and create and isinstance(node, dict):
            child = node[part] = {}
        if not isinstance(child, dict | list):
            return None
        node = child
    return node


def _has(node: Any, key: str) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and key.isdigit() and int(key) < len(node)


def _pop(node: Any, key: str) -> tuple[bool, Any]:
    if not _has(node, key):
        return False, None
    if isinstance(node, dict):
        return True, node.pop(key)
    return True, node.pop(int(key))


def _put(node: Any, key: str, value: Any, only_if_absent: bool) -> None:
    if only_if_absent and _has(node, key):
        return
    if isinstance(node, dict):
        node[key] = value
    elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
        node[int(key)] = value


class JsonEdits:
    """JsonOps compiled: split paths, templates parsed."""

    __slots__ = ("add", "remove", "rename", "set")

    def __init__(self, ops: JsonOps) -> None:
        self.remove = [_split(p) for p in ops.remove]
        self.rename = [(_split(a), _split(b)) for a, b in ops.rename.items()]
        self.set = [(_split(p), _json_value(v)) for p, v in ops.set.items()]
        self.add = [(_split(p), _json_value(v)) for p, v in ops.add.items()]

    def apply(self, doc: Any, ctx: Any) -> Any:
        for parts in self.remove:
            _pop(_parent(doc, parts, False), parts[-1])
        for old, new in self.rename:
            found, value = _pop(_parent(doc, old, False), old[-1])
            if found:
                _put(_parent(doc, new, True), new[-1], value, only_if_absent=False)
        for parts, value in self.set:
            _put(_parent(doc, parts, True), parts[-1], _value(value, ctx), only_if_absent=False)
        for parts, value in self.add:
            parent = _parent(doc, parts, True)
            if not _has(parent, parts[-1]):
                _put(parent, parts[-1], _value(value, ctx), only_if_absent=False)
        return doc


def _json_value(value: Any) -> Any:
    return ValueTemplate(value) if isinstance(value, str) else value


def _value(value: Any, ctx: Any) -> Any:
    if isinstance(value, ValueTemplate):
        return value.render(ctx)
    if isinstance(value, dict | list):
        return copy.deepcopy(value)  # a later edit must never change the config's own value
    return value


def refuse_json_constant(name: str) -> Any:
    """json's `parse_constant`: NaN and Infinity are Python's extensions, not JSON."""
    raise ValueError(f"{name} is not JSON")


def apply_json_edits(body: bytes, edits: JsonEdits, ctx: Any) -> bytes | None:
    """The edited JSON body, or None when `body` is not JSON this can write back faithfully:
    not valid JSON (NaN and Infinity included), or a number too large for a float ("1e400"
    would come back as Infinity). Numbers are read as floats, as JavaScript reads them."""
    try:
        doc = json.loads(body, parse_constant=refuse_json_constant)
    except (ValueError, UnicodeDecodeError):
        return None
    doc = edits.apply(doc, ctx)
    try:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError:  # a float that overflowed to infinity
        return None


def is_json_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _identity_encoding(content_encoding: str | None) -> bool:
    return content_encoding is None or content_encoding.strip().lower() in ("", "identity")


class _Throttled:
    """Logs one warning per route per minute (a flood of large bodies is one line a minute)."""

    __slots__ = ("_last", "message")

    def __init__(self, message: str) -> None:
        self.message = message
        self._last: dict[str, float] = {}

    def __call__(self, ctx: Any, limit: int) -> None:
        route = ctx.route.name if ctx.route is not None else "-"
        now = time.monotonic()
        last = self._last.get(route)
        if last is not None and now - last < _LOG_EVERY:
            return
        self._last[route] = now
        log.warning(
            self.message, route, limit, extra={"event": "transform_skipped", "route": route}
        )


# ------------------------------------------------------------------------------ plugins


class _BodyTransform(Plugin):
    """What both directions share: header edits, JSON edits and their body-buffering flags."""

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, _BodyConfig)
        self.headers = _HeaderEdits(config.headers) if config.headers is not None else None
        self.json = JsonEdits(config.json_) if config.json_ is not None else None
        self.max_body_bytes: int = config.max_body_bytes
        self._too_large = _Throttled(
            f"{self.name}: body over max_body_bytes on route %s (limit %d): passed through"
        )
        self._not_json = _Throttled(
            f"{self.name}: body declared JSON is not valid JSON on route %s (limit %d): "
            "passed through"
        )

    def body_too_large(self, ctx: Any) -> None:
        self._too_large(ctx, self.max_body_bytes)

    def _edit_body(self, ctx: Any, body: bytes, edits: JsonEdits) -> bytes:
        if len(body) > self.max_body_bytes:  # the exchange should not have called us
            self.body_too_large(ctx)
            return body
        edited = apply_json_edits(body, edits, ctx)
        if edited is None:
            self._not_json(ctx, self.max_body_bytes)
            return body
        return edited


class RequestTransformPlugin(_BodyTransform):
    name = "request_transform"
    # Before the cache (800), as Kong's request-transformer (801) before its proxy-cache:
    # the cache keys the request as it goes upstream (RFC 9111 §2), not as the client sent
    # it (a tenant put in the path from a header is another resource). After auth and rate
    # limits, whose consumer and claims its templates read.
    priority = 801
    Config = RequestTransformConfig
    buffer_request_body: bool = False

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, RequestTransformConfig)
        self.buffer_request_body = self.json is not None
        self.path = ValueTemplate(config.path) if config.path is not None else None
        query = config.query
        self.query_remove = frozenset(query.remove) if query else frozenset()
        self.query_set = [(k, ValueTemplate(v)) for k, v in query.set.items()] if query else []
        self.query_add = [(k, ValueTemplate(v)) for k, v in query.add.items()] if query else []

    def on_request(self, ctx: Any) -> None:
        req = ctx.request
        if self.headers is not None:
            req.headers = self.headers.apply(req.headers, ctx)
        if self.path is not None:
            ctx.upstream_path = render_path(self.path, ctx)
        if self.query_remove or self.query_set or self.query_add:
            req.query = edit_query(
                req.query,
                remove=self.query_remove,
                set_=[(k, t.render(ctx)) for k, t in self.query_set],
                add=[(k, t.render(ctx)) for k, t in self.query_add],
            )

    def wants_request_body(self, ctx: Any) -> bool:
        req = ctx.request
        return (
            self.json is not None
            and req.has_body
            and is_json_type(req.header("content-type"))
            and _identity_encoding(req.header("content-encoding"))
        )

    def transform_request_body(self, ctx: Any, body: bytes) -> bytes:
        if self.json is None or not self.wants_request_body(ctx):
            return body
        return self._edit_body(ctx, body, self.json)

    def __repr__(self) -> str:
        parts = [n for n in ("headers", "path", "json") if getattr(self, n) is not None]
        return f"<RequestTransformPlugin {' '.join(parts) or 'no-op'}>"


class ResponseTransformPlugin(_BodyTransform):
    name = "response_transform"
    priority = 700
    Config = ResponseTransformConfig
    buffer_response_body: bool = False

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.buffer_response_body = self.json is not None

    def on_response(self, ctx: Any, head: Any) -> None:
        if self.headers is not None:
            head.headers = self.headers.apply(head.headers, ctx)
        if ctx.request.method == "HEAD" and self._edits_body(head):
            # The GET's body would be edited: the upstream's length is not its length, and
            # the edited one is unknown without the body. RFC 9110 §8.6 lets a HEAD response
            # leave Content-Length out; a wrong one it does not allow.
            head.content_length = None

    def wants_response_body(self, ctx: Any, head: Any) -> bool:
        return ctx.request.method != "HEAD" and self._edits_body(head)

    def _edits_body(self, head: Any) -> bool:
        """Whether a body with this head gets the JSON edits."""
        return (
            self.json is not None
            and head.status not in (204, 304)
            and is_json_type(head.header("content-type"))
            and _identity_encoding(head.header("content-encoding"))
        )

    def transform_response_body(self, ctx: Any, head: Any, body: bytes) -> bytes:
        if self.json is None or not self.wants_response_body(ctx, head):
            return body
        return self._edit_body(ctx, body, self.json)

    def __repr__(self) -> str:
        parts = [n for n in ("headers", "json") if getattr(self, n) is not None]
        return f"<ResponseTransformPlugin {' '.join(parts) or 'no-op'}>"
