"""Building the per-route plugin chain once per snapshot.

Plugins are named in the file by a short name (`jwt`, `rate_limit`, ...) that maps to a class
here, or by a dotted path `package.module:Class` for in-process third-party plugins. A route's
own entry for a name replaces the global one.
"""

from __future__ import annotations

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
        "upstream_request_hooks",
    )

    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = sorted(plugins, key=lambda p: -p.priority)
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
        self.request_owners = owners  # the plugin of each request hook
        self.respond_hooks: list[list[Callable[..., Any]]] = [
            [
                p.on_response
                for p in self.plugins[: self.plugins.index(owner)]
                if hasattr(p, "on_response")
            ]
            for owner in owners
        ]

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
        cls = resolve(name)
    except Exception as exc:  # its module failed to import (any error: an environment
        # variable it reads is a KeyError), or has no such class
        raise ConfigError([f"{where}: cannot load plugin {name!r}: {_cause(exc)}"]) from None
    try:
        config = cls.Config.model_validate(dict(raw or {}))
        return cls(config, env)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None
    except ConfigError:
        raise
    except Exception as exc:  # its __init__ refused the settings its own way
        raise ConfigError([f"{where}: plugin {name!r} refused its config: {_cause(exc)}"]) from None


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
