"""Load balancers: distribution, exclusion, health, weights, and the algorithms' own promises."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

import apigate.balancing.consistent_hash as consistent_hash_module
import apigate.balancing.round_robin as round_robin_module
from apigate.balancing import (
    BALANCERS,
    Balancer,
    ConsistentHashBalancer,
    EwmaBalancer,
    Instance,
    LeastConnectionsBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    make_balancer,
)
from apigate.config.schema import ServiceConfig
from apigate.http.pool import PoolManager
from apigate.registry.service import Service

KINDS = sorted(BALANCERS)


def make(id: str, weight: int = 1) -> Instance:
    return Instance(id, f"http://{id}:80", id, 80, weight=weight)


def trio(*weights: int) -> list[Instance]:
    return [make(name, w) for name, w in zip("abcdefgh", weights or (1, 1, 1), strict=False)]


def picks(
    balancer: Balancer, count: int, exclude: Collection[Instance] = (), start: bool = False
) -> list[str]:
    """Ids of `count` picks; a distinct key per pick for consistent hashing.

    `start=True` also counts each pick as in flight (as the proxy does), which is what makes
    load-aware balancers spread picks that never finish.
    """
    out = []
    for n in range(count):
        key = f"key-{n}" if isinstance(balancer, ConsistentHashBalancer) else None
        chosen = balancer.pick(key, exclude)
        assert chosen is not None
        if start:
            balancer.on_start(chosen)
        out.append(chosen.id)
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- contract shared by every kind -------------------------------------------------------------


def test_factory_builds_each_kind() -> None:
    expected = {
        "round_robin": RoundRobinBalancer,
        "least_connections": LeastConnectionsBalancer,
        "random": RandomBalancer,
        "ewma": EwmaBalancer,
        "consistent_hash": ConsistentHashBalancer,
    }
    assert set(BALANCERS) == set(expected)
    for kind, cls in expected.items():
        balancer = make_balancer(kind, trio())
        assert type(balancer) is cls
        assert balancer.name == kind
        assert len(balancer.available) == 3


def test_factory_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"unknown balancer 'fastest'.*round_robin"):
        make_balancer("fastest", trio())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", [None, "user-1"])
def test_empty_returns_none(kind: str, key: str | None) -> None:
    balancer = make_balancer(kind, [])
    assert balancer.pick(key) is None
    assert balancer.pick(key, exclude={make("x")}) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", [None, "user-1"])
def test_all_unhealthy_returns_none(kind: str, key: str | None) -> None:
    instances = trio()
    for instance in instances:
        instance.healthy = False
    balancer = make_balancer(kind, instances)
    assert balancer.available == []
    assert balancer.pick(key) is None


@pytest.mark.parametrize("kind", KINDS)
def test_weight_zero_never_picked(kind: str) -> None:
    balancer = make_balancer(kind, trio(1, 0, 2))
    assert "b" not in picks(balancer, 600)


@pytest.mark.parametrize("kind", KINDS)
def test_draining_never_picked(kind: str) -> None:
    instances = trio()
    instances[0].draining = True
    balancer = make_balancer(kind, instances)
    assert set(picks(balancer, 300)) == {"b", "c"}


@pytest.mark.parametrize("kind", KINDS)
def test_refresh_after_health_change(kind: str) -> None:
    instances = trio()
    balancer = make_balancer(kind, instances)
    assert set(picks(balancer, 300)) == {"a", "b", "c"}
    instances[1].healthy = False
    balancer.refresh()
    assert set(picks(balancer, 300)) == {"a", "c"}
    instances[1].healthy = True
    balancer.refresh()
    assert set(picks(balancer, 300)) == {"a", "b", "c"}


@pytest.mark.parametrize("kind", KINDS)
def test_set_instances_replaces_membership(kind: str) -> None:
    balancer = make_balancer(kind, trio())
    balancer.set_instances([make("x"), make("y")])
    assert set(picks(balancer, 200)) == {"x", "y"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("container", [set, list, tuple, frozenset])
def test_exclude_is_honoured(
    kind: str, container: Callable[[list[Instance]], Collection[Instance]]
) -> None:
    instances = trio(3, 1, 2)
    a, _, c = instances
    balancer = make_balancer(kind, instances)
    one, two, everyone = container([a]), container([a, c]), container(instances)
    assert set(picks(balancer, 300, exclude=one, start=True)) == {"b", "c"}
    assert set(picks(balancer, 100, exclude=two, start=True)) == {"b"}
    for key in (None, "user-1", "user-2"):
        assert balancer.pick(key, exclude=everyone) is None


@pytest.mark.parametrize("kind", KINDS)
def test_exclude_of_unavailable_instances_changes_nothing(kind: str) -> None:
    instances = trio()
    instances[2].healthy = False
    balancer = make_balancer(kind, instances)
    assert set(picks(balancer, 200, exclude={instances[2], make("stranger")})) == {"a", "b"}


@pytest.mark.parametrize("kind", KINDS)
def test_in_flight_bookkeeping(kind: str) -> None:
    instances = trio()
    balancer = make_balancer(kind, instances)
    chosen = [balancer.pick(None) for _ in range(6)]
    for instance in chosen:
        assert instance is not None
        balancer.on_start(instance)
    assert sum(i.in_flight for i in instances) == 6
    for instance in chosen:
        assert instance is not None
        balancer.on_finish(instance, 0.01, True)
    assert [i.in_flight for i in instances] == [0, 0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_repr_is_informative(kind: str) -> None:
    instances = [*trio(1, 2, 3), make("d", 4)]
    instances[3].healthy = False
    text = repr(make_balancer(kind, instances))
    assert text.startswith("<") and text.endswith(">")
    assert "3 available of 4" in text


def test_round_robin_repr_exact() -> None:
    instances = [*trio(1, 2, 3), make("d")]
    instances[3].draining = True
    balancer = RoundRobinBalancer(instances)
    assert repr(balancer) == "<RoundRobinBalancer 3 available of 4, weights 1/2/3>"


def test_repr_truncates_long_lists() -> None:
    balancer = RoundRobinBalancer([make(f"i{n}", n + 1) for n in range(20)])
    assert repr(balancer).endswith("weights 1/2/3/4/5/6/7/8/...(+12)>")


@pytest.mark.parametrize("kind", KINDS)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 4), st.booleans(), st.booleans(), st.booleans()),
        max_size=8,
    ),
    key=st.none() | st.text(max_size=5),
)
def test_pick_is_always_available_and_allowed(
    kind: str, data: list[tuple[int, bool, bool, bool]], key: str | None
) -> None:
    instances = []
    excluded = set()
    for n, (weight, healthy, draining, exclude) in enumerate(data):
        instance = make(f"i{n}", weight)
        instance.healthy, instance.draining = healthy, draining
        instances.append(instance)
        if exclude:
            excluded.add(instance)
    balancer = make_balancer(kind, instances)
    allowed = [i for i in instances if i.available and i not in excluded]
    for _ in range(5):
        chosen = balancer.pick(key, exclude=excluded)
        if allowed:
            assert chosen in allowed
        else:
            assert chosen is None


# --- round robin -----------------------------------------------------------------------------


def test_round_robin_equal_weights_rotate() -> None:
    balancer = RoundRobinBalancer(trio(2, 2, 2))
    assert "".join(picks(balancer, 9)) == "abcabcabc"


def test_round_robin_smooth_sequence_matches_nginx() -> None:
    # nginx's documented example: weights 5, 1, 1 give { a, a, b, a, c, a, a }.
    balancer = RoundRobinBalancer(trio(5, 1, 1))
    assert "".join(picks(balancer, 14)) == "aabacaa" * 2


def test_round_robin_weights_exact_per_cycle_and_interleaved() -> None:
    balancer = RoundRobinBalancer(trio(1, 2, 3))
    sequence = picks(balancer, 60)
    for start in range(0, 60, 6):
        assert Counter(sequence[start : start + 6]) == {"a": 1, "b": 2, "c": 3}
    # Interleaved, not a burst like cccbba: nginx's sequence for 1, 2, 3.
    assert "".join(sequence[:12]) == "cbacbc" * 2


def test_round_robin_live_mode_matches_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = (7, 3, 5, 1, 9)
    expected = picks(RoundRobinBalancer(trio(*weights)), 100)
    monkeypatch.setattr(round_robin_module, "SCHEDULE_WORK_LIMIT", 0)
    live = RoundRobinBalancer(trio(*weights))
    assert live._schedule == []
    assert picks(live, 100) == expected
    assert set(picks(live, 100, exclude={live.instances[0]})) == {"b", "c", "d", "e"}


def test_round_robin_live_mode_keeps_its_state_across_refreshes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Live mode (large weight sums) runs nginx's loop on per-instance current weights; a
    refresh that changes nothing must not zero them, or an instance whose weight is small
    next to the total is never reached when refreshes come often (heartbeats)."""
    monkeypatch.setattr(round_robin_module, "SCHEDULE_WORK_LIMIT", 0)
    weights = (1000, 1000, 1000, 7)
    undisturbed = picks(RoundRobinBalancer(trio(*weights)), 6_012)
    balancer = RoundRobinBalancer(trio(*weights))
    refreshed: list[str] = []
    for _ in range(6_012 // 12):
        refreshed += picks(balancer, 12)
        balancer.refresh()
    assert refreshed == undisturbed
    assert Counter(refreshed)["d"] == 14  # 7 per period of 3007 picks


def test_round_robin_refresh_resets_only_the_state_of_what_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(round_robin_module, "SCHEDULE_WORK_LIMIT", 0)
    instances = trio(5, 3, 2)
    a, b, c = instances
    balancer = RoundRobinBalancer(instances)
    assert picks(balancer, 3) == ["a", "b", "c"]  # current weights now 5, -1, -4
    kept = dict(zip(balancer.available, balancer._current, strict=True))
    c.weight = 4  # c changed: it starts over; a and b go on where they were
    newcomer = make("d", 2)
    balancer.set_instances([a, b, c, newcomer])
    now = dict(zip(balancer.available, balancer._current, strict=True))
    assert (now[a], now[b]) == (kept[a], kept[b])
    assert (now[c], now[newcomer]) == (0, 0)


def test_round_robin_exclude_keeps_others_in_proportion() -> None:
    instances = trio(5, 1, 1)
    balancer = RoundRobinBalancer(instances)
    assert "".join(picks(balancer, 6, exclude={instances[0]})) == "bcbcbc"
    balancer.set_instances(trio(1, 2, 3))
    counts = Counter(picks(balancer, 600, exclude={balancer.instances[2]}))
    assert counts == {"a": 200, "b": 400}


# --- least connections -----------------------------------------------------------------------


def test_least_connections_follows_in_flight() -> None:
    instances = trio()
    a, b, c = instances
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    balancer = LeastConnectionsBalancer(instances)
    assert balancer.pick() is b
    b.in_flight = 5
    assert balancer.pick() is c


def test_least_connections_is_relative_to_weight() -> None:
    instances = trio(4, 1, 1)
    a, b, c = instances
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 1  # loads 0.75, 1, 1
    balancer = LeastConnectionsBalancer(instances)
    assert balancer.pick() is a
    a.in_flight = 5  # 1.25
    assert {balancer.pick(), balancer.pick()} == {b, c}


def test_least_connections_spreads_ties() -> None:
    instances = trio()
    balancer = LeastConnectionsBalancer(instances)
    assert "".join(picks(balancer, 6)) == "abcabc"  # all idle: rotate
    for instance in instances:
        instance.in_flight = 2
    assert "".join(picks(balancer, 6)) == "abcabc"  # equally busy: rotate too
    instances[0].in_flight = 3
    assert "".join(picks(balancer, 4)) == "bcbc"


def test_least_connections_balances_concurrent_requests() -> None:
    instances = trio()
    balancer = LeastConnectionsBalancer(instances)
    for _ in range(9):
        chosen = balancer.pick()
        assert chosen is not None
        balancer.on_start(chosen)
    assert [i.in_flight for i in instances] == [3, 3, 3]
    balancer.on_finish(instances[1], 0.01, True)
    balancer.on_finish(instances[1], 0.01, True)
    assert balancer.pick() is instances[1]


def test_least_connections_idle_ties_follow_weights() -> None:
    """Sequential traffic (every instance idle at each pick) splits in the weights' ratio,
    as nginx's least_conn breaks ties by weighted round robin."""
    instances = trio(1, 100, 3, 0)
    balancer = LeastConnectionsBalancer(instances)
    chosen = []
    for _ in range(1_040):
        instance = balancer.pick()
        assert instance is not None
        balancer.on_start(instance)
        balancer.on_finish(instance, 0.01, True)
        chosen.append(instance.id)
    assert Counter(chosen) == {"a": 10, "b": 1_000, "c": 30}
    assert "".join(chosen[:8]) != "abcabcab"  # interleaved by weight, not rotated


def test_least_connections_busy_ties_follow_weights() -> None:
    instances = trio(3, 1)
    a, b = instances
    a.in_flight, b.in_flight = 3, 1  # both at one request per unit of weight
    balancer = LeastConnectionsBalancer(instances)
    counts = Counter(picks(balancer, 400))  # (never started: the tie stays)
    assert counts == {"a": 300, "b": 100}


def test_least_connections_concurrent_load_follows_weights() -> None:
    instances = trio(1, 3)
    balancer = LeastConnectionsBalancer(instances)
    picks(balancer, 40, start=True)  # none finishes
    assert [i.in_flight for i in instances] == [10, 30]


# --- random ----------------------------------------------------------------------------------


def test_random_follows_weights() -> None:
    balancer = RandomBalancer(trio(1, 2, 3), rng=random.Random(7))
    counts = Counter(picks(balancer, 60_000))
    for name, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert counts[name] / 60_000 == pytest.approx(share, abs=0.01)


def test_random_equal_weights_are_uniform() -> None:
    balancer = RandomBalancer(trio(), rng=random.Random(11))
    counts = Counter(picks(balancer, 30_000))
    for name in "abc":
        assert counts[name] / 30_000 == pytest.approx(1 / 3, abs=0.01)


def test_random_exclude_keeps_weights_of_the_rest() -> None:
    instances = trio(1, 2, 3)
    balancer = RandomBalancer(instances, rng=random.Random(3))
    counts = Counter(picks(balancer, 30_000, exclude={instances[2]}))
    assert counts["a"] / 30_000 == pytest.approx(1 / 3, abs=0.015)
    assert counts["b"] / 30_000 == pytest.approx(2 / 3, abs=0.015)


# --- ewma ------------------------------------------------------------------------------------


def simulate(
    balancer: EwmaBalancer, clock: FakeClock, latency: dict[str, float], n: int
) -> list[str]:
    """Sequential requests; the clock advances by each response's latency."""
    chosen_ids = []
    for _ in range(n):
        chosen = balancer.pick()
        assert chosen is not None
        balancer.on_start(chosen)
        clock.now += latency[chosen.id]
        balancer.on_finish(chosen, latency[chosen.id], True)
        chosen_ids.append(chosen.id)
    return chosen_ids


def test_ewma_prefers_faster_instance_and_still_probes() -> None:
    clock = FakeClock()
    balancer = EwmaBalancer(trio(1, 1), rng=random.Random(5), clock=clock)
    sequence = simulate(balancer, clock, {"a": 0.010, "b": 0.100}, 5_000)
    counts = Counter(sequence)
    assert counts["a"] / len(sequence) > 0.8
    # The slow one is not abandoned: its estimate decays while idle and it gets re-tried.
    assert "b" in sequence[100:]


def test_ewma_penalises_slow_instance_among_many() -> None:
    clock = FakeClock()
    balancer = EwmaBalancer(trio(1, 1, 1, 1), rng=random.Random(9), clock=clock)
    latency = {"a": 0.010, "b": 0.010, "c": 0.010, "d": 0.100}
    counts = Counter(simulate(balancer, clock, latency, 4_000))
    assert counts["d"] / 4_000 < 0.05
    for name in "abc":
        assert counts[name] / 4_000 == pytest.approx(1 / 3, abs=0.05)


def test_ewma_in_flight_spreads_load_between_equal_instances() -> None:
    instances = trio(1, 1)
    clock = FakeClock()
    balancer = EwmaBalancer(instances, rng=random.Random(1), clock=clock)
    for instance in instances:
        balancer.on_start(instance)
        balancer.on_finish(instance, 0.05, True)
    for _ in range(10):  # concurrent: nothing finishes
        chosen = balancer.pick()
        assert chosen is not None
        balancer.on_start(chosen)
    assert [i.in_flight for i in instances] == [5, 5]


def test_ewma_unsampled_instance_is_tried() -> None:
    instances = trio(1, 1)
    clock = FakeClock()
    balancer = EwmaBalancer(instances, rng=random.Random(2), clock=clock)
    balancer.on_start(instances[0])
    balancer.on_finish(instances[0], 0.050, True)
    assert balancer.pick() is instances[1]


def test_ewma_peak_replaces_then_decays_with_time() -> None:
    (instance,) = trio(1)
    clock = FakeClock()
    balancer = EwmaBalancer([instance], clock=clock, tau=10.0)
    balancer.on_start(instance)
    balancer.on_finish(instance, 0.010, True)
    assert instance.ewma_latency == pytest.approx(0.010)
    balancer.on_start(instance)
    balancer.on_finish(instance, 0.500, True)  # peak: replaces at once
    assert instance.ewma_latency == pytest.approx(0.500)
    clock.now += 10.0  # one tau later a low sample has weight 1 - 1/e
    balancer.on_start(instance)
    balancer.on_finish(instance, 0.010, True)
    assert instance.ewma_latency == pytest.approx(
        0.500 / 2.718281828 + 0.010 * (1 - 1 / 2.718281828)
    )
    # A low sample right after another barely moves the estimate.
    before = instance.ewma_latency
    clock.now += 0.001
    balancer.on_start(instance)
    balancer.on_finish(instance, 0.010, True)
    assert instance.ewma_latency == pytest.approx(before, rel=1e-3)


def test_ewma_cost_decays_while_idle() -> None:
    (instance,) = trio(1)
    clock = FakeClock()
    balancer = EwmaBalancer([instance], clock=clock, tau=10.0)
    balancer.on_start(instance)
    balancer.on_finish(instance, 0.100, True)
    assert balancer.cost(instance, clock.now) == pytest.approx(0.100)
    assert balancer.cost(instance, clock.now + 10.0) == pytest.approx(0.100 / 2.718281828)
    instance.in_flight = 3
    assert balancer.cost(instance, clock.now) == pytest.approx(0.400)


def test_ewma_failure_counts_as_penalty() -> None:
    instances = trio(1, 1)
    a, b = instances
    clock = FakeClock()
    balancer = EwmaBalancer(instances, rng=random.Random(4), clock=clock, failure_penalty=1.0)
    for instance in instances:
        balancer.on_start(instance)
        balancer.on_finish(instance, 0.020, True)
    balancer.on_start(a)
    balancer.on_finish(a, 0.002, False)  # a fast failure (connection refused) is still bad
    assert a.ewma_latency == pytest.approx(1.0)
    assert a.in_flight == 0
    assert all(balancer.pick() is b for _ in range(50))
    # When the normal latency is above the penalty, a failure costs 5x the estimate.
    balancer.on_start(b)
    balancer.on_finish(b, 2.0, True)
    balancer.on_start(b)
    balancer.on_finish(b, 0.001, False)
    assert b.ewma_latency == pytest.approx(10.0)


def test_ewma_cost_is_relative_to_weight() -> None:
    instances = trio(3, 1)
    clock = FakeClock()
    balancer = EwmaBalancer(instances, rng=random.Random(8), clock=clock)
    for instance in instances:
        balancer.on_start(instance)
        balancer.on_finish(instance, 0.030, True)
        instance.in_flight = 2
    assert all(balancer.pick() is instances[0] for _ in range(20))


def test_ewma_exclude_compares_allowed_pairs() -> None:
    instances = trio(1, 1, 1, 1)
    clock = FakeClock()
    balancer = EwmaBalancer(instances, rng=random.Random(6), clock=clock)
    for instance, latency in zip(instances, (0.001, 0.010, 0.100, 0.100), strict=True):
        balancer.on_start(instance)
        balancer.on_finish(instance, latency, True)
    counts = Counter(picks(balancer, 3_000, exclude={instances[0]}))
    assert "a" not in counts
    # p2c among b, c, d: b wins whenever drawn, i.e. 2 pairs in 3.
    assert counts["b"] / 3_000 == pytest.approx(2 / 3, abs=0.04)


# --- consistent hash -------------------------------------------------------------------------

KEYS = [f"user-{n}" for n in range(10_000)]


def mapping(balancer: Balancer) -> dict[str, str]:
    out = {}
    for key in KEYS:
        chosen = balancer.pick(key)
        assert chosen is not None
        out[key] = chosen.id
    return out


def five() -> list[Instance]:
    return [make(f"10.0.0.{n}:8080") for n in range(1, 6)]


def test_consistent_hash_is_stable_and_order_independent() -> None:
    instances = five()
    first = mapping(ConsistentHashBalancer(instances))
    assert mapping(ConsistentHashBalancer(list(reversed(instances)))) == first
    assert mapping(ConsistentHashBalancer(five())) == first  # new objects, same ids


def test_consistent_hash_golden_mapping() -> None:
    # Fixed values: the hash must not depend on PYTHONHASHSEED or change across releases,
    # or every key in production moves on upgrade.
    balancer = ConsistentHashBalancer([make(f"svc-{n}") for n in range(3)])
    got = {key: balancer.pick(key).id for key in ("alice", "bob", "carol", "dave")}  # type: ignore[union-attr]
    assert got == {"alice": "svc-0", "bob": "svc-0", "carol": "svc-2", "dave": "svc-1"}


def test_consistent_hash_spreads_keys() -> None:
    counts = Counter(mapping(ConsistentHashBalancer(five())).values())
    assert len(counts) == 5
    for count in counts.values():
        assert 0.12 < count / len(KEYS) < 0.28


def test_consistent_hash_weight_adds_share() -> None:
    instances = five()
    instances[0].weight = 3
    counts = Counter(mapping(ConsistentHashBalancer(instances)).values())
    assert 0.30 < counts[instances[0].id] / len(KEYS) < 0.55  # 3/7 expected


@pytest.mark.parametrize("how", ["unhealthy", "removed"])
def test_consistent_hash_minimal_remapping(how: str) -> None:
    instances = five()
    balancer = ConsistentHashBalancer(instances)
    before = mapping(balancer)
    leaving = instances[2]
    if how == "unhealthy":
        leaving.healthy = False
        balancer.refresh()
    else:
        balancer.set_instances([i for i in instances if i is not leaving])
    after = mapping(balancer)
    moved = {key for key in KEYS if before[key] != after[key]}
    owned = {key for key in KEYS if before[key] == leaving.id}
    assert moved == owned  # no key on a remaining instance moves
    assert 0.12 < len(moved) / len(KEYS) < 0.28  # about 1/5
    # Coming back restores the original mapping exactly.
    leaving.healthy = True
    balancer.set_instances(instances)
    assert mapping(balancer) == before


def test_consistent_hash_adding_one_moves_only_to_it() -> None:
    instances = five()
    balancer = ConsistentHashBalancer(instances)
    before = mapping(balancer)
    balancer.set_instances([*instances, make("10.0.0.6:8080")])
    after = mapping(balancer)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "10.0.0.6:8080" for key in moved)
    assert 0.10 < len(moved) / len(KEYS) < 0.25  # about 1/6


def test_consistent_hash_raising_a_weight_moves_keys_only_to_it() -> None:
    instances = five()
    balancer = ConsistentHashBalancer(instances)
    before = mapping(balancer)
    instances[0].weight = 2
    balancer.refresh()
    after = mapping(balancer)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved
    assert all(after[key] == instances[0].id for key in moved)


def ring_points(balancer: ConsistentHashBalancer) -> Counter[str]:
    return Counter(owner.id for owner in balancer._owners)


RING_BOUND = 16_384  # MAX_RING_POINTS, as README states it


def test_consistent_hash_ring_size_is_bounded() -> None:
    heavy = [make(f"10.0.1.{n}:8080", 1000) for n in range(30)]  # 3,000,000 points unscaled
    balancer = ConsistentHashBalancer(heavy)
    assert RING_BOUND // 2 < len(balancer._hashes) <= RING_BOUND
    assert consistent_hash_module.MAX_RING_POINTS == RING_BOUND
    points = ring_points(balancer)
    assert len(set(points.values())) == 1  # equal weights, equal points
    counts = Counter(mapping(balancer).values())
    for count in counts.values():
        assert 0.5 / 30 < count / len(KEYS) < 1.5 / 30


def test_consistent_hash_scaled_ring_keeps_weight_ratios() -> None:
    instances = [make("heavy", 1000), make("light", 250), make("tiny", 1)]
    balancer = ConsistentHashBalancer(instances)
    assert len(balancer._hashes) <= RING_BOUND
    points = ring_points(balancer)
    assert points["heavy"] == 4 * points["light"]
    assert points["tiny"] >= 1  # scaled below one point, still on the ring


def test_consistent_hash_every_weighted_instance_keeps_a_point() -> None:
    many = [make(f"i{n}", 1000 if n == 0 else 1) for n in range(RING_BOUND + 10)]
    balancer = ConsistentHashBalancer(many)
    assert len(balancer._hashes) == len(many)  # more instances than the bound: one point each
    assert len(ring_points(balancer)) == len(many)


def test_consistent_hash_scaled_ring_removal_moves_only_its_keys() -> None:
    instances = [make(f"10.0.2.{n}:8080", 1000) for n in range(30)]
    balancer = ConsistentHashBalancer(instances)
    before = mapping(balancer)
    leaving = instances[7]
    balancer.set_instances([i for i in instances if i is not leaving])
    after = mapping(balancer)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == leaving.id}


def test_consistent_hash_exclude_walks_clockwise() -> None:
    instances = five()
    balancer = ConsistentHashBalancer(instances)
    excluded = instances[1]
    without = ConsistentHashBalancer([i for i in instances if i is not excluded])
    for key in KEYS[:2_000]:
        chosen = balancer.pick(key, exclude={excluded})
        assert chosen is not None
        assert chosen is without.pick(key)  # as if the excluded instance had left


def test_consistent_hash_without_key_round_robins() -> None:
    balancer = ConsistentHashBalancer(trio(1, 1, 1))
    assert [balancer.pick(None).id for _ in range(6)] == list("abcabc")  # type: ignore[union-attr]
    weighted = ConsistentHashBalancer(trio(5, 1, 1))
    assert [weighted.pick().id for _ in range(7)] == list("aabacaa")  # type: ignore[union-attr]


# --- the service in front of the balancer ----------------------------------------------------


def hashed_service(*weights: int) -> Service:
    targets = [{"url": f"http://10.0.3.{n}:80", "weight": w} for n, w in enumerate(weights)]
    config = ServiceConfig.model_validate({"targets": targets, "balancer": "consistent_hash"})
    return Service("hashed", config, PoolManager(asyncio.get_running_loop()))


def register(service: Service, iid: str, weight: int = 1, url: str = "http://10.0.4.1:80") -> None:
    service.add_instance(iid, url, "10.0.4.1", 80, weight=weight, base_path="")


async def test_a_heartbeat_that_changes_nothing_leaves_the_balancer_alone() -> None:
    """A heartbeat is a registration repeated: rebuilding the balancer for it (a whole hash
    ring, for consistent_hash) on every beat of every instance blocked the event loop."""
    service = hashed_service(5, 5)
    register(service, "reg", weight=3)
    balancer = service.balancer
    assert isinstance(balancer, ConsistentHashBalancer)
    ring, available = balancer._hashes, balancer.available
    register(service, "reg", weight=3)
    register(service, "reg", weight=3, url="http://10.0.4.1:80/v2")  # only the URL moved
    assert service.balancer is balancer
    assert balancer._hashes is ring and balancer.available is available


@pytest.mark.parametrize("change", ["weight", "address", "draining", "new instance"])
async def test_a_registration_that_changes_the_balancer_refreshes_it(change: str) -> None:
    service = hashed_service(5, 5)
    register(service, "reg", weight=3)
    inst = service.instances["reg"]
    available = service.balancer.available
    if change == "weight":
        register(service, "reg", weight=4)
    elif change == "address":
        service.add_instance("reg", "http://10.0.4.2:80", "10.0.4.2", 80, weight=3)
    elif change == "draining":
        inst.draining = True  # (as if its removal were under way)
        register(service, "reg", weight=3)
    else:
        register(service, "other", weight=3)
    assert service.balancer.available is not available
    assert set(service.balancer.available) == set(service.instances.values())


async def test_a_removed_instance_is_listed_draining_while_its_requests_run() -> None:
    """A deregistered (or lapsed) instance vanished from the admin API, the dashboard and
    the in-flight gauge while requests to it still ran: `draining` was never seen true."""
    service = hashed_service(5)
    register(service, "reg")
    leaving = service.instances["reg"]
    leaving.in_flight = 2
    service.remove_instance("reg")
    listed = service.listed_instances()
    assert leaving in listed and leaving.draining
    register(service, "reg")  # back under the same id: listed once, the new one
    assert [i for i in service.listed_instances() if i.id == "reg"] == [service.instances["reg"]]
    service.remove_instance("reg")
    leaving.in_flight = 0  # its requests ended: no longer listed
    assert [i.id for i in service.listed_instances()] == ["10.0.3.0:80"]


async def test_a_static_target_a_reload_drops_is_listed_draining_while_its_requests_run() -> None:
    """A reload dropping a static target deleted it outright, unlike a deregistration: it
    vanished from the admin API and /metrics while its requests ran, never shown draining."""
    service = hashed_service(5, 5)
    leaving = service.instances["10.0.3.1:80"]
    leaving.in_flight = 3
    pools = service.pools
    pools.get("hashed", leaving.id, "http", leaving.host, leaving.port)
    kept = ServiceConfig.model_validate(
        {"targets": [{"url": "http://10.0.3.0:80", "weight": 5}], "balancer": "consistent_hash"}
    )
    service.apply_config(kept)
    assert "10.0.3.1:80" not in service.instances
    assert leaving in service.listed_instances() and leaving.draining
    assert not any(key[1] == leaving.id for key in pools.pools)  # its pool retired, as before
    assert leaving not in service.balancer.available
    leaving.in_flight = 0  # its requests ended: no longer listed
    assert [i.id for i in service.listed_instances()] == ["10.0.3.0:80"]
