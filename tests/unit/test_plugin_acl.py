"""The acl plugin: groups, claims and scopes after authentication; 401 vs 403."""

from __future__ import annotations

from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.config.schema import ConsumerConfig
from apigate.plugins.acl import granted_scopes
from tests.unit.test_plugin_fakes import Ctx, body, build, make_ctx, resolve


def ctx_for(groups: list[str] | None = None, claims: dict[str, Any] | None = None) -> Ctx:
    ctx = make_ctx()
    if groups is not None:
        ctx.consumer = ConsumerConfig(name="c", groups=groups)
    if claims is not None:
        ctx.vars["jwt_claims"] = claims
    return ctx


def status(raw: dict[str, Any], ctx: Ctx) -> int:
    outcome = resolve(build("acl", raw).on_request(ctx))
    return 200 if outcome is None else outcome.status


def test_no_identity_is_401() -> None:
    outcome = resolve(build("acl", {"allow": ["admins"]}).on_request(make_ctx()))
    assert outcome is not None and outcome.status == 401
    assert body(outcome)["message"] == "authentication required"


def test_allow_and_deny_groups() -> None:
    rules = {"allow": ["admins", "ops"], "deny": ["banned"]}
    assert status(rules, ctx_for(["ops"])) == 200
    assert status(rules, ctx_for(["users"])) == 403
    assert status(rules, ctx_for(["admins", "banned"])) == 403  # deny wins
    assert status(rules, ctx_for([])) == 403
    assert status({"deny": ["banned"]}, ctx_for(["users"])) == 200
    assert status({"deny": ["banned"]}, ctx_for(claims={"sub": "x"})) == 200
    assert status({"allow": ["admins"]}, ctx_for(claims={"sub": "x"})) == 403


def test_claims() -> None:
    rules = {"claims": {"tenant": ["acme", "globex"], "level": ["3"]}}
    assert status(rules, ctx_for(claims={"tenant": "acme", "level": 3})) == 200
    assert status(rules, ctx_for(claims={"tenant": ["x", "globex"], "level": "3"})) == 200
    assert status(rules, ctx_for(claims={"tenant": "initech", "level": 3})) == 403
    assert status(rules, ctx_for(claims={"tenant": "acme"})) == 403
    assert status(rules, ctx_for(["admins"])) == 403  # a consumer without claims


def test_scopes() -> None:
    rules = {"scopes": ["orders:read", "orders:write"]}
    assert status(rules, ctx_for(claims={"scope": "openid orders:read orders:write"})) == 200
    assert status(rules, ctx_for(claims={"scp": ["orders:write", "orders:read"]})) == 200
    ctx = ctx_for(claims={"scope": "orders:read"})
    outcome = resolve(build("acl", rules).on_request(ctx))
    assert outcome is not None and outcome.status == 403
    assert body(outcome) == {
        "error": "insufficient_scope",
        "message": "missing scope: orders:write",
        "request_id": "req-1",
    }
    assert granted_scopes({"scope": "a b", "scp": "c"}) == {"a", "b", "c"}


def test_a_rule_is_required() -> None:
    with pytest.raises(ConfigError, match="give at least one of allow, deny, claims, scopes"):
        build("acl", {})
