"""A circuit breaker per service (or per instance): closed → open → half-open → closed.

    CLOSED     every request passes; outcomes are counted in a sliding window of time buckets.
               Opens when, over `window`, at least `min_requests` finished and the failure
               share reached `failure_rate` — or after `consecutive_failures` in a row.
    OPEN       requests are refused at once (503 with Retry-After) without touching the
               upstream, for `open_for`.
    HALF_OPEN  up to `half_open_requests` probes pass at a time; that many successes close the
               breaker, any failure opens it again for another `open_for`.

A failure is a transport error, a timeout or a 5xx answer; a request that ends without an
outcome (cancelled, its client gone) is `release()`d instead: it counts for nothing and gives its
probe slot back. A caller that keeps `transitions` from its `allow()` and passes it as `since`
is never mistaken for a probe of a later half-open round. The clock is injectable so tests
need no sleeping. On the hot path a closed breaker costs one comparison in `allow()` and one
bucket update in `record()`.

Every transition is an event (`apigate.registry.events`, logged on "apigate.resilience") and
is counted by new state in `counts`, a dict the breaker is given by its owner, that `/metrics`
exposes as `apigate_breaker_opened_total` and its siblings. The counts are the owner's (the
gateway's `Service`), not the breaker's nor the process's: a service whose `circuit_breaker`
settings change gets a new breaker, handed the same dict, and its counters go on from where
they were; two gateways in one process count apart.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Final

from apigate.config.schema import CircuitBreakerConfig
from apigate.registry.events import EVENTS

_BUCKETS: Final = 10


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.name = name
        # state entered ("open", "half_open", "closed") -> transitions so far; shared with the
        # breakers that replace this one. Transitions are rare: a dict update each costs nothing
        # next to the event logged with it.
        self.counts: dict[str, int] = {} if counts is None else counts
        self.config = config
        self.clock = clock
        self.state = State.CLOSED
        self.opened_at = 0.0
        self.consecutive_failures = 0
        self.half_open_in_flight = 0
        self.half_open_successes = 0
        self.transitions = 0
        self._width = max(config.window / _BUCKETS, 0.001)
        # ring of [bucket_number, successes, failures]
        self._ring: list[list[float]] = [[-1.0, 0.0, 0.0] for _ in range(_BUCKETS)]

    # ------------------------------------------------------------------ hot path
    def allow(self) -> bool:
        """May a request go upstream now? A True in half-open state reserves a probe slot."""
        if self.state is State.CLOSED:
            return True
        now = self.clock()
        if self.state is State.OPEN:
            if now - self.opened_at < self.config.open_for:
                return False
            self._set(State.HALF_OPEN, "open_for elapsed; probing")
        if self.half_open_in_flight >= self.config.half_open_requests:
            return False
        self.half_open_in_flight += 1
        return True

    def record(self, ok: bool, since: int | None = None) -> None:
        """The outcome of a request that `allow()` let through.

        `since` is `self.transitions` read right after that `allow()`: with it, an outcome
        from an earlier period (a slow request let through while the breaker was still closed,
        or a probe of a previous half-open round) is not taken for one of this round's probes.
        """
        if self.state is State.HALF_OPEN:
            if since is not None and since != self.transitions:
                return  # not one of this round's probes: it holds no slot and proves nothing
            self.half_open_in_flight = max(0, self.half_open_in_flight - 1)
            if not ok:
                self._open("a probe failed in half-open state")
                return
            self.half_open_successes += 1
            if self.half_open_successes >= self.config.half_open_requests:
                self._set(State.CLOSED, f"{self.half_open_successes} probes succeeded")
            return
        if self.state is State.OPEN:
            return  # a request that started before the breaker opened
        now = self.clock()
        number = float(int(now / self._width))
        bucket = self._ring[int(number) % _BUCKETS]
        if bucket[0] != number:
            bucket[0], bucket[1], bucket[2] = number, 0.0, 0.0
        if ok:
            bucket[1] += 1
            self.consecutive_failures = 0
            return
        bucket[2] += 1
        self.consecutive_failures += 1
        limit = self.config.consecutive_failures
        if limit and self.consecutive_failures >= limit:
            self._open(f"{self.consecutive_failures} consecutive failures")
            return
        total, failures = self.window_counts(now)
        if total >= self.config.min_requests and failures / total >= self.config.failure_rate:
            self._open(f"failure rate {failures / total:.0%} over {total:.0f} requests")

    def release(self, since: int | None = None) -> None:
        """A request `allow()` let through ended without saying anything about the service (it
        was cancelled, or its client went away): its half-open probe slot is free again, and
        nothing is counted. `since` as for `record`."""
        if self.state is State.HALF_OPEN and (since is None or since == self.transitions):
            self.half_open_in_flight = max(0, self.half_open_in_flight - 1)

    # ------------------------------------------------------------------ state
    def window_counts(self, now: float | None = None) -> tuple[float, float]:
        now = self.clock() if now is None else now
        current = int(now / self._width)
        oldest = current - _BUCKETS + 1
        total = failures = 0.0
        for number, ok, bad in self._ring:
            if oldest <= number <= current:
                total += ok + bad
                failures += bad
        return total, failures

    def retry_after(self) -> int:
        """Whole seconds until the breaker will try again (for the Retry-After header)."""
        if self.state is not State.OPEN:
            return 1
        remaining = self.config.open_for - (self.clock() - self.opened_at)
        return max(1, int(remaining + 0.999))

    def _open(self, reason: str) -> None:
        self.opened_at = self.clock()
        self.half_open_in_flight = 0
        self._set(State.OPEN, reason)

    def _set(self, state: State, reason: str) -> None:
        previous, self.state = self.state, state
        self.transitions += 1
        self.counts[state.value] = self.counts.get(state.value, 0) + 1
        if state is State.CLOSED:
            self.consecutive_failures = 0
            for bucket in self._ring:
                bucket[0], bucket[1], bucket[2] = -1.0, 0.0, 0.0
        if state is not State.HALF_OPEN:
            self.half_open_successes = 0
        level = logging.WARNING if state is State.OPEN else logging.INFO
        EVENTS.record(
            "breaker",
            f"circuit {self.name}: {previous.value} -> {state.value} ({reason})",
            level,
            breaker=self.name,
            state=state.value,
            reason=reason,
        )

    def snapshot(self) -> dict[str, object]:
        total, failures = self.window_counts()
        return {
            "state": self.state.value,
            "window_requests": total,
            "window_failures": failures,
            "consecutive_failures": self.consecutive_failures,
            "retry_after_s": self.retry_after() if self.state is State.OPEN else None,
        }

    def __repr__(self) -> str:
        total, failures = self.window_counts()
        return f"<CircuitBreaker {self.name} {self.state.value} {failures:.0f}/{total:.0f} failed>"
