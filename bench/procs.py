"""Tools (nginx, wrk, taskset), the server processes of a run, and their CPU time from /proc."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A failure that ends the run with its message and exit status 1."""


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    taskset: str | None  # None: no pinning
    nginx_version: str
    wrk_version: str
    stub_status: bool  # nginx has the stub_status module (the upstream's counters)


def find_tool(name: str) -> str | None:
    """`name` on PATH, or in an sbin directory (which may not be on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def install_packages(names: list[str]) -> None:
    """apt-get update once, then apt-get install -y `names`; only as root."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            f"{' and '.join(names)} not found: install them (Debian/Ubuntu: "
            f"`sudo apt-get install -y {' '.join(names)}`) or run bench/run.py as root "
            "to let it install them"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"bench: installing {' '.join(names)} with apt-get", file=sys.stderr)
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *names]):
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            raise BenchError(f"`{' '.join(argv)}` failed")


def capture(argv: list[str]) -> str:
    """stdout + stderr of a short command."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return done.stdout + done.stderr


def ensure_tools(pin: bool) -> Tools:
    """Find nginx and wrk (installing them if missing and root) and taskset if pinning."""
    missing = [name for name in ("nginx", "wrk") if find_tool(name) is None]
    if missing:
        install_packages(missing)
    nginx, wrk = find_tool("nginx"), find_tool("wrk")
    if nginx is None or wrk is None:
        raise BenchError("nginx or wrk still not found after installing them")
    nginx_version = re.search(r"nginx/(\S+)", capture([nginx, "-v"]))
    wrk_version = re.search(r"wrk (?:\S+/)?(\S+)", capture([wrk, "--version"]))
    return Tools(
        nginx=nginx,
        wrk=wrk,
        taskset=find_tool("taskset") if pin and (os.cpu_count() or 1) >= 2 else None,
        nginx_version=nginx_version.group(1) if nginx_version else "unknown",
        wrk_version=wrk_version.group(1) if wrk_version else "unknown",
        stub_status="stub_status" in capture([nginx, "-V"]),
    )


def pinned(tools: Tools, cpu: int, argv: list[str]) -> list[str]:
    """argv run on one CPU through taskset, which execs it: the PID stays the same."""
    return [tools.taskset, "-c", str(cpu), *argv] if tools.taskset else argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


@dataclass
class Server:
    """A server process of the run: the upstream, nginx or apigate."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path  # its stdout and stderr

    @property
    def pid(self) -> int:
        return self.proc.pid


class Processes:
    """Every server process of the run; stop_all() may be called any number of times."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, which stop() signals whole
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM its process group, SIGKILL after 5 s.

        Signalling the group is safe while the leader is not reaped (returncode is None):
        until then its PID, and so the group ID, cannot be reused.
        """
        if proc.returncode is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self._procs[:]):
            self.stop(proc)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


# CPU accounting. A snapshot maps every PID to its ProcStat so that one snapshot gives a process
# tree's CPU time and also everybody else's.
class ProcStat(NamedTuple):
    """One process's /proc/PID/stat figures, CPU times in clock ticks."""

    ppid: int
    user: int  # utime: in the process's own code (Python, parsers, the event loop)
    system: int  # stime: in the kernel on its behalf (syscalls, TCP on loopback, wake-ups)
    reaped: int  # cutime+cstime: its waited-for children's whole lives
    reaped_system: int  # cstime alone

    @property
    def own(self) -> int:
        return self.user + self.system


ProcTable = dict[int, ProcStat]


def read_stat(pid: int) -> ProcStat | None:
    """One process's figures; None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # fields[0] is proc(5)'s field 3, state
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ProcStat(int(fields[1]), utime, stime, cutime + cstime, cstime)


def proc_table() -> ProcTable:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def tree(table: ProcTable, root: int) -> set[int]:
    """`root` and its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_seconds(table: ProcTable, root: int, system_only: bool = False) -> float:
    """CPU seconds used so far by `root` and its descendants, live or reaped (cutime); with
    `system_only`, the part spent in the kernel."""
    stats = [table[pid] for pid in tree(table, root) if pid in table]
    if system_only:
        return sum(s.system + s.reaped_system for s in stats) / CLK_TCK
    return sum(s.own + s.reaped for s in stats) / CLK_TCK


def foreign_seconds(before: ProcTable, after: ProcTable, ours: int) -> float:
    """CPU seconds used between two snapshots by processes outside the tree of `ours`.

    Counts each live process's own time only: a reaped child's cutime arrives all at once
    with its whole life's CPU time. So it misses processes that ended in between.
    """
    mine = tree(before, ours) | tree(after, ours)
    ticks = 0
    for pid, stat in after.items():
        if pid not in mine:
            earlier = before.get(pid)
            ticks += max(0, stat.own - (earlier.own if earlier else 0))  # max: a PID may be reused
    return ticks / CLK_TCK
