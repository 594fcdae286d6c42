"""JWS algorithms and the keys that verify them: the rules the `jwt` plugin's own key and the
consumers' `jwt_credentials` are both held to when the file is loaded.

Here rather than in apigate.plugins.jwt because the config schema checks consumers' credentials
(apigate.config.schema), and the plugins import the schema, not the other way round.

The rules: an algorithm is one of SUPPORTED (never `none`); an HMAC secret has at least as many
bytes as its hash (RFC 7518 §3.2); a public key is PEM (a key or a certificate), RSA of at least
2048 bits, an EC curve named in EC_ALGORITHMS, or Ed25519/Ed448, and verifies only its own
family's algorithms (so an HS256 token never meets a public key).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {
    "secp256r1": "ES256",
    "secp384r1": "ES384",
    "secp521r1": "ES512",
    "secp256k1": "ES256K",
}
SUPPORTED = HMAC_ALGORITHMS | RSA_ALGORITHMS | frozenset(EC_ALGORITHMS.values()) | {"EdDSA"}
# RFC 7518 §3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

Problems = list[tuple[tuple[str | int, ...], str]]


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A key a token may be verified with, and the algorithms it may verify (the pinning)."""

    key: Any  # bytes for HS*, a cryptography public key object otherwise
    algorithms: frozenset[str]
    kid: str | None = None


def unsupported(alg: str) -> str | None:
    """Why `alg` cannot be configured, or None when it can."""
    if alg in SUPPORTED:
        return None
    return f"unsupported algorithm {alg!r}: use {', '.join(sorted(SUPPORTED))}"


def key_algorithms(key: Any) -> frozenset[str]:
    """The JWS algorithms a public key object can verify (its family, and its curve)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS if key.key_size >= 2048 else frozenset()
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def load_public_key(path: str) -> tuple[Any, frozenset[str]]:
    """A public key (or a certificate's key) from a PEM file, with the algorithms it allows."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_public_key(data, path)


@lru_cache(maxsize=1024)
def parse_public_key(data: bytes, source: str) -> tuple[Any, frozenset[str]]:
    """A public key (or a certificate's key) from PEM bytes, with the algorithms it allows;
    `source` names it in errors. Cached: every snapshot's plugins, one per route, ask again
    for the same consumers' keys (an RSA key takes ~50 µs to load)."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{source} is not a PEM public key or certificate") from None
    usable = key_algorithms(key)
    if not usable:
        raise ValueError(f"{source}: unsupported or weak key (RSA needs at least 2048 bits)")
    return key, usable


def secret_problems(secret: bytes, algorithms: list[str], field: str = "secret") -> Problems:
    """What is wrong with verifying `algorithms` with an HMAC `secret` (located at `field` and
    at `algorithms`): a non-HMAC algorithm, or a secret shorter than the hash. The secret is
    never shown, only its length."""
    problems: Problems = []
    for alg in algorithms:
        if alg not in HMAC_ALGORITHMS:
            problems.append((("algorithms",), f"{alg} needs a public key, not a secret"))
            continue
        size, need = len(secret), HMAC_MIN_BYTES[alg]
        if size < need:
            problem = f"{size} bytes is too short for {alg}: RFC 7518 asks for at least {need}"
            problems.append(((field,), problem))
    return problems
