"""The parsed request head, as the downstream protocol hands it to the proxy exchange."""

from __future__ import annotations

import time

from apigate.http.date import DATE
from apigate.http.headers import VIA_LINE, HeaderList


class Request(HeaderList):
    """One client request head. Header names keep the client's spelling; values stay bytes."""

    __slots__ = (
        "_id_line",
        "_id_line_for",
        "_start",
        "began_at",
        "body_received",
        "chunked",
        "client_ip",
        "client_port",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "forwarded_prefix",
        "forwarding",
        "headers",
        "host",
        "keep_alive",
        "method",
        "one_reading",
        "path",
        "plain_id",
        "query",
        "request_id",
        "scheme",
        "traceparent",
        "tracestate",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.path = "/"  # normalised path, used for routing and forwarded upstream
        # the path as the parser made it, when it has no other reading (no "%" escape, no ";"
        # parameter: routing.normalize.other_readings): the exchange then looks for no route
        # of another reading
        self.one_reading: str | None = None
        self.query = b""  # raw query string without "?"
        self.version = "1.1"
        # end-to-end headers in client order, minus Host, hop-by-hop and X-Forwarded-*
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = ""  # lower-cased Host header value (may include :port)
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.body_received = 0  # body bytes read from the client so far (the metrics' bytes in)
        self.expect_continue = False
        self.upgrade: bytes | None = None  # the Upgrade header value when the client asks for one
        self.request_id = ""
        # the request id as the connection set it (its own, or the client's once
        # valid_request_id passed it): letters, digits and "._:-", which JSON writes as they
        # are. A plugin that sets another `request_id` leaves this behind, and the access log
        # escapes only such an id.
        self.plain_id = ""
        self.forwarded_for: bytes | None = None  # client-sent X-Forwarded-For (kept if trusted)
        # a trusted peer's X-Forwarded-Prefix: the exchange's own prefix is added to it
        self.forwarded_prefix: bytes | None = None
        # headers.forwarding_lines() for this request when the connection has them (else b"")
        self.forwarding = b""
        self.client_ip = ""
        self.client_port = 0
        self.scheme = "http"
        # W3C trace context, kept apart from `headers` because the gateway sends its own
        # (continued) values upstream: b"" marks a repeated traceparent, which is invalid
        self.traceparent: bytes | None = None
        self.tracestate: list[bytes] | None = None
        # time.monotonic() when the first byte arrived (set by the connection)
        self.began_at = 0.0
        # set explicitly (tests, replayed requests): wins over began_at (0.0 is a time too)
        self._start: float | None = None
        self._id_line = b""  # id_and_via(), and the request id it was made for
        self._id_line_for: str | None = None

    @property
    def start(self) -> float:
        """Wall-clock time of the request's first byte, for logs. Derived when asked, from
        the monotonic clock, which the connection reads anyway: a `time.time()` per
        request was a call on the hot path that only the access log needs. In the gateway,
        with the wall clock's offset read once a second with the Date header (no clock call
        at all: two per logged request cost ~0.15 µs)."""
        if self._start is not None:
            return self._start
        if not self.began_at:
            return time.time()
        if DATE.ticking:
            return self.began_at + DATE.wall_offset
        return time.time() - (time.monotonic() - self.began_at)

    @start.setter
    def start(self, wall_time: float) -> None:
        self._start = wall_time

    def id_and_via(self) -> bytes:
        """The `X-Request-Id` and `Via` field lines, which both heads carry one after the
        other: made once, and again only if the id changed in between (a plugin may set its
        own)."""
        if self._id_line_for is not self.request_id:
            self._id_line = b"X-Request-Id: %s\r\n%s" % (self.request_id.encode(), VIA_LINE)
            self._id_line_for = self.request_id
        return self._id_line

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, lname: str) -> str | None:
        """First value of a header by lower-case name (linear scan: plugins call it rarely).

        Host and the trace context are kept apart from `headers` because the gateway decides
        what goes upstream for them.
        """
        if lname == "host":
            return self.host or None
        if lname == "traceparent":
            return self.traceparent.decode("latin-1") if self.traceparent else None
        if lname == "tracestate":
            return ",".join(v.decode("latin-1") for v in self.tracestate or ()) or None
        return HeaderList.header(self, lname)

    def _field_list(self) -> list[tuple[bytes, bytes]]:
        return self.headers

    @property
    def target(self) -> str:
        if self.query:
            return self.path + "?" + self.query.decode("latin-1")
        return self.path

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} HTTP/{self.version} id={self.request_id}>"
