"""`apigate run --workers N`: one supervisor process and N gateway workers on the same port.

Theory of operation
-------------------
The supervisor serves nothing itself. It checks the config (N > 1 needs `store: redis://` and
no rate limit counted in process: apigate.worker_rules), then resolves each listener's address
once: it binds the proxy (and admin) address with SO_REUSEPORT and does not listen, so port 0
becomes one concrete port that stays reserved while workers come and go. Each worker is
`apigate run` again with a `--worker-role` (apigate.worker): it binds its own listening socket
on that port with SO_REUSEPORT, and the kernel spreads new connections among the workers'
sockets. A bound socket that does not listen takes no connections, so the reservation costs
nothing.

Each worker slot runs this loop (`_keep_running`):

    spawn --ready byte--> SERVING --exit--> backoff (0.1 s, doubling to 5 s) --> spawn
      \\--exit before ready--> one more start failure: the first start of the node, or
                               MAX_START_FAILURES in a row, ends the supervisor with the
                               worker's exit status (its error is on the shared stderr)

A worker that served for STABLE_AFTER seconds before dying starts its backoff afresh.
Signals: SIGTERM/SIGINT go to every worker (each drains its in-flight requests as a lone
gateway does; a second one cuts them), and the supervisor exits 0 once all have exited.
SIGHUP goes to every worker (each reloads the file); a worker still starting gets it once it
is ready. A worker that has not exited by the drain timeout plus STOP_GRACE after the stop is
killed. Workers never outlive the supervisor: each holds the read end of a pipe (the
lifeline) whose only write end the supervisor keeps open, so the supervisor's exit, by any
means, is an end of file in every worker, which then stops (WorkerRole.die_with_supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from apigate.worker import STOP_GRACE, WorkerRole

log = logging.getLogger("apigate.supervisor")

MAX_START_FAILURES = 3  # a worker that dies before it serves this many times in a row
BACKOFF_FIRST = 0.1  # seconds before the first restart, doubled per crash in a row
BACKOFF_MAX = 5.0
STABLE_AFTER = 10.0  # seconds of serving after which a crash starts the backoff afresh


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind `host:port` with SO_REUSEPORT without listening: port 0 becomes a concrete port,
    and it stays ours (the workers bind it beside this socket) until this socket closes."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


@dataclass
class Slot:
    """One worker's place: the process in it now and its history."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False  # the process in it announced it serves
    reload_owed: bool = False  # a SIGHUP came while it was starting
    start_failures: int = 0  # deaths before ready, in a row
    crashes: int = 0  # deaths in a row (the backoff's exponent)
    restarts: int = 0

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        state = "serving" if self.ready else "starting" if pid else "waiting"
        return f"<Slot {self.index} pid={pid} {state}, {self.restarts} restarts>"


class Supervisor:
    def __init__(
        self,
        worker_argv: list[str],
        count: int,
        proxy: socket.socket,
        admin: socket.socket | None,
        drain_timeout: float,
    ) -> None:
        self.worker_argv = worker_argv  # `apigate run -c FILE [--watch ...]`, without the role
        self.count = count
        self.drain_timeout = drain_timeout
        # The lifeline: every worker gets the read end; the write end stays here, unwritten,
        # and closes only when this process ends (os.pipe's ends are not inherited unless
        # passed, so no worker holds a write end that would keep the others' open)
        self.lifeline_read, self._lifeline_write = os.pipe()
        self._kill_timer: asyncio.TimerHandle | None = None
        self.proxy = proxy
        self.admin = admin
        self.slots = [Slot(i) for i in range(count)]
        self.run_dir = ""
        self.stopping = asyncio.Event()
        self.started = False  # every worker has served once
        self.exit_code = 0
        self._all_ready = asyncio.Event()

    # ------------------------------------------------------------------ main
    async def run(self, early_signals: list[int]) -> int:
        loop = asyncio.get_running_loop()
        for stop_or_reload in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(stop_or_reload, self._on_signal, stop_or_reload)
        self.run_dir = tempfile.mkdtemp(prefix="apigate-workers-")  # (mode 0700)
        try:
            tasks = [asyncio.create_task(self._keep_running(slot)) for slot in self.slots]
            stopped = asyncio.create_task(self.stopping.wait())
            await asyncio.wait(
                [asyncio.create_task(self._all_ready.wait()), stopped],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._all_ready.is_set() and not self.stopping.is_set():
                self.started = True
                self._announce()
                for sig in early_signals:  # (a SIGHUP while the supervisor imported)
                    self._on_signal(sig)
            await asyncio.gather(*tasks)
            return self.exit_code
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            os.close(self.lifeline_read)
            os.close(self._lifeline_write)
            self.proxy.close()
            if self.admin is not None:
                self.admin.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _announce(self) -> None:
        """The lines `apigate run` prints once it serves (scripts and tests wait for them)."""
        if self.admin is not None:
            print(f"apigate admin listening on {address_of(self.admin)}", flush=True)
        pids = ", ".join(str(s.proc.pid) for s in self.slots if s.proc is not None)
        print(
            f"apigate {os.getpid()} listening on {address_of(self.proxy)} "
            f"({self.count} workers: {pids})",
            flush=True,
        )

    # ------------------------------------------------------------------ one slot
    async def _keep_running(self, slot: Slot) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            status = await self._run_once(slot)
            if self.stopping.is_set():
                return
            served = time.monotonic() - started
            if not slot.ready:
                slot.start_failures += 1
                if not self.started or slot.start_failures >= MAX_START_FAILURES:
                    self._fail(slot, status)
                    return
            else:
                slot.start_failures = 0
            if slot.ready and served >= STABLE_AFTER:
                slot.crashes = 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**slot.crashes)
            slot.crashes += 1
            log.warning(
                "worker %d exited (status %s); restarting it in %.1f s",
                slot.index,
                status,
                delay,
                extra={"event": "worker_exit", "worker": slot.index, "status": status},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            slot.restarts += 1

    async def _run_once(self, slot: Slot) -> int:
        """Start the slot's worker, mark it ready when it says so; its exit status once it
        has exited (negative: the signal that ended it)."""
        read_end, write_end = os.pipe()
        role = WorkerRole(
            index=slot.index,
            count=self.count,
            proxy_port=self.proxy.getsockname()[1],
            admin_port=self.admin.getsockname()[1] if self.admin is not None else 0,
            run_dir=self.run_dir,
            ready_fd=write_end,
            lifeline_fd=self.lifeline_read,
            drain_timeout=self.drain_timeout,
            restarts=slot.restarts,
        )
        slot.ready = False
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *self.worker_argv,
                "--worker-role",
                role.to_arg(),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(write_end, self.lifeline_read),
            )
        finally:
            os.close(write_end)  # the worker's copy alone: its exit reads as end of file
        ready = asyncio.create_task(_wait_ready(read_end))
        try:
            exited = asyncio.create_task(slot.proc.wait())
            await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and ready.result():
                self._on_ready(slot)
            return await exited
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready  # (its reader is removed before the pipe closes)
            os.close(read_end)

    def _on_ready(self, slot: Slot) -> None:
        slot.ready = True
        if slot.reload_owed:
            slot.reload_owed = False
            self._send(slot, signal.SIGHUP)
        if all(s.ready for s in self.slots):
            self._all_ready.set()

    def _fail(self, slot: Slot, status: int) -> None:
        """The worker cannot start: stop the others and exit with its status."""
        how = (
            "could not start" if not self.started else f"failed to start {MAX_START_FAILURES} times"
        )
        print(
            f"apigate: worker {slot.index} {how} (exit status {status}); stopping",
            file=sys.stderr,
            flush=True,
        )
        self.exit_code = status if status > 0 else 1
        self._stop(signal.SIGTERM)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            if self.stopping.is_set():
                return
            for slot in self.slots:
                if slot.ready:
                    self._send(slot, sig)
                else:
                    slot.reload_owed = True
            return
        if not self.stopping.is_set():
            log.info(
                "stopping: every worker drains its in-flight requests",
                extra={"event": "shutdown", "signal": signal.Signals(sig).name},
            )
        self._stop(sig)  # (again: the workers cut their in-flight requests)

    def _stop(self, sig: int) -> None:
        if self._kill_timer is None:  # the first stop: the workers have this long to drain
            self._kill_timer = asyncio.get_running_loop().call_later(
                self.drain_timeout + STOP_GRACE, self._kill_remaining
            )
        self.stopping.set()
        for slot in self.slots:
            self._send(slot, sig)

    def _kill_remaining(self) -> None:
        """The drain timeout and STOP_GRACE have passed since the stop: whatever worker still
        runs is stuck (a stop hook that never returns), and the node must still stop."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.warning(
                    "worker %d did not stop in time: killed",
                    slot.index,
                    extra={"event": "worker_killed", "worker": slot.index},
                )
                self._send(slot, signal.SIGKILL)

    @staticmethod
    def _send(slot: Slot, sig: int) -> None:
        if slot.proc is not None and slot.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(sig)

    def __repr__(self) -> str:
        return f"<Supervisor {self.count} workers {self.slots!r}>"


async def _wait_ready(fd: int) -> bool:
    """Whether the worker wrote its ready byte (False: the pipe closed, it exited first)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return os.read(fd, 1) == b"1"


def run_supervisor(
    config_path: str, count: int, worker_options: list[str], early_signals: list[int]
) -> int:
    """`apigate run --workers N` (N > 1): check, reserve the ports, supervise until stopped.
    Exit statuses as `apigate run`'s: 2 for a config refused, 1 for a port that cannot be
    had or a worker that cannot start (its own status when it gave one)."""
    from apigate.config.errors import ConfigError, invalid_report
    from apigate.config.loader import load_config
    from apigate.worker_rules import multi_worker_problems

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(invalid_report(config_path, exc), file=sys.stderr)
        return 2
    if problems := multi_worker_problems(config, count):
        lines = "\n".join(f"  - {problem}" for problem in problems)
        print(f"apigate: cannot run {count} workers with {config_path}:\n{lines}", file=sys.stderr)
        return 2
    listeners = config.listeners
    sockets: list[socket.socket] = []
    try:
        sockets.append(reserve_port(listeners.proxy.host, listeners.proxy.port))
        if listeners.admin is not None:
            sockets.append(reserve_port(listeners.admin.host, listeners.admin.port))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        print(f"apigate: cannot start: {exc}", file=sys.stderr)
        return 1
    argv = [sys.executable, "-m", "apigate", "run", "-c", config_path, *worker_options]
    admin = sockets[1] if len(sockets) > 1 else None
    supervisor = Supervisor(argv, count, sockets[0], admin, config.limits.drain_timeout)
    return asyncio.run(supervisor.run(early_signals))
