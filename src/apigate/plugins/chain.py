"""Building the per-route plugin chain once per snapshot.

Plugins are named in the file by a short name (`jwt`, `rate_limit`, ...) that maps to a class
here, or by a dotted path `package.module:Class` for in-process third-party plugins. A route's
own entry for a name replaces the global one.

A consumer's own entry replaces both for that consumer's requests (Kong's consumer-scoped
plugins: consumer > route > global). The consumer is known only once the authentication
plugins have run, so a consumer may only name plugins that run after all of them (priority
below AUTH_FLOOR), and no auth plugin. A route whose chain can identify a consumer, in a
snapshot where some consumer has plugins, gets one more request hook right there, a
ConsumerSwitch: for a consumer with plugins it hands the exchange the route's variant for that
consumer (a RouteSwitch), whose chain is the same up to that point, and the request goes on on
it: request, response, body and log hooks alike. Every other route's chain is what it was
without the feature: it costs them nothing per request.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Final

from pydantic import ValidationError

from apigate.config.errors import ConfigError, format_loc, format_validation_error
from apigate.plugins.base import Plugin, PluginEnv

# short name -> "module:Class"; imported lazily so an unused plugin costs nothing at start-up
BUILTIN: Final[dict[str, str]] = {
    "access_log": "apigate.observability.access_log:AccessLogPlugin",
    "tracing": "apigate.observability.tracing:TracingPlugin",
    "jwt": "apigate.plugins.jwt:JwtPlugin",
    "key_auth": "apigate.plugins.key_auth:KeyAuthPlugin",
    "basic_auth": "apigate.plugins.basic_auth:BasicAuthPlugin",
    "acl": "apigate.plugins.acl:AclPlugin",
    "rate_limit": "apigate.plugins.rate_limit:RateLimitPlugin",
    "ip_filter": "apigate.plugins.ip_filter:IpFilterPlugin",
    "cors": "apigate.plugins.cors:CorsPlugin",
    "request_size": "apigate.plugins.request_size:RequestSizePlugin",
    "request_termination": "apigate.plugins.request_termination:RequestTerminationPlugin",
    "cache": "apigate.plugins.cache:CachePlugin",
    "request_transform": "apigate.plugins.transform:RequestTransformPlugin",
    "response_transform": "apigate.plugins.transform:ResponseTransformPlugin",
}


# The lowest priority of the built-in authentication plugins (basic_auth's): every plugin below
# it runs once the consumer is known, and only those may be a consumer's own.
AUTH_FLOOR: Final = 1100


def register_builtin(name: str, target: str) -> None:
    BUILTIN[name] = target


def resolve(name: str) -> type[Plugin]:
    """The plugin class `name` names (a built-in name or a module:Class path); KeyError when
    it is neither, or whatever importing the module raises."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise KeyError(name)
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"{target} is not an apigate Plugin subclass")
    return cls


class RouteSwitch:
    """What a ConsumerSwitch answers for a consumer with plugins: the route the rest of the
    request runs on (made once per consumer and route, then returned as it is)."""

    __slots__ = ("route",)

    def __init__(self, route: Any) -> None:
        self.route = route  # an apigate.runtime.CompiledRoute

    def __repr__(self) -> str:
        return f"<RouteSwitch {self.route!r}>"


class ConsumerSwitch:
    """The request hook a route's chain has right after the plugins that may identify the
    consumer, when some consumer has plugins: `on_request` answers None (go on, on this
    chain) unless the request's consumer has plugins of its own, and then the RouteSwitch to
    the route's variant for it, which it makes on that consumer's first request on the route
    (a snapshot with many routes and consumers builds only the variants in use)."""

    __slots__ = ("made", "plugins", "route")

    def __init__(self, plugins: dict[str, list[Plugin]]) -> None:
        self.plugins = plugins  # consumer name -> its plugins (one set per snapshot, shared)
        self.route: Any = None  # the CompiledRoute of the chain this is in (set once built)
        self.made: dict[str, RouteSwitch] = {}

    def on_request(self, ctx: Any) -> RouteSwitch | None:
        consumer = ctx.consumer
        if consumer is None:
            return None
        name: str = consumer.name
        switch = self.made.get(name)
        if switch is None:
            own = self.plugins.get(name)
            if own is None:
                return None
            switch = self.made[name] = RouteSwitch(self.route.for_consumer(own))
        return switch

    def __repr__(self) -> str:
        return f"<ConsumerSwitch {sorted(self.plugins)}>"


class PluginChain:
    """The hooks of one route, in priority order, as plain lists the exchange iterates."""

    __slots__ = (
        "chunk_hooks",
        "end_hooks",
        "log_hooks",
        "plugins",
        "request_body_plugins",
        "request_hooks",
        "request_owners",
        "respond_hooks",
        "response_body_plugins",
        "response_hooks",
        "switch",
        "upstream_request_hooks",
    )

    def __init__(self, plugins: list[Plugin], switch: ConsumerSwitch | None = None) -> None:
        self.plugins = sorted(plugins, key=lambda p: -p.priority)
        self.switch = switch
        self.request_hooks: list[Callable[..., Any]] = self._hooks("on_request")
        self.upstream_request_hooks: list[Callable[..., Any]] = self._hooks("on_upstream_request")
        self.response_hooks: list[Callable[..., Any]] = self._hooks("on_response")
        self.log_hooks: list[Callable[..., Any]] = self._hooks("on_log")
        # ARCHITECTURE.md names the streaming hook on_body_chunk: both spellings are called
        self.chunk_hooks: list[Callable[..., Any]] = [
            *self._hooks("on_response_chunk"),
            *self._hooks("on_body_chunk"),
        ]
        self.end_hooks: list[Callable[..., Any]] = self._hooks("on_response_end")
        # plugins that rewrite whole bodies (JSON edits): the exchange buffers for them
        self.request_body_plugins = [
            p for p in self.plugins if getattr(p, "buffer_request_body", False)
        ]
        self.response_body_plugins = [
            p for p in self.plugins if getattr(p, "buffer_response_body", False)
        ]
        # For a response a plugin made itself (401, 429, a cache hit), the response hooks of
        # the plugins that ran before it still decorate it (CORS, rate-limit headers), as in
        # Kong: respond_hooks[i] are those for a response returned by request hook i.
        owners = [p for p in self.plugins if hasattr(p, "on_request")]
        self.respond_hooks: list[list[Callable[..., Any]]] = [
            [
                p.on_response
                for p in self.plugins[: self.plugins.index(owner)]
                if hasattr(p, "on_response")
            ]
            for owner in owners
        ]
        # the plugin of each request hook (or the switch, for its own)
        self.request_owners: list[object] = list(owners)
        if switch is not None:
            # after every hook that may identify the consumer, before the first one a
            # consumer's plugin may replace: the hooks before it are the same in each variant
            at = sum(1 for p in owners if p.priority >= AUTH_FLOOR)
            self.request_hooks.insert(at, switch.on_request)
            self.request_owners.insert(at, switch)
            self.respond_hooks.insert(at, [])  # (it answers nothing)

    def identifies_consumers(self) -> bool:
        """Whether a plugin of this chain may set the request's consumer (one that does so
        below AUTH_FLOOR sets it too late for consumers' plugins: see the README)."""
        return any(p.identifies_consumers and p.priority >= AUTH_FLOOR for p in self.plugins)

    def with_plugins(self, own: list[Plugin]) -> PluginChain:
        """This chain for a consumer with plugins of its own: each takes the place of the
        route's or global plugin of its kind (the same name in the file is the same class),
        or joins the chain; the same switch keeps the request hooks' positions."""
        mine = {type(p): p for p in own}
        placed: set[type] = set()
        plugins: list[Plugin] = []
        for plugin in self.plugins:
            kind = type(plugin)
            if kind not in mine:
                plugins.append(plugin)
            elif kind not in placed:  # (a kind named twice, globally and as a dotted path)
                placed.add(kind)
                plugins.append(mine[kind])
        plugins += [p for p in own if type(p) not in placed]
        return PluginChain(plugins, self.switch)

    def decorators_of(self, plugin: Plugin) -> list[Callable[..., Any]]:
        """The response hooks that decorate a response `plugin` made in its on_request (see
        respond_hooks), found by the plugin: its hook may be another object's method (the
        built-ins bind their compiled halves' methods), so the hook's owner cannot tell."""
        for index, owner in enumerate(self.request_owners):
            if owner is plugin:
                return self.respond_hooks[index]
        return []

    def _hooks(self, name: str) -> list[Callable[..., Any]]:
        return [getattr(p, name) for p in self.plugins if hasattr(p, name)]

    def __bool__(self) -> bool:
        return bool(self.plugins)

    def __repr__(self) -> str:
        return f"<PluginChain {[p.name for p in self.plugins]}>"


def build_plugin(name: str, raw: Mapping[str, Any] | None, env: PluginEnv, where: str) -> Plugin:
    """The plugin `name` built from `raw`; a config problem is a ConfigError whose lines start
    with `where` (`plugins.cors`, `routes[2].plugins.jwt`).

    A plugin that can only judge its config with the rest of the gateway's at hand (`store:
    redis` needs a top-level Redis store) raises `located_error` from `__init__`, located
    relative to its own config as its model validators do, so the path is attached here too:
    the plugin cannot know whether it is the global one or a route's."""
    cls = plugin_class(name, where)
    try:
        config = cls.Config.model_validate(dict(raw or {}))
        return cls(config, env)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None
    except ConfigError:
        raise
    except Exception as exc:  # its __init__ refused the settings its own way
        raise ConfigError([f"{where}: plugin {name!r} refused its config: {_cause(exc)}"]) from None


def plugin_class(name: str, where: str) -> type[Plugin]:
    """The class `name` names; a ConfigError at `where` when it names none or cannot load."""
    if ":" not in BUILTIN.get(name, name):  # neither a built-in name nor a module:Class path
        close = difflib.get_close_matches(name, list(BUILTIN), n=1)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError(
            [
                f"{where}: unknown plugin {name!r}{suggestion} "
                f"(built-in: {known}; or a module:Class path)"
            ]
        )
    try:
        return resolve(name)
    except Exception as exc:  # its module failed to import (any error: an environment
        # variable it reads is a KeyError), or has no such class
        raise ConfigError([f"{where}: cannot load plugin {name!r}: {_cause(exc)}"]) from None


def _cause(exc: Exception) -> str:
    """`exc` for an error line: a KeyError's message alone is just the key's repr."""
    text = str(exc)
    if isinstance(exc, (ImportError, AttributeError, TypeError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def file_location(section: str, key: str | int) -> str:
    """`routes[2]`, `plugins.cors`, `plugins['pkg.mod:Class']`: where an item is, in the
    file's own terms."""
    return format_loc((section, key))


def build_chain(
    global_plugins: Mapping[str, Mapping[str, Any] | None],
    route_plugins: Mapping[str, Mapping[str, Any] | None],
    env: PluginEnv,
    route_index: int,
    cache: dict[tuple[str, str], Plugin],
    *,
    locate: Callable[[str, str | int], str] = file_location,
) -> PluginChain:
    """Global plugins are built once and shared by every route (their state, e.g. a rate
    limiter's counters, is global); a route's own entry replaces the global one.

    `locate(section, key)` names where an item is for error lines: the loader's version says
    `conf.d/api.yaml: routes[0]` for the first route of an included file."""
    plugins: list[Plugin] = []
    problems: list[str] = []  # every plugin's, not only the first one's
    for name, raw in global_plugins.items():
        if name in route_plugins:
            continue
        key = ("global", name)
        try:
            if key not in cache:
                cache[key] = build_plugin(name, raw, env, locate("plugins", name))
            plugins.append(cache[key])
        except ConfigError as exc:
            problems += exc.errors
    if route_plugins:
        where = locate("routes", route_index)
        for name, raw in route_plugins.items():
            try:
                plugins.append(build_plugin(name, raw, env, format_loc(("plugins", name), where)))
            except ConfigError as exc:
                problems += exc.errors
    if problems:
        raise ConfigError(problems)
    return PluginChain(plugins)


def build_consumer_plugins(
    consumer: str,
    raw_plugins: Mapping[str, Mapping[str, Any] | None],
    env: PluginEnv,
    where: str,
) -> list[Plugin]:
    """The plugins of `consumer`'s `plugins:` (at `where`: `consumers[3]`), built once per
    snapshot and shared by every route, as global ones are, with `env.consumer` naming it (a
    rate limit keys its counters by it). A plugin that runs before the consumer is known, an
    authentication plugin, or one that refuses consumers (`acl`) is a config error naming the
    consumer and the plugin, as is one named twice (a built-in name and its dotted path)."""
    own_env = dataclasses.replace(env, consumer=consumer)
    plugins: list[Plugin] = []
    named: dict[type, str] = {}
    problems: list[str] = []
    for name, raw in raw_plugins.items():
        at = format_loc(("plugins", name), where)
        try:
            cls = plugin_class(name, at)
        except ConfigError as exc:
            problems += exc.errors
            continue
        refusal = _consumer_refusal(cls)
        if cls in named:
            refusal = f"it is the plugin {named[cls]!r} names too"
        if refusal:
            problems.append(f"{at}: consumer {consumer!r} cannot have {name!r}: {refusal}")
            continue
        named[cls] = name
        try:
            plugins.append(build_plugin(name, raw, own_env, at))
        except ConfigError as exc:
            problems += exc.errors
    if problems:
        raise ConfigError(problems)
    return plugins


def _consumer_refusal(cls: type[Plugin]) -> str:
    """Why a consumer's `plugins:` may not name `cls` ("" when it may)."""
    if cls.identifies_consumers:
        return (
            "an authentication plugin identifies the consumer; it is not chosen by it (as in "
            "Kong, which refuses authentication plugins on consumers)"
        )
    if not cls.on_consumers:
        return (
            "it judges the consumer for the route, and a consumer's own would replace the "
            "route's rule (Kong refuses it on consumers too)"
        )
    if cls.priority >= AUTH_FLOOR:
        return (
            f"it runs at priority {cls.priority}, before the authentication plugins identify "
            f"the consumer: a consumer's plugins are those that run after them (priority "
            f"below {AUTH_FLOOR})"
        )
    return ""
