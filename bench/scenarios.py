"""Benchmark scenarios: the extension point of bench/run.py.

A scenario is a function `Env -> Spec` registered with `@scenario("name")`. It returns apigate's
whole config file, the nginx location blocks that do the same job, and the request paths to
measure. Its docstring is its description. run.py calls it once per proxy (each proxy gets its
own port and scratch directory), so it must be a pure function of `env`. See bench/README.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Env:
    """What a scenario needs to write its configs."""

    proxy_port: int  # the port the proxy under test listens on (apigate's config needs it)
    upstream_port: int  # the upstream nginx answering 200 "Hello, World!" on every path
    workdir: Path  # a private, empty directory for files the scenario writes (keys, cache)

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"


@dataclass(frozen=True)
class Spec:
    """Both proxies' configs for one scenario and the requests that measure them."""

    apigate_yaml: str  # apigate's whole config file
    nginx_server: str  # inside nginx's server {} block after `listen`; upstream `up` exists
    paths: tuple[str, ...] = ("/",)  # each path is measured on its own (a "variant")
    nginx_http: str = ""  # extra http {}-level nginx directives (proxy_cache_path, map, ...)
    headers: tuple[str, ...] = ()  # request headers wrk sends, e.g. "Authorization: Bearer x"
    apigate_body: bytes | None = None  # what apigate answers when it is not the upstream's body


ScenarioFn = Callable[[Env], Spec]
SCENARIOS: dict[str, ScenarioFn] = {}
# scenario -> the environment variable it needs (and without which it is not in the default set)
REQUIRES_ENV: dict[str, str] = {}


def default_scenarios() -> list[str]:
    """What runs without --scenarios: every scenario whose environment is there."""
    return [
        name for name in SCENARIOS if name not in REQUIRES_ENV or os.environ.get(REQUIRES_ENV[name])
    ]


def missing_env(names: Iterable[str]) -> list[str]:
    """ "scenario: VARIABLE" for each of `names` that cannot run for want of its variable."""
    return [
        f"{name}: set {REQUIRES_ENV[name]}"
        for name in names
        if name in REQUIRES_ENV and not os.environ.get(REQUIRES_ENV[name])
    ]


def scenario(name: str, requires_env: str | None = None) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario function under `name` (the name --scenarios takes). One that
    `requires_env` (a server address, say) runs by default only when that variable is set,
    and asked for without it, stops the benchmark before anything runs."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        SCENARIOS[name] = fn
        if requires_env:
            REQUIRES_ENV[name] = requires_env
        return fn

    return register


def apigate_yaml(env: Env, routes: Iterable[str], extra: str = "") -> str:
    """An apigate config: proxy listener on env.proxy_port, no admin, service `up`, `routes`.

    Each route is one YAML flow mapping (see route()). `extra` is appended at the top level,
    e.g. 'plugins:\\n  access_log: {format: json}\\n'.
    """
    head = (
        "version: 1\n"
        "listeners:\n"
        f'  proxy: {{address: "127.0.0.1:{env.proxy_port}"}}\n'
        "  admin: null\n"
        "services:\n"
        f'  up: {{targets: ["{env.upstream_url}"]}}\n'
        "routes:\n"
    )
    return head + "".join(f"  - {r}\n" for r in routes) + extra


def route(name: str, prefix: str, extra: str = "") -> str:
    """One apigate route to service `up`; `extra` adds keys: ', plugins: {cache: {ttl: 30s}}'."""
    return f'{{name: {name}, match: {{paths: ["{prefix}"]}}, service: up{extra}}}'


def nginx_location(prefix: str, extra: str = "") -> str:
    """One nginx prefix location proxying to the keep-alive upstream block `up`.

    `extra` holds directives placed before proxy_pass, e.g. 'proxy_cache c; '.
    """
    return f"        location {prefix} {{ {extra}proxy_pass http://up; }}\n"


@scenario("plain")
def plain(env: Env) -> Spec:
    """One route `/` to one upstream: the bare cost of proxying a request."""
    return Spec(apigate_yaml(env, [route("plain", "/")]), nginx_location("/"))


@scenario("logged")
def logged(env: Env) -> Spec:
    """The plain route with the JSON access log to a file (metrics and trace context are on in
    every scenario): issue 6's yardstick, the plain target with the observability on."""
    extra = f"plugins:\n  access_log: {{path: {env.workdir / 'access.log'}}}\n"
    return Spec(apigate_yaml(env, [route("plain", "/")], extra), nginx_location("/"))


# nginx's JSON access log with apigate's fields (as far as nginx has them), buffered as
# apigate's is: written in 64 KiB pieces or once a second.
_NGINX_JSON_LOG = (
    '    log_format apigate_json escape=json \'{"time":"$time_iso8601",\'\n'
    '        \'"request_id":"$request_id","trace_id":"$http_traceparent",\'\n'
    '        \'"client":"$remote_addr","method":"$request_method","path":"$uri",\'\n'
    '        \'"status":$status,"bytes":$body_bytes_sent,\'\n'
    '        \'"upstream_ms":"$upstream_response_time","total_ms":$request_time}\';\n'
)


@scenario("logged_both")
def logged_both(env: Env) -> Spec:
    """`logged` where nginx writes a JSON access log too (buffered): what each proxy's log
    costs it, like for like. No target: issue 6's yardstick is `logged`, against nginx
    logging nothing."""
    spec = logged(env)
    log = f"access_log {env.workdir / 'access.log'} apigate_json buffer=64k flush=1s; "
    return Spec(spec.apigate_yaml, nginx_location("/", log), nginx_http=_NGINX_JSON_LOG)


@scenario("routes10k")
def routes10k(env: Env) -> Spec:
    """10,000 routes (/r00001 ... /r09999 and `/`); requests to `/` and to /r05000/x."""
    prefixes = [f"/r{i:05d}" for i in range(1, 10_000)]
    routes = [route(p[1:], p) for p in prefixes] + [route("plain", "/")]
    nginx = "".join(nginx_location(p) for p in prefixes) + nginx_location("/")
    return Spec(apigate_yaml(env, routes), nginx, paths=("/", "/r05000/x"))


def _bench_token(secret: str) -> str:
    import time

    import jwt

    claims = {"sub": "bench", "iss": "bench", "exp": int(time.time()) + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


@scenario("plugins")
def plugins(env: Env) -> Spec:
    """JWT (the same token, so verified once then cached) + a local rate limit that never
    trips + a JSON access log to a file, against nginx's plain route (issue 4's yardstick)."""
    import secrets

    secret = secrets.token_hex(32)  # made per run: no key lives in the repository
    plugins = (
        ", plugins: {jwt: {secret: " + secret + ", algorithms: [HS256], issuer: bench}, "
        "rate_limit: {requests: 1000000000, per: 1s, key: ip}}"
    )
    extra = f"plugins:\n  access_log: {{path: {env.workdir / 'access.log'}}}\n"
    return Spec(
        apigate_yaml(env, [route("plugins", "/", plugins)], extra),
        nginx_location("/"),
        headers=(f"Authorization: Bearer {_bench_token(secret)}",),
    )


@scenario("cache")
def cache(env: Env) -> Spec:
    """Cache hits (max-age=300 from the upstream) against nginx's proxy_cache; compare the
    apigate figure with the plain scenario's to see a hit cost against proxying."""
    return Spec(
        apigate_yaml(env, [route("cached", "/", ", plugins: {cache: {}}")]),
        nginx_location("/", "proxy_cache c; "),
        paths=("/cacheable",),
        nginx_http=f"proxy_cache_path {env.workdir / 'cache'} keys_zone=c:1m;\n",
    )


@scenario("aggregate3")
def aggregate3(env: Env) -> Spec:
    """One request fanned out to three upstream calls and merged; nginx (which cannot
    aggregate) proxies one request: compare apigate's figure with 3x its plain one."""
    parts = ", ".join(f"p{i}: {{service: up, path: /json}}" for i in range(3))
    agg = f'{{name: agg, match: {{paths: ["/agg"]}}, aggregate: {{{parts}}}}}'
    # the plain `/` route is there for run.py's readiness probe (GET / must answer 200)
    merged = b'{"p0":{"ok":true},"p1":{"ok":true},"p2":{"ok":true}}'
    return Spec(
        apigate_yaml(env, [agg, route("plain", "/")]),
        nginx_location("/"),
        paths=("/agg",),
        apigate_body=merged,
    )


@scenario("ratelimit_redis", requires_env="APIGATE_BENCH_REDIS")
def ratelimit_redis(env: Env) -> Spec:
    """A rate limit that never trips, kept in Redis (one Lua call per request) — the cost of
    a limit shared by many gateways. Needs a running Redis: APIGATE_BENCH_REDIS=redis://..."""
    url = os.environ["APIGATE_BENCH_REDIS"]
    plugins = (
        ", plugins: {rate_limit: {requests: 1000000000, per: 1s, key: ip, "
        f"store: {url}, store_timeout: 1s}}}}"
    )
    return Spec(apigate_yaml(env, [route("limited", "/", plugins)]), nginx_location("/"))
