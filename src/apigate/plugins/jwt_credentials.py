"""The consumers' JWT credentials for the `jwt` plugin in Kong's model (`key_claim_name`).

Each consumer may hold `jwt_credentials` (apigate.config.schema.JwtCredentialConfig, checked
when the file is loaded). A token names its credential by its key claim (`iss` by default; read
from the payload, else from the JOSE header, as Kong does), the credential's own key verifies
it with the credential's one algorithm, and the request is then the credential's consumer's. A
token that names no credential is a 401, never a request without a consumer.

The index is built with the plugin, so once per config snapshot: a reload or an admin change to
a consumer makes new plugins, each with a new index and an empty verified-token cache, so a
token verified with a credential since removed or changed is never answered from a cache that
knew it. (Requests already under way finish on the snapshot they started with.)
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from apigate.config.jws_keys import VerifyKey
from apigate.config.schema import ConsumerConfig
from apigate.plugins.identity import Identity


class Credential:
    """One credential: whose it is, the key pinned to its algorithm, and who a request it
    verifies is upstream (X-Credential-Identifier: its `key`, as Kong sends)."""

    __slots__ = ("algorithm", "consumer", "identity", "key")

    def __init__(
        self, consumer: ConsumerConfig, algorithm: str, verifier: Any, name: str = ""
    ) -> None:
        self.consumer = consumer
        self.algorithm = algorithm
        self.key = VerifyKey(verifier, frozenset({algorithm}))
        self.identity = Identity(consumer, credential_id=name or None)

    def __repr__(self) -> str:
        return f"<Credential {self.algorithm} of {self.consumer.name!r}>"


class CredentialIndex:
    """The consumers' JWT credentials by key, and the claim that names one."""

    __slots__ = ("by_key", "claim")

    def __init__(self, consumers: Iterable[ConsumerConfig], claim: str) -> None:
        self.claim = claim
        self.by_key: dict[str, Credential] = {}
        for consumer in consumers:
            for cred in consumer.jwt_credentials:  # (keys are unique: the schema checks)
                self.by_key[cred.key] = Credential(
                    consumer, cred.algorithm, cred.verifier(), cred.key
                )

    def find(self, claims: dict[str, Any], header: dict[str, Any]) -> Credential | str:
        """The credential an unverified token names, or why none (the 401's message).
        Nothing is trusted yet: the caller verifies the token with the credential's key."""
        name = self.claim
        value = claims.get(name)
        if value is None:
            value = header.get(name)
        if value is None:
            return f"token lacks the {name!r} claim"
        found = self.by_key.get(value) if isinstance(value, str) else None
        if found is None:
            return f"no credentials found for given {name!r}"  # Kong's words
        return found

    def __len__(self) -> int:
        return len(self.by_key)

    def __repr__(self) -> str:
        return f"<CredentialIndex {len(self.by_key)} credentials by {self.claim!r}>"


def unverified_claims(token: bytes) -> dict[str, Any] | None:
    """The payload of a compact JWS whose shape was checked (three base64url segments), before
    its signature is: only to find the credential that will verify it. None if not an object."""
    segment = token.split(b".")[1]
    try:
        doc = json.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # (a deeply nested array)
        return None
    return doc if isinstance(doc, dict) else None
