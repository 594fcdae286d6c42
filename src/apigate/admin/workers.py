"""The node's admin view under `--workers N`: worker 0 answers for all of them.

There is one admin endpoint per node, served by worker 0 (apigate.admin.server). Everything a
worker changes through it reaches the others through Redis, as between the nodes of a cluster
(`--workers N` requires `store: redis://`). What each worker only counts for itself (metrics,
the dashboard's per-second ring) worker 0 reads from the others when it is asked, each over its
private admin socket (a Unix socket in the supervisor's 0700 run directory), all at once and
with a short deadline:

    GET /workers/self   (every worker) its pid, counts, Prometheus text and /stats ring
    GET /metrics        (worker 0) every worker's families merged (metrics_merge)
    GET /stats          (worker 0) the dashboard's numbers over the merged ring
    GET /workers        (worker 0) one line per worker: pid, restarts, requests, connections
    DELETE /cache       (worker 0) its own purge, then every other worker's (each has its
                        own memory cache store)

A worker that does not answer within PEER_TIMEOUT is left out of that answer, and said so:
`apigate_workers_scraped` (metrics), `workers.answered` (stats), `answered: false` (workers).
Its counters still count at the values last read, and those of a worker that exited are kept
(`metrics_merge`): the node's counters never go down because one worker restarted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from apigate.admin.http import AdminError, AdminRequest, AdminResponse, json_response
from apigate.observability.metrics_merge import (
    FixedCollector,
    Snapshot,
    WorkerMetrics,
    counters_only,
    merge_families,
    merge_rings,
    parse_exposition,
)

if TYPE_CHECKING:
    from apigate.observability.metrics import GatewayMetrics
    from apigate.server import Gateway
    from apigate.worker import WorkerRole

log = logging.getLogger("apigate.workers")

PEER_TIMEOUT = 0.5  # seconds for every other worker to answer (a scrape waits at most this)
MAX_PEER_BYTES = 16 * 1024 * 1024  # a worker's answer: its metrics text and ring


def describe_self(gateway: Gateway, metrics: GatewayMetrics) -> dict[str, Any]:
    """This worker, as `GET /workers/self` answers (the metrics and ring for worker 0)."""
    role = gateway.worker
    return {
        "index": role.index if role is not None else 0,
        "pid": os.getpid(),
        "restarts": role.restarts if role is not None else 0,
        "started": metrics.started,
        "connections": len(gateway.connections),
        "requests": sum(s.count for s in metrics.by_name().values()),
        "metrics": generate_latest(metrics.registry).decode(),
        "ring": list(metrics.ring),
    }


async def ask_peer(
    path: str, token: str, method: str, target: str, timeout: float = PEER_TIMEOUT
) -> dict[str, Any]:
    """The JSON answer of the worker whose private admin socket is `path` to `method target`;
    OSError unless it answered 200 within `timeout`."""

    async def fetch() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_PEER_BYTES)
        try:
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n"
            writer.write(head.encode() + b"\r\n")
            return await reader.read(MAX_PEER_BYTES)  # (one answer, then the worker closes)
        finally:
            writer.close()

    data = await asyncio.wait_for(fetch(), timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        raise OSError(f"answered {head.splitlines()[0]!r}" if head else "closed without answer")
    doc: dict[str, Any] = json.loads(body)
    return doc


def _ring(doc: dict[str, Any]) -> list[Snapshot]:
    """A ring as JSON carries it (lists) back into snapshots (tuples)."""
    return [
        (float(when), {name: (c, e, tuple(b)) for name, (c, e, b) in routes.items()})
        for when, routes in doc["ring"]
    ]


class NodeView:
    """Worker 0's merged view of the node (see the module's docstring)."""

    def __init__(self, gateway: Gateway, metrics: GatewayMetrics, role: WorkerRole) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.role = role
        self.last: dict[int, tuple[int, list[Metric]]] = {}  # peer -> (pid, families) last read
        self.retired: list[Metric] = []  # the counters of workers that exited, summed

    def _token(self) -> str:
        admin = self.gateway.config.listeners.admin
        return admin.token if admin is not None else ""

    async def read_peers(self) -> dict[int, dict[str, Any] | None]:
        """Every other worker's `/workers/self`, or None for one that did not answer."""
        return await self._ask_peers(
            "GET", "/workers/self", "worker_unanswered", "did not answer: left out of this answer"
        )

    async def _ask_peers(
        self, method: str, target: str, event: str, failed: str
    ) -> dict[int, dict[str, Any] | None]:
        """Every other worker's answer to `method target`, all at once, or None for one that
        did not answer within PEER_TIMEOUT (logged as `event`: "worker N `failed`")."""
        peers, secret = self.role.peers(), self._token()
        outcomes = await asyncio.gather(
            *(ask_peer(self.role.socket_path(i), secret, method, target) for i in peers),
            return_exceptions=True,
        )
        out: dict[int, dict[str, Any] | None] = {}
        for index, outcome in zip(peers, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.warning(
                    "worker %d %s",
                    index,
                    failed,
                    extra={"event": event, "peer": index, "error": repr(outcome)},
                )
                out[index] = None
            else:
                out[index] = outcome
        return out

    # ------------------------------------------------------------------ /metrics
    def metric_parts(self, peers: dict[int, dict[str, Any] | None]) -> list[WorkerMetrics]:
        own = parse_exposition(generate_latest(self.metrics.registry).decode())
        parts = [WorkerMetrics(str(self.role.index), own)]
        for index, doc in peers.items():
            if doc is None:
                if index in self.last:  # its counters at the values last read
                    parts.append(WorkerMetrics(str(index), self.last[index][1], fresh=False))
                continue
            families = parse_exposition(doc["metrics"])
            self._remember(index, int(doc["pid"]), families)
            parts.append(WorkerMetrics(str(index), families))
        if self.retired:
            parts.append(WorkerMetrics("retired", self.retired, fresh=False))
        return parts

    def _remember(self, index: int, pid: int, families: list[Metric]) -> None:
        """Keep what worker `index` said; when another process answers for it now, what the
        previous one counted stays in the node's totals."""
        previous = self.last.get(index)
        if previous is not None and previous[0] != pid:
            exited = [WorkerMetrics("retired", counters_only(previous[1]), fresh=False)]
            self.retired = merge_families([WorkerMetrics("retired", self.retired), *exited])
        self.last[index] = (pid, families)

    async def handle_metrics(self, req: AdminRequest) -> AdminResponse:
        peers = await self.read_peers()
        families = merge_families(self.metric_parts(peers))
        answered = 1 + sum(doc is not None for doc in peers.values())
        families.append(
            GaugeMetricFamily("apigate_workers", "Worker processes of this node.", self.role.count)
        )
        families.append(
            GaugeMetricFamily(
                "apigate_workers_scraped",
                "Workers whose current values are in this answer (the others' counters are "
                "their last values read).",
                answered,
            )
        )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FixedCollector(families))
        encode, content_type = choose_encoder(req.headers.get("accept", ""))
        return AdminResponse(200, encode(registry), content_type)

    # ------------------------------------------------------------------ DELETE /cache
    async def handle_purge(self, req: AdminRequest) -> AdminResponse:
        """Purge every worker's cache: each keeps its own memory store, and a purge that
        reached worker 0 alone left the others serving what the operator meant to remove.
        Worker 0 purges its own first (it checks the route); a worker that does not confirm
        makes the answer a 503 naming it (a purge is safe to repeat)."""
        api = self.gateway.extensions["admin_api"]
        own = await api.purge_cache(req)  # (AdminError: unknown route, store unreachable)
        doc = json.loads(own.body)
        query = urlencode({k: v for k, v in req.query.items() if k in ("route", "prefix") and v})
        target = "/cache" + (f"?{query}" if query else "")
        answers = await self._ask_peers(
            "DELETE", target, "purge_incomplete", "did not confirm the cache purge"
        )
        missed = [index for index, answer in answers.items() if answer is None]
        doc["purged"] += sum(int(answer["purged"]) for answer in answers.values() if answer)
        doc["workers"] = {"count": self.role.count, "purged": self.role.count - len(missed)}
        if missed:
            raise AdminError(
                503,
                "purge_incomplete",
                f"workers {missed} did not confirm the purge within {PEER_TIMEOUT}s: "
                f"{doc['purged']} entries purged elsewhere; repeat the request",
            )
        return json_response(doc)

    # ------------------------------------------------------------------ /stats, /workers
    async def handle_stats(self, req: AdminRequest) -> AdminResponse:
        peers = await self.read_peers()
        answered = [doc for doc in peers.values() if doc is not None]
        ring = merge_rings([list(self.metrics.ring), *(_ring(doc) for doc in answered)])
        connections = len(self.gateway.connections) + sum(d["connections"] for d in answered)
        doc = self.metrics.stats(ring=ring, connections=connections)
        doc["workers"] = {"count": self.role.count, "answered": 1 + len(answered)}
        return json_response(doc)

    async def handle_workers(self, req: AdminRequest) -> AdminResponse:
        peers = await self.read_peers()
        rows = [{**_summary(describe_self(self.gateway, self.metrics)), "answered": True}]
        for index, doc in peers.items():
            if doc is None:
                rows.append({"index": index, "answered": False})
            else:
                rows.append({**_summary(doc), "answered": True})
        return json_response({"count": self.role.count, "workers": rows})


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    keys = ("index", "pid", "restarts", "started", "connections", "requests")
    return {key: doc[key] for key in keys}


async def attach_workers(gateway: Gateway) -> None:
    """Serve `/workers/self` on every worker's admin API, and on worker 0 answer `/metrics`,
    `/stats`, `/workers` and `DELETE /cache` for the whole node. Must run after
    `attach_metrics`. Nothing happens in a gateway that is not one of `--workers N`."""
    role = gateway.worker
    api = gateway.extensions.get("admin_api")
    metrics = gateway.extensions.get("metrics")
    if role is None or api is None or metrics is None:
        return

    async def handle_self(req: AdminRequest) -> AdminResponse:
        return json_response(describe_self(gateway, metrics))

    api.add_route("GET", "/workers/self", handle_self)
    if role.serves_admin:
        view = NodeView(gateway, metrics, role)
        gateway.extensions["node_view"] = view
        api.replace_route("GET", "/metrics", view.handle_metrics)
        api.replace_route("GET", "/stats", view.handle_stats)
        api.replace_route("DELETE", "/cache", view.handle_purge)
        api.add_route("GET", "/workers", view.handle_workers)
