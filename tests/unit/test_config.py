"""The config file contract: schema, units, loader (YAML, ${ENV}, include) and error messages."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from apigate.config import (
    ActiveHealthConfig,
    ConfigError,
    GatewayConfig,
    RetriesConfig,
    ServiceConfig,
    StrictModel,
    TargetConfig,
    dump_config,
    format_duration,
    format_percent,
    format_size,
    format_validation_error,
    interpolate_env,
    load_config,
    parse_config,
    parse_duration,
    parse_path_pattern,
    parse_percent,
    parse_size,
)
from apigate.config import loader as config_loader
from apigate.runtime import dry_compile

FIXTURES = Path(__file__).parent / "fixtures" / "config"
EXAMPLE = FIXTURES / "config_md_example.yaml"
EXAMPLE_ENV = {"ALICE_API_KEY": "alice-key", "JWT_SECRET": "jwt-secret"}


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def minimal(**extra: Any) -> dict[str, Any]:
    """One service and one route to it, plus `extra` top-level keys."""
    data: dict[str, Any] = {
        "services": {"hello": {"targets": ["http://127.0.0.1:9001"]}},
        "routes": [{"name": "hello", "match": {"paths": ["/hello"]}, "service": "hello"}],
    }
    data.update(extra)
    return data


# --- the CONFIG.md example ------------------------------------------------------------------


def test_config_md_example_only_lacks_the_orders_service() -> None:
    # CONFIG.md's aggregate route names a service `orders` it never declares; that is an error.
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, env=EXAMPLE_ENV)
    assert info.value.errors == [
        "routes[1].aggregate.orders.service: unknown service 'orders' (declare it under "
        "services: — with no targets it waits for registrations)"
    ]


def test_config_md_example_parses_with_orders_declared(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("\nconsumers:", "  orders:\n\nconsumers:", 1)
    cfg = load_config(write(tmp_path, "apigate.yaml", text), env=EXAMPLE_ENV)

    assert cfg.listeners.proxy.host == "0.0.0.0"
    assert cfg.listeners.proxy.port == 8080
    assert cfg.listeners.admin is not None
    assert (cfg.listeners.admin.host, cfg.listeners.admin.port) == ("127.0.0.1", 8001)
    assert cfg.listeners.admin.token == ""
    assert cfg.limits.max_header_bytes == 32 * 1024
    assert cfg.limits.max_body_bytes == 10 * 1024 * 1024
    assert cfg.limits.idle_timeout == 75.0

    hello = cfg.services["hello"]
    assert [(t.url, t.weight) for t in hello.targets] == [
        ("http://127.0.0.1:9001", 1),
        ("http://127.0.0.1:9002", 2),
    ]
    assert (hello.hash_on_kind, hello.hash_on_name) == ("header", "x-user-id")
    assert hello.timeouts.connect == 2.0
    assert hello.health.active is not None
    assert hello.health.active.interval == 5.0
    assert hello.health.passive is not None
    assert hello.health.passive.eject_for == 30.0
    assert hello.circuit_breaker is not None
    assert hello.circuit_breaker.failure_rate == 0.5
    assert hello.retries.on == ["connect_error", 502, 503, 504]
    assert hello.retries.budget == 0.2
    assert cfg.services["users"].discovery is not None
    assert cfg.services["users"].discovery.dns == "users.internal"
    assert cfg.services["orders"] == ServiceConfig()

    assert cfg.consumers[0].api_keys == ["alice-key"]
    route = cfg.routes[0]
    assert route.match.methods == ["GET"]
    assert route.strip_prefix is True
    assert route.plugins["jwt"] == {
        "secret": "jwt-secret",
        "algorithms": ["HS256"],
        "issuer": "my_issuer",
    }
    assert route.plugins["rate_limit"]["per"] == "1m"  # plugins validate their own config
    dashboard = cfg.routes[1]
    assert dashboard.aggregate is not None
    assert dashboard.aggregate["orders"].path == "/orders?user={user_id}"
    assert dashboard.aggregate["orders"].optional is True
    assert cfg.plugins["cors"] == {"origins": ["https://app.example.com"]}


# --- defaults -------------------------------------------------------------------------------


def test_empty_config_gets_every_default() -> None:
    cfg = parse_config({})
    assert cfg == GatewayConfig()
    assert cfg.version == 1
    assert cfg.store == "memory"
    assert cfg.listeners.proxy.address == "0.0.0.0:8080"
    assert cfg.listeners.proxy.tls is None
    assert cfg.listeners.admin is not None
    assert cfg.listeners.admin.address == "127.0.0.1:8001"
    limits = cfg.limits
    assert (limits.max_header_bytes, limits.max_headers, limits.max_url_bytes) == (
        32768,
        100,
        8192,
    )
    assert (limits.header_timeout, limits.body_timeout, limits.idle_timeout) == (10, 30, 75)
    assert (limits.max_connections, limits.drain_timeout) == (10000, 30)
    assert (cfg.services, cfg.consumers, cfg.routes, cfg.plugins) == ({}, [], [], {})


def test_empty_file_is_the_default_config(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "empty.yaml", "")) == GatewayConfig()


def test_service_defaults() -> None:
    service = ServiceConfig()
    assert service.targets == [] and service.discovery is None
    assert service.balancer == "round_robin"
    assert (service.hash_on_kind, service.hash_on_name) == ("ip", "")
    assert (service.timeouts.connect, service.timeouts.response, service.timeouts.idle) == (
        2.0,
        30.0,
        60.0,
    )
    assert service.health.active is None
    assert service.health.passive is not None
    assert (service.health.passive.failures, service.health.passive.eject_for) == (5, 30.0)
    assert service.circuit_breaker is None
    retries = service.retries
    assert (retries.attempts, retries.on, retries.budget, retries.backoff) == (
        1,
        ["connect_error"],
        0.2,
        0.025,
    )
    assert retries.non_idempotent is False and retries.per_try_timeout is None
    assert (service.max_connections, service.max_pending) == (1024, 0)
    assert service.preserve_host is False and service.scheme == "http"


def test_route_defaults() -> None:
    cfg = parse_config(minimal(routes=[{"name": "r", "service": "hello"}]))
    route = cfg.routes[0]
    assert route.match.paths == ["/"]
    assert route.match.methods is None and route.match.hosts is None
    assert route.match.headers is None
    assert route.strip_prefix is False and route.rewrite is None
    assert route.plugins == {} and route.aggregate is None and route.limits is None
    assert route.preserve_host is None


def test_circuit_breaker_and_health_defaults() -> None:
    cfg = parse_config(
        minimal(services={"hello": {"circuit_breaker": {}, "health": {"active": {}}}})
    )
    breaker = cfg.services["hello"].circuit_breaker
    assert breaker is not None
    assert (breaker.failure_rate, breaker.min_requests, breaker.window, breaker.open_for) == (
        0.5,
        20,
        10.0,
        30.0,
    )
    assert breaker.consecutive_failures is None and breaker.half_open_requests == 3
    active = cfg.services["hello"].health.active
    assert active is not None
    assert (active.path, active.interval, active.timeout) == ("/health", 5.0, 1.0)
    assert (active.healthy_after, active.unhealthy_after) == (2, 3)


def test_null_disables_admin_and_passive_health() -> None:
    cfg = parse_config(
        minimal(
            listeners={"admin": None},
            services={"hello": {"health": {"passive": None}}},
        )
    )
    assert cfg.listeners.admin is None
    assert cfg.services["hello"].health.passive is None


def test_null_service_and_null_plugin_mean_empty() -> None:
    cfg = parse_config(minimal(services={"hello": None}, plugins={"access_log": None}))
    assert cfg.services["hello"] == ServiceConfig()
    assert cfg.plugins == {"access_log": {}}


# --- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("0.5m", 30.0),
        (" 10s ", 10.0),
        ("7", 7.0),
        (7, 7.0),
        (0.1, 0.1),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5x", "-1s", "", "s", "5 m s", "1e3", "1h30m", "5S"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*use e\.g\. 250ms, 5s, 1m, 1h, 1d"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        (512, 512),
        ("512B", 512),
        ("32KiB", 32 * 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1 << 30),
        ("64KB", 64_000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("1.5MiB", 1536 * 1024),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["10mb", "1kib", "10 XB", "-1", "0.5B", "1.2KB0", "KiB", "1.1"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("20%", 0.2), ("50%", 0.5), ("12.5%", 0.125), ("0%", 0.0), ("100%", 1.0), (0.2, 0.2), (1, 1)],
)
def test_parse_percent(text: str | float, fraction: float) -> None:
    assert parse_percent(text) == fraction


@pytest.mark.parametrize("bad", ["120%", "20", 20, "-5%", "x%", "%", True])
def test_parse_percent_rejects(bad: Any) -> None:
    with pytest.raises(ValueError, match="invalid percentage"):
        parse_percent(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (5.0, "5s"),
        (60.0, "1m"),
        (7200.0, "2h"),
        (86400.0, "1d"),
        (90000.0, "25h"),
        (90.0, "90s"),
        (1.5, "1.5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_format_falls_back_to_numbers_when_no_unit_is_exact() -> None:
    assert format_duration(1 / 3) in (1 / 3, "0.3333333333333333s")
    assert format_size(1000 * 1024 + 1) == 1000 * 1024 + 1
    assert format_size(32 * 1024) == "32KiB"
    assert format_size(10_000_000) == "10MB"
    assert format_size(0) == 0
    assert format_percent(0.2) == "20%"
    assert format_percent(0.123456789123) == 0.123456789123


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_any_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=1 << 50))
def test_any_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.floats(min_value=0, max_value=1))
def test_any_percent_round_trips(fraction: float) -> None:
    assert parse_percent(format_percent(fraction)) == fraction


def test_bad_units_in_the_file_have_clear_errors() -> None:
    errors = errors_of(
        {
            "limits": {"header_timeout": "5x", "max_body_bytes": "10 megs"},
            "services": {"a": {"circuit_breaker": {"failure_rate": "150%"}}},
        }
    )
    assert errors == [
        "limits.max_body_bytes: invalid size '10 megs': use e.g. 512, 32KiB, 10MiB, 1GiB "
        "(or KB, MB, GB)",
        "limits.header_timeout: invalid duration '5x': use e.g. 250ms, 5s, 1m, 1h, 1d",
        "services.a.circuit_breaker.failure_rate: invalid percentage '150%': use e.g. 20% or "
        "0.2, between 0% and 100%",
    ]


def test_timeouts_must_be_positive() -> None:
    errors = errors_of({"services": {"a": {"timeouts": {"connect": "0s"}}}})
    assert errors == ["services.a.timeouts.connect: input should be greater than 0"]


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_keys_at_nested_paths_suggest_the_right_name() -> None:
    errors = errors_of(
        minimal(
            services={"hello": {"timeouts": {"conect": "1s"}}},
            routes=[{"name": "r", "service": "hello", "match": {"pathz": ["/x"]}}],
        )
    )
    assert errors == [
        "services.hello.timeouts.conect: unknown key; did you mean 'connect'?",
        "routes[0].match.pathz: unknown key; did you mean 'paths'?",
    ]


def test_unknown_key_without_a_close_match() -> None:
    assert errors_of({"zzz": 1}) == ["zzz: unknown key"]
    assert errors_of({"listeners": {"proxy": {"adress": ":80"}}}) == [
        "listeners.proxy.adress: unknown key; did you mean 'address'?"
    ]


def test_unknown_keys_and_other_errors_are_all_reported() -> None:
    errors = errors_of(
        {"services": {"a": {"retries": {"atempts": 2, "budget": "x"}, "max_connections": "many"}}}
    )
    assert sorted(errors) == [
        "services.a.max_connections: input should be a valid integer, unable to parse string "
        "as an integer",
        "services.a.retries.atempts: unknown key; did you mean 'attempts'?",
        "services.a.retries.budget: invalid percentage 'x': use e.g. 20% or 0.2, between 0% "
        "and 100%",
    ]


def test_plugins_can_report_errors_in_the_same_style() -> None:
    class JwtConfig(StrictModel):
        secret: str
        algorithms: list[str] = ["HS256"]

    with pytest.raises(ValidationError) as info:
        JwtConfig.model_validate({"secrt": "x", "algorithms": "HS256"})
    assert format_validation_error(info.value, "routes[2].plugins.jwt") == [
        "routes[2].plugins.jwt.secret: required",
        "routes[2].plugins.jwt.algorithms: input should be a valid list",
        "routes[2].plugins.jwt.secrt: unknown key; did you mean 'secret'?",
    ]


def test_error_paths_quote_keys_that_are_not_plain_names() -> None:
    errors = errors_of({"plugins": {"mycompany.plugins:Audit": "on"}})
    assert errors == [
        "plugins['mycompany.plugins:Audit']: must be a mapping of keys, not a string",
    ]


@pytest.mark.parametrize(
    ("service", "error"),
    [
        ({"timeouts": "5s"}, "services.s.timeouts: must be a mapping of keys, not a string"),
        ({"retries": 2}, "services.s.retries: must be a mapping of keys, not a number"),
        (
            {"health": {"active": True}},
            "services.s.health.active: must be a mapping of keys, not true",
        ),
        (
            {"circuit_breaker": ["50%"]},
            "services.s.circuit_breaker: must be a mapping of keys, not a list",
        ),
    ],
)
def test_a_scalar_where_a_section_belongs_is_explained_in_the_files_terms(
    service: dict[str, Any], error: str
) -> None:
    # pydantic says "a valid dictionary or instance of TimeoutsConfig": a Python class name
    # the user never wrote, for a mistake made in YAML
    assert errors_of({"services": {"s": service}}) == [error]


def test_a_value_in_place_of_a_section_is_not_echoed() -> None:
    # it may be a secret written one level too high
    (error,) = errors_of(minimal(consumers=[{"name": "c", "basic_auth": "carol:hunter2"}]))
    assert error == "consumers[0].basic_auth: must be a mapping of keys, not a string"


async def test_a_dotted_plugin_name_is_quoted_in_error_lines_on_routes_too() -> None:
    config = parse_config(
        {
            "plugins": {"nowhere.global:Audit": {}},
            "services": {"s": {"targets": ["http://127.0.0.1:9"]}},
            "routes": [
                {
                    "name": "r",
                    "match": {"paths": ["/"]},
                    "service": "s",
                    "plugins": {"nowhere.route:Audit": {}},
                }
            ],
        }
    )
    with pytest.raises(ConfigError) as refused:
        dry_compile(config, asyncio.get_running_loop())
    assert [line.partition(": cannot")[0] for line in refused.value.errors] == [
        "plugins['nowhere.global:Audit']",
        "routes[0].plugins['nowhere.route:Audit']",
    ]


@pytest.mark.parametrize(
    ("module", "says"),
    [
        (
            "import os\nURL = os.environ['NO_SUCH_VARIABLE_SET']\n",
            "KeyError: 'NO_SUCH_VARIABLE_SET'",
        ),
        ("def broken(:\n", "SyntaxError"),
        (
            "from apigate.plugins import Plugin\n"
            "class Audit(Plugin):\n"
            "    def __init__(self, config, env):\n"
            "        raise ValueError('url must be https')\n",
            "refused its config: ValueError: url must be https",
        ),
    ],
)
async def test_a_plugin_that_cannot_load_is_reported_with_its_path_and_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, says: str
) -> None:
    """An import's KeyError read as "unknown plugin", and a SyntaxError or an __init__'s own
    error escaped as a traceback (exit 1 from validate) with no path (plugin-author audit)."""
    name = f"audit_{abs(hash(module)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config(
        {
            "services": {"s": {"targets": ["http://127.0.0.1:9"]}},
            "routes": [
                {
                    "name": "r",
                    "match": {"paths": ["/"]},
                    "service": "s",
                    "plugins": {f"{name}:Audit": {}},
                }
            ],
        }
    )
    with pytest.raises(ConfigError) as refused:
        dry_compile(config, asyncio.get_running_loop())
    (line,) = refused.value.errors
    assert line.startswith(f"routes[0].plugins['{name}:Audit']: "), line
    assert says in line and "unknown plugin" not in line, line


def test_config_error_str_lists_every_problem() -> None:
    error = ConfigError(["a: one", "b: two"], source="apigate.yaml")
    assert str(error) == "apigate.yaml:\n  a: one\n  b: two"
    assert str(ConfigError(["a: one", "b: two"])) == "a: one\nb: two"
    assert ConfigError("just one").errors == ["just one"]


def test_top_level_must_be_a_mapping() -> None:
    assert errors_of([1, 2]) == ["the configuration must be a mapping of keys (got list)"]


# --- listeners ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("[::1]:8080", "::1", 8080),
        (":8080", "", 8080),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("localhost:9000", "localhost", 9000),
    ],
)
def test_listener_address(address: str, host: str, port: int) -> None:
    cfg = parse_config({"listeners": {"proxy": {"address": address}}})
    assert (cfg.listeners.proxy.host, cfg.listeners.proxy.port) == (host, port)


@pytest.mark.parametrize("address", ["8080", "host:", "::1:8080", "a:70000", "[zz]:80", "a b:80"])
def test_bad_listener_address(address: str) -> None:
    (error,) = errors_of({"listeners": {"proxy": {"address": address}}})
    assert error.startswith(f"listeners.proxy.address: invalid address {address!r}")


def test_a_bare_port_number_is_explained_as_an_address() -> None:
    # YAML reads `address: 8080` as a number; pydantic would only say "a valid string"
    (error,) = errors_of({"listeners": {"proxy": {"address": 8080}}})
    assert error == (
        "listeners.proxy.address: invalid address 8080 (a number): use host:port in quotes, "
        "e.g. ':8080' or '0.0.0.0:8080'"
    )


def test_tls_config() -> None:
    tls = {
        "certificate": "gw.pem",
        "key": "gw.key",
        "certificates": [{"certificate": "b.pem", "key": "b.key", "hosts": ["B.example.com"]}],
        "min_version": "1.3",
    }
    cfg = parse_config({"listeners": {"proxy": {"address": ":8443", "tls": tls}}})
    assert cfg.listeners.proxy.tls is not None
    assert cfg.listeners.proxy.tls.certificates[0].hosts == ["b.example.com"]
    assert errors_of({"listeners": {"proxy": {"tls": {"certificate": "x"}}}}) == [
        "listeners.proxy.tls.key: required"
    ]
    assert errors_of({"listeners": {"proxy": {"tls": {**tls, "min_version": "1.1"}}}}) == [
        "listeners.proxy.tls.min_version: input should be '1.2' or '1.3'"
    ]


def test_trusted_proxies() -> None:
    cidrs = ["10.0.0.0/8", "192.168.1.7", "::1/128"]
    cfg = parse_config({"listeners": {"proxy": {"trusted_proxies": cidrs}}})
    assert cfg.listeners.proxy.trusted_proxies == cidrs
    assert errors_of({"listeners": {"proxy": {"trusted_proxies": ["10.0.0.0/33"]}}}) == [
        "listeners.proxy.trusted_proxies[0]: invalid network '10.0.0.0/33': use e.g. 10.0.0.0/8"
    ]


@pytest.mark.parametrize("address", ["0.0.0.0:8001", ":8001", "10.0.0.5:8001", "admin.local:80"])
def test_admin_off_loopback_needs_a_token(address: str) -> None:
    assert errors_of({"listeners": {"admin": {"address": address}}}) == [
        "listeners.admin.token: required when the admin address is not loopback"
    ]
    cfg = parse_config({"listeners": {"admin": {"address": address, "token": "t"}}})
    assert cfg.listeners.admin is not None and cfg.listeners.admin.token == "t"


@pytest.mark.parametrize("address", ["127.0.0.1:8001", "127.0.0.2:1", "[::1]:8001", "localhost:1"])
def test_admin_on_loopback_needs_no_token(address: str) -> None:
    cfg = parse_config({"listeners": {"admin": {"address": address}}})
    assert cfg.listeners.admin is not None and cfg.listeners.admin.is_loopback


@pytest.mark.parametrize(
    "store", ["memory", "sqlite:///state.db", "sqlite:////var/lib/x.db", "redis://r:6379/0"]
)
def test_store_values(store: str) -> None:
    assert parse_config({"store": store}).store == store


@pytest.mark.parametrize("store", ["mem", "sqlite://", "redis://", "redis://h:x/0", "http://h"])
def test_bad_store(store: str) -> None:
    (error,) = errors_of({"store": store})
    assert error.startswith(f"store: invalid store {store!r}: use memory, sqlite:///")


# --- services -------------------------------------------------------------------------------


def test_target_forms_and_parts() -> None:
    plain = TargetConfig.model_validate("http://127.0.0.1:9001")
    assert (plain.url, plain.weight) == ("http://127.0.0.1:9001", 1)
    assert (plain.scheme, plain.host, plain.port, plain.base_path) == (
        "http",
        "127.0.0.1",
        9001,
        "",
    )
    full = TargetConfig.model_validate({"url": "https://API.example.com/v1/", "weight": 0})
    assert (full.scheme, full.host, full.port, full.base_path) == (
        "https",
        "api.example.com",
        443,
        "/v1",
    )
    assert TargetConfig.model_validate("http://[::1]/").host == "::1"
    assert TargetConfig.model_validate("http://[::1]/").port == 80


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://h:1", "use http://host:port"),
        ("127.0.0.1:9001", "use http://host:port"),
        ("http://h:1/?q=1", "no query or fragment"),
        ("http://h:1/#x", "no query or fragment"),
        ("http://u:p@h:1", "no user info"),
        ("http://h:99999", "bad port"),
        ("http://:80", "bad or missing host"),
        # urlsplit drops these: the request line upstream would have been "GET /a b/x ..."
        ("http://h:1/a b", "blank or control character ' ' at position 12"),
        ("http://h:1/a\r\nX: 1", "blank or control character '\\r'"),
        (" http://h:1", "blank or control character ' ' at position 0"),
    ],
)
def test_bad_target_urls(url: str, reason: str) -> None:
    (error,) = errors_of({"services": {"s": {"targets": [url]}}})
    shown = url.replace(":p@", ":[redacted]@")  # (the password of the user-info case)
    assert error.startswith(f"services.s.targets[0].url: invalid target URL {shown!r}")
    assert reason in error


def test_target_weight_range() -> None:
    (error,) = errors_of({"services": {"s": {"targets": [{"url": "http://h", "weight": 1001}]}}})
    assert error == "services.s.targets[0].weight: input should be less than or equal to 1000"


@pytest.mark.parametrize(
    ("hash_on", "kind", "name"),
    [
        ("ip", "ip", ""),
        ("path", "path", ""),
        ("header:X-User-Id", "header", "x-user-id"),
        ("cookie:Session", "cookie", "Session"),
        ("claim:sub", "claim", "sub"),
    ],
)
def test_hash_on_forms(hash_on: str, kind: str, name: str) -> None:
    service = ServiceConfig(hash_on=hash_on)
    assert (service.hash_on_kind, service.hash_on_name) == (kind, name)


@pytest.mark.parametrize("hash_on", ["", "header", "header:", "query:x", "header:a b", "IP"])
def test_bad_hash_on(hash_on: str) -> None:
    (error,) = errors_of({"services": {"s": {"hash_on": hash_on}}})
    assert error.startswith("services.s.hash_on: invalid hash_on")


def test_balancer_names_are_checked() -> None:
    (error,) = errors_of({"services": {"s": {"balancer": "round-robin"}}})
    assert error.startswith("services.s.balancer: input should be 'round_robin'")


def test_health_statuses() -> None:
    default = ActiveHealthConfig()
    assert default.statuses == ["2xx", "3xx"]
    assert [default.is_healthy_status(c) for c in (200, 204, 302, 399, 199, 400, 503)] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    custom = ActiveHealthConfig.model_validate({"statuses": [200, "204", "500-502"]})
    assert custom.statuses == ["200", "204", "500-502"]
    assert [custom.is_healthy_status(c) for c in (200, 201, 204, 501, 503)] == [
        True,
        False,
        True,
        True,
        False,
    ]
    (error,) = errors_of({"services": {"s": {"health": {"active": {"statuses": ["6xx"]}}}}})
    assert error == (
        "services.s.health.active.statuses[0]: invalid status '6xx': use e.g. 200, 2xx or 200-299"
    )


def test_retries_on() -> None:
    retries = RetriesConfig.model_validate({"on": ["connect_error", "timeout", 502, "503"]})
    assert retries.on == ["connect_error", "timeout", 502, 503]
    assert retries.statuses == {502, 503}
    assert retries.conditions == {"connect_error", "timeout"}
    assert RetriesConfig.model_validate({"attempts": 0}).attempts == 0
    errors = errors_of({"services": {"s": {"retries": {"on": ["boom", 404, True]}}}})
    assert [e.split(":")[0] for e in errors] == [
        "services.s.retries.on[0]",
        "services.s.retries.on[1]",
        "services.s.retries.on[2]",
    ]
    assert "invalid retry condition 'boom': use connect_error, reset, timeout" in errors[0]


def test_discovery() -> None:
    cfg = parse_config(
        {"services": {"users": {"discovery": {"dns": "Users.Internal", "port": 80}}}}
    )
    discovery = cfg.services["users"].discovery
    assert discovery is not None
    assert (discovery.dns, discovery.port, discovery.srv) == ("users.internal", 80, False)
    assert (discovery.min_ttl, discovery.max_ttl) == (1.0, 300.0)
    errors = errors_of(
        {
            "services": {
                "u": {"discovery": {"dns": "u", "port": 1, "min_ttl": "1h", "max_ttl": "1m"}}
            }
        }
    )
    assert errors == ["services.u.discovery.min_ttl: must not exceed max_ttl"]
    assert errors_of({"services": {"u": {"discovery": {"dns": "u"}}}}) == [
        "services.u.discovery.port: required"
    ]


def test_service_names_are_checked() -> None:
    assert errors_of({"services": {"bad name": {}}}) == [
        "services['bad name']: invalid service name 'bad name': use letters, digits, '_', '.', '-'"
    ]
    assert "users.v2" in parse_config({"services": {"users.v2": {}}}).services


def test_long_names_in_the_file_are_taken() -> None:
    """The admin API bounds the names it creates (128 characters); the file, and state saved
    before there was a bound, keep theirs: a gateway refused to start on its own saved state."""
    long = "s" * 300
    route = {"name": long, "match": {"paths": ["/"]}, "service": long}
    cfg = parse_config({"services": {long: {}}, "routes": [route]})
    assert long in cfg.services and cfg.routes[0].name == long


def test_an_aggregate_part_may_not_be_named_like_the_error_list() -> None:
    """Its value and the `_errors` list would share one key of the merged document."""
    route = {
        "name": "agg",
        "match": {"paths": ["/agg"]},
        "aggregate": {"_errors": {"service": "u", "path": "/x"}},
    }
    assert errors_of({"services": {"u": {}}, "routes": [route]}) == [
        "routes[0].aggregate._errors: reserved: the merged answer lists failed parts under "
        "_errors; name this part otherwise"
    ]


# --- consumers ------------------------------------------------------------------------------


def test_consumers() -> None:
    cfg = parse_config(
        {
            "consumers": [
                {"name": "alice", "api_keys": ["k1", "k2"], "groups": ["admins"]},
                {"name": "bob", "basic_auth": {"username": "bob", "password": "$2b$12$abc"}},
            ]
        }
    )
    assert cfg.consumers[1].basic_auth is not None
    assert cfg.consumers[1].basic_auth.username == "bob"
    assert cfg.consumers[1].custom_id is None


def test_consumer_names_and_keys_are_unique() -> None:
    errors = errors_of(
        {
            "consumers": [
                {"name": "alice", "api_keys": ["k1"]},
                {"name": "alice"},
                {"name": "bob", "api_keys": ["k1"]},
            ]
        }
    )
    assert errors == [
        "consumers[1].name: duplicate consumer name 'alice'",
        "consumers[2].api_keys[0]: API key already used by consumer 'alice'",
    ]
    assert errors_of({"consumers": [{"name": "a", "api_keys": ["k", "k"]}]}) == [
        "consumers[0].api_keys: the same API key appears twice"
    ]
    assert errors_of({"consumers": [{"name": "a", "api_keys": [""]}]}) == [
        "consumers[0].api_keys[0]: must not be empty"
    ]


# --- routes ---------------------------------------------------------------------------------


def test_match_normalization() -> None:
    route = {
        "name": "r",
        "service": "hello",
        "match": {
            "paths": ["=/health", "/users/{user_id}/orders"],
            "methods": ["get", "Post"],
            "hosts": ["API.example.com", "*.Example.com"],
            "headers": {"X-Version": "2"},
        },
    }
    match = parse_config(minimal(routes=[route])).routes[0].match
    assert match.methods == ["GET", "POST"]
    assert match.hosts == ["api.example.com", "*.example.com"]
    assert match.headers == {"x-version": "2"}
    assert [(p.path, p.exact, p.params) for p in match.path_patterns()] == [
        ("/health", True, ()),
        ("/users/{user_id}/orders", False, ("user_id",)),
    ]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("hello", "must start with '/'"),
        ("=hello", "must start with '/'"),
        ("/a?b=1", "no '?', '#'"),
        ("/a#frag", "no '?', '#'"),
        ("/a b", "no '?', '#', spaces"),
        ("/a//b", "empty segment"),
        ("/users/x{id}", "'{name}' must be a whole segment"),
        ("/users/{id", "'{name}' must be a whole segment"),
        ("/users/{1d}", "bad parameter name '1d'"),
        ("/users/{}", "bad parameter name ''"),
        ("/a/{id}/b/{id}", "parameter 'id' appears twice"),
    ],
)
def test_bad_match_paths(path: str, reason: str) -> None:
    route = {"name": "r", "service": "hello", "match": {"paths": [path]}}
    (error,) = errors_of(minimal(routes=[route]))
    assert error.startswith(f"routes[0].match.paths[0]: invalid path {path!r}")
    assert reason in error


def test_parse_path_pattern() -> None:
    assert parse_path_pattern("/") == ("/", False, ())
    assert parse_path_pattern("=/a/{b}") == ("/a/{b}", True, ("b",))


@pytest.mark.parametrize(
    ("match", "error"),
    [
        ({"methods": ["GE T"]}, "routes[0].match.methods[0]: invalid HTTP method 'GE T'"),
        ({"methods": []}, "routes[0].match.methods: list should have at least 1 item after "),
        ({"hosts": ["bad host"]}, "routes[0].match.hosts[0]: invalid host 'bad host'"),
        ({"headers": {"bad header": "x"}}, "routes[0].match.headers: invalid header name"),
        ({"paths": []}, "routes[0].match.paths: list should have at least 1 item after "),
    ],
)
def test_bad_match_fields(match: dict[str, Any], error: str) -> None:
    (got,) = errors_of(minimal(routes=[{"name": "r", "service": "hello", "match": match}]))
    assert got.startswith(error)


def test_route_needs_exactly_one_of_service_and_aggregate() -> None:
    part = {"service": "hello", "path": "/x"}
    both = {"name": "r", "service": "hello", "aggregate": {"x": part}}
    assert errors_of(minimal(routes=[{"name": "r"}, both])) == [
        "routes[0].service: required: a route needs a service or an aggregate",
        "routes[1].aggregate: not allowed with service: a route has a service or an aggregate, "
        "not both",
    ]


def test_route_names_are_checked_and_unique() -> None:
    assert errors_of(minimal(routes=[{"name": "a/b", "service": "hello"}])) == [
        "routes[0].name: invalid name 'a/b': use letters, digits, '_', '.', '-'"
    ]
    routes = [{"name": "r", "service": "hello"}, {"name": "r", "service": "hello"}]
    assert errors_of(minimal(routes=routes)) == ["routes[1].name: duplicate route name 'r'"]


def test_unknown_service_suggests_a_close_name() -> None:
    routes = [
        {"name": "a", "service": "hello"},
        {"name": "b", "service": "helo"},
        {"name": "c", "aggregate": {"p": {"service": "nothing-like-it", "path": "/p"}}},
    ]
    assert errors_of(minimal(routes=routes)) == [
        "routes[1].service: unknown service 'helo'; did you mean 'hello'? (declare it under "
        "services: — with no targets it waits for registrations)",
        "routes[2].aggregate.p.service: unknown service 'nothing-like-it' (declare it under "
        "services: — with no targets it waits for registrations)",
    ]


def test_rewrite_params_must_be_captured_by_every_path() -> None:
    good = {
        "name": "r",
        "service": "hello",
        "match": {"paths": ["/u/{id}", "/users/{id}"]},
        "rewrite": "/v2/users/{id}",
    }
    assert parse_config(minimal(routes=[good])).routes[0].rewrite == "/v2/users/{id}"
    bad = {**good, "match": {"paths": ["/u/{id}", "/users/{uid}"]}}
    assert errors_of(minimal(routes=[bad])) == [
        "routes[0].rewrite: parameter {id} is not captured by the match path '/users/{uid}'"
    ]
    broken = {**good, "rewrite": "/v2/{id"}
    (error,) = errors_of(minimal(routes=[broken]))
    assert error.startswith("routes[0].rewrite: invalid path template '/v2/{id'")


def test_aggregate_parts() -> None:
    route = {
        "name": "dash",
        "match": {"paths": ["/dash/{user_id}"]},
        "aggregate": {
            "profile": {"service": "hello", "path": "/users/{user_id}", "method": "post"},
            "orders": {"service": "hello", "path": "/orders?user={uid}", "timeout": "250ms"},
        },
    }
    errors = errors_of(minimal(routes=[route]))
    assert errors == [
        "routes[0].aggregate.orders.path: parameter {uid} is not captured by the match path "
        "'/dash/{user_id}'"
    ]
    route["aggregate"]["orders"]["path"] = "/orders?user={user_id}"  # type: ignore[index]
    aggregate = parse_config(minimal(routes=[route])).routes[0].aggregate
    assert aggregate is not None
    assert aggregate["profile"].method == "POST"
    assert aggregate["profile"].timeout == 5.0 and aggregate["profile"].optional is False
    assert aggregate["orders"].timeout == 0.25


def test_route_limits() -> None:
    route = {
        "name": "up",
        "service": "hello",
        "limits": {"max_body_bytes": "1GiB", "body_timeout": "10m"},
    }
    limits = parse_config(minimal(routes=[route])).routes[0].limits
    assert limits is not None
    assert (limits.max_body_bytes, limits.body_timeout) == (1 << 30, 600.0)


# --- environment variables ------------------------------------------------------------------


def test_env_interpolation() -> None:
    env = {"HOST": "10.0.0.1", "EMPTY": "", "PORT": "9001"}
    data = {
        "a": "http://${HOST}:${PORT}",
        "b": "${MISSING:-fallback}",
        "c": "${EMPTY:-used-when-empty}",
        "d": "${HOST:-unused}",
        "e": "literal $${HOST} and $HOST",
        "f": ["${PORT}", 5, None, True],
        "${HOST}": "keys are left alone",
        "g": "${MISSING:-}",
    }
    assert interpolate_env(data, env) == {
        "a": "http://10.0.0.1:9001",
        "b": "fallback",
        "c": "used-when-empty",
        "d": "10.0.0.1",
        "e": "literal ${HOST} and $HOST",
        "f": ["9001", 5, None, True],
        "${HOST}": "keys are left alone",
        "g": "",
    }


def test_missing_env_names_variable_and_path() -> None:
    data = {"routes": [{"plugins": {"jwt": {"secret": "${JWT_SECRET}"}}}], "x": "${A}${B:-b}"}
    with pytest.raises(ConfigError) as info:
        interpolate_env(data, {})
    assert info.value.errors == [
        "routes[0].plugins.jwt.secret: environment variable JWT_SECRET is not set "
        "(set it, or write ${JWT_SECRET:-default})",
        "x: environment variable A is not set (set it, or write ${A:-default})",
    ]


def test_bad_env_reference() -> None:
    with pytest.raises(ConfigError) as info:
        interpolate_env({"a": "${1X}", "b": "${unclosed"}, {})
    assert info.value.errors == [
        "a: bad variable reference: use ${NAME}",
        "b: bad variable reference: use ${NAME}",
    ]


def test_env_values_cannot_inject_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "apigate.yaml",
        """
        listeners:
          admin: {address: "127.0.0.1:8001", token: ${TOKEN}}
        """,
    )
    cfg = load_config(path, env={"TOKEN": "x}\nstore: redis://evil:1/0\n#"})
    assert cfg.store == "memory"
    assert cfg.listeners.admin is not None
    assert cfg.listeners.admin.token == "x}\nstore: redis://evil:1/0\n#"


def test_env_in_flow_and_block_style(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "apigate.yaml",
        """
        services:
          s:
            targets: [${T1}, {url: "${T2}", weight: ${W}}]
            max_connections: ${MAXC:-8}
        consumers:
          - {name: a, api_keys: [${K}, "$${literal}"]}
        """,
    )
    env = {"T1": "http://h1:1", "T2": "http://h2:2", "W": "3", "K": "key"}
    cfg = load_config(path, env=env)
    assert [(t.url, t.weight) for t in cfg.services["s"].targets] == [
        ("http://h1:1", 1),
        ("http://h2:2", 3),
    ]
    assert cfg.services["s"].max_connections == 8
    assert cfg.consumers[0].api_keys == ["key", "${literal}"]


def test_load_config_reports_missing_env(tmp_path: Path) -> None:
    path = write(tmp_path, "apigate.yaml", "consumers: [{name: a, api_keys: [${ALICE_KEY}]}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.source == str(path)
    assert info.value.errors == [
        "consumers[0].api_keys[0]: environment variable ALICE_KEY is not set "
        "(set it, or write ${ALICE_KEY:-default})"
    ]


def test_load_config_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APIGATE_TEST_STORE", "sqlite:///x.db")
    path = write(tmp_path, "apigate.yaml", "store: ${APIGATE_TEST_STORE}\n")
    assert load_config(path).store == "sqlite:///x.db"


# --- YAML -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.errors == ["file not found"]
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}:\n  file not found"


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "apigate.yaml", "store: memory\nservices:\n  a: [1, 2\nroutes: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (error,) = info.value.errors
    assert error.startswith("line 4, column 7: expected ',' or ']'")


def test_yaml_error_columns_ignore_env_placeholders(tmp_path: Path) -> None:
    path = write(tmp_path, "apigate.yaml", "a: [${LONG_VARIABLE_NAME}, }]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.errors == [
        "line 1, column 28: expected the node content, but found '}' (while parsing a flow node)"
    ]


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "apigate.yaml", "store: memory\nlimits: {}\nstore: redis://h/0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        "line 3, column 1: found duplicate key 'store' (while reading a mapping)"
    ]


def test_yaml_booleans_are_only_true_and_false(tmp_path: Path) -> None:
    # YAML 1.1 reads `on` as True, which would break `retries: {on: [...]}`.
    path = write(
        tmp_path,
        "apigate.yaml",
        """
        services:
          s:
            retries: {on: [reset, 503], non_idempotent: yes}
            preserve_host: true
        """,
    )
    service = load_config(path).services["s"]
    assert service.retries.on == ["reset", 503]
    assert service.retries.non_idempotent is True
    assert service.preserve_host is True


def test_top_level_list_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "apigate.yaml", "- a\n- b\n"))
    assert info.value.errors == ["the configuration must be a mapping of keys (got list)"]


# --- include --------------------------------------------------------------------------------


def test_include_merges_sections(tmp_path: Path) -> None:
    write(
        tmp_path,
        "conf.d/users.yaml",
        """
        services:
          users: {targets: ["http://u:1"]}
        routes:
          - {name: users, match: {paths: [/users]}, service: users}
        consumers:
          - {name: bob, api_keys: ["${BOB_KEY}"]}
        plugins:
          cors: {origins: ["*"]}
        include: [more.yaml]
        """,
    )
    write(tmp_path, "conf.d/more.yaml", "routes: [{name: more, service: hello}]\n")
    main = write(
        tmp_path,
        "apigate.yaml",
        """
        include: [conf.d/users.yaml]
        services:
          hello: {targets: ["http://h:1"]}
        routes:
          - {name: hello, service: hello}
        plugins:
          access_log: {format: json}
        """,
    )
    cfg = load_config(main, env={"BOB_KEY": "bk"})
    assert list(cfg.services) == ["hello", "users"]
    assert [r.name for r in cfg.routes] == ["hello", "users", "more"]
    assert [c.name for c in cfg.consumers] == ["bob"]
    assert cfg.consumers[0].api_keys == ["bk"]
    assert cfg.plugins == {"access_log": {"format": "json"}, "cors": {"origins": ["*"]}}


def test_include_glob(tmp_path: Path) -> None:
    write(tmp_path, "conf.d/b.yaml", "services: {b: }\n")
    write(tmp_path, "conf.d/a.yaml", "services: {a: }\n")
    main = write(tmp_path, "apigate.yaml", "include: ['conf.d/*.yaml']\n")
    assert list(load_config(main).services) == ["a", "b"]


def test_include_duplicates_are_errors(tmp_path: Path) -> None:
    write(
        tmp_path,
        "extra.yaml",
        """
        services: {hello: {}}
        routes: [{name: other, service: hello}, {name: hello, service: hello}]
        consumers: [{name: alice}]
        """,
    )
    main = write(
        tmp_path,
        "apigate.yaml",
        """
        include: [extra.yaml]
        services: {hello: {}}
        routes: [{name: hello, service: hello}]
        consumers: [{name: alice}]
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.errors == [
        "extra.yaml: services.hello: already defined in the main file",
        "extra.yaml: consumers[0]: consumer 'alice' already defined in the main file",
        "extra.yaml: routes[1]: route 'hello' already defined in the main file",
    ]


def test_include_duplicates_between_included_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "services: {s: }\n")
    write(tmp_path, "b.yaml", "services: {s: }\n")
    main = write(tmp_path, "apigate.yaml", "include: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.errors == ["b.yaml: services.s: already defined in a.yaml"]


def test_validation_errors_name_the_included_file(tmp_path: Path) -> None:
    write(tmp_path, "routes.yaml", "routes: [{name: ok, service: s}, {name: bad, service: helo}]\n")
    main = write(
        tmp_path,
        "apigate.yaml",
        """
        include: [routes.yaml]
        services: {s: {timeouts: {conect: 1s}}}
        routes: [{name: main, service: s}]
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.errors == ["services.s.timeouts.conect: unknown key; did you mean 'connect'?"]
    main.write_text(main.read_text().replace("conect", "connect"))
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.errors == [
        "routes.yaml: routes[1].service: unknown service 'helo' (declare it under services: — "
        "with no targets it waits for registrations)"
    ]


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"x.yaml": "listeners: {}\n"}, "x.yaml: listeners: not allowed in an included file"),
        ({}, "x.yaml: file not found"),
        ({"x.yaml": "include: [apigate.yaml]\n"}, "apigate.yaml: include cycle:"),
        ({"x.yaml": "routes: {a: 1}\n"}, "x.yaml: routes: must be a list"),
        ({"x.yaml": "services: [a]\n"}, "x.yaml: services: must be a mapping"),
        ({"x.yaml": "- 1\n"}, "x.yaml: must be a mapping"),
        ({"x.yaml": "a: [\n"}, "x.yaml: line 2, column 1:"),
        ({"x.yaml": "routes: [{name: '${NOPE}'}]\n"}, "x.yaml: routes[0].name: environment"),
    ],
)
def test_include_problems(tmp_path: Path, files: dict[str, str], error: str) -> None:
    for name, text in files.items():
        write(tmp_path, name, text)
    main = write(tmp_path, "apigate.yaml", "include: [x.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(main, env={})
    assert info.value.errors[0].startswith(error), info.value.errors


def test_include_must_list_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "apigate.yaml", "include: {a: 1}\n"))
    assert info.value.errors == ["include: must be a list of file paths"]


def test_include_is_not_accepted_by_parse_config() -> None:
    assert errors_of({"include": ["x.yaml"]}) == ["include: unknown key"]


# --- dump and round trip --------------------------------------------------------------------


def test_dump_uses_units() -> None:
    dumped = dump_config(GatewayConfig())
    assert dumped["limits"] == {
        "max_header_bytes": "32KiB",
        "max_headers": 100,
        "max_url_bytes": "8KiB",
        "max_body_bytes": "10MiB",
        "header_timeout": "10s",
        "body_timeout": "30s",
        "idle_timeout": "75s",
        "send_timeout": "1m",
        "tunnel_idle_timeout": "5m",
        "max_connections": 10000,
        "drain_timeout": "30s",
    }


def test_dump_is_json_and_round_trips(tmp_path: Path) -> None:
    import json

    text = EXAMPLE.read_text().replace("\nconsumers:", "  orders:\n\nconsumers:", 1)
    cfg = load_config(write(tmp_path, "apigate.yaml", text), env=EXAMPLE_ENV)
    dumped = dump_config(cfg)
    assert json.loads(json.dumps(dumped)) == dumped
    services = dumped["services"]
    assert services["hello"]["retries"]["budget"] == "20%"
    assert services["hello"]["retries"]["backoff"] == "25ms"
    assert services["hello"]["circuit_breaker"]["failure_rate"] == "50%"
    assert services["hello"]["targets"][0] == {"url": "http://127.0.0.1:9001", "weight": 1}
    assert parse_config(dumped) == cfg
    assert parse_config(yaml.safe_load(yaml.safe_dump(dumped))) == cfg


def test_round_trip_of_odd_values() -> None:
    cfg = parse_config(
        {
            "limits": {"max_body_bytes": 1234567, "header_timeout": 0.3333, "drain_timeout": 0},
            "services": {
                "s": {
                    "retries": {"budget": 0.123456789123, "backoff": "1.5s", "on": [502]},
                    "health": {"active": {"statuses": [200, "3xx", "500-502"]}},
                }
            },
            "plugins": {"x": {"literal": "${NOT_INTERPOLATED}"}},
        }
    )
    dumped = dump_config(cfg)
    assert dumped["limits"]["max_body_bytes"] == 1234567
    assert dumped["plugins"] == {"x": {"literal": "${NOT_INTERPOLATED}"}}
    assert parse_config(dumped) == cfg


def test_aggregate_paths_may_read_query_and_claims_but_rewrites_may_not() -> None:
    base = {
        "services": {"users": {}, "orders": {}},
        "routes": [
            {
                "name": "dash",
                "match": {"paths": ["/dash/{user_id}"]},
                "aggregate": {
                    "profile": {"service": "users", "path": "/users/{user_id}?t={claim.tenant}"},
                    "orders": {"service": "orders", "path": "/orders?page={query.page}"},
                },
            }
        ],
    }
    cfg = parse_config(base)
    assert cfg.routes[0].aggregate is not None
    bad = {
        **base,
        "routes": [
            {
                "name": "r",
                "match": {"paths": ["/x"]},
                "service": "users",
                "rewrite": "/y/{claim.sub}",
            }
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    assert "routes[0].rewrite" in str(info.value)


def test_a_config_nested_too_deeply_is_an_error_with_its_path() -> None:
    value: Any = 1
    for _ in range(70):
        value = {"a": value}
    plugins = {"request_transform": {"json": {"add": {"f": value}}}}
    doc = {"routes": [{"name": "r", "service": "s", "plugins": plugins}], "services": {"s": {}}}
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    assert "routes[0].plugins.request_transform.json.add.f.a...:" in str(caught.value)
    assert "nested more than 64 levels deep" in str(caught.value)


@pytest.mark.parametrize("depth", [100, 3000])
@pytest.mark.parametrize("parser", ["libyaml when installed", "pure-python"])
def test_a_yaml_file_nested_too_deeply_is_the_same_error_whichever_parser_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int, parser: str
) -> None:
    # 100 deep: parsed, then refused by the depth check. 3000 deep: the pure-Python parser
    # recurses past Python's limit, and libyaml from PyYAML 6.0.4 on refuses more than 1,000
    # levels and leaves the describing to that parser. An error, never a RecursionError.
    if parser == "pure-python":
        monkeypatch.setattr(config_loader, "_FastLoader", config_loader._StrictLoader)
    path = tmp_path / "deep.yaml"
    path.write_text("plugins: " + "[" * depth + "]" * depth)
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        load_config(path)


def test_errors_never_show_a_password_in_a_url() -> None:
    doc = {
        "store": "redis://:hunter2@localhost:6379/notadb",
        "services": {"s": {"targets": ["http://user:hunter3@127.0.0.1:9000"]}},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    shown = str(caught.value)
    assert "invalid store 'redis://:[redacted]@localhost:6379/notadb'" in shown
    assert "invalid target URL 'http://user:[redacted]@127.0.0.1:9000'" in shown
    assert "hunter" not in shown


def test_a_document_sent_by_names_has_its_errors_named() -> None:
    """`PUT /routes/extra` naming an unknown service was told `routes[16].service`: its
    place in the merged list, which the sender never saw."""
    doc = {
        "version": 1,
        "services": {"up": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [
            {"name": "a", "match": {"paths": ["/a"]}, "service": "up"},
            {"name": "extra", "match": {"paths": ["/x"]}, "service": "nowhere"},
        ],
    }
    with pytest.raises(ConfigError) as named:
        parse_config(doc, "<admin>", by_name=True)
    assert named.value.errors[0].startswith("routes[1] (extra).service: unknown service")
    with pytest.raises(ConfigError) as placed:  # a file's or a whole document's: its places
        parse_config(doc)
    assert placed.value.errors[0].startswith("routes[1].service: unknown service")


async def test_plugin_errors_of_a_document_sent_by_names_name_the_route_too() -> None:
    """The third round (plugin configs, checked as the snapshot is compiled) still said
    `routes[1].plugins...` for an admin change: review of the naming fix."""
    limit = {"requests": 1, "per": "1s", "store": "redis"}  # no top-level Redis store
    doc = {
        "version": 1,
        "services": {"up": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [
            {"name": "a", "match": {"paths": ["/a"]}, "service": "up"},
            {
                "name": "extra",
                "match": {"paths": ["/x"]},
                "service": "up",
                "plugins": {"rate_limit": limit},
            },
        ],
    }
    config = parse_config(doc, "<admin>", by_name=True)
    with pytest.raises(ConfigError) as refused:
        dry_compile(config, asyncio.get_running_loop())
    assert refused.value.errors[0].startswith("routes[1] (extra).plugins.rate_limit.store: ")
