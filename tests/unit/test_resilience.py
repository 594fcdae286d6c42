"""Circuit breaker and retry budget with an injected clock (no sleeping, no sockets)."""

from __future__ import annotations

import pytest

from apigate.config.schema import CircuitBreakerConfig, RetriesConfig
from apigate.resilience.circuit_breaker import CircuitBreaker, State
from apigate.resilience.retry import RetryBudget, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw: object) -> CircuitBreaker:
    cfg = CircuitBreakerConfig.model_validate(
        {
            "failure_rate": "50%",
            "min_requests": 10,
            "window": "10s",
            "open_for": "5s",
            "half_open_requests": 2,
            **kw,
        }
    )
    return CircuitBreaker("svc", cfg, clock=clock)


def test_opens_at_failure_rate_only_after_min_requests() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(4):
        b.record(False)  # 4 failures of 4: below min_requests
    assert b.state is State.CLOSED
    for _ in range(5):
        b.record(True)
    assert b.state is State.CLOSED  # 4/9
    b.record(False)  # 5/10 = 50%
    assert b.state is State.OPEN
    assert b.allow() is False
    assert b.retry_after() == 5


def test_old_outcomes_leave_the_window() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(9):
        b.record(False)
    clock.now += 11  # all of them aged out
    b.record(False)
    assert b.state is State.CLOSED
    assert b.window_counts() == (1, 1)


def test_consecutive_failures_open_without_min_requests() -> None:
    clock = Clock()
    b = breaker(clock, consecutive_failures=3)
    b.record(False)
    b.record(True)
    b.record(False)
    b.record(False)
    assert b.state is State.CLOSED
    b.record(False)
    assert b.state is State.OPEN


def test_half_open_probes_then_close_or_reopen() -> None:
    clock = Clock()
    b = breaker(clock, consecutive_failures=1)
    b.record(False)
    assert b.state is State.OPEN
    clock.now += 4.9
    assert b.allow() is False
    clock.now += 0.2
    assert b.allow() is True and b.state is State.HALF_OPEN
    assert b.allow() is True
    assert b.allow() is False  # only half_open_requests probes at a time
    b.record(True)
    assert b.state is State.HALF_OPEN
    b.record(True)
    assert b.state is State.CLOSED
    assert b.allow() is True
    # and a failed probe reopens it
    b.record(False)
    assert b.state is State.OPEN
    clock.now += 6
    assert b.allow() is True
    b.record(False)
    assert b.state is State.OPEN
    assert b.retry_after() == 5


def test_budget_caps_retries_at_ratio_of_requests() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, window=10, min_per_second=0, clock=clock)
    for _ in range(100):
        budget.record_request()
    granted = sum(budget.try_acquire() for _ in range(50))
    assert granted == 20
    clock.now += 11  # the window moved on: no requests, no budget
    assert budget.try_acquire() is False


def test_budget_floor_lets_a_quiet_service_retry() -> None:
    budget = RetryBudget(0.2, window=10, min_per_second=0.5, clock=Clock())
    assert sum(budget.try_acquire() for _ in range(10)) == 5


@pytest.mark.parametrize(
    ("method", "key", "opt_in", "safe"),
    [
        ("GET", False, False, True),
        ("PUT", False, False, True),
        ("POST", False, False, False),
        ("POST", True, False, True),
        ("PATCH", False, True, True),
    ],
)
def test_only_safe_requests_are_repeated(method: str, key: bool, opt_in: bool, safe: bool) -> None:
    policy = RetryPolicy(RetriesConfig(non_idempotent=opt_in))
    assert policy.safe_to_repeat(method, key) is safe


def test_conditions_and_backoff() -> None:
    policy = RetryPolicy(
        RetriesConfig.model_validate(
            {"attempts": 2, "on": ["connect_error", "timeout", 503], "backoff": "100ms"}
        )
    )
    assert policy.retryable(kind="connect_error")
    assert policy.retryable(kind="timeout")
    assert not policy.retryable(kind="reset")
    assert policy.retryable(kind="status", status=503)
    assert not policy.retryable(kind="status", status=500)
    delays = [policy.delay(3) for _ in range(200)]
    assert min(delays) >= 0 and max(delays) <= 0.4


def test_consistent_hash_on_a_jwt_claim_reads_the_verified_claims() -> None:
    from types import SimpleNamespace

    from apigate.registry.service import hash_key_extractor

    key = hash_key_extractor("claim:tenant")
    assert key(SimpleNamespace(vars={"jwt_claims": {"tenant": "acme"}})) == "acme"
    assert key(SimpleNamespace(vars={})) is None
