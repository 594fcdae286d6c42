"""Cluster review fixes that need no Redis: credentials in a URL's query are redacted, a
redacted store sent back is the one in force, and each Redis database has its own channel."""

from __future__ import annotations

import pytest

from apigate.admin.api import refuse_redacted, with_store_in_force
from apigate.admin.http import AdminError
from apigate.redaction import redact_url
from apigate.store.cluster_scripts import channel
from apigate.store.redis import RedisStore


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://h:6379/0?password=pw", "redis://h:6379/0?password=[redacted]"),
        ("rediss://h/1?ssl_password=k&db=1", "rediss://h/1?ssl_password=[redacted]&db=1"),
        ("redis://h/?db=2&Password=pw", "redis://h/?db=2&Password=[redacted]"),
        ("redis://h/0?pass%77ord=pw", "redis://h/0?pass%77ord=[redacted]"),  # decoded: password
        ("http://a/b?token=t&x=1&api_key=k", "http://a/b?token=[redacted]&x=1&api_key=[redacted]"),
        ("redis://u:pw@h/0?password=pw2", "redis://u:[redacted]@h/0?password=[redacted]"),
        # its value runs to the next "&": a "#" or a quote after it is no way out
        ("redis://h/0?password=p#w'x y", "redis://h/0?password=[redacted] y"),
        (
            "store 'redis://h/0?password=pw' and http://x/?q=1",
            "store 'redis://h/0?password=[redacted] and http://x/?q=1",
        ),
        # ordinary parameters, and text that is no URL, are left alone
        ("redis://h/0?db=1&health_check_interval=5", "redis://h/0?db=1&health_check_interval=5"),
        ("http://x/search?key=value", "http://x/search?key=value"),
        ("why? password=nothing", "why? password=nothing"),
    ],
)
def test_credential_query_parameters_are_redacted(text: str, shown: str) -> None:
    assert redact_url(text) == shown


def test_a_redacted_store_equal_to_the_one_in_force_comes_back_as_it() -> None:
    in_force = "redis://:pw@h:6379/0?password=pw"
    doc = {"store": redact_url(in_force), "routes": []}
    restored = with_store_in_force(doc, in_force)
    assert restored == {"store": in_force, "routes": []} and doc["store"] != in_force
    refuse_redacted(restored)
    # another store, redacted: still refused; plain: left for the restart check to refuse
    for other in ("redis://:[redacted]@elsewhere:6379/0", "redis://h:6379/0?password=[redacted]"):
        with pytest.raises(AdminError) as refused:
            refuse_redacted(with_store_in_force({"store": other}, in_force))
        assert refused.value.code == "redacted_value"
    assert with_store_in_force({"store": "memory"}, in_force) == {"store": "memory"}


def test_a_secret_elsewhere_in_the_document_is_still_refused() -> None:
    in_force = "redis://:pw@h:6379/0"
    doc = {"store": redact_url(in_force), "consumers": [{"name": "c", "api_keys": ["[redacted]"]}]}
    with pytest.raises(AdminError) as refused:
        refuse_redacted(with_store_in_force(doc, in_force))
    assert "body.consumers[0].api_keys[0]" in str(refused.value)


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("redis://h:6379", 0),
        ("redis://h:6379/0", 0),
        ("redis://h:6379/1", 1),
        ("rediss://:pw@h/12", 12),
        ("redis://h/?db=3", 3),
        ("redis://h/2?db=5", 5),  # redis-py: the query wins
    ],
)
def test_each_database_has_its_own_channel(url: str, db: int) -> None:
    assert RedisStore(url).db == db
    assert channel(db) == f"apigate:cluster:events:{db}"
    assert channel(0) != channel(1)
