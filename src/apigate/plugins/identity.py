"""What the security plugins share: consumer lookup, 401/403 answers, a strict config base,
the upstream's identity lines, Kong's `anonymous` consumer and `run_on_preflight`.

An authenticated request carries its identity in places that later plugins read:
`ctx.consumer` (the `ConsumerConfig` from the file's `consumers:`, when one matches),
`ctx.credential` (an `Identity`: the lines that name the consumer and credential upstream,
and whether it is an anonymous consumer) and, for JWT, `ctx.vars["jwt_claims"]` (the verified
claims). Rejections are JSON bodies `{"error", "message", "request_id"}` built only on the
error path; a 401 always carries a `WWW-Authenticate` challenge (RFC 9110 §11.6.1). Messages
never echo a credential.

Several auth plugins on one route are a logical AND unless they have `anonymous` (Kong's
rule, from its handlers): a plugin with `anonymous` does nothing when an earlier one has
already authenticated a real consumer (`authenticated`), and otherwise, when the request has
no valid credential for it (none, or a wrong one), lets it through as the anonymous consumer
(`AnonymousAccess`); a later plugin that finds a valid credential replaces that consumer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ConfigDict

from apigate.config.errors import located_error
from apigate.config.schema import ConsumerConfig, StrictModel
from apigate.http.errors import json_body
from apigate.plugins.base import PluginConfig, Response
from apigate.proxy.heads import consumer_lines, field_safe

BEARER_CHALLENGE = b'Bearer realm="apigate"'
BEARER_INVALID = b'Bearer realm="apigate", error="invalid_token"'
BASIC_CHALLENGE = b'Basic realm="apigate", charset="UTF-8"'
API_KEY_CHALLENGE = b'ApiKey realm="apigate"'
ANONYMOUS_LINE = b"X-Anonymous-Consumer: true\r\n"  # Kong's value, `true`


class StrictPluginConfig(PluginConfig, StrictModel):
    """A plugin config that explains unknown keys like the rest of the file does
    (`routes[0].plugins.jwt.secrt: unknown key; did you mean 'secret'?`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConsumerIndex:
    """The file's consumers by name and by `custom_id`, built once per plugin instance."""

    __slots__ = ("by_custom_id", "by_name")

    def __init__(self, consumers: Iterable[ConsumerConfig]) -> None:
        self.by_name: dict[str, ConsumerConfig] = {}
        self.by_custom_id: dict[str, ConsumerConfig] = {}
        for consumer in consumers:
            self.by_name[consumer.name] = consumer
            if consumer.custom_id:
                self.by_custom_id[consumer.custom_id] = consumer

    def find(self, ident: object) -> ConsumerConfig | None:
        """The consumer a claim value names (its name first, then its custom_id)."""
        if not isinstance(ident, str):
            return None
        return self.by_name.get(ident) or self.by_custom_id.get(ident)

    def __len__(self) -> int:
        return len(self.by_name)

    def __repr__(self) -> str:
        return f"<ConsumerIndex {len(self.by_name)} consumers>"


class Identity:
    """Who a request is, as an auth plugin found it: the consumer, the lines that say so in
    the upstream's request head (Kong's X-Consumer-ID, -Custom-ID, -Username, -Groups,
    X-Credential-Identifier, X-Anonymous-Consumer), and whether it is a plugin's `anonymous`
    consumer. Made once per consumer and credential when the plugin is built; a request only
    stores it (`ctx.credential`) and the exchange writes `lines` as they are."""

    __slots__ = ("anonymous", "consumer", "lines")

    def __init__(
        self, consumer: ConsumerConfig, credential_id: str | None = None, anonymous: bool = False
    ) -> None:
        self.consumer = consumer
        self.anonymous = anonymous
        lines = consumer_lines(consumer)
        # the credential's name, never its secret: an API key has no name here (Kong sends
        # its credential's id), so key_auth gives none
        if credential_id and field_safe(credential_id):
            lines += b"X-Credential-Identifier: " + credential_id.encode() + b"\r\n"
        if anonymous:
            lines += ANONYMOUS_LINE
        self.lines = lines

    def __repr__(self) -> str:
        kind = " anonymous" if self.anonymous else ""
        return f"<Identity{kind} {self.consumer.name!r}>"


def authenticate(ctx: Any, identity: Identity) -> None:
    """The request is `identity`'s (Kong's kong.client.authenticate)."""
    ctx.consumer = identity.consumer
    ctx.credential = identity


def authenticated(ctx: Any) -> bool:
    """Whether an earlier plugin has authenticated the request as a real consumer, or verified
    a token that names none (Kong's `kong.client.get_credential()`): then a plugin with
    `anonymous` has nothing to do. An anonymous consumer does not count."""
    credential = getattr(ctx, "credential", None)
    if credential is not None and credential.anonymous and credential.consumer is ctx.consumer:
        return False
    return is_authenticated(ctx)


class AnonymousAccess:
    """A plugin's `anonymous` setting: the consumer a request without a valid credential is
    let through as, instead of a 401. It must be one of `consumers:` (checked when the plugin
    is built, so a reload or an admin change that removes it is refused)."""

    __slots__ = ("identity",)

    def __init__(self, name: str, consumers: Iterable[ConsumerConfig], title: str) -> None:
        found = next((c for c in consumers if c.name == name), None)
        if found is None:
            problem = f"no consumer named {name!r} in consumers: the anonymous consumer must exist"
            raise located_error(title, [(("anonymous",), problem)])
        self.identity = Identity(found, anonymous=True)

    @classmethod
    def of(cls, config: Any, consumers: Iterable[ConsumerConfig]) -> AnonymousAccess | None:
        """A plugin config's `anonymous` setting (None when it has none)."""
        name: str | None = config.anonymous
        return None if name is None else cls(name, consumers, type(config).__name__)

    def admit(self, ctx: Any) -> None:
        authenticate(ctx, self.identity)

    def __repr__(self) -> str:
        return f"<AnonymousAccess {self.identity.consumer.name!r}>"


def with_kong_checks(
    check: Callable[[Any], Any], anonymous: AnonymousAccess | None, skip_preflight: bool
) -> Callable[[Any], Any]:
    """An auth plugin's request hook: its credential `check`, with Kong's checks before it
    when an option asks for them: `run_on_preflight: false` lets a CORS preflight through,
    and with `anonymous` a request an earlier auth plugin authenticated as a real consumer is
    left as it is (the plugins are a logical OR then). Without either, `check` itself: a route
    that sets neither pays nothing for them (for jwt, the compiled cache lookup stays the
    hook)."""
    if anonymous is None and not skip_preflight:
        return check

    def checked(ctx: Any) -> Any:
        if skip_preflight and is_preflight(ctx.request):
            return None
        if anonymous is not None and authenticated(ctx):
            return None
        return check(ctx)

    return checked


def refuse(
    ctx: Any,
    anonymous: AnonymousAccess | None,
    message: str,
    challenge: bytes,
    code: str = "unauthorized",
) -> Response | None:
    """A request without a valid credential: a 401, or with `anonymous` the anonymous
    consumer, for a missing credential and a wrong one alike, as Kong does (a later auth
    plugin may still find a real one)."""
    if anonymous is None:
        return unauthorized(ctx, message, challenge, code=code)
    anonymous.admit(ctx)
    return None


def is_preflight(req: Any) -> bool:
    """A CORS preflight (Fetch: OPTIONS with Origin and Access-Control-Request-Method), which a
    browser sends without credentials. Kong's `run_on_preflight: false` skips every OPTIONS;
    here only a real preflight is, so a plain OPTIONS to an API is still authenticated."""
    return (
        req.method == "OPTIONS"
        and req.header("origin") is not None
        and req.header("access-control-request-method") is not None
    )


def request_id(ctx: Any) -> str:
    return str(getattr(ctx.request, "request_id", "") or "")


def reject(
    ctx: Any,
    status: int,
    code: str,
    message: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> Response:
    """A JSON error response in the gateway's format (`apigate.http.errors.json_body`)."""
    return Response(status, json_body(code, message, request_id(ctx)), list(headers))


def unauthorized(ctx: Any, message: str, challenge: bytes, code: str = "unauthorized") -> Response:
    return reject(ctx, 401, code, message, [(b"WWW-Authenticate", challenge)])


def forbidden(ctx: Any, message: str, code: str = "forbidden") -> Response:
    return reject(ctx, 403, code, message)


def is_authenticated(ctx: Any) -> bool:
    return ctx.consumer is not None or "jwt_claims" in ctx.vars


def principal(ctx: Any) -> str:
    """Who the request is, for keys that must keep apart what different callers get (the
    cache's): "consumer" and its name, or for a verified JWT that names no consumer (the users
    of an outside identity provider) "jwt" and its issuer and subject; "" when anonymous.

    A token without a subject is told apart by all its claims: it may share nothing with
    another token. The kinds are in the string so that no consumer name can pass for a
    token's identity."""
    consumer = ctx.consumer
    if consumer is not None:
        return "consumer " + str(consumer.name)
    claims = ctx.vars.get("jwt_claims")
    if claims is None:
        return ""
    subject = claims.get("sub")
    if isinstance(subject, str):
        return "jwt " + json.dumps([claims.get("iss"), subject])
    return "jwt " + json.dumps(claims, sort_keys=True, default=str)
