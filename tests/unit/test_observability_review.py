"""Review fixes of the observability layer, without sockets: the loggers gateway events go
through, secrets in log lines, breaker transition counts."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest

from apigate.config.schema import CircuitBreakerConfig
from apigate.observability.logs import JsonFormatter, setup_logging
from apigate.registry.events import EVENTS
from apigate.resilience.circuit_breaker import CircuitBreaker


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def root_logging() -> Iterator[Records]:
    """The root logger's handlers and every logger's level as they were, afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {
        name: logger.level
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    sink = Records()
    try:
        yield sink
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


# ---------------------------------------------------------------------- component loggers
@pytest.mark.parametrize(
    ("kind", "logger"),
    [
        ("registration", "apigate.registry"),
        ("service", "apigate.registry"),
        ("health", "apigate.registry.health"),
        ("dns", "apigate.dns"),
        ("upstream_dns", "apigate.upstream.dns"),
        ("breaker", "apigate.resilience"),
        ("something_else", "apigate.events"),
    ],
)
def test_each_event_is_logged_through_its_components_logger(
    root_logging: Records, kind: str, logger: str
) -> None:
    setup_logging("warning", {logger: "debug"})
    logging.getLogger().addHandler(root_logging)
    EVENTS.record(kind, f"a {kind} event", service="s")
    [record] = [r for r in root_logging.records if r.getMessage() == f"a {kind} event"]
    assert record.name == logger
    assert (record.levelno, record.event, record.service) == (logging.INFO, kind, "s")  # type: ignore[attr-defined]
    assert EVENTS.recent(limit=1)[0]["kind"] == kind  # the /events ring is unchanged


def test_readmes_example_shows_registrations_and_health_at_debug(root_logging: Records) -> None:
    """`--log-level warning,apigate.registry=debug`: registrations and health transitions are
    shown, and nothing else below a warning; `info,apigate.registry=error` hides them."""
    setup_logging("warning", {"apigate.registry": "debug"})
    logging.getLogger().addHandler(root_logging)
    EVENTS.record("registration", "instance registered", service="s")
    EVENTS.record("health", "instance unhealthy", service="s")
    EVENTS.record("breaker", "circuit s: closed -> open")
    assert [r.getMessage() for r in root_logging.records] == [
        "instance registered",
        "instance unhealthy",
    ]
    root_logging.records.clear()
    setup_logging("info", {"apigate.registry": "error"})
    logging.getLogger().addHandler(root_logging)
    EVENTS.record("registration", "instance registered", service="s")
    EVENTS.record("health", "instance unhealthy", level=logging.WARNING, service="s")
    assert root_logging.records == []


def test_the_active_health_checker_logs_under_the_registry() -> None:
    from apigate.registry import health

    assert health.log.name == "apigate.registry.health"


# ---------------------------------------------------------------------- secrets in log lines
def _record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(
        "opentelemetry.exporter", logging.WARNING, __file__, 1, message, args, exc_info
    )


SECRET_LINES = [
    # what the OTLP exporter's logger said, from a real run (urllib3's message)
    "Transient error HTTPConnectionPool(host='127.0.0.1', port=29419): Max retries exceeded "
    "with url: /v1/traces?api_key=OTLP-Q-SECRET (Caused by NewConnectionError(...)) "
    "encountered while exporting spans batch, retrying in 0.95s.",
    "exporting to http://user:OTLP-PW-SECRET@collector:4318/v1/traces failed",
    "GET /v1/traces?x=1&token=OTLP-Q-SECRET&y=2 refused",
    "url='/v1/traces?access_token=OTLP-Q-SECRET'",
]


@pytest.mark.parametrize("line", SECRET_LINES)
def test_json_lines_carry_no_url_credentials(line: str) -> None:
    out = JsonFormatter().format(_record("%s", line))
    assert "SECRET" not in out
    assert "[redacted]" in out


def test_secrets_in_exception_text_and_extra_values_are_redacted() -> None:
    try:
        raise ConnectionError("POST http://u:OTLP-PW-SECRET@host/v1/traces?api_key=OTLP-SECRET")
    except ConnectionError as exc:
        record = _record("export failed", exc=exc)
    record.endpoint = "http://u:OTLP-PW-SECRET@host/v1/traces"
    out = JsonFormatter().format(record)
    assert "SECRET" not in out
    assert "ConnectionError" in out and "export failed" in out
    assert "http://u:[redacted]@host/v1/traces" in out  # the user and the host stay


def test_plain_text_lines_are_redacted_too(root_logging: Records) -> None:
    setup_logging("info", json_format=False)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    out = handler.format(_record("%s", SECRET_LINES[0]))
    assert "SECRET" not in out and "api_key=[redacted]" in out


def test_ordinary_lines_are_left_as_they_are() -> None:
    line = "GET /search?q=password&page=2 took 3 ms; user@example.org asked"
    assert line in JsonFormatter().format(_record("%s", line))


# ---------------------------------------------------------------------- breaker transitions
def test_breaker_transitions_are_counted_per_service() -> None:
    now = [0.0]
    config = CircuitBreakerConfig(consecutive_failures=2, open_for=1.0, half_open_requests=1)
    counts: dict[str, int] = {}
    breaker = CircuitBreaker("review-svc", config, clock=lambda: now[0], counts=counts)

    def count(state: str) -> int:
        return counts.get(state, 0)

    breaker.record(False)
    breaker.record(False)  # closed -> open
    now[0] = 1.5
    assert breaker.allow()  # open -> half_open
    breaker.record(False)  # half_open -> open
    now[0] = 3.0
    assert breaker.allow()  # open -> half_open
    breaker.record(True)  # half_open -> closed
    assert (count("open"), count("half_open"), count("closed")) == (2, 2, 1)
    # a replacement breaker (the service's config changed) given the same counts adds to them
    CircuitBreaker("review-svc", config, clock=lambda: now[0], counts=counts)._open("test")
    assert count("open") == 3


async def test_breaker_counts_belong_to_the_service_not_the_process() -> None:
    """Two gateways in one process, each with a service "api": only one breaker trips, the
    other's counts stay at 0; a breaker rebuilt on a settings change goes on counting."""
    import asyncio

    from apigate.config.schema import ServiceConfig
    from apigate.http.pool import PoolManager
    from apigate.registry.service import Service

    def config(failures: int) -> ServiceConfig:
        return ServiceConfig.model_validate(
            {
                "targets": [{"url": "http://127.0.0.1:9"}],
                "circuit_breaker": {"consecutive_failures": failures},
            }
        )

    loop = asyncio.get_running_loop()
    a = Service("api", config(2), PoolManager(loop))
    b = Service("api", config(2), PoolManager(loop))
    assert a.breaker is not None and b.breaker is not None
    for _ in range(2):
        assert a.breaker.allow()
        a.breaker.record(False)
    assert a.breaker_counts == {"open": 1}
    assert b.breaker_counts.get("open", 0) == 0
    old = a.breaker
    a.apply_config(config(3))  # new circuit_breaker settings: a new breaker
    assert a.breaker is not None and a.breaker is not old
    a.breaker._open("test")
    assert a.breaker_counts == {"open": 2}
    assert b.breaker_counts.get("open", 0) == 0


# ---------------------------------------------------------------------- aggregate latencies
async def test_an_aggregates_answered_calls_leave_their_latency_for_the_metrics() -> None:
    from apigate.observability.series import PART_LATENCIES
    from apigate.proxy.aggregate import PartError
    from tests.unit.test_aggregate import FakeClient, ok, route, run, slow

    parts = {
        "profile": {"service": "users", "path": "/users/{user_id}"},
        "orders": {"service": "orders", "path": "/orders/{user_id}", "optional": True},
        "more": {"service": "users", "path": "/more/{user_id}", "optional": True},
    }
    client = FakeClient(
        {
            "/users/42": slow(0.02, {"id": 42}),
            "/orders/42": ok([]),
            "/more/42": PartError("connect error"),  # no answer: no latency
        }
    )
    ctx = await run(route(parts), client)
    assert ctx.doc()["profile"] == {"id": 42}
    latencies = ctx.vars[PART_LATENCIES]
    assert sorted(service for service, _ in latencies) == ["orders", "users"]
    assert dict(latencies)["users"] >= 20.0 > dict(latencies)["orders"]
