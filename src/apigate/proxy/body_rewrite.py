"""Whole-body rewriting for plugins that edit JSON bodies (request/response transforms).

Streaming is the default; a route only buffers when one of its plugins declares
`buffer_request_body` / `buffer_response_body` and wants this particular message
(`wants_request_body(ctx)` / `wants_response_body(ctx, head)`: JSON, not HEAD/204/304...).
Buffering is bounded by the smallest `max_body_bytes` of those plugins: a body over it is passed
through untouched, and each plugin's `body_too_large(ctx)` is told so it can log the fact.
After rewriting, Content-Length is recomputed and the message is no longer chunked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apigate.http.response_head import ResponseHead
from apigate.proxy.heads import response_head

if TYPE_CHECKING:
    from apigate.proxy.exchange import ProxyExchange


def _tell_too_large(plugins: list[Any], ctx: ProxyExchange) -> None:
    for plugin in plugins:
        notify = getattr(plugin, "body_too_large", None)
        if notify is not None:
            notify(ctx)


class RequestBodyRewrite:
    """Holds a request body until it is complete, then lets the plugins rewrite it."""

    def __init__(self, plugins: list[Any], limit: int) -> None:
        self.plugins = plugins
        self.limit = limit
        self.active = True
        self.waiting = False  # the exchange wants to forward as soon as the body is complete

    @classmethod
    def start(cls, ctx: ProxyExchange, plugins: list[Any]) -> RequestBodyRewrite | None:
        wanting = [
            p
            for p in plugins
            if getattr(p, "wants_request_body", None) is None or p.wants_request_body(ctx)
        ]
        if not wanting:
            return None
        limit = min(int(p.max_body_bytes) for p in wanting)
        length = ctx.request.content_length
        if length is not None and length > limit:
            _tell_too_large(wanting, ctx)
            return None
        return cls(wanting, limit)

    def give_up(self, ctx: ProxyExchange) -> None:
        """The body outgrew the limit while arriving: stream it as it is."""
        self.active = False
        self.waiting = False
        _tell_too_large(self.plugins, ctx)

    def apply(self, ctx: ProxyExchange) -> None:
        body = b"".join(ctx._body)
        for plugin in self.plugins:
            body = plugin.transform_request_body(ctx, body)
        ctx._body = [body] if body else []
        ctx._body_size = len(body)
        ctx.request.content_length = len(body)
        ctx.request.chunked = False
        self.active = False
        self.waiting = False


class ResponseBodyRewrite:
    """Holds a response head and body until the body is complete, then rewrites the body."""

    def __init__(self, plugins: list[Any], head: ResponseHead, limit: int) -> None:
        self.plugins = plugins
        self.head = head
        self.limit = limit
        self.active = True
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.size = 0

    @classmethod
    def start(
        cls, ctx: ProxyExchange, plugins: list[Any], head: ResponseHead
    ) -> ResponseBodyRewrite | None:
        if ctx.request.method == "HEAD" or head.status in (101, 204, 304):
            return None
        wanting = [
            p
            for p in plugins
            if getattr(p, "wants_response_body", None) is None or p.wants_response_body(ctx, head)
        ]
        if not wanting:
            return None
        limit = min(int(p.max_body_bytes) for p in wanting)
        if head.content_length is not None and head.content_length > limit:
            _tell_too_large(wanting, ctx)
            return None
        return cls(wanting, head, limit)

    def hold(self, head: ResponseHead, keep_alive: bool) -> None:
        self.head = head
        self.keep_alive = keep_alive

    def collect(self, ctx: ProxyExchange, chunk: bytes) -> bool:
        """Keep `chunk`; False when it would pass the limit (the caller then streams)."""
        if self.size + len(chunk) > self.limit:
            return False
        self.chunks.append(chunk)
        self.size += len(chunk)
        return True

    def release(self, ctx: ProxyExchange, chunk: bytes) -> bytes:
        """Give up rewriting: the held head goes out as it was, the held body with `chunk`."""
        self.active = False
        _tell_too_large(self.plugins, ctx)
        ctx._pending_head = response_head(
            self.head, ctx.request, chunk_out=ctx._chunk_out, keep_alive=self.keep_alive
        )
        held = b"".join(self.chunks)
        self.chunks = []
        return held + chunk

    def finish(self, ctx: ProxyExchange) -> bytes:
        body = b"".join(self.chunks)
        for plugin in self.plugins:
            body = plugin.transform_response_body(ctx, self.head, body)
        self.active = False
        return body

    def head_bytes(self, ctx: ProxyExchange, length: int) -> bytes:
        head = self.head
        head.content_length = length
        head.chunked = False
        head.until_eof = False
        ctx._chunk_out = False
        return response_head(head, ctx.request, chunk_out=False, keep_alive=self.keep_alive)
