"""Answer a route's requests at the gateway, never upstream (`request_termination`, Kong's).

For maintenance windows, retired endpoints, stubs, and for debugging on live traffic: with a
`trigger`, only the requests that carry a header or a query parameter of that name are
answered (the others pass through untouched), and `echo: true` answers with what the gateway
received.

- No `message`, `body` nor `echo`: the gateway's JSON error, `{"error", "message",
  "request_id"}`, its code and message from the status's reason phrase (503:
  `service_unavailable`, "Service Unavailable"); `message` replaces the message.
- `body`: exactly that body, with `content_type`.
- `echo`: a JSON description of the request as the plugin saw it (method, host, path, query,
  header fields, client address, request id, route, consumer), credentials redacted: the
  values of Authorization, Cookie, API-key and token headers (apigate.redaction), of the
  header names and query parameters the file's `key_auth` and `jwt` read, and of credential
  query parameters. The request body is neither read nor shown.

Runs after authentication, `acl` and `rate_limit` (see `priority`), so a terminated route
still asks for credentials and counts requests, as Kong's does. The request's body never
goes upstream: as for any answer a plugin gives before the body (a 401, a 429), the
connection reads it and drops it, and goes on (see ClientConnection.may_discard).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from pydantic import field_validator, model_validator

from apigate.config.errors import located_error
from apigate.http.headers import FORWARDING, HOP_BY_HOP, IDENTITY, is_token
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import StrictPluginConfig, reject
from apigate.plugins.transform import query_value
from apigate.redaction import REDACTED, SECRET_QUERY_PARAMS, is_credential_name, redact_query

DEFAULT_CONTENT_TYPE = "application/json; charset=utf-8"
# Statuses whose response has no content (RFC 9110 §15.3.5, §15.3.6, §15.4.5)
NO_CONTENT = frozenset({204, 205, 304})
# Request fields the connection consumes before any plugin runs (apigate.http.protocol): a
# trigger of one of these names could never be seen as a header.
_UNSEEN_HEADERS = frozenset(
    name.decode()
    for name in HOP_BY_HOP
    | FORWARDING
    | IDENTITY
    | {b"content-length", b"expect", b"x-request-id", b"http2-settings"}
)
_MEDIA_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


class RequestTerminationConfig(StrictPluginConfig):
    status_code: int = 503
    message: str | None = None
    body: str | None = None
    content_type: str = DEFAULT_CONTENT_TYPE
    echo: bool = False
    trigger: str | None = None

    @field_validator("status_code")
    @classmethod
    def _final_status(cls, value: int) -> int:
        if 100 <= value <= 199:
            raise ValueError(
                f"{value} is an interim (1xx) status, not a final answer: use 200 to 599"
            )
        if not 200 <= value <= 599:
            raise ValueError(f"invalid status {value}: use 200 to 599")
        return value

    @field_validator("content_type")
    @classmethod
    def _media_type(cls, value: str) -> str:
        media_type = value.partition(";")[0].strip()
        if not _MEDIA_TYPE.fullmatch(media_type) or not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"invalid content type {value!r}: use type/subtype, e.g. text/plain")
        return value

    @field_validator("trigger")
    @classmethod
    def _trigger_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not is_token(value):
            raise ValueError(f"invalid name {value!r}: a header field name (letters, digits, -)")
        if value.lower() in _UNSEEN_HEADERS:
            raise ValueError(
                f"{value!r} is a header the gateway consumes before plugins run: "
                "no request would ever show it"
            )
        return value

    @model_validator(mode="after")
    def _one_answer(self) -> RequestTerminationConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.message is not None and self.body is not None:
            problems.append((("body",), "give message or body, not both"))
        if self.echo and self.body is not None:
            problems.append((("echo",), "echo answers with the request: not with a body too"))
        if "content_type" in self.model_fields_set and self.body is None:
            problems.append((("content_type",), "content_type is the type of body: give body"))
        if self.status_code in NO_CONTENT:
            for key in ("message", "body", "echo"):
                if getattr(self, key) not in (None, False):
                    problems.append(((key,), f"a {self.status_code} response has no content"))
        if problems:
            raise located_error(type(self).__name__, problems)
        return self


def error_code(status: int) -> tuple[str, str]:
    """The error code and message of the default answer: from the reason phrase (503:
    `service_unavailable`, "Service Unavailable"); a status without one has its own."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "request_terminated", "request terminated"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_"), phrase


def credential_fields(config: Any) -> tuple[frozenset[str], frozenset[str]]:
    """The header names (lower-case) and query parameter names that the file's `key_auth`
    and `jwt` plugins, global or a route's, read credentials from. (Read from the raw
    settings, which those plugins validate themselves: a value of the wrong shape is skipped.)"""
    headers: set[str] = set()
    params: set[str] = set()
    tables: list[Mapping[str, Any]] = [config.plugins, *(r.plugins for r in config.routes)]
    for table in tables:
        for name, raw in table.items():
            settings = raw if isinstance(raw, Mapping) else {}
            if name == "key_auth":
                headers.update(_strings(settings.get("header_names", ["apikey"])))
            elif name == "jwt":
                headers.update(_strings([settings.get("header", "authorization")]))
            if name in ("key_auth", "jwt"):
                params.update(_strings([settings.get("query_param")]))
    return frozenset(h.lower() for h in headers), frozenset(p.lower() for p in params)


def _strings(values: Any) -> Iterable[str]:
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else ()


class RequestTerminationPlugin(Plugin):
    name = "request_termination"
    # After authentication (jwt 1450, key_auth 1250, basic_auth 1100), acl (950) and
    # rate_limit (910), as Kong runs request-termination after them (its priority 2): a
    # terminated route still demands credentials and counts requests, and what those plugins
    # add to an answer (rate-limit headers, CORS) decorates this one. Before
    # request_transform (801) and cache (800): a closed route serves no cached response, and
    # an echo shows the request as the client sent it, not as it would go upstream.
    priority = 900
    Config = RequestTerminationConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, RequestTerminationConfig)
        self.cfg = config
        self.status = config.status_code
        code, message = error_code(config.status_code)
        self._code = code
        self._message = config.message if config.message is not None else message
        self._body = config.body.encode() if config.body is not None else None
        self._content_type = config.content_type.encode("ascii")
        trigger = config.trigger
        self._trigger = trigger.lower() if trigger is not None else None
        self._trigger_param = trigger or ""
        # (read from the whole file once per snapshot, for the echo only)
        headers, params = credential_fields(env.config) if config.echo else ((), ())
        self._secret_headers = frozenset(headers)
        self._secret_params = SECRET_QUERY_PARAMS | frozenset(params)

    def on_request(self, ctx: Any) -> Response | None:
        if self._trigger is not None and not self._triggered(ctx.request):
            return None
        status = self.status
        if status in NO_CONTENT:
            return Response(status, b"", [], None)
        if self._body is not None:
            return Response(status, self._body, [], self._content_type)
        if self.cfg.echo:
            return Response(status, self._echo(ctx))
        return reject(ctx, status, self._code, self._message)

    def _triggered(self, req: Any) -> bool:
        assert self._trigger is not None
        if req.header(self._trigger) is not None:
            return True
        # (a parameter given without a value, `?X-Debug`, is there: its value is "")
        return bool(req.query) and query_value(req.query, self._trigger_param) is not None

    def _echo(self, ctx: Any) -> bytes:
        req = ctx.request
        secret = self._secret_headers
        headers = []
        for raw_name, raw_value in req.headers:
            name = raw_name.decode("latin-1")
            hidden = is_credential_name(name) or name.lower() in secret
            headers.append([name, REDACTED if hidden else raw_value.decode("latin-1")])
        doc: dict[str, Any] = {}
        if self.cfg.message is not None:
            doc["message"] = self.cfg.message
        route = getattr(ctx, "route", None)
        consumer = getattr(ctx, "consumer", None)
        doc["route"] = route.name if route is not None else None
        doc["consumer"] = consumer.name if consumer is not None else None
        doc["request"] = {
            "method": req.method,
            "host": req.host,
            "path": req.path,
            "query": redact_query(req.query.decode("latin-1"), self._secret_params),
            "headers": headers,
            "client_ip": req.client_ip,
            "request_id": req.request_id,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def __repr__(self) -> str:
        trigger = f" trigger={self.cfg.trigger}" if self.cfg.trigger else ""
        return f"<RequestTerminationPlugin {self.status}{trigger}>"
