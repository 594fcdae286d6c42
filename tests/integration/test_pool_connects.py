"""Connects abandoned half-way, on the event loop the gateway runs (uvloop), against a real
listening socket: every slot a connect took comes back."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop

from apigate.http.pool import Pool


async def _abandon_connects(loop: asyncio.AbstractEventLoop, count: int) -> tuple[int, int]:
    """(slots counted, connections parked) once `count` connects were abandoned."""
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(loop, "127.0.0.1", port, max_connections=count)
    try:
        for i in range(count):
            task = loop.create_task(pool.connect(5.0))
            for _ in range(i % 6):  # cancelled at every stage of the connect, in turn
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                pool.release(await task)  # (done before the cancel: parked)
        for _ in range(20):
            await asyncio.sleep(0.01)  # every close delivered
        return pool.total, len(pool.idle)
    finally:
        pool.close()
        server.close()
        for writer in accepted:
            writer.close()


def test_a_connect_cancelled_after_the_loop_made_its_connection_frees_its_slot() -> None:
    """A client that left while the gateway connected for it cancels the connect. uvloop,
    cancelled after it has called `connection_made` (the connection is made, the connecting
    task not resumed yet), closes the transport without ever calling `connection_lost`: the
    slot was never freed, and a burst of clients resetting at once used up `max_connections`
    (every later request 503 until a restart: seen in a review soak)."""
    loop = uvloop.new_event_loop()
    try:
        counted, parked = loop.run_until_complete(_abandon_connects(loop, 300))
        assert counted == parked
        loop.run_until_complete(asyncio.sleep(0.05))  # the parked ones' closes
    finally:
        loop.close()
