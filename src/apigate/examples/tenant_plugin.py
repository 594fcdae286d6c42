"""A plugin written as a third party writes one (README, "Writing a plugin"), loaded
in-process by its dotted path; it ships with apigate, so this path works wherever apigate is
installed (your own module must be importable by the gateway the same way):

    routes:
      - name: orders
        match: {paths: [/orders]}
        service: orders
        plugins:
          apigate.examples.tenant_plugin:TenantPlugin: {allowed: [acme, globex]}

Every request on the route must name its tenant in a header (`X-Tenant` by default), one of
`allowed` when that list is given. The upstream learns which route sent the request, the client
sees which tenant was served, and the gateway counts refusals in its Prometheus metrics
(`apigate_tenant_refused_total{route}`) and served requests per tenant in the plugin's own
state, which survives config reloads. One hook each, all synchronous: a hook that must wait
(a database, an HTTP call) returns an awaitable instead, and only then does the gateway
create a task.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from apigate.plugins import Plugin, PluginConfig, PluginEnv, Response, reject


class TenantConfig(PluginConfig):
    """The plugin's settings; unknown keys are refused with their path, like the rest of the
    file: `routes[0].plugins['apigate.examples.tenant_plugin:TenantPlugin'].alowed: unknown
    key; did you mean 'allowed'?`."""

    header: str = "X-Tenant"
    allowed: list[str] = []  # empty: any tenant


class TenantPlugin(Plugin):
    name = "tenant"
    priority = 960  # after authentication (1100 and up), before acl (950) and rate_limit (910)
    Config = TenantConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        # Built once per route and config snapshot, not per request: precompute here.
        super().__init__(config, env)
        assert isinstance(config, TenantConfig)
        self.header = config.header.lower()
        self.allowed = frozenset(config.allowed)
        self.missing = f"the {config.header} header is required"
        # `env.shared` lives as long as the process, across reloads: the counts go on where
        # the previous snapshot's instance of this plugin left them.
        self.served: Counter[str] = env.shared.setdefault("tenant.served", Counter())

    def on_request(self, ctx: Any) -> Response | None:
        """Before an instance is picked: a `Response` answers the client and ends the chain."""
        tenant = ctx.request.header(self.header)
        if not tenant:
            return self._refuse(ctx, 400, "tenant_required", self.missing)
        if self.allowed and tenant not in self.allowed:
            return self._refuse(ctx, 403, "unknown_tenant", "this tenant is not served here")
        ctx.vars["tenant"] = tenant  # scratch space the later hooks (and plugins) read
        return None

    def on_upstream_request(self, ctx: Any, request: Any) -> None:
        """The request about to go upstream (once per attempt: retries call it again)."""
        request.set_header("X-Gateway-Route", ctx.route.name)

    def on_response(self, ctx: Any, head: Any) -> None:
        """The upstream's response head, before the client sees it; also a response a later
        plugin made itself (a 429, a cache hit), as in Kong."""
        tenant = ctx.vars.get("tenant")
        if tenant is not None:
            head.set_header("X-Tenant", tenant)

    def on_log(self, ctx: Any) -> None:
        """Once the exchange is over (answered, refused or cut): `ctx.status` is final."""
        tenant = ctx.vars.get("tenant")
        if tenant is not None and ctx.status < 400:  # a 429 or a 502 served nobody
            self.served[tenant] += 1

    def _refuse(self, ctx: Any, status: int, code: str, message: str) -> Response:
        metrics = self.env.shared.get("metrics")  # absent when the gateway runs without them
        if metrics is not None:
            metrics.inc("tenant_refused", route=ctx.route.name)
        return reject(ctx, status, code, message)
