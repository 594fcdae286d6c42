"""Structured JSON logging for the gateway's own events (not the access log).

Every record is one JSON object per line with time, level, logger and message, plus the
`extra={...}` fields the caller passed (event, service, instance, ...). Values that look like
secrets are never passed in; `redact()` exists for the few places that echo user input.

Lines the gateway does not word itself still pass through here: a library's (the OTLP
exporter's urllib3 says "Max retries exceeded with url: /v1/traces?api_key=..."), an
exception's text. So the message, the exception text and every string field have URL
credentials taken out (`apigate.redaction.redact_text`: a password in the user info, a secret
query parameter, of a URL path without a scheme too). This is the
formatter of the gateway's own log lines only: the access log writes its lines itself (see
apigate.observability.access_log), so the per-request path pays nothing for it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from apigate.redaction import redact_text

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_SECRET_KEYS = ("authorization", "token", "secret", "password", "api_key", "apikey")


def redact(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ("[redacted]" if any(s in k.lower() for s in _SECRET_KEYS) else v)
        for k, v in fields.items()
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        extra = {
            k: redact_text(v) if isinstance(v, str) else v
            for k, v in vars(record).items()
            if k not in _STANDARD
        }
        doc.update(redact(extra))
        if record.exc_info:
            doc["exception"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message` lines (`--plain-logs`), credentials redacted as in
    the JSON lines."""

    def __init__(self, worker: int | None = None) -> None:
        where = f" [worker {worker}]" if worker is not None else ""
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def parse_log_levels(spec: str) -> tuple[str, dict[str, str]]:
    """`"info,apigate.registry=debug"` -> ("info", {"apigate.registry": "debug"})."""
    default, levels = "info", {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, level = part.partition("=")
        if sep:
            levels[name.strip()] = level.strip()
        else:
            default = part
    for level in (default, *levels.values()):
        if not isinstance(logging.getLevelName(level.upper()), int):
            raise ValueError(f"unknown log level {level!r}")
    return default, levels


class WorkerField(logging.Filter):
    """Stamps every record with the worker that made it (`apigate run --workers N`): the
    workers share stderr, and the operator must tell them apart."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def setup_logging(
    level: str = "info",
    levels: dict[str, str] | None = None,
    json_format: bool = True,
    worker: int | None = None,
) -> None:
    """JSON to stderr; `levels` sets per-component levels: {"apigate.registry": "debug"}.
    `worker`: this process is that worker of `--workers N` (a `worker` field on every line,
    `[worker N]` in plain logs)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(worker))
    if worker is not None:
        handler.addFilter(WorkerField(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, lvl in (levels or {}).items():
        logging.getLogger(name).setLevel(lvl.upper())
