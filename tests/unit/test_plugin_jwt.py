"""The jwt plugin: one test per attack from issue 4, then the features, all without a gateway.

Tokens for attacks are assembled by hand (header, payload, signature) so a test can do what an
attacker does: pick `alg`, sign with the wrong key, add `jku`, flip a bit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from apigate.config.errors import ConfigError
from apigate.plugins.jwt import (
    MAX_TOKEN_BYTES,
    JwtPlugin,
    KeySet,
    VerifyKey,
    header_value,
    http_get,
    parse_jwks,
)
from tests.unit.test_plugin_fakes import (
    body,
    build,
    header,
    make_ctx,
    make_env,
    resolve,
    sent_header,
    settle,
)

SECRET = "s" * 32
CONSUMERS: list[dict[str, Any]] = [
    {"name": "alice", "groups": ["admins"]},
    {"name": "bob", "custom_id": "u-42"},
]


# ============================================================================ helpers
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assemble(header: dict[str, Any], payload: dict[str, Any], sign: Any) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def hs256(key: bytes, header: dict[str, Any] | None = None, **claims: Any) -> str:
    head = {"alg": "HS256", "typ": "JWT", **(header or {})}
    return assemble(head, claims, lambda data: hmac.new(key, data, hashlib.sha256).digest())


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def check(plugin: JwtPlugin, token: str, **kwargs: Any) -> Any:
    ctx = make_ctx(headers=bearer(token), **kwargs)
    return resolve(plugin.on_request(ctx)), ctx


def count_decodes(plugin: JwtPlugin, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each signature check the plugin makes (the cache's misses)."""
    calls: list[int] = []
    real = plugin._decoder.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plugin._decoder, "decode", counting)
    return calls


def assert_invalid(outcome: Any, message: str | None = None) -> None:
    assert outcome is not None and outcome.status == 401, outcome
    assert header(outcome, "WWW-Authenticate") == 'Bearer realm="apigate", error="invalid_token"'
    doc = body(outcome)
    assert doc["error"] == "invalid_token" and doc["request_id"] == "req-1"
    if message is not None:
        assert doc["message"] == message


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.fixture
def rsa_pem_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> str:
    path = tmp_path / "jwt.pem"
    path.write_bytes(pem(rsa_key))
    return str(path)


@pytest.fixture
def hs_plugin() -> JwtPlugin:
    plugin: JwtPlugin = build(
        "jwt",
        {"secret": SECRET, "algorithms": ["HS256"], "leeway": "30s"},
        make_env(CONSUMERS),
    )
    return plugin


def rs_plugin(path: str, **extra: Any) -> JwtPlugin:
    plugin: JwtPlugin = build("jwt", {"public_key_file": path, "algorithms": ["RS256"], **extra})
    return plugin


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**doc, "kid": kid, "use": "sig", "alg": "RS256"}


class JwksServer:
    """A tiny JWKS endpoint on 127.0.0.1, port 0; `doc` may be replaced (key rotation)."""

    def __init__(self, doc: dict[str, Any], *, chunked: bool = False) -> None:
        self.doc = doc
        self.chunked = chunked
        self.hits: list[str] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/jwks.json"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.hits.append(head.split(b" ")[1].decode())
        data = json.dumps(self.doc).encode()
        if self.chunked:
            half = len(data) // 2
            chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                half,
                data[:half],
                len(data) - half,
                data[half:],
            )
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> JwksServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def attacker_server() -> AsyncIterator[JwksServer]:
    async with JwksServer({"keys": []}) as server:
        yield server


# ============================================================================ the attacks
def test_no_token_is_401_with_a_bare_challenge(hs_plugin: JwtPlugin) -> None:
    outcome = resolve(hs_plugin.on_request(make_ctx()))
    assert outcome is not None and outcome.status == 401
    assert header(outcome, "WWW-Authenticate") == 'Bearer realm="apigate"'
    assert body(outcome)["message"] == "missing bearer token"


def test_another_auth_scheme_is_no_token(hs_plugin: JwtPlugin) -> None:
    ctx = make_ctx(headers=[("Authorization", "Basic YWxpY2U6cHc=")])
    outcome = resolve(hs_plugin.on_request(ctx))
    assert outcome is not None and outcome.status == 401


def test_alg_none_never_passes(hs_plugin: JwtPlugin) -> None:
    payload = {"sub": "alice", "exp": time.time() + 60}
    unsigned = assemble({"alg": "none", "typ": "JWT"}, payload, lambda _: b"")
    assert_invalid(check(hs_plugin, unsigned)[0])
    for alg in ("none", "None", "NONE"):  # with a signature segment, so it parses
        token = assemble({"alg": alg}, payload, lambda _: b"sig")
        assert_invalid(check(hs_plugin, token)[0], "algorithm not allowed")


def test_alg_none_cannot_be_configured() -> None:
    with pytest.raises(ConfigError) as info:
        build("jwt", {"secret": SECRET, "algorithms": ["none"]})
    assert "unsupported algorithm 'none'" in str(info.value)


def test_hs256_signed_with_the_rsa_public_key_fails(
    rsa_pem_file: str, rsa_key: rsa.RSAPrivateKey
) -> None:
    public_pem = pem(rsa_key)
    forged = hs256(public_pem, sub="alice", exp=time.time() + 60)
    assert_invalid(check(rs_plugin(rsa_pem_file), forged)[0], "algorithm not allowed")
    # PyJWT itself refuses to use a PEM public key as an HMAC secret:
    with pytest.raises(jwt.InvalidKeyError):
        jwt.decode(forged, public_pem, algorithms=["HS256"])
    # ... and the config cannot pair HS256 with a public key at all.
    with pytest.raises(ConfigError) as info:
        build("jwt", {"public_key_file": rsa_pem_file, "algorithms": ["RS256", "HS256"]})
    assert "HS256 cannot be used with the key in public_key_file" in str(info.value)


def test_kid_path_traversal_does_nothing(hs_plugin: JwtPlugin) -> None:
    # The classic: kid points at /dev/null so the verifier would use an empty key.
    for kid in ("../../../../../../dev/null", "/dev/null", "../../etc/passwd", "x' OR '1'='1"):
        token = hs256(b"", {"kid": kid}, sub="alice", exp=time.time() + 60)
        assert_invalid(check(hs_plugin, token)[0], "invalid signature")
    # A valid token with the same kid still passes: kid is not even a lookup key here.
    good = hs256(SECRET.encode(), {"kid": "../../../../dev/null"}, sub="alice")
    assert check(hs_plugin, good)[0] is None


async def test_kid_path_traversal_in_jwks_is_just_an_unknown_kid(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    async with JwksServer({"keys": [public_jwk(rsa_key, "k1")]}) as server:
        plugin: JwtPlugin = build("jwt", {"jwks_url": server.url, "algorithms": ["RS256"]})
        await plugin.start()
        token = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers={"kid": "../../dev/null"})
        outcome = await settle(plugin.on_request(make_ctx(headers=bearer(token))))
        assert_invalid(outcome, "unknown signing key")
        assert server.hits == ["/jwks.json"]  # no path built from the kid, no extra fetch
        await plugin.jwks.close()  # type: ignore[union-attr]


async def test_jku_x5u_and_embedded_jwk_headers_are_ignored(
    rsa_pem_file: str, attacker_key: rsa.RSAPrivateKey, attacker_server: JwksServer
) -> None:
    attacker_server.doc = {"keys": [public_jwk(attacker_key, "evil")]}
    plugin = rs_plugin(rsa_pem_file)
    headers: list[dict[str, Any]] = [
        {"jku": attacker_server.url, "kid": "evil"},
        {"x5u": attacker_server.url.replace("jwks.json", "cert.pem")},
        {"jwk": public_jwk(attacker_key, "evil")},
    ]
    for extra in headers:
        token = jwt.encode({"sub": "alice"}, attacker_key, "RS256", headers=extra)
        outcome = await settle(plugin.on_request(make_ctx(headers=bearer(token))))
        assert_invalid(outcome, "invalid signature")
    await asyncio.sleep(0.05)
    assert attacker_server.hits == []  # nothing was ever fetched from the token's URLs


def test_expired_beyond_leeway_fails_within_leeway_passes(hs_plugin: JwtPlugin) -> None:
    now = time.time()
    assert_invalid(
        check(hs_plugin, hs256(SECRET.encode(), sub="a", exp=now - 60))[0], "token expired"
    )
    assert check(hs_plugin, hs256(SECRET.encode(), sub="a", exp=now - 10))[0] is None


def test_nbf_in_the_future_fails(hs_plugin: JwtPlugin) -> None:
    now = time.time()
    assert_invalid(
        check(hs_plugin, hs256(SECRET.encode(), sub="a", nbf=now + 120))[0], "token not valid yet"
    )
    assert check(hs_plugin, hs256(SECRET.encode(), sub="a", nbf=now + 5))[0] is None  # leeway


@pytest.mark.parametrize("claim", ["exp", "nbf"])
@pytest.mark.parametrize("value", ["digits", "1.7e9", True, False, [1], {"t": 1}, None])
def test_exp_and_nbf_must_be_json_numbers(hs_plugin: JwtPlugin, claim: str, value: Any) -> None:
    # RFC 7519 §4.1.4/§4.1.5: a NumericDate. PyJWT int()s what it is given, so a string of
    # digits (or a bool) passed it, while the cache only honoured a numeric exp.
    when = int(time.time()) + (3600 if claim == "exp" else -60)
    claims = {claim: str(when) if value == "digits" else value}
    token = hs256(SECRET.encode(), sub="alice", **claims)
    outcome = check(hs_plugin, token)[0]
    assert_invalid(outcome)
    if value == "digits":
        assert body(outcome)["message"] == f"token's {claim!r} claim is not a number"
    assert hs_plugin.cache == {}


def test_a_string_exp_is_not_served_from_the_cache_after_it_expired(
    hs_plugin: JwtPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    token = hs256(SECRET.encode(), sub="alice", exp=str(int(now) + 5))
    first = check(hs_plugin, token)[0]
    monkeypatch.setattr(time, "time", lambda: now + 60)  # exp and the 30 s leeway are past
    assert_invalid(check(hs_plugin, token)[0])
    assert_invalid(first)


def test_numeric_exp_and_nbf_still_pass(hs_plugin: JwtPlugin) -> None:
    now = time.time()
    for claims in ({"exp": now + 60}, {"exp": int(now) + 60}, {"nbf": int(now) - 1}, {}):
        assert check(hs_plugin, hs256(SECRET.encode(), sub="alice", **claims))[0] is None


def test_wrong_issuer_and_audience_fail() -> None:
    plugin = build(
        "jwt", {"secret": SECRET, "algorithms": ["HS256"], "issuer": "me", "audience": "api"}
    )
    key = SECRET.encode()
    assert check(plugin, hs256(key, iss="me", aud="api"))[0] is None
    assert_invalid(check(plugin, hs256(key, iss="evil", aud="api"))[0], "token issuer not accepted")
    assert_invalid(
        check(plugin, hs256(key, iss="me", aud="other"))[0], "token audience not accepted"
    )
    assert_invalid(check(plugin, hs256(key, aud="api"))[0])  # issuer required when configured
    assert_invalid(check(plugin, hs256(key, iss="me"))[0])  # audience required when configured


def test_audience_arrays() -> None:
    key = SECRET.encode()
    one = build("jwt", {"secret": SECRET, "algorithms": ["HS256"], "audience": "api"})
    assert check(one, hs256(key, aud=["other", "api"]))[0] is None
    assert_invalid(check(one, hs256(key, aud=["other", "else"]))[0])
    assert_invalid(check(one, hs256(key, aud=[]))[0])
    many = build("jwt", {"secret": SECRET, "algorithms": ["HS256"], "audience": ["a", "b"]})
    assert check(many, hs256(key, aud="b"))[0] is None
    assert_invalid(check(many, hs256(key, aud="c"))[0])


def test_bit_flipped_signature_and_payload_fail(hs_plugin: JwtPlugin) -> None:
    token = hs256(SECRET.encode(), sub="alice", admin=False)
    head, payload, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    for bit in (0, 7, 100, len(raw) * 8 - 1):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert_invalid(
            check(hs_plugin, f"{head}.{payload}.{b64(bytes(flipped))}")[0], "invalid signature"
        )
    forged_payload = b64(json.dumps({"sub": "alice", "admin": True}).encode())
    assert_invalid(check(hs_plugin, f"{head}.{forged_payload}.{sig}")[0], "invalid signature")


def test_two_or_four_segments_fail(hs_plugin: JwtPlugin) -> None:
    token = hs256(SECRET.encode(), sub="alice")
    head, payload, sig = token.split(".")
    for bad in (
        f"{head}.{payload}",
        f"{head}.{payload}.{sig}.{sig}",
        f"{head}..{sig}",
        "abc",
        f"{head}.{payload}.{sig}.",
    ):
        assert_invalid(check(hs_plugin, bad)[0], "malformed token")


def test_bad_base64_fails(hs_plugin: JwtPlugin) -> None:
    token = hs256(SECRET.encode(), sub="alice")
    head, payload, sig = token.split(".")
    # Python's base64 decoder would skip these characters and still verify the signature.
    for bad in (
        f"{head}.{payload}.{sig[:10]}!{sig[10:]}",
        f"{head}.{payload}.{sig}==",
        f"{head}.{payload}+/.{sig}",
        f"{head}x.{payload}.{sig}",
        f"{b64(b'not json')}.{payload}.{sig}",
        f"{b64(b'[1]')}.{payload}.{sig}",
    ):
        assert_invalid(check(hs_plugin, bad)[0])


def test_huge_token_is_refused_without_parsing(
    hs_plugin: JwtPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object) -> None:
        raise AssertionError("a huge token must not be parsed")

    monkeypatch.setattr(jwt, "get_unverified_header", explode)
    big = hs256(SECRET.encode(), sub="a", pad="x" * 100_000)
    assert len(big) > 100_000
    assert_invalid(check(hs_plugin, big)[0], "token too large")
    just_over = "a" * (MAX_TOKEN_BYTES + 1)
    assert_invalid(check(hs_plugin, just_over)[0], "token too large")


def test_two_different_tokens_at_once_fail() -> None:
    plugin = build(
        "jwt",
        {
            "secret": SECRET,
            "algorithms": ["HS256"],
            "cookie": "session",
            "query_param": "access_token",
        },
    )
    key = SECRET.encode()
    t1, t2 = hs256(key, sub="alice"), hs256(key, sub="bob")
    cases = [
        make_ctx(headers=[*bearer(t1), ("Cookie", f"a=1; session={t2}")]),
        make_ctx(headers=bearer(t1), query=f"access_token={t2}".encode()),
        make_ctx(headers=[*bearer(t1), *bearer(t2)]),
    ]
    for ctx in cases:
        assert_invalid(resolve(plugin.on_request(ctx)), "several different tokens in one request")
    same = make_ctx(headers=[*bearer(t1), ("Cookie", f"session={t1}")])
    assert resolve(plugin.on_request(same)) is None
    assert resolve(plugin.on_request(make_ctx(headers=[("Cookie", f"session={t2}")]))) is None
    only_query = make_ctx(query=f"x=1&access_token={t1}".encode())
    assert resolve(plugin.on_request(only_query)) is None


def test_unexpected_errors_are_401_not_500(
    hs_plugin: JwtPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(hs_plugin._decoder, "decode", broken)
    assert_invalid(check(hs_plugin, hs256(SECRET.encode(), sub="a"))[0], "invalid token")


# ============================================================================ features
def test_valid_token_sets_claims_and_consumer(hs_plugin: JwtPlugin) -> None:
    outcome, ctx = check(hs_plugin, hs256(SECRET.encode(), sub="alice", scope="read"))
    assert outcome is None
    assert ctx.vars["jwt_claims"]["scope"] == "read"
    assert ctx.consumer.name == "alice"
    _, ctx = check(hs_plugin, hs256(SECRET.encode(), sub="u-42"))
    assert ctx.consumer.name == "bob"  # by custom_id
    _, ctx = check(hs_plugin, hs256(SECRET.encode(), sub="nobody"))
    assert ctx.consumer is None and ctx.vars["jwt_claims"]["sub"] == "nobody"


def test_consumer_claim_is_configurable() -> None:
    plugin = build(
        "jwt",
        {"secret": SECRET, "algorithms": ["HS256"], "consumer_claim": "user"},
        make_env(CONSUMERS),
    )
    _, ctx = check(plugin, hs256(SECRET.encode(), sub="x", user="alice"))
    assert ctx.consumer.name == "alice"


def test_forward_claims_replace_client_sent_headers() -> None:
    plugin = build(
        "jwt",
        {
            "secret": SECRET,
            "algorithms": ["HS256"],
            "forward_claims": {"sub": "X-User-Id", "roles": "X-Roles", "tenant": "X-Tenant"},
        },
    )
    token = hs256(SECRET.encode(), sub="alice", roles=["a", "b"])
    spoofed = [("x-user-id", "admin"), ("X-TENANT", "other"), ("X-Other", "kept")]
    ctx = make_ctx(headers=[*bearer(token), *spoofed])
    assert resolve(plugin.on_request(ctx)) is None
    req = ctx.request
    assert sent_header(req, "X-User-Id") == ["alice"]
    assert sent_header(req, "X-Roles") == ["a,b"]
    assert sent_header(req, "X-Tenant") == []  # claim absent: the client's copy is gone too
    assert sent_header(req, "X-Other") == ["kept"]
    # the same token again comes from the cache and gets the same treatment
    ctx = make_ctx(headers=[*bearer(token), *spoofed])
    assert resolve(plugin.on_request(ctx)) is None
    assert sent_header(ctx.request, "X-User-Id") == ["alice"]


def test_forward_claims_remove_client_sent_underscore_variants() -> None:
    # WSGI, CGI and PHP read X_Role as HTTP_X_ROLE, exactly like X-Role.
    plugin = build(
        "jwt",
        {
            "secret": SECRET,
            "algorithms": ["HS256"],
            "forward_claims": {"role": "X-Role", "tenant": "X_Tenant_Id"},
        },
    )
    token = hs256(SECRET.encode(), sub="alice", role="user", tenant="t1")
    spoofed = [
        ("X_Role", "admin3"),
        ("x_role", "admin4"),
        ("X-ROLE", "admin5"),
        ("x-tenant-id", "other"),
        ("X_TENANT-ID", "other2"),
        ("X_Other", "kept"),
        ("XRole", "kept"),
    ]
    for _ in range(2):  # verified, then from the cache
        ctx = make_ctx(headers=[*bearer(token), *spoofed])
        assert resolve(plugin.on_request(ctx)) is None
        names = [(n.decode(), v.decode()) for n, v in ctx.request.headers]
        assert [(n, v) for n, v in names if n != "Authorization"] == [
            ("X_Other", "kept"),
            ("XRole", "kept"),
            ("X-Role", "user"),
            ("X_Tenant_Id", "t1"),
        ]


def test_claim_header_values_cannot_inject() -> None:
    assert header_value("plain") == b"plain"
    assert header_value("a\r\nX-Evil: 1") == b'"a\\r\\nX-Evil: 1"'
    assert header_value("caf\u00e9") == b'"caf\\u00e9"'
    assert header_value({"a": 1}) == b'{"a":1}'
    assert header_value(7) == b"7"
    assert header_value(True) == b"true"


def test_required_claims() -> None:
    plugin = build(
        "jwt", {"secret": SECRET, "algorithms": ["HS256"], "required_claims": ["exp", "tenant"]}
    )
    key = SECRET.encode()
    assert check(plugin, hs256(key, exp=time.time() + 60, tenant="t"))[0] is None
    assert_invalid(check(plugin, hs256(key, tenant="t"))[0], "token lacks the 'exp' claim")
    assert_invalid(
        check(plugin, hs256(key, exp=time.time() + 60))[0], "token lacks the 'tenant' claim"
    )


def test_custom_header_with_or_without_bearer() -> None:
    plugin = build("jwt", {"secret": SECRET, "algorithms": ["HS256"], "header": "X-Token"})
    token = hs256(SECRET.encode(), sub="a")
    assert resolve(plugin.on_request(make_ctx(headers=[("x-token", token)]))) is None
    assert resolve(plugin.on_request(make_ctx(headers=[("X-Token", f"Bearer {token}")]))) is None
    assert resolve(plugin.on_request(make_ctx(headers=bearer(token)))) is not None


def test_verified_tokens_are_cached_until_exp(
    hs_plugin: JwtPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_decodes(hs_plugin, monkeypatch)
    token = hs256(SECRET.encode(), sub="alice", exp=time.time() + 3600)
    for _ in range(5):
        assert check(hs_plugin, token)[0] is None
    assert len(calls) == 1
    entry = hs_plugin.cache[token.encode()]
    assert entry.expires <= time.time() + 300  # re-checked at least every 5 minutes
    entry.expires = time.time() - 1  # as if exp (+ leeway) had passed
    assert check(hs_plugin, token)[0] is None
    assert len(calls) == 2


def test_cache_entries_end_at_exp_plus_leeway(hs_plugin: JwtPlugin) -> None:
    exp = int(time.time()) + 100
    token = hs256(SECRET.encode(), sub="alice", exp=exp)
    assert check(hs_plugin, token)[0] is None
    assert hs_plugin.cache[token.encode()].expires == exp + 30  # leeway: 30s
    no_exp = hs256(SECRET.encode(), sub="alice")
    assert check(hs_plugin, no_exp)[0] is None
    assert hs_plugin.cache[no_exp.encode()].expires <= time.time() + 300


def test_a_fractional_exp_is_cached_no_longer_than_pyjwt_accepts_it(hs_plugin: JwtPlugin) -> None:
    exp = int(time.time()) + 100.75  # PyJWT compares int(exp): valid until second +100
    token = hs256(SECRET.encode(), sub="alice", exp=exp)
    assert check(hs_plugin, token)[0] is None
    assert hs_plugin.cache[token.encode()].expires == int(exp) + 30


def test_cache_is_bounded() -> None:
    plugin = build("jwt", {"secret": SECRET, "algorithms": ["HS256"], "cache_size": 3})
    tokens = [hs256(SECRET.encode(), sub=f"u{i}") for i in range(5)]
    for token in tokens:
        assert check(plugin, token)[0] is None
    assert list(plugin.cache) == [t.encode() for t in tokens[2:]]


def test_invalid_tokens_are_not_cached(hs_plugin: JwtPlugin) -> None:
    check(hs_plugin, hs256(b"x" * 32, sub="a"))
    assert hs_plugin.cache == {}


@pytest.mark.parametrize("alg", ["RS256", "PS384", "ES256", "EdDSA"])
def test_asymmetric_algorithms(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    private: Any
    if alg.startswith(("RS", "PS")):
        private = rsa_key
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "key.pem"
    path.write_bytes(pem(private))
    plugin = build("jwt", {"public_key_file": str(path), "algorithms": [alg]})
    assert check(plugin, jwt.encode({"sub": "a"}, private, alg))[0] is None
    other = jwt.encode({"sub": "a"}, SECRET, "HS256")
    assert_invalid(check(plugin, other)[0], "algorithm not allowed")


def test_es256_key_cannot_be_used_for_es384(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError) as info:
        build("jwt", {"public_key_file": str(path), "algorithms": ["ES384"]})
    assert "ES384 cannot be used with the key in public_key_file" in str(info.value)


def test_config_errors(tmp_path: Path) -> None:
    def errors(raw: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as info:
            build("jwt", raw)
        return str(info.value)

    assert "set exactly one of secret, public_key_file, jwks_url" in errors(
        {"algorithms": ["HS256"]}
    )
    assert "set exactly one of" in errors(
        {"secret": SECRET, "jwks_url": "https://x/jwks", "algorithms": ["RS256"]}
    )
    assert "algorithms: required" in errors({"secret": SECRET})
    assert "10 bytes is too short for HS256" in errors(
        {"secret": "0123456789", "algorithms": ["HS256"]}
    )
    assert "too short for HS512" in errors({"secret": SECRET, "algorithms": ["HS512"]})
    assert "RS256 needs a public key, not a secret" in errors(
        {"secret": SECRET, "algorithms": ["RS256"]}
    )
    assert "plain http is only allowed for a loopback JWKS URL" in errors(
        {"jwks_url": "http://idp.example.com/jwks", "algorithms": ["RS256"]}
    )
    assert "HMAC algorithms cannot use a JWKS URL" in errors(
        {"jwks_url": "https://idp.example.com/jwks", "algorithms": ["HS256"]}
    )
    assert "cannot read" in errors(
        {"public_key_file": str(tmp_path / "missing.pem"), "algorithms": ["RS256"]}
    )
    (tmp_path / "junk.pem").write_text("hello")
    assert "is not a PEM public key" in errors(
        {"public_key_file": str(tmp_path / "junk.pem"), "algorithms": ["RS256"]}
    )
    assert "secrt: unknown key; did you mean 'secret'?" in errors(
        {"secrt": SECRET, "algorithms": ["HS256"]}
    )
    assert "cannot carry a claim" in errors(
        {"secret": SECRET, "algorithms": ["HS256"], "forward_claims": {"sub": "Host"}}
    )


# ============================================================================ JWKS
async def test_jwks_rotation_is_picked_up_without_restart(rsa_key: rsa.RSAPrivateKey) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with JwksServer({"keys": [public_jwk(rsa_key, "k1")]}) as server:
        plugin: JwtPlugin = build(
            "jwt", {"jwks_url": server.url, "algorithms": ["RS256"], "jwks_min_refresh": "0s"}
        )
        await plugin.start()
        old = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers={"kid": "k1"})
        assert await settle(plugin.on_request(make_ctx(headers=bearer(old)))) is None
        assert len(server.hits) == 1
        server.doc = {"keys": [public_jwk(new_key, "k2")]}  # the IdP rotates its key
        new = jwt.encode({"sub": "a"}, new_key, "RS256", headers={"kid": "k2"})
        outcome = plugin.on_request(make_ctx(headers=bearer(new)))
        assert asyncio.iscoroutine(outcome)  # an unknown kid waits for one refetch
        assert await settle(outcome) is None
        assert len(server.hits) == 2
        # the retired key no longer verifies new tokens (cached ones expire on their own)
        fresh_old = jwt.encode({"sub": "b"}, rsa_key, "RS256", headers={"kid": "k1"})
        assert_invalid(await settle(plugin.on_request(make_ctx(headers=bearer(fresh_old)))))
        await plugin.jwks.close()  # type: ignore[union-attr]


async def test_jwks_refetch_is_rate_limited(rsa_key: rsa.RSAPrivateKey) -> None:
    async with JwksServer({"keys": [public_jwk(rsa_key, "k1")]}, chunked=True) as server:
        plugin: JwtPlugin = build("jwt", {"jwks_url": server.url, "algorithms": ["RS256"]})
        await plugin.start()
        assert len(plugin.jwks.keys) == 1  # type: ignore[union-attr]
        for i in range(20):
            token = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers={"kid": f"unknown-{i}"})
            outcome = plugin.on_request(make_ctx(headers=bearer(token)))
            assert not asyncio.iscoroutine(outcome)  # answered at once, no fetch
            assert_invalid(outcome, "unknown signing key")
        assert len(server.hits) == 1
        await plugin.jwks.close()  # type: ignore[union-attr]


async def test_concurrent_unknown_kids_share_one_fetch(rsa_key: rsa.RSAPrivateKey) -> None:
    async with JwksServer({"keys": []}) as server:
        plugin: JwtPlugin = build(
            "jwt", {"jwks_url": server.url, "algorithms": ["RS256"], "jwks_min_refresh": "0s"}
        )
        await plugin.start()
        server.doc = {"keys": [public_jwk(rsa_key, "k1")]}
        token = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers={"kid": "k1"})
        outcomes = await asyncio.gather(
            *(settle(plugin.on_request(make_ctx(headers=bearer(token)))) for _ in range(10))
        )
        assert outcomes == [None] * 10
        assert len(server.hits) == 2  # start + one shared refetch
        await plugin.jwks.close()  # type: ignore[union-attr]


async def test_unreachable_jwks_is_401_not_500() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    plugin: JwtPlugin = build(
        "jwt",
        {
            "jwks_url": f"http://127.0.0.1:{port}/jwks",
            "algorithms": ["RS256"],
            "jwks_timeout": "200ms",
        },
    )
    await plugin.start()  # logs, does not raise
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"sub": "a"}, key, "RS256", headers={"kid": "k"})
    assert_invalid(await settle(plugin.on_request(make_ctx(headers=bearer(token)))))


async def test_a_jwks_key_without_kid_verifies_tokens_that_carry_a_kid(
    rsa_key: rsa.RSAPrivateKey, attacker_key: rsa.RSAPrivateKey
) -> None:
    kidless = {k: v for k, v in public_jwk(rsa_key, "unused").items() if k != "kid"}
    async with JwksServer({"keys": [kidless]}) as server:
        plugin: JwtPlugin = build("jwt", {"jwks_url": server.url, "algorithms": ["RS256"]})
        await plugin.start()
        for headers in ({}, {"kid": "k1"}, {"kid": "k2"}):
            token = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers=headers)
            outcome = plugin.on_request(make_ctx(headers=bearer(token)))
            assert not asyncio.iscoroutine(outcome)  # no refetch: the key is in the set
            assert outcome is None
        forged = jwt.encode({"sub": "a"}, attacker_key, "RS256", headers={"kid": "k1"})
        assert_invalid(plugin.on_request(make_ctx(headers=bearer(forged))), "invalid signature")
        assert server.hits == ["/jwks.json"]
        await plugin.jwks.close()  # type: ignore[union-attr]


async def test_a_new_kid_is_fetched_when_the_kidless_keys_do_not_verify_it(
    rsa_key: rsa.RSAPrivateKey, attacker_key: rsa.RSAPrivateKey
) -> None:
    """A rotation in a JWKS that also publishes a kid-less key: the new kid fell back to that
    key, failed, and was refused until jwks_max_age (an hour) instead of fetching the set."""
    kidless = {k: v for k, v in public_jwk(rsa_key, "unused").items() if k != "kid"}
    rotated = attacker_key  # (any second key: the one published with the new kid)
    async with JwksServer({"keys": [kidless]}) as server:
        plugin: JwtPlugin = build(
            "jwt", {"jwks_url": server.url, "algorithms": ["RS256"], "jwks_min_refresh": "0s"}
        )
        await plugin.start()
        server.doc = {"keys": [kidless, public_jwk(rotated, "k2")]}
        token = jwt.encode({"sub": "a"}, rotated, "RS256", headers={"kid": "k2"})
        outcome = plugin.on_request(make_ctx(headers=bearer(token)))
        assert asyncio.iscoroutine(outcome)  # the kid-less key failed: fetch the set again
        assert await outcome is None
        assert len(server.hits) == 2
        # the kid-less key still verifies what it signs, whatever kid, with no fetch
        own = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers={"kid": "k9"})
        assert plugin.on_request(make_ctx(headers=bearer(own))) is None
        assert len(server.hits) == 2
        # a forged kid costs one fetch (jwks_min_refresh bounds them) and is refused
        forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        bad = jwt.encode({"sub": "a"}, forged, "RS256", headers={"kid": "k3"})
        assert_invalid(await settle(plugin.on_request(make_ctx(headers=bearer(bad)))))
        assert len(server.hits) == 3
        await plugin.jwks.close()  # type: ignore[union-attr]


async def test_a_kid_in_the_jwks_is_not_tried_on_the_kidless_keys(
    rsa_key: rsa.RSAPrivateKey, attacker_key: rsa.RSAPrivateKey
) -> None:
    kidless = {k: v for k, v in public_jwk(rsa_key, "unused").items() if k != "kid"}
    doc = {"keys": [kidless, public_jwk(attacker_key, "k1")]}
    async with JwksServer(doc) as server:
        plugin: JwtPlugin = build("jwt", {"jwks_url": server.url, "algorithms": ["RS256"]})
        await plugin.start()
        token = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers={"kid": "k1"})
        assert_invalid(plugin.on_request(make_ctx(headers=bearer(token))), "invalid signature")
        own = jwt.encode({"sub": "a"}, attacker_key, "RS256", headers={"kid": "k1"})
        assert plugin.on_request(make_ctx(headers=bearer(own))) is None
        await plugin.jwks.close()  # type: ignore[union-attr]


def test_key_set_candidates(rsa_key: rsa.RSAPrivateKey) -> None:
    public = rsa_key.public_key()
    k1 = VerifyKey(public, frozenset({"RS256"}), "k1")
    ps = VerifyKey(public, frozenset({"PS256"}), "ps")
    kidless = VerifyKey(public, frozenset({"RS256", "PS256"}))
    keys = KeySet([k1, ps, kidless], use_kid=True)
    assert keys.candidates("k1", "RS256") == [k1]
    assert keys.candidates("ps", "PS256") == [ps]
    assert keys.candidates("ps", "RS256") == []  # the named key cannot do RS256: no fallback
    assert keys.candidates("other", "RS256") == [kidless]
    assert keys.candidates("other", "PS256") == [kidless]
    assert keys.candidates(None, "RS256") == [k1, kidless]
    for alg in ("HS256", "none", "ES256"):  # never a key of another family, never alg none
        assert keys.candidates("other", alg) == []
        assert keys.candidates(None, alg) == []
    assert KeySet([k1], use_kid=True).candidates("other", "RS256") == []  # -> refetch


def test_parse_jwks_skips_what_it_cannot_use(rsa_key: rsa.RSAPrivateKey) -> None:
    good = public_jwk(rsa_key, "k1")
    doc = {
        "keys": [
            good,
            {**good, "kid": "enc", "use": "enc"},
            {**good, "kid": "ps", "alg": "PS256"},  # not in the allowed algorithms
            {"kty": "oct", "k": b64(b"x" * 32), "kid": "sym"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "junk",
        ]
    }
    keys = parse_jwks(doc, frozenset({"RS256"}))
    assert [k.kid for k in keys] == ["k1"]
    assert parse_jwks({"keys": "nope"}, frozenset({"RS256"})) == []
    assert parse_jwks([], frozenset({"RS256"})) == []


async def test_http_get_refuses_errors_and_huge_bodies() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/missing" in head:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        elif b"/huge" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n")
        else:
            writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"keys": []}')  # until EOF
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        assert await http_get(base + "/ok", 1.0) == b'{"keys": []}'
        with pytest.raises(OSError, match="HTTP status 404"):
            await http_get(base + "/missing", 1.0)
        with pytest.raises(OSError, match="too large"):
            await http_get(base + "/huge", 1.0)
    finally:
        server.close()
        await server.wait_closed()


async def test_jwks_keys_are_shared_by_later_snapshots(rsa_key: rsa.RSAPrivateKey) -> None:
    env = make_env()
    async with JwksServer({"keys": [public_jwk(rsa_key, "k1")]}) as server:
        raw = {"jwks_url": server.url, "algorithms": ["RS256"]}
        first: JwtPlugin = build("jwt", raw, env)
        await first.start()
        second: JwtPlugin = build("jwt", raw, env)  # a reload with the same settings
        await second.start()
        assert second.jwks is first.jwks
        assert len(server.hits) == 1
        token = jwt.encode({"sub": "a"}, rsa_key, "RS256", headers={"kid": "k1"})
        assert second.on_request(make_ctx(headers=bearer(token))) is None
        await first.close()
        await second.close()


# ============================================================================ security review
def test_a_second_authorization_line_is_401_whatever_its_scheme(hs_plugin: JwtPlugin) -> None:
    # Authorization is a singleton field (RFC 9110 §5.3): a line the plugin skipped as "not
    # Bearer" used to reach the upstream next to the one it verified.
    good = hs256(SECRET.encode(), sub="alice")
    forged = hs256(b"w" * 32, sub="root")
    for first in (forged, f"Bearer\t{forged}", f"Basic {forged}", f"Bearer {good}"):
        ctx = make_ctx(headers=[("Authorization", first), *bearer(good)])
        assert_invalid(resolve(hs_plugin.on_request(ctx)), "several Authorization headers")
        assert "jwt_claims" not in ctx.vars
    # the same, once the good token is in the verified-token cache
    assert check(hs_plugin, good)[0] is None
    ctx = make_ctx(headers=[*bearer(good), ("authorization", forged)])
    assert_invalid(resolve(hs_plugin.on_request(ctx)), "several Authorization headers")


def test_a_query_parameter_php_reads_as_the_token_parameter_is_a_second_token() -> None:
    # PHP folds '.', ' ' and '[' in parameter names to '_': `access.token` is its access_token
    plugin = build(
        "jwt", {"secret": SECRET, "algorithms": ["HS256"], "query_param": "access_token"}
    )
    key = SECRET.encode()
    good, forged = hs256(key, sub="alice"), hs256(b"w" * 32, sub="root")
    for spelling in (
        "access.token",
        "access token",
        "access+token",
        "access[token",
        "%20access.token",
    ):
        for query in (f"access_token={good}&{spelling}={forged}", f"{spelling}={good}"):
            ctx = make_ctx(query=query.encode())
            outcome = resolve(plugin.on_request(ctx))
            assert_invalid(outcome, "several different tokens in one request")
        ctx = make_ctx(headers=bearer(good), query=f"{spelling}={good}".encode())
        assert_invalid(resolve(plugin.on_request(ctx)), "several different tokens in one request")
    assert resolve(plugin.on_request(make_ctx(query=f"access_token={good}".encode()))) is None
    unrelated = make_ctx(query=f"access_token={good}&access_tokens=1&access=2".encode())
    assert resolve(plugin.on_request(unrelated)) is None
