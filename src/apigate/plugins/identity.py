"""What the security plugins share: consumer lookup, 401/403 answers, a strict config base.

An authenticated request carries its identity in two places that later plugins read:
`ctx.consumer` (the `ConsumerConfig` from the file's `consumers:`, when one matches) and, for
JWT, `ctx.vars["jwt_claims"]` (the verified claims). Rejections are JSON bodies
`{"error", "message", "request_id"}` built only on the error path; a 401 always carries a
`WWW-Authenticate` challenge (RFC 9110 §11.6.1). Messages never echo a credential.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic import ConfigDict

from apigate.config.schema import ConsumerConfig, StrictModel
from apigate.http.errors import json_body
from apigate.plugins.base import PluginConfig, Response

BEARER_CHALLENGE = b'Bearer realm="apigate"'
BEARER_INVALID = b'Bearer realm="apigate", error="invalid_token"'
BASIC_CHALLENGE = b'Basic realm="apigate", charset="UTF-8"'
API_KEY_CHALLENGE = b'ApiKey realm="apigate"'


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
