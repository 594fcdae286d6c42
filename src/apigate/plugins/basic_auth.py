"""HTTP Basic authentication (`basic_auth`) against `consumers[].basic_auth`.

The file holds password *hashes*, never passwords:

    sha256:<64 hex digits>                          fast, unsalted: for generated secrets only
    pbkdf2_sha256$<iterations>$<salt>$<base64 hash>  Django's format, via hashlib
    $2b$12$...                                      bcrypt, when the `bcrypt` package is installed

Every comparison is constant-time (`hmac.compare_digest`). A slow hash (pbkdf2, bcrypt) is
checked in a worker thread so the event loop keeps serving, and a successful check is remembered
for `cache_ttl` under an HMAC of the credentials with a per-process random key, so a client
that sends the same header on every request pays the slow hash once a minute, not per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import importlib
import os
import time
from collections.abc import Callable
from typing import Any

from pydantic import Field

from apigate.config.errors import ConfigError
from apigate.config.schema import ConsumerConfig
from apigate.config.units import NonNegativeDuration
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import BASIC_CHALLENGE, StrictPluginConfig, unauthorized

_CACHE_MAX = 10_000
_DUMMY = hashlib.sha256(b"apigate-dummy").hexdigest()

Verifier = Callable[[bytes], bool]


class BasicAuthConfig(StrictPluginConfig):
    hide_credentials: bool = True
    cache_ttl: NonNegativeDuration = 60.0
    max_concurrent_checks: int = Field(default=8, ge=1)  # slow hashes in flight at once


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
        try:
            bcrypt: Any = importlib.import_module("bcrypt")
        except ImportError:
            raise ValueError("a bcrypt hash needs the 'bcrypt' package installed") from None
        hashed = stored.encode()
        return (lambda pw: bool(bcrypt.checkpw(pw, hashed))), True
    raise ValueError("unknown hash format: use sha256:<hex>, pbkdf2_sha256$... or $2b$...")


def _pbkdf2_verifier(stored: str) -> Verifier:
    parts = stored.split("$")
    if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError("pbkdf2_sha256 needs pbkdf2_sha256$<iterations>$<salt>$<hash>")
    iterations, salt = int(parts[1]), parts[2].encode()
    try:
        expected = base64.b64decode(parts[3], validate=True)
    except binascii.Error:
        raise ValueError("pbkdf2_sha256: the hash is not base64") from None

    def check(password: bytes) -> bool:
        got = hashlib.pbkdf2_hmac("sha256", password, salt, iterations, len(expected))
        return hmac.compare_digest(got, expected)

    return check


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
    Config = BasicAuthConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, BasicAuthConfig)
        self.cfg = config
        self.users: dict[bytes, tuple[ConsumerConfig, Verifier, bool]] = {}
        errors = []
        for index, consumer in enumerate(env.config.consumers):
            creds = consumer.basic_auth
            if creds is None:
                continue
            try:
                check, slow = make_verifier(creds.password)
            except ValueError as exc:
                errors.append(f"consumers[{index}].basic_auth.password: {exc}")
                continue
            self.users[creds.username.encode()] = (consumer, check, slow)
        if errors:
            raise ConfigError(errors)
        self._dummy, _ = make_verifier("sha256:" + _DUMMY)
        self._cache_key = os.urandom(32)
        self._cache: dict[bytes, tuple[ConsumerConfig, float]] = {}
        self._slots: asyncio.Semaphore | None = None

    def on_request(self, ctx: Any) -> Any:
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
            self._dummy(password)  # about the same time as a known user with a fast hash
            return self._deny(ctx, "invalid credentials")
        consumer, check, slow = entry
        if slow:
            return self._check_slowly(ctx, consumer, check, password, memo)
        if not check(password):
            return self._deny(ctx, "invalid credentials")
        self._remember(memo, consumer)
        self._accept(ctx, consumer)
        return None

    async def _check_slowly(
        self, ctx: Any, consumer: ConsumerConfig, check: Verifier, password: bytes, memo: bytes
    ) -> Response | None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_concurrent_checks)
        async with self._slots:
            ok = await asyncio.get_running_loop().run_in_executor(None, check, password)
        if not ok:
            return self._deny(ctx, "invalid credentials")
        self._remember(memo, consumer)
        self._accept(ctx, consumer)
        return None

    def _remember(self, memo: bytes, consumer: ConsumerConfig) -> None:
        if self.cfg.cache_ttl <= 0:
            return
        cache = self._cache
        if len(cache) >= _CACHE_MAX:
            cache.pop(next(iter(cache)))
        cache[memo] = (consumer, time.monotonic() + self.cfg.cache_ttl)

    def _accept(self, ctx: Any, consumer: ConsumerConfig) -> None:
        ctx.consumer = consumer
        if self.cfg.hide_credentials:
            ctx.request.remove_header("authorization")

    def _deny(self, ctx: Any, message: str) -> Response:
        return unauthorized(ctx, message, BASIC_CHALLENGE)

    def __repr__(self) -> str:
        return f"<BasicAuthPlugin {len(self.users)} users>"
