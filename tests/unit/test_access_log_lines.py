"""The compiled half of the access log: the duration shortcut is str(round(value, 3)) for
every float, and the batch hands its entries over once and only once.

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

from apigate.observability.access_log_lines import FLUSH_LINES, AccessLogLines, duration
from tests.unit.test_access_log import make_log_ctx, reference_line

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
