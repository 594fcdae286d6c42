"""The gateway process: listeners, runtime swaps, signals, graceful drain.

`Gateway` owns the long-lived state (pools, services, the current `Runtime`) and implements the
`ConnectionHost` the client connections read. `reload()` compiles a new snapshot next to the old
one and swaps a single attribute: in-flight exchanges keep the snapshot they started with.
An invalid new config is rejected with its reasons and the old snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from apigate.buildinfo import build_name, stale_modules
from apigate.config.errors import ConfigError
from apigate.config.loader import ConfigSources, load_config
from apigate.config.schema import GatewayConfig
from apigate.http.date import DATE
from apigate.http.errors import GatewayError
from apigate.http.headers import RequestIds, TrustedProxies
from apigate.http.output import WriteBatch
from apigate.http.pool import PoolManager
from apigate.http.protocol import ClientConnection
from apigate.http.request import Request
from apigate.plugins.base import PluginEnv
from apigate.proxy.exchange import ExchangeFactory
from apigate.redaction import redact_url
from apigate.registry.events import EVENTS
from apigate.registry.health import health_checker
from apigate.runtime import Runtime, ServiceTable, compile_runtime, prepare_runtime
from apigate.worker import WorkerRole

log = logging.getLogger("apigate.server")

# Hooks other subsystems (admin API, registry, health checks) attach to the gateway lifecycle.
StartHook = Callable[["Gateway"], Awaitable[None]]


class Gateway:
    """One gateway process: implements `apigate.http.protocol.ConnectionHost`."""

    def __init__(self, config: GatewayConfig, *, config_path: str | Path | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.clock = time.monotonic  # (ConnectionHost.clock: finer than the loop's)
        self.config_path = Path(config_path) if config_path else None
        self.limits = config.limits
        self.request_ids = RequestIds()
        self.trusted_proxies = TrustedProxies(config.listeners.proxy.trusted_proxies)
        self.scheme = "https" if config.listeners.proxy.tls else "http"
        self.connections: set[ClientConnection] = set()
        # one batch for both sides: a response and the next request upstream go out together
        self.writes = WriteBatch(self.loop)
        self.pools = PoolManager(self.loop, writes=self.writes)
        self.services = ServiceTable(self.pools)
        self.env = PluginEnv(config=config, loop=self.loop)
        # called with every finished exchange (metrics); plain functions, no awaiting
        self.observers: list[Callable[[Any], None]] = []
        # ConnectionHost.exchange_maker: compiled (one call per request), it holds the current
        # runtime (see `runtime`) and whether the gateway is draining (see `draining`)
        self.exchange_maker = ExchangeFactory(
            compile_runtime(config, self.services, self.env), self.observers
        )
        self.proxy_server: asyncio.Server | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_error: str | None = None
        self.on_start: list[StartHook] = []
        self.on_stop: list[StartHook] = []  # as the drain starts
        self.on_drained: list[StartHook] = []  # once it is over (the admin API closes here)
        self.on_runtime: list[Callable[[Runtime], None]] = []
        # control-plane subsystems by name ("registry", "config_ops", "tls", ...)
        self.extensions: dict[str, Any] = {}
        # how a re-read file becomes the effective config (the admin store adds its changes)
        self.compose_config: Callable[[GatewayConfig], GatewayConfig] = lambda c: c
        # what a reload of the file puts in force, as its event says (the admin API's
        # ConfigOps: only the file's listeners and store once a POST /config replaced it)
        self.file_role: Callable[[], str] = lambda: "the file"
        self.admin_server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._applying = asyncio.Lock()  # apply_config: one at a time
        self._watch_task: asyncio.Task[None] | None = None
        # the files the config was last read from (the main one, includes, include globs)
        self.config_sources: ConfigSources | None = None
        # signals are handled from before start-up; what arrives until `serve` says the
        # gateway is up waits (see install_signal_handlers)
        self._signals_ready = False
        self._pending_signals: list[int] = []
        self._retiring: set[asyncio.Task[None]] = set()
        # replaced snapshots waiting out the drain timeout before their plugins close
        self._retire_pending: list[tuple[Runtime, asyncio.TimerHandle]] = []
        self._settling: asyncio.TimerHandle | None = None  # one collection for retirements
        self._drain_deadline = 0.0  # loop time the drain ends at (a second stop signal: now)
        self._stop_now = False  # a second stop signal came: no drain, even if it came early
        # one of `apigate run --workers N`'s processes (None: the only one, as by default)
        self.worker: WorkerRole | None = None

    @property
    def runtime(self) -> Runtime:
        """The snapshot new requests are served by (kept in the exchange factory)."""
        return self.exchange_maker.runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        self.exchange_maker.runtime = runtime

    @property
    def draining(self) -> bool:
        """Stopping: the connections close after their current response (kept in the
        exchange factory, where they read it)."""
        return self.exchange_maker.draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self.exchange_maker.draining = draining

    @property
    def config(self) -> GatewayConfig:
        return self.runtime.config

    def refused(
        self, conn: ClientConnection, request: Request, err: GatewayError, sent: int
    ) -> None:
        """ConnectionHost.refused: a request refused before it had an exchange (its head
        malformed, over a limit, too slow) is logged and counted through one made for it."""
        self.exchange_maker.new_exchange(conn, request).refused(err, sent)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        DATE.start(self.loop)
        listener = self.config.listeners.proxy
        if listener.tls is not None:
            from apigate.http.tls import ServerTLS

            tls = ServerTLS(listener.tls)  # ConfigError: missing, mismatched or expired files
            self.extensions["tls"] = tls
            self.ssl_context = tls.context
            tls.watch()  # renewed files are loaded into the same context, without restart
            self.on_runtime.append(lambda runtime: tls.update(runtime.config.listeners.proxy.tls))
            self.on_stop.append(lambda _gateway: tls.close())
        # Bound now (its address is known to the hooks, a busy port fails here), accepting
        # only once the start hooks ran: with `store: redis://` the first hook to read the
        # shared state is the cluster's resync, and a node that accepted before it answered
        # 503 no_healthy_instance for every registered service (and /readyz said 200) until
        # it had the registrations. Until then a client's connect is refused, as for a node
        # that is not up, rather than answered wrongly.
        # A worker binds the port its supervisor resolved and keeps reserved, next to the
        # other workers' sockets (SO_REUSEPORT: the kernel spreads connections among them).
        worker = self.worker
        self.proxy_server = await self.loop.create_server(
            lambda: ClientConnection(self),
            host=listener.host or None,
            port=worker.proxy_port if worker is not None else listener.port,
            reuse_address=True,
            reuse_port=worker is not None or None,
            backlog=4096,
            ssl=self.ssl_context,
            # a client that never finishes its handshake is cut off like a slow header
            ssl_handshake_timeout=self.limits.header_timeout if self.ssl_context else None,
            start_serving=False,
        )
        await self._start_plugins(self.runtime)
        for hook in self.on_start:
            await hook(self)
        await self.proxy_server.start_serving()
        settle_heap()
        log.info(
            "proxy listening",
            extra={"event": "listen", "address": self.proxy_address, "build": build_name()},
        )
        stale = stale_modules()
        if stale:  # a source checkout edited after `make build`: the old code is what runs
            log.warning(
                "compiled modules are older than their sources; run `make build` or `make pure`",
                extra={"event": "stale_build", "modules": stale},
            )

    @property
    def proxy_address(self) -> str:
        assert self.proxy_server is not None
        sock = self.proxy_server.sockets[0]
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}" if sock.family != socket.AF_INET6 else f"[{host}]:{port}"

    @property
    def proxy_port(self) -> int:
        assert self.proxy_server is not None
        return int(self.proxy_server.sockets[0].getsockname()[1])

    @property
    def admin_address(self) -> str:
        assert self.admin_server is not None
        host, port = self.admin_server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def own_addresses(self) -> set[tuple[str, int]]:
        """(host, port) of every listener, so registrations cannot point back at us."""
        out: set[tuple[str, int]] = set()
        for server in (self.proxy_server, self.admin_server):
            if server is not None:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    out.add((host, int(port)))
        return out

    def health_status(self, service: str) -> dict[str, dict[str, Any]]:
        """Active health-check state per instance id (healthy, last_check, last_error,
        successes, failures); empty when the service has no `health.active` or no checker
        is attached."""
        checker = health_checker(self)  # attach_health keeps it by gateway
        return checker.status(service) if checker is not None else {}

    async def _start_plugins(self, runtime: Runtime) -> None:
        """Start the snapshot's plugins together: a start may wait on the network (a Redis
        ping, a JWKS fetch), and one after another, with Redis hung, every Redis-kept rate
        limit waited out its timeout in turn (an admin change took 7 s to be refused). All
        have ended when this returns; the first failure is raised."""
        outcomes = await asyncio.gather(
            *(plugin.start() for plugin in runtime.plugins), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _close_plugins(
        self, old: Runtime, new: Runtime | None, closed: set[int] | None = None
    ) -> None:
        """Close `old`'s plugins that `new` does not keep (and none in `closed`, the ids of
        those closed already, which it is added to). A plugin's failure to close is logged:
        it may be a buffer of audit records lost (it used to be swallowed)."""
        keep = set(map(id, new.plugins)) if new else set()
        for plugin in old.plugins:
            if id(plugin) in keep or (closed is not None and id(plugin) in closed):
                continue
            if closed is not None:
                closed.add(id(plugin))
            try:
                await plugin.close()
            except Exception:
                log.exception("plugin %r failed to close", plugin)

    # ------------------------------------------------------------------ reload
    async def apply_config(
        self, config: GatewayConfig, before_swap: Callable[[], Awaitable[None]] | None = None
    ) -> Runtime:
        """Compile and swap in a new snapshot; raises ConfigError and keeps the old one.

        One at a time (a SIGHUP while an admin change starts its plugins waits its turn): the
        service table is planned against the config in force and committed at the swap.
        `before_swap` runs once the snapshot is ready, just before it goes into force (an
        admin change stores itself there); whatever it raises is raised, nothing changed."""
        async with self._applying:
            return await self._apply_config(config, before_swap)

    async def _apply_config(
        self, config: GatewayConfig, before_swap: Callable[[], Awaitable[None]] | None
    ) -> Runtime:
        if problems := self.restart_changes(config):
            raise ConfigError(problems)
        if self.worker is not None and (problems := self.worker.config_problems(config)):
            raise ConfigError(problems)
        if config.listeners.proxy.tls is not None:
            from apigate.http.tls import tls_change_problems

            # a changed, broken TLS section rejects the whole reload; an unchanged one's files
            # are the certificate watcher's business (logged, the loaded ones keep serving)
            in_force = self.config.listeners.proxy.tls
            if problems := tls_change_problems(config.listeners.proxy.tls, in_force):
                raise ConfigError(problems)
        self.env.config = config
        runtime: Runtime | None = None
        try:
            # nothing here touches the service table: a config refused by a plugin (or by
            # a plugin's start) leaves it exactly as the serving snapshot has it
            runtime, plan = prepare_runtime(config, self.services, self.env)
            await self._start_plugins(runtime)
        except Exception as exc:  # any failure: the old snapshot and services stay in force
            self.env.config = self.runtime.config
            if runtime is not None:  # close what did start (the old snapshot's stay open)
                await self._close_plugins(runtime, self.runtime)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError([f"the new config could not be started: {exc}"]) from exc
        if before_swap is not None:
            try:
                await before_swap()
            except BaseException:
                self.env.config = self.runtime.config
                await self._close_plugins(runtime, self.runtime)
                raise
        self.services.commit(plan)
        old, self.runtime = self.runtime, runtime
        self.limits = config.limits
        self.trusted_proxies = TrustedProxies(config.listeners.proxy.trusted_proxies)
        for callback in self.on_runtime:
            callback(runtime)
        gc.freeze()  # the new snapshot out of the collector's way at once (see settle_heap)
        # Plugins of the old snapshot may still serve in-flight requests: close them later
        # (or at shutdown, if that comes first).
        retiring = (old, self.loop.call_later(self.limits.drain_timeout, self._retire_later, old))
        self._retire_pending.append(retiring)
        return runtime

    def _retire_later(self, old: Runtime) -> None:
        self._retire_pending = [item for item in self._retire_pending if item[0] is not old]
        self._keep(self.loop.create_task(self._retire(old)))

    def restart_changes(self, config: GatewayConfig) -> list[str]:
        """What `config` would change that only a restart can: the sockets this process
        listens on, and the store it keeps admin changes in (opened once, at start-up). A
        reload that asks for one is refused rather than reported as done and not done."""
        problems = []
        if config.store != self.config.store:
            old_store, new_store = redact_url(self.config.store), redact_url(config.store)
            problems.append(f"store: {old_store} -> {new_store} needs a restart")
        return problems + self.listener_changes(config)

    def listener_changes(self, config: GatewayConfig) -> list[str]:
        """What `config` would change of the sockets this process listens on."""
        if self.proxy_server is None:  # not listening yet: start() binds what the config says
            return []
        old, new = self.config.listeners, config.listeners
        problems = []
        if new.proxy.address != old.proxy.address:
            problems.append(
                f"listeners.proxy.address: {old.proxy.address} -> {new.proxy.address} "
                "needs a restart"
            )
        if (new.proxy.tls is None) != (old.proxy.tls is None):
            problems.append("listeners.proxy.tls: turning TLS on or off needs a restart")
        old_admin = old.admin.address if old.admin is not None else None
        new_admin = new.admin.address if new.admin is not None else None
        if new_admin != old_admin:
            problems.append(f"listeners.admin: {old_admin} -> {new_admin} needs a restart")
        return problems

    async def _retire(self, old: Runtime) -> None:
        """After the drain: close the old snapshot's plugins, then free the snapshot."""
        await self._close_plugins(old, self.runtime)
        del old  # (unreachable now, so that the collection in settle_heap frees it)
        if self._settling is None:
            self._settling = self.loop.call_later(SETTLE_DELAY, self._settle)

    def _settle(self) -> None:
        """One full collection for the snapshots retired within SETTLE_DELAY of each other.
        Each retirement ran its own: a full collection walks every object (tens of ms), and
        300 admin changes in 0.4 s stalled the proxy for 12 s once their drains ended."""
        self._settling = None
        settle_heap()

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._retiring.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(self._retiring.discard)

    async def reload(self) -> bool:
        """Re-read the config file (SIGHUP, --watch). Returns whether the new config took."""
        self.reload_certificates()
        path = self.config_path
        if path is None:
            return False

        def make() -> GatewayConfig:
            sources = ConfigSources()
            try:
                return self.compose_config(load_config(path, sources=sources))
            finally:  # (read even when invalid: --watch then sees the fix in any of them)
                self.config_sources = sources

        return await self.apply_reload(make, self.file_role()) is None

    async def apply_reload(
        self, make: Callable[[], GatewayConfig], source: str = "the file"
    ) -> str | None:
        """Make and apply a config read again: the file (SIGHUP, --watch) or the shared store
        (another node's change). Counted in `reloads_ok`/`reloads_failed` and logged either
        way; returns why it was refused (the previous config keeps serving), or None."""
        try:
            runtime = await self.apply_config(make())
        except ConfigError as exc:
            self.reloads_failed += 1
            self.last_reload_error = str(exc)
            EVENTS.record(
                "config",
                f"reload rejected (from {source}); the previous config keeps serving:\n{exc}",
                logging.ERROR,
                ok=False,
                source=source,
            )
            return str(exc)
        self.reloads_ok += 1
        self.last_reload_error = None
        EVENTS.record(
            "config",
            f"config reloaded (from {source})",
            ok=True,
            source=source,
            generation=runtime.generation,
        )
        return None

    def reload_certificates(self) -> bool:
        """Re-read the proxy listener's certificate files; rejected ones keep the old serving."""
        tls = self.extensions.get("tls")
        return bool(tls.reload()) if tls is not None else True

    def watch(self, interval: float = 1.0) -> None:
        """Reload whenever the config file, a file it includes, or the set of files an
        `include:` glob matches changes (mtime, size, created, removed), once they have
        stopped changing for one `interval` (see files_settled)."""
        path = self.config_path
        if path is None:
            return
        if self.config_sources is None:  # (serve() records them as it reads the file)
            self.config_sources = ConfigSources(files=[path.resolve()])

        def sources() -> ConfigSources:
            assert self.config_sources is not None
            return self.config_sources

        async def loop() -> None:
            last = seen = sources().stamp()
            while True:
                await asyncio.sleep(interval)
                read = sources()
                now = read.stamp()
                settled, seen = files_settled(last, seen, now), now
                if settled:
                    await self.reload()
                    last = seen = now
                    if sources() != read:  # it includes other files now: watch those
                        last = seen = sources().stamp()

        self._watch_task = self.loop.create_task(loop())

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), then close."""
        if self.draining:
            return
        self.draining = True
        timeout = self.limits.drain_timeout if drain_timeout is None else drain_timeout
        if self.proxy_server is not None:
            self.proxy_server.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
        for hook in self.on_stop:
            with contextlib.suppress(Exception):
                await hook(self)
        # (a second signal during the stop hooks above has asked for no drain at all)
        self._drain_deadline = 0.0 if self._stop_now else self.loop.time() + timeout
        while self.loop.time() < self._drain_deadline:
            busy = False
            for conn in list(self.connections):
                if conn.current is None and conn.tunnel is None:
                    conn.close()  # idle keep-alive: nothing to wait for
                else:
                    busy = True
            if not busy:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        for hook in self.on_drained:
            with contextlib.suppress(Exception):
                await hook(self)
        # the snapshots a reload replaced within the drain timeout were still to be retired:
        # their plugins close now, or never would (a batching audit plugin lost its buffer)
        closed: set[int] = set()
        pending, self._retire_pending = self._retire_pending, []
        for old, handle in pending:
            handle.cancel()
            await self._close_plugins(old, self.runtime, closed)
        await self._close_plugins(self.runtime, None, closed)
        if self._settling is not None:
            self._settling.cancel()
        self.pools.close()
        DATE.stop()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT drain and stop, SIGHUP reloads. Installed before start-up: a signal
        while the gateway starts (a deploy script's reload as soon as a port answers, and the
        admin port answers before the proxy serves) used to find the default action and kill
        the process. A signal that arrives before `signals_ready` waits for it."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self._on_signal, sig)

    def defer_signals(self, signals: list[int]) -> None:
        """Signals that came before the handlers: acted on as those that come at start-up."""
        for sig in signals:
            self._on_signal(sig)

    def signals_ready(self) -> None:
        """Start-up is over: act on the signals that came meanwhile, then on each at once."""
        self._signals_ready = True
        pending, self._pending_signals = self._pending_signals, []
        for sig in dict.fromkeys(pending):  # (two SIGHUPs meanwhile: one reload)
            self._on_signal(sig)

    def _on_signal(self, sig: int) -> None:
        if not self._signals_ready:
            self._pending_signals.append(sig)
            return
        name = signal.Signals(sig).name
        if self.draining:
            # A second stop signal (Ctrl-C twice) means now: in-flight requests are cut. A
            # reload while stopping would start plugins the shutdown no longer closes.
            if sig != signal.SIGHUP:
                log.info("stopping now: in-flight requests are cut", extra={"signal": name})
                self._stop_now = True
                self._drain_deadline = 0.0
            else:
                log.info("reload ignored: the gateway is stopping", extra={"signal": name})
            return
        if sig == signal.SIGHUP:
            self._keep(self.loop.create_task(self._reload_on_signal()))
            return
        log.info(
            "stopping: draining in-flight requests", extra={"event": "shutdown", "signal": name}
        )
        self._keep(self.loop.create_task(self.shutdown()))

    async def _reload_on_signal(self) -> None:
        await self.reload()  # (logged and counted there, either way)

    def __repr__(self) -> str:
        return f"<Gateway {len(self.connections)} connections {self.runtime!r}>"


Stamp = tuple[tuple[str, float, int], ...]  # ConfigSources.stamp(): (file, mtime, size)


def files_settled(applied: Stamp, previous: Stamp, now: Stamp) -> bool:
    """Whether --watch reloads now: the files differ from those last applied and have not
    changed since the previous look. A file written in parts (a copy, `cat > file`) was
    applied half-written whenever the part so far was valid on its own: a route it had not
    reached yet answered 404 until the next look. (The main file is first; missing, it is
    being replaced: wait for it.)"""
    return now != applied and now == previous and now[0][2] >= 0


YOUNG_GC_THRESHOLD: Final = 50_000  # see settle_heap
SETTLE_DELAY: Final = 1.0  # seconds from a retirement to the collection that frees it


def settle_heap() -> None:
    """Freeze what is alive now (modules, config, the compiled snapshot) so that the cyclic
    garbage collector never walks it again.

    A full collection walks every tracked object: with 10,000 routes (~400,000 objects) one
    took ~100 ms, and under load one came every few seconds and stalled every request meanwhile
    (bench/run.py routes10k: p99 42-68 ms, against 3-5 ms on the same table's fallback route).
    Called at start-up and once a reload has drained the old snapshot: everything is unfrozen
    and collected first, so a replaced snapshot is still freed (one full collection per
    reload, after its drain). Young collections are made rarer too (below).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    # A young-generation collection every 700 net allocations (CPython's default) ran every
    # ~15 aggregated requests under load when each part was a task: each walked the
    # in-flight requests' tasks and coroutines (~0.3 ms), about 22 µs per request in all
    # (timed with gc.callbacks at 50 connections). Aggregation no longer makes tasks or
    # cycles, but an async plugin hook (a Redis-kept rate limit) still runs as a task per
    # request. Request/response garbage is freed by reference counting; only objects in
    # cycles wait for the collector, at most 50,000 of them (a few MB) at this setting.
    # (Only raised: an embedding application's higher setting stands.)
    threshold, *older = gc.get_threshold()
    if threshold < YOUNG_GC_THRESHOLD:
        gc.set_threshold(YOUNG_GC_THRESHOLD, *older)


async def serve(
    config_path: str | Path,
    *,
    watch: bool = False,
    ready: Callable[[Gateway], Any] | None = None,
    early_signals: list[int] | None = None,
    worker: WorkerRole | None = None,
) -> None:
    """Run a gateway from a config file until SIGTERM/SIGINT. `early_signals`: the ones the
    caller kept before the gateway's own handlers existed (cli._defer_sighup), acted on once
    it has started, as those that come while it starts. `worker`: this process is one of
    `--workers N` (the supervisor prints the node's "listening" lines, not the worker)."""
    sources = ConfigSources()
    config = load_config(config_path, sources=sources)
    if worker is not None and (problems := worker.config_problems(config)):
        raise ConfigError(problems)  # (the supervisor checked it: the file changed since)
    gateway = Gateway(config, config_path=config_path)
    gateway.worker = worker
    gateway.config_sources = sources
    from apigate.extensions import attach_extensions

    gateway.install_signal_handlers()  # before anything listens (see there)
    if early_signals:  # (read after: one that came meanwhile reached the handlers above)
        gateway.defer_signals(early_signals)
    await attach_extensions(gateway)
    await gateway.start()
    if watch:
        gateway.watch()
    if ready is not None:
        ready(gateway)
    if worker is None:
        print(f"apigate {os.getpid()} listening on {gateway.proxy_address}", flush=True)
    else:
        worker.announce_ready()
    gateway.signals_ready()
    await gateway.wait_stopped()
