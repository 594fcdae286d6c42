"""`Response`: what a plugin answers with instead of proxying (see apigate.plugins.base).

Kept in its own module so that it is compiled with the data plane (apigate.buildinfo): the
exchange builds and reads one for every answer a plugin makes (a cache hit, a 401, a 429), and
a native class costs a fraction of an interpreted dataclass there. Its fields are typed for
real then: a plugin that passes a str body gets a TypeError where it builds the Response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr


# A plugin may subclass it (a JSONResponse of its own): compiled, that needs saying so.
@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(slots=True)
class Response:
    """A response a plugin produces instead of proxying."""

    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes | None = b"application/json"  # None: no Content-Type field
