"""The access log: one JSON line per request, to stdout or a file.

Lines are kept in memory and written once a second (or every 256 lines, ~64 KiB), so the hot
path does no syscall per request. The `Authorization` header and query strings are never
logged; only the path.

Per request, `on_log` only copies the line's values into an entry; the lines are formatted
together when they are written. The same formatting code then runs in a tight loop, hot in the
CPU's caches: measured in bench/micro.py, a line costs ~3 µs less that way than formatted in
between the rest of each request's work when this ran interpreted, and compiled still ~0.3 µs
less (though it runs ~1,100 fewer instructions formatted in place: no entry to make and free).
Both halves live in `apigate.observability.access_log_lines`, compiled with the data plane;
this module owns the configuration and the output file.

Several processes may write one log (`apigate run --workers N`: every worker appends to the
same file, or writes to the stdout they share), and a line must never be cut by another's. A
flush is one `write(2)` of whole lines: to a regular file opened for appending, Linux writes
it at the end under the file's lock, so writes from several processes never interleave
(checked with strace: TextIOWrapper.write then flush is one write call, whatever its size;
not promised on NFS). A pipe only keeps writes of up to PIPE_BUF (4096) bytes whole, so to a
pipe or socket the lines go in pieces of whole lines up to that size (a single longer line
still goes whole, in one write, and may then be interleaved).
"""

from __future__ import annotations

import asyncio
import os
import select
import stat
import sys
from typing import IO, Literal

from apigate.observability.access_log_lines import AccessLogLines
from apigate.periodic import Periodic
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv


class AccessLogConfig(PluginConfig):
    format: Literal["json"] = "json"
    path: str = "-"  # "-" = stdout


class AccessLogPlugin(Plugin):
    name = "access_log"
    priority = 0
    Config = AccessLogConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, AccessLogConfig)
        self.path = config.path
        self._out: IO[str] | None = None
        self._piece_bytes = 0  # > 0: the output is a pipe, written in pieces this large
        self._ticker = Periodic(self.flush)
        self.lines = AccessLogLines(self.flush)
        # The hook is the compiled method itself, so the chain calls it with no interpreted
        # frame in between (a method here that forwarded to it would put one back).
        self.on_log = self.lines.on_log

    async def start(self) -> None:
        if self.path == "-":
            self._out = sys.stdout
        else:
            self._out = await asyncio.to_thread(open, self.path, "a", encoding="utf-8")
        self._piece_bytes = pipe_piece_bytes(self._out)
        self._ticker.start(asyncio.get_running_loop())

    async def close(self) -> None:
        self._ticker.stop()
        self.flush()
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None

    def flush(self) -> None:
        # taken out first, so that a failure can neither write a line twice nor let them pile up
        pending = self.lines.take()
        if pending and self._out is not None:
            text = self.lines.format(pending)
            for piece in pipe_pieces(text, self._piece_bytes) if self._piece_bytes else (text,):
                self._out.write(piece)
                self._out.flush()  # (one write(2) per piece: see the module's docstring)


def pipe_piece_bytes(out: IO[str]) -> int:
    """PIPE_BUF when `out` is a pipe or a socket (only that much is written whole), else 0."""
    try:
        mode = os.fstat(out.fileno()).st_mode
    except (OSError, ValueError):  # (no file descriptor: a test's StringIO)
        return 0
    return select.PIPE_BUF if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else 0


def pipe_pieces(text: str, limit: int) -> list[str]:
    """`text` (whole lines) as pieces of whole lines of at most `limit` bytes each (a longer
    line: a piece of its own)."""
    pieces: list[str] = []
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if piece and size + n > limit:
            pieces.append("".join(piece))
            piece, size = [], 0
        piece.append(line)
        size += n
    if piece:
        pieces.append("".join(piece))
    return pieces
