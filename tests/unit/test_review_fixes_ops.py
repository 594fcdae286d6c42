"""Review fixes on the operations side, without sockets: TLS files and reloads, re-registration
URLs, the admin view of active health checks, later traceparent versions, URL password
redaction and registration input checks."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from apigate.admin.api import AdminApi
from apigate.admin.http import AdminError, AdminRequest
from apigate.config.errors import ConfigError
from apigate.config.schema import GatewayConfig, ServiceConfig
from apigate.http.pool import PoolManager
from apigate.observability.trace_context import (
    continue_trace,
    parse_traceparent,
    span_context,
    trace_id_of,
)
from apigate.redaction import redact_url
from apigate.registry.health import ProbeState, attach_health, health_checker
from apigate.registry.registry import Registration, attach_registry, registry_of
from apigate.registry.service import Service
from apigate.runtime import dry_compile
from apigate.server import Gateway
from tests.support.certs import CertFiles, TestCA
from tests.unit.test_tracing import ctx

# ---------------------------------------------------------------------- TLS files and reloads


def _tls_doc(default: CertFiles, sni: CertFiles, *, routes: int = 1, **tls: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": {
            "proxy": {
                "address": "127.0.0.1:0",
                "tls": {
                    "certificate": str(default.cert),
                    "key": str(default.key),
                    "certificates": [{"certificate": str(sni.cert), "key": str(sni.key)}],
                    **tls,
                },
            },
            "admin": None,
        },
        "services": {"up": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [
            {"name": f"r{i}", "match": {"paths": [f"/r{i}"]}, "service": "up"}
            for i in range(routes)
        ],
    }


async def test_an_unchanged_tls_section_does_not_veto_a_reload_over_a_broken_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = TestCA(tmp_path)
    default, sni = ca.issue("gw", ["test.local"]), ca.issue("a", ["a.test"])
    gw = Gateway(GatewayConfig.model_validate(_tls_doc(default, sni)))
    try:
        ca.expired("a", ["a.test"])  # the SNI pair replaced on disk by an expired one
        with caplog.at_level(logging.WARNING, logger="apigate.tls"):
            await gw.apply_config(GatewayConfig.model_validate(_tls_doc(default, sni, routes=2)))
        assert set(gw.runtime.routes) == {"r0", "r1"}  # the route-only change took
        warned = [r for r in caplog.records if r.name == "apigate.tls"]
        assert warned and warned[0].levelno == logging.WARNING
        assert "expired on" in warned[0].getMessage()

        # a reload that changes the tls section is checked as at start-up
        changed = _tls_doc(default, sni, routes=3, min_version="1.3")
        with pytest.raises(ConfigError, match="expired on"):
            await gw.apply_config(GatewayConfig.model_validate(changed))
        assert set(gw.runtime.routes) == {"r0", "r1"}
    finally:
        gw.pools.close()


async def test_dry_compile_checks_tls_files_unless_the_section_is_the_one_in_force(
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path)
    default, sni = ca.issue("gw", ["test.local"]), ca.issue("a", ["a.test"])
    config = GatewayConfig.model_validate(_tls_doc(default, sni))
    ca.expired("a", ["a.test"])
    loop = asyncio.get_running_loop()
    with pytest.raises(ConfigError, match="expired on"):
        dry_compile(config, loop)  # `apigate validate`: nothing is in force, all is checked
    in_force = config.listeners.proxy.tls
    dry_compile(config, loop, tls_in_force=in_force)  # a reload keeping the section: passes
    changed = GatewayConfig.model_validate(_tls_doc(default, sni, min_version="1.3"))
    with pytest.raises(ConfigError, match="expired on"):
        dry_compile(changed, loop, tls_in_force=in_force)


# ---------------------------------------------------------------------- re-registration URLs


def _gateway_doc(**services: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
        "services": services or {"s": {}},
        "routes": [
            {"name": "all", "match": {"paths": ["/"]}, "service": next(iter(services or {"s": {}}))}
        ],
    }


async def test_a_re_registration_that_moves_only_the_base_path_updates_the_url() -> None:
    gw = Gateway(GatewayConfig.model_validate(_gateway_doc()))
    try:
        await attach_registry(gw)
        registry = registry_of(gw)
        first, created = await registry.register(
            Registration("s", "a1", "http://127.0.0.1:9001/v1", 10.0)
        )
        assert created and first.base_path == "/v1"
        first.in_flight = 3  # state that a heartbeat at the same address keeps
        again, created = await registry.register(
            Registration("s", "a1", "http://127.0.0.1:9001/v2", 10.0)
        )
        assert again is first and not created and again.in_flight == 3
        assert (again.url, again.base_path) == ("http://127.0.0.1:9001/v2", "/v2")
        # what GET /services shows and what a cluster node writes back to an emptied Redis
        assert registry.registered()[("s", "a1")].url == "http://127.0.0.1:9001/v2"
        doc = AdminApi(gw)._service_doc(gw.services.services["s"])
        assert [i["url"] for i in doc["instances"]] == ["http://127.0.0.1:9001/v2"]
    finally:
        gw.pools.close()


async def test_a_static_target_follows_its_base_path_on_reload() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    try:
        targets = {"targets": ["http://127.0.0.1:9/v1"]}
        svc = Service("s", ServiceConfig.model_validate(targets), pools)
        inst = svc.instances["127.0.0.1:9"]
        svc.apply_config(ServiceConfig.model_validate({"targets": ["http://127.0.0.1:9/v2"]}))
        assert svc.instances["127.0.0.1:9"] is inst  # same address: the same instance
        assert (inst.url, inst.base_path) == ("http://127.0.0.1:9/v2", "/v2")
    finally:
        pools.close()


async def test_a_static_target_that_changes_scheme_is_a_new_instance() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    try:
        targets = {"targets": ["http://127.0.0.1:9"]}
        svc = Service("s", ServiceConfig.model_validate(targets), pools)
        svc.apply_config(ServiceConfig.model_validate({"targets": ["https://127.0.0.1:9"]}))
        moved = svc.instances["127.0.0.1:9"]  # (its id is host:port, whatever the scheme)
        assert (moved.url, moved.scheme) == ("https://127.0.0.1:9", "https")
        assert svc.pool_for(moved).scheme == "https"
    finally:
        pools.close()


# ---------------------------------------------------------------------- active health in the API


async def test_the_admin_view_shows_the_active_checks_last_probe_and_error() -> None:
    active = {"path": "/health", "interval": "1h"}
    doc = _gateway_doc(svc={"targets": ["http://127.0.0.1:9"], "health": {"active": active}})
    gw = Gateway(GatewayConfig.model_validate(doc))
    try:
        await attach_health(gw)
        checker = health_checker(gw)
        assert checker is not None
        svc = gw.services.services["svc"]
        inst = svc.instances["127.0.0.1:9"]
        state = checker.states[("svc", inst.id)] = ProbeState(svc, inst)
        checker.record(state, False, "HTTP 503")  # one probe, as the checker's task records it
        shown = AdminApi(gw)._service_doc(svc)["health"]
        assert shown[inst.id]["last_error"] == "HTTP 503"
        assert shown[inst.id]["last_check"] is not None and shown[inst.id]["failures"] == 1
        assert gw.health_status("other") == {}
    finally:
        gw.pools.close()


# ---------------------------------------------------------------------- later traceparent versions

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "value",
    [
        f"01-{TRACE}-{PARENT}-01",
        f"cc-{TRACE}-{PARENT}-01-what-the-future-will-bring",
        f" fe-{TRACE}-{PARENT}-01- \t",
    ],
)
def test_a_later_traceparent_version_is_continued_as_version_00(value: str) -> None:
    assert parse_traceparent(value.encode()) == (TRACE, PARENT, "01")
    sent, trace_id, continued = continue_trace(value.encode())
    assert continued and trace_id == TRACE
    assert sent.startswith(f"00-{TRACE}-".encode()) and sent.endswith(b"-01") and len(sent) == 55
    exchange = ctx((b"traceparent", value.encode()))
    assert trace_id_of(exchange) == TRACE
    assert span_context(exchange)[2] == PARENT  # the client's span is the exporter's parent


@pytest.mark.parametrize(
    "value",
    [
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"01-{TRACE}-{PARENT}-01extra",  # flags end the value or a "-" follows
        f"01-{TRACE}-{PARENT}-0",
        f"01-{'0' * 32}-{PARENT}-01",
        f"01-{TRACE}-{'0' * 16}-01",
        f"0g-{TRACE}-{PARENT}-01",
        f"01-{TRACE.upper()}-{PARENT}-01",
    ],
)
def test_a_traceparent_that_no_version_allows_starts_a_new_trace(value: str) -> None:
    assert parse_traceparent(value.encode()) is None
    sent, trace_id, continued = continue_trace(value.encode())
    assert not continued and trace_id != TRACE and sent.startswith(b"00-")


# ---------------------------------------------------------------------- URL passwords


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:p@ss@127.0.0.1:6379/0", "redis://:[redacted]@127.0.0.1:6379/0"),
        ("redis://:p@s@s@h:1", "redis://:[redacted]@h:1"),
        ("http://user:p@ss@host/x@y", "http://user:[redacted]@host/x@y"),
        ("http://u@x:pw@host/", "http://u@x:[redacted]@host/"),  # the user ends at the ":"
        ("http://a:b@c?q=@d", "http://a:[redacted]@c?q=@d"),
        (
            "at redis://:p@ss@h:1 and http://u:v@w/ ok",
            "at redis://:[redacted]@h:1 and http://u:[redacted]@w/ ok",
        ),
        ("http://a@b:80/x@y", "http://a@b:80/x@y"),  # no password
    ],
)
def test_a_password_with_an_at_sign_is_redacted_whole(text: str, shown: str) -> None:
    assert redact_url(text) == shown


# ---------------------------------------------------------------------- registration input


@pytest.fixture
async def admin() -> AsyncIterator[AdminApi]:
    gw = Gateway(GatewayConfig.model_validate(_gateway_doc(hello={})))
    await attach_registry(gw)
    try:
        yield AdminApi(gw)
    finally:
        gw.pools.close()


async def _put(api: AdminApi, iid: str, body: Any) -> tuple[int, str, dict[str, Any]]:
    req = AdminRequest(
        "PUT",
        f"/services/hello/instances/{iid}",
        {},
        {},
        json.dumps(body).encode(),
        "127.0.0.1",
    )
    try:
        reply = await api.handle(req)
    except AdminError as exc:
        return exc.status, exc.code, {"message": exc.message}
    return reply.status, "", json.loads(reply.body)


@pytest.mark.parametrize(
    ("iid", "body", "field"),
    [
        ("x", {"url": "http://127.0.0.1:9", "metadata": []}, "metadata"),
        ("x", {"url": "http://127.0.0.1:9", "metadata": None}, "metadata"),
        ("x", {"url": "http://127.0.0.1:9", "metadata": "zone=a"}, "metadata"),
        ("x", {"url": " http://127.0.0.1:9"}, "url"),
        ("x", {"url": "http://127.0.0.1:9/v1 "}, "url"),
        ("x", {"url": "http://127.0.0.1:9/a b"}, "url"),
        ("x", {"url": "http://127.0.0.1:9/a\r\nX-Evil: 1"}, "url"),
        ("i" * 129, {"url": "http://127.0.0.1:9"}, "instance id"),
        ("i" * 5000, {"url": "http://127.0.0.1:9"}, "instance id"),
        ("x", {"url": "http://127.0.0.1:9", "metadata": {"k": "v" * 16_400}}, "metadata"),
    ],
)
async def test_bad_registration_input_is_refused_naming_the_field(
    admin: AdminApi, iid: str, body: dict[str, Any], field: str
) -> None:
    status, code, doc = await _put(admin, iid, body)
    # (a URL's form is the targets' rule, checked by the registry: invalid_url)
    assert (status, code) == (400, "invalid_url" if field == "url" else "invalid_body")
    assert doc["message"].startswith(field), doc
    assert admin.gateway.services.services["hello"].instances == {}


async def test_registration_input_at_the_bounds_is_taken(admin: AdminApi) -> None:
    metadata = {"k": "v" * (16 * 1024 - len('{"k":""}'))}  # exactly 16 KiB as JSON
    status, _, doc = await _put(
        admin, "i" * 128, {"url": "http://127.0.0.1:9", "metadata": metadata}
    )
    assert status == 201 and doc["metadata"] == metadata
    status, _, doc = await _put(admin, "plain", {"url": "http://127.0.0.1:9/v1"})
    assert status == 201 and doc["metadata"] == {} and doc["url"] == "http://127.0.0.1:9/v1"
