"""What a Kong user expects of the auth plugins, without a gateway: the consumer's lines for the
upstream (X-Consumer-*, X-Credential-Identifier, X-Anonymous-Consumer), `anonymous` and the
logical OR of several auth plugins, `run_on_preflight`, and jwt's `maximum_expiration`.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.plugins.identity import Identity, authenticated
from apigate.proxy.heads import consumer_lines
from tests.unit.test_plugin_fakes import Ctx, body, build, make_ctx, make_env, resolve
from tests.unit.test_plugin_jwt import bearer, hs256

SECRET = "s" * 32
CONSUMERS: list[dict[str, Any]] = [
    {
        "name": "alice",
        "custom_id": "A-1",
        "groups": ["admins", "ops"],
        "api_keys": ["alice-key"],
        "basic_auth": {
            "username": "alice-login",
            "password": "sha256:" + hashlib.sha256(b"wonderland").hexdigest(),
        },
        "jwt_credentials": [{"key": "alice-iss", "secret": SECRET}],
    },
    {"name": "guest", "groups": ["anonymous"]},
]


def lines(ctx: Ctx) -> bytes:
    """The upstream lines the exchange writes for the request's consumer."""
    credential = getattr(ctx, "credential", None)
    assert credential is not None and credential.consumer is ctx.consumer
    text: bytes = credential.lines
    return text


def basic(user: str, password: str) -> list[tuple[str, str]]:
    return [("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())]


def plugin(name: str, raw: dict[str, Any]) -> Any:
    return build(name, raw, make_env(CONSUMERS))


# ============================================================================ upstream lines
def test_consumer_lines_name_the_consumer_in_kongs_headers() -> None:
    alice = make_env(CONSUMERS).config.consumers[0]
    assert consumer_lines(alice) == (
        b"X-Consumer-ID: alice\r\n"  # the name: apigate's consumers have no other id
        b"X-Consumer-Username: alice\r\n"
        b"X-Consumer-Custom-ID: A-1\r\n"
        b"X-Consumer-Groups: admins, ops\r\n"
    )


@pytest.mark.parametrize(
    ("name", "raw", "headers", "identifier"),
    [
        ("key_auth", {}, [("apikey", "alice-key")], None),  # an API key has no name to send
        ("basic_auth", {}, basic("alice-login", "wonderland"), b"alice-login"),
        ("jwt", {"key_claim_name": "iss"}, bearer(hs256(SECRET.encode(), iss="alice-iss")), None),
    ],
)
def test_each_auth_plugin_names_consumer_and_credential_never_the_secret(
    name: str, raw: dict[str, Any], headers: list[tuple[str, str]], identifier: bytes | None
) -> None:
    ctx = make_ctx(headers=headers)
    assert resolve(plugin(name, raw).on_request(ctx)) is None
    sent = lines(ctx)
    assert sent.startswith(b"X-Consumer-ID: alice\r\nX-Consumer-Username: alice\r\n")
    if name == "jwt":
        identifier = b"alice-iss"  # the credential's key, Kong's X-Credential-Identifier
    if identifier is None:
        assert b"X-Credential-Identifier" not in sent
    else:
        assert sent.endswith(b"X-Credential-Identifier: " + identifier + b"\r\n")
    for secret in (b"alice-key", b"wonderland", SECRET.encode()):
        assert secret not in sent
    assert b"X-Anonymous-Consumer" not in sent
    assert not ctx.credential.anonymous


def test_a_cached_token_names_its_consumer_the_same_way() -> None:
    jwt = plugin("jwt", {"key_claim_name": "iss"})
    token = hs256(SECRET.encode(), iss="alice-iss")
    first, second = make_ctx(headers=bearer(token)), make_ctx(headers=bearer(token))
    assert resolve(jwt.on_request(first)) is None
    assert resolve(jwt.on_request(second)) is None  # from the verified-token cache
    assert second.credential is first.credential  # made once, when the plugin was built


def test_a_token_naming_a_consumer_by_claim_carries_its_lines() -> None:
    jwt = plugin("jwt", {"secret": SECRET, "algorithms": ["HS256"]})
    ctx = make_ctx(headers=bearer(hs256(SECRET.encode(), sub="alice")))
    assert resolve(jwt.on_request(ctx)) is None
    assert lines(ctx) == consumer_lines(ctx.consumer)
    stranger = make_ctx(headers=bearer(hs256(SECRET.encode(), sub="nobody")))
    assert resolve(jwt.on_request(stranger)) is None
    assert stranger.consumer is None and getattr(stranger, "credential", None) is None


# ============================================================================ anonymous
ANONYMOUS_CASES = [
    ("key_auth", {}, [], [("apikey", "wrong")], [("apikey", "alice-key")]),
    ("basic_auth", {}, [], basic("alice-login", "nope"), basic("alice-login", "wonderland")),
    (
        "jwt",
        {"key_claim_name": "iss"},
        [],
        bearer(hs256(b"x" * 32, iss="alice-iss")),  # signed with another key
        bearer(hs256(SECRET.encode(), iss="alice-iss")),
    ),
]


@pytest.mark.parametrize(("name", "raw", "missing", "wrong", "valid"), ANONYMOUS_CASES)
def test_anonymous_stands_in_for_a_missing_or_wrong_credential_and_without_it_401(
    name: str,
    raw: dict[str, Any],
    missing: list[tuple[str, str]],
    wrong: list[tuple[str, str]],
    valid: list[tuple[str, str]],
) -> None:
    auth = plugin(name, {**raw, "anonymous": "guest"})
    strict = plugin(name, raw)
    for headers in (missing, wrong):
        ctx = make_ctx(headers=headers)
        assert resolve(auth.on_request(ctx)) is None  # not a 401, as in Kong
        assert ctx.consumer.name == "guest"
        assert ctx.credential.anonymous and not authenticated(ctx)
        assert lines(ctx) == (
            b"X-Consumer-ID: guest\r\nX-Consumer-Username: guest\r\n"
            b"X-Consumer-Groups: anonymous\r\nX-Anonymous-Consumer: true\r\n"
        )
        assert "jwt_claims" not in ctx.vars
        response = resolve(strict.on_request(make_ctx(headers=headers)))
        assert response is not None and response.status == 401
    ctx = make_ctx(headers=valid)
    assert resolve(auth.on_request(ctx)) is None
    assert ctx.consumer.name == "alice" and authenticated(ctx)


def test_a_wrong_key_is_hidden_from_the_upstream_of_an_anonymous_request() -> None:
    """Kong's key-auth and basic-auth clear the credential with hide_credentials whether or not
    it was valid: a wrong one must not reach the upstream behind the anonymous consumer."""
    ctx = make_ctx(headers=[("apikey", "wrong"), ("Accept", "*/*")], query=b"apikey=wrong&a=1")
    keys = plugin("key_auth", {"anonymous": "guest", "query_param": "apikey"})
    assert resolve(keys.on_request(ctx)) is None
    assert ctx.request.headers == [(b"Accept", b"*/*")] and ctx.request.query == b"a=1"
    ctx = make_ctx(headers=basic("alice-login", "nope"))
    assert resolve(plugin("basic_auth", {"anonymous": "guest"}).on_request(ctx)) is None
    assert ctx.request.header("authorization") is None


def test_logical_or_a_real_consumer_found_earlier_is_kept() -> None:
    """Kong: a plugin with `anonymous` does nothing when an earlier one authenticated a real
    consumer (kong.client.get_credential()); the route's auth plugins are a logical OR."""
    jwt = plugin("jwt", {"key_claim_name": "iss", "anonymous": "guest"})
    keys = plugin("key_auth", {"anonymous": "guest"})
    ctx = make_ctx(headers=bearer(hs256(SECRET.encode(), iss="alice-iss")))
    assert resolve(jwt.on_request(ctx)) is None
    found = ctx.credential
    assert resolve(keys.on_request(ctx)) is None  # no key: not made anonymous
    assert ctx.consumer.name == "alice" and ctx.credential is found


def test_logical_or_a_later_plugin_replaces_the_anonymous_consumer() -> None:
    jwt = plugin("jwt", {"key_claim_name": "iss", "anonymous": "guest"})
    keys = plugin("key_auth", {"anonymous": "guest"})
    ctx = make_ctx(headers=[("apikey", "alice-key")])
    assert resolve(jwt.on_request(ctx)) is None
    assert ctx.consumer.name == "guest"
    assert resolve(keys.on_request(ctx)) is None
    assert ctx.consumer.name == "alice" and not ctx.credential.anonymous
    assert b"X-Anonymous-Consumer" not in lines(ctx)
    nothing = make_ctx()
    for auth in (jwt, keys):
        assert resolve(auth.on_request(nothing)) is None
    assert nothing.consumer.name == "guest" and nothing.credential.anonymous


def test_without_anonymous_a_later_plugin_still_wants_its_own_credential() -> None:
    """Kong's logical AND: a plugin without `anonymous` authenticates whatever came before."""
    jwt = plugin("jwt", {"key_claim_name": "iss"})
    keys = plugin("key_auth", {})
    ctx = make_ctx(headers=bearer(hs256(SECRET.encode(), iss="alice-iss")))
    assert resolve(jwt.on_request(ctx)) is None
    response = resolve(keys.on_request(ctx))
    assert response is not None and response.status == 401


async def test_a_slow_hash_that_fails_admits_the_anonymous_consumer() -> None:
    salt, iterations = "pepper", 1000
    digest = hashlib.pbkdf2_hmac("sha256", b"right", salt.encode(), iterations)
    stored = f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"
    consumers = [
        {"name": "slow", "basic_auth": {"username": "slow", "password": stored}},
        {"name": "guest"},
    ]
    auth = build("basic_auth", {"anonymous": "guest"}, make_env(consumers))
    for user in ("slow", "nobody"):  # a known user's wrong password, an unknown user
        ctx = make_ctx(headers=basic(user, "wrong"))
        outcome = auth.on_request(ctx)
        assert outcome is not None  # a worker thread's check: an awaitable
        assert await outcome is None
        assert ctx.consumer.name == "guest"
    ctx = make_ctx(headers=basic("slow", "right"))
    assert await auth.on_request(ctx) is None
    assert ctx.consumer.name == "slow"


@pytest.mark.parametrize("name", ["key_auth", "basic_auth", "jwt"])
def test_an_unknown_anonymous_consumer_is_a_config_error_with_its_path(name: str) -> None:
    raw: dict[str, Any] = {"anonymous": "nobody"}
    if name == "jwt":
        raw["key_claim_name"] = "iss"
    with pytest.raises(ConfigError) as caught:
        plugin(name, raw)
    assert any(
        line.startswith(f"routes[0].plugins.{name}.anonymous: ") and "'nobody'" in line
        for line in caught.value.errors
    ), caught.value.errors


def test_an_identity_repr_says_whose_it_is() -> None:
    guest = make_env(CONSUMERS).config.consumers[1]
    assert repr(Identity(guest, anonymous=True)) == "<Identity anonymous 'guest'>"


# ============================================================================ run_on_preflight
PREFLIGHT = [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "POST")]


@pytest.mark.parametrize(("name", "raw"), [("key_auth", {}), ("jwt", {"key_claim_name": "iss"})])
def test_run_on_preflight_false_lets_a_preflight_through(name: str, raw: dict[str, Any]) -> None:
    skipping = plugin(name, {**raw, "run_on_preflight": False})
    ctx = make_ctx("OPTIONS", headers=PREFLIGHT)
    assert resolve(skipping.on_request(ctx)) is None
    assert ctx.consumer is None
    # only a preflight: a plain OPTIONS, or one without the CORS request method, is a request
    for method, headers in [("OPTIONS", PREFLIGHT[:1]), ("OPTIONS", []), ("GET", PREFLIGHT)]:
        response = resolve(skipping.on_request(make_ctx(method, headers=headers)))
        assert response is not None and response.status == 401, (method, headers)
    default = plugin(name, raw)  # Kong's default: true, preflights are authenticated
    response = resolve(default.on_request(make_ctx("OPTIONS", headers=PREFLIGHT)))
    assert response is not None and response.status == 401


def test_basic_auth_has_no_run_on_preflight_as_in_kong() -> None:
    with pytest.raises(ConfigError, match="run_on_preflight"):
        plugin("basic_auth", {"run_on_preflight": False})


def test_the_options_cost_nothing_when_unset() -> None:
    """Without `anonymous` or `run_on_preflight: false` the hook is what it was: the compiled
    cache lookup for jwt, the lookup itself for key_auth."""
    jwt = plugin("jwt", {"key_claim_name": "iss"})
    assert jwt.on_request == jwt.tokens.on_request
    keys = plugin("key_auth", {})
    assert keys.on_request == keys._lookup
    basic = plugin("basic_auth", {})
    assert basic.on_request == basic._check


# ============================================================================ maximum_expiration
def max_exp_plugin(**extra: Any) -> Any:
    raw = {
        "key_claim_name": "iss",
        "required_claims": ["exp"],
        "maximum_expiration": "1h",
        **extra,
    }
    return plugin("jwt", raw)


def test_maximum_expiration_refuses_a_token_that_lives_too_long() -> None:
    jwt = max_exp_plugin()
    now = int(time.time())
    ok = make_ctx(headers=bearer(hs256(SECRET.encode(), iss="alice-iss", exp=now + 3500)))
    assert resolve(jwt.on_request(ok)) is None
    too_long = hs256(SECRET.encode(), iss="alice-iss", exp=now + 3700)
    response = resolve(jwt.on_request(make_ctx(headers=bearer(too_long))))
    assert response is not None and response.status == 401
    assert body(response)["message"] == "token's exp exceeds the maximum allowed expiration"
    assert too_long.encode() not in jwt.cache  # never cached: asked again, refused again
    again = resolve(jwt.on_request(make_ctx(headers=bearer(too_long))))
    assert again is not None and again.status == 401
    no_exp = hs256(SECRET.encode(), iss="alice-iss")
    response = resolve(jwt.on_request(make_ctx(headers=bearer(no_exp))))
    assert response is not None and body(response)["message"] == "token lacks the 'exp' claim"


def test_a_cached_token_within_the_limit_stays_within_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache answers a hit without the check: `exp - now` only shrinks after the token was
    checked, so a token once within the limit stays within it (here, an hour later)."""
    jwt = max_exp_plugin()
    now = time.time()
    token = hs256(SECRET.encode(), iss="alice-iss", exp=int(now) + 3590)
    assert resolve(jwt.on_request(make_ctx(headers=bearer(token)))) is None
    assert token.encode() in jwt.cache
    monkeypatch.setattr(time, "time", lambda: now + 120)
    ctx = make_ctx(headers=bearer(token))
    assert resolve(jwt.on_request(ctx)) is None and ctx.consumer.name == "alice"


def test_a_too_long_token_with_anonymous_is_the_anonymous_consumer() -> None:
    jwt = max_exp_plugin(anonymous="guest")
    long = hs256(SECRET.encode(), iss="alice-iss", exp=int(time.time()) + 7200)
    ctx = make_ctx(headers=bearer(long))
    assert resolve(jwt.on_request(ctx)) is None and ctx.consumer.name == "guest"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"maximum_expiration": 60},
            "routes[0].plugins.jwt.maximum_expiration: add 'exp' to required_claims",
        ),
        (
            {"maximum_expiration": "366d", "required_claims": ["exp"]},
            "routes[0].plugins.jwt.maximum_expiration: at most a year",
        ),
    ],
)
def test_maximum_expiration_config_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        plugin("jwt", {"key_claim_name": "iss", **raw})
    assert any(message in line for line in caught.value.errors), caught.value.errors


def test_maximum_expiration_zero_is_no_limit_as_in_kong() -> None:
    jwt = plugin("jwt", {"key_claim_name": "iss", "maximum_expiration": 0})
    token = hs256(SECRET.encode(), iss="alice-iss", exp=int(time.time()) + 10 * 365 * 86400)
    assert resolve(jwt.on_request(make_ctx(headers=bearer(token)))) is None
