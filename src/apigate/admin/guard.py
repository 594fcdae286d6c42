"""What a browser may not do to the admin API: it runs before routing and the token check.

A token-less admin listener (the default: loopback, `token: ""`) trusts whatever reaches it,
and any web page the operator opens can reach it: `fetch("http://127.0.0.1:8001/config",
{method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body})` is a
"simple" request, sent without a CORS preflight, and replaced the whole config (a review did
it from headless Chromium). DNS rebinding gets the same through a name the attacker's DNS
points at 127.0.0.1. So, as Docker's and Consul's local APIs do:

- a request a browser marks as another site's (`Sec-Fetch-Site` other than `same-origin` or
  `none`, or an `Origin` that is not the listener's own) is refused, 403;
- a body sent as another type than `application/json` is refused, 415: a page sends
  `text/plain` or a form without a preflight, but JSON only after one, which the API never
  answers. (A body without a type passes, as Docker's API lets it: browsers that send one
  cross-site send `Origin` too.)
- without a token, `Host` must name the listener by address or as `localhost`: a rebound name
  is refused, 403. (With a token, a page can neither read the token nor send it.)

Clients that are no browser (curl, `apigate status`, the registration client) send neither
`Origin` nor `Sec-Fetch-Site`; the dashboard's own requests are same-origin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from apigate.admin.http import AdminError, AdminRequest, AdminResponse
from apigate.plugins.client_address import parse_address

Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]

_BROWSER_OWN = frozenset({"same-origin", "none"})  # `none`: typed in the address bar


def guarded(handler: Handler, token: Callable[[], str]) -> Handler:
    """`handler` behind `refuse_browser_attacks`; `token()` is the admin token in force."""

    async def guarded_handler(req: AdminRequest) -> AdminResponse:
        refuse_browser_attacks(req, bool(token()))
        return await handler(req)

    return guarded_handler


def refuse_browser_attacks(req: AdminRequest, has_token: bool) -> None:
    """Raise AdminError for a cross-site or rebound request (see the module's docstring)."""
    host = req.headers.get("host", "")
    site = req.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in _BROWSER_OWN:
        raise AdminError(403, "cross_site", "the admin API refuses requests from other sites")
    origin = req.headers.get("origin")
    if origin is not None and _origin_authority(origin) != host.lower():
        raise AdminError(403, "cross_site", "the admin API refuses requests from other origins")
    content_type = req.headers.get("content-type")
    if req.body and content_type is not None and _media_type(content_type) != "application/json":
        raise AdminError(
            415,
            "unsupported_media_type",
            "a body must be application/json (curl: --json, or -H 'Content-Type: "
            "application/json' with -d)",
        )
    if not has_token and not _local_host(host):
        raise AdminError(
            403,
            "host_not_allowed",
            f"Host {host!r}: a token-less admin API answers only to its address or localhost",
        )


def _origin_authority(origin: str) -> str:
    """`http://127.0.0.1:8001` -> `127.0.0.1:8001` (`null` and the like give themselves)."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    return rest.rstrip("/") if sep and scheme in ("http", "https") else origin


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def _local_host(host: str) -> bool:
    """Whether a Host value is an IP address or `localhost`, with or without a port."""
    name = host.strip().lower()
    return name.partition(":")[0] in ("localhost", "localhost.") or parse_address(name) is not None
