"""The admin listener: loopback by default, bearer-token protected when a token is set."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

from apigate.admin.api import AdminApi
from apigate.admin.config_ops import ConfigOps
from apigate.admin.guard import guarded
from apigate.admin.http import AdminConnection
from apigate.store.config_store import open_config_store

if TYPE_CHECKING:
    from apigate.server import Gateway


async def attach_admin(gateway: Gateway) -> None:
    """Open the config store, apply its stored changes, and serve the admin API."""
    store = open_config_store(gateway.config.store)
    await store.open()
    ops = ConfigOps(gateway, store)
    gateway.extensions["config_ops"] = ops
    gateway.compose_config = ops.compose
    gateway.file_role = ops.file_role
    composed = ops.compose(gateway.config)
    if composed is not gateway.config:
        await gateway.apply_config(composed)
    api = AdminApi(gateway)
    gateway.extensions["admin_api"] = api

    def token() -> str:  # (the one in force: a reload may change it)
        admin = gateway.config.listeners.admin
        return admin.token if admin is not None else ""

    handle = guarded(api.handle, token)
    server: asyncio.Server | None = None
    connections: set[AdminConnection] = set()  # open ones, bounded by http.MAX_CONNECTIONS

    async def on_start(gw: Gateway) -> None:
        nonlocal server
        listener = gw.config.listeners.admin
        if listener is None:
            return
        worker = gw.worker
        if worker is not None and not worker.serves_admin:
            # one admin endpoint per node: this worker's API is for worker 0 to read (its
            # metrics, to sum them), on a socket in the supervisor's 0700 run directory
            path = worker.socket_path()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a restarted worker's predecessor left it
            server = await gw.loop.create_unix_server(
                lambda: AdminConnection(handle, connections), path=path
            )
            return
        server = await gw.loop.create_server(
            lambda: AdminConnection(handle, connections),
            host=listener.host or None,
            # (a worker: the port the supervisor resolved and keeps, so that a restarted
            # worker 0 serves the admin API where its predecessor did)
            port=worker.admin_port if worker is not None else listener.port,
            reuse_address=True,
            reuse_port=worker is not None or None,
        )
        gw.admin_server = server
        if worker is None:  # (the supervisor prints the node's line)
            print(f"apigate admin listening on {gw.admin_address}", flush=True)

    async def on_drained(gw: Gateway) -> None:
        # (not as the drain starts: /readyz says "draining" and /metrics is scraped meanwhile)
        if server is not None:
            server.close()
        await store.close()

    gateway.on_start.insert(0, on_start)
    gateway.on_drained.append(on_drained)
