"""The admin API's OpenAPI 3.1 document, with request schemas taken from the config models."""

from __future__ import annotations

from functools import cache
from typing import Any

from apigate import __version__
from apigate.config.schema import (
    MAX_NAME,
    ConsumerConfig,
    GatewayConfig,
    RouteConfig,
    ServiceConfig,
)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    content = {"application/json": {"schema": schema or {"type": "object"}}}
    return {"description": description, "content": content}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _resp("error", _ERROR) for c in codes}


# services, routes and instance ids; a consumer's name is any non-empty string (percent-
# encoded in the path: "alice%40example.com")
_NAME_PATTERN = "^[A-Za-z0-9_.-]+$"


def _name_param(name: str, pattern: str | None = _NAME_PATTERN) -> dict[str, Any]:
    """A name in a path: a service's, route's or instance's (`pattern`, at most MAX_NAME
    characters), or with no pattern a consumer's (any non-empty string)."""
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern is not None:
        schema["pattern"] = pattern
        schema["maxLength"] = MAX_NAME
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _crud(
    kind: str, schema_ref: str, param: str, pattern: str | None = _NAME_PATTERN
) -> dict[str, Any]:
    return {
        "get": {
            "summary": f"one {kind[:-1]}",
            "parameters": [_name_param(param, pattern)],
            "responses": {"200": _resp("found"), **_errors(401, 404)},
        },
        "put": {
            "summary": f"create or replace a {kind[:-1]}",
            "parameters": [_name_param(param, pattern)],
            "requestBody": _body(schema_ref),
            "responses": {
                "200": _resp("replaced"),
                "201": _resp("created"),
                **_errors(400, 401, 413, 503),
            },
        },
        "delete": {
            "summary": f"delete a {kind[:-1]}",
            "parameters": [_name_param(param, pattern)],
            "responses": {"200": _resp("deleted"), **_errors(401, 404, 409, 503)},
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        },
        "Registration": {
            "type": "object",
            "required": ["url"],
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string", "description": "http://host:port of the instance"},
                "ttl": {
                    "type": "string",
                    "description": "e.g. 10s; heartbeat before it lapses",
                    "default": "30s",
                },
                "weight": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 1},
                "metadata": {"type": "object"},
            },
        },
    }
    for model in (ServiceConfig, RouteConfig, ConsumerConfig, GatewayConfig):
        doc = model.model_json_schema(
            ref_template="#/components/schemas/{model}", mode="validation"
        )
        for name, sub in doc.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[model.__name__] = doc
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {"summary": "liveness", "responses": {"200": _resp("alive"), **_errors(401)}}
        },
        "/readyz": {
            "get": {
                "summary": "readiness",
                "responses": {"200": _resp("ready"), "503": _resp("not ready"), **_errors(401)},
            }
        },
        "/events": {
            "get": {
                "summary": "recent registrations, health and config events",
                "parameters": [
                    {"name": "since", "in": "query", "schema": {"type": "integer"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {"200": _resp("events"), **_errors(400, 401)},
            }
        },
        "/services": {
            "get": {
                "summary": "services with every instance",
                "responses": {"200": _resp("services"), **_errors(401)},
            }
        },
        "/services/{service}": _crud("services", "#/components/schemas/ServiceConfig", "service"),
        "/services/{service}/instances/{instance}": {
            "put": {
                "summary": "register or heartbeat an instance",
                "parameters": [_name_param("service"), _name_param("instance")],
                "requestBody": _body("#/components/schemas/Registration"),
                "responses": {
                    "200": _resp("renewed"),
                    "201": _resp("registered"),
                    **_errors(400, 401, 409, 413, 503),
                },
            },
            "delete": {
                "summary": "deregister (drain) an instance",
                "parameters": [_name_param("service"), _name_param("instance")],
                "responses": {"200": _resp("deregistered"), **_errors(401, 404)},
            },
        },
        "/routes": {
            "get": {"summary": "all routes", "responses": {"200": _resp("routes"), **_errors(401)}}
        },
        "/cache": {
            "delete": {
                "summary": "purge the response cache, by route and/or path prefix",
                "parameters": [
                    {"name": "route", "in": "query", "schema": {"type": "string"}},
                    {"name": "prefix", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _resp("purged"), **_errors(401, 404, 503)},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": _resp("metrics"), **_errors(401)},
            }
        },
        "/stats": {
            "get": {
                "summary": "per-route rates and latency for the dashboard",
                "responses": {"200": _resp("stats"), **_errors(401)},
            }
        },
        "/workers": {
            "get": {
                "summary": "with --workers N: each worker's pid, restarts and counts",
                "responses": {"200": _resp("workers"), **_errors(401, 404)},
            }
        },
        "/workers/self": {
            "get": {
                "summary": "with --workers N: the answering worker, with its raw metrics",
                "responses": {"200": _resp("this worker"), **_errors(401, 404)},
            }
        },
        "/routes/{name}": _crud("routes", "#/components/schemas/RouteConfig", "name"),
        "/consumers": {
            "get": {
                "summary": "all consumers (credentials redacted)",
                "responses": {"200": _resp("consumers"), **_errors(401)},
            }
        },
        "/consumers/{name}": _crud(
            "consumers", "#/components/schemas/ConsumerConfig", "name", pattern=None
        ),
        "/config": {
            "get": {
                "summary": "the effective config (ETag header)",
                "responses": {"200": _resp("config"), **_errors(401)},
            },
            "post": {
                "summary": "replace the config whole (If-Match: ETag; ?dry_run=true)",
                "parameters": [{"name": "dry_run", "in": "query", "schema": {"type": "boolean"}}],
                "requestBody": _body("#/components/schemas/GatewayConfig"),
                "responses": {
                    "200": _resp("applied or validated"),
                    **_errors(400, 401, 412, 413, 503),
                },
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "apigate admin API", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }
