"""The dashboard page on the admin listener: `GET /` and its two assets, no build step.

The page (static/index.html, app.js, app.css) holds no data: it reads the admin API with
`fetch` every 2 s (/services, /routes, /stats, /events, /healthz), sending the admin token
from sessionStorage as `Authorization: Bearer`. So the page and its assets are public, as is
`/dashboard/auth` (whether a token is needed, so the page asks for it before its first data
request instead of collecting a 401), while every data endpoint keeps the token check.

The files are read once at attach time and served with a strict Content-Security-Policy
(same-origin scripts, styles and fetches only; no inline code), so a value shown on the page
cannot run as script even if it contained markup (the script also only ever sets textContent).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from apigate.admin.http import AdminRequest, AdminResponse

if TYPE_CHECKING:
    from apigate.server import Gateway

STATIC = Path(__file__).with_name("static")
ASSETS = {  # URL path -> (file, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
AUTH_PATH = "/dashboard/auth"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


def load_assets() -> dict[str, AdminResponse]:
    """The page's files as ready responses, keyed by URL path."""
    out: dict[str, AdminResponse] = {}
    for path, (name, content_type) in ASSETS.items():
        body = (STATIC / name).read_bytes()
        out[path] = AdminResponse(200, body, content_type, dict(SECURITY_HEADERS))
    return out


def public_handler(gateway: Gateway, assets: dict[str, AdminResponse]) -> Handler:
    """Answers the page, its assets and `/dashboard/auth`; nothing else."""

    async def serve(req: AdminRequest) -> AdminResponse:
        if req.path == AUTH_PATH:
            admin = gateway.config.listeners.admin
            needed = bool(admin is not None and admin.token)
            body = json.dumps({"token_required": needed}).encode()
            return AdminResponse(200, body, "application/json", dict(SECURITY_HEADERS))
        return assets[req.path]

    return serve


async def attach_dashboard(gateway: Gateway) -> None:
    """Serve the dashboard on the admin API. Must run after `attach_admin`.

    A browser cannot send a header when it navigates to a page, so the page, its assets and
    the auth probe are public routes (answered before the token check); everything the page
    then reads goes through the API with the token.
    """
    api = gateway.extensions.get("admin_api")
    if api is None or "dashboard" in gateway.extensions:
        return
    assets = load_assets()
    serve = public_handler(gateway, assets)
    public = frozenset([*assets, AUTH_PATH])
    for path in public:
        api.add_route("GET", re.escape(path), serve, public=True)
    gateway.extensions["dashboard"] = public
