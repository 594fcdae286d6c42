"""TLS termination on the proxy listener: one default certificate plus SNI-selected ones."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from apigate.config.errors import ConfigError

if TYPE_CHECKING:
    from apigate.config.schema import TLSConfig


def _load(certificate: str, key: str, minimum: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"listeners.proxy.tls: cannot load {certificate} / {key}: {exc}"]
        ) from None
    return ctx


def build_server_context(tls: TLSConfig) -> ssl.SSLContext:
    minimum = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    default = _load(tls.certificate, tls.key, minimum)
    by_host: dict[str, ssl.SSLContext] = {}
    for extra in tls.certificates:
        ctx = _load(extra.certificate, extra.key, minimum)
        for host in extra.hosts or []:
            by_host[host.lower()] = ctx
    if by_host:

        def pick(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            if server_name:
                name = server_name.lower()
                ctx = by_host.get(name)
                if ctx is None and "." in name:
                    ctx = by_host.get("*." + name.split(".", 1)[1])
                if ctx is not None:
                    sock.context = ctx

        default.sni_callback = pick
    return default
