"""Retry policy: which failures are retried, how long to wait, and a budget that caps them.

Retries multiply load exactly when a service is struggling, so besides the per-request
`attempts` a `RetryBudget` (as in Finagle and Envoy's retry budgets) allows retries only while
they are at most `budget` of the requests seen over a sliding window — with a floor of a few
retries per second so a quiet service can still retry at all. A request is retried only when
nothing of the response reached the client, on another instance, and only when it is safe:
idempotent methods, or a request with an `Idempotency-Key`, or a route that opts in.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from apigate.config.schema import RetriesConfig

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class RetryBudget:
    """Retries allowed <= ratio * requests over `window` seconds, plus `min_per_second`.

    Counting a request is one integer increment (`requests += 1`, done inline by the exchange
    on every request); the window is worked out only when a retry asks for budget, from marks
    of the running totals taken at most every window/10. Requests are counted from the oldest
    mark inside the window, so the budget errs on the stingy side when retries are rare (the
    per-second floor still lets a quiet service retry) and is exact to window/10 in an outage,
    when retries ask often.
    """

    def __init__(
        self,
        ratio: float,
        window: float = 10.0,
        min_per_second: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.window = window
        self.min_per_second = min_per_second
        self.clock = clock
        self.requests = 0  # running totals
        self.retries = 0
        self._marks: deque[tuple[float, int, int]] = deque([(clock(), 0, 0)])  # (t, req, ret)

    def record_request(self) -> None:
        self.requests += 1

    def counts(self) -> tuple[float, float]:
        """(requests, retries) within the window."""
        now = self.clock()
        marks = self._marks
        if not marks or now - marks[-1][0] >= self.window / 10:
            marks.append((now, self.requests, self.retries))
        start = now - self.window
        while marks[0][0] < start:
            marks.popleft()  # the newest mark is `now`, so one always remains
        _, base_requests, base_retries = marks[0]
        return float(self.requests - base_requests), float(self.retries - base_retries)

    def try_acquire(self) -> bool:
        """Spend one retry if the budget allows it."""
        requests, retries = self.counts()
        allowed = self.ratio * requests + self.min_per_second * self.window
        if retries + 1 > allowed:
            return False
        self.retries += 1
        return True


class RetryPolicy:
    def __init__(self, config: RetriesConfig, budget: RetryBudget | None = None) -> None:
        self.attempts = config.attempts
        conditions = config.conditions
        self.on_connect_error = "connect_error" in conditions
        self.on_reset = "reset" in conditions
        self.on_timeout = "timeout" in conditions
        self.statuses = config.statuses
        self.backoff = config.backoff
        self.non_idempotent = config.non_idempotent
        self.per_try_timeout = config.per_try_timeout
        self.budget = budget or RetryBudget(config.budget)

    def safe_to_repeat(self, method: str, has_idempotency_key: bool) -> bool:
        return method in IDEMPOTENT_METHODS or has_idempotency_key or self.non_idempotent

    def retryable(self, *, kind: str, status: int = 0) -> bool:
        """Does this failure kind call for a retry? kind: connect_error|reset|timeout|status."""
        if kind == "connect_error":
            return self.on_connect_error
        if kind == "reset":
            return self.on_reset
        if kind == "timeout":
            return self.on_timeout
        return status in self.statuses

    def delay(self, retry_number: int) -> float:
        """Exponential backoff with full jitter: uniform(0, backoff * 2^(n-1)), capped at 1 s."""
        ceiling = min(self.backoff * (2 ** max(retry_number - 1, 0)), 1.0)
        return random.uniform(0, ceiling)
