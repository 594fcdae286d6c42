"""The exchange's per-request state that is made only when a request needs it: the attempted
instances, the buffered body and `vars` start out as shared or absent objects (most requests
have no body, are tried once and meet no plugin), and nothing one request does may reach them
for another."""

from __future__ import annotations

import asyncio
import json

from apigate.observability.trace_context import trace_id_of
from apigate.proxy import exchange
from tests.unit.test_resilience_review import ANSWER_200, ANSWER_500, Client, Gateway


async def test_a_retried_request_with_a_body_leaves_the_shared_lists_empty() -> None:
    gw = Gateway(
        {
            "svc": {
                # (a retry goes to another instance)
                "targets": ["http://10.0.0.1:80", "http://10.0.0.2:80"],
                "retries": {"attempts": 1, "on": [500], "backoff": "1ms", "budget": "100%"},
            }
        }
    )
    parked = [gw.park("svc", inst) for inst in gw.service("svc").instances.values()]
    client = Client(gw.host)
    client.conn.data_received(
        b"PUT /svc/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 9\r\n\r\nbo"
    )
    client.conn.data_received(b"dy-1234")
    gw.host.writes.flush()
    ex = gw.host.exchanges[-1]

    def sent_to() -> list[int]:  # requests each pooled connection was sent
        return [bytes(t.written).count(b"\r\n\r\nbody-1234") for _, t in parked]

    before = sent_to()
    assert sum(before) == 1
    parked[before.index(1)][0].data_received(ANSWER_500)
    await asyncio.sleep(0.05)  # the backoff, then the retry, with the body kept for it
    gw.host.writes.flush()
    after = sent_to()
    assert sum(after) == 2
    parked[[n - m for n, m in zip(after, before, strict=True)].index(1)][0].data_received(
        ANSWER_200
    )
    assert client.status == 200 and ex.retries == 1
    assert len(ex.tried) == 2
    assert exchange._NONE == []  # (shared by every exchange: never appended to)


async def test_vars_are_made_when_first_asked_for_and_the_trace_is_kept_apart() -> None:
    gw = Gateway({"svc": {"targets": ["http://10.0.0.1:80"]}})
    conn, transport = gw.park("svc")
    ex, client = gw.send("/svc/x")
    assert ex._vars is None  # no plugin: no dict was made for the request
    assert ex.trace_line is not None and ex.trace_line in bytes(transport.written)
    conn.data_received(ANSWER_200)
    assert client.status == 200
    # the access log read the trace id from the line sent, and made no dict either
    assert ex._vars is None
    (logged,) = [json.loads(line) for line in gw.log.format(gw.log.take()).splitlines()]
    trace_id = ex.trace_line.split(b"-")[1].decode()  # (the line as sent: 00-<id>-<span>-01)
    assert logged["trace_id"] == trace_id
    assert logged["request_id"] == ex.request.request_id == ex.request.plain_id
    # a plugin that asks for it gets the same id, kept in vars
    assert trace_id_of(ex) == trace_id
    assert ex.vars == {"trace_id": trace_id} and ex.vars is ex.vars
