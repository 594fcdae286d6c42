"""One worker of `apigate run --workers N`: what the supervisor tells it, and how it keeps its
end of the bargain (say when it is ready, never outlive the supervisor).

The supervisor (apigate.supervisor) starts each worker as `apigate run ... --worker-role JSON`.
The role says which ports the worker binds (the supervisor resolved port 0 once, so that every
worker and every restart share the same port), whether it serves the node's admin listener
(worker 0 does), and where the run directory is: every other worker serves its admin API there
on a Unix socket only the gateway's user can reach, so that worker 0 can sum the whole node's
metrics (apigate.admin.workers).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
from dataclasses import asdict, dataclass

from apigate.config.schema import GatewayConfig
from apigate.worker_rules import multi_worker_problems

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class WorkerRole:
    index: int  # 0 .. count-1; worker 0 serves the node's admin listener
    count: int
    proxy_port: int  # bound with SO_REUSEPORT by every worker
    admin_port: int  # the node's admin listener (worker 0 only); 0: the config has none
    run_dir: str  # 0700: the other workers' private admin sockets
    supervisor: int  # its pid: the worker ends when it does
    ready_fd: int  # a pipe's write end: one byte once the worker serves, then closed
    restarts: int = 0  # how many times the supervisor restarted this worker's slot

    @property
    def serves_admin(self) -> bool:
        return self.index == 0

    def socket_path(self, index: int | None = None) -> str:
        """The private admin socket of worker `index` (default: this one)."""
        return os.path.join(self.run_dir, f"worker-{self.index if index is None else index}.sock")

    def peers(self) -> list[int]:
        """The other workers' indexes."""
        return [i for i in range(self.count) if i != self.index]

    def to_arg(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_arg(cls, text: str) -> WorkerRole:
        return cls(**json.loads(text))

    def config_problems(self, config: GatewayConfig) -> list[str]:
        """Why a config (a reload, an admin change) cannot serve this node's workers: the
        start-up check again, so that no change brings in what start-up refuses."""
        return multi_worker_problems(config, self.count)

    def die_with_supervisor(self) -> None:
        """Ask Linux for SIGTERM (a graceful drain) when the supervisor dies, even by SIGKILL;
        then check it has not died already (the request only covers a death after it)."""
        with contextlib.suppress(OSError, AttributeError):  # (not Linux: the check below)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.supervisor:
            raise SystemExit("apigate worker: the supervisor is gone")

    def announce_ready(self) -> None:
        """Tell the supervisor this worker serves (it waits for every worker at start-up, and
        counts a worker that dies before this as one that cannot start)."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
