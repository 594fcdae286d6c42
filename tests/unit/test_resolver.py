"""The upstream name cache: coalesced lookups, TTL, stale-while-revalidate, negative caching.

No real DNS: `FakeDns` is injected as the resolver's lookup function, and a gate holds its
lookups in flight for as long as a test wants (a slow resolver).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from typing import Any

import pytest

from apigate.http.resolver import Resolver, is_ip_address


class FakeDns:
    """name -> addresses (or an exception to raise); `gate` cleared holds lookups in flight."""

    def __init__(self, **answers: list[str] | Exception) -> None:
        self.answers: dict[str, list[str] | Exception] = {
            name.replace("_", "."): answer for name, answer in answers.items()
        }
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, host: str, port: int) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        await self.gate.wait()
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (ip, port),
            )
            for ip in answer
        ]


def nxdomain() -> socket.gaierror:
    return socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def exception_log(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """What the loop's exception handler gets: 'Future exception was never retrieved' and co."""
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    return seen


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_ip_literals_are_recognised() -> None:
    assert is_ip_address("127.0.0.1") and is_ip_address("::1") and is_ip_address("fe80::1%2")
    assert not is_ip_address("localhost") and not is_ip_address("svc.internal")
    assert not is_ip_address("127.0.0.1.nip.io")


async def test_concurrent_resolves_share_one_lookup() -> None:
    dns = FakeDns(svc_test=["10.0.0.7"])
    dns.gate.clear()
    resolver = Resolver(asyncio.get_running_loop(), lookup=dns)
    waiters = [asyncio.create_task(resolver.resolve("svc.test", 80, 1.0)) for _ in range(10)]
    await settle()
    assert "1 resolving" in repr(resolver)
    dns.gate.set()
    answers = await asyncio.gather(*waiters)
    assert dns.calls == ["svc.test"]
    assert answers == [[(socket.AF_INET, "10.0.0.7")]] * 10
    # answered from the cache from now on, without awaiting anything
    assert await resolver.resolve("svc.test", 80, 1.0) == [(socket.AF_INET, "10.0.0.7")]
    assert dns.calls == ["svc.test"] and resolver.lookups == 1


async def test_an_expired_answer_keeps_serving_while_it_is_refreshed() -> None:
    dns = FakeDns(svc_test=["10.0.0.7"])
    resolver = Resolver(asyncio.get_running_loop(), ttl=0.3, lookup=dns)
    assert await resolver.resolve("svc.test", 80, 1.0) == [(socket.AF_INET, "10.0.0.7")]
    await asyncio.sleep(0.05)
    await resolver.resolve("svc.test", 80, 1.0)
    assert len(dns.calls) == 1  # still fresh

    await asyncio.sleep(0.3)  # expired; the resolver has become slow, the name moved
    dns.answers["svc.test"] = ["10.0.0.8"]
    dns.gate.clear()
    for _ in range(5):  # the old address at once (no waiting on the slow refresh), one refresh
        got = await asyncio.wait_for(resolver.resolve("svc.test", 80, 1.0), 0.01)
        assert got == [(socket.AF_INET, "10.0.0.7")]
    assert len(dns.calls) == 2

    dns.gate.set()
    await settle()
    assert await resolver.resolve("svc.test", 80, 1.0) == [(socket.AF_INET, "10.0.0.8")]
    assert len(dns.calls) == 2


async def test_a_failed_refresh_keeps_the_last_answer_and_retries_after_the_negative_ttl(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = FakeDns(svc_test=["10.0.0.7"])
    resolver = Resolver(asyncio.get_running_loop(), ttl=0.05, negative_ttl=0.3, lookup=dns)
    await resolver.resolve("svc.test", 80, 1.0)
    dns.answers["svc.test"] = OSError(socket.EAI_AGAIN, "Temporary failure in name resolution")
    await asyncio.sleep(0.06)
    with caplog.at_level(logging.INFO, logger="apigate.upstream.dns"):
        for _ in range(3):
            assert await resolver.resolve("svc.test", 80, 1.0) == [(socket.AF_INET, "10.0.0.7")]
            await settle()
        assert len(dns.calls) == 2  # the failure is not retried at once
        await asyncio.sleep(0.31)
        assert await resolver.resolve("svc.test", 80, 1.0) == [(socket.AF_INET, "10.0.0.7")]
        await settle()
        assert len(dns.calls) == 3
        dns.answers["svc.test"] = ["10.0.0.9"]
        await asyncio.sleep(0.31)
        await resolver.resolve("svc.test", 80, 1.0)
        await settle()
        assert await resolver.resolve("svc.test", 80, 1.0) == [(socket.AF_INET, "10.0.0.9")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not per failed lookup
    assert "last known 1 addresses" in warnings[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "upstream name svc.test resolves again"
    ]


async def test_a_failure_is_cached_for_the_negative_ttl(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns(dead_test=nxdomain())
    resolver = Resolver(asyncio.get_running_loop(), negative_ttl=0.3, lookup=dns)
    with caplog.at_level(logging.WARNING, logger="apigate.upstream.dns"):
        for _ in range(20):
            with pytest.raises(socket.gaierror, match=r"dead\.test: Name or service"):
                await resolver.resolve("dead.test", 80, 1.0)
        assert dns.calls == ["dead.test"]  # one lookup, not one per request

        await asyncio.sleep(0.31)
        with pytest.raises(socket.gaierror):
            await resolver.resolve("dead.test", 80, 1.0)
        assert len(dns.calls) == 2
    assert len([r for r in caplog.records if "dead.test does not resolve" in r.getMessage()]) == 1


async def test_each_failure_is_a_new_exception() -> None:
    """Raising one stored exception again and again would grow its traceback without end."""
    resolver = Resolver(asyncio.get_running_loop(), lookup=FakeDns(dead_test=nxdomain()))
    errors = []
    for _ in range(3):
        with pytest.raises(OSError) as info:
            await resolver.resolve("dead.test", 80, 1.0)
        errors.append(info.value)
    assert len({id(e) for e in errors}) == 3
    assert errors[0].errno == socket.EAI_NONAME


async def test_a_waiter_that_gives_up_does_not_cancel_the_lookup() -> None:
    loop = asyncio.get_running_loop()
    dns = FakeDns(slow_test=["10.0.0.7"])
    dns.gate.clear()
    resolver = Resolver(loop, lookup=dns)
    with pytest.raises(TimeoutError):
        await resolver.resolve("slow.test", 80, 0.01)
    cancelled = asyncio.create_task(resolver.resolve("slow.test", 80, 5.0))
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    pending = resolver.entries[("slow.test", 80)].pending
    assert pending is not None and not pending.done()  # still looking up
    dns.gate.set()
    await settle()
    # the next connect has the answer without a new lookup
    assert await resolver.resolve("slow.test", 80, 0.01) == [(socket.AF_INET, "10.0.0.7")]
    assert dns.calls == ["slow.test"]


async def test_a_failed_lookup_nobody_waits_for_anymore_logs_no_loop_error() -> None:
    loop = asyncio.get_running_loop()
    seen = exception_log(loop)
    dns = FakeDns(dead_test=nxdomain(), odd_test=RuntimeError("resolver bug"))
    dns.gate.clear()
    resolver = Resolver(loop, lookup=dns)
    for name in ("dead.test", "odd.test"):
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await resolver.resolve(name, 80, 0.001)
    dns.gate.set()
    await settle()
    gc.collect()
    await settle()
    assert seen == []  # no "Future/Task exception was never retrieved"
    with pytest.raises(OSError, match=r"cannot resolve odd\.test: resolver bug"):
        await resolver.resolve("odd.test", 80, 1.0)


async def test_addresses_keep_their_order_once_each_and_prefer_moves_one_first() -> None:
    dns = FakeDns(two_test=["10.0.0.1", "10.0.0.1", "::1", "10.0.0.2"])
    resolver = Resolver(asyncio.get_running_loop(), ttl=0.1, lookup=dns)
    v4, v6 = socket.AF_INET, socket.AF_INET6
    first = await resolver.resolve("two.test", 80, 1.0)
    assert first == [(v4, "10.0.0.1"), (v6, "::1"), (v4, "10.0.0.2")]
    resolver.prefer("two.test", 80, (v4, "10.0.0.2"))
    assert first == [(v4, "10.0.0.1"), (v6, "::1"), (v4, "10.0.0.2")]  # not changed in place
    preferred = [(v4, "10.0.0.2"), (v4, "10.0.0.1"), (v6, "::1")]
    assert await resolver.resolve("two.test", 80, 1.0) == preferred
    await asyncio.sleep(0.11)
    await resolver.resolve("two.test", 80, 1.0)  # refreshes with the same answer
    await settle()
    assert len(dns.calls) == 2
    assert await resolver.resolve("two.test", 80, 1.0) == preferred  # the preference stays


async def test_forget_and_close() -> None:
    dns = FakeDns(a_test=["10.0.0.1"], b_test=["10.0.0.2"])
    resolver = Resolver(asyncio.get_running_loop(), lookup=dns)
    await resolver.resolve("a.test", 80, 1.0)
    dns.gate.clear()
    waiter = asyncio.create_task(resolver.resolve("b.test", 80, 5.0))
    await settle()
    resolver.forget("a.test", 80)
    assert list(resolver.entries) == [("b.test", 80)]

    resolver.close()  # the lookup in flight stops; its waiter gets an error, not a hang
    with pytest.raises(OSError, match=r"cannot resolve b\.test"):
        await waiter
    assert resolver.entries == {}
    with pytest.raises(OSError, match="shutting down"):
        await resolver.resolve("a.test", 80, 1.0)


async def test_names_past_the_bound_drop_the_expired_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name only the health checks probe has no pool to forget it on retirement: churn of
    registrations with a new name each grew the cache for ever. Past MAX_NAMES, a new name
    drops the expired ones."""
    monkeypatch.setattr("apigate.http.resolver.MAX_NAMES", 10)
    names = {f"pod{i}_test": ["10.0.0.1"] for i in range(30)}
    dns = FakeDns(**names)
    resolver = Resolver(asyncio.get_running_loop(), ttl=0.05, lookup=dns)
    for i in range(9):
        await resolver.resolve(f"pod{i}.test", 80, 1.0)
    await asyncio.sleep(0.06)  # those expire
    for i in range(9, 30):
        await resolver.resolve(f"pod{i}.test", 80, 1.0)
        await asyncio.sleep(0.006)
    assert len(resolver.entries) <= 11, len(resolver.entries)
