"""The compiled half of the access log: the duration shortcut is str(round(value, 3)) for
every float, the batch hands its entries over once and only once, and what is remembered
from line to line (ids known to need no escaping, the names, client and method fields)
changes nothing.

(The lines themselves are checked byte for byte against json.dumps in test_access_log.py.)
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.http.headers import valid_request_id
from apigate.observability.access_log_lines import (
    _METHODS_MAX,
    _NAMES_MAX,
    _QUOTED_MAX,
    FLUSH_LINES,
    AccessLogLines,
    duration,
)
from tests.unit.test_access_log import NASTY, make_log_ctx, reference_line

# ties (x.5 thousandths that are exact doubles), near-ties either side, zeros, the fast path's
# edges, and what only the slow path handles
EDGES = [
    0.0,
    -0.0,
    0.0625,
    0.0005,
    0.0015,
    0.2345,
    1.0005,
    2.675,
    0.00049999999999999,
    0.0004999,
    0.0005000001,
    1e-9,
    5e-324,
    0.001,
    0.1,
    12.5,
    100.0,
    999_999.9994,
    999_999.9995,
    1e6,
    1e6 - 1e-10,
    123456.789,
    1e15,
    1e300,
    -1.5,
    -0.0004,
    math.inf,
    -math.inf,
    math.nan,
]


@pytest.mark.parametrize("value", EDGES)
def test_duration_is_str_of_round_at_the_edges(value: float) -> None:
    assert duration(value) == str(round(value, 3))


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_duration_is_str_of_round_for_any_float(value: float) -> None:
    assert duration(value) == str(round(value, 3))


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=0, max_value=10**9), st.sampled_from([-1e-12, 0.0, 1e-12, 0.5]))
def test_duration_is_str_of_round_near_every_thousandth(n: int, nudge: float) -> None:
    """Values at and around n/1000 and n.5/1000, where rounding decides the last digit."""
    value = n / 1000 + nudge / 1000
    assert duration(value) == str(round(value, 3))


def test_durations_in_lines_are_rounded_like_json_dumps() -> None:
    for value in (0.0625, 0.2345, 0.0213456789, 1e-9, 999_999.9995):
        ctx = make_log_ctx(upstream_ms=value, total_ms=value * 3)
        lines = AccessLogLines(lambda: None)
        lines.on_log(ctx)
        assert lines.format(lines.take()) == reference_line(ctx)


def test_full_is_called_when_a_batch_is_complete() -> None:
    calls: list[int] = []
    lines = AccessLogLines(lambda: calls.append(len(lines.take())))
    ctx = make_log_ctx()
    for _ in range(FLUSH_LINES - 1):
        lines.on_log(ctx)
    assert calls == []
    lines.on_log(ctx)
    assert calls == [FLUSH_LINES]
    assert lines.take() == []  # taken: nothing is handed over twice


def test_consumers_are_logged_by_name_else_as_their_string() -> None:
    class Named:
        name = "carol"

    class Nameless:
        def __str__(self) -> str:
            return "nameless-consumer"

    cases: list[tuple[Any, Any]] = [
        (Named(), "carol"),
        (Nameless(), "nameless-consumer"),
        (SimpleNamespace(name=None), None),  # a name attribute that says nothing: no field
        ("dave", "dave"),
    ]
    for consumer, expected in cases:
        ctx = make_log_ctx()
        ctx.consumer = consumer
        lines = AccessLogLines(lambda: None)
        lines.on_log(ctx)
        doc = json.loads(lines.format(lines.take()))
        assert doc.get("consumer") == expected


def test_a_plugins_request_id_is_escaped_the_connections_is_not() -> None:
    """The connection's own id (or the client's, once valid) is written as it is; an id a
    plugin set in its place is escaped like any other value."""
    ctx = make_log_ctx(request_id="a1b2c3-7")
    ctx.request.plain_id = ctx.request.request_id  # as the connection sets them
    lines = AccessLogLines(lambda: None)
    lines.on_log(ctx)
    ctx.request.request_id = NASTY  # a plugin's own id
    lines.on_log(ctx)
    first, second = lines.format(lines.take()).splitlines(keepends=True)
    assert json.loads(first)["request_id"] == "a1b2c3-7"
    assert second == reference_line(ctx)
    assert json.loads(second)["request_id"] == NASTY


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=130) | st.from_regex(rb"[A-Za-z0-9._:\-]{1,128}\Z"))
def test_a_valid_client_request_id_needs_no_escaping(value: bytes) -> None:
    """What lets the log write the connection's ids as they are: whatever valid_request_id
    accepts, json.dumps writes as itself in quotes."""
    if valid_request_id(value):
        text = value.decode("ascii")
        assert json.dumps(text) == f'"{text}"'


def test_routes_services_and_instances_in_turn() -> None:
    """The names fields are remembered by name: lines that alternate between instances
    and routes (and unrouted requests, and equal names in other objects) each get their own."""
    a = make_log_ctx()
    b = make_log_ctx()
    b.instance = SimpleNamespace(id="127.0.0.1:10")
    c = make_log_ctx()
    c.route = SimpleNamespace(name='other"route', service=c.service)
    c.service = SimpleNamespace(name="down", breaker=None)
    none = make_log_ctx(routed=False, status=404, upstream_ms=None, total_ms=None)
    same_names = make_log_ctx()  # other objects, the names of `a`
    logged_in_turn([a, b, a, c, none, c, b, same_names, none, a])


def test_names_remembered_are_bounded() -> None:
    contexts = []
    for i in range(_NAMES_MAX + 10):
        ctx = make_log_ctx()
        ctx.instance = SimpleNamespace(id=f"10.0.0.{i}:80")
        contexts.append(ctx)
    lines = logged_in_turn(contexts)
    assert len(lines._names_by_key) <= _NAMES_MAX


def test_clients_and_methods_in_turn() -> None:
    """The client and method fields are remembered by method and client: lines that
    alternate between them (and a client or method that needs escaping) each get their own."""
    order = [
        make_log_ctx(),
        make_log_ctx(method="POST"),
        make_log_ctx(client_ip="198.51.100.2"),
        make_log_ctx(method='PO"ST', client_ip=NASTY),
        make_log_ctx(),
        make_log_ctx(client_ip="198.51.100.2", method="POST"),
        make_log_ctx(method="POST"),
    ]
    logged_in_turn(order)


def test_clients_and_methods_remembered_are_bounded() -> None:
    contexts = [make_log_ctx(method=f"M{i}") for i in range(_METHODS_MAX + 5)]
    contexts += [make_log_ctx(client_ip=f"10.1.{i // 256}.{i % 256}") for i in range(5000)]
    lines = logged_in_turn(contexts)
    assert len(lines._who) <= _METHODS_MAX
    assert all(len(by_client) <= _QUOTED_MAX for by_client in lines._who.values())


def logged_in_turn(contexts: list[Any]) -> AccessLogLines:
    """`contexts` logged one after the other, their lines checked against json.dumps's; the
    AccessLogLines is returned for what it remembers."""
    lines = AccessLogLines(lambda: None)
    for ctx in contexts:
        lines.on_log(ctx)
    assert lines.format(lines.take()) == "".join(reference_line(ctx) for ctx in contexts)
    return lines


@pytest.mark.parametrize("sent", [0, 13, 999, 1000, 65_536, 10**12])
@pytest.mark.parametrize("status", [101, 200, 404, 599])
def test_statuses_and_sizes_are_written_as_json_dumps_writes_them(status: int, sent: int) -> None:
    logged_in_turn([make_log_ctx(status=status, bytes_sent=sent)])
