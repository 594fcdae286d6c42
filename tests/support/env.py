"""A gateway process and a recording upstream shared by the tests of one module.

Starting a gateway costs ~0.35 s, so modules with many cases share one (a module-scoped async
fixture); each test then gets the pair back with the upstream's record cleared, so that
`env.up.received == []` means "nothing of this test's request reached the upstream":

    shared_env = shared_env_fixture(lambda up: config_for(up.url))
    env = env_fixture()
    pytestmark = pytest.mark.asyncio(loop_scope="module")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest_asyncio

from tests.support.gateway import GatewayProcess
from tests.support.upstream import Upstream


@dataclass
class Env:
    gw: GatewayProcess
    up: Upstream

    @property
    def port(self) -> int:
        return self.gw.port

    def reset(self) -> None:
        self.up.received.clear()
        self.up.state.canned.clear()
        self.up.state.bytes_received = 0


def shared_env_fixture(config: Callable[[Upstream], dict[str, Any]]) -> Any:
    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def shared_env() -> AsyncIterator[Env]:
        async with Upstream() as up, GatewayProcess(config(up)) as gw:
            yield Env(gw, up)

    return shared_env


def env_fixture() -> Any:
    @pytest_asyncio.fixture(loop_scope="module")
    async def env(shared_env: Env) -> AsyncIterator[Env]:
        shared_env.reset()
        yield shared_env
        proc = shared_env.gw.proc
        assert proc is not None and proc.returncode is None, (
            "the gateway died:\n" + shared_env.gw.logs()
        )

    return env
