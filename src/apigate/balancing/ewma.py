"""Peak-EWMA latency with the power of two choices (Finagle, Linkerd/tower, Envoy's p2c).

Per pick: draw two distinct available instances at random and send to the cheaper, where

    cost = latency_estimate * (in_flight + 1) / weight

Two random candidates instead of a scan keep the pick O(1) and avoid the herd that a strict
"global best" causes (every worker sending to the same momentarily fastest instance).

The latency estimate lives on the `Instance` (`ewma_latency`, `_ewma_stamp`) and is updated in
`on_finish()`:

- *peak*: a sample above the estimate replaces it at once, so a slowdown is seen on the next
  pick instead of after many samples;
- otherwise a time-based EWMA: `new = old * w + sample * (1 - w)` with `w = exp(-dt / tau)`, dt
  the time since the previous sample, so the memory is ~tau seconds whatever the request rate;
- a failure counts as `max(latency, failure_penalty, 5 x estimate)` (capped at 60 s).

Reading the cost decays the estimate towards zero by the time since the last sample (as tower
and Finagle do): an instance that was slow but has been left alone becomes cheap again after a
while and gets probed, and its next sample (peak) tells the truth. An instance with no sample
yet costs `unsampled_latency`, small, so that new instances are tried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from math import exp
from typing import ClassVar, Final

from apigate.balancing.base import Balancer, Instance
from apigate.balancing.round_robin import slash_list

MAX_PENALTY: Final = 60.0  # seconds; bounds the compounding of "5 x estimate" on repeated failures
REDRAWS: Final = 3  # p2c draws tried on the retry path before filtering
MIN_SAMPLE: Final = 1e-6  # an estimate of 0.0 means "no sample yet", so samples never store 0


class EwmaBalancer(Balancer):
    """Peak-EWMA + power of two choices; O(1) per pick (two random draws, two costs)."""

    name: ClassVar[str] = "ewma"

    def __init__(
        self,
        instances: Iterable[Instance] = (),
        *,
        tau: float = 10.0,
        failure_penalty: float = 1.0,
        unsampled_latency: float = 0.001,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tau = tau
        self.failure_penalty = failure_penalty
        self.unsampled_latency = unsampled_latency
        self._random = (rng or random.Random()).random
        self._clock = clock
        super().__init__(instances)

    def cost(self, instance: Instance, now: float) -> float:
        """Decayed latency estimate x (in_flight + 1) / weight, as seen at `now`."""
        latency = instance.ewma_latency
        if latency:
            elapsed = now - instance._ewma_stamp
            if elapsed > 0.0:
                latency *= exp(-elapsed / self.tau)
        else:
            latency = self.unsampled_latency
        return latency * (instance.in_flight + 1) / instance.weight

    def pick(self, key: str | None = None, exclude: Collection[Instance] = ()) -> Instance | None:
        if exclude:
            return self._pick_excluding(exclude)
        return self._pick_from(self.available)

    def _pick_from(self, available: Sequence[Instance]) -> Instance | None:
        n = len(available)
        if n <= 1:
            return available[0] if n else None
        first = int(self._random() * n)
        second = int(self._random() * (n - 1))
        if second >= first:  # distinct: draw from the n - 1 others
            second += 1
        return self._cheaper(available[first], available[second])

    def _cheaper(self, a: Instance, b: Instance) -> Instance:
        now = self._clock()
        return a if self.cost(a, now) <= self.cost(b, now) else b

    def _pick_excluding(self, exclude: Collection[Instance]) -> Instance | None:
        """Retry path: redraw pairs until both are allowed, then compare among a filtered copy.

        Redrawing saves the copy when few of many are excluded (n=100: ~2 us vs 7 us). A
        pair with an excluded member is redrawn, not half-accepted: accepting the allowed one
        unchallenged would turn p2c into a plain random pick after every failure.
        """
        available = self.available
        n = len(available)
        if n > len(exclude) + 1:  # at least two allowed instances
            for _ in range(REDRAWS):
                first = int(self._random() * n)
                second = int(self._random() * (n - 1))
                if second >= first:
                    second += 1
                a, b = available[first], available[second]
                if a not in exclude and b not in exclude:
                    return self._cheaper(a, b)
        return self._pick_from([i for i in available if i not in exclude])

    def on_finish(self, instance: Instance, latency: float, ok: bool) -> None:
        super().on_finish(instance, latency, ok)
        now = self._clock()
        current = instance.ewma_latency
        if not ok:
            latency = min(max(latency, self.failure_penalty, 5.0 * current), MAX_PENALTY)
        latency = max(latency, MIN_SAMPLE)
        if latency >= current:  # peak: also the first sample, since "none yet" is 0.0
            instance.ewma_latency = latency
        else:
            w = exp(-max(now - instance._ewma_stamp, 0.0) / self.tau)
            instance.ewma_latency = current * w + latency * (1.0 - w)
        instance._ewma_stamp = now

    def __repr__(self) -> str:
        available = self.available
        return (
            f"<{type(self).__name__} {len(available)} available of {len(self.instances)}, "
            f"ewma ms {slash_list([round(i.ewma_latency * 1000, 1) for i in available])}, "
            f"in_flight {slash_list([i.in_flight for i in available])}>"
        )
