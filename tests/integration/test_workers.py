"""`apigate run --workers N`: a supervisor and N real worker processes on one port (port 0
resolved once), sharing a real Redis. The node's admin API answers for every worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request
from tests.support.redis_server import RedisServer
from tests.support.traffic import until
from tests.support.upstream import Upstream


def _config(redis: RedisServer, **overrides: Any) -> dict[str, Any]:
    cfg = base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        store=redis.url,
        services={"hello": {}},
        routes=[{"name": "hello", "match": {"paths": ["/"]}, "service": "hello"}],
    )
    cfg.update(overrides)
    return cfg


@contextlib.asynccontextmanager
async def _node(
    config: dict[str, Any], workers: int = 2, *args: str
) -> AsyncIterator[GatewayProcess]:
    async with GatewayProcess(config, args=("--workers", str(workers), *args)) as node:
        yield node


async def _workers(node: GatewayProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await request(node.admin_port, "GET", "/workers")).json()[
        "workers"
    ]
    return rows


async def _metric(node: GatewayProcess, sample: str, **labels: str) -> float:
    """The sum of the node's samples named `sample` whose labels include `labels`."""
    text = (await request(node.admin_port, "GET", "/metrics")).body.decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


async def _served(node: GatewayProcess, count: int, path: str = "/") -> list[int]:
    """Statuses of `count` requests, each on its own connection (so the kernel spreads them)."""
    replies = await asyncio.gather(*(request(node.port, "GET", path) for _ in range(count)))
    return [reply.status for reply in replies]


async def _register(node: GatewayProcess, upstream: Upstream) -> None:
    body = {"url": upstream.url, "ttl": "30s"}
    reply = await request(node.admin_port, "PUT", "/services/hello/instances/a", json_body=body)
    assert reply.status == 201, reply.body


async def test_workers_share_the_port_and_the_admin_api_answers_for_all_of_them() -> None:
    async with RedisServer() as redis, Upstream("a") as a, _node(_config(redis)) as node:
        await _register(node, a)  # through worker 0: reaches worker 1 through Redis
        # (the announcement takes milliseconds: wait until 10 in a row are served)
        await until(lambda: _served(node, 10), lambda s: s == [200] * 10)
        before = await _metric(node, "apigate_requests_total")
        statuses = await _served(node, 60)
        assert statuses == [200] * 60  # every worker serves the instance worker 0 registered

        workers = await _workers(node)
        assert [w["index"] for w in workers] == [0, 1]
        assert all(w["answered"] for w in workers)
        assert len({w["pid"] for w in workers}) == 2 and node.pid not in {w["pid"] for w in workers}
        assert all(w["requests"] > 0 for w in workers), workers  # both really served
        total = sum(w["requests"] for w in workers)
        assert await _metric(node, "apigate_requests_total") == total == before + 60
        assert await _metric(node, "apigate_workers_scraped") == 2
        stats = (await request(node.admin_port, "GET", "/stats")).json()
        assert stats["workers"] == {"count": 2, "answered": 2}
        await until(  # (the ring ticks once a second)
            lambda: request(node.admin_port, "GET", "/stats"),
            lambda r: r.json()["routes"].get("hello", {}).get("total") == total,
        )
        # per-worker state keeps its worker; amounts are summed
        assert await _metric(node, "apigate_instance_healthy", worker="1") == 1
        assert await _metric(node, "apigate_instance_healthy", worker="0") == 1

        # `apigate status` reads the node's admin API as it reads a lone gateway's
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "apigate", "status", "--admin", node.admin_url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await status.communicate()
        assert status.returncode == 0 and b"hello" in out

        # an admin change that would count a limit per worker is refused
        route = {
            "match": {"paths": ["/limited"]},
            "service": "hello",
            "plugins": {"rate_limit": {"requests": 5, "per": "1s", "store": "local"}},
        }
        reply = await request(node.admin_port, "PUT", "/routes/limited", json_body=route)
        assert reply.status in (400, 409, 422) and b"2 times" in reply.body, reply.body


async def test_a_killed_worker_is_restarted_and_the_port_keeps_answering() -> None:
    async with RedisServer() as redis, Upstream("a") as a, _node(_config(redis)) as node:
        await _register(node, a)
        await until(lambda: _served(node, 10), lambda s: s == [200] * 10)
        assert await _metric(node, "apigate_requests_total") >= 10  # read: worker 1's counts too
        counted = await _metric(node, "apigate_requests_total")
        old = {w["index"]: w["pid"] for w in await _workers(node)}

        os.kill(old[1], signal.SIGKILL)
        await until(lambda: _gone(old[1]), bool)
        assert await _served(node, 20) == [200] * 20  # worker 0 alone meanwhile

        def restarted(rows: list[dict[str, Any]]) -> bool:
            return rows[1].get("pid") not in (None, old[1]) and rows[1]["restarts"] == 1

        await until(lambda: _workers(node), restarted)
        await until(lambda: _served(node, 10), lambda s: s == [200] * 10)
        # the dead worker's requests stay counted: the node's counter never goes down
        assert await _metric(node, "apigate_requests_total") >= counted + 30

        # worker 0 (the admin listener's) too: a new one serves the admin API on the same port
        os.kill(old[0], signal.SIGKILL)
        await until(lambda: _gone(old[0]), bool)
        assert await _served(node, 10) == [200] * 10
        rows = await until(lambda: _workers_or_none(node), lambda rows: rows is not None)
        assert rows[0]["pid"] != old[0] and rows[0]["restarts"] == 1


async def _gone(pid: int) -> bool:
    """Whether the supervisor has reaped its worker `pid`. (Not merely a zombie: a killed
    process's leader is one while its other threads still hold its sockets open, and the
    connections the kernel hands those meanwhile are reset.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _exited(pid: int) -> bool:
    """Whether `pid`, which nobody may reap (its parent is gone), has exited: a zombie too."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


async def _all_gone(pids: list[int]) -> bool:
    return all(_exited(pid) for pid in pids)


async def _workers_or_none(node: GatewayProcess) -> list[dict[str, Any]] | None:
    try:
        return await _workers(node)
    except OSError:
        return None


async def test_sigterm_drains_in_flight_requests_and_exits_0() -> None:
    async with RedisServer() as redis, Upstream("a") as a:
        services = {"hello": {"targets": [a.url]}}
        async with _node(_config(redis, services=services)) as node:
            pids = [w["pid"] for w in await _workers(node)]
            slow = [
                asyncio.create_task(request(node.port, "GET", "/slow?ms=700")) for _ in range(6)
            ]
            await until(lambda: _in_flight(a), lambda n: n >= 6)
            node.signal(signal.SIGTERM)
            replies = await asyncio.gather(*slow)
            assert [r.status for r in replies] == [200] * 6  # finished, not cut
            assert await node.wait() == 0
            assert await _all_gone(pids)


async def test_the_workers_stop_when_the_supervisor_is_killed() -> None:
    """No worker outlives its supervisor, however it ends: SIGKILL leaves it no chance to
    signal them, so each notices its lifeline close."""
    async with RedisServer() as redis, _node(_config(redis)) as node:
        pids = [w["pid"] for w in await _workers(node)]
        assert len(pids) == 2
        run_dir = _role(pids[0])["run_dir"]
        assert _present(run_dir)
        node.signal(signal.SIGKILL)
        assert await node.wait() == -signal.SIGKILL
        await until(lambda: _all_gone(pids), bool, within=10)
        assert not _present(run_dir)  # (its killed supervisor could not remove it)


def _present(path: str) -> bool:
    return os.path.exists(path)


def _role(pid: int) -> dict[str, Any]:
    """The `--worker-role` a worker was started with, from its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    role: dict[str, Any] = json.loads(argv[argv.index(b"--worker-role") + 1])
    return role


async def _in_flight(upstream: Upstream) -> int:
    return len(upstream.received)


async def test_sighup_reloads_every_worker_and_watch_does_too(tmp_path: Path) -> None:
    async with RedisServer() as redis, Upstream("a") as a:
        services = {"hello": {"targets": [a.url]}}
        config = _config(redis, services=services)
        async with _node(config, 2, "--watch") as node:
            reloads = await _metric(node, "apigate_config_reloads_total", result="ok")
            assert await _served(node, 10, "/v2/x") == [200] * 10  # (the "/" route)
            config["routes"] = [
                {"name": "v2", "match": {"paths": ["/v2"]}, "service": "hello"},
            ]
            node.write_config(config)  # --watch: each worker sees the file change
            await until(
                lambda: _metric(node, "apigate_config_reloads_total", result="ok"),
                lambda n: n == reloads + 2,
            )
            assert await _served(node, 20, "/x") == [404] * 20  # on every worker

            reloads += 2
            node.signal(signal.SIGHUP)  # SIGHUP: the supervisor passes it to every worker
            await until(
                lambda: _metric(node, "apigate_config_reloads_total", result="ok"),
                lambda n: n == reloads + 2,
            )


async def test_a_worker_that_cannot_start_again_ends_the_supervisor() -> None:
    async with RedisServer() as redis, Upstream("a") as a:
        config = _config(redis, services={"hello": {"targets": [a.url]}})
        async with _node(config) as node:
            pids = {w["index"]: w["pid"] for w in await _workers(node)}
            node.write_config({**config, "routes": [{"name": "broken"}]})  # invalid now
            os.kill(pids[1], signal.SIGKILL)
            assert await node.wait(15) == 2  # the worker's status (an invalid config)
            assert "failed to start 3 times" in node.logs()
            assert ": invalid\n  routes[0]" in node.logs()
            assert await _gone(pids[0])


async def _refusal(config: dict[str, Any], tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "apigate.yaml"
    path.write_text(json.dumps(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "apigate", "run", "-c", str(path), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert b"listening" not in out
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_refused_with_the_memory_store_or_a_limit_counted_per_worker(
    tmp_path: Path,
) -> None:
    memory = base_config(services={"hello": {"targets": ["http://127.0.0.1:9"]}})
    status, err = await _refusal(memory, tmp_path)
    assert status == 2
    assert "store: redis://" in err and "2 times its requests" in err, err

    limited = base_config(
        store="redis://127.0.0.1:9/0",  # (refused before anything connects)
        services={"hello": {"targets": ["http://127.0.0.1:9"]}},
        routes=[
            {
                "name": "hello",
                "match": {"paths": ["/"]},
                "service": "hello",
                "plugins": {"rate_limit": {"requests": 5, "per": "1s", "store": "local"}},
            }
        ],
    )
    status, err = await _refusal(limited, tmp_path)
    assert status == 2 and "routes[0] (hello).rate_limit" in err, err


async def test_the_access_log_of_every_worker_keeps_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with RedisServer() as redis, Upstream("a") as a:
        config = _config(
            redis,
            services={"hello": {"targets": [a.url]}},
            plugins={"access_log": {"path": str(log)}},
        )
        async with _node(config) as node:
            for _ in range(5):
                assert await _served(node, 60) == [200] * 60
            workers = await _workers(node)
            assert all(w["requests"] > 0 for w in workers)
        lines = log.read_text().splitlines()
        assert len(lines) == 300
        assert all(json.loads(line)["status"] == 200 for line in lines)


async def test_a_cache_purge_reaches_every_worker() -> None:
    """Each worker keeps its own memory cache: a purge through the admin API (worker 0's)
    left the other workers answering from theirs."""
    async with RedisServer() as redis, Upstream("a") as a:
        config = _config(
            redis,
            services={"hello": {"targets": [a.url]}},
            routes=[
                {
                    "name": "hello",
                    "match": {"paths": ["/"]},
                    "service": "hello",
                    "plugins": {"cache": {"ttl": "1h"}},
                }
            ],
        )
        async with _node(config) as node:
            # 40 connections: the kernel gives each worker some, and each caches on its miss
            assert await _served(node, 40, "/page") == [200] * 40
            assert len(a.received) == 2  # one miss per worker
            purged = await request(node.admin_port, "DELETE", "/cache")
            assert purged.status == 200, purged.body
            assert purged.json()["purged"] == 2
            assert purged.json()["workers"] == {"count": 2, "purged": 2}
            assert await _served(node, 40, "/page") == [200] * 40
            assert len(a.received) == 4  # a miss again in each worker: both were purged

            # a worker that cannot confirm (stopped): not a 200 that claims the purge was done
            pid = {w["index"]: w["pid"] for w in await _workers(node)}[1]
            os.kill(pid, signal.SIGSTOP)
            try:
                partial = await request(node.admin_port, "DELETE", "/cache")
            finally:
                os.kill(pid, signal.SIGCONT)
            assert partial.status == 503, partial.body
            assert partial.json()["error"] == "purge_incomplete"
            assert "workers [1]" in partial.json()["message"]
