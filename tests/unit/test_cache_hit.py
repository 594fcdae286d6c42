"""The cache's compiled hit path (cache_hit.MemoryHits): which requests it answers itself, and
that everything else reaches the plugin's full `on_request` untouched, with the same answer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from apigate.plugins.base import Plugin, PluginConfig
from apigate.plugins.cache import CachePlugin
from apigate.plugins.cache_hit import MemoryHits
from apigate.plugins.chain import PluginChain
from tests.unit.test_cache_plugin import Ctx, cache, header, hit, upstream
from tests.unit.test_plugin_fakes import make_env


class Spy:
    """Stands for one of the plugin's own hooks: counts the calls, then does what it does."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        self.calls = 0

    def __call__(self, ctx: Any) -> Any:
        self.calls += 1
        return self.hook(ctx)


def spied(plugin: CachePlugin) -> tuple[MemoryHits, Spy, Spy, Spy]:
    hits = plugin.on_request.__self__
    assert isinstance(hits, MemoryHits)
    full, end, log = Spy(hits.full), Spy(hits.response_end), Spy(hits.log)
    hits.full, hits.response_end, hits.log = full, end, log
    return hits, full, end, log


def stored(plugin: CachePlugin, *headers: tuple[bytes, bytes], **ctx: Any) -> None:
    """One response of /items stored through the plugin's usual flow."""
    first = Ctx(**ctx)
    assert plugin.on_request(first) is None
    upstream(plugin, first, headers=[(b"Cache-Control", b"max-age=60"), *headers])
    assert first.cache_status == "MISS"


def test_a_plain_hit_is_answered_without_the_plugin() -> None:
    plugin, clock = cache()
    stored(plugin, (b"ETag", b'"v1"'))
    _, full, end, log = spied(plugin)
    clock.now += 7
    ctx = Ctx(headers=[("Accept", "*/*")])
    response = hit(plugin.on_request(ctx))
    plugin.on_response_end(ctx)
    plugin.on_log(ctx)
    assert (full.calls, end.calls, log.calls) == (0, 0, 0)
    assert ctx.cache_status == "HIT"
    assert response.status == 200 and response.body == b'{"n":1}'
    assert response.content_type == b"application/json"
    assert response.headers == [
        (b"Cache-Control", b"max-age=60"),
        (b"ETag", b'"v1"'),
        (b"Age", b"7"),
        (b"X-Cache", b"HIT"),
    ]


def test_the_hit_is_the_one_the_plugin_gives() -> None:
    """The same entry answered both ways: the compiled hit and CachePlugin._hit."""
    plugin, clock = cache()
    stored(plugin, (b"Vary", b"Accept-Language"), headers=[("Accept-Language", "fr")])
    clock.now += 3
    ctx = Ctx(headers=[("Accept-Language", "fr")])
    fast = hit(plugin.on_request(ctx))
    entries = list(plugin.store._entries.values())
    variant = next(e for e in entries if e.status == 200)
    slow = plugin._hit(Ctx(), variant, variant.age(clock.now))
    assert (fast.status, fast.body, fast.headers, fast.content_type) == (
        slow.status,
        slow.body,
        slow.headers,
        slow.content_type,
    )


def test_head_is_answered_from_gets_entry() -> None:
    plugin, _ = cache()
    stored(plugin)
    _, full, _, _ = spied(plugin)
    assert hit(plugin.on_request(Ctx("HEAD"))).status == 200
    assert full.calls == 0


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("Cache-Control", "max-age=0")], None),  # not looked up: the client wants it fresh
        ([("Cache-Control", "max-stale=5")], 200),  # a directive: the plugin reads it
        ([("Pragma", "no-cache")], None),
        ([("If-None-Match", '"v1"')], 304),
        ([("If-Modified-Since", "Sun, 22 Nov 2026 12:00:00 GMT")], 200),
    ],
)
def test_request_directives_go_to_the_plugin(headers: list[tuple[str, str]], status: Any) -> None:
    plugin, _ = cache()
    stored(plugin, (b"ETag", b'"v1"'))
    _, full, _, _ = spied(plugin)
    ctx = Ctx(headers=headers)
    outcome = plugin.on_request(ctx)
    assert full.calls == 1
    if status is None:
        assert outcome is None and ctx.cache_status == "BYPASS"
        plugin.on_log(ctx)
    else:
        assert hit(outcome).status == status


def test_misses_stale_entries_and_other_methods_go_to_the_plugin() -> None:
    plugin, clock = cache()
    _, full, end, log = spied(plugin)
    ctx = Ctx()
    assert plugin.on_request(ctx) is None  # nothing stored yet
    assert full.calls == 1
    upstream(plugin, ctx)  # the miss stores: its end and log hooks reach the plugin
    assert (end.calls, log.calls) == (1, 1)
    assert hit(plugin.on_request(Ctx())).status == 200
    assert full.calls == 1
    post = Ctx("POST")
    assert plugin.on_request(post) is None and post.cache_status == "BYPASS"
    assert full.calls == 2
    clock.now += 61  # past max-age=60
    stale = Ctx()
    assert plugin.on_request(stale) is None and stale.cache_status == "MISS"
    assert full.calls == 3
    plugin.on_log(stale)


def test_an_entry_not_for_credentials_goes_to_the_plugin() -> None:
    plugin, _ = cache(key_include_consumer=False)
    stored(plugin)  # stored for a request without Authorization: not `public`
    _, full, _, _ = spied(plugin)
    ctx = Ctx(headers=[("Authorization", "Bearer x")])
    assert plugin.on_request(ctx) is None and ctx.cache_status == "MISS"
    assert full.calls == 1
    plugin.on_log(ctx)


def test_a_public_entry_serves_a_request_with_credentials() -> None:
    plugin, _ = cache(key_include_consumer=False)
    stored(plugin, (b"Cache-Control", b"public"), headers=[("Authorization", "Bearer x")])
    _, full, _, _ = spied(plugin)
    response = hit(plugin.on_request(Ctx(headers=[("Authorization", "Bearer y")])))
    assert header(response, b"X-Cache") == b"HIT"
    assert full.calls == 0


def test_a_vary_variant_that_does_not_match_goes_to_the_plugin() -> None:
    plugin, _ = cache()
    stored(plugin, (b"Vary", b"Accept-Language"), headers=[("Accept-Language", "fr")])
    _, full, _, _ = spied(plugin)
    other = Ctx(headers=[("Accept-Language", "de")])
    assert plugin.on_request(other) is None and other.cache_status == "MISS"
    assert full.calls == 1
    plugin.on_log(other)
    assert hit(plugin.on_request(Ctx(headers=[("Accept-Language", "fr")]))).status == 200
    assert full.calls == 1


def test_the_redis_store_keeps_the_plugins_own_hooks() -> None:
    plugin, _ = cache(store="redis://127.0.0.1:1/0")  # (nothing connects before a lookup)
    assert not isinstance(plugin.on_request.__self__, MemoryHits)
    assert plugin.on_request.__func__ is CachePlugin.on_request  # type: ignore[attr-defined]
    assert plugin.on_log.__func__ is CachePlugin.on_log  # type: ignore[attr-defined]


class _Stamp(Plugin):
    """A plugin above the cache whose response hook marks what it decorated."""

    name = "stamp"
    priority = 900

    def on_response(self, ctx: Any, head: Any) -> None:
        head.headers.append((b"X-Stamp", b"1"))


def test_a_stale_answer_is_decorated_by_the_plugins_above() -> None:
    """The stale answer goes out without the exchange's decoration, so the plugin finds its
    own place in the chain to apply the hooks above it: by its hook, which is MemoryHits's
    now (review: it found none, and sent the stored rate-limit headers instead of fresh)."""
    plugin, clock = cache(stale_if_error="1m")
    chain = PluginChain([plugin, _Stamp(PluginConfig(), make_env())])
    stored(plugin)
    clock.now += 70  # stale, within stale-if-error
    failing = Ctx()
    failing.route = SimpleNamespace(name="r", chain=chain)
    assert plugin.on_request(failing) is None
    response = hit(failing.vars["stale_response"]())
    assert header(response, b"X-Stamp") == b"1"
    assert header(response, b"X-Cache") == b"STALE"
