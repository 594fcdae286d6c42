"""Review fixes on the control plane, without sockets: refused configs leave the service table
alone, admin-saved routes keep their place, `store` is restart-only, deleting a service with
registered instances, admin names, IPv6 route hosts, config error messages and the files that
--watch follows."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from apigate.admin.api import AdminApi
from apigate.admin.config_ops import ConfigOps
from apigate.admin.http import AdminError, AdminRequest
from apigate.admin.server import attach_admin
from apigate.cli import main as cli_main
from apigate.config import loader
from apigate.config.errors import ConfigError
from apigate.config.loader import dump_config, load_config, parse_config
from apigate.config.schema import GatewayConfig
from apigate.plugins.base import Plugin
from apigate.registry.registry import Registration, attach_registry, registry_of
from apigate.routing.matcher import Match, Matcher, RouteSpec
from apigate.runtime import dry_compile
from apigate.server import Gateway
from apigate.store.config_store import ConfigStore, SqliteConfigStore

# ---------------------------------------------------------------------- refused configs


def _doc(services: dict[str, Any], routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
        "services": services,
        "routes": routes,
        **extra,
    }


def _route(name: str, service: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"paths": [f"/{name}"]}, "service": service, **extra}


GOOD = _doc(
    {
        "a": {"targets": ["http://127.0.0.1:9001"]},
        "b": {"targets": ["http://127.0.0.1:9002"]},
        "orders": {},
    },
    [_route("a", "a"), _route("b", "b"), _route("orders", "orders")],
)
BAD_PLUGIN = {"rate_limit": {"requests": 10, "per": "1m", "key": "nobody"}}


class FailingStart(Plugin):
    """A plugin whose config is fine but that cannot start (a JWKS URL down, say)."""

    name = "failing_start"

    async def start(self) -> None:
        raise RuntimeError("cannot reach the key server")


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = Gateway(GatewayConfig.model_validate(GOOD))
    try:
        yield gw
    finally:
        gw.pools.close()


def _table(gw: Gateway) -> dict[str, Any]:
    """What must not change: the table's objects, their configs and instances."""
    return {
        name: (svc, svc.config, dict(svc.instances), svc.balancer)
        for name, svc in gw.services.services.items()
    }


@pytest.mark.parametrize(
    "refusal",
    ["a plugin config", "a plugin that cannot start", "a bad rewrite template"],
)
async def test_a_refused_config_leaves_the_service_table_exactly_as_it_was(
    gateway: Gateway, refusal: str
) -> None:
    """The refused config drops `orders` (no instance) and `b` (a static target), adds `new`
    and moves `a`: the table keeps the very objects the serving snapshot holds, so that a
    registration made afterwards gets traffic (it went to a rebuilt copy nothing served)."""
    before = _table(gateway)
    routes: list[dict[str, Any]] = [_route("a", "a"), _route("new", "new")]
    if refusal == "a plugin config":
        routes[0]["plugins"] = BAD_PLUGIN
    elif refusal == "a plugin that cannot start":
        routes[0]["plugins"] = {f"{__name__}:FailingStart": {}}
    else:
        routes[0]["rewrite"] = "/v2//x"  # not canonical: refused when compiled
    bad = _doc({"a": {"targets": ["http://127.0.0.1:9009"]}, "new": {}}, routes)
    with pytest.raises(ConfigError):
        await gateway.apply_config(GatewayConfig.model_validate(bad))
    assert _table(gateway) == before
    for route in gateway.runtime.routes.values():
        assert route.service is gateway.services.services[route.config.service or ""]
    assert gateway.runtime.services == gateway.services.services


async def test_a_registration_after_a_refused_reload_gets_the_traffic(gateway: Gateway) -> None:
    await attach_registry(gateway)
    bad = _doc({"a": {}}, [_route("a", "a", plugins=BAD_PLUGIN)])
    with pytest.raises(ConfigError):
        await gateway.apply_config(GatewayConfig.model_validate(bad))
    inst, _ = await registry_of(gateway).register(
        Registration("orders", "o1", "http://127.0.0.1:9005", 60.0)
    )
    served = gateway.runtime.routes["orders"].service
    assert served is not None and served.instances.get("o1") is inst


async def test_an_accepted_config_still_reconciles_the_table(gateway: Gateway) -> None:
    kept = gateway.services.services["a"]
    new = _doc({"a": {"targets": ["http://127.0.0.1:9009"]}, "c": {}}, [_route("a", "a")])
    await gateway.apply_config(GatewayConfig.model_validate(new))
    assert set(gateway.services.services) == {"a", "c"}
    assert gateway.services.services["a"] is kept and list(kept.instances) == ["127.0.0.1:9009"]
    assert gateway.runtime.routes["a"].service is kept


# ---------------------------------------------------------------------- route order in the store

FILE_DOC = _doc(
    {"a": {}, "b": {}},
    [_route("first", "a"), _route("second", "b")],
)


def _names(doc: dict[str, Any], kind: str = "routes") -> list[str]:
    return [item["name"] for item in doc[kind]]


async def _stores(tmp_path: Path, kind: str) -> AsyncIterator[ConfigStore]:
    """The store, then (sqlite) the same file opened again, as after a restart."""
    if kind == "memory":
        store = ConfigStore()
        yield store
        return
    path = tmp_path / "state.db"
    first = SqliteConfigStore(path)
    await first.open()
    yield first
    await first.close()
    again = SqliteConfigStore(path)
    await again.open()
    try:
        yield again
    finally:
        await again.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_route_saved_through_the_admin_api_keeps_its_place(
    tmp_path: Path, kind: str
) -> None:
    """As the live change does (`config_ops._with_entity`): a replaced route stays where it
    was, so the first of two equally specific routes still wins after a reload or restart."""
    stores = _stores(tmp_path, kind)
    store = await anext(stores)
    await store.put("routes", "first", {"match": {"paths": ["/first"]}, "service": "b"})
    await store.put("routes", "added", {"match": {"paths": ["/added"]}, "service": "a"})
    await store.put("routes", "later", {"match": {"paths": ["/later"]}, "service": "a"})
    await store.put("routes", "added", {"match": {"paths": ["/added2"]}, "service": "a"})
    await store.put("consumers", "c1", {"api_keys": ["k1"]})
    if kind == "sqlite":
        store = await anext(stores)  # what a restart reads back
    merged = store.merge(FILE_DOC)
    assert _names(merged) == ["first", "second", "added", "later"]
    assert merged["routes"][0]["service"] == "b"  # (replaced, in place)
    assert merged["routes"][2]["match"] == {"paths": ["/added2"]}
    parse_config(merged)  # (a valid config)
    await stores.aclose()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_route_created_again_after_its_deletion_goes_last(
    tmp_path: Path, kind: str
) -> None:
    stores = _stores(tmp_path, kind)
    store = await anext(stores)
    for name in ("x", "y"):
        await store.put("routes", name, {"match": {"paths": [f"/{name}"]}, "service": "a"})
    await store.put("routes", "x", None)
    await store.put("routes", "x", {"match": {"paths": ["/x"]}, "service": "a"})
    if kind == "sqlite":
        store = await anext(stores)
    assert _names(store.merge(FILE_DOC)) == ["first", "second", "y", "x"]  # as live
    await stores.aclose()


# ---------------------------------------------------------------------- store: restart only


async def test_a_reload_that_changes_the_store_is_refused(gateway: Gateway) -> None:
    changed = dict(GOOD, store="redis://:hunter2@127.0.0.1:6379/0")
    with pytest.raises(ConfigError) as refused:
        await gateway.apply_config(GatewayConfig.model_validate(changed))
    line = str(refused.value)
    assert "store: memory -> redis://:[redacted]@127.0.0.1:6379/0 needs a restart" in line
    assert "hunter2" not in line
    assert gateway.config.store == "memory"


async def test_post_config_that_changes_the_store_is_refused_dry_run_or_not(
    tmp_path: Path,
) -> None:
    gw = Gateway(GatewayConfig.model_validate(GOOD))
    try:
        await attach_admin(gw)
        ops = ConfigOps.of(gw)
        doc = dict(dump_config(gw.config), store=f"sqlite:///{tmp_path}/state.db")
        for dry_run in (True, False):
            with pytest.raises(ConfigError, match=r"store: memory -> sqlite:.* needs a restart"):
                await ops.replace(doc, dry_run=dry_run)
        assert gw.config.store == "memory" and ops.store.base is None
    finally:
        gw.pools.close()


def test_the_effective_store_is_the_file_s_whatever_a_posted_base_says() -> None:
    """The base a `POST /config` stored cannot move the store (it lives in that store): the
    file chose it at start-up, and a reload of an unchanged file must not look like a move."""
    store = ConfigStore()
    store.base = dict(FILE_DOC, store="sqlite:///elsewhere.db")
    assert store.merge(dict(FILE_DOC, store="memory"))["store"] == "memory"


# ---------------------------------------------------------------------- deleting a service


async def admin_api(doc: dict[str, Any]) -> AsyncIterator[AdminApi]:
    """An admin API over a gateway built from `doc` (not listening), with the registry:
    the body of an `admin` fixture."""
    gw = Gateway(GatewayConfig.model_validate(doc))
    try:
        await attach_admin(gw)
        await attach_registry(gw)
        yield AdminApi(gw)
    finally:
        gw.pools.close()


@pytest.fixture
async def admin() -> AsyncIterator[AdminApi]:
    async for api in admin_api(_doc({"a": {}}, [_route("a", "a")])):
        yield api


async def _call(
    api: AdminApi, method: str, raw_path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    from urllib.parse import unquote

    body_bytes = json.dumps(body).encode() if body is not None else b""
    req = AdminRequest(method, unquote(raw_path), {}, {}, body_bytes, "127.0.0.1")
    req.raw_path = raw_path  # (as admin/http.py fills it: still percent-encoded)
    try:
        reply = await api.handle(req)
    except AdminError as exc:
        return exc.status, {"error": exc.code, "message": exc.message}
    return reply.status, json.loads(reply.body)


REG = {"url": "http://127.0.0.1:9005", "ttl": "60s"}


async def test_a_service_with_registered_instances_is_not_deleted(admin: AdminApi) -> None:
    assert (await _call(admin, "PUT", "/services/pay/instances/p1", REG))[0] == 201
    status, doc = await _call(admin, "DELETE", "/services/pay")
    assert (status, doc["error"]) == (409, "conflict")
    assert "registered instance" in doc["message"] and "p1" in doc["message"]
    # nothing half-done: the service is still in the config, routes may still name it
    assert "pay" in admin.gateway.config.services
    route = {"match": {"paths": ["/pay"]}, "service": "pay"}
    assert (await _call(admin, "PUT", "/routes/pay", route))[0] == 201
    assert (await _call(admin, "DELETE", "/routes/pay"))[0] == 200
    assert (await _call(admin, "DELETE", "/services/pay/instances/p1"))[0] == 200
    assert (await _call(admin, "DELETE", "/services/pay"))[0] == 200
    assert (await _call(admin, "GET", "/services/pay"))[0] == 404
    assert "pay" not in admin.gateway.config.services


async def test_a_registration_declares_again_a_service_a_config_dropped(admin: AdminApi) -> None:
    """A config that drops a service still holding registrations leaves it in the table for
    them; their next heartbeat puts it back in the config, so routes can name it again."""
    assert (await _call(admin, "PUT", "/services/pay/instances/p1", REG))[0] == 201
    ops = ConfigOps.of(admin.gateway)
    await ops.replace(_doc({"a": {}}, [_route("a", "a")]))
    assert "pay" not in admin.gateway.config.services
    assert (await _call(admin, "PUT", "/services/pay/instances/p1", REG))[0] == 200
    assert "pay" in admin.gateway.config.services
    route = {"match": {"paths": ["/pay"]}, "service": "pay"}
    assert (await _call(admin, "PUT", "/routes/pay", route))[0] == 201
    served = admin.gateway.runtime.routes["pay"].service
    assert served is admin.gateway.services.services["pay"] and "p1" in served.instances


# ---------------------------------------------------------------------- admin names


@pytest.mark.parametrize("name", ["alice@example.com", "a/b", "bob smith", "zoë"])
async def test_a_consumer_the_file_accepts_can_be_addressed(admin: AdminApi, name: str) -> None:
    from urllib.parse import quote

    path = "/consumers/" + quote(name, safe="@")
    status, doc = await _call(admin, "PUT", path, {"api_keys": ["k-" + str(len(name))]})
    assert status == 201, doc
    status, doc = await _call(admin, "GET", path)
    assert (status, doc["name"]) == (200, name)
    assert (await _call(admin, "DELETE", path)) == (200, {"deleted": name})
    assert (await _call(admin, "GET", path))[0] == 404


async def test_an_instance_id_out_of_the_charset_is_a_400_naming_the_field(
    admin: AdminApi,
) -> None:
    status, doc = await _call(admin, "PUT", "/services/a/instances/10.0.0.5:9000", REG)
    assert (status, doc["error"]) == (400, "invalid_body")
    assert doc["message"].startswith("instance id '10.0.0.5:9000'")
    status, doc = await _call(admin, "PUT", "/routes/bad%20name", {"service": "a"})
    assert (status, doc["error"]) == (400, "invalid_config")
    assert "invalid name 'bad name'" in doc["message"]


# ---------------------------------------------------------------------- IPv6 route hosts


@pytest.mark.parametrize("written", ["::1", "[::1]", "[0:0::1]", "::1"])
def test_an_ipv6_route_host_is_kept_as_a_host_header_writes_it(written: str) -> None:
    doc = _doc({"s": {}}, [_route("v6", "s", match={"paths": ["/"], "hosts": [written]})])
    config = parse_config(doc)
    assert config.routes[0].match.hosts == ["[::1]"]


@pytest.mark.parametrize("host", ["[::1]", "[::1]:8080", "[0:0::1]:80"])
def test_an_ipv6_route_host_matches_the_host_header(host: str) -> None:
    spec = RouteSpec("v6", ("/",), hosts=("::1",))
    matcher = Matcher([spec, RouteSpec("other", ("/",), hosts=("example.com",))])
    found = matcher.match(host, "GET", "/x", lambda _: None)
    assert isinstance(found, Match) and found.spec is spec
    assert not isinstance(matcher.match("[::2]:80", "GET", "/x", lambda _: None), Match)


@pytest.mark.parametrize("host", ["example.com:8080", "[::1]:8080", "::g"])
def test_a_route_host_with_a_port_is_a_schema_error(host: str) -> None:
    doc = _doc({"s": {}}, [_route("r", "s", match={"paths": ["/"], "hosts": [host]})])
    with pytest.raises(ConfigError, match=r"routes\[0\]\.match\.hosts\[0\]: invalid host"):
        parse_config(doc)


async def test_a_problem_only_compiling_finds_is_a_config_error_naming_the_route() -> None:
    """`apigate validate` prints config errors, never a traceback (ValueError from compiling
    a rewrite template or the matcher's table)."""
    import asyncio

    doc = _doc({"s": {}}, [_route("ok", "s"), _route("r", "s", rewrite="/v2/../x")])
    with pytest.raises(ConfigError, match=r"^routes\[1\]\.rewrite: rewrite template"):
        dry_compile(parse_config(doc), asyncio.get_running_loop())


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_and_routes_take_an_ipv6_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        'services: {s: {}}\nroutes:\n  - {name: v6, match: {paths: [/], hosts: ["::1"]}, '
        "service: s}\n"
    )
    assert _cli(capsys, "validate", "-c", str(path))[0] == 0
    code, out, _ = _cli(capsys, "routes", "-c", str(path), "--json")
    assert code == 0
    assert json.loads(out) == [
        {
            "name": "v6",
            "host": "[::1]",
            "methods": "*",
            "path": "/",
            "kind": "prefix",
            "headers": "",
            "service": "s",
            "plugins": [],
        }
    ]
    path.write_text(path.read_text().replace('"::1"', '"[::1]:80"'))
    code, _, err = _cli(capsys, "validate", "-c", str(path))
    assert code == 2 and "Traceback" not in err
    assert "routes[0].match.hosts[0]: invalid host '[::1]:80'" in err


# ---------------------------------------------------------------------- messages


async def test_an_unknown_plugin_gets_a_suggestion_and_its_name_once() -> None:
    import asyncio

    doc = _doc({"s": {}}, [_route("r", "s", plugins={"rate_limt": {}})])
    with pytest.raises(ConfigError) as refused:
        dry_compile(parse_config(doc), asyncio.get_running_loop())
    (line,) = refused.value.errors
    assert line.startswith(
        "routes[0].plugins.rate_limt: unknown plugin 'rate_limt'; did you mean 'rate_limit'?"
    )
    assert line.count("rate_limt") == 2  # the path and the name, no third copy


async def test_plugin_errors_in_an_included_file_name_the_file_and_its_index(
    tmp_path: Path,
) -> None:
    import asyncio

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "gw.yaml").write_text(
        textwrap.dedent(
            """\
            include: [conf.d/*.yaml]
            services: {s: {}}
            routes:
              - {name: main, match: {paths: [/main]}, service: s}
            """
        )
    )
    (tmp_path / "conf.d" / "more.yaml").write_text(
        textwrap.dedent(
            """\
            plugins:
              cors: {origins: 5}
            routes:
              - {name: ok, match: {paths: [/ok]}, service: s}
              - name: limited
                match: {paths: [/limited]}
                service: s
                plugins: {rate_limit: {requests: 10, per: 1m, key: nobody}}
            """
        )
    )
    config = load_config(tmp_path / "gw.yaml")
    with pytest.raises(ConfigError) as refused:
        dry_compile(config, asyncio.get_running_loop())
    lines = refused.value.errors
    assert any(
        line.startswith("conf.d/more.yaml: routes[1].plugins.rate_limit.key: invalid key")
        for line in lines
    ), lines
    assert any(line.startswith("conf.d/more.yaml: plugins.cors.origins") for line in lines)


def test_strip_prefix_with_rewrite_is_a_config_error() -> None:
    doc = _doc({"s": {}}, [_route("r", "s", strip_prefix=True, rewrite="/v2")])
    with pytest.raises(ConfigError, match=r"routes\[0\]\.strip_prefix: not allowed with rewrite"):
        parse_config(doc)


# ---------------------------------------------------------------------- what --watch follows


def test_config_sources_cover_included_files_and_new_glob_matches(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "gw.yaml").write_text("include: [conf.d/*.yaml, fixed.yaml]\n")
    (tmp_path / "fixed.yaml").write_text("services: {s: {}}\n")
    (tmp_path / "conf.d" / "a.yaml").write_text("services: {a: {}}\n")
    sources = loader.ConfigSources()
    load_config(tmp_path / "gw.yaml", sources=sources)
    assert [p.name for p in sources.files] == ["gw.yaml", "a.yaml", "fixed.yaml"]
    assert sources.globs == [(tmp_path, "conf.d/*.yaml")]
    stamp = sources.stamp()
    (tmp_path / "fixed.yaml").write_text("services: {s: {}, t: {}}\n")  # an edit (size)
    assert sources.stamp() != stamp
    stamp = sources.stamp()
    (tmp_path / "conf.d" / "b.yaml").write_text("services: {b: {}}\n")  # a new match
    assert sources.stamp() != stamp


def test_config_sources_are_filled_even_when_the_config_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text("include: [broken.yaml]\n")
    (tmp_path / "broken.yaml").write_text("routes: [unclosed\n")
    sources = loader.ConfigSources()
    with pytest.raises(ConfigError):
        load_config(tmp_path / "gw.yaml", sources=sources)
    assert [p.name for p in sources.files] == ["gw.yaml", "broken.yaml"]


# ---------------------------------------------------------------------- store writes


async def test_an_admin_change_is_in_force_only_once_the_store_has_kept_it(
    admin: AdminApi,
) -> None:
    """A change was applied first and stored second: while a slow (or hung) shared store
    took the write, the change served, and one the store then refused had served for that
    long before it was undone. It takes effect when the store has kept it now."""
    store = ConfigOps.of(admin.gateway).store
    kept = store.put
    gate = asyncio.Event()
    fail = True

    async def slow_put(*args: Any) -> None:
        await gate.wait()
        if fail:
            raise ConnectionError("redis timed out")
        await kept(*args)

    store.put = slow_put  # type: ignore[method-assign]
    route = {"match": {"paths": ["/new"]}, "service": "a"}
    for outcome in ("refused", "kept"):
        gate.clear()
        call = asyncio.ensure_future(_call(admin, "PUT", "/routes/new", route))
        await asyncio.sleep(0.05)
        assert not call.done()
        assert "new" not in admin.gateway.runtime.routes, "in force before it was stored"
        gate.set()
        status, doc = await call
        if outcome == "refused":
            assert (status, doc["error"]) == (503, "store_unavailable"), doc
            assert "new" not in admin.gateway.runtime.routes
            fail = False
        else:
            assert status == 201, doc
            assert "new" in admin.gateway.runtime.routes


class SlowStart(Plugin):
    """A plugin whose start waits on the network (a Redis ping, a JWKS fetch)."""

    name = "slow_start"
    started: list[float] = []

    async def start(self) -> None:
        await asyncio.sleep(0.2)
        SlowStart.started.append(asyncio.get_running_loop().time())


async def test_plugins_start_together_so_a_hung_store_costs_one_timeout(gateway: Gateway) -> None:
    """Each plugin's start ran after the one before: with Redis hung, every Redis-kept rate
    limit's warm-up ping waited out its timeout in turn, and an admin change took 7 s to be
    refused (six limiters). They start concurrently now; the first failure still refuses."""
    SlowStart.started.clear()
    routes = [_route(n, "a", plugins={f"{__name__}:SlowStart": {}}) for n in "abcdef"]
    doc = _doc({"a": {"targets": ["http://127.0.0.1:9001"]}}, routes)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await gateway.apply_config(GatewayConfig.model_validate(doc))
    assert len(SlowStart.started) == 6
    assert loop.time() - began < 0.6, "started one after another"
    routes.append(_route("g", "a", plugins={f"{__name__}:FailingStart": {}}))
    with pytest.raises(ConfigError, match="cannot reach the key server"):
        await gateway.apply_config(GatewayConfig.model_validate(_doc(doc["services"], routes)))
    assert "g" not in gateway.runtime.routes


@pytest.mark.parametrize("command", ["validate", "routes", "check"])
def test_an_invalid_file_is_named_once_whichever_check_refused_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "gw.yaml"
    service = '  s: {targets: ["http://127.0.0.1:1"]}\n'
    route = "  - {name: r, match: {paths: [/]}, service: s%s}\n"
    path.write_text("services:\n" + service + "routes:\n" + route % ", retries: 3")
    code, _, err = _cli(capsys, command, "-c", str(path))  # the schema's refusal
    assert code == 2
    first, second = err.splitlines()
    assert first == f"{path}: invalid" and second.startswith("  routes[0].retries: unknown key")
    jwt = ", plugins: {jwt: {secret: short, algorithms: [HS256]}}"
    path.write_text("services:\n" + service + "routes:\n" + route % jwt)
    code, _, err = _cli(capsys, command, "-c", str(path))  # a plugin's, when it is built
    assert code == 2
    assert err.splitlines() == [
        f"{path}: invalid",
        "  routes[0].plugins.jwt.secret: 5 bytes is too short for HS256: RFC 7518 asks for at "
        "least 32",
    ]


def test_an_invalid_report_names_a_source_other_than_the_file() -> None:
    from apigate.config.errors import ConfigError, invalid_report

    stored = ConfigError(["routes[0].service: unknown service 'gone'"], "sqlite:///gw.db")
    assert invalid_report("gw.yaml", stored).splitlines() == [
        "gw.yaml: invalid",
        "  sqlite:///gw.db:",
        "    routes[0].service: unknown service 'gone'",
    ]


async def test_a_refused_change_is_explained_on_one_line_without_a_file_name(
    admin: AdminApi,
) -> None:
    route = {"service": "a", "retriez": 1, "match": {"paths": ["/x"]}}
    status, doc = await _call(admin, "PUT", "/routes/r1", route)
    assert (status, doc["error"]) == (400, "invalid_config")
    assert doc["message"].startswith("routes[1] (r1).retriez: unknown key")
    status, doc = await _call(admin, "POST", "/config", {"services": {"a": {"targets": [1, 2]}}})
    assert (status, doc["error"]) == (400, "invalid_config")
    assert doc["message"] == (
        "services.a.targets[0]: must be a mapping of keys, not a number; "
        "services.a.targets[1]: must be a mapping of keys, not a number"
    )
