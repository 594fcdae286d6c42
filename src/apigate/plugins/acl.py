"""Authorization (`acl`): who may use a route, once an auth plugin has said who is calling.

Runs after the auth plugins (priority 950) and reads what they left: `ctx.consumer` (its
`groups`) and `ctx.vars["jwt_claims"]`. No identity at all is a 401; an identity that fails a
rule is a 403. The rules, all of which must hold:

    deny:   [groups]            any of them -> 403 (deny wins over allow)
    allow:  [groups]            the consumer must be in one of them
    claims: {claim: [values]}   each claim must have one of its values (a list claim: any item)
    scopes: [scopes]            every one must be granted, by `scope` ("a b c") or `scp` (list)
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from apigate.config.errors import located_error
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import (
    BEARER_CHALLENGE,
    StrictPluginConfig,
    forbidden,
    is_authenticated,
    unauthorized,
)


class AclConfig(StrictPluginConfig):
    allow: list[str] | None = None
    deny: list[str] = []
    claims: dict[str, list[str]] = {}
    scopes: list[str] = []

    @model_validator(mode="after")
    def _some_rule(self) -> AclConfig:
        if self.allow is None and not (self.deny or self.claims or self.scopes):
            problem = "give at least one of allow, deny, claims, scopes"
            raise located_error(type(self).__name__, [((), problem)])
        return self


def granted_scopes(claims: dict[str, Any]) -> set[str]:
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(v for v in value if isinstance(v, str))
    return scopes


def claim_matches(value: Any, wanted: frozenset[str]) -> bool:
    if isinstance(value, list):
        return any(isinstance(v, str | int) and str(v) in wanted for v in value)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value) in wanted
    if isinstance(value, bool):
        return ("true" if value else "false") in wanted
    return False


class AclPlugin(Plugin):
    name = "acl"
    priority = 950
    on_consumers = False  # it judges the consumer for the route (Kong refuses it on consumers)
    Config = AclConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, AclConfig)
        self.allow = frozenset(config.allow) if config.allow is not None else None
        self.deny = frozenset(config.deny)
        self.claims = {name: frozenset(values) for name, values in config.claims.items()}
        self.scopes = frozenset(config.scopes)

    def on_request(self, ctx: Any) -> Response | None:
        if not is_authenticated(ctx):
            return unauthorized(ctx, "authentication required", BEARER_CHALLENGE)
        consumer = ctx.consumer
        groups = frozenset(consumer.groups) if consumer is not None else frozenset()
        if groups & self.deny:
            return forbidden(ctx, "consumer group not allowed on this route")
        if self.allow is not None and not groups & self.allow:
            return forbidden(ctx, "consumer group not allowed on this route")
        if self.claims or self.scopes:
            claims = ctx.vars.get("jwt_claims") or {}
            for name, wanted in self.claims.items():
                if not claim_matches(claims.get(name), wanted):
                    return forbidden(ctx, f"claim {name!r} not allowed on this route")
            if self.scopes and not self.scopes <= granted_scopes(claims):
                missing = sorted(self.scopes - granted_scopes(claims))
                return forbidden(ctx, f"missing scope: {' '.join(missing)}", "insufficient_scope")
        return None

    def __repr__(self) -> str:
        allow = sorted(self.allow) if self.allow is not None else "*"
        return f"<AclPlugin allow={allow} deny={sorted(self.deny)}>"
