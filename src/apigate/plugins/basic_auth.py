"""HTTP Basic authentication (`basic_auth`) against `consumers[].basic_auth`.

The file holds password *hashes*, never passwords:

    sha256:<64 hex digits>                          fast, unsalted: for generated secrets only
    pbkdf2_sha256$<iterations>$<salt>$<base64 hash>  Django's format, via hashlib
    $2b$12$...                                      bcrypt, when the `bcrypt` package is installed

Every comparison is constant-time (`hmac.compare_digest`). A slow hash (pbkdf2, bcrypt) is
checked in a worker thread so the event loop keeps serving, and a successful check is remembered
for `cache_ttl` under an HMAC of the credentials with a per-process random key, so a client
that sends the same header on every request pays the slow hash once a minute, not per request.

An unknown username costs what a known one does: its password is checked, the same way, against
a dummy hash of the scheme and cost of the slowest configured hash (random, made when the plugin
is built), so the time of a 401 does not tell which usernames exist. (With hashes of different
costs, users with a cheaper hash still answer faster than unknown ones: give them all one cost.)

`anonymous` (Kong's): the consumer a request without valid credentials is let through as,
unless an earlier auth plugin authenticated a real consumer (apigate.plugins.identity). Kong's
basic-auth has no `run_on_preflight`, so neither has this one: a browser's preflight carries no
credentials, and the `cors` plugin answers it before any auth plugin runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import importlib
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

from pydantic import Field

from apigate.config.errors import ConfigError
from apigate.config.schema import NonEmptyStr
from apigate.config.units import NonNegativeDuration
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import (
    BASIC_CHALLENGE,
    AnonymousAccess,
    Identity,
    StrictPluginConfig,
    authenticate,
    refuse,
    with_kong_checks,
)

_CACHE_MAX = 10_000
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# Rough seconds per check, only to rank hashes of different schemes (which one the dummy check
# copies): one pbkdf2-sha256 iteration per 32-byte block, one bcrypt round (2**cost of them).
_PBKDF2_ITERATION_SECONDS: Final = 0.3e-6
_BCRYPT_ROUND_SECONDS: Final = 60e-6

Verifier = Callable[[bytes], bool]


class BasicAuthConfig(StrictPluginConfig):
    hide_credentials: bool = True
    cache_ttl: NonNegativeDuration = 60.0
    max_concurrent_checks: int = Field(default=8, ge=1)  # slow hashes in flight at once
    anonymous: NonEmptyStr | None = None  # a consumer's name: who a request without one is


def make_verifier(stored: str) -> tuple[Verifier, bool]:
    """(check(password) -> bool, is_slow) for a stored hash; raises ValueError if unusable."""
    if stored.startswith("sha256:"):
        want = stored[7:].lower()
        if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
            raise ValueError("sha256: needs 64 hex digits")
        expected = bytes.fromhex(want)
        return (lambda pw: hmac.compare_digest(hashlib.sha256(pw).digest(), expected)), False
    if stored.startswith("pbkdf2_sha256$"):
        return _pbkdf2_verifier(stored), True
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        if not _BCRYPT_HASH.fullmatch(stored):
            raise ValueError("a bcrypt hash is $2b$<cost>$<53 characters>")
        try:
            bcrypt: Any = importlib.import_module("bcrypt")
        except ImportError:
            raise ValueError("a bcrypt hash needs the 'bcrypt' package installed") from None
        hashed = stored.encode()
        return (lambda pw: bool(bcrypt.checkpw(pw, hashed))), True
    raise ValueError("unknown hash format: use sha256:<hex>, pbkdf2_sha256$... or $2b$...")


def _pbkdf2_parts(stored: str) -> tuple[int, str, bytes]:
    """(iterations, salt, expected hash) of a pbkdf2_sha256 hash; ValueError if malformed."""
    parts = stored.split("$")
    if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError("pbkdf2_sha256 needs pbkdf2_sha256$<iterations>$<salt>$<hash>")
    try:
        expected = base64.b64decode(parts[3], validate=True)
    except binascii.Error:
        raise ValueError("pbkdf2_sha256: the hash is not base64") from None
    if not expected:
        raise ValueError("pbkdf2_sha256: the hash is empty")
    return int(parts[1]), parts[2], expected


def _pbkdf2_verifier(stored: str) -> Verifier:
    iterations, salt_text, expected = _pbkdf2_parts(stored)
    salt = salt_text.encode()

    def check(password: bytes) -> bool:
        got = hashlib.pbkdf2_hmac("sha256", password, salt, iterations, len(expected))
        return hmac.compare_digest(got, expected)

    return check


def hash_cost(stored: str) -> float:
    """Roughly how many seconds a check against `stored` (a usable hash) takes."""
    if stored.startswith("pbkdf2_sha256$"):
        iterations, _, expected = _pbkdf2_parts(stored)
        blocks = max(1, -(-len(expected) // 32))  # pbkdf2 runs once per 32-byte output block
        return iterations * blocks * _PBKDF2_ITERATION_SECONDS
    bcrypt = _BCRYPT_HASH.fullmatch(stored)
    if bcrypt is not None:
        return float(2 ** int(bcrypt[1])) * _BCRYPT_ROUND_SECONDS
    return 0.0  # sha256: about a microsecond


def lookalike_hash(stored: str) -> str:
    """A hash of the same scheme and cost as `stored` (a usable hash) that no password matches:
    its digest is random. Checking a password against it takes as long as against `stored`."""
    if stored.startswith("pbkdf2_sha256$"):
        iterations, salt, expected = _pbkdf2_parts(stored)
        digest = base64.b64encode(os.urandom(len(expected))).decode()
        return f"pbkdf2_sha256${iterations}${secrets.token_hex(len(salt))[: len(salt)]}${digest}"
    if _BCRYPT_HASH.fullmatch(stored):
        # `$2b$<cost>$` and the 22-character salt kept (a salt that surely decodes), the
        # 31-character digest random
        digest = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31))
        return stored[:29] + digest
    return "sha256:" + os.urandom(32).hex()


def parse_basic(value: bytes) -> tuple[bytes, bytes] | None:
    """(username, password) from an `Authorization: Basic ...` value, None if malformed."""
    if value[:6].lower() != b"basic ":
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True)
    except binascii.Error:
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


class BasicAuthPlugin(Plugin):
    name = "basic_auth"
    priority = 1100
    identifies_consumers = True
    Config = BasicAuthConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, BasicAuthConfig)
        self.cfg = config
        # username -> (who: the consumer, named upstream by this username, check, is_slow)
        self.users: dict[bytes, tuple[Identity, Verifier, bool]] = {}
        errors = []
        hashes: list[str] = []
        for index, consumer in enumerate(env.config.consumers):
            creds = consumer.basic_auth
            if creds is None:
                continue
            try:
                check, slow = make_verifier(creds.password)
            except ValueError as exc:
                errors.append(f"consumers[{index}].basic_auth.password: {exc}")
                continue
            identity = Identity(consumer, credential_id=creds.username)
            self.users[creds.username.encode()] = (identity, check, slow)
            hashes.append(creds.password)
        if errors:
            raise ConfigError(errors)
        # What an unknown username is checked against: as slow as the slowest known one.
        slowest = max(hashes, key=hash_cost, default="sha256:")  # no users: a fast dummy
        self._dummy, self._dummy_slow = make_verifier(lookalike_hash(slowest))
        self._cache_key = os.urandom(32)
        self._cache: dict[bytes, tuple[Identity, float]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._anonymous = AnonymousAccess.of(config, env.config.consumers)
        # the hook: with `anonymous`, Kong's check first; without, the credentials' check alone
        self.on_request: Callable[[Any], Any] = with_kong_checks(
            self._check, self._anonymous, skip_preflight=False
        )

    def _check(self, ctx: Any) -> Any:
        req = ctx.request
        values = [v for n, v in req.headers if len(n) == 13 and n.lower() == b"authorization"]
        if not values:
            return self._deny(ctx, "missing credentials")
        if len(values) > 1:
            return self._deny(ctx, "several Authorization headers")
        creds = parse_basic(values[0])
        if creds is None:
            return self._deny(ctx, "malformed Basic credentials")
        user, password = creds
        memo = hmac.new(self._cache_key, user + b"\x00" + password, hashlib.sha256).digest()
        hit = self._cache.get(memo)
        if hit is not None and hit[1] > time.monotonic():
            self._accept(ctx, hit[0])
            return None
        entry = self.users.get(user)
        if entry is None:
            return self._refuse_unknown(ctx, password)
        identity, check, slow = entry
        if slow:
            return self._check_slowly(ctx, identity, check, password, memo)
        if not check(password):
            return self._deny(ctx, "invalid credentials")
        self._remember(memo, identity)
        self._accept(ctx, identity)
        return None

    def _refuse_unknown(self, ctx: Any, password: bytes) -> Any:
        """401 for an unknown username, after the work a known one costs (the dummy check, by
        the same path as a real one), so that the answer's timing says nothing."""
        if self._dummy_slow:
            return self._refuse_slowly(ctx, password)
        self._dummy(password)
        return self._deny(ctx, "invalid credentials")

    async def _refuse_slowly(self, ctx: Any, password: bytes) -> Response | None:
        await self._run_slow_check(self._dummy, password)
        return self._deny(ctx, "invalid credentials")

    async def _check_slowly(
        self, ctx: Any, identity: Identity, check: Verifier, password: bytes, memo: bytes
    ) -> Response | None:
        if not await self._run_slow_check(check, password):
            return self._deny(ctx, "invalid credentials")
        self._remember(memo, identity)
        self._accept(ctx, identity)
        return None

    async def _run_slow_check(self, check: Verifier, password: bytes) -> bool:
        """A slow hash in a worker thread, at most `max_concurrent_checks` at once."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_concurrent_checks)
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(None, check, password)

    def _remember(self, memo: bytes, identity: Identity) -> None:
        if self.cfg.cache_ttl <= 0:
            return
        cache = self._cache
        if len(cache) >= _CACHE_MAX:
            cache.pop(next(iter(cache)))
        cache[memo] = (identity, time.monotonic() + self.cfg.cache_ttl)

    def _accept(self, ctx: Any, identity: Identity) -> None:
        authenticate(ctx, identity)
        if self.cfg.hide_credentials:
            ctx.request.remove_header("authorization")

    def _deny(self, ctx: Any, message: str) -> Response | None:
        """A 401, or the anonymous consumer (wrong credentials hidden from the upstream too,
        as Kong hides them)."""
        if self._anonymous is not None and self.cfg.hide_credentials:
            ctx.request.remove_header("authorization")
        return refuse(ctx, self._anonymous, message, BASIC_CHALLENGE)

    def __repr__(self) -> str:
        return f"<BasicAuthPlugin {len(self.users)} users>"
