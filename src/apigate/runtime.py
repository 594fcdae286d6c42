"""The immutable runtime snapshot the data plane reads.

`compile_runtime(config, ...)` turns a validated `GatewayConfig` into everything a request needs:
the compiled matcher, one `CompiledRoute` per route (with its plugin chain and rewrite function
built once), and the services. A request takes the snapshot current when its head is complete
and keeps it to the end, so a reload never changes the rules under an in-flight request.
Services are the exception: they are long-lived objects shared by consecutive snapshots (see
`apigate.registry.service`), so health and registrations survive reloads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from apigate.config.errors import ConfigError
from apigate.config.loader import config_location
from apigate.config.schema import GatewayConfig, RouteConfig, TLSConfig
from apigate.http.pool import PoolManager
from apigate.plugins.base import Plugin, PluginEnv
from apigate.plugins.chain import (
    ConsumerSwitch,
    PluginChain,
    build_chain,
    build_consumer_plugins,
)
from apigate.proxy.aggregate import Handler, build_aggregate_handler
from apigate.registry.service import Service
from apigate.routing.matcher import Matcher, RouteSpec, RouteSpecError
from apigate.routing.rewrite import compile_template, has_bad_segment, strip

_generations: Final = itertools.count(1)


@dataclass(slots=True, eq=False)
class CompiledRoute:
    name: str
    config: RouteConfig
    service: Service | None
    chain: PluginChain
    strip_prefix: bool = False
    rewrite: Callable[[dict[str, str], str], str] | None = None
    max_body: int | None = None
    body_timeout: float | None = None
    preserve_host: bool = False

    def upstream_path(self, path: str, prefix: str, params: dict[str, str]) -> str:
        """The path sent upstream; ValueError when it would have a dot or empty segment."""
        if self.rewrite is not None:  # the template replaces the matched prefix
            sent = self.rewrite(params, path[len(prefix) :])
        elif self.strip_prefix:
            sent = strip(path, prefix)
        else:
            return path
        end = len(prefix)
        if end < len(path) and path[end] != "/" and prefix[-1:] != "/" and has_bad_segment(sent):
            # A regex path may end inside a segment (`~/svc/v\d+` on /svc/v1../x): the rest
            # starts a segment of its own upstream, and `..` there climbed out of the base
            # path. (A prefix path always ends on a segment boundary of a normalised path.)
            raise ValueError(f"{path!r} would go upstream as {sent!r}")
        return sent

    def for_consumer(self, plugins: list[Plugin]) -> CompiledRoute:
        """This route for a consumer with `plugins` of its own (chain.ConsumerSwitch makes it
        on the consumer's first request here): the same route with their chain."""
        return dataclasses.replace(self, chain=self.chain.with_plugins(plugins))

    def plugin_settings(self) -> frozenset[tuple[str, str]]:
        """(name, settings) of each plugin the route runs: whether another route asks for
        nothing this one does not (ProxyExchange._refuse_stricter_reading; rare, not cached)."""
        return frozenset((p.name, repr(getattr(p, "config", None))) for p in self.chain.plugins)

    def __repr__(self) -> str:
        target = self.service.name if self.service else "aggregate"
        return f"<Route {self.name} -> {target} {self.chain!r}>"


@dataclass(eq=False)
class Runtime:
    config: GatewayConfig
    matcher: Matcher
    routes: dict[str, CompiledRoute]
    services: dict[str, Service]
    plugins: list[Plugin] = field(default_factory=list)
    # on_log hooks of the global plugins, for requests that matched no route (404s are logged too)
    log_hooks: list[Callable[[Any], None]] = field(default_factory=list)
    # route name -> the handler serving a route without a service (aggregation; see Handler)
    handlers: dict[str, Handler] = field(default_factory=dict)
    # consumer name -> its own plugins (`consumers[].plugins`), for the consumers with some
    consumer_plugins: dict[str, list[Plugin]] = field(default_factory=dict)
    generation: int = field(default_factory=lambda: next(_generations))

    def __repr__(self) -> str:
        return (
            f"<Runtime gen={self.generation} {len(self.routes)} routes, "
            f"{len(self.services)} services>"
        )


class ServiceTable:
    """The long-lived services, reconciled with each new config in two steps.

    `plan(config)` works out what the config asks for without touching the table: the services
    it keeps (the same objects), the ones it adds (new objects, not in the table yet) and the
    ones it drops. A snapshot is compiled against the plan, and only a snapshot that compiled
    and started is `commit`ted: a refused config leaves the table exactly as it was, the very
    objects the serving snapshot holds (registrations made meanwhile land where traffic goes).
    """

    def __init__(self, pools: PoolManager) -> None:
        self.pools = pools
        self.services: dict[str, Service] = {}

    def plan(self, config: GatewayConfig) -> ServicePlan:
        services: dict[str, Service] = {}
        added: dict[str, Service] = {}
        for name, svc_cfg in config.services.items():
            svc = self.services.get(name)
            if svc is None:
                svc = added[name] = Service(name, svc_cfg, self.pools)
            services[name] = svc
        for name, svc in self.services.items():
            if name not in services and _has_registered(svc):
                services[name] = svc  # kept for its registrations (see commit)
        return ServicePlan(config, services, added)

    def commit(self, plan: ServicePlan) -> None:
        """Make the table what `plan` says: new configs applied, services added and dropped.

        A service the config no longer names stays while it has registered instances (they
        heartbeat: dropping them would only have the next heartbeat create it again)."""
        for name, svc_cfg in plan.config.services.items():
            svc = self.services.get(name)
            if svc is None:
                self.services[name] = plan.added[name]
            else:
                svc.apply_config(svc_cfg)
        for name in list(self.services):
            if name not in plan.config.services and not _has_registered(self.services[name]):
                del self.services[name]
                self.pools.retire(name)

    def reconcile(self, config: GatewayConfig) -> dict[str, Service]:
        """Plan and commit at once (start-up, and configs that cannot be refused)."""
        self.commit(self.plan(config))
        return dict(self.services)


@dataclass(eq=False)
class ServicePlan:
    """What a config makes of the service table (see `ServiceTable.plan`)."""

    config: GatewayConfig
    # every service a snapshot of `config` uses: kept ones (the table's objects) and added ones
    services: dict[str, Service]
    added: dict[str, Service]


def _has_registered(svc: Service) -> bool:
    return any(i.origin == "registered" for i in svc.instances.values())


def _route_spec(index: int, route: RouteConfig, compiled: CompiledRoute) -> RouteSpec:
    m = route.match
    return RouteSpec(
        name=route.name,
        paths=tuple(m.paths),
        methods=frozenset(m.methods) if m.methods else None,
        hosts=tuple(m.hosts) if m.hosts else None,
        headers=tuple(m.headers.items()) if m.headers else None,
        payload=compiled,
        regex_priority=m.regex_priority,
    )


def compile_runtime(config: GatewayConfig, table: ServiceTable, env: PluginEnv) -> Runtime:
    """Build a snapshot and make the service table match it; raises ConfigError (with paths)
    for anything a plugin or the matcher rejects, with the table left as it was."""
    runtime, plan = prepare_runtime(config, table, env)
    table.commit(plan)
    return runtime


def prepare_runtime(
    config: GatewayConfig, table: ServiceTable, env: PluginEnv
) -> tuple[Runtime, ServicePlan]:
    """Build a snapshot against `table.plan(config)` without changing the table: the caller
    commits the plan once the snapshot is to serve (`Gateway.apply_config` starts its plugins
    first). Raises ConfigError for anything a plugin, an aggregate or the matcher rejects."""
    plan = table.plan(config)
    services = plan.services
    cache: dict[tuple[str, str], Plugin] = {}
    routes: dict[str, CompiledRoute] = {}
    specs: list[RouteSpec] = []
    errors: list[str] = []

    def locate(section: str, key: str | int) -> str:
        return config_location(config, section, key)

    # the global plugins first, once: a bad one is reported once, not once per route
    try:
        global_chain = build_chain(config.plugins, {}, env, -1, cache, locate=locate)
    except ConfigError as exc:
        errors.extend(exc.errors)
    global_plugins = {n: raw for n, raw in config.plugins.items() if ("global", n) in cache}
    consumer_plugins = _build_consumer_plugins(config, env, locate, errors)
    for index, route in enumerate(config.routes):
        try:
            chain = build_chain(global_plugins, route.plugins, env, index, cache, locate=locate)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        switch: ConsumerSwitch | None = None
        if consumer_plugins and chain.identifies_consumers():
            # decided here, once: a route that cannot identify a consumer, or a snapshot
            # without consumers' plugins, keeps the chain it had without them
            switch = ConsumerSwitch(consumer_plugins)
            chain = PluginChain(chain.plugins, switch)
        try:
            rewrite = compile_template(route.rewrite) if route.rewrite else None
        except ValueError as exc:  # a template the schema let through ("/v2//x")
            errors.append(f"{locate('routes', index)}.rewrite: {exc}")
            continue
        limits = route.limits
        preserve = route.preserve_host
        service = services.get(route.service) if route.service else None
        if preserve is None and route.service in config.services:
            # (the config the service will have: a kept service takes it only on commit)
            preserve = config.services[route.service].preserve_host
        compiled = CompiledRoute(
            name=route.name,
            config=route,
            service=service,
            chain=chain,
            strip_prefix=route.strip_prefix,
            rewrite=rewrite,
            max_body=limits.max_body_bytes if limits else None,
            body_timeout=limits.body_timeout if limits else None,
            preserve_host=bool(preserve),
        )
        if switch is not None:
            switch.route = compiled
        routes[route.name] = compiled
        specs.append(_route_spec(index, route, compiled))
    if errors:
        raise ConfigError(errors)
    handlers: dict[str, Handler] = {}
    for route in config.routes:
        if route.aggregate:
            handlers[route.name] = build_aggregate_handler(route, services, env.loop)
    plugins = list(global_chain.plugins)
    for compiled in routes.values():
        plugins.extend(p for p in compiled.chain.plugins if p not in plugins)
    for own in consumer_plugins.values():  # started and closed with the snapshot's
        plugins.extend(own)
    runtime = Runtime(
        config=config,
        matcher=_compile_matcher(config, specs),
        routes=routes,
        services=services,
        plugins=plugins,
        log_hooks=global_chain.log_hooks,
        handlers=handlers,
        consumer_plugins=consumer_plugins,
    )
    return runtime, plan


def _build_consumer_plugins(
    config: GatewayConfig,
    env: PluginEnv,
    locate: Callable[[str, str | int], str],
    errors: list[str],
) -> dict[str, list[Plugin]]:
    """Each consumer's own plugins, by its name (those with none are left out); a refused
    one's reasons go to `errors`."""
    plugins: dict[str, list[Plugin]] = {}
    for index, consumer in enumerate(config.consumers):
        if not consumer.plugins:
            continue
        where = locate("consumers", index)
        try:
            plugins[consumer.name] = build_consumer_plugins(
                consumer.name, consumer.plugins, env, where
            )
        except ConfigError as exc:
            errors.extend(exc.errors)
    return plugins


def _compile_matcher(config: GatewayConfig, specs: list[RouteSpec]) -> Matcher:
    """The matcher, its refusals as config errors naming the route (never a traceback)."""
    try:
        return Matcher(specs)
    except RouteSpecError as exc:
        index = next(i for i, route in enumerate(config.routes) if route.name == exc.route)
        raise ConfigError(
            [f"{config_location(config, 'routes', index)}.match.{exc.field}: {exc.message}"]
        ) from None


def dry_compile(
    config: GatewayConfig,
    loop: asyncio.AbstractEventLoop,
    *,
    tls_in_force: TLSConfig | None = None,
) -> Runtime:
    """Everything `apigate run` would refuse, without listening or connecting: the snapshot
    (routes, plugin configs) on throwaway services, and the TLS certificates and keys.
    Used by `apigate validate` and `check`, and by the admin API's `POST /config?dry_run`.

    `tls_in_force`: the `listeners.proxy.tls` of a running gateway that would apply `config`.
    A reload keeping that section unchanged is not refused over its files (see
    `apigate.http.tls.tls_change_problems`), so a dry run that says what the reload would do
    passes it; without it (a file checked before start-up) the files are always checked."""
    from apigate.http.tls import tls_change_problems

    pools = PoolManager(loop)
    try:
        runtime = compile_runtime(config, ServiceTable(pools), PluginEnv(config, loop))
    finally:
        pools.close()
    tls = config.listeners.proxy.tls
    if tls is not None and (problems := tls_change_problems(tls, tls_in_force)):
        raise ConfigError(problems)
    return runtime
