"""Gateway-generated responses: a status code with a JSON body `{"error", "message", "request_id"}`.

Bodies are small and built with `json.dumps` only on error paths; nothing here runs for a
proxied response.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from apigate.http.date import DATE
from apigate.http.headers import content_length_line
from apigate.http.status import status_line

# error code (machine readable) per status, used when a caller does not name one
DEFAULT_CODES: Final[dict[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "no_route",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    429: "rate_limited",
    431: "header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
    505: "http_version_not_supported",
}

SERVER_HEADER: Final = b"Server: apigate\r\n"


class GatewayError(Exception):
    """An error the gateway answers itself (before or instead of the upstream)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        detail: str | None = None,
    ) -> None:
        super().__init__(detail or message)
        self.status = status
        self.message = message  # what the client reads
        # what the logs read: `message`, or more that the client must not learn, such as the
        # address of an upstream behind the gateway (Envoy and Kong keep those to themselves)
        self.detail = detail or message
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.headers = tuple(headers)


def json_body(code: str, message: str, request_id: str | None) -> bytes:
    doc: dict[str, str] = {"error": code, "message": message}
    if request_id:
        doc["request_id"] = request_id
    return json.dumps(doc, separators=(",", ":")).encode()


def render_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes | None = b"application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
    keep_alive: bool = True,
    head_only: bool = False,
    http10: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response as one bytes object (one write). (`headers` is a list:
    compiled, a list of tuples is walked natively, an Iterable through the iterator protocol.)
    `http10`: the request was HTTP/1.0, whose keep-alive must be said (RFC 9112 §9.3)."""
    parts = [status_line(status), SERVER_HEADER, DATE.value]
    if headers is not None:
        for name, value in headers:
            parts.append(b"%s: %s\r\n" % (name, value))  # (compiled: one allocation)
    if body or status not in (204, 304):
        if content_type is not None:  # (None: a stored response that had none)
            parts += (b"Content-Type: ", content_type, b"\r\n")
        parts.append(content_length_line(len(body)))
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif http10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def body_size(response: bytes) -> int:
    """The body's size in a rendered response: what the logs and metrics count as sent
    (nginx's $body_bytes_sent), for answers the gateway writes itself."""
    return len(response) - response.index(b"\r\n\r\n") - 4


def render_error(
    err: GatewayError,
    request_id: str | None,
    *,
    keep_alive: bool,
    head_only: bool = False,
    http10: bool = False,
) -> bytes:
    body = json_body(err.code, err.message, request_id)
    headers = list(err.headers)
    if request_id:
        headers.append((b"X-Request-Id", request_id.encode()))
    return render_response(
        err.status, body, headers=headers, keep_alive=keep_alive, head_only=head_only, http10=http10
    )
