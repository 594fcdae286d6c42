"""Client address filtering (`ip_filter`): allow and deny CIDR lists, IPv4 and IPv6.

The client is the TCP peer, unless the peer is one of this plugin's `trusted_proxies`: then it
is the right-most address of X-Forwarded-For that is not itself a trusted proxy (entries to
its left were written by the client and prove nothing; the rule is
apigate.plugins.client_address's, which rate_limit applies with the listener's list). The
resolved address is left in `ctx.vars["client_ip"]` for later plugins (rate limiting by `ip`
takes it over its own answer, so both judge the same client).

Note: the listener keeps a client's X-Forwarded-For only from peers in
`listeners.proxy.trusted_proxies`, so a proxy trusted here must be trusted there too.

Rules: `deny` wins over `allow`; with an `allow` list, only its networks pass; an address that
does not parse is refused. Decisions are cached per address (bounded), so a returning client
costs one dict lookup.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import AfterValidator, model_validator

from apigate.config.errors import located_error
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.client_address import ClientAddresses, Network, parse_address
from apigate.plugins.identity import StrictPluginConfig, forbidden

__all__ = ["IpFilterConfig", "IpFilterPlugin", "parse_address"]

_CACHE_MAX = 10_000


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"invalid network {value!r}: use e.g. 10.0.0.0/8 or 2001:db8::/32"
        ) from None
    return value.strip()


Cidr = Annotated[str, AfterValidator(_check_cidr)]


class IpFilterConfig(StrictPluginConfig):
    allow: list[Cidr] | None = None
    deny: list[Cidr] = []
    trusted_proxies: list[Cidr] = []

    @model_validator(mode="after")
    def _some_rule(self) -> IpFilterConfig:
        if self.allow is None and not self.deny:
            raise located_error(type(self).__name__, [((), "give allow, deny or both")])
        return self


def _networks(cidrs: list[str]) -> list[Network]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


class IpFilterPlugin(Plugin):
    name = "ip_filter"
    priority = 2000
    Config = IpFilterConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, IpFilterConfig)
        self.allow = _networks(config.allow) if config.allow is not None else None
        self.deny = _networks(config.deny)
        self.proxies = ClientAddresses(config.trusted_proxies)
        self._decisions: dict[str, bool] = {}

    def on_request(self, ctx: Any) -> Response | None:
        req = ctx.request
        ip: str = req.client_ip
        if req.forwarded_for is not None and self.proxies.trusts(ip):
            ip = self.proxies.resolve(req.forwarded_for)
            ctx.vars["client_ip"] = ip
        allowed = self._decisions.get(ip)
        if allowed is None:
            allowed = self.decide(ip)
            if len(self._decisions) >= _CACHE_MAX:
                self._decisions.clear()
            self._decisions[ip] = allowed
        if not allowed:
            return forbidden(ctx, "client address not allowed", "ip_forbidden")
        return None

    def decide(self, ip: str) -> bool:
        addr = parse_address(ip)
        if addr is None:
            return False
        if any(addr in net for net in self.deny):
            return False
        return self.allow is None or any(addr in net for net in self.allow)

    def __repr__(self) -> str:
        allow = "*" if self.allow is None else [str(n) for n in self.allow]
        return f"<IpFilterPlugin allow={allow} deny={[str(n) for n in self.deny]}>"
