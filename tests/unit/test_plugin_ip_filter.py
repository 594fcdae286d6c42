"""The ip_filter plugin: CIDR rules for IPv4 and IPv6, and X-Forwarded-For only via trust."""

from __future__ import annotations

from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.plugins.client_address import ClientAddresses
from apigate.plugins.ip_filter import IpFilterPlugin, parse_address
from tests.unit.test_plugin_fakes import body, build, make_ctx, resolve


def verdict(plugin: IpFilterPlugin, ip: str, xff: bytes | None = None) -> int:
    outcome = resolve(plugin.on_request(make_ctx(client_ip=ip, forwarded_for=xff)))
    return 200 if outcome is None else outcome.status


def plugin_for(**raw: Any) -> IpFilterPlugin:
    built: IpFilterPlugin = build("ip_filter", raw)
    return built


def test_allow_list_ipv4_and_ipv6() -> None:
    plugin = plugin_for(allow=["10.0.0.0/8", "2001:db8::/32"])
    assert verdict(plugin, "10.1.2.3") == 200
    assert verdict(plugin, "11.1.2.3") == 403
    assert verdict(plugin, "2001:db8::1") == 200
    assert verdict(plugin, "2001:db9::1") == 403
    assert verdict(plugin, "::ffff:10.9.9.9") == 200  # IPv4-mapped, from a dual-stack socket
    assert verdict(plugin, "unix") == 403  # not an address: refused


def test_deny_wins_over_allow() -> None:
    plugin = plugin_for(allow=["10.0.0.0/8"], deny=["10.6.6.0/24", "fe80::/10"])
    assert verdict(plugin, "10.6.6.6") == 403
    assert verdict(plugin, "10.6.7.6") == 200
    deny_only = plugin_for(deny=["192.0.2.0/24", "::1/128"])
    assert verdict(deny_only, "192.0.2.55") == 403
    assert verdict(deny_only, "::1") == 403
    assert verdict(deny_only, "198.51.100.1") == 200


def test_the_403_body() -> None:
    outcome = resolve(plugin_for(deny=["0.0.0.0/0"]).on_request(make_ctx(client_ip="1.2.3.4")))
    assert outcome is not None
    assert body(outcome) == {
        "error": "ip_forbidden",
        "message": "client address not allowed",
        "request_id": "req-1",
    }


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    plugin = plugin_for(deny=["198.51.100.0/24"], trusted_proxies=["10.0.0.0/8"])
    assert verdict(plugin, "192.0.2.1", b"1.1.1.1") == 200
    assert verdict(plugin, "198.51.100.1", b"1.1.1.1") == 403  # spoofing does not help


def test_the_right_most_untrusted_address_is_the_client() -> None:
    plugin = plugin_for(allow=["203.0.113.0/24"], trusted_proxies=["10.0.0.0/8", "fd00::/8"])
    # the client forged the left-most entry; the proxies appended the real one
    assert verdict(plugin, "10.0.0.2", b"203.0.113.9, 198.51.100.7, 10.0.0.1") == 403
    assert verdict(plugin, "10.0.0.2", b"198.51.100.7, 203.0.113.9, 10.0.0.1") == 200
    assert verdict(plugin, "fd00::2", b"203.0.113.9, fd00::1") == 200
    assert verdict(plugin, "10.0.0.2", b"garbage, 10.0.0.1") == 403
    ctx = make_ctx(client_ip="10.0.0.2", forwarded_for=b"[2001:db8::5]:443, 10.0.0.1")
    resolve(plugin.on_request(ctx))
    assert ctx.vars["client_ip"] == "2001:db8::5"


def test_parse_address() -> None:
    assert str(parse_address("1.2.3.4:80")) == "1.2.3.4"
    assert str(parse_address("[::1]:80")) == "::1"
    assert str(parse_address("fe80::1%eth0")) == "fe80::1"
    assert parse_address("unknown") is None


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="give allow, deny or both"):
        build("ip_filter", {})
    with pytest.raises(ConfigError, match=r"invalid network '10\.0\.0\.0/33'"):
        build("ip_filter", {"allow": ["10.0.0.0/33"]})
    with pytest.raises(ConfigError, match="did you mean 'trusted_proxies'"):
        build("ip_filter", {"allow": ["10.0.0.0/8"], "trusted_proxy": ["10.0.0.1"]})


# ============================================================================ security review
def test_the_client_rule_is_shared_and_cached() -> None:
    # ip_filter and rate_limit's `ip` key apply one rule (apigate.plugins.client_address)
    proxies = ClientAddresses(["10.0.0.0/8", "fd00::/8"])
    assert proxies.client("192.0.2.1", b"198.51.100.1") == "192.0.2.1"  # an untrusted peer
    assert proxies.client("10.0.0.1", None) == "10.0.0.1"  # a proxy's own request
    assert proxies.client("::ffff:10.0.0.1", b"198.51.100.1:5555") == "198.51.100.1"
    assert proxies.client("10.0.0.1", b"1.1.1.1, [2001:db8::1]:80, fd00::9") == "2001:db8::1"
    assert proxies.client("10.0.0.1", b"10.0.0.3:80, 10.0.0.2") == "10.0.0.3"  # all trusted
    assert proxies.client("10.0.0.1", b" , ") == ""
    assert proxies.resolve(b"1.1.1.1, 198.51.100.1") is proxies.resolve(b"1.1.1.1, 198.51.100.1")
    assert not ClientAddresses([]) and not ClientAddresses([]).trusts("10.0.0.1")
