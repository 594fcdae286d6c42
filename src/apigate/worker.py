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

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass

from apigate.config.schema import GatewayConfig
from apigate.worker_rules import multi_worker_problems

# Beyond the drain timeout, how long a worker whose supervisor is gone may take to stop
# before it is ended without ceremony (its stop hooks: closing Redis clients, plugins)
STOP_GRACE = 10.0


@dataclass(frozen=True)
class WorkerRole:
    index: int  # 0 .. count-1; worker 0 serves the node's admin listener
    count: int
    proxy_port: int  # bound with SO_REUSEPORT by every worker
    admin_port: int  # the node's admin listener (worker 0 only); 0: the config has none
    run_dir: str  # 0700: the other workers' private admin sockets
    ready_fd: int  # a pipe's write end: one byte once the worker serves, then closed
    lifeline_fd: int  # a pipe's read end whose write end only the supervisor holds
    drain_timeout: float  # the config's limits.drain_timeout when the supervisor started
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
        """End this worker when the supervisor dies, however it dies (SIGKILL included).

        Nothing is ever written to the lifeline: a read returns only when the supervisor's
        end closes, which the kernel does when the supervisor exits. A thread blocked in that
        read costs nothing until then; it then asks for the drain every stop gets (SIGTERM),
        and if the worker has not exited by the drain timeout plus STOP_GRACE (still starting,
        a stop hook waiting on an unreachable Redis), ends it. A signal the kernel sends on the
        parent's death (PR_SET_PDEATHSIG) would do the first half only, and could be lost to a
        worker still starting."""
        threading.Thread(
            target=watch_lifeline,
            args=(self.lifeline_fd, self.drain_timeout + STOP_GRACE, self.run_dir),
            name="apigate-lifeline",
            daemon=True,
        ).start()

    def announce_ready(self) -> None:
        """Tell the supervisor this worker serves (it waits for every worker at start-up, and
        counts a worker that dies before this as one that cannot start)."""
        try:
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
        except OSError:
            pass  # the supervisor is gone: the lifeline ends this worker


def watch_lifeline(fd: int, deadline: float, run_dir: str = "") -> None:
    """Wait for the end of file on `fd` (the supervisor has exited), then stop this process:
    SIGTERM first (a drain), and `os._exit` if it still runs `deadline` seconds later. The
    supervisor's run directory goes too: a supervisor that exits removes it itself, one that
    was killed cannot, and every worker of the node is stopping now."""
    try:
        while os.read(fd, 64):
            pass  # (the supervisor never writes; a byte would be a bug, not a reason to stop)
    except OSError:
        pass  # a read error is as good as the end of file: no supervisor to answer to
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(deadline)
    os._exit(1)
