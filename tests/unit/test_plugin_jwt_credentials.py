"""The jwt plugin in Kong's model: consumers hold `jwt_credentials`, the token's key claim
(`key_claim_name`) picks one, and only that credential's key and algorithm verify it. Without
sockets: plugins built as the chain builds them, and a gateway that does not listen for the
reload and admin-API cases.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from apigate.admin.api import AdminApi
from apigate.config.errors import ConfigError
from apigate.config.loader import parse_config
from apigate.config.schema import GatewayConfig
from apigate.plugins.jwt import JwtPlugin
from apigate.plugins.jwt_credentials import CredentialIndex, unverified_claims
from apigate.server import Gateway
from tests.unit.test_plugin_fakes import body, build, make_ctx, make_env, resolve
from tests.unit.test_plugin_jwt import (
    assemble,
    assert_invalid,
    bearer,
    check,
    count_decodes,
    hs256,
    pem,
)
from tests.unit.test_review_fixes_admin import _call as call_admin
from tests.unit.test_review_fixes_admin import admin_api

ALICE_SECRET = "alice-secret-0123456789abcdef-xyz"
BOB_SECRET = "bob-secret-0123456789abcdef-0123456"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def consumers() -> list[dict[str, Any]]:
    return [
        {
            "name": "alice",
            "groups": ["admins"],
            "jwt_credentials": [{"key": "alice-iss", "secret": ALICE_SECRET}],
        },
        {
            "name": "bob",
            "jwt_credentials": [
                {"key": "bob-iss", "algorithm": "HS512", "secret": BOB_SECRET * 2},
                {"key": "bob-rsa", "algorithm": "RS256", "public_key": pem(RSA_KEY).decode()},
            ],
        },
        {"name": "carol"},  # no credential: no token is ever hers
    ]


def plugin(raw: dict[str, Any] | None = None, people: list[dict[str, Any]] | None = None) -> Any:
    settings = {"key_claim_name": "iss"} if raw is None else raw
    return build("jwt", settings, make_env(consumers() if people is None else people))


def alice_token(**claims: Any) -> str:
    return hs256(ALICE_SECRET.encode(), iss="alice-iss", **claims)


def config_errors(people: list[dict[str, Any]]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"consumers": people}, source="<test>")
    return str(info.value)


def one(credential: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "alice", "jwt_credentials": [credential]}]


# ============================================================================ the file
def test_credentials_are_checked_when_the_file_is_loaded(tmp_path: Path) -> None:
    where = "consumers[0].jwt_credentials[0]"
    assert f"{where}.secret: 5 bytes is too short for HS256" in config_errors(
        one({"key": "k", "secret": "short"})
    )
    assert f"{where}.secret: 33 bytes is too short for HS512" in config_errors(
        one({"key": "k", "algorithm": "HS512", "secret": ALICE_SECRET})
    )
    assert f"{where}.algorithm: unsupported algorithm 'none'" in config_errors(
        one({"key": "k", "algorithm": "none", "secret": ALICE_SECRET})
    )
    # the pinning: HS* never with a public key, a public-key algorithm never with a secret
    public = pem(RSA_KEY).decode()
    assert f"{where}.public_key: HS256 needs a secret, not a public key" in config_errors(
        one({"key": "k", "public_key": public})
    )
    assert f"{where}.secret: RS256 needs a public key, not a secret" in config_errors(
        one({"key": "k", "algorithm": "RS256", "secret": ALICE_SECRET})
    )
    assert f"{where}.public_key: ES256 cannot be used with this key" in config_errors(
        one({"key": "k", "algorithm": "ES256", "public_key": public})
    )
    assert f"{where}.public_key: this key is not a PEM public key" in config_errors(
        one({"key": "k", "algorithm": "RS256", "public_key": "-----BEGIN PUBLIC KEY-----\nx"})
    )
    assert f"{where}.public_key_file: cannot read" in config_errors(
        one({"key": "k", "algorithm": "RS256", "public_key_file": str(tmp_path / "none.pem")})
    )
    assert f"{where}: set exactly one of secret, public_key, public_key_file" in config_errors(
        one({"key": "k", "secret": ALICE_SECRET, "public_key": public})
    )
    assert f"{where}.rsa_public_key: unknown key; did you mean 'public_key'?" in config_errors(
        one({"key": "k", "algorithm": "RS256", "rsa_public_key": public})
    )
    # no secret is ever shown in an error
    assert ALICE_SECRET not in config_errors(
        one({"key": "k", "algorithm": "HS512", "secret": ALICE_SECRET})
    )


def test_a_credential_key_names_one_credential() -> None:
    people = consumers()
    people[2]["jwt_credentials"] = [{"key": "bob-iss", "secret": ALICE_SECRET}]
    people[0]["jwt_credentials"].append({"key": "alice-iss", "secret": BOB_SECRET})
    errors = config_errors(people)
    assert "consumers[0].jwt_credentials[1].key: JWT key 'alice-iss' already used by " in errors
    assert "consumers[2].jwt_credentials[0].key: JWT key 'bob-iss' already used by " in errors
    assert "consumer 'alice'" in errors and "consumer 'bob'" in errors


def test_a_public_key_file_and_an_ec_key(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(EC_KEY))
    people = one({"key": "ec", "algorithm": "ES256", "public_key_file": str(path)})
    token = jwt.encode({"iss": "ec"}, EC_KEY, "ES256")
    outcome, ctx = check(plugin(people=people), token)
    assert outcome is None and ctx.consumer.name == "alice"


def test_a_base64_secret_is_decoded_and_its_bytes_are_the_key() -> None:
    raw = bytes(range(256))[:40]  # not text: only base64 can carry it in a file
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()[:-2]):
        people = one({"key": "b", "secret": text, "secret_is_base64": True})
        token = hs256(raw, iss="b")
        assert check(plugin(people=people), token)[0] is None
    where = "consumers[0].jwt_credentials[0]"
    assert f"{where}.secret: 24 bytes is too short for HS256" in config_errors(
        one({"key": "b", "secret": base64.b64encode(b"x" * 24).decode(), "secret_is_base64": True})
    )
    assert f"{where}.secret: not base64 (secret_is_base64 is set)" in config_errors(
        one({"key": "b", "secret": "not base64!" * 4, "secret_is_base64": True})
    )
    assert f"{where}.secret_is_base64: only with a secret" in config_errors(
        one(
            {
                "key": "b",
                "algorithm": "RS256",
                "public_key": pem(RSA_KEY).decode(),
                "secret_is_base64": True,
            }
        )
    )


def test_plugin_settings_for_the_credentials_mode() -> None:
    def errors(raw: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as info:
            plugin(raw)
        return str(info.value)

    assert "set exactly one of secret, public_key_file, jwks_url" in errors(
        {"key_claim_name": "iss", "secret": ALICE_SECRET, "algorithms": ["HS256"]}
    )
    assert "or key_claim_name" in errors({})
    assert "consumer_claim: not with key_claim_name" in errors(
        {"key_claim_name": "iss", "consumer_claim": "sub"}
    )
    assert "key_claim_name: must not be empty" in errors({"key_claim_name": " "})
    assert "algorithms: required" in errors({"secret": ALICE_SECRET})  # the plugin's own key


# ============================================================================ the lookup
def test_the_lookup_reads_the_claim_then_the_jose_header() -> None:
    index = CredentialIndex(
        GatewayConfig.model_validate({"consumers": consumers()}).consumers, "kid"
    )
    found = index.find({"kid": "bob-rsa"}, {"kid": "alice-iss"})
    assert not isinstance(found, str) and found.consumer.name == "bob"  # the payload first
    found = index.find({}, {"kid": "alice-iss", "alg": "HS256"})
    assert not isinstance(found, str) and found.consumer.name == "alice"
    assert found.algorithm == "HS256" and found.key.algorithms == {"HS256"}
    assert index.find({}, {"alg": "HS256"}) == "token lacks the 'kid' claim"
    for value in ("nobody", "", 7, ["alice-iss"], {"k": 1}, True):
        assert index.find({"kid": value}, {}) == "no credentials found for given 'kid'"
    assert len(index) == 3


def test_unverified_claims_are_only_a_json_object() -> None:
    assert unverified_claims(alice_token(sub="x").encode()) == {"iss": "alice-iss", "sub": "x"}
    for payload in (b"[1]", b"not json", b"\xff\xfe", b"[" * 5000):
        seg = base64.urlsafe_b64encode(payload).rstrip(b"=")
        assert unverified_claims(b"e30." + seg + b".c2ln") is None


# ============================================================================ requests
def test_a_credential_s_token_is_its_consumer_s_request() -> None:
    p = plugin({"key_claim_name": "iss", "forward_claims": {"iss": "X-Issuer"}})
    outcome, ctx = check(p, alice_token(sub="bob", scope="read"))  # `sub` names nobody here
    assert outcome is None
    assert ctx.consumer.name == "alice" and ctx.consumer.groups == ["admins"]
    assert ctx.vars["jwt_claims"]["scope"] == "read"
    assert ctx.request.header_values("x-issuer") == ["alice-iss"]
    outcome, ctx = check(p, jwt.encode({"iss": "bob-rsa"}, RSA_KEY, "RS256"))
    assert outcome is None and ctx.consumer.name == "bob"
    token = jwt.encode({"iss": "bob-iss"}, BOB_SECRET * 2, "HS512")
    outcome, ctx = check(p, token)
    assert outcome is None and ctx.consumer.name == "bob"


def test_the_key_claim_may_be_in_the_jose_header() -> None:
    p = plugin({"key_claim_name": "kid"})
    token = jwt.encode({"sub": "x"}, ALICE_SECRET, "HS256", headers={"kid": "alice-iss"})
    outcome, ctx = check(p, token)
    assert outcome is None and ctx.consumer.name == "alice"


def test_a_key_claim_naming_no_credential_is_401() -> None:
    p = plugin()
    # signed with a real credential's secret, but naming another key, or a consumer's name
    for iss in ("nobody", "alice", "carol", ""):
        assert_invalid(
            check(p, hs256(ALICE_SECRET.encode(), iss=iss))[0],
            "no credentials found for given 'iss'",
        )
    assert_invalid(
        check(p, hs256(ALICE_SECRET.encode(), iss=["alice-iss"]))[0],
        "no credentials found for given 'iss'",
    )
    assert p.cache == {}


def test_a_token_without_the_key_claim_is_401() -> None:
    p = plugin()
    assert_invalid(
        check(p, hs256(ALICE_SECRET.encode(), sub="alice"))[0], "token lacks the 'iss' claim"
    )
    assert_invalid(
        check(p, hs256(ALICE_SECRET.encode(), iss=None))[0], "token lacks the 'iss' claim"
    )


def test_a_token_in_another_algorithm_than_its_credential_s_is_401() -> None:
    p = plugin()
    # alice's credential is HS256: HS384 with her very secret is refused before any check
    token = jwt.encode({"iss": "alice-iss"}, ALICE_SECRET + "x" * 16, "HS384")
    assert_invalid(check(p, token)[0], "algorithm not allowed")
    # the classic confusion: HS256 "signed" with bob's RSA public key as the HMAC secret
    forged = hs256(pem(RSA_KEY), iss="bob-rsa")
    assert_invalid(check(p, forged)[0], "algorithm not allowed")
    # alg none, whatever its spelling, never meets a credential
    for alg in ("none", "None", "NONE"):
        unsigned = assemble({"alg": alg}, {"iss": "alice-iss"}, lambda _: b"sig")
        assert_invalid(check(p, unsigned)[0], "algorithm not allowed")
    # and a route's own `algorithms` narrows what any credential may use
    rs_only = plugin({"key_claim_name": "iss", "algorithms": ["RS256"]})
    assert_invalid(check(rs_only, alice_token())[0], "algorithm not allowed")
    assert check(rs_only, jwt.encode({"iss": "bob-rsa"}, RSA_KEY, "RS256"))[0] is None


def test_a_token_signed_with_another_consumer_s_key_is_401() -> None:
    p = plugin()
    # bob signs a token that names alice's credential: he cannot be alice
    as_alice = hs256(BOB_SECRET.encode(), iss="alice-iss")
    assert_invalid(check(p, as_alice)[0], "invalid signature")
    # alice signs one naming bob's RS256 credential with a key of her own
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_invalid(check(p, jwt.encode({"iss": "bob-rsa"}, other, "RS256"))[0], "invalid signature")
    # another payload under a good token's signature: verified over what the lookup read
    head, _, sig = alice_token(sub="a").split(".")
    payload = base64.urlsafe_b64encode(b'{"iss": "alice-iss", "sub": "b"}').rstrip(b"=").decode()
    assert_invalid(check(p, f"{head}.{payload}.{sig}")[0], "invalid signature")
    assert p.cache == {}


def test_the_plugin_s_other_checks_still_apply() -> None:
    p = plugin(
        {"key_claim_name": "iss", "audience": "api", "leeway": "0s", "required_claims": ["exp"]}
    )
    assert_invalid(check(p, alice_token(aud="api"))[0], "token lacks the 'exp' claim")
    assert_invalid(
        check(p, alice_token(aud="web", exp=time.time() + 60))[0], "token audience not accepted"
    )
    assert_invalid(check(p, alice_token(aud="api", exp=time.time() - 5))[0], "token expired")
    assert check(p, alice_token(aud="api", exp=time.time() + 60))[0] is None


def test_a_verified_credential_token_is_answered_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p: JwtPlugin = plugin()
    calls = count_decodes(p, monkeypatch)
    token = alice_token(exp=time.time() + 3600)
    for _ in range(3):
        outcome, ctx = check(p, token)
        assert outcome is None and ctx.consumer.name == "alice"
    assert len(calls) == 1
    assert p.cache[token.encode()].consumer.name == "alice"


def test_the_plugin_s_own_key_mode_is_unchanged() -> None:
    """Consumers with credentials change nothing for a plugin with its own secret: its
    `consumer_claim` still names the consumer, and a token naming none is still accepted."""
    p = plugin({"secret": ALICE_SECRET, "algorithms": ["HS256"]})
    outcome, ctx = check(p, hs256(ALICE_SECRET.encode(), sub="bob", iss="nobody"))
    assert outcome is None and ctx.consumer.name == "bob"
    outcome, ctx = check(p, hs256(ALICE_SECRET.encode(), sub="stranger"))
    assert outcome is None and ctx.consumer is None


# ============================================================================ reloads, admin API
def gateway_doc(people: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
        "services": {"up": {"targets": ["http://127.0.0.1:9001"]}},
        "consumers": people,
        "routes": [
            {
                "name": "api",
                "match": {"paths": ["/api"]},
                "service": "up",
                "plugins": {"jwt": {"key_claim_name": "iss"}},
            }
        ],
    }


def serving_jwt(gw: Gateway) -> JwtPlugin:
    """The jwt plugin the route's requests meet now (a new snapshot has a new one)."""
    found = [p for p in gw.runtime.routes["api"].chain.plugins if isinstance(p, JwtPlugin)]
    assert len(found) == 1
    return found[0]


def through(gw: Gateway, token: str) -> Any:
    ctx = make_ctx(headers=bearer(token))
    return resolve(serving_jwt(gw).on_request(ctx)), ctx


@pytest.fixture
async def admin() -> AsyncIterator[AdminApi]:
    async for api in admin_api(gateway_doc(consumers())):
        yield api


async def test_a_reload_without_the_consumer_refuses_its_cached_token(admin: AdminApi) -> None:
    gw = admin.gateway
    token = alice_token(exp=time.time() + 3600)
    assert through(gw, token)[0] is None
    before = serving_jwt(gw)
    assert token.encode() in before.cache  # a hit, had the old plugin been asked again
    people = [c for c in consumers() if c["name"] != "alice"]
    await gw.apply_config(GatewayConfig.model_validate(gateway_doc(people)))
    assert serving_jwt(gw) is not before and serving_jwt(gw).cache == {}
    outcome, ctx = through(gw, token)
    assert_invalid(outcome, "no credentials found for given 'iss'")
    assert ctx.consumer is None


async def test_an_admin_change_of_a_credential_refuses_the_old_tokens(admin: AdminApi) -> None:
    gw = admin.gateway
    old = jwt.encode({"iss": "bob-iss", "exp": time.time() + 3600}, BOB_SECRET * 2, "HS512")
    assert through(gw, old)[0] is None
    new_secret = "rotated-" + "z" * 60
    bob = {"jwt_credentials": [{"key": "bob-iss", "algorithm": "HS512", "secret": new_secret}]}
    status, doc = await call_admin(admin, "PUT", "/consumers/bob", bob)
    assert status == 200, doc
    assert doc["jwt_credentials"][0]["secret"] == "[redacted]"
    assert_invalid(through(gw, old)[0], "invalid signature")
    new = jwt.encode({"iss": "bob-iss"}, new_secret, "HS512")
    outcome, ctx = through(gw, new)
    assert outcome is None and ctx.consumer.name == "bob"
    # bob-rsa went with the PUT (a consumer is replaced whole): its tokens are strangers now
    rsa_token = jwt.encode({"iss": "bob-rsa"}, RSA_KEY, "RS256")
    assert_invalid(through(gw, rsa_token)[0], "no credentials found for given 'iss'")
    assert (await call_admin(admin, "DELETE", "/consumers/bob"))[0] == 200
    assert_invalid(through(gw, new)[0], "no credentials found for given 'iss'")


async def test_the_admin_api_shows_credentials_without_their_secrets(admin: AdminApi) -> None:
    status, doc = await call_admin(admin, "GET", "/consumers")
    assert status == 200
    shown = {c["name"]: c["jwt_credentials"] for c in doc["consumers"]}
    assert shown["alice"] == [
        {
            "key": "alice-iss",
            "algorithm": "HS256",
            "secret": "[redacted]",
            "secret_is_base64": False,
            "public_key": None,
            "public_key_file": None,
        }
    ]
    assert shown["bob"][1]["public_key"] == pem(RSA_KEY).decode()  # public: shown
    status, doc = await call_admin(admin, "GET", "/consumers/alice")
    assert doc["jwt_credentials"][0]["secret"] == "[redacted]"
    status, doc = await call_admin(admin, "GET", "/config")
    assert ALICE_SECRET not in str(doc) and BOB_SECRET not in str(doc)
    # what GET showed cannot be PUT back as the secret
    status, doc = await call_admin(
        admin, "PUT", "/consumers/alice", {"jwt_credentials": shown["alice"]}
    )
    assert (status, doc["error"]) == (400, "redacted_value")


async def test_an_admin_put_is_checked_like_the_file(admin: AdminApi) -> None:
    weak = {"jwt_credentials": [{"key": "carol-iss", "secret": "short"}]}
    status, doc = await call_admin(admin, "PUT", "/consumers/carol", weak)
    assert (status, doc["error"]) == (400, "invalid_config")
    assert "jwt_credentials[0].secret: 5 bytes is too short for HS256" in doc["message"]
    taken = {"jwt_credentials": [{"key": "alice-iss", "secret": BOB_SECRET}]}
    status, doc = await call_admin(admin, "PUT", "/consumers/carol", taken)
    assert (
        status == 400 and "JWT key 'alice-iss' already used by consumer 'alice'" in doc["message"]
    )
    hs_with_public = {"jwt_credentials": [{"key": "c", "public_key": pem(RSA_KEY).decode()}]}
    status, doc = await call_admin(admin, "PUT", "/consumers/carol", hs_with_public)
    assert status == 400 and "HS256 needs a secret, not a public key" in doc["message"]
    token = hs256(b"short", iss="carol-iss")
    assert_invalid(through(admin.gateway, token)[0], "no credentials found for given 'iss'")


def test_messages_never_echo_a_secret() -> None:
    p = plugin()
    for token in (hs256(BOB_SECRET.encode(), iss="alice-iss"), hs256(b"x", iss="nobody")):
        outcome = check(p, token)[0]
        assert outcome is not None
        text = str(body(outcome))
        assert ALICE_SECRET not in text and BOB_SECRET not in text
