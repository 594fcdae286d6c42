"""The admin API (CONFIG.md's table): services, instances, routes, consumers, config, health.

Authorization: when a token is configured every request needs `Authorization: Bearer <token>`
(compared in constant time), whatever the address. The config schema already refuses a
non-loopback admin address without a token.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import unquote

from apigate import __version__
from apigate.admin.config_ops import (
    ConfigConflict,
    ConfigOps,
    PreconditionFailed,
    StoreWriteFailed,
)
from apigate.admin.http import AdminError, AdminRequest, AdminResponse, json_response
from apigate.config.errors import ConfigError, unknown_key_message
from apigate.config.loader import dump_config
from apigate.config.schema import MAX_NAME
from apigate.config.units import parse_duration
from apigate.redaction import REDACTED, is_credential_name, redact_url
from apigate.registry.events import EVENTS
from apigate.registry.registry import Registration, RegistrationError, registry_of

if TYPE_CHECKING:
    from apigate.balancing.base import Instance
    from apigate.registry.service import Service
    from apigate.server import Gateway

Route = tuple[str, re.Pattern[str], Callable[[AdminRequest], Awaitable[AdminResponse]]]
# A name in a path is one segment, percent-decoded: whatever the config accepts for that name
# can be addressed (a consumer "alice@example.com", or "a/b" as a%2Fb); the handler then says
# what is wrong with a name (400 naming the field), rather than "no admin endpoint".
_NAME = r"(?P<{}>[^/]+)"
_SINGULAR = {"services": "service", "routes": "route", "consumers": "consumer"}

# An instance id is a name (letters, digits, "_", ".", "-") of at most as many characters as
# a service's or a route's.
MAX_INSTANCE_ID = MAX_NAME
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_.\-]+")
# Metadata is kept in memory on every node (and in Redis with a cluster) and returned by
# every GET /services: a few labels, not a document store.
MAX_METADATA_BYTES = 16 * 1024
# ...nor a deep tree: levels of objects and arrays, the metadata object itself the first.
# Metadata ~980 levels deep fitted in the size and passed a compact json.dumps, then every
# GET /services (dumped with indent=2, from a deeper stack) hit the recursion limit: a 500,
# and `apigate status` and the dashboard down for the instance's TTL.
MAX_METADATA_DEPTH = 32


class AdminApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.started = time.time()
        self.routes: list[Route] = []
        svc, inst = _NAME.format("service"), _NAME.format("instance")
        self._add("GET", "/healthz", self.healthz)
        self._add("GET", "/readyz", self.readyz)
        self._add("GET", "/openapi.json", self.openapi)
        self._add("GET", "/services", self.list_services)
        self._add("GET", f"/services/{svc}", self.get_service)
        self._add("PUT", f"/services/{svc}", self.put_entity("services"))
        self._add("DELETE", f"/services/{svc}", self.delete_entity("services"))
        self._add("PUT", f"/services/{svc}/instances/{inst}", self.register)
        self._add("DELETE", f"/services/{svc}/instances/{inst}", self.deregister)
        for kind in ("routes", "consumers"):
            name = _NAME.format("name")
            self._add("GET", f"/{kind}", self.list_entities(kind))
            self._add("GET", f"/{kind}/{name}", self.get_entity(kind))
            self._add("PUT", f"/{kind}/{name}", self.put_entity(kind))
            self._add("DELETE", f"/{kind}/{name}", self.delete_entity(kind))
        self._add("GET", "/config", self.get_config)
        self._add("POST", "/config", self.post_config)
        self._add("GET", "/events", self.events)
        self._add("DELETE", "/cache", self.purge_cache)
        # answered before the token check: the dashboard page and its assets, which a browser
        # loads by navigation and so cannot carry an Authorization header
        self.public_routes: list[Route] = []

    def _add(
        self, method: str, pattern: str, handler: Callable[[AdminRequest], Awaitable[AdminResponse]]
    ) -> None:
        self.routes.append((method, re.compile(pattern + r"\Z"), handler))

    def add_route(
        self,
        method: str,
        pattern: str,
        handler: Callable[[AdminRequest], Awaitable[AdminResponse]],
        *,
        public: bool = False,
    ) -> None:
        if public:
            self.public_routes.append((method, re.compile(pattern + r"\Z"), handler))
        self._add(method, pattern, handler)

    def replace_route(
        self,
        method: str,
        pattern: str,
        handler: Callable[[AdminRequest], Awaitable[AdminResponse]],
    ) -> None:
        """Answer an existing route with another handler (in its place: the first match
        answers), e.g. the whole node's `/metrics` under `--workers N`."""
        for index, (route_method, compiled, _old) in enumerate(self.routes):
            if route_method == method and compiled.pattern == pattern + r"\Z":
                self.routes[index] = (route_method, compiled, handler)
                return
        raise KeyError(f"{method} {pattern}: no such admin route")

    # ------------------------------------------------------------------ dispatch
    async def handle(self, req: AdminRequest) -> AdminResponse:
        method = "GET" if req.method == "HEAD" else req.method
        for route_method, pattern, handler in self.public_routes:
            if route_method == method and pattern.match(req.path):
                return await handler(req)
        self._authorize(req)
        allowed: list[str] = []
        target = req.raw_path or req.path
        for route_method, pattern, handler in self.routes:
            m = pattern.match(target)
            if m is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            req.params = {key: unquote(value) for key, value in m.groupdict().items()}
            try:
                return await handler(req)
            except ConfigConflict as exc:  # (any change: another node's made it impossible)
                raise AdminError(409, "conflict", str(exc)) from None
            except StoreWriteFailed as exc:
                raise AdminError(
                    503,
                    "store_unavailable",
                    f"the store did not confirm the change, so it is not in force here: {exc}",
                    {"Retry-After": "1"},  # Redis unreachable: no better guess than soon
                ) from None
        if allowed:
            raise AdminError(
                405,
                "method_not_allowed",
                f"{req.method} not allowed on {req.path}",
                {"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise AdminError(404, "not_found", f"no admin endpoint {req.path}")

    def _authorize(self, req: AdminRequest) -> None:
        admin = self.gateway.config.listeners.admin
        token = admin.token if admin is not None else ""
        if not token:
            return
        given = req.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise AdminError(
                401,
                "unauthorized",
                "a valid admin token is required",
                {"WWW-Authenticate": 'Bearer realm="apigate-admin"'},
            )

    # ------------------------------------------------------------------ health
    async def healthz(self, req: AdminRequest) -> AdminResponse:
        return json_response(
            {
                "status": "ok",
                "version": __version__,
                "uptime_s": round(time.time() - self.started, 1),
            }
        )

    async def readyz(self, req: AdminRequest) -> AdminResponse:
        gw = self.gateway
        # (the proxy listener accepts once start-up is over: see Gateway.start)
        ready = gw.proxy_server is not None and gw.proxy_server.is_serving() and not gw.draining
        services = {
            name: sum(1 for i in svc.instances.values() if i.available)
            for name, svc in gw.services.services.items()
        }
        doc = {
            "ready": ready,
            "draining": gw.draining,
            "available_instances": services,
            "generation": gw.runtime.generation,
        }
        return json_response(doc, 200 if ready else 503)

    async def openapi(self, req: AdminRequest) -> AdminResponse:
        from apigate.admin.openapi import openapi_document

        return json_response(openapi_document())

    async def events(self, req: AdminRequest) -> AdminResponse:
        since = _int_param(req, "since", 0)
        limit = min(_int_param(req, "limit", 100), 500)
        return json_response({"events": EVENTS.recent(since, limit)})

    # ------------------------------------------------------------------ services and instances
    def _service_doc(self, svc: Service) -> dict[str, Any]:
        now = self.gateway.loop.time()
        return {
            "name": svc.name,
            "balancer": svc.config.balancer,
            "instances": [_instance_doc(i, now) for i in svc.listed_instances()],
            "available": len(svc.balancer.available),
            "routes": [r.name for r in self.gateway.runtime.routes.values() if r.service is svc],
            "health": self.gateway.health_status(svc.name),
            "breaker": svc.breaker.snapshot() if svc.breaker is not None else None,
        }

    async def list_services(self, req: AdminRequest) -> AdminResponse:
        services = self.gateway.services.services
        return json_response({"services": [self._service_doc(s) for s in services.values()]})

    async def get_service(self, req: AdminRequest) -> AdminResponse:
        svc = self.gateway.services.services.get(req.params["service"])
        if svc is None:
            raise AdminError(404, "not_found", f"no service {req.params['service']}")
        doc = self._service_doc(svc)
        doc["config"] = redact_secrets(
            ConfigOps.get_entity(ConfigOps.of(self.gateway).effective_doc(), "services", svc.name)
        )
        return json_response(doc)

    async def register(self, req: AdminRequest) -> AdminResponse:
        if req.params["service"] not in self.gateway.config.services:  # it would create it
            check_new_name("service", req.params["service"])
        reg = parse_registration(req.params["service"], req.params["instance"], req.json())
        try:
            inst, created = await registry_of(self.gateway).register(reg)
        except RegistrationError as exc:
            raise AdminError(exc.status, exc.code, exc.message) from None
        except ConfigError as exc:
            raise config_refused(exc) from None
        doc = _instance_doc(inst, self.gateway.loop.time())
        return json_response(doc, 201 if created else 200)

    async def deregister(self, req: AdminRequest) -> AdminResponse:
        registry = registry_of(self.gateway)
        ok = await registry.deregister(req.params["service"], req.params["instance"])
        if not ok:
            raise AdminError(
                404,
                "not_found",
                f"no registered instance {req.params['instance']} "
                f"in service {req.params['service']}",
            )
        return json_response({"deregistered": req.params["instance"]})

    # ------------------------------------------------------------------ entity CRUD
    def list_entities(self, kind: str) -> Callable[[AdminRequest], Awaitable[AdminResponse]]:
        async def handler(req: AdminRequest) -> AdminResponse:
            doc = ConfigOps.of(self.gateway).effective_doc()
            items = [redact_secrets(i) for i in doc.get(kind) or []]
            return json_response({kind: items})

        return handler

    def get_entity(self, kind: str) -> Callable[[AdminRequest], Awaitable[AdminResponse]]:
        async def handler(req: AdminRequest) -> AdminResponse:
            name = req.params.get("name") or req.params.get("service", "")
            entity = ConfigOps.get_entity(ConfigOps.of(self.gateway).effective_doc(), kind, name)
            if entity is None:
                raise AdminError(404, "not_found", f"no {_SINGULAR[kind]} {name}")
            return json_response(redact_secrets(entity))

        return handler

    def put_entity(self, kind: str) -> Callable[[AdminRequest], Awaitable[AdminResponse]]:
        async def handler(req: AdminRequest) -> AdminResponse:
            name = req.params.get("name") or req.params.get("service", "")
            body = req.json()
            if not isinstance(body, dict):
                raise AdminError(400, "invalid_body", "body must be a JSON object")
            if kind != "services" and body.get("name", name) != name:
                raise AdminError(400, "invalid_body", "name in the body differs from the URL")
            if kind != "consumers" and not self._exists(kind, name):
                check_new_name(_SINGULAR[kind], name)
            refuse_redacted(body)
            try:
                entity, created = await ConfigOps.of(self.gateway).put_entity(kind, name, body)
            except ConfigError as exc:
                raise config_refused(exc) from None
            return json_response(redact_secrets(entity), 201 if created else 200)

        return handler

    def _exists(self, kind: str, name: str) -> bool:
        config = self.gateway.config
        if kind == "services":
            return name in config.services
        return any(route.name == name for route in config.routes)

    def delete_entity(self, kind: str) -> Callable[[AdminRequest], Awaitable[AdminResponse]]:
        async def handler(req: AdminRequest) -> AdminResponse:
            name = req.params.get("name") or req.params.get("service", "")
            try:
                ok = await ConfigOps.of(self.gateway).delete_entity(kind, name)
            except ConfigConflict as exc:
                raise AdminError(409, "conflict", str(exc)) from None
            except ConfigError as exc:
                raise config_refused(exc) from None
            if not ok:
                raise AdminError(404, "not_found", f"no {_SINGULAR[kind]} {name}")
            return json_response({"deleted": name})

        return handler

    # ------------------------------------------------------------------ cache
    async def purge_cache(self, req: AdminRequest) -> AdminResponse:
        """`DELETE /cache?route=NAME&prefix=/path` — purge the response cache (both optional)."""
        from apigate.plugins.cache import purge_all
        from apigate.store.redis import StoreUnavailable

        route = req.query.get("route") or None
        prefix = req.query.get("prefix") or None
        if route is not None and route not in self.gateway.runtime.routes:
            raise AdminError(404, "not_found", f"no route {route}")
        try:
            removed = await purge_all(route=route, prefix=prefix)
        except StoreUnavailable as exc:
            raise AdminError(503, "store_unavailable", f"cache store unreachable: {exc}") from None
        return json_response({"purged": removed, "route": route, "prefix": prefix})

    # ------------------------------------------------------------------ whole config
    async def get_config(self, req: AdminRequest) -> AdminResponse:
        ops = ConfigOps.of(self.gateway)
        cluster = self.gateway.extensions.get("cluster")  # store: redis://
        doc = ops.effective_doc()
        etag = ops.etag(doc)
        shown = redact_secrets(doc)
        body = {
            "config": shown,
            "store": ops.store.describe(),
            "cluster": cluster.describe() if cluster is not None else None,
            "persisted": ops.store.persistent,
            "generation": self.gateway.runtime.generation,
        }
        return json_response(body, headers={"ETag": etag})

    async def post_config(self, req: AdminRequest) -> AdminResponse:
        ops = ConfigOps.of(self.gateway)
        doc = req.json()
        if not isinstance(doc, dict):
            raise AdminError(400, "invalid_body", "body must be a JSON object")
        doc = with_store_in_force(doc, self.gateway.config.store)
        doc = with_listeners_in_force(doc, dump_config(self.gateway.config)["listeners"])
        refuse_redacted(doc)
        dry_run = req.query.get("dry_run", "").lower() in ("1", "true", "yes")
        try:
            config = await ops.replace(doc, dry_run=dry_run, if_match=req.headers.get("if-match"))
        except ConfigError as exc:
            raise config_refused(exc) from None
        except PreconditionFailed as exc:
            raise AdminError(412, "precondition_failed", str(exc)) from None
        result = {
            "ok": True,
            "dry_run": dry_run,
            "routes": len(config.routes),
            "services": len(config.services),
        }
        return json_response(result, headers={"ETag": ops.etag()})


def config_refused(exc: ConfigError) -> AdminError:
    """The 400 for a change the config would not take: its problems in one line (ConfigError's
    own text names a file, here always `<admin>`, and puts each problem on a line of its own,
    which a JSON message shows as `\\n`)."""
    return AdminError(400, "invalid_config", "; ".join(exc.errors))


def check_new_name(what: str, name: str) -> None:
    """A service, route or instance the admin API would create has a name of at most MAX_NAME
    characters, as its OpenAPI document says (a registration created a 300-character service:
    `apigate status` printed a table that wide). Names that exist already (from the file, or
    saved before there was a bound) stay addressable."""
    if len(name) > MAX_NAME:
        message = f"{what} name: {len(name)} characters, at most {MAX_NAME}"
        raise AdminError(400, "invalid_name", message)


_REGISTRATION_KEYS: Final = ("url", "ttl", "weight", "metadata")


def parse_registration(service: str, instance_id: str, body: Any) -> Registration:
    """The registration a `PUT /services/{service}/instances/{id}` body asks for; AdminError
    (400 invalid_body, naming the field) for anything off."""
    if not 1 <= len(instance_id) <= MAX_INSTANCE_ID:
        _invalid(
            f"instance id: {len(instance_id)} characters; 1 to {MAX_INSTANCE_ID} letters, "
            "digits, '_', '.' or '-'"
        )
    if not _INSTANCE_ID.fullmatch(instance_id):
        _invalid(
            f"instance id {instance_id!r}: use letters, digits, '_', '.' or '-' "
            "(10.0.0.5-9000 rather than 10.0.0.5:9000)"
        )
    if not isinstance(body, dict):
        _invalid("body must be a JSON object")
    unknown = sorted(set(body) - set(_REGISTRATION_KEYS))
    if unknown:  # explained as the config file explains its keys (CONFIG.md)
        _invalid("; ".join(f"{k}: {unknown_key_message(k, _REGISTRATION_KEYS)}" for k in unknown))
    return Registration(
        service,
        instance_id,
        _registration_url(body.get("url")),
        _registration_ttl(body.get("ttl", "30s")),
        _registration_weight(body.get("weight", 1)),
        _registration_metadata(body.get("metadata", {})),
    )


def _invalid(message: str) -> NoReturn:
    raise AdminError(400, "invalid_body", message)


def _registration_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        _invalid("url (string) is required")
    return url  # (its form is checked with the targets': TargetConfig)


def _registration_ttl(raw: Any) -> float:
    try:
        return parse_duration(raw)  # "10s" or seconds; `true` is no duration
    except ValueError:
        _invalid(f"ttl: invalid duration {raw!r}")


def _registration_weight(weight: Any) -> int:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1000:
        _invalid("weight must be an integer 0..1000")
    return weight


def _registration_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict):  # ([] or null is no object either)
        _invalid("metadata must be an object")
    if _nesting_exceeds(metadata, MAX_METADATA_DEPTH):  # first: json.dumps recurses per level
        _invalid(f"metadata: nested more than {MAX_METADATA_DEPTH} levels of objects and arrays")
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        _invalid(f"metadata: {size} bytes as JSON, at most {MAX_METADATA_BYTES}")
    return metadata


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest in `value` more than `limit` levels (`{}` is one).
    A walk with a stack of its own, not recursion: the value may be hundreds of levels deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)
    return False


def _instance_doc(inst: Instance, now: float) -> dict[str, Any]:
    ttl_left = None
    if inst.expires_at is not None:
        ttl_left = round(max(0.0, inst.expires_at - now), 2)
    return {
        "id": inst.id,
        "url": inst.url,
        "origin": inst.origin,
        "healthy": inst.healthy,
        "draining": inst.draining,
        "weight": inst.weight,
        "in_flight": inst.in_flight,
        "ttl_remaining_s": ttl_left,
        "metadata": inst.metadata,
    }


# config keys whose values are credentials, wherever they appear (plugins, consumers, admin)
_SECRET_KEYS = frozenset({"secret", "password", "token", "api_keys", "client_secret"})
# (header and query parameter names whose configured values are credentials, a transform that
# sets the upstream's Authorization or X-Upstream-Token: apigate.redaction.is_credential_name)
# maps whose values are header or field names, not values sent (a transform's `rename`, jwt's
# `forward_claims`): shown as they are, whatever their keys
_NAME_MAPS = frozenset({"rename", "forward_claims"})


def redact_secrets(value: Any) -> Any:
    """A copy of a config document with every credential replaced by "[redacted]":
    values under secret-named keys or credential header and query parameter names, and
    passwords inside URLs (redis://:pw@host)."""
    if isinstance(value, dict):
        return {k: _redact_entry(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def _redact_entry(key: Any, value: Any) -> Any:
    if value and _holds_credential(key, value):
        return REDACTED
    if key in _NAME_MAPS and isinstance(value, dict):  # {"apikey": "x-api-key"}: no secret
        return {k: redact_secrets(v) for k, v in value.items()}
    return redact_secrets(value)


def _holds_credential(key: Any, value: Any) -> bool:
    if key in _SECRET_KEYS:  # a setting: any shape (api_keys is a list)
        return True
    # A header's or a query parameter's value is a string; a map under such a name is keyed
    # by a user's names (a service called "auth"): walked, not hidden whole.
    return _is_secret_key(key) and not isinstance(value, dict)


def _is_secret_key(key: Any) -> bool:
    """Whether a key names a credential: a secret setting, a credential header, or a query
    parameter the logs redact too (`api_key`, `access_token`, `apikey`: key_auth's header)."""
    if key in _SECRET_KEYS:
        return True
    if not isinstance(key, str):
        return False
    return is_credential_name(key)


def with_store_in_force(doc: dict[str, Any], store: str) -> dict[str, Any]:
    """`doc` with its `store` put back to the one in force when it is that one as `GET
    /config` shows it (its password redacted): a read, edit, `POST /config` round trip then
    goes through. The store always comes from the file anyway (`ConfigStore.merge`); another
    redacted store is still refused below, and another plain one needs a restart."""
    shown = doc.get("store")
    if isinstance(shown, str) and REDACTED in shown and shown == redact_url(store):
        return {**doc, "store": store}
    return doc


def with_listeners_in_force(doc: dict[str, Any], in_force: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the `listeners` in force when it leaves them out, and with the credentials
    `GET /config` redacted in them (the admin token) put back: a read, edit, `POST /config`
    round trip goes through. Listeners always come from the file (`ConfigStore.merge`);
    `ConfigOps.replace` refuses a document that would change them."""
    sent = doc.get("listeners")
    if sent is None:
        return {**doc, "listeners": in_force}
    return {**doc, "listeners": _restore_redacted(sent, in_force)}


def _restore_redacted(sent: Any, in_force: Any) -> Any:
    if sent == REDACTED and in_force is not None:
        return in_force
    if isinstance(sent, dict) and isinstance(in_force, dict):
        return {k: _restore_redacted(v, in_force.get(k)) for k, v in sent.items()}
    return sent


def refuse_redacted(value: Any, where: str = "body") -> None:
    """A document read from the API and sent back must not store "[redacted]" as a secret."""
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_redacted(v, f"{where}.{k}")
    elif isinstance(value, list):
        for index, v in enumerate(value):
            refuse_redacted(v, f"{where}[{index}]")
    elif isinstance(value, str) and REDACTED in value:
        raise AdminError(
            400,
            "redacted_value",
            f"{where}: replace the redacted value with the real secret (the API never "
            "returns credentials)",
        )


def _int_param(req: AdminRequest, name: str, default: int) -> int:
    raw = req.query.get(name)
    if raw is None:
        return default
    try:
        return max(0, int(raw))
    except ValueError:
        raise AdminError(400, "invalid_query", f"{name} must be an integer") from None
