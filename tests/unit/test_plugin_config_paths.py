"""A plugin's config error raised when it is built (it needs the rest of the gateway's config
to judge) carries the plugin's path in the file, global or route-level (CONFIG.md): they used
to name `rate_limit.store` and `plugins.cache.store` wherever the plugin stood."""

from __future__ import annotations

import pytest

from apigate.config.errors import ConfigError
from apigate.plugins.chain import build_chain
from tests.unit.test_plugin_fakes import make_env

REDIS_WITHOUT_A_REDIS_STORE = {
    "rate_limit": (
        {"requests": 1, "per": "1s", "store": "redis"},
        "store: 'redis' needs the top-level store to be redis://host:port/db "
        "(or give the URL here)",
    ),
    "cache": (
        {"store": "redis"},
        "store: 'redis' needs a top-level `store: redis://...` "
        "(or give the URL here: store: redis://host:6379/0)",
    ),
}


@pytest.mark.parametrize("plugin", sorted(REDIS_WITHOUT_A_REDIS_STORE))
@pytest.mark.parametrize("where", ["plugins", "routes[0].plugins"])
def test_store_redis_without_a_redis_store_names_the_plugins_full_path(
    plugin: str, where: str
) -> None:
    raw, problem = REDIS_WITHOUT_A_REDIS_STORE[plugin]
    placed = {plugin: raw}
    global_plugins, route_plugins = (placed, {}) if where == "plugins" else ({}, placed)
    with pytest.raises(ConfigError) as refused:
        build_chain(global_plugins, route_plugins, make_env(), 0, {})
    assert refused.value.errors == [f"{where}.{plugin}.{problem}"]
