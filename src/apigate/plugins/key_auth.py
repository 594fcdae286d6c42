"""API key authentication (`key_auth`): a key of `consumers[].api_keys` in a header or the query.

The keys are held only as SHA-256 digests, made once when the plugin is built, so a heap dump
or a debugger shows no key. A presented key is hashed and looked up by digest: the lookup
cannot leak a stored key through timing, since an attacker does not choose the digest's bytes;
the final `hmac.compare_digest` is there so the comparison stays constant-time should the table
ever change shape. With `hide_credentials` (the default) the key never reaches the upstream,
a wrong one let through as the `anonymous` consumer included (as Kong hides it).

`anonymous` and `run_on_preflight: false` (Kong's) put a check before the lookup; without them
the hook is the lookup alone, as before they existed (apigate.plugins.identity).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from pydantic import field_validator, model_validator

from apigate.config.errors import located_error
from apigate.config.schema import NonEmptyStr
from apigate.http.headers import is_token
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import (
    API_KEY_CHALLENGE,
    AnonymousAccess,
    Identity,
    StrictPluginConfig,
    authenticate,
    refuse,
    with_kong_checks,
)


class KeyAuthConfig(StrictPluginConfig):
    header_names: list[str] = ["apikey"]
    query_param: str | None = None
    hide_credentials: bool = True
    anonymous: NonEmptyStr | None = None  # a consumer's name: who a request without a key is
    run_on_preflight: bool = True  # false: a CORS preflight is let through unauthenticated

    @field_validator("header_names")
    @classmethod
    def _check_headers(cls, value: list[str]) -> list[str]:
        for name in value:
            if not is_token(name):
                raise ValueError(f"invalid header name {name!r}")
        return [name.lower() for name in value]

    @model_validator(mode="after")
    def _somewhere(self) -> KeyAuthConfig:
        if not self.header_names and not self.query_param:
            problem = "give header_names or query_param: the key has to come from somewhere"
            raise located_error(type(self).__name__, [(("header_names",), problem)])
        return self


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyAuthPlugin(Plugin):
    name = "key_auth"
    priority = 1250
    identifies_consumers = True
    Config = KeyAuthConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, KeyAuthConfig)
        # digest -> (the same digest, who): the stored copy is what compare_digest checks
        self.keys: dict[bytes, tuple[bytes, Identity]] = {}
        for consumer in env.config.consumers:
            identity = Identity(consumer)  # one per consumer: its keys have no names
            for key in consumer.api_keys:
                stored = digest(key.encode())
                self.keys[stored] = (stored, identity)
        self._names = frozenset(name.encode() for name in config.header_names)
        self._param = config.query_param.encode() if config.query_param else None
        self._hide = config.hide_credentials
        self._anonymous = AnonymousAccess.of(config, env.config.consumers)
        # the hook the chain calls (Kong's checks first only when an option asks for them)
        self.on_request: Callable[[Any], Response | None] = with_kong_checks(
            self._lookup, self._anonymous, not config.run_on_preflight
        )

    def _lookup(self, ctx: Any) -> Response | None:
        req = ctx.request
        found: bytes | None = None
        conflict = False
        names = self._names
        for name, value in req.headers:
            if name.lower() in names:
                key = value.strip()
                conflict = conflict or (found is not None and key != found)
                found = key
        param = self._param
        if param is not None and req.query:
            for key in self._query_values(req.query, param):
                conflict = conflict or (found is not None and key != found)
                found = key
        if found is None or not found:
            return self._refuse(ctx, "missing API key")
        if conflict:
            return self._refuse(ctx, "several different API keys")
        presented = digest(found)
        hit = self.keys.get(presented)
        if hit is None or not hmac.compare_digest(hit[0], presented):
            return self._refuse(ctx, "invalid API key")
        authenticate(ctx, hit[1])
        if self._hide:
            self._hide_key(req)
        return None

    def _refuse(self, ctx: Any, message: str) -> Response | None:
        """A 401, or the anonymous consumer (a wrong key hidden from the upstream too, as in
        Kong)."""
        if self._anonymous is not None and self._hide:
            self._hide_key(ctx.request)
        return refuse(ctx, self._anonymous, message, API_KEY_CHALLENGE)

    @staticmethod
    def _query_values(query: bytes, param: bytes) -> list[bytes]:
        values = []
        for pair in query.split(b"&"):
            key, eq, value = pair.partition(b"=")
            if eq and unquote_to_bytes(key) == param:
                values.append(unquote_to_bytes(value.replace(b"+", b" ")).strip())
        return values

    def _hide_key(self, req: Any) -> None:
        names = self._names
        if names:
            req.headers = [h for h in req.headers if h[0].lower() not in names]
        param = self._param
        if param is not None and req.query:
            kept = [
                p for p in req.query.split(b"&") if unquote_to_bytes(p.partition(b"=")[0]) != param
            ]
            req.query = b"&".join(kept)

    def __repr__(self) -> str:
        return f"<KeyAuthPlugin {len(self.keys)} keys headers={sorted(self._names)}>"
