"""bench/procs.py: a process tree's CPU time, and the part of it spent in the kernel."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from tests.support.bench import bench_module


@pytest.fixture(scope="module")
def procs() -> ModuleType:
    return bench_module("procs")


def test_tree_seconds_counts_descendants_and_reaped_children_but_not_others(
    procs: ModuleType,
) -> None:
    tick = procs.CLK_TCK
    stat = procs.ProcStat  # ppid, user, system, reaped (user + system), reaped_system
    table = {
        10: stat(1, 3 * tick, 1 * tick, 2 * tick, 1 * tick),
        11: stat(10, 1 * tick, 2 * tick, 0, 0),
        12: stat(11, 0, 4 * tick, 0, 0),
        20: stat(1, 50 * tick, 50 * tick, 0, 0),  # not in the tree of 10
    }
    assert procs.tree_seconds(table, 10) == 3 + 1 + 2 + 1 + 2 + 4
    assert procs.tree_seconds(table, 10, system_only=True) == 1 + 1 + 2 + 4
    assert procs.tree_seconds(table, 11, system_only=True) == 2 + 4


def test_read_stat_splits_this_process_user_and_system_time(procs: ModuleType) -> None:
    os.stat(".")  # some kernel time, however little
    sum(range(200_000))  # and some of our own
    stat = procs.read_stat(os.getpid())
    assert stat is not None
    assert stat.ppid == os.getppid()
    times = os.times()
    # /proc and os.times() read the same counters, in ticks and in seconds
    assert abs(stat.user / procs.CLK_TCK - times.user) <= 2 / procs.CLK_TCK
    assert abs(stat.system / procs.CLK_TCK - times.system) <= 2 / procs.CLK_TCK
    assert stat.own == stat.user + stat.system


def test_foreign_seconds_skip_the_tree_and_reused_pids(procs: ModuleType) -> None:
    tick = procs.CLK_TCK
    before = {
        10: procs.ProcStat(1, 1 * tick, 0, 0, 0),
        30: procs.ProcStat(1, 5 * tick, 5 * tick, 0, 0),
    }
    after = {
        10: procs.ProcStat(1, 9 * tick, 0, 0, 0),  # ours: not foreign
        30: procs.ProcStat(1, 1 * tick, 0, 0, 0),  # a new process under an old PID: not negative
        40: procs.ProcStat(1, 2 * tick, 1 * tick, 0, 0),  # new since: all of it
    }
    assert procs.foreign_seconds(before, after, 10) == 3
