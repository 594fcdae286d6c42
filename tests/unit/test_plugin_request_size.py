"""The request_size plugin: a declared length over the limit is refused before the body."""

from __future__ import annotations

import pytest

from apigate.config.errors import ConfigError
from tests.unit.test_plugin_fakes import body, build, make_ctx, resolve


class FakeConn:
    def __init__(self, limit: int) -> None:
        self.limit = limit

    def apply_route_limits(
        self, ex: object, max_body: int | None, body_timeout: float | None
    ) -> int:
        if max_body is not None:
            self.limit = max_body
        return self.limit


def test_content_length_over_the_limit_is_413() -> None:
    plugin = build("request_size", {"max_bytes": "1KiB"})
    assert resolve(plugin.on_request(make_ctx("POST", content_length=1024))) is None
    assert resolve(plugin.on_request(make_ctx("GET"))) is None
    outcome = resolve(plugin.on_request(make_ctx("POST", content_length=1025)))
    assert outcome is not None and outcome.status == 413
    assert body(outcome)["message"] == "request body larger than 1024 bytes"


def test_chunked_bodies_get_the_lower_streaming_limit() -> None:
    plugin = build("request_size", {"max_bytes": 100})
    ctx = make_ctx("POST", chunked=True)
    ctx.conn = FakeConn(10 * 1024 * 1024)  # type: ignore[attr-defined]
    assert resolve(plugin.on_request(ctx)) is None
    assert ctx.conn.limit == 100  # type: ignore[attr-defined]
    stricter = make_ctx("POST", chunked=True)
    stricter.conn = FakeConn(50)  # type: ignore[attr-defined]
    assert resolve(plugin.on_request(stricter)) is None
    assert stricter.conn.limit == 50  # type: ignore[attr-defined]  # never raised


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        build("request_size", {"max_bytes": "lots"})
    with pytest.raises(ConfigError, match="max_bytes: required"):
        build("request_size", {})


def test_a_chunked_body_read_while_queued_is_held_to_the_limit() -> None:
    """A pipelined request's body may be read before its route (and this plugin) is known:
    what was read already counts."""
    plugin = build("request_size", {"max_bytes": 100})
    ctx = make_ctx("POST", chunked=True)
    ctx.conn = FakeConn(10 * 1024 * 1024)  # type: ignore[attr-defined]
    ctx.buffered_body_bytes = 101  # type: ignore[attr-defined]
    outcome = resolve(plugin.on_request(ctx))
    assert outcome is not None and outcome.status == 413
    ctx.buffered_body_bytes = 100  # type: ignore[attr-defined]
    assert resolve(plugin.on_request(ctx)) is None
